"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK(ReLU(W_encᵀ(x − b_dec) + b_enc)): exactly the k largest pre-activations fire
(fewer only where fewer than k are positive). TopK and ReLU commute, so the ReLU is applied
to the k selected values alone.
"""

from __future__ import annotations

from torch import Tensor

from .base import SparseAutoencoder, SparseCode, register


@register("topk")
class TopKSAE(SparseAutoencoder):
    supports_k_annealing = True

    def select(self, pre_acts: Tensor, k: int | None = None, **context) -> SparseCode:
        """``k`` overrides the trained k at inference (e.g. to probe other sparsities)."""
        values, indices = pre_acts.topk(k or self.cfg.k, dim=-1, sorted=False)
        return SparseCode(values.relu(), indices)
