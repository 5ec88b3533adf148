"""Sparsity–performance curves and the Sparsing-Law trend, as tables and paper figures.

- ``sparsity_performance``: for each training-free method and target, calibrate on one set
  of tokens, sparsify, and measure the perplexity ratio to the dense model and the
  activation ratio (1 − realised sparsity at the method's sites) on held-out tokens.
- ``sparsing_law``: the activation ratio at PPL-p% along a zoo model's training
  checkpoints (Luo et al. 2024, "Sparsing Law": ReLU models grow sparser with training
  tokens, SiLU models do not, or less).
"""

from __future__ import annotations

import math

from torch import Tensor

from ..evals import model_loss
from .methods import get_method
from .ppl import ppl_p_sparsity

METHODS = ("cats", "topk", "fat", "teal", "chess", "wina", "cett")
TARGETS = (0.5, 0.7, 0.8, 0.9)
"""Fractions of entries dropped; the ``cett`` method takes CETT values instead (CETT_TARGETS)."""
CETT_TARGETS = (0.05, 0.1, 0.2, 0.3)


def sparsity_performance(model, tokens: Tensor, calibration: Tensor, methods=METHODS, targets=TARGETS,
                         cett_targets=CETT_TARGETS, model_name: str = "") -> list[dict]:
    """One row per (method, target): activation ratio and perplexity ratio on ``tokens``,
    thresholds calibrated on ``calibration`` (both [n_seq, seq_len], disjoint)."""
    dense = model_loss(model, tokens)
    rows = []
    for name in methods:
        method = get_method(name, max_tokens=calibration.numel())
        for target in cett_targets if name == "cett" else targets:
            thresholds = method.fit((model, calibration), target)
            with method.apply(model, thresholds) as meter:
                loss = model_loss(model, tokens)
            rows.append({"model": model_name, "method": name, "target": target, "activation_ratio": 1 - meter.mean,
                         "ppl_ratio": math.exp(loss - dense)})
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


def sparsing_law(name: str, tokens: Tensor, p: float = 0.01, device=None, **search) -> list[dict]:
    """Activation ratio at PPL-p% for each shipped training checkpoint of zoo model ``name``
    (and the final model), in training order."""
    from ..models import load_model

    rows = []
    for tokens_seen, path in training_points(name):
        result = ppl_p_sparsity(load_model(name, device=device, checkpoint=path), tokens, p=p, **search)
        rows.append({"model": name, "tokens_seen": tokens_seen, "activation_ratio": result.activation_ratio,
                     "cett": result.cett, "ppl_ratio": result.ppl_ratio, "dense_loss": result.dense_loss})
    return rows


def plot_sparsity_performance(rows: list[dict], width: str | float = "double"):
    """Perplexity ratio vs activation ratio, one panel per model, one line per method."""
    from ..figures import paper_figure, paper_style

    models = list(dict.fromkeys(r["model"] for r in rows))
    with paper_style():
        fig, axes = paper_figure(width, aspect=0.36, ncols=len(models), squeeze=False, sharey=True)
        for ax, model in zip(axes[0], models):
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = sorted((r for r in rows if r["model"] == model and r["method"] == method), key=lambda r: r["activation_ratio"])
                ax.plot([r["activation_ratio"] for r in mine], [r["ppl_ratio"] for r in mine], marker="o", markersize=3, label=method)
            ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
            ax.set(xlabel="activation ratio", title=model)
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
