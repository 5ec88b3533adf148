"""Activation cache: activations and loss gradients of any hook, on disk, streamed back fast."""

from .format import CacheError
from .reader import ActivationCache
from .writer import cache_activations

__all__ = ["ActivationCache", "CacheError", "cache_activations"]
