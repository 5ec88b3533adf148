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


def _rows_to_code(z: Tensor) -> SparseCode:
    """A dense code with a varying number of nonzeros per row as a padded SparseCode."""
    width = max(1, int((z > 0).sum(-1).max()))
    values, indices = z.topk(width, dim=-1, sorted=False)
    return SparseCode(values, indices)


@register("batchtopk", BatchTopKConfig)
class BatchTopKSAE(SparseAutoencoder):
    # Annealing keeps k_now·B entries of the batch (k_now ≥ k). The trainer does not
    # observe those batches: their smallest kept value lies below the k·B-th, and θ must
    # match the final k (see TrainConfig's check that annealing ends before training does).
    supports_k_annealing = True

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        # Total weight of the averaged minima (1 − (1 − ema)ⁿ after n steps), for bias correction.
        self.register_buffer("threshold_weight", torch.zeros(()))

    def batch_select(self, pre_acts: Tensor, k: int | None = None) -> Tensor:
        """Dense z keeping the k·B largest ReLU'd pre-activations of the batch (k: cfg.k)."""
        acts = pre_acts.relu()
        flat = acts.flatten()
        values, indices = flat.topk((k or self.cfg.k) * pre_acts.shape[0], sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)

    @torch.no_grad()
    def observe(self, code: SparseCode) -> None:
        """Fold this training batch's smallest kept activation into the inference threshold."""
        kept = code.values[code.values > 0]
        if kept.numel():
            self.update_threshold(kept.min().to(self.threshold.dtype))

    @torch.no_grad()
    def update_threshold(self, batch_min: Tensor) -> None:
        rate = self.cfg.threshold_ema
        old = self.threshold_weight * (1 - rate)
        self.threshold_weight.copy_(old + rate)
        self.threshold.copy_((self.threshold * old + batch_min * rate) / self.threshold_weight)

    def select(self, pre_acts: Tensor, k: int | None = None, **context) -> SparseCode:
        """Training: the batch's top k·B (``k`` overrides cfg.k, for annealing). Inference:
        the threshold θ, which has no k, so asking for another k is an error."""
        if self.training:
            return _rows_to_code(self.batch_select(pre_acts, k))
        if k is not None and k != self.cfg.k:
            raise ValueError(f"a {self.architecture} SAE infers with its threshold θ, not a top-k; "
                             f"k={k} applies only to training batches")
        return _rows_to_code(pre_acts * (pre_acts > self.threshold))
