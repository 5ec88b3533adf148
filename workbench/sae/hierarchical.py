"""HierarchicalTopK SAE (Balagansky et al. 2025, "Train One Sparse Autoencoder Across
Multiple Sparsity Budgets to Preserve Interpretability and Accuracy").

The k selected latents are sorted by value, l_(1) ≥ … ≥ l_(k); the reconstruction with
budget j uses the j largest:  x̂_j = Σ_{i ≤ j} l_(i) d_(i) + b_dec  (a cumulative sum of
the sorted contributions). Training minimises the mean over budgets j ∈ J of ‖x − x̂_j‖²,
so one SAE serves every L0 ≤ k at inference: ``encode(x, k=j)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import ForwardResult, SAEConfig, SparseAutoencoder, SparseCode, register


@dataclasses.dataclass
class HierarchicalConfig(SAEConfig):
    budgets: list[int] = dataclasses.field(default_factory=list)
    """Budgets J ⊆ {1..k} whose reconstructions are trained; empty: every j in 1..k."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.budgets:
            self.budgets = list(range(1, self.k + 1))
        if any(not 1 <= j <= self.k for j in self.budgets):
            raise ValueError(f"budgets must lie in 1..k={self.k}, got {self.budgets}")


@register("hierarchical", HierarchicalConfig)
class HierarchicalTopKSAE(SparseAutoencoder):
    sorted_code = True
    # Annealing starts above k, but every budget this SAE trains is ≤ k (its loss already
    # spans all smaller L0s at once), so there is no k_start > k to anneal from.
    no_k_annealing_because = ("hierarchical SAEs train every budget ≤ k at once, and annealing would start "
                              "above k; drop k_anneal_tokens (set it to 0)")

    def select(self, pre_acts: Tensor, k: int | None = None, **context) -> SparseCode:
        """Top-k latents sorted by value (largest first); ``k`` ≤ cfg.k picks a smaller budget."""
        k = k or self.cfg.k
        if k > self.cfg.k:
            raise ValueError(f"this SAE was trained for budgets up to k={self.cfg.k}, asked for {k}")
        values, indices = pre_acts.topk(k, dim=-1, sorted=True)
        return SparseCode(values.relu(), indices)

    def reconstruction_loss(self, x: Tensor, result: ForwardResult) -> Tensor:
        # Contributions l_(i) d_(i), sorted by value, summed cumulatively: x̂_j for every j at once.
        # The rows are gathered with embedding, not W_dec[indices]: the backward of advanced
        # indexing accumulates with atomic adds across CPU threads, in a varying order, so two
        # runs (or a run and its resume) differed; embedding's backward sums each row in order.
        contributions = result.code.values.unsqueeze(-1) * torch.nn.functional.embedding(result.code.indices, self.W_dec)
        budgets = torch.as_tensor(self.cfg.budgets, device=x.device) - 1
        partial = contributions.cumsum(1)[:, budgets] + self.b_dec  # [batch, |J|, d_in]
        return (partial - x.unsqueeze(1)).pow(2).sum(-1).mean()
