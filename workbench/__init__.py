"""workbench: a Jupyter-first interpretability workbench for sparsity research.

Start with ``workbench.load_model()`` (the offline default model) and
``workbench.load_tokens()`` (its tokenized training corpus); see README.md.
"""

from . import figures, paths, sae, settings
from .cache import ActivationCache, CacheError, cache_activations
from .data import load_tokens, unigram_entropy
from .models import ModelUnavailableOffline, best_device, list_models, load_model, model_card, zoo_checkpoints
from .prompts import PromptReport, plot_token_losses, prompt_report
from .trainer import TrainConfig, train_sae, train_saes
from .widgets import ActivationViewer, TokenView
from .zoo.specs import DEFAULT_MODEL

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "ActivationViewer",
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
    "figures",
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
