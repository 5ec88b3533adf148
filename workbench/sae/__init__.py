"""Sparse autoencoders: one file per architecture, registered by name.

``create(architecture, d_in, d_sae, k, **cfg)`` makes one; ``load(folder)`` opens a saved one.
Any of them is a transcoder when given a ``target_hook`` (``transcoders``).
"""

from . import batchtopk, featurechoice, gradient, hierarchical, jumprelu, matryoshka, relu, topk  # noqa: F401  (registers them)
from . import interop  # noqa: F401  (wb.sae.interop.export_sae_lens; sae_lens itself is imported on use)
from .base import REGISTRY, ForwardResult, SAEConfig, SparseAutoencoder, SparseCode, create, load, register
from .transcoders import transcoder_hooks

ARCHITECTURES = tuple(sorted(REGISTRY))

__all__ = ["ARCHITECTURES", "REGISTRY", "ForwardResult", "SAEConfig", "SparseAutoencoder", "SparseCode", "create", "load", "register",
           "transcoder_hooks"]
