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
   sparse [B, d_sae] gradient, a sparse-dense product, instead of two dense matmuls.

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


def _column_pattern(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The transpose of the entries (rows[e], cols[e]) = values[e] as CSR [n_cols, n_rows]."""
    order = stable_argsort(cols)  # stable: a deterministic sum order per latent
    counts = torch.bincount(cols, minlength=n_cols)
    crow = torch.zeros(n_cols + 1, dtype=torch.long, device=cols.device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, rows[order], values[order], size=(n_cols, n_rows))


class _GatheredPreActs(torch.autograd.Function):
    """Pre-activations at the entries of a CSR pattern (row pointers ``crow``, latents ``cols``)."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, crow: Tensor, cols: Tensor) -> Tensor:
        centered = x - b_dec
        pattern = _csr(crow, cols, cols.new_zeros(cols.numel(), dtype=centered.dtype), W_enc.shape[1])
        dots = torch.sparse.sampled_addmm(pattern, centered, W_enc, beta=0.0).values()
        ctx.save_for_backward(centered, W_enc, crow, cols)
        return dots + b_enc[cols]

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        centered, W_enc, crow, cols = ctx.saved_tensors
        grad_values = grad_values.contiguous()
        d_sae = W_enc.shape[1]
        # Σ_b G[b, m]: the b_enc gradient, and (through −W_enc) the encoder's share of b_dec's.
        per_latent = torch.zeros(d_sae, dtype=grad_values.dtype, device=grad_values.device)
        per_latent.index_add_(0, cols, grad_values)
        grad_W_enc = grad_x = None
        if ctx.needs_input_grad[2]:
            rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
            transposed = _column_pattern(rows, cols, grad_values, centered.shape[0], d_sae)
            grad_W_enc = (transposed @ centered).T  # [d_in, d_sae], column-major
        if ctx.needs_input_grad[0]:
            grad_x = _csr(crow, cols, grad_values, d_sae) @ W_enc.T
        grad_b_dec = -(W_enc @ per_latent) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b_dec, grad_W_enc, per_latent, None, None


def gathered_pre_acts_csr(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, crow: Tensor, cols: Tensor) -> Tensor:
    """``((x − b_dec) W_enc + b_enc)[row, col]`` at the entries of a CSR pattern (row ``b`` owns
    entries crow[b]..crow[b+1]), flat [nnz], computed and differentiated sparsely. For codes
    whose rows keep different numbers of latents (BatchTopK), with no padding computed."""
    if cols.device.type != "cpu":
        # Measured on CPU only; elsewhere the plain dense form (same values and gradients).
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
        return ((x - b_dec) @ W_enc + b_enc)[rows, cols]
    return _GatheredPreActs.apply(x, b_dec, W_enc, b_enc, crow, cols)


def gathered_pre_acts(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor) -> Tensor:
    """``((x − b_dec) W_enc + b_enc).gather(1, indices)`` computed and differentiated sparsely."""
    if indices.device.type != "cpu":
        return ((x - b_dec) @ W_enc + b_enc).gather(1, indices)
    rows, k = indices.shape
    crow = torch.arange(0, rows * k + 1, k, device=indices.device)
    return gathered_pre_acts_csr(x, b_dec, W_enc, b_enc, crow, indices.reshape(-1)).view(rows, k)


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
