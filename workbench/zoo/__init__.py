"""The offline model zoo: specs, training (``python -m workbench.zoo``) and model cards."""

from .card import ModelCard, read_card
from .specs import DEFAULT_MODEL, ZOO, ZooSpec

__all__ = ["DEFAULT_MODEL", "ZOO", "ModelCard", "ZooSpec", "read_card"]
