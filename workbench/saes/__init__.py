"""Shipped SAEs, loaded by name the way SAELens users load a release.

    wb.list_saes()                                         # names of the shipped SAEs
    wb.load_sae("stdlib-gelu/blocks.2.hook_resid_post/topk-2048")
    wb.sae_card("stdlib-gelu/blocks.2.hook_resid_post/topk-2048").fvu
    wb.load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")   # a SAELens release (needs a hub)

Rebuild them with ``python -m workbench.saes train`` (see ``train``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..hub import hub_reachable
from ..sae.base import did_you_mean
from .card import CARD_FILE, SAECard
from .specs import CATALOGUE, SAESpec

__all__ = ["CATALOGUE", "SAECard", "SAESpec", "SAEUnavailableOffline", "list_saes", "load_sae", "sae_card"]


class SAEUnavailableOffline(ConnectionError):
    """A SAELens release was asked for, but no model hub is reachable."""


def _folder(name: str) -> Path:
    from .train import saes_dir

    return saes_dir() / name


def list_saes(model: str | None = None) -> list[str]:
    """Names of the shipped SAEs whose files are present (of one zoo model, if given)."""
    return [name for name in CATALOGUE if (_folder(name) / CARD_FILE).exists()
            and (model is None or CATALOGUE[name].model == model)]


def sae_card(name: str) -> SAECard:
    """The card of a shipped SAE: hook, architecture, width, k, held-out FVU, L0, dead
    fraction and spliced-in CE, training time, corpus and model hashes."""
    _check_shipped(name)
    return SAECard.load(_folder(name))


def load_sae(name: str, sae_id: str | None = None, device: str | torch.device | None = None):
    """A shipped SAE by name (offline), in eval mode on ``device`` (default: the best one);
    or, with ``sae_id``, a SAELens release ``SAE.from_pretrained(name, sae_id)`` when a hub
    is reachable (``SAEUnavailableOffline`` within seconds when it is not)."""
    from ..models import best_device
    from ..sae import load

    device = device if device is not None else best_device()
    if sae_id is None:
        _check_shipped(name)
        return load(_folder(name), device=device)
    if not hub_reachable():
        raise SAEUnavailableOffline(
            f"the SAELens release {name!r} ({sae_id!r}) needs a model hub, and none is reachable from this machine. "
            f"The shipped SAEs load offline: {list_saes()[:4]} … (wb.list_saes() lists all {len(list_saes())}).")
    from sae_lens import SAE

    loaded = SAE.from_pretrained(name, sae_id, device=str(device))
    sae_lens_sae = loaded[0] if isinstance(loaded, tuple) else loaded  # older SAELens returned (sae, cfg, sparsity)
    with tempfile.TemporaryDirectory() as folder:  # through SAELens' own format, which interop reads
        sae_lens_sae.save_model(folder)
        return load(folder, device=device)


def _check_shipped(name: str) -> None:
    if name not in CATALOGUE:
        raise ValueError(f"no shipped SAE is called {name!r}.{did_you_mean(name, CATALOGUE)} wb.list_saes() lists them; "
                         "a SAELens release is load_sae(release, sae_id=...)")
    if not (_folder(name) / CARD_FILE).exists():
        raise FileNotFoundError(f"{_folder(name)} is missing: restore it with 'git checkout -- saes/', or retrain it "
                                f"with 'python -m workbench.saes train {name}'")
