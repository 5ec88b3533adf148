"""Model access: the offline zoo by name, anything else through TransformerLens' hub loader.

All model construction goes through ``load_model`` so that moving from TransformerLens'
``HookedTransformer`` to its successor later touches this file alone (DESIGN.md).
"""

from __future__ import annotations

import difflib
import logging
import warnings
from pathlib import Path

import torch

from .hub import hub_reachable
from .paths import data_dir
from .zoo.card import CARD_FILE, ModelCard, read_card
from .zoo.specs import DEFAULT_MODEL, ZooSpec

log = logging.getLogger(__name__)


class ModelUnavailableOffline(ConnectionError):
    """A hub model was asked for and no hub is reachable."""


def best_device() -> torch.device:
    """``cuda`` when a GPU is visible, else Apple ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _zoo_dir() -> Path:
    return data_dir() / "zoo"


def list_models() -> list[str]:
    """Names of the offline zoo models shipped in ``data/zoo`` (these load without a hub)."""
    folder = _zoo_dir()
    return sorted(p.name for p in folder.iterdir() if (p / CARD_FILE).exists() and (p / "model.safetensors").exists()) if folder.exists() else []


def model_card(name: str = DEFAULT_MODEL) -> ModelCard:
    """The model card of a zoo model: corpus, tokens seen, validation loss, config."""
    _require_zoo_name(name)
    return read_card(_zoo_dir() / name)


def _pretrained_names() -> list[str]:
    from transformer_lens import loading_from_pretrained as loading

    names = list(loading.OFFICIAL_MODEL_NAMES)
    for aliases in loading.MODEL_ALIASES.values():
        names.extend(aliases)
    return names


def _require_zoo_name(name: str) -> None:
    if name not in list_models():
        raise ValueError(f"{name!r} is not an offline zoo model; the zoo has {list_models()}")


def _suggestion(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def _unknown_name_error(name: str) -> ValueError:
    zoo = list_models()
    return ValueError(
        f"unknown model {name!r}.{_suggestion(name, zoo + _pretrained_names())} Offline zoo models: {zoo}. Any TransformerLens "
        "pretrained name (e.g. 'gpt2-small', 'pythia-70m') also works when a hub is reachable."
    )


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None, checkpoint: str | Path | None = None):
    """A TransformerLens ``HookedTransformer`` on ``device`` (default: the best available).

    Zoo names (``list_models()``) load offline in seconds from ``data/zoo``;
    ``checkpoint`` may name one of a zoo model's intermediate checkpoint files instead of
    its final weights. Other names go to TransformerLens' pretrained loader, which needs a
    reachable hub: without one this fails at once with ``ModelUnavailableOffline``;
    an unknown name gets a ``ValueError`` with the closest known names.
    """
    device = torch.device(device) if device is not None else best_device()
    if name in list_models():
        return _load_zoo_model(name, device, checkpoint)
    if checkpoint is not None:
        raise ValueError("checkpoint= only applies to offline zoo models")
    # Check the hub before importing TransformerLens (seconds of imports): offline, the
    # answer must come at once, and the zoo is all there is to suggest.
    if not hub_reachable():
        raise ModelUnavailableOffline(
            f"{name!r} is not an offline zoo model, and no model hub is reachable to fetch it "
            f"as a pretrained TransformerLens model.{_suggestion(name, list_models())} Offline, "
            f"use one of the zoo models: {list_models()} (default {DEFAULT_MODEL!r})."
        )
    from transformer_lens import loading_from_pretrained as loading

    try:
        loading.get_official_model_name(name)
    except ValueError:
        raise _unknown_name_error(name) from None
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained(name, device=str(device))


def build_model(spec: ZooSpec, tokenizer=None, device: str | torch.device = "cpu"):
    """A freshly initialised ``HookedTransformer`` of a zoo spec's shape (seeded by the spec)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**spec.hooked_config(), device=str(device), model_name=spec.name)
    with warnings.catch_warnings():
        # TransformerLens 3.x deprecates HookedTransformer for TransformerBridge, but SAELens 6
        # still builds on it; the move will happen here, behind load_model (DESIGN.md).
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


def _load_zoo_model(name: str, device: torch.device, checkpoint: str | Path | None):
    from safetensors.torch import load_file

    from .tokenizer import load_tokenizer

    card = read_card(_zoo_dir() / name)
    model = build_model(ZooSpec(**card.config), tokenizer=load_tokenizer(), device=device)
    weights_path = Path(checkpoint) if checkpoint is not None else _zoo_dir() / name / "model.safetensors"
    if not weights_path.exists():
        raise FileNotFoundError(f"no weights at {weights_path}; list checkpoints with workbench.zoo_checkpoints({name!r})")
    weights = {key: value.float() for key, value in load_file(str(weights_path)).items()}
    result = model.load_state_dict(weights, strict=False)
    buffers = {key for key, _ in model.named_buffers()}
    missing = [key for key in result.missing_keys if key not in buffers]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{weights_path} does not match the {name} architecture: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Re-train it with `python -m workbench.zoo train {name}`."
        )
    model.to(device, print_details=False)  # TransformerLens prints "Moving model to device" otherwise
    model.eval()
    return model


def zoo_checkpoints(name: str) -> list[tuple[int, Path]]:
    """(tokens seen, path) of each training checkpoint of a zoo model, in training order.

    A few are shipped beside the weights (``data/zoo/NAME/checkpoints/``, for the
    Sparsing-Law curves); ``python -m workbench.zoo train NAME`` writes all of them to
    ``data/checkpoints/NAME/``. Where both have a point, the local one is listed.
    """
    from safetensors import safe_open

    from .paths import checkpoints_dir

    found: dict[int, Path] = {}
    for folder in (_zoo_dir() / name / "checkpoints", checkpoints_dir() / name):
        for path in sorted(folder.glob("step*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                found[int(handle.metadata()["tokens_seen"])] = path
    return sorted(found.items())
