"""Lazy-neuron statistics (Li et al. 2022, "The Lazy Neuron Phenomenon: On Emergence of
Activation Sparsity in Transformers").

Li et al. report, per layer, the fraction of nonzero entries of the MLP hidden activation
per token, averaged over tokens (T5-Base 3.0%, ViT-B16 6.3%). GELU and SiLU are never
exactly zero, so two proxies are reported beside it (DESIGN.md, "Lazy neurons"): the
fraction of positive pre-activations, and the fraction of |h| < ε.

Here h is x1 (``hook_post``: h for plain MLPs, act(gate) ⊙ up for gated ones) and the
pre-activation is ``hook_pre`` (the gate's for gated MLPs). A neuron *fires* on a token
when its pre-activation is positive: for ReLU that is exactly h ≠ 0, so one definition
serves every flavour. Per-neuron firing frequencies give the dead (never fires) and
always-on (fires on every token) neurons, and the histograms of a paper's figure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .sources import ModelSource, as_source

DEFAULT_EPS = 1e-2


@dataclass
class LazyNeuronStats:
    """Activation statistics of one layer's MLP over ``n_tokens`` tokens."""

    layer: int
    n_tokens: int
    d_mlp: int
    eps: float
    nonzero_fraction: float
    """Mean over tokens of the fraction of x1 entries that are nonzero (Li et al.'s number)."""
    nonzero_per_token_std: float
    """Standard deviation over tokens of that per-token fraction."""
    positive_pre_fraction: float
    """Fraction of (gate) pre-activations > 0."""
    small_fraction: float
    """Fraction of x1 entries with |x1| < eps."""
    frequency: Tensor
    """[d_mlp] fraction of tokens on which each neuron fires (pre-activation > 0)."""

    @property
    def dead(self) -> Tensor:
        """Indices of neurons that never fired on these tokens."""
        return torch.nonzero(self.frequency == 0).flatten()

    @property
    def always_on(self) -> Tensor:
        """Indices of neurons that fired on every one of these tokens."""
        return torch.nonzero(self.frequency == 1).flatten()

    def table(self) -> dict:
        """The scalar statistics, one row of a table (e.g. ``pandas.DataFrame([s.table() for s in stats])``)."""
        return {"layer": self.layer, "n_tokens": self.n_tokens, "d_mlp": self.d_mlp,
                "nonzero_fraction": self.nonzero_fraction, "nonzero_per_token_std": self.nonzero_per_token_std,
                "positive_pre_fraction": self.positive_pre_fraction, f"small_fraction(eps={self.eps:g})": self.small_fraction,
                "dead_fraction": len(self.dead) / self.d_mlp, "always_on_fraction": len(self.always_on) / self.d_mlp}


class _Accumulator:
    """Running sums for one layer, in float64 so the means do not depend on batching."""

    def __init__(self, d_mlp: int):
        self.n = 0
        self.nonzero = self.nonzero_sq = self.positive = self.small = 0.0
        self.fires = torch.zeros(d_mlp, dtype=torch.float64)

    def add(self, pre: Tensor, x1: Tensor, eps: float) -> None:
        per_token = (x1 != 0).double().mean(dim=1)
        self.n += x1.shape[0]
        self.nonzero += float(per_token.sum())
        self.nonzero_sq += float(per_token.pow(2).sum())
        self.positive += float((pre > 0).double().sum())
        self.small += float((x1.abs() < eps).double().sum())
        self.fires += (pre > 0).double().sum(dim=0).cpu()

    def result(self, layer: int, eps: float) -> LazyNeuronStats:
        d, n = self.fires.numel(), self.n
        mean = self.nonzero / n
        return LazyNeuronStats(layer=layer, n_tokens=n, d_mlp=d, eps=eps, nonzero_fraction=mean,
                               nonzero_per_token_std=math.sqrt(max(self.nonzero_sq / n - mean * mean, 0.0)),
                               positive_pre_fraction=self.positive / (n * d), small_fraction=self.small / (n * d),
                               frequency=(self.fires / n).float())


def _layers(src) -> list[int]:
    if isinstance(src, ModelSource):
        return [site.layer for site in src.sites]
    hooks = set(src.cache.hooks)
    found = sorted(int(m.group(1)) for h in hooks if (m := re.match(r"blocks\.(\d+)\.mlp\.hook_pre$", h)))
    layers = [layer for layer in found if f"blocks.{layer}.mlp.hook_post" in hooks]
    if not layers:
        raise KeyError(f"{src.cache.path} holds no layer with both mlp.hook_pre and mlp.hook_post; it has {src.cache.hooks}")
    return layers


def lazy_neuron_stats(source, layers: list[int] | None = None, eps: float = DEFAULT_EPS,
                      max_tokens: int | None = None) -> list[LazyNeuronStats]:
    """Lazy-neuron statistics of each layer, streamed over ``source`` in batches.

    ``source``: ``(model, tokens)`` (one forward per batch, hooks on every layer at once),
    an ``ActivationCache`` holding ``blocks.{l}.mlp.hook_pre`` and ``hook_post``, or
    ``(cache, model)``. ``layers`` defaults to all (in a cache: those with both hooks).
    ``eps`` is absolute: pick it against the scale of x1. ``max_tokens`` stops early.
    """
    src = as_source(source)
    layers = _layers(src) if layers is None else list(layers)
    names = [name for layer in layers for name in (f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post")]
    sums: dict[int, _Accumulator] = {}
    seen = 0
    for batch in src.batches(names, max_tokens):
        if max_tokens is not None:
            batch = {name: rows[:max_tokens - seen] for name, rows in batch.items()}
        for layer in layers:
            pre, x1 = batch[f"blocks.{layer}.mlp.hook_pre"], batch[f"blocks.{layer}.mlp.hook_post"]
            sums.setdefault(layer, _Accumulator(x1.shape[1])).add(pre, x1, eps)
        seen += next(iter(batch.values())).shape[0]
    if not sums:
        raise ValueError("the source yielded no tokens")
    return [sums[layer].result(layer, eps) for layer in layers]

