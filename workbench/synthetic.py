"""Synthetic activations with a known dictionary: ground truth for SAE training.

Superposition data (Elhage et al. 2022; Sharkey et al. 2022): n_features unit directions
in d < n_features dimensions; feature i fires independently with probability p_i, where
p follows a power law scaled to ``avg_active`` features per row; active magnitudes are
drawn from |N(0, 1)| + 0.5 so a firing feature is never negligible; Gaussian noise is
added. The hierarchical variant makes some features *parents* whose *children* fire only
together with them, the setting in which SAEs absorb a parent into its children
(Chanin et al. 2024, "A is for Absorption").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticData:
    features: Tensor  # [n_features, d], unit rows: the true dictionary
    probabilities: Tensor  # [n_features]: chance each feature fires in a row
    noise: float
    parents: Tensor | None = None  # [n_parents] feature ids (hierarchical variant)
    children: Tensor | None = None  # [n_parents, children_per_parent] feature ids
    magnitudes: str = "folded_normal"  # active magnitudes: |N(0, 1)| + 0.5, or "exponential": Exp(1)

    @property
    def d(self) -> int:
        return self.features.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(activations [n, d], true feature coefficients [n, n_features])."""
        fires = torch.rand(n, len(self.probabilities), generator=generator) < self.probabilities
        if self.parents is not None:
            # children only fire with their parent
            fires[:, self.children] &= fires[:, self.parents].unsqueeze(-1)
        if self.magnitudes == "exponential":
            magnitudes = torch.empty(n, len(self.probabilities)).exponential_(generator=generator)
        else:
            magnitudes = torch.randn(n, len(self.probabilities), generator=generator).abs() + 0.5
        coefficients = fires * magnitudes
        # A sparse product: the dense one was half the cost of a batch at 16,384 features.
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            x = coefficients.to_sparse_csr() @ self.features
        x += self.noise * torch.randn(n, self.d, generator=generator)
        return x, coefficients

    def batches(self, batch_size: int, n_tokens: int, seed: int = 0):
        """A reproducible stream of ``n_tokens // batch_size`` batches of activations."""
        generator = torch.Generator().manual_seed(seed)
        for _ in range(n_tokens // batch_size):
            yield self.sample(batch_size, generator)[0]


def _power_law(n: int, avg_active: float, exponent: float) -> Tensor:
    weights = torch.arange(1, n + 1, dtype=torch.float64) ** -exponent
    return (weights / weights.sum() * avg_active).clamp(max=1.0).float()


def superposition(d: int = 256, n_features: int = 2048, avg_active: float = 8.0, exponent: float = 0.5,
                  noise: float = 0.01, seed: int = 0, magnitudes: str = "folded_normal") -> SyntheticData:
    """Features with power-law firing frequencies, ``avg_active`` per row on average.
    ``magnitudes="exponential"`` draws active magnitudes from Exp(1): a heavy tail and many
    near-zero activations, unlike the default's floor of 0.5."""
    if magnitudes not in ("folded_normal", "exponential"):
        raise ValueError(f"magnitudes must be 'folded_normal' or 'exponential', got {magnitudes!r}")
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=generator)
    features /= features.norm(dim=1, keepdim=True)
    return SyntheticData(features, _power_law(n_features, avg_active, exponent), noise, magnitudes=magnitudes)


def hierarchical(d: int = 64, n_parents: int = 16, children_per_parent: int = 4, n_other: int = 192,
                 parent_probability: float = 0.05, child_probability: float = 0.3, other_active: float = 3.0,
                 noise: float = 0.01, seed: int = 0) -> SyntheticData:
    """Parents fire with ``parent_probability``; each child fires with ``child_probability``
    given its parent (never without it); ``n_other`` independent features add background."""
    generator = torch.Generator().manual_seed(seed)
    n_children = n_parents * children_per_parent
    n_features = n_parents + n_children + n_other
    features = torch.randn(n_features, d, generator=generator)
    features /= features.norm(dim=1, keepdim=True)
    probabilities = torch.cat([
        torch.full((n_parents,), parent_probability),
        torch.full((n_children,), child_probability),
        _power_law(n_other, other_active, 0.5),
    ])
    parents = torch.arange(n_parents)
    children = torch.arange(n_parents, n_parents + n_children).view(n_parents, children_per_parent)
    return SyntheticData(features, probabilities, noise, parents, children)


def mmcs(decoder: Tensor, features: Tensor) -> float:
    """Mean max cosine similarity: for each true feature, its best-matching decoder row."""
    dec = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = features / features.norm(dim=1, keepdim=True)
    return float((true @ dec.T).max(dim=1).values.mean())


@torch.no_grad()
def absorption_score(sae, data: SyntheticData, n: int = 16_384, seed: int = 1) -> float:
    """How often a parent's latent stays silent while the parent is active with a child.

    Each parent is matched to the latent whose decoder row is closest to it. On rows where
    the parent and at least one of its children are active, absorption is the fraction in
    which that latent does not fire (the child's latents have absorbed it). Averaged over
    parents; 0 is no absorption.
    """
    if data.parents is None:
        raise ValueError("absorption needs hierarchical data (synthetic.hierarchical)")
    x, coefficients = data.sample(n, torch.Generator().manual_seed(seed))
    dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    latent_of = (data.features[data.parents] @ dec.T).argmax(dim=1)
    z = sae.encode(x.to(sae.W_dec.device)).cpu()
    scores = []
    for parent, children, latent in zip(data.parents, data.children, latent_of):
        rows = (coefficients[:, parent] > 0) & (coefficients[:, children] > 0).any(-1)
        if rows.any():
            scores.append(float((z[rows, latent] <= 0).float().mean()))
    return sum(scores) / len(scores)
