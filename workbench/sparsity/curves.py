"""Sparsity–performance curves and the Sparsing-Law trend, as tables and paper figures.

- ``sparsity_performance``: for each training-free method and target, calibrate on one set
  of tokens, sparsify, and measure on disjoint held-out tokens the perplexity ratio to the
  dense model (with a bootstrap interval over sequences), the realised sparsity of each
  tensor the method touches, and the fraction of MLP FLOPs a kernel could skip
  (``flops.py``: the one axis on which input, gate and x1 sparsity compare).
- ``sparsing_law``: the activation ratio at PPL-p% along a zoo model's training
  checkpoints (Luo et al. 2024, "Sparsing Law": ReLU models grow sparser with training
  tokens, SiLU models do not, or less).
"""

from __future__ import annotations

import math

from torch import Tensor

from ..data import check_disjoint
from ..evals import bootstrap_ratio_ci, sequence_losses
from .flops import flops_skipped
from .methods import get_method
from .mlp import describe_mlps
from .ppl import PPLSearch

METHODS = ("cats", "topk", "fat", "teal", "chess", "wina", "cett")
TARGETS = (0.5, 0.7, 0.8, 0.9)
"""Fractions of entries dropped; the ``cett`` method takes CETT values instead (CETT_TARGETS)."""
CETT_TARGETS = (0.05, 0.1, 0.2, 0.3)


def sparsity_performance(model, tokens: Tensor, calibration: Tensor, methods=METHODS, targets=TARGETS,
                         cett_targets=CETT_TARGETS, model_name: str = "", progress: bool = True) -> list[dict]:
    """One row per (method, target), measured on held-out ``tokens`` with thresholds calibrated
    on ``calibration`` (both [n_seq, seq_len]; they must share no sequence): the realised
    sparsity of the MLP input, gate and x1 (mean over layers; None where the method leaves
    that tensor dense), the fraction of MLP FLOPs skipped, and the perplexity ratio to the
    dense model with its 95% bootstrap interval over sequences."""
    from tqdm.auto import tqdm

    check_disjoint(calibration, tokens)
    sites = describe_mlps(model)
    dense = sequence_losses(model, tokens)
    per_sequence = tokens.shape[1] - 1
    n_tokens = tokens.shape[0] * per_sequence
    todo = [(name, target) for name in methods for target in (cett_targets if name == "cett" else targets)]
    rows = []
    for name, target in tqdm(todo, desc=f"methods × targets {model_name}".strip(), disable=not progress):
        method = get_method(name, max_tokens=calibration.numel())
        thresholds = method.fit((model, calibration), target)
        with method.apply(model, thresholds) as meter:
            sparse = sequence_losses(model, tokens)
        realised = meter.sparsity()
        by_tensor = {where: [v for k, v in realised.items() if k.endswith(f".{where}")] for where in ("input", "gate", "x1")}
        low, high = bootstrap_ratio_ci(dense, sparse, per_sequence)
        rows.append({"model": model_name, "method": name, "target": target,
                     **{f"{where}_sparsity": (sum(v) / len(v) if v else None) for where, v in by_tensor.items()},
                     "flops_skipped": flops_skipped(sites, realised),
                     "ppl_ratio": math.exp(float(sparse.sum() - dense.sum()) / n_tokens), "ppl_ci_low": low, "ppl_ci_high": high})
    return rows


def training_points(name: str) -> list[tuple[int, object]]:
    """(tokens seen, checkpoint path) along zoo model ``name``'s training, ending with its
    shipped weights (path None) when the last checkpoint is not shipped."""
    from ..models import model_card, zoo_checkpoints

    points: list = zoo_checkpoints(name)
    if not points:
        raise FileNotFoundError(f"{name} has no training checkpoints; train it with `python -m workbench.zoo train {name}`")
    final = model_card(name).tokens_seen
    if points[-1][0] < final:
        points.append((final, None))
    return points


def sparsing_law(name: str, tokens: Tensor, calibration: Tensor, p: float = 0.01, device=None, progress: bool = True,
                 **search) -> list[dict]:
    """Activation ratio at PPL-p% for each shipped training checkpoint of zoo model ``name``
    (and the final model), in training order: searched on ``calibration``, measured on the
    held-out ``tokens``."""
    from ..models import load_model

    from tqdm.auto import tqdm

    check_disjoint(calibration, tokens)
    rows = []
    for tokens_seen, path in tqdm(training_points(name), desc=f"Sparsing Law {name}", disable=not progress):
        searcher = PPLSearch(load_model(name, device=device, checkpoint=path), calibration, **search)
        result = searcher.score(searcher.solve(p), tokens)
        rows.append({"model": name, "tokens_seen": tokens_seen, "activation_ratio": result.activation_ratio,
                     "cett": result.cett, "search_ppl_ratio": result.search_ppl_ratio, "ppl_ratio": result.ppl_ratio,
                     "ppl_ci_low": result.ppl_ratio_ci[0], "ppl_ci_high": result.ppl_ratio_ci[1], "dense_loss": result.dense_loss})
    return rows


def plot_sparsity_performance(rows: list[dict], width: str | float = "double"):
    """Perplexity ratio (log scale, 95% bootstrap intervals) vs the fraction of MLP FLOPs
    skipped, one panel per model, one line per method."""
    from ..figures import paper_figure, paper_style

    models = list(dict.fromkeys(r["model"] for r in rows))
    with paper_style():
        fig, axes = paper_figure(width, aspect=0.36, ncols=len(models), squeeze=False, sharey=True)
        for ax, model in zip(axes[0], models):
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = sorted((r for r in rows if r["model"] == model and r["method"] == method), key=lambda r: r["flops_skipped"])
                x, y = [r["flops_skipped"] for r in mine], [r["ppl_ratio"] for r in mine]
                errors = [[v - r["ppl_ci_low"] for v, r in zip(y, mine)], [r["ppl_ci_high"] - v for v, r in zip(y, mine)]]
                ax.errorbar(x, y, yerr=errors, marker="o", markersize=3, capsize=1.5, label=method)
            ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set(xlabel="fraction of MLP FLOPs skipped", title=model)
        axes[0][0].set_ylabel("perplexity ratio (sparse / dense)")
        axes[0][-1].legend(fontsize="small")
        fig.tight_layout()
    return fig


def plot_sparsing_law(rows: list[dict], p: float = 0.01, width: str | float = "single"):
    """Activation ratio at PPL-p% vs training tokens, one line per model."""
    from ..figures import paper_figure, paper_style

    with paper_style():
        fig, ax = paper_figure(width)
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["tokens_seen"])
            ax.plot([r["tokens_seen"] / 1e6 for r in mine], [r["activation_ratio"] for r in mine], marker="o", label=model)
        ax.set(xlabel="training tokens (millions)", ylabel=f"activation ratio at PPL-{p:.0%}")
        ax.legend()
        fig.tight_layout()
    return fig
