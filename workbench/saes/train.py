"""Train the shipped SAEs: one activation cache of every hook, one sweep per hook, held-out cards.

Reproducible: the tokens are the first rows of the stdlib train split, every SAE is seeded,
and training is deterministic on CPU (tests/unit/test_reliability_training.py). A killed
run resumes: the cache and each hook's sweep pick up where they stopped
(``data/checkpoints/saes/``), and SAEs already shipped with these settings are kept.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from itertools import groupby
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..cache import ActivationCache, cache_activations
from ..cache.format import model_fingerprint
from ..data import corpus_sha256, load_tokens
from ..models import load_model
from ..paths import atomic_write_bytes, atomic_write_text, cache_dir, checkpoints_dir
from ..sae.base import CFG_FILE, WEIGHTS_FILE
from ..sae.compare import compare_saes
from ..trainer import TrainConfig, train_saes
from .card import SAECard
from .specs import CATALOGUE, EVAL_TOKENS, SAESpec

log = logging.getLogger(__name__)
SHIPPED_DTYPE = torch.float16  # halves the repository's weight bytes; evaluated as shipped


def saes_dir() -> Path:
    """Where the shipped SAEs live: ``saes/`` at the repository root."""
    from ..paths import REPO_ROOT

    return REPO_ROOT / "saes"


def train_catalogue(names: list[str] | None = None, train_tokens: int | None = None, eval_tokens: int = EVAL_TOKENS,
                    out_dir: Path | None = None, run_root: Path | None = None, progress: bool = True) -> list[SAECard]:
    """Train (or resume) the shipped SAEs named (default: all of ``CATALOGUE``) and write each
    to ``out_dir/<name>/`` (cfg.json, sae.safetensors in fp16, card.json). Training runs
    (resumable) live under ``run_root`` (default ``data/checkpoints/saes/``)."""
    unknown = sorted(set(names or []) - set(CATALOGUE))
    if unknown:
        raise ValueError(f"not in the catalogue: {unknown}; its SAEs: {sorted(CATALOGUE)}")
    specs = [CATALOGUE[name] for name in (names or CATALOGUE)]
    if train_tokens is not None:
        specs = [SAESpec(**{**s.to_dict(), "train_tokens": train_tokens}) for s in specs]
    out_dir = Path(out_dir) if out_dir is not None else saes_dir()
    cards = []
    for model_name, group in groupby(sorted(specs, key=lambda s: s.model), key=lambda s: s.model):
        cards += _train_model_saes(model_name, list(group), eval_tokens, out_dir,
                                   Path(run_root) if run_root is not None else checkpoints_dir() / "saes", progress)
    return cards


def _train_model_saes(model_name: str, specs: list[SAESpec], eval_tokens: int, out_dir: Path, run_root: Path,
                      progress: bool) -> list[SAECard]:
    model = load_model(model_name)
    hooks = list(dict.fromkeys(s.hook for s in specs))
    n_train = max(s.train_tokens for s in specs)
    tokens = load_tokens("stdlib", "train", n_tokens=n_train)
    val = load_tokens("stdlib", "val", n_tokens=eval_tokens)  # disjoint from the train split by construction
    root = cache_dir() / "saes"
    train_cache = ActivationCache.open(cache_activations(model, tokens, hooks, root / f"{model_name}-train-{tokens.numel()}",
                                                         progress=progress))
    val_cache = ActivationCache.open(cache_activations(model, val, hooks, root / f"{model_name}-val-{val.numel()}",
                                                       progress=progress))
    fingerprint = model_fingerprint(model)
    cards = []
    for hook in hooks:
        mine = [s for s in specs if s.hook == hook]
        configs = [TrainConfig(architecture=s.architecture, d_sae=s.d_sae, k=s.k, hook_name=hook, seed=s.seed,
                               total_tokens=s.train_tokens) for s in mine]
        started = time.perf_counter()
        saes = train_saes(configs, train_cache, run_dir=run_root / f"{model_name}-{tokens.numel()}" / hook, progress=progress,
                          live_plot=False)
        train_time = time.perf_counter() - started  # ~0 when the sweep was already finished (then the card keeps its time)
        # Evaluate the weights as shipped: rounded to fp16 first.
        for sae in saes:
            sae.load_state_dict({key: value.to(SHIPPED_DTYPE) for key, value in sae.state_dict().items()})
        rows = compare_saes(saes, val_cache, model, val, n_batches=math.ceil(val_cache.n_tokens / 4096), progress=progress)
        for spec, sae, row in zip(mine, saes, rows):
            folder = out_dir / spec.name
            previous = SAECard.load(folder) if (folder / "card.json").exists() else None
            card = SAECard(
                name=spec.name, model=model_name, hook=hook, architecture=spec.architecture, d_in=sae.cfg.d_in,
                d_sae=spec.d_sae, k=spec.k, seed=spec.seed, tokens_seen=spec.train_tokens // 4096 * 4096,
                train_time_s=train_time if train_time > 5 or previous is None else previous.train_time_s,
                trained_with=[s.name for s in mine if s is not spec], eval_tokens=val_cache.n_tokens,
                fvu=row["fvu"], l0=row["l0"], dead_fraction=row["dead_fraction"], ce_clean=row["ce_clean"],
                ce_spliced=row["ce_spliced"], ce_recovered_vs_zero=row["ce_recovered_vs_zero"], kl=row["kl"],
                corpus_train_sha256=corpus_sha256("stdlib", "train"), model_config_sha256=fingerprint["config_sha256"],
                model_weights_sha256=fingerprint["weights_sha256"], weights_dtype=str(SHIPPED_DTYPE).removeprefix("torch."),
                machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
            _write_shipped(sae, card, folder)
            cards.append(card)
            log.info("%s: FVU %.3f, L0 %.1f, CE recovered %.3f", spec.name, card.fvu, card.l0, card.ce_recovered_vs_zero)
    return cards


def _write_shipped(sae, card: SAECard, folder: Path) -> None:
    """cfg.json and fp16 weights (each atomic), then the card, which marks the folder complete."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().to(SHIPPED_DTYPE).contiguous().cpu() for key, value in sae.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_bytes(weights, metadata={"name": card.name}))
    atomic_write_text(folder / CFG_FILE, json.dumps(sae.cfg.to_dict(), indent=2) + "\n")
    card.save(folder)
