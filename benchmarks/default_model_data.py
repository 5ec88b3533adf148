"""What the default-model benchmarks share: the ``--quick`` switch, the model, training and
validation tokens cached at the benchmark's hooks, and the seeds' mean ± half range."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import workbench as wb
from workbench.cache import ActivationCache, cache_activations
from workbench.paths import cache_dir


@dataclass
class DefaultModelData:
    quick: bool
    size: dict  # train_tokens, d_sae, eval_tokens
    model: object
    tokens: object  # training tokens [sequences, positions]
    cache: ActivationCache
    val: object  # held-out validation tokens
    val_cache: ActivationCache


def default_model_data(doc: str, full: dict, quick: dict, hooks: list[str], name: str,
                       with_grads: bool = False) -> DefaultModelData:
    """Parse ``--quick`` (``doc``'s first line describes the script), load the default model,
    and cache ``hooks`` for the training and the validation tokens of the chosen size, under
    cache_dir()/bench/<model>-<name>[-val]-<tokens> (reused by later runs)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; print, do not write RESULTS.md")
    is_quick = parser.parse_args().quick
    size = quick if is_quick else full
    model = wb.load_model(wb.DEFAULT_MODEL)

    def cached(split: str, n_tokens: int, suffix: str):
        tokens = wb.load_tokens("stdlib", split, n_tokens=n_tokens)
        folder = cache_dir() / "bench" / f"{wb.DEFAULT_MODEL}-{name}{suffix}-{tokens.numel()}"
        started = time.perf_counter()
        cache = ActivationCache.open(cache_activations(model, tokens, hooks, folder, with_grads=with_grads,
                                                       progress=False))
        print(f"cache: {cache.n_tokens:,} {split} rows of {hooks} in {time.perf_counter() - started:.0f} s", flush=True)
        return tokens, cache

    tokens, cache = cached("train", size["train_tokens"], "")
    val, val_cache = cached("val", size["eval_tokens"], "-val")
    return DefaultModelData(is_quick, size, model, tokens, cache, val, val_cache)


def spread(rows: list[dict], key: str, digits: int) -> str:
    """The seeds' mean ± half their range of ``key``."""
    values = [r[key] for r in rows]
    return f"{statistics.fmean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"
