"""Gradient SAE, g-SAE (Olmo et al. 2024, "Features that Make a Difference: Leveraging
Gradients for Improved Dictionary Learning").

Latents are ranked by s = z ⊙ (1 + β·|W_dec g|), where g = ∂L/∂x is the gradient of the
model's next-token loss with respect to the hooked activation (computed on the clean model
and cached beside x), and W_dec g is each latent's decoder direction dotted with g. The k
best by s are selected, but they keep their original values z: the gradient changes which
latents fire, not how strongly. Training uses the usual reconstruction loss. Without g
(plain inference) the selection falls back to TopK by z.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import SAEConfig, SparseAutoencoder, SparseCode, register


@dataclasses.dataclass
class GradientConfig(SAEConfig):
    beta: float = 1.0
    """Weight of the gradient term in the selection score (0 gives a plain TopK SAE)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")


@register("gradient", GradientConfig)
class GradientSAE(SparseAutoencoder):
    supports_k_annealing = True

    def select(self, pre_acts: Tensor, g: Tensor | None = None, k: int | None = None, **context) -> SparseCode:
        k = k or self.cfg.k
        z = pre_acts.relu()
        if g is None:
            values, indices = z.topk(k, dim=-1, sorted=False)
            return SparseCode(values, indices)
        with torch.no_grad():  # the score only chooses indices; no gradient flows through it
            # At the pre-activations' precision (bf16 when the trainer selects in bf16).
            score = z * (1 + self.cfg.beta * (g.to(z.dtype) @ self.W_dec.T.to(z.dtype)).abs())
            indices = score.topk(k, dim=-1, sorted=False).indices
        return SparseCode(z.gather(1, indices), indices)
