"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
with JumpReLU Sparse Autoencoders").

z_i = pre_i · H(pre_i − θ_i), one learned threshold θ_i per latent, and the L0 penalty
trained directly:  loss = ‖x − x̂‖² + λ Σ_i H(pre_i − θ_i).

H has no useful derivative, so θ learns through straight-through estimators with a
rectangle kernel K(u) = 1[|u| < ½] of bandwidth ε (the paper's eq. 11–12, its
"pseudo-derivatives"):
    ∂z_i/∂θ_i := −(θ_i/ε) K((pre_i − θ_i)/ε),   ∂H(pre_i − θ_i)/∂θ_i := −(1/ε) K((pre_i − θ_i)/ε),
and, as in the paper (and SAELens' default), no estimator gradient reaches the
pre-activations: the encoder learns only through the latents that fire.

Training is sparse: only the firing entries are computed with autograd (the ragged path
BatchTopK uses), and θ's gradient comes from the few entries inside the kernel's window,
found from the selection pre-activations and recomputed exactly in float32.

Optional, ``target_l0``: Gemma Scope 2's quadratic penalty around a target L0 instead of
λ·L0 (per row, (2/T)(L0 − T)², as SAELens' "quadratic" mode), so the trained L0 lands
near T without searching λ: the matched-L0 comparisons with TopK ask for that.

Units: the paper normalises activations to unit mean squared norm and sets θ₀ = ε = 0.001.
Here ``prepare`` measures the data's scale s = √(E‖x − input_bias‖²) on the first batch, and θ
is held as u·s·t (the parameter t, u = threshold_unit), starting at θ₀ = threshold_init·s,
and ε = bandwidth·s: the paper's setting on unnormalised data. Adam moves a parameter by
about lr per step whatever its scale, so θ itself as the parameter would move by ~0.005 a
step on activations of scale s ≈ 33 (the default model's residual stream) and need
thousands of steps to reach its working values; t moves it by ~0.005·u·s. The
reconstruction term is divided by the batch variance (FVU units) and the L0 term by
nothing, so λ = 1e-3 costs 0.001 FVU per active latent. Decoder rows are kept at unit
norm: the L0 penalty does not depend on their norm, and the constraint removes the scale
symmetry between encoder and decoder, as for TopK. SAELens' ``jumprelu`` has the same
inference rule (with a ReLU, which θ ≥ 0 makes redundant).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .base import ForwardResult, SAEConfig, SparseAutoencoder, SparseCode, register, warmup_factor


@dataclasses.dataclass
class JumpReLUConfig(SAEConfig):
    """k is not used by this architecture: its L0 comes from l0_coefficient (or target_l0)."""

    l0_coefficient: float = 1e-3
    """λ, the weight of the L0 penalty (FVU units per active latent)."""
    target_l0: float | None = None
    """If set, penalise target_l0_coefficient·(2/T)(L0 − T)² per row instead of λ·L0 (Gemma Scope 2)."""
    target_l0_coefficient: float = 1e-2
    """Weight of the quadratic penalty around target_l0 (on the synthetic benchmark, 256 → 2048,
    T = 32: 1e-3 let L0 settle near 64, 1e-2 near 29, 5e-2 overshot to 21)."""
    bandwidth: float = 1e-3
    """ε of the rectangle kernel, in units of the data's scale (see the module docstring)."""
    threshold_init: float = 1e-3
    """θ at the start of training, in units of the data's scale."""
    sparsity_warmup: float = 0.05
    """Fraction of training over which λ rises linearly from 0."""
    threshold_unit: float = 0.1
    """θ's parameter is held in units of threshold_unit × the data's scale, so Adam moves θ by
    about lr·threshold_unit·s per step. Measured on the default model's residual stream
    (s ≈ 33, 128 steps of 1,024 rows, target L0 16): 1 let thresholds jump past most
    pre-activations (70% of latents dead, L0 17), 0.02 barely moved them (L0 219), 0.1 gave
    L0 26 with 5% dead."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bandwidth", "threshold_init", "threshold_unit"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("l0_coefficient", "target_l0_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.d_sae:
            raise ValueError(f"target_l0 must lie in (0, d_sae={self.d_sae}], got {self.target_l0}")
        if not 0 <= self.sparsity_warmup <= 1:
            raise ValueError(f"sparsity_warmup is a fraction of training in [0, 1], got {self.sparsity_warmup}")


class _ThresholdEstimator(torch.autograd.Function):
    """x̂ unchanged going forward; going back, θ_i receives Σ_e ∂L/∂z_e · ∂z_e/∂θ_i over the
    window entries e = (row b, latent i), with ∂L/∂z_e = ∂L/∂x̂_b · W_dec,i (the decode's
    derivative, also for entries that did not fire: z_e = 0 there, but its pseudo-derivative
    is not)."""

    @staticmethod
    def forward(ctx, threshold: Tensor, x_hat: Tensor, W_dec: Tensor, rows: Tensor, latents: Tensor,
                slope: Tensor) -> Tensor:
        ctx.save_for_backward(W_dec, rows, latents, slope)
        ctx.d_sae = threshold.shape[0]
        return x_hat.view_as(x_hat)

    @staticmethod
    def backward(ctx, grad_x_hat: Tensor):
        W_dec, rows, latents, slope = ctx.saved_tensors
        grad_z = (grad_x_hat[rows] * W_dec[latents]).sum(-1)
        grad_threshold = grad_z.new_zeros(ctx.d_sae).index_add_(0, latents, grad_z * slope)
        return grad_threshold, grad_x_hat, None, None, None, None


@register("jumprelu", JumpReLUConfig)
class JumpReLUSAE(SparseAutoencoder):
    ragged_code = True
    uses_k = False
    no_k_annealing_because = "its L0 comes from the L0 penalty and its thresholds, not from a k"

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        # θ / (threshold_unit · s), with s the data's scale (set by prepare; 1 for an SAE opened
        # from SAELens), saved with the SAE.
        self.theta = nn.Parameter(torch.full((cfg.d_sae,), cfg.threshold_init / cfg.threshold_unit))
        self.register_buffer("scale", torch.tensor(1.0))
        self._window = None  # the last training forward's kernel window, for sparsity_loss

    @property
    def threshold(self) -> Tensor:
        """θ, per latent, in the activations' units."""
        return self.theta * (self.cfg.threshold_unit * self.scale)

    @property
    def bandwidth(self) -> float:
        """ε of the rectangle kernel, in the activations' units."""
        return self.cfg.bandwidth * float(self.scale)

    @torch.no_grad()
    def set_threshold(self, threshold: Tensor) -> None:
        self.theta.copy_(threshold / (self.cfg.threshold_unit * self.scale))

    @torch.no_grad()
    def prepare(self, rows: Tensor, targets: Tensor) -> None:
        data_scale = float((rows - self.input_bias).pow(2).sum(-1).mean().sqrt().clamp_min(1e-12))
        self.scale.fill_(data_scale)
        self.theta.fill_(self.cfg.threshold_init / self.cfg.threshold_unit)
        self.scale_encoder_to_fit(rows, targets)

    @torch.no_grad()
    def after_step(self) -> None:
        # θ < 0 would let negative pre-activations fire. Projected rather than clamped in the
        # graph, so a latent whose θ reaches 0 still gets a gradient (as SAELens does).
        self.theta.clamp_(min=0.0)

    def select(self, pre_acts: Tensor, k: int | None = None, **context) -> SparseCode:
        self.refuse_k(k)
        threshold = self.threshold.to(pre_acts.dtype)
        return SparseCode.from_dense(pre_acts * (pre_acts > threshold))

    def forward_train(self, x: Tensor, selection_dtype: torch.dtype = torch.float32, observe: bool = True,
                      **context) -> ForwardResult:
        result = super().forward_train(x, selection_dtype, observe, **context)
        rows, latents = self._kernel_window(self.rows(x), result.pre_acts)
        self._window = (rows, latents)
        slope = -self.threshold.detach()[latents] / self.bandwidth  # ∂z/∂θ at the window entries (K = 1 there)
        x_hat = _ThresholdEstimator.apply(self.threshold, result.x_hat, self.W_dec.detach(), rows, latents, slope)
        return ForwardResult(x_hat, result.code, result.pre_acts)

    @torch.no_grad()
    def _kernel_window(self, x: Tensor, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, latents) of the entries with |pre − θ| < ε/2, where K((pre − θ)/ε) = 1:
        candidates come from the selection pre-activations with a margin for their rounding
        (bf16 keeps 8 bits), and are recomputed exactly before the kernel is applied."""
        threshold, eps = self.threshold.detach(), self.bandwidth
        margin = pre_acts.abs() * 2 ** -7 if pre_acts.dtype == torch.bfloat16 else 0.0
        near = (pre_acts.float() - threshold).abs() < eps / 2 + margin
        rows, latents = near.nonzero(as_tuple=True)
        exact = ((x[rows] - self.input_bias) * self.W_enc.T[latents]).sum(-1) + self.b_enc[latents]
        inside = (exact - threshold[latents]).abs() < eps / 2
        return rows[inside], latents[inside]

    def sparsity_loss(self, x: Tensor, result: ForwardResult, scale: Tensor, progress: float) -> Tensor:
        """λ · mean over rows of L0 (or of the quadratic penalty around target_l0), with the
        value of the real count and θ's gradient from the kernel window (the pseudo-derivative
        of H); nothing reaches the encoder."""
        if self._window is None:
            raise RuntimeError("sparsity_loss needs the kernel window of a training forward: call forward_train first")
        rows, latents = self._window
        counts = (result.code.values > 0).sum(-1).to(x.dtype)  # L0 of each row
        # A surrogate equal to the counts, whose θ-gradient is −K/ε at each window entry.
        threshold = self.threshold
        shift = threshold[latents] - threshold.detach()[latents]
        l0 = counts + torch.zeros_like(counts).index_add(0, rows, -shift / self.bandwidth)
        if self.cfg.target_l0 is not None:
            target = self.cfg.target_l0
            per_row, coefficient = 2 / target * (l0 - target).pow(2), self.cfg.target_l0_coefficient
        else:
            per_row, coefficient = l0, self.cfg.l0_coefficient
        return coefficient * warmup_factor(progress, self.cfg.sparsity_warmup) * per_row.mean()
