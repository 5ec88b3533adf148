"""The modules of a sparse feature circuit, and how each module's SAE is spliced in.

Sparse feature circuits (Marks et al. 2024, §2): at every hooked module the activation is
written x = decode(f) + ε, with f = encode(x) the SAE's features and ε its error term. The
nodes of the graph are the features and one error node per position; with ε included the
rewrite is exact, so the model computes the same function (``check_decomposition`` tests it).

Modules are the attention output, MLP output and residual stream after each block, ordered
as the forward pass writes them: attn0, mlp0, resid0, attn1, … Edges run between
consecutive modules (``upstream``), as in the paper's graph:
  attn_l ← resid_{l-1};  mlp_l ← resid_{l-1}, attn_l;  resid_l ← resid_{l-1}, attn_l, mlp_l.
The embeddings have no SAE here, so layer 0's modules have no upstream nodes: whatever
the embeddings contribute reaches the graph through layer 0's features and error nodes.

A transcoder (Dunefsky et al. 2024) may stand at an MLP's output instead of an SAE: its
features f = encode(MLP input) and its error ε = MLP output − decode(f). Its features then
depend on upstream nodes only through its own encoder, not through the MLP's nonlinearity
(the input-invariant edges that paper argues for); ε carries what the MLP adds beyond it.
Each pass that splits a transcoder captures its input first (``transcoder_inputs``).
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from ..evals import evaluating

KINDS = {"hook_attn_out": "attn", "hook_mlp_out": "mlp", "hook_resid_post": "resid"}
ORDER = {"attn": 0, "mlp": 1, "resid": 2}
HOOK = re.compile(r"^blocks\.(\d+)\.(hook_attn_out|hook_mlp_out|hook_resid_post)$")


@dataclass(frozen=True)
class Module:
    hook: str
    kind: str  # "attn", "mlp" or "resid"
    layer: int

    @property
    def label(self) -> str:
        return f"{self.kind}{self.layer}"


def circuit_hooks(n_layers: int) -> list[str]:
    """Every hook a circuit can take an SAE at, in forward order: attn_out, mlp_out and
    resid_post of each of ``n_layers`` blocks (the graph of Marks et al. 2024)."""
    by_kind = {kind: name for name, kind in KINDS.items()}
    return [f"blocks.{layer}.{by_kind[kind]}" for layer in range(n_layers) for kind in sorted(ORDER, key=ORDER.get)]


def circuit_modules(hooks) -> list[Module]:
    """The modules of ``hooks`` in forward order, or a ValueError naming a hook that is not
    an attention output, MLP output or residual stream after a block."""
    modules = []
    for hook in hooks:
        match = HOOK.match(hook)
        if not match:
            raise ValueError(f"circuits take SAEs on blocks.L.hook_attn_out, blocks.L.hook_mlp_out or "
                             f"blocks.L.hook_resid_post; got an SAE on {hook!r}")
        modules.append(Module(hook, KINDS[match.group(2)], int(match.group(1))))
    return sorted(modules, key=lambda m: (m.layer, ORDER[m.kind]))


def upstream(modules: list[Module]) -> dict[str, list[str]]:
    """For each module's hook, the hooks of the modules whose edges into it are direct."""
    by_name = {(m.kind, m.layer): m.hook for m in modules}
    wanted = {"attn": [("resid", -1)], "mlp": [("resid", -1), ("attn", 0)],
              "resid": [("resid", -1), ("attn", 0), ("mlp", 0)]}
    return {m.hook: [by_name[(kind, m.layer + shift)] for kind, shift in wanted[m.kind]
                     if (kind, m.layer + shift) in by_name] for m in modules}


def split(sae, x: Tensor, x_in: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """f = encode(x) and ε = x − decode(f), for x of shape [batch, pos, d_in]; for a
    transcoder, f = encode(x_in), its input of the same pass (``transcoder_inputs``)."""
    rows = x.reshape(-1, x.shape[-1])
    source = rows
    if sae.is_transcoder:
        if x_in is None:
            raise ValueError(f"a transcoder's features come from its input {sae.cfg.hook_name!r}: capture it in the "
                             "same pass (transcoder_inputs)")
        source = x_in.reshape(-1, x_in.shape[-1])
    f = sae.encode(source)
    eps = rows - sae.decode(f, x=source if sae.cfg.normalize_activations != "none" else None)
    return f.reshape(*x.shape[:-1], -1), eps.reshape(x.shape)


@contextmanager
def transcoder_inputs(model, saes: dict):
    """While active, ``inputs[hook]`` holds the input of the transcoder at ``hook`` from the
    current forward pass (its input hook fires before its target hook, which reads it)."""
    inputs = {}

    def store(name):
        def hook_fn(act, hook):
            inputs[name] = act
        return hook_fn

    hooks = [(sae.cfg.hook_name, store(hook)) for hook, sae in saes.items() if sae.is_transcoder]
    with model.hooks(fwd_hooks=hooks):
        yield inputs


def join(sae, f: Tensor, eps: Tensor, x_ref: Tensor | None = None) -> Tensor:
    """decode(f) + ε, shaped like ε. ``x_ref`` gives the scale for SAEs that normalise
    their input (decoding then needs the input the code came from)."""
    rows = f.reshape(-1, f.shape[-1])
    ref = None if sae.cfg.normalize_activations == "none" else x_ref.reshape(-1, x_ref.shape[-1])
    return sae.decode(rows, x=ref).reshape(eps.shape) + eps


@torch.no_grad()
def module_states(model, saes: dict, tokens: Tensor) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """The logits of ``tokens`` and, at each SAE's hook, its (f, ε): one forward pass."""
    states = {}

    def record(x, hook):
        states[hook.name] = split(saes[hook.name], x, inputs.get(hook.name))
        return x

    with transcoder_inputs(model, saes) as inputs, model.hooks(fwd_hooks=[(hook, record) for hook in saes]):
        logits = model(tokens)
    return logits, states


def evaluating_all(saes: dict) -> ExitStack:
    """``evaluating`` for every SAE of a circuit at once (eval mode, restored afterwards)."""
    stack = ExitStack()
    for sae in saes.values():
        stack.enter_context(evaluating(sae))
    return stack
