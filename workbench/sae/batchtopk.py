"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k·B largest ReLU'd pre-activations of the whole batch, so the number
of active latents varies per token around k. Inference cannot depend on the batch, so a
threshold θ is kept: an exponential moving average of the smallest value kept in each
training batch; at inference z = pre · 1[pre > θ] (a JumpReLU with one threshold, which is
how SAELens exports it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import SAEConfig, SparseAutoencoder, SparseCode, register


@dataclasses.dataclass
class BatchTopKConfig(SAEConfig):
    threshold_ema: float = 0.01
    """Weight of each batch's smallest kept activation in the running inference threshold."""


def _rows_to_code(z: Tensor) -> SparseCode:
    """A dense code with a varying number of nonzeros per row as a padded SparseCode."""
    width = max(1, int((z > 0).sum(-1).max()))
    values, indices = z.topk(width, dim=-1, sorted=False)
    return SparseCode(values, indices)


@register("batchtopk", BatchTopKConfig)
class BatchTopKSAE(SparseAutoencoder):
    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def batch_select(self, pre_acts: Tensor) -> Tensor:
        """Dense z keeping the k·B largest ReLU'd pre-activations of the batch."""
        acts = pre_acts.relu()
        flat = acts.flatten()
        values, indices = flat.topk(self.cfg.k * pre_acts.shape[0], sorted=False)
        if self.training:
            kept = values[values > 0]
            if kept.numel():
                with torch.no_grad():
                    smallest = kept.min().to(self.threshold.dtype)
                    fresh = bool(self.threshold == 0)
                    self.threshold.copy_(smallest if fresh else torch.lerp(self.threshold, smallest, self.cfg.threshold_ema))
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts)

    def select(self, pre_acts: Tensor, **context) -> SparseCode:
        if self.training:
            return _rows_to_code(self.batch_select(pre_acts))
        return _rows_to_code(pre_acts * (pre_acts > self.threshold))
