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

import torch
from torch import Tensor

from .base import ForwardResult, SparseCode
from .base import register
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .sparse_ops import stable_argsort


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

    def group_sums(self, code: SparseCode) -> Tensor:
        """[batch, levels, d_in]: each row's decoded contribution of the latents in each
        level's own group [m_{i−1}, m_i), from the sparse code in one embedding_bag (one bag
        per row and group), so the nested reconstructions are a cumulative sum over levels
        instead of one decode per prefix."""
        rows = code.indices.shape[0]
        levels = len(self.cfg.prefixes)
        real = code.values > 0  # padding slots (and latents at 0) add nothing: leave them out
        row = real.nonzero()[:, 0]
        indices, values = code.indices[real], code.values[real]
        group = torch.bucketize(indices, torch.as_tensor(self.cfg.prefixes, device=indices.device), right=True)
        bag = row * levels + group
        # Codes from batch_top_k and from the threshold rule list each row's latents in
        # ascending order, so the bags are already contiguous: sort only when they are not
        # (the sort was a fifth of a Matryoshka step).
        if not bool((bag[1:] >= bag[:-1]).all()):
            order = stable_argsort(bag)
            bag, indices, values = bag[order], indices[order], values[order]
        counts = torch.bincount(bag, minlength=rows * levels)
        offsets = counts.cumsum(0) - counts
        sums = torch.nn.functional.embedding_bag(indices, self.W_dec, offsets, per_sample_weights=values, mode="sum")
        return sums.view(rows, levels, -1)

    def reconstruction_loss(self, x: Tensor, result: ForwardResult) -> Tensor:
        # x̂ of level i = b_dec + the contributions of groups 0..i (nested prefixes).
        nested = self.group_sums(result.code).cumsum(1) + self.b_dec
        losses = (nested - x.unsqueeze(1)).pow(2).sum(-1).mean(0)  # [levels]
        return losses.sum() if self.cfg.level_weighting == "sum" else losses.mean()
