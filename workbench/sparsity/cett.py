"""CETT, its per-layer threshold, the activation ratio, and the CATS quantile threshold.

CETT, the cumulative error of tail truncation (Zhang et al. 2024 "ReLU² Wins", §3;
Luo et al. 2024 "Sparsing Law", §3.1): the MLP output is Σ_i n_i with n_i = x1_i · W_out[:, i];
for a layer threshold ε the tail is D = {i : ‖n_i‖ < ε}, and

    CETT(ε) = mean over tokens of ‖Σ_{i∈D} n_i‖ / ‖Σ_i n_i‖.

Dropping D is then a per-neuron threshold ε / ‖W_out[:, i]‖ on |x1_i| (``neuron_thresholds``),
and the activation ratio is the fraction of (token, neuron) entries kept, ‖n_i‖ ≥ ε.
b_out is not part of Σ_i n_i: it does not depend on which neurons fire.

Shapes follow TransformerLens: x1 is [tokens, d_mlp], ``w_out`` is [d_mlp, d_model] and
its row i is the math W_out[:, i].

CATS (Lee et al. 2024) thresholds |v| at the quantile of a calibration set that zeroes
the target fraction: ``cats_threshold``.
"""

from __future__ import annotations

import math
import numbers

import torch
from jaxtyping import Float
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 4096  # rows per matmul: memory ≈ chunk · (d_mlp + d_model) · 8 bytes
DEFAULT_MAX_ELEMENTS = 1 << 24  # quantiles beyond this many values use a seeded sample


def _check_layer(x1: Tensor, w_out: Tensor, chunk_tokens: int = 1) -> None:
    """Refuse what would fail deep inside (an empty ``torch.cat``, a max over nothing, a matmul
    shape error) or give a silent NaN: CETT is a mean over tokens, so it needs at least one."""
    if not isinstance(x1, Tensor) or not isinstance(w_out, Tensor) or x1.ndim != 2 or w_out.ndim != 2 \
            or x1.shape[1] != w_out.shape[0]:
        raise ValueError(f"need x1 [tokens, d_mlp] and w_out [d_mlp, d_model]; got {tuple(getattr(x1, 'shape', ()))} "
                         f"and {tuple(getattr(w_out, 'shape', ()))}")
    if x1.shape[0] == 0 or x1.shape[1] == 0:
        raise ValueError(f"x1 {tuple(x1.shape)} is empty: CETT and activation ratios are means over tokens and neurons; "
                         "pass the activations of at least one token")
    if not isinstance(chunk_tokens, numbers.Integral) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")


def _check_threshold(threshold: float) -> None:
    if math.isnan(threshold):  # every comparison with NaN is False: D would silently be empty
        raise ValueError("threshold is NaN: give a layer threshold ε ≥ 0 (e.g. from cett_threshold)")


def neuron_magnitudes(x1: Float[Tensor, "tokens d_mlp"], w_out: Float[Tensor, "d_mlp d_model"]) -> Float[Tensor, "tokens d_mlp"]:
    """‖n_i‖ = |x1_i| · ‖W_out[:, i]‖ for every token and neuron."""
    return x1.abs() * w_out.to(x1.device, x1.dtype).norm(dim=1)


def neuron_thresholds(threshold: float, w_out: Float[Tensor, "d_mlp d_model"]) -> Float[Tensor, " d_mlp"]:
    """The layer threshold ε moved into activation space: ε / ‖W_out[:, i]‖ per neuron.

    |x1_i| ≥ ε / ‖W_out[:, i]‖ exactly when ‖n_i‖ ≥ ε. A neuron whose down-projection is
    zero contributes nothing and gets an infinite threshold (always dropped) when ε > 0.
    """
    norms = w_out.float().norm(dim=1)
    if threshold <= 0:
        return torch.zeros_like(norms)
    return threshold / norms  # x / 0 = inf for x > 0


def activation_ratio(x1: Float[Tensor, "tokens d_mlp"], w_out: Float[Tensor, "d_mlp d_model"], threshold: float) -> float:
    """Fraction of (token, neuron) entries kept at layer threshold ε: ‖n_i‖ ≥ ε (1 − sparsity)."""
    _check_layer(x1, w_out)
    _check_threshold(threshold)
    kept = 0
    for chunk in x1.split(DEFAULT_CHUNK_TOKENS):
        kept += int((neuron_magnitudes(chunk.double(), w_out.double()) >= threshold).sum())
    return kept / x1.numel()


