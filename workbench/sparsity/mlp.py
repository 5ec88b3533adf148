"""The MLP of each layer of a TransformerLens model, as the activation-sparsity metrics see it.

Every metric and method in this package speaks of the same quantities (DESIGN.md, "CETT
and PPL-p%"; Zhang et al. 2024 "ReLU² Wins", Luo et al. 2024 "Sparsing Law"):

- plain MLPs:  h = act(W_in x + b_in), and x1 = h;
- gated MLPs:  x1 = act(W_gate x) ⊙ (W_in x);
- MLP out = W_out x1 + b_out = Σ_i n_i + b_out with n_i = x1_i · W_out[:, i], so
  ‖n_i‖ = |x1_i| · ‖W_out[:, i]‖.

The bias convention. TransformerLens' gated MLP adds a bias *after* the product:
``hook_post`` = act(gate) ⊙ up + b_in (LLaMA-style models have none; the zoo's SwiGLU has
one). That bias does not depend on the input, so W_out b_in is part of the constant output
bias, like b_out: it belongs to the kept part and is never dropped. Every metric and method
here therefore reads x1 = ``hook_post`` − b_in (``MLPSite.x1_from_post``; the activation
sources return it so), and every mask that drops neuron i leaves ``hook_post``_i = b_in_i
(``MLPSite.post_from_x1``). Plain MLPs have b_in inside the activation, h = act(W_in x + b_in):
there x1 = h = ``hook_post``.

TransformerLens stores ``W_out`` as [d_mlp, d_model] (it computes x1 @ W_out), so the
math's column W_out[:, i] is TransformerLens' *row* ``W_out[i]``; likewise the inputs of
``W_in``/``W_gate`` [d_model, d_mlp] are its rows. Hooks (see DESIGN.md, "Known traps"):
``mlp.hook_pre`` is W_in x + b_in for plain MLPs but the *gate* pre-activation for gated
ones, ``mlp.hook_pre_linear`` the up projection, ``mlp.hook_post`` is x1.

The MLP's own input is ``ln2``'s output *after* its affine weights; TransformerLens'
``ln2.hook_normalized`` fires before them, so it equals the input only for folded
(``LNPre``) norms. ``MLPSite.input_name`` names that input for the activation sources,
which capture it exactly (a model) or rebuild it from ``hook_normalized`` (a cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class MLPSite:
    """The MLP of one layer: its flavour, hook names and the weights the metrics need."""

    layer: int
    act_fn: str
    gated: bool
    d_mlp: int
    d_model: int
    module: nn.Module = field(repr=False)
    """The TransformerLens MLP module (``model.blocks[layer].mlp``)."""
    ln: nn.Module | None = field(repr=False, default=None)
    """The norm in front of it (``model.blocks[layer].ln2``), for rebuilding its input."""

    # --- hook names -------------------------------------------------------------------
    @property
    def hook_pre(self) -> str:
        """W_in x + b_in (plain) or the gate pre-activation W_gate x (gated)."""
        return f"blocks.{self.layer}.mlp.hook_pre"

    @property
    def hook_pre_linear(self) -> str | None:
        """The up projection W_in x of a gated MLP (None for plain MLPs)."""
        return f"blocks.{self.layer}.mlp.hook_pre_linear" if self.gated else None

    @property
    def hook_post(self) -> str:
        """x1, the input of W_out."""
        return f"blocks.{self.layer}.mlp.hook_post"

    @property
    def hook_normalized(self) -> str:
        """ln2's normalised residual, before ln2's affine weights."""
        return f"blocks.{self.layer}.ln2.hook_normalized"

    @property
    def input_name(self) -> str:
        """Name of the MLP input (the input of W_in and W_gate) for activation sources.

        Not a TransformerLens hook (the ``:`` says so): TransformerLens has no hook after
        ln2's affine weights, so sources capture it with a forward pre-hook on the module.
        """
        return f"blocks.{self.layer}.mlp:input"

    # --- weights ----------------------------------------------------------------------
    @property
    def w_out(self) -> Float[Tensor, "d_mlp d_model"]:
        """W_out in TransformerLens layout: row i is the math W_out[:, i]."""
        return self.module.W_out.detach()

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return self.module.b_in.detach()

    @property
    def x1_offset(self) -> Tensor | None:
        """What ``hook_post`` adds to x1: a gated MLP's b_in (None for plain MLPs or a zero b_in)."""
        if not self.gated:
            return None
        b_in = getattr(self.module, "b_in", None)
        return None if b_in is None or not bool((b_in != 0).any()) else b_in.detach()

    def x1_from_post(self, post: Tensor) -> Tensor:
        """x1 from ``hook_post``: the additive b_in of a gated MLP removed (the bias convention)."""
        offset = self.x1_offset
        return post if offset is None else post - offset.to(post.device, post.dtype)

    def post_from_x1(self, x1: Tensor) -> Tensor:
        """``hook_post`` from a (masked) x1: the bias added back, kept whatever was dropped."""
        offset = self.x1_offset
        return x1 if offset is None else x1 + offset.to(x1.device, x1.dtype)

    @property
    def w_out_norms(self) -> Float[Tensor, " d_mlp"]:
        """‖W_out[:, i]‖ per neuron: |x1_i| times this is ‖n_i‖ (the CETT magnitude)."""
        return self.w_out.float().norm(dim=1)

    @property
    def input_norms(self) -> Float[Tensor, " d_model"]:
        """Norm of everything the MLP input's coordinate j multiplies: ‖W_in[:, j]‖ in math
        layout, and for gated MLPs the norm of W_gate and W_in stacked (both read x).
        WINA's weight factor for the MLP input (Chen et al. 2025)."""
        squares = self.module.W_in.detach().float().pow(2).sum(dim=1)
        if self.gated:
            squares = squares + self.module.W_gate.detach().float().pow(2).sum(dim=1)
        return squares.sqrt()

    # --- activations ------------------------------------------------------------------
    def act(self, pre: Tensor) -> Tensor:
        """The MLP's activation function (act(gate) for gated MLPs, h for plain ones)."""
        return self.module.act_fn(pre)

    def input_from_normalized(self, normalized: Tensor) -> Tensor:
        """The MLP input rebuilt from ``ln2.hook_normalized``: ln2's affine weights applied."""
        weight, bias = getattr(self.ln, "w", None), getattr(self.ln, "b", None)
        out = normalized
        if weight is not None:
            out = out * weight.detach().to(out.device, out.dtype)
        if bias is not None:
            out = out + bias.detach().to(out.device, out.dtype)
        return out


def describe_mlps(model) -> list[MLPSite]:
    """One ``MLPSite`` per layer of a TransformerLens ``HookedTransformer`` (none when the
    model is attention-only). Mixture-of-experts MLPs are not single MLPs: refused."""
    cfg = model.cfg
    if getattr(cfg, "attn_only", False):
        return []
    sites = []
    for layer, block in enumerate(model.blocks):
        mlp = block.mlp
        w_out = getattr(mlp, "W_out", None)
        if not isinstance(w_out, torch.Tensor) or w_out.ndim != 2:
            raise NotImplementedError(f"layer {layer}'s MLP ({type(mlp).__name__}) has no single W_out "
                                      "[d_mlp, d_model] (mixture of experts?); the sparsity metrics need one MLP per layer")
        sites.append(MLPSite(layer=layer, act_fn=str(cfg.act_fn), gated=bool(cfg.gated_mlp), d_mlp=int(w_out.shape[0]),
                             d_model=int(w_out.shape[1]), module=mlp, ln=getattr(block, "ln2", None)))
    return sites
