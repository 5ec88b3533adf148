"""The training-time encoder: exact pre-activations at chosen latents, with a sparse backward.

A TopK-family SAE needs every pre-activation only to *choose* which k latents fire; the
loss depends on the k chosen values alone. So the trainer

1. computes all pre-activations without autograd, optionally in bfloat16 (on hardware
   with bf16 matrix units this is the one dense matmul of the step, and it is 3-4× faster
   there than float32; a rounding can only swap latents whose values tie to within bf16
   precision, which changes the reconstruction by a negligible amount),
2. recomputes the chosen values exactly, in float32, as a sampled dense-dense product
   (SDDMM: B·k dot products instead of B·d_sae), and
3. back-propagates only through those B·k entries: ∂W_enc = (x − b_dec)ᵀ G with G the
   sparse [B, d_sae] gradient, a sparse-dense product, instead of two dense matmuls, and
4. decodes and differentiates the decode over the same entries (``sparse_decode``), the
   entries grouped by latent (a sort) once for both weight gradients (``SparsePattern``).

EleutherAI's sparsify has the same sparse backward (its ``FusedEncoder``) but keeps the
forward dense in float32 and scatters a [B, k, d_in] buffer to form ∂W_enc.

``W_enc`` is kept column-major (``[d_in, d_sae]`` with each latent's column contiguous) so
both the SDDMM and ∂W_enc, computed as Gᵀ(x − b_dec) with shape [d_sae, d_in], read and
write whole rows of memory.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def stable_argsort(keys: Tensor) -> Tensor:
    """``torch.argsort(keys, stable=True)`` for non-negative integer keys, ~10× faster: the
    position breaks ties inside one unique key, so the unstable (parallel) sort gives the
    same order. torch's stable sort of many repeated keys runs on one core."""
    position = torch.arange(keys.numel(), device=keys.device)
    return (keys.long() * keys.numel() + position).argsort()


def _csr(crow: Tensor, cols: Tensor, values: Tensor, n_cols: int) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, size=(crow.numel() - 1, n_cols))


def row_pointers(row: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers [n_rows + 1] of entries whose rows are ``row`` (entry e lies in row
    row[e]; the entries, grouped by row, then fill rows 0, 1, … in turn)."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=row.device)
    crow[1:] = torch.bincount(row, minlength=n_rows).cumsum(0)
    return crow


class SparsePattern:
    """Where a sparse [rows, n_cols] matrix has entries: row ``b`` holds the latents
    cols[crow[b]:crow[b+1]] (CSR). A training step multiplies by this pattern four times
    (the encoder's values and their gradient, the decode and its gradient); the two
    weight gradients need it transposed, grouped by latent, and that sort is done once
    here and shared instead of once per product."""

    def __init__(self, crow: Tensor, cols: Tensor, n_cols: int, transpose: tuple[Tensor, Tensor, Tensor] | None = None,
                 rows: Tensor | None = None):
        """``transpose``, ``rows``: this pattern's ``transpose()`` and ``rows()``, when the
        caller has them already."""
        self.crow, self.cols, self.n_cols = crow, cols, n_cols
        self._transpose, self._rows = transpose, rows

    @classmethod
    def fixed_width(cls, indices: Tensor, n_cols: int) -> "SparsePattern":
        """The pattern of a code with the same number of latents in every row ([rows, k])."""
        rows, k = indices.shape
        return cls(torch.arange(0, rows * k + 1, k, device=indices.device), indices.reshape(-1), n_cols)

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1

    def rows(self) -> Tensor:
        """The row of each entry."""
        if self._rows is None:
            self._rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.crow.device), self.crow.diff())
        return self._rows

    def csr(self, values: Tensor) -> Tensor:
        """The [rows, n_cols] CSR matrix with these values (one per entry, in entry order)."""
        return _csr(self.crow, self.cols, values, self.n_cols)

    def transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """The entries grouped by latent, rows ascending within one: (row pointers of the
        transpose [n_cols + 1], the row of each, the entry each one is)."""
        if self._transpose is None:
            order = stable_argsort(self.cols)  # stable: a deterministic sum order per latent
            self._transpose = (row_pointers(self.cols, self.n_cols), self.rows()[order], order)
        return self._transpose

    def transposed_times(self, values: Tensor, dense: Tensor) -> Tensor:
        """``csr(values)ᵀ @ dense`` ([n_cols, d]): each latent's Σ values[e]·dense[row of e]
        over its entries, as an embedding_bag over the transpose (fbgemm's kernel, 1.4-2×
        faster on CPU than MKL's CSR × dense product, which zero-fills and runs at under
        1 GFLOP/s here)."""
        crow, rows, order = self.transpose()
        return torch.nn.functional.embedding_bag(rows, dense, crow[:-1], per_sample_weights=values[order], mode="sum")

    def times(self, values: Tensor, dense: Tensor) -> Tensor:
        """``csr(values) @ dense`` ([rows, d]) as an embedding_bag over the entries (as
        ``transposed_times``); ``dense`` must be contiguous."""
        return torch.nn.functional.embedding_bag(self.cols, dense, self.crow[:-1], per_sample_weights=values,
                                                 mode="sum")


