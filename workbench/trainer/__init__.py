"""SAE training: ``TrainConfig`` and ``train_sae`` / ``train_saes`` over any stream of batches."""

from .config import TrainConfig, default_lr
from .init import geometric_median
from .loop import train_sae, train_saes
from .step import NonFiniteError

__all__ = ["NonFiniteError", "TrainConfig", "default_lr", "geometric_median", "train_sae", "train_saes"]
