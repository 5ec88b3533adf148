"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k·B largest ReLU'd pre-activations of the whole batch, so the number
of active latents varies per token around k. Inference cannot depend on the batch, so a
threshold θ is kept: an exponential moving average of the smallest value kept in each
training batch; at inference z = pre · 1[pre > θ] (a JumpReLU with one threshold, which is
how SAELens exports it).

The average is bias-corrected (as Adam's moments): it starts from zero weight rather than
from the first batch, so the large minima of the first steps, before the encoder has
learned anything, fade out within ~1/threshold_ema steps. Seeding it with the first batch
(and a slow 0.01 rate) left θ at 1.5× its final value after 128 steps and halved the
inference L0.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import SAEConfig, SparseAutoencoder, SparseCode, register


@dataclasses.dataclass
class BatchTopKConfig(SAEConfig):
    threshold_ema: float = 0.05
    """Weight of each batch's smallest kept activation in the running inference threshold
    (its memory is ~1/threshold_ema steps; a batch's minimum is a quantile of k·B values,
    so little smoothing is needed)."""


def _flat_top_k(flat: Tensor, n: int, sample: int = 65_536) -> tuple[Tensor, Tensor]:
    """The n largest entries of ``flat`` (values, positions), positions ascending; ties at the
    n-th value go to the earliest positions. Exact, and ~4× faster than ``flat.topk(n)``,
    which runs on one core.

    A threshold below the n-th largest value, estimated from an evenly strided sample (no
    random numbers: training stays reproducible) with a margin, keeps a few more than n
    candidates in one parallel pass. The margin is 6 standard deviations of the sample's
    count above the n-th value (≥ 25%): a fraction n/total of the sample's ~65,536 entries,
    so ~1.25n candidates at k·B = total/64 and ~1.5n at total/512 (a 2× margin cost ~10%
    more time). The n-th largest among them is found with ``kthvalue`` and the candidates
    at or above it kept in place, so no sort is needed (sorting topk's output cost more
    than the top-k). Should fewer than n pass (the estimate was too high), every entry is
    a candidate."""
    total = flat.numel()
    candidates = None
    if 4 * n < total and total > 4 * sample:
        stride = (total // sample) | 1  # odd: coprime with a power-of-two width, so every latent is sampled
        probe = flat[::stride]
        expected = probe.numel() * n / total  # sampled entries above the n-th value
        margin = 1 + max(0.25, 6 / expected ** 0.5)
        threshold = probe.kthvalue(max(1, int(probe.numel() * (1 - margin * n / total)))).values
        candidates = (flat >= threshold).nonzero().squeeze(1)
        if candidates.numel() < n:
            candidates = None
    if candidates is None:
        candidates = torch.arange(total, device=flat.device)
    values = flat[candidates]
    nth = values.kthvalue(values.numel() - n + 1).values  # the n-th largest
    keep = values > nth
    ties = values == nth
    keep |= ties & (ties.cumsum(0) <= n - keep.sum())
    return values[keep], candidates[keep]


@torch.no_grad()
def fold_into_threshold(threshold: Tensor, weight: Tensor, batch_min: Tensor, rate: float,
                        seen: Tensor | None = None) -> None:
    """θ ← the bias-corrected moving average of the batches' smallest kept values, in place:
    the weights sum to ``weight`` = 1 − (1 − rate)ⁿ after n batches. ``seen`` (for per-latent
    thresholds) masks the entries this batch updates; the others keep θ and weight."""
    old = weight * (1 - rate)
    new_weight = old + rate
    updated = (threshold * old + batch_min * rate) / new_weight
    if seen is not None:
        updated, new_weight = torch.where(seen, updated, threshold), torch.where(seen, new_weight, weight)
    threshold.copy_(updated)
    weight.copy_(new_weight)


def infer_by_threshold(sae: SparseAutoencoder, pre_acts: Tensor, k: int | None) -> SparseCode:
    """The inference rule of SAEs trained by a batch-level selection: z = pre·1[pre > θ], with
    ``sae.threshold`` one θ or one per latent. It has no k, so asking for another k is an error."""
    if k is not None and k != sae.cfg.k:
        raise ValueError(f"a {sae.architecture} SAE infers with its threshold θ, not a top-k; "
                         f"k={k} applies only to training batches")
    return SparseCode.from_dense(pre_acts * (pre_acts > sae.threshold))


def batch_top_k_entries(pre_acts: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k·B largest ReLU'd entries of the batch as (row, latent, value), rows ascending.

    One top-k over the flattened batch picks the entries, in row-major order. Building the
    dense z, a second dense top-k to re-pack it, and a ReLU copy of the pre-activations
    made BatchTopK train ~6× slower than TopK.
    """
    rows, d_sae = pre_acts.shape
    values, flat = _flat_top_k(pre_acts.reshape(-1), min(k * rows, pre_acts.numel()))
    if not bool((values > 0).all()):  # fewer than k·B positive: the ReLU zeros are not kept
        values, flat = values[values > 0], flat[values > 0]
    return flat.div(d_sae, rounding_mode="floor"), flat.remainder(d_sae), values


def batch_top_k(pre_acts: Tensor, k: int) -> SparseCode:
    """``batch_top_k_entries`` as a padded code: they fall into a row's slots by a count per
    row (``SparseCode.from_entries``)."""
    return SparseCode.from_entries(pre_acts.shape[0], *batch_top_k_entries(pre_acts, k))


@register("batchtopk", BatchTopKConfig)
class BatchTopKSAE(SparseAutoencoder):
    # Annealing keeps k_now·B entries of the batch (k_now ≥ k). The trainer does not
    # observe those batches: their smallest kept value lies below the k·B-th, and θ must
    # match the final k (see TrainConfig's check that annealing ends before training does).
    supports_k_annealing = True
    ragged_code = True

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        # Total weight of the averaged minima (1 − (1 − ema)ⁿ after n steps), for bias correction.
        self.register_buffer("threshold_weight", torch.zeros(()))

    @torch.no_grad()
    def observe(self, code: SparseCode) -> None:
        """Fold this training batch's smallest kept activation into the inference threshold."""
        kept = code.values[code.values > 0]
        if kept.numel():
            self.update_threshold(kept.min().to(self.threshold.dtype))

    @torch.no_grad()
    def update_threshold(self, batch_min: Tensor) -> None:
        fold_into_threshold(self.threshold, self.threshold_weight, batch_min, self.cfg.threshold_ema)

    def select_entries(self, pre_acts: Tensor, k: int | None = None, **context) -> tuple[Tensor, Tensor, Tensor] | None:
        """The training selection as entries (the trainer's forward); None at inference."""
        return batch_top_k_entries(pre_acts, k or self.cfg.k) if self.training else None

    def select(self, pre_acts: Tensor, k: int | None = None, **context) -> SparseCode:
        """Training: the batch's top k·B (``k`` overrides cfg.k, for annealing). Inference:
        the threshold θ, which has no k, so asking for another k is an error."""
        if self.training:
            return batch_top_k(pre_acts, k or self.cfg.k)
        return infer_by_threshold(self, pre_acts, k)
