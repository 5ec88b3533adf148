"""Initialisation from data: the decoder bias at the geometric median (Gao et al. 2024 §2.3)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Float[Tensor, "n d"], max_iter: int = 200, tol: float = 1e-6) -> Float[Tensor, " d"]:
    """The point minimising the sum of Euclidean distances to ``points`` (Weiszfeld's algorithm).

    Robust to outliers where the mean is not, which is why it centres the SAE's input.
    Computed in float64; stops when an iteration moves the estimate by less than
    ``tol`` times the points' typical spread.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [n, d] tensor, got shape {tuple(points.shape)}")
    points = points.double()
    median = points.mean(0)
    scale = (points - median).norm(dim=1).mean().clamp_min(1e-12)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-12 * scale)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved < tol * scale:
            break
    return median.float()
