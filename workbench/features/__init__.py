"""Feature index: what every SAE feature does on a cache, stored for instant per-feature reads.

    index = workbench.features.build_index(sae, cache, out_dir="data/cache/features/x", model=model)
    index = workbench.features.FeatureIndex.open("data/cache/features/x")   # instant
    index.density(7), index.top_contexts(7), index.neighbours(7), index.logit_tokens(7)
"""

from .build import build_index
from .store import FILES, QUANTILES, STATS, Context, FeatureIndex

__all__ = ["FILES", "QUANTILES", "STATS", "Context", "FeatureIndex", "build_index"]