class _GatheredPreActs(torch.autograd.Function):
    """Pre-activations at the entries of a ``SparsePattern``."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pattern: SparsePattern) -> Tensor:
        centered = x - b_dec
        dots = torch.sparse.sampled_addmm(pattern.csr(centered.new_zeros(pattern.cols.numel())), centered, W_enc,
                                          beta=0.0).values()
        ctx.save_for_backward(centered, W_enc)
        ctx.pattern = pattern
        return dots + b_enc[pattern.cols]

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        centered, W_enc = ctx.saved_tensors
        pattern = ctx.pattern
        grad_values = grad_values.contiguous()
        # Σ_b G[b, m]: the b_enc gradient, and (through −W_enc) the encoder's share of b_dec's.
        per_latent = torch.zeros(pattern.n_cols, dtype=grad_values.dtype, device=grad_values.device)
        per_latent.index_add_(0, pattern.cols, grad_values)
        grad_W_enc = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = pattern.transposed_times(grad_values, centered).T  # [d_in, d_sae], column-major
        if ctx.needs_input_grad[0]:
            grad_x = pattern.times(grad_values, W_enc.T.contiguous())
        grad_b_dec = -(W_enc @ per_latent) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b_dec, grad_W_enc, per_latent, None


class _SparseDecode(torch.autograd.Function):
    """Σ_j values_j · W_dec[latent_j] per row of a ``SparsePattern``, without the bias. The
    backward is two products over the pattern: ∂values = the sampled product of the output
    gradient with W_decᵀ at the entries (SDDMM), ∂W_dec = (transposed code)·(output
    gradient). embedding_bag's own backward sorted the indices again and scattered one
    row per entry, ~3× slower on CPU."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pattern = pattern
        return pattern.times(values, W_dec)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, W_dec = ctx.saved_tensors
        pattern = ctx.pattern
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.sparse.sampled_addmm(pattern.csr(values.new_zeros(values.numel())), grad_out, W_dec.T,
                                                     beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_W_dec = pattern.transposed_times(values, grad_out)
        return grad_values, grad_W_dec, None


def sparse_decode(values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
    """[rows, d_in]: row b's Σ values[e]·W_dec[cols[e]] over its entries e (flat, in pattern
    order), differentiated sparsely (no bias added)."""
    if values.device.type != "cpu":  # measured on CPU only; elsewhere embedding_bag's own backward
        return pattern.times(values, W_dec)
    return _SparseDecode.apply(values, W_dec, pattern)


def gathered_pre_acts_csr(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, pattern: SparsePattern) -> Tensor:
    """``((x − b_dec) W_enc + b_enc)[row, col]`` at the entries of a ``SparsePattern``, flat
    [nnz], computed and differentiated sparsely. For codes whose rows keep different numbers
    of latents (BatchTopK), with no padding computed."""
    if pattern.cols.device.type != "cpu":
        # Measured on CPU only; elsewhere the plain dense form (same values and gradients).
        return ((x - b_dec) @ W_enc + b_enc)[pattern.rows(), pattern.cols]
    return _GatheredPreActs.apply(x, b_dec, W_enc, b_enc, pattern)


def gathered_pre_acts(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor,
                      pattern: SparsePattern | None = None) -> Tensor:
    """``((x − b_dec) W_enc + b_enc).gather(1, indices)`` computed and differentiated sparsely
    (``pattern``: the indices' pattern, when the caller shares it with a decode)."""
    if indices.device.type != "cpu":
        return ((x - b_dec) @ W_enc + b_enc).gather(1, indices)
    pattern = pattern or SparsePattern.fixed_width(indices, W_enc.shape[1])
    return gathered_pre_acts_csr(x, b_dec, W_enc, b_enc, pattern).view(indices.shape)


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
