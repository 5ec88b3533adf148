"""Feature Choice SAE (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice &
Feature Choice Sparse Autoencoders").

TopK lets each token choose its k latents; Feature Choice turns the allocation around: each
latent chooses the m tokens of the batch where its ReLU'd pre-activation is largest, with
m = ⌈k·B/d_sae⌉, so the batch keeps about k·B (token, latent) pairs, the mean L0 is about k,
and a token gets as many latents as choose it (adaptive computation). Every latent takes
part in every batch, so no latent can die in training.

(The paper's Mutual Choice SAE keeps the top k·B pairs of the whole batch, which is the
``batchtopk`` architecture's rule; it is not registered twice.)

Inference cannot depend on the batch. Each latent keeps a threshold θ_i, an exponential
moving average of the smallest value it kept per training batch (its m-th largest, bias-
corrected as BatchTopK's θ); at inference z_i = pre_i·1[pre_i > θ_i], a JumpReLU with
per-latent thresholds, which fires each latent on about the fraction m/B of tokens it
chose in training and exports to SAELens as ``jumprelu``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .base import SAEConfig, SparseAutoencoder, SparseCode, register
from .batchtopk import fold_into_threshold, infer_by_threshold


@dataclasses.dataclass
class FeatureChoiceConfig(SAEConfig):
    threshold_ema: float = 0.05
    """Weight of each batch's smallest kept value in each latent's inference threshold."""


def feature_top_m(pre_acts: Tensor, k: int) -> SparseCode:
    """Each latent's m = ⌈k·B/d_sae⌉ largest ReLU'd entries over the batch's rows, as a padded
    code (zeros, where a latent has fewer than m positive entries, are not kept)."""
    rows, d_sae = pre_acts.shape
    m = min(rows, math.ceil(k * rows / d_sae))
    values, row = pre_acts.topk(m, dim=0, sorted=False)  # [m, d_sae]
    latent = torch.arange(d_sae, device=pre_acts.device).expand(m, d_sae)
    positive = values > 0
    values, row, latent = values[positive], row[positive], latent[positive]
    order = (row * d_sae + latent).argsort()  # row-major, as SparseCode.from_entries wants (keys are unique)
    return SparseCode.from_entries(rows, row[order], latent[order], values[order])


@register("featurechoice", FeatureChoiceConfig)
class FeatureChoiceSAE(SparseAutoencoder):
    ragged_code = True
    # Annealing keeps ⌈k_now·B/d_sae⌉ per latent (k_now ≥ k); the trainer does not observe
    # those batches, so θ only averages batches chosen at the final k.
    supports_k_annealing = True

    def __init__(self, cfg: FeatureChoiceConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        # Each latent's total weight of averaged minima, for the bias correction.
        self.register_buffer("threshold_weight", torch.zeros(cfg.d_sae))

    @torch.no_grad()
    def observe(self, code: SparseCode) -> None:
        """Fold each latent's smallest kept value of this training batch into its threshold
        (latents that kept nothing positive this batch keep their threshold)."""
        kept = code.values > 0
        latents, values = code.indices[kept], code.values[kept]
        batch_min = torch.full_like(self.threshold, math.inf).scatter_reduce(0, latents, values, "amin")
        seen = torch.isfinite(batch_min)
        fold_into_threshold(self.threshold, self.threshold_weight, batch_min.nan_to_num(posinf=0.0),
                            self.cfg.threshold_ema, seen)

    def select(self, pre_acts: Tensor, k: int | None = None, **context) -> SparseCode:
        """Training: each latent's top ⌈k·B/d_sae⌉ rows of the batch (``k`` overrides cfg.k,
        for annealing). Inference: each latent's threshold θ_i."""
        if self.training:
            return feature_top_m(pre_acts, k or self.cfg.k)
        return infer_by_threshold(self, pre_acts, k)
