"""ReLU SAE with an L1 penalty, the standard SAE (Bricken et al. 2023; Anthropic's April 2024
update, "Circuits Updates – April 2024: Training Sparse Autoencoders").

z = ReLU(W_encᵀ(x − b_dec) + b_enc);  x̂ = z W_dec + b_dec;
loss = ‖x − x̂‖² + λ Σ_i z_i ‖W_dec,i‖.

The update's choices, kept here: the L1 of each latent is weighted by its decoder row's
norm, and the decoder is left unconstrained (no unit-norm projection), so the penalty
cannot be dodged by shrinking z and growing W_dec; λ rises linearly from 0 over the first
5% of training (``l1_warmup``). SAELens calls this architecture ``standard``.

The penalty's units: the trainer divides the reconstruction term by the batch's variance
Σ‖x − x̄‖²/B and this term by its square root (see ``SparseAutoencoder.sparsity_loss``),
which is the update's loss on activations rescaled to unit RMS distance from their mean.
So λ is unitless; with d_in dimensions of unit variance, the update's λ (≈ 5 with its
normalisation E‖x‖² = d_in and a sum-over-dimensions MSE) corresponds to λ_here ≈ 5/√d_in.

Training keeps only the positive pre-activations as a ragged code (as BatchTopK's) and
computes, decodes and differentiates those alone: a ReLU's gradient is zero elsewhere.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .base import ForwardResult, SAEConfig, SparseAutoencoder, SparseCode, register, warmup_factor


@dataclasses.dataclass
class ReLUConfig(SAEConfig):
    """k is not used by this architecture: its L0 comes from l1_coefficient."""

    l1_coefficient: float = 0.2
    """λ, the weight of Σ_i z_i‖W_dec,i‖ (in the trainer's normalised units; see the module
    docstring). Larger: sparser codes, worse reconstruction."""
    l1_warmup: float = 0.05
    """Fraction of training over which λ rises linearly from 0 (Anthropic's update: 5%)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be non-negative, got {self.l1_coefficient}")
        if not 0 <= self.l1_warmup <= 1:
            raise ValueError(f"l1_warmup is a fraction of training in [0, 1], got {self.l1_warmup}")


@register("relu", ReLUConfig)
class ReLUSAE(SparseAutoencoder):
    ragged_code = True
    uses_k = False
    uses_aux_k = False
    unit_norm_decoder = False
    no_k_annealing_because = "its L0 comes from the L1 penalty, not from a k"

    def prepare(self, rows: Tensor, targets: Tensor) -> None:
        self.scale_encoder_to_fit(rows, targets)

    def select(self, pre_acts: Tensor, k: int | None = None, **context) -> SparseCode:
        self.refuse_k(k)
        return SparseCode.from_dense(pre_acts.relu())

    def sparsity_loss(self, x: Tensor, result: ForwardResult, scale: Tensor, progress: float) -> Tensor:
        coefficient = self.cfg.l1_coefficient * warmup_factor(progress, self.cfg.l1_warmup)
        code = result.code  # padding slots hold 0: they add nothing
        weighted = code.values * self.W_dec.norm(dim=1)[code.indices]
        return coefficient * weighted.sum(-1).mean() / scale