class _CETTCurve:
    """CETT as a function of ε for fixed activations: the full-output norms are computed once.

    Tokens whose full output Σ_i n_i is exactly zero have no defined ratio and are
    skipped (left out of the mean); with no such token left the value is NaN.
    """

    def __init__(self, x1: Tensor, w_out: Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        _check_layer(x1, w_out, chunk_tokens)
        self.x1, self.chunk = x1, chunk_tokens
        self.w_out = w_out.to(x1.device, torch.float64)
        self.col_norms = self.w_out.norm(dim=1)
        self.full = torch.cat([(c.double() @ self.w_out).norm(dim=1) for c in x1.split(chunk_tokens)])
        self.valid = self.full > 0
        self.max_magnitude = max((float(neuron_magnitudes(c.double(), self.w_out).max()) for c in x1.split(chunk_tokens)), default=0.0)

    def __call__(self, threshold: float) -> float:
        _check_threshold(threshold)
        n_valid = int(self.valid.sum())
        if n_valid == 0:
            return math.nan
        total = 0.0
        for start, chunk in zip(range(0, self.x1.shape[0], self.chunk), self.x1.split(self.chunk)):
            chunk = chunk.double()
            tail = chunk * (chunk.abs() * self.col_norms < threshold)  # x1 masked to D
            full = self.full[start:start + chunk.shape[0]]
            valid = self.valid[start:start + chunk.shape[0]]
            total += float(((tail @ self.w_out).norm(dim=1)[valid] / full[valid]).sum())
        return total / n_valid


def cett(x1: Float[Tensor, "tokens d_mlp"], w_out: Float[Tensor, "d_mlp d_model"], threshold: float,
         chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> float:
    """CETT of one layer at threshold ε: mean over tokens of ‖Σ_{i∈D} n_i‖ / ‖Σ_i n_i‖,
    D = {i : ‖n_i‖ < ε}.

    Computed in float64, ``chunk_tokens`` rows at a time (Σ_{i∈D} n_i = (x1 ⊙ 1_D) W_out), so
    memory stays bounded for any number of tokens. Tokens whose MLP output Σ_i n_i is exactly
    zero have no defined ratio and are skipped; if every token is such a token, NaN.
    """
    return _CETTCurve(x1, w_out, chunk_tokens)(threshold)


def cett_curve(x1: Float[Tensor, "tokens d_mlp"], w_out: Float[Tensor, "d_mlp d_model"], thresholds: Tensor,
               chunk_tokens: int = 256) -> Tensor:
    """CETT at many thresholds at once (float32): per chunk of tokens, one batched matmul
    of the x1 masked at every threshold. Searches that need ε(c) at many c (``ppl``)
    interpolate this curve instead of bisecting per c (a pass over the tokens per step).
    Memory: len(thresholds) · chunk · d_mlp floats."""
    _check_layer(x1, w_out, chunk_tokens)
    if thresholds.isnan().any():
        raise ValueError("thresholds hold NaN: give layer thresholds ε ≥ 0")
    w = w_out.to(x1.device, torch.float32)
    norms = w.norm(dim=1)
    grid = thresholds.to(x1.device, torch.float32).view(-1, 1, 1)
    total = torch.zeros(grid.shape[0], dtype=torch.float64)
    n_valid = 0
    for chunk in x1.float().split(chunk_tokens):
        full = (chunk @ w).norm(dim=1)
        valid = full > 0
        tails = chunk * ((chunk.abs() * norms) < grid)  # [grid, tokens, d_mlp]: x1 masked to D
        ratios = (tails @ w).norm(dim=-1)[:, valid] / full[valid]
        total += ratios.double().sum(1)
        n_valid += int(valid.sum())
    return (total / n_valid).float() if n_valid else torch.full((grid.shape[0],), math.nan)


def cett_threshold(x1: Float[Tensor, "tokens d_mlp"], w_out: Float[Tensor, "d_mlp d_model"], target_cett: float,
                   rtol: float = 1e-4, max_iter: int = 100, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> float:
    """The layer threshold ε whose CETT meets ``target_cett``, by bisection on dense activations.

    CETT(0) = 0 (D is empty) and CETT(ε) = 1 once ε exceeds every ‖n_i‖. CETT is a step
    function of ε that rises with it in practice; it is not strictly guaranteed monotone,
    since cancelling n_i can make a larger tail shorter, so bisection keeps a bracket
    CETT(lo) ≤ target < CETT(hi). Returned: ``lo``, the largest ε found whose CETT does not
    exceed the target (never above it), once hi − lo ≤ rtol · hi (or after ``max_iter``
    halvings). The answer is thus within a relative ``rtol`` of the jump where CETT crosses
    the target.
    """
    if not 0.0 <= target_cett <= 1.0:
        raise ValueError(f"target_cett must lie in [0, 1], got {target_cett}")
    if not rtol > 0 or max_iter < 1:
        raise ValueError(f"need rtol > 0 and max_iter >= 1 for the bisection, got rtol={rtol}, max_iter={max_iter}")
    curve = _CETTCurve(x1, w_out, chunk_tokens)
    if curve.max_magnitude == 0.0 or target_cett == 0.0:
        return 0.0
    lo, hi = 0.0, math.nextafter(curve.max_magnitude, math.inf)
    if target_cett >= 1.0:
        return hi
    for _ in range(max_iter):
        if hi - lo <= rtol * hi:
            break
        mid = 0.5 * (lo + hi)
        if curve(mid) <= target_cett:
            lo = mid
        else:
            hi = mid
    return lo


def cats_threshold(acts: Tensor, sparsity: float, max_elements: int = DEFAULT_MAX_ELEMENTS, seed: int = 0) -> float:
    """Threshold t on |acts| that zeroes a ``sparsity`` fraction: #{|a| < t} = round(s · n).

    t is the (k+1)-th smallest |a| with k = round(s · n) (0 when k = 0, just above the
    largest when k = n), so CATS_t(v) = v · 1[|v| ≥ t] (Lee et al. 2024, eq. 2) zeroes exactly
    k calibration values when they have no ties. Ties at t (e.g. ReLU's exact zeros) are
    kept together, so fewer may fall below it. Above ``max_elements`` values the quantile
    is taken on a seeded uniform sample of that many (deterministic for a given ``seed``).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    values = acts.detach().reshape(-1)
    if values.numel() == 0:
        raise ValueError("no activations to take a quantile of")
    if values.numel() > max_elements:
        index = torch.randint(values.numel(), (max_elements,), generator=torch.Generator().manual_seed(seed))
        values = values[index.to(values.device)]
    values = values.abs().float()
    n, k = values.numel(), round(sparsity * values.numel())
    if k == 0:
        return 0.0
    if k >= n:
        top = values.max()
        return float(torch.nextafter(top, torch.full_like(top, math.inf)))  # in float32, as compared
    return float(torch.kthvalue(values, k + 1).values)
