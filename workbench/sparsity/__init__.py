"""Activation sparsity of MLPs: lazy neurons, CETT, and training-free sparsification methods.

- ``describe_mlps`` (mlp.py): each layer's MLP, its hooks and down-projection norms;
- ``lazy_neuron_stats`` (lazy.py): Li et al. 2022's nonzero fractions, dead and always-on neurons;
- ``cett``, ``cett_threshold``, ``activation_ratio``, ``neuron_thresholds``, ``cats_threshold``
  (cett.py): Zhang et al. 2024 / Luo et al. 2024's CETT and CATS' quantile threshold;
- ``ppl_p_sparsity`` / ``PPLSearch`` (ppl.py): Luo et al. 2024's PPL-p% sparsity by one global CETT;
- ``CATS``, ``TopK``, ``FAT``, ``CETT``, ``TEAL``, ``CHESS``, ``WINA`` (methods.py): one interface,
  ``method.fit(source, target) -> Thresholds`` and ``with method.apply(model, thresholds) as meter``.

A source is ``(model, tokens)``, an ``ActivationCache``, or ``(cache, model)`` (sources.py).
"""

from .cett import activation_ratio, cats_threshold, cett, cett_threshold, neuron_magnitudes, neuron_thresholds
from .lazy import LazyNeuronStats, lazy_neuron_stats
from .masking import Mask, SparsityMeter, install, site_key
from .methods import CATS, CETT, CHESS, FAT, METHODS, TEAL, WINA, SparsityMethod, Thresholds, TopK, chess_thresholds, get_method
from .mlp import MLPSite, describe_mlps
from .ppl import PPLSearch, PPLSparsity, ppl_p_sparsity
from .sources import CacheSource, ModelSource, as_source

__all__ = [
    "CATS", "CETT", "CHESS", "FAT", "METHODS", "TEAL", "WINA", "CacheSource", "LazyNeuronStats", "MLPSite", "Mask",
    "ModelSource", "SparsityMeter", "SparsityMethod", "Thresholds", "TopK", "activation_ratio", "as_source",
    "cats_threshold", "cett", "cett_threshold", "chess_thresholds", "describe_mlps", "get_method", "install",
    "lazy_neuron_stats", "neuron_magnitudes", "neuron_thresholds", "site_key", "PPLSearch", "PPLSparsity",
    "ppl_p_sparsity",
]
