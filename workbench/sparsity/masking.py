"""Zeroing MLP activations inside a model, temporarily: the machinery behind ``method.apply``.

A ``Mask`` says where to sparsify one layer's MLP, how to score each entry, and which
entries to keep. Three places (``where``), after the training-free methods:

- ``"x1"``: x1, the input of W_out (``hook_post``), zeroed where dropped (Top-k, FAT-ε,
  CETT, TEAL's and WINA's down-projection input, CATS on plain MLPs);
- ``"gate"``: act(W_gate x) of a gated MLP, scored from act(``hook_pre``); a dropped neuron's
  x1 becomes act(gate)=0 times up, i.e. zero (CATS and CHESS, Lee et al. 2024, He et al. 2024);
- ``"input"``: the MLP input, read by W_in and W_gate (TEAL, Liu et al. 2024; WINA, Chen et al.
  2025). TransformerLens has no hook after ln2's affine weights, so this one is a forward
  pre-hook on the MLP module.

Whatever the site, a gated MLP's b_in stays in ``hook_post`` (mlp.py, the bias convention):
x1 masks score and zero x1 = ``hook_post`` − b_in and add b_in back, gate masks leave b_in
where they drop, so every method drops exactly the neurons' contributions n_i and nothing else.

An entry is *inactive* when it is dropped or its score is exactly zero (a ReLU zero costs
nothing either); the realised sparsity of a site is the inactive fraction. ``install``
is a context manager that adds the hooks, yields a ``SparsityMeter`` counting that fraction
on every forward pass, and removes exactly the hooks it added on exit, so nested
``install`` calls compose and the model is left as it was.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from .mlp import MLPSite

WHERES = ("x1", "gate", "input")


def site_key(layer: int, where: str) -> str:
    """Key of a sparsified site in ``Thresholds``: ``"blocks.{layer}.mlp.{where}"``."""
    if where not in WHERES:
        raise ValueError(f"where must be one of {WHERES}, got {where!r}")
    return f"blocks.{layer}.mlp.{where}"


def source_name(site: MLPSite, where: str) -> str:
    """The activation-source name of what a mask at ``where`` scores: x1 → ``hook_post``,
    gate → ``hook_pre`` (the gate pre-activation), input → ``site.input_name``."""
    return {"x1": site.hook_post, "gate": site.hook_pre, "input": site.input_name}[where]


def threshold_keep(threshold: Tensor | float) -> Callable[[Tensor], Tensor]:
    """Keep score ≥ t (t a scalar, or one per channel broadcast over the last axis), score > 0."""
    def keep(score: Tensor) -> Tensor:
        t = threshold.to(score.device, score.dtype) if isinstance(threshold, Tensor) else threshold
        return (score >= t) & (score > 0)
    return keep


def topk_keep(k: int) -> Callable[[Tensor], Tensor]:
    """Keep the k largest scores of each token (last axis), and only those above zero."""
    def keep(score: Tensor) -> Tensor:
        kept = torch.zeros_like(score, dtype=torch.bool)
        if k > 0:
            kept.scatter_(-1, score.topk(min(k, score.shape[-1]), dim=-1).indices, True)
        return kept & (score > 0)
    return keep


def batch_topk_keep(k: int) -> Callable[[Tensor], Tensor]:
    """Keep the k·tokens largest scores of the whole forward pass (ranked over the flattened
    batch, as the Top-k reference code does), and only those above zero."""
    def keep(score: Tensor) -> Tensor:
        flat = score.reshape(-1)
        total = min(flat.numel(), k * (flat.numel() // score.shape[-1]))
        kept = torch.zeros_like(flat, dtype=torch.bool)
        if total > 0:
            kept[flat.topk(total).indices] = True
        return (kept & (flat > 0)).view_as(score)
    return keep


@dataclass(frozen=True)
class Mask:
    """Sparsify ``site`` at ``where``: keep = ``keep(score(activation))``, the rest dropped.

    ``score`` maps the activation read at that place (x1; the gate pre-activation; the MLP
    input) to a non-negative score of the same shape.
    """

    site: MLPSite
    where: str
    score: Callable[[Tensor], Tensor]
    keep: Callable[[Tensor], Tensor]

    @property
    def key(self) -> str:
        return site_key(self.site.layer, self.where)

    @property
    def source_name(self) -> str:
        """The activation-source name of what ``score`` reads."""
        return source_name(self.site, self.where)

    def kept(self, activation: Tensor) -> Tensor:
        return self.keep(self.score(activation))


class SparsityMeter:
    """Inactive / total entries per site over the forward passes run inside ``install``.

    Counts stay on the model's device (no synchronisation per hook) until read.
    """

    def __init__(self):
        self._inactive: dict[str, Tensor] = {}
        self._total: dict[str, int] = {}

    def add(self, key: str, kept: Tensor) -> None:
        inactive = (~kept).sum()
        self._inactive[key] = self._inactive[key] + inactive if key in self._inactive else inactive
        self._total[key] = self._total.get(key, 0) + kept.numel()

    def sparsity(self) -> dict[str, float]:
        """Realised sparsity per site key (fraction of entries inactive)."""
        return {key: float(self._inactive[key]) / self._total[key] for key in self._total}

    @property
    def mean(self) -> float:
        """Unweighted mean of the per-site sparsities (NaN before any forward pass)."""
        values = list(self.sparsity().values())
        return sum(values) / len(values) if values else float("nan")

    def reset(self) -> None:
        self._inactive.clear()
        self._total.clear()


def _x1_hook(mask: Mask, meter: SparsityMeter):
    def hook(post, hook):
        x1 = mask.site.x1_from_post(post)
        kept = mask.kept(x1)
        meter.add(mask.key, kept)
        return mask.site.post_from_x1(x1 * kept)
    return hook


def _gate_hooks(mask: Mask, meter: SparsityMeter):
    state: dict[str, Tensor] = {}

    def on_gate(pre, hook):
        state["kept"] = mask.kept(pre)  # scored from act(gate); x1 is not formed yet

    def on_x1(x1, hook):
        kept = state.pop("kept")
        meter.add(mask.key, kept)
        return torch.where(kept, x1, mask.site.post_from_x1(torch.zeros_like(x1)))
    return [(mask.site.hook_pre, on_gate), (mask.site.hook_post, on_x1)]


def _input_hook(mask: Mask, meter: SparsityMeter):
    def pre_hook(module, args):
        x = args[0]
        kept = mask.kept(x)
        meter.add(mask.key, kept)
        return (x * kept, *args[1:])
    return pre_hook


@contextmanager
def install(model, masks: list[Mask]) -> Iterator[SparsityMeter]:
    """Add the masks' hooks to ``model`` for the duration of the block; yield their meter."""
    meter = SparsityMeter()
    fwd_hooks = []
    with ExitStack() as stack:
        for mask in masks:
            if mask.where == "x1":
                fwd_hooks.append((mask.site.hook_post, _x1_hook(mask, meter)))
            elif mask.where == "gate":
                if not mask.site.gated:
                    raise ValueError(f"layer {mask.site.layer}'s MLP is not gated: mask x1 instead of the gate")
                fwd_hooks.extend(_gate_hooks(mask, meter))
            elif mask.where == "input":
                stack.callback(mask.site.module.register_forward_pre_hook(_input_hook(mask, meter)).remove)
            else:
                raise ValueError(f"where must be one of {WHERES}, got {mask.where!r}")
        stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
        yield meter
