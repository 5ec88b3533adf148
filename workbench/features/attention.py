"""Attention-output SAEs (Kissane et al. 2024): SAEs on an attention layer's concatenated hook_z.

hook_z holds each head's mixed values z_h[q] = Σ_s A_h[q, s] v_h[s] (before W_O), so an SAE
on it (d_in = n_heads·d_head) has decoder rows made of one slice per head. Two attributions
follow from that layout, as in the paper:

- **head attribution** (weight-based): the share of feature i's decoder norm in each head's
  slice, ‖W_dec[i, h]‖ / Σ_h' ‖W_dec[i, h']‖: which heads write the feature;
- **direct feature attribution** (DFA) to source positions: with the attention pattern
  frozen, feature i's pre-activation at query q is linear in the values,
      pre_i[q] = Σ_h Σ_s A_h[q, s] (v_h[s] · W_enc[h, :, i]) + (b_enc_i − b_dec · W_enc[:, i]),
  so each (head, source position) gets its exact share of it; the ReLU/TopK after it is the
  only nonlinearity, and it comes after the sum.

A feature's direction in the residual stream is its decoder row mapped through W_O
(Σ_h W_dec[i, h] W_O[h]): what its logit effects and steering use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


def attention_layer(sae) -> int | None:
    """The layer whose hook_z ``sae`` reads, or None for an SAE on any other hook."""
    match = HOOK_Z.match(sae.cfg.hook_name or "")
    return int(match.group(1)) if match else None


def _heads(sae, model) -> tuple[int, int, int]:
    layer = attention_layer(sae)
    if layer is None:
        raise ValueError(f"an attention-output SAE reads blocks.L.attn.hook_z; this one reads {sae.cfg.hook_name!r}")
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    if n_heads * d_head != sae.cfg.d_in:
        raise ValueError(f"the SAE reads d_in={sae.cfg.d_in}, but {sae.cfg.hook_name} of this model holds "
                         f"n_heads·d_head = {n_heads}·{d_head}: another model's SAE?")
    return layer, n_heads, d_head


@torch.no_grad()
def head_attribution(sae, n_heads: int) -> Tensor:
    """[d_sae, n_heads]: each feature's share of decoder norm per head (rows sum to 1)."""
    if sae.cfg.d_in % n_heads:
        raise ValueError(f"d_in={sae.cfg.d_in} does not split into {n_heads} heads")
    norms = sae.W_dec.detach().float().reshape(sae.cfg.d_sae, n_heads, -1).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def decoder_in_residual(sae, model) -> Tensor:
    """[d_sae, d_model]: each feature's decoder row as the attention layer writes it, through W_O."""
    layer, n_heads, d_head = _heads(sae, model)
    W_O = model.blocks[layer].attn.W_O.detach().float().cpu()  # [n_heads, d_head, d_model]
    W_dec = sae.W_dec.detach().float().cpu().reshape(sae.cfg.d_sae, n_heads, d_head)
    return torch.einsum("fhd,hdm->fm", W_dec, W_O)


@dataclass
class FeatureAttribution:
    """Feature ``feature``'s pre-activation at token ``query``, split by (head, source token)."""
    feature: int
    query: int
    by_head_and_source: Tensor  # [n_heads, query + 1]
    bias: float  # b_enc_i − b_dec·W_enc[:, i]: the part no token contributes
    pre_activation: float  # = by_head_and_source.sum() + bias

    @property
    def by_source(self) -> Tensor:
        return self.by_head_and_source.sum(0)

    @property
    def by_head(self) -> Tensor:
        return self.by_head_and_source.sum(1)


@torch.no_grad()
def direct_feature_attribution(model, sae, tokens: Tensor, feature: int, query: int) -> FeatureAttribution:
    """DFA of ``feature`` at position ``query`` of ``tokens`` (one sequence, [pos] or [1, pos]) to
    every head and source position, from one forward pass (the pattern and values of the SAE's
    layer). Exact: the parts sum to the SAE's pre-activation there."""
    layer, n_heads, d_head = _heads(sae, model)
    tokens = tokens.reshape(1, -1)
    if not 0 <= feature < sae.cfg.d_sae or not 0 <= query < tokens.shape[1]:
        raise ValueError(f"feature must lie in [0, {sae.cfg.d_sae}) and query in [0, {tokens.shape[1]}); "
                         f"got {feature} and {query}")
    if sae.cfg.normalize_activations != "none" or sae.is_transcoder:
        raise ValueError("DFA splits a linear pre-activation: it needs an SAE that reads hook_z as it is")
    names = [f"blocks.{layer}.attn.hook_v", f"blocks.{layer}.attn.hook_pattern"]
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=names, stop_at_layer=layer + 1)
    v = cache[names[0]][0, : query + 1].float().cpu()  # [source, head, d_head]
    pattern = cache[names[1]][0, :, query, : query + 1].float().cpu()  # [head, source]
    w = sae.W_enc.detach().float().cpu()[:, feature].reshape(n_heads, d_head)
    parts = pattern * torch.einsum("shd,hd->hs", v, w)
    bias = float(sae.b_enc[feature] - sae.input_bias.detach().float() @ sae.W_enc[:, feature])
    return FeatureAttribution(feature, query, parts, bias, float(parts.sum()) + bias)
