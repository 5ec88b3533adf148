"""Under-used latents by a Zipf law, for the aux_zipf loss (Ayonrinde 2024, "Adaptive Sparse
Allocation with Mutual Choice & Feature Choice Sparse Autoencoders").

AuxK (Gao et al. 2024) gives an auxiliary reconstruction signal only to *dead* latents, those
that have not fired for a long time. Ayonrinde observes that the latents' firing densities,
sorted, follow a Zipf law (density ∝ rank^−α) except at the low end, where latents are alive
but under-used; aux_zipf_loss extends AuxK's candidates from the dead latents to those. Here
a latent is under-used when its density falls below ``factor`` times the density a Zipf law,
fitted to the densest ``fit_fraction`` of the latents (least squares on log density against
log rank), predicts at its rank. The exact thresholds are this module's choice, stated here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zipf_expected(density: Tensor, fit_fraction: float = 0.8) -> Tensor:
    """Each latent's density as predicted from its rank by a Zipf law fitted to the densest
    ``fit_fraction`` of the latents (those with density > 0 among them)."""
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"fit_fraction must lie in (0, 1], got {fit_fraction}")
    order = density.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, density.numel() + 1, device=density.device)
    head = order[: max(2, int(density.numel() * fit_fraction))]
    head = head[density[head] > 0]
    if head.numel() < 2:  # nothing to fit: no latent is called under-used
        return torch.zeros_like(density)
    log_rank, log_density = rank[head].double().log(), density[head].double().log()
    slope = ((log_rank - log_rank.mean()) * (log_density - log_density.mean())).sum() / (
        (log_rank - log_rank.mean()).pow(2).sum().clamp_min(1e-12))
    intercept = log_density.mean() - slope * log_rank.mean()
    return (intercept + slope * rank.double().log()).exp().to(density.dtype)


def under_used(density: Tensor, factor: float = 0.5, fit_fraction: float = 0.8) -> Tensor:
    """Latents whose density is below ``factor`` × its Zipf expectation (a bool mask)."""
    return density < factor * zipf_expected(density, fit_fraction)
