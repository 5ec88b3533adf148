"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders").

One BatchTopK code over the full width; nested prefixes m₁ < … < m_n = d_sae of the
dictionary must each reconstruct x on their own:
    loss = Σ_i w_i ‖x − (z[:m_i] W_dec[:m_i] + b_dec)‖².
Early latents are pushed to carry general (parent) features, which reduces feature
absorption. Implementations weight the levels differently (SAELens sums them,
dictionary_learning divides by the squared number of groups, Bussmann et al. average and
add a b_dec-only level); ``level_weighting`` chooses: "sum" (default, as SAELens: every
level counts fully, so the full-width reconstruction is never down-weighted) or "mean".
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .base import ForwardResult, SparseCode
from .base import register
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclasses.dataclass
class MatryoshkaConfig(BatchTopKConfig):
    prefixes: list[int] = dataclasses.field(default_factory=list)
    """Nested widths m₁ < … < m_n = d_sae; empty: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae."""
    level_weighting: str = "sum"
    """How the levels' losses combine: "sum" or "mean"."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prefixes:
            self.prefixes = sorted({max(1, self.d_sae // 2 ** i) for i in range(4, -1, -1)})
        prefixes = list(self.prefixes)
        if prefixes != sorted(set(prefixes)) or prefixes[-1] != self.d_sae or prefixes[0] < 1:
            raise ValueError(f"prefixes must increase strictly and end at d_sae={self.d_sae}, got {prefixes}")
        if self.level_weighting not in ("sum", "mean"):
            raise ValueError(f"level_weighting must be 'sum' or 'mean', got {self.level_weighting!r}")


@register("matryoshka", MatryoshkaConfig)
class MatryoshkaSAE(BatchTopKSAE):
    def prefix_reconstruction(self, code: SparseCode, width: int) -> Tensor:
        """x̂ using only latents [0, width) of the code."""
        inside = code.indices < width
        return self.decode_sparse(SparseCode(code.values * inside, code.indices))

    def reconstruction_loss(self, x: Tensor, result: ForwardResult) -> Tensor:
        losses = []
        for width in self.cfg.prefixes:
            x_hat = result.x_hat if width == self.cfg.d_sae else self.prefix_reconstruction(result.code, width)
            losses.append((x_hat - x).pow(2).sum(-1).mean())
        total = sum(losses)
        return total if self.cfg.level_weighting == "sum" else total / len(losses)
