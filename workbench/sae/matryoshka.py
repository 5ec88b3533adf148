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
from .sparse_ops import SparsePattern, row_pointers, sparse_decode


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
        """[levels, batch, d_in]: each row's decoded contribution of the latents in each
        level's own group [m_{i−1}, m_i), so the nested reconstructions are a cumulative sum
        over levels instead of one decode per prefix."""
        real = code.values > 0  # padding slots (and latents at 0) add nothing: leave them out
        position = real.view(-1).nonzero().squeeze(1)
        row = position.div(code.values.shape[1], rounding_mode="floor")
        rows = code.values.shape[0]
        return self._group_sums(rows, row, code.indices.view(-1)[position], code.values.view(-1)[position])

    def _group_sums(self, rows: int, row: Tensor, indices: Tensor, values: Tensor,
                    code_pattern: SparsePattern | None = None) -> Tensor:
        """``group_sums`` of the entries (row[e], indices[e]) = values[e], given row-major
        (rows ascending; a row's latents in any order), in one sparse decode
        with one bag per (level, row). Level-major, so that each level's [batch, d_in] slice is
        contiguous: the loss's per-level passes ran ~2.5× slower on strided slices.
        ``code_pattern``: these entries' own (row-major) pattern, whose transpose the
        decode's backward reuses."""
        levels = len(self.cfg.prefixes)
        group = torch.bucketize(indices, torch.as_tensor(self.cfg.prefixes, device=indices.device), right=True)
        # Bags must be contiguous: the entries, row-major, taken level by level (a stable
        # partition by level, half the cost of a sort).
        order = torch.cat([(group == level).nonzero().squeeze(1) for level in range(levels)])
        bag = group * rows + row
        transpose = None
        if code_pattern is not None:
            # Grouped by latent, the bag pattern is the code's transpose with each row moved
            # to its latent's level block (a latent has one level, so the row order within a
            # latent is unchanged): no second sort of the entries.
            latent_crow, _, entry = code_pattern.transpose()
            position = torch.empty_like(order)
            position[order] = torch.arange(order.numel(), device=order.device)  # entry → its place in the bags
            transpose = (latent_crow, bag[entry], position[entry])
        pattern = SparsePattern(row_pointers(bag, rows * levels), indices[order], self.cfg.d_sae, transpose)
        return sparse_decode(values[order], self.W_dec, pattern).view(levels, rows, -1)

    def decode_entries(self, pattern: SparsePattern, values: Tensor) -> tuple[Tensor, Tensor]:
        """The trainer's decode: the group sums, which the loss needs, and x̂ as their total
        (one sparse decode for both)."""
        levels = self._group_sums(pattern.n_rows, pattern.rows(), pattern.cols, values, pattern)
        return levels.sum(0) + self.b_dec, levels

    def reconstruction_loss(self, x: Tensor, result: ForwardResult) -> Tensor:
        levels = result.levels if result.levels is not None else self.group_sums(result.code)
        losses = _NestedLosses.apply(levels, x, self.b_dec)  # [levels]
        return losses.sum() if self.cfg.level_weighting == "sum" else losses.mean()


class _NestedLosses(torch.autograd.Function):
    """Level i's loss mean_b ‖r − Σ_{j≤i} g_j‖² for level-major group sums g [levels, batch,
    d_in] and r = x − b_dec. Written out because autograd's cumsum over the levels (a strided
    scan, and flips in its backward) took a sixth of a Matryoshka step; here each level is
    one in-place pass, and the backward walks the levels in reverse, accumulating
    ∂/∂g_j = −(2/B) Σ_{i≥j} w_i e_i from the last residual alone (e_{i−1} = e_i + g_i).
    b_dec is taken here, not as r, so its gradient is a sum over rows (∂/∂b_dec = −∂/∂r
    summed) instead of a [batch, d_in] negation for autograd to reduce."""

    @staticmethod
    def forward(ctx, groups: Tensor, x: Tensor, b_dec: Tensor) -> Tensor:
        levels, rows = groups.shape[:2]
        residual = x - b_dec
        losses = x.new_empty(levels)
        for level in range(levels):
            residual.sub_(groups[level])
            losses[level] = torch.linalg.vector_norm(residual).square() / rows
        ctx.save_for_backward(groups, residual)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        groups, residual = ctx.saved_tensors
        levels, rows = groups.shape[:2]
        residual = residual.clone()
        weights = (grad_losses * (2 / rows)).tolist()
        grad_groups = torch.empty_like(groups)  # level j: −Σ_{i≥j} w_i e_i, built from level j + 1's
        torch.mul(residual, -weights[-1], out=grad_groups[-1])
        for level in range(levels - 2, -1, -1):
            residual.add_(groups[level + 1])
            torch.sub(grad_groups[level + 1], residual, alpha=weights[level], out=grad_groups[level])
        # ∂/∂r = −∂/∂g_0 (r enters every level with the opposite sign of g_0).
        grad_x = -grad_groups[0] if ctx.needs_input_grad[1] else None
        grad_b_dec = grad_groups[0].sum(0) if ctx.needs_input_grad[2] else None
        return grad_groups, grad_x, grad_b_dec
