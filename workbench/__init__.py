"""workbench: a Jupyter-first interpretability workbench for sparsity research.

Start with ``workbench.load_model()`` (the offline default model) and
``workbench.load_tokens()`` (its tokenized training corpus); see README.md.
"""

from . import circuits, features, figures, paths, sae, settings
from .cache import ActivationCache, CacheError, cache_activations
from .data import load_tokens, unigram_entropy
from .models import ModelUnavailableOffline, best_device, list_models, load_model, model_card, zoo_checkpoints
from .saes import list_saes, load_sae, sae_card
from .prompts import PromptReport, plot_token_losses, prompt_report
from .trainer import TrainConfig, train_sae, train_saes
from .steering import steer
from .widgets import ActivationViewer, CircuitViewer, FeatureBrowser, TokenView
from .zoo.specs import DEFAULT_MODEL

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "ActivationViewer",
    "CircuitViewer",
    "FeatureBrowser",
    "steer",
    "TokenView",
    "settings",
    "CacheError",
    "cache_activations",
    "paths",
    "sae",
    "DEFAULT_MODEL",
    "ModelUnavailableOffline",
    "PromptReport",
    "TrainConfig",
    "best_device",
    "circuits",
    "features",
    "figures",
    "list_saes",
    "load_sae",
    "sae_card",
    "list_models",
    "load_model",
    "load_tokens",
    "model_card",
    "plot_token_losses",
    "prompt_report",
    "train_sae",
    "train_saes",
    "unigram_entropy",
    "zoo_checkpoints",
]
