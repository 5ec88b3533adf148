"""A precomputed grid of sparsity–performance points, for the sparsity explorer widget.

``explore_grid`` measures every (model, method, layer choice, target) once, so a widget can
move along a curve without running the model again (DESIGN.md, "Widgets": the view is thin,
this data function is what is tested). Each point is calibrated on ``calibration`` and
measured on disjoint held-out ``tokens``, exactly as ``curves.sparsity_performance`` does:
the perplexity ratio to the dense model with its 95% bootstrap interval over sequences, the
realised sparsity of every site, each layer's activation ratio, and the fraction of MLP
FLOPs a kernel could skip (``flops.py``).

Layer choices:

- ``"all"``: every layer sparsified together, fitted the default way (sequentially, each
  layer calibrated with the layers before it already sparsified, so the target holds with
  all of them applied);
- a layer ℓ: only ℓ sparsified. One fit per target on *dense* activations
  (``sequential=False``, right for one layer alone), reused for every ℓ through
  ``thresholds.select([ℓ])``: one fit instead of one per layer. Top-k methods keep k per
  token whatever their input, so their "all" fit is reused as is.

The ``cett`` method's target is a CETT value (the share of the MLP output norm dropped), not
a fraction of entries: it gets its own grid (``CETT_TARGETS``) and the label "target CETT".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..data import check_disjoint
from ..evals import bootstrap_ratio_ci, sequence_losses
from ..paths import atomic_write_text
from .flops import flops_skipped
from .lazy import lazy_neuron_stats
from .methods import get_method
from .mlp import describe_mlps

METHODS = ("cats", "topk", "teal", "wina", "cett")
TARGETS = (0.3, 0.5, 0.7, 0.9)
"""Fractions of entries dropped, for every method but ``cett``. Four targets, so three zoo
models × five methods × (all + 4 layers) take ≈ 2.5 min on two CPU cores (32 held-out and 16
calibration sequences of 128 tokens)."""
CETT_TARGETS = (0.05, 0.1, 0.2, 0.3)
"""CETT values for the ``cett`` method (as ``curves.CETT_TARGETS``)."""
FORMAT_VERSION = 1


def target_kind(method: str) -> str:
    """What a method's target means: ``"cett"`` for the CETT method, else ``"sparsity"``."""
    return "cett" if method == "cett" else "sparsity"


def target_label(method: str) -> str:
    return "target CETT" if target_kind(method) == "cett" else "target sparsity"


def layer_label(layer) -> str:
    return "all layers" if layer == "all" else f"layer {layer}"


def _layer_choices(layers, n_layers: int) -> list:
    """``"all+each"`` → ["all", 0, …, n−1]; ``"all"``; ``"each"``; or an explicit list."""
    if isinstance(layers, str):
        named = {"all+each": ["all", *range(n_layers)], "all": ["all"], "each": list(range(n_layers))}
        if layers not in named:
            raise ValueError(f"layers must be 'all+each', 'all', 'each' or a list of 'all' and layer indices, got {layers!r}")
        return named[layers]
    choices = ["all" if layer == "all" else int(layer) for layer in layers]
    bad = [c for c in choices if c != "all" and not 0 <= c < n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n_layers} MLP layers")
    return choices


@dataclass
class SparsityGrid:
    """Flat rows, one per (model, method, layer, target), plus per-model dense numbers.

    A row: model, method, layer ("all" or an int), target, target_kind, ppl_ratio, ppl_ci_low,
    ppl_ci_high, flops_skipped, realised (site key → sparsity), activation_ratio (per layer;
    None for a layer left dense) and mean_activation_ratio (over the sparsified layers).
    ``info[model]``: n_layers, gated, act_fn, dense_loss (nats/token) and
    dense_activation_ratio (per layer: fraction of x1 entries nonzero in the dense model).
    """

    rows: list[dict]
    info: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self._index = {(r["model"], r["method"], r["layer"], r["target"]): r for r in self.rows}

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def layers(self, model: str) -> list:
        return list(dict.fromkeys(r["layer"] for r in self.rows if r["model"] == model))

    def targets(self, method: str) -> list[float]:
        return sorted({r["target"] for r in self.rows if r["method"] == method})

    def point(self, model: str, method: str, layer, target: float) -> dict:
        """The grid point itself (no interpolation): ``target`` must be one of ``targets(method)``."""
        row = self._index.get((model, method, layer, target))
        if row is None:  # tolerate float noise (0.1 + 0.2), never a different grid point
            row = next((r for (m, me, la, t), r in self._index.items()
                        if (m, me, la) == (model, method, layer) and math.isclose(t, target, rel_tol=1e-9, abs_tol=1e-12)), None)
        if row is None:
            raise KeyError(f"no grid point for model={model!r}, method={method!r}, layer={layer!r}, target={target!r}; "
                           f"models {self.models}, methods {self.methods}, layers {self.layers(model)}, "
                           f"targets {self.targets(method)}")
        return row

    def curve(self, model: str, method: str, layer) -> list[dict]:
        """The points of one (model, method, layer choice), in target order."""
        rows = [r for r in self.rows if (r["model"], r["method"], r["layer"]) == (model, method, layer)]
        if not rows:
            raise KeyError(f"no curve for model={model!r}, method={method!r}, layer={layer!r}")
        return sorted(rows, key=lambda r: r["target"])

    # --- JSON (never pickle: a grid may be shared) --------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": "workbench.sparsity_grid", "version": FORMAT_VERSION,
                           "meta": self.meta, "info": self.info, "rows": self.rows}, allow_nan=False)

    def save(self, path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path) -> "SparsityGrid":
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != "workbench.sparsity_grid" or payload.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a sparsity grid of format version {FORMAT_VERSION}: rebuild it with explore_grid")
        return cls(payload["rows"], payload["info"], payload["meta"])


def _fit(method, model, calibration: Tensor, target: float, choices: list, n_layers: int) -> dict:
    """Thresholds for the layer choices: ``"all"`` by the default fit (sequential for several
    layers), ``"each"`` on dense activations (one fit serves every single layer)."""
    fitted = {}
    if "all" in choices:
        fitted["all"] = method.fit((model, calibration), target)
    if any(choice != "all" for choice in choices):
        # top-k methods keep k per token whatever their input, and one layer has no order to
        # respect: there the default fit already is the dense one
        same = "all" in fitted and (method.topk or n_layers == 1)
        fitted["each"] = fitted["all"] if same else method.fit((model, calibration), target, sequential=False)
    return fitted


def _measure(model, sites, method, thresholds, tokens: Tensor, dense: Tensor) -> dict:
    """Apply ``thresholds`` and score the held-out tokens against the dense losses."""
    with method.apply(model, thresholds) as meter:
        sparse = sequence_losses(model, tokens)
    realised = meter.sparsity()
    per_sequence = tokens.shape[1] - 1
    low, high = bootstrap_ratio_ci(dense, sparse, per_sequence)
    by_layer: dict[int, list[float]] = {}
    for key, value in realised.items():
        by_layer.setdefault(int(key.split(".")[1]), []).append(value)
    # 1 − the layer's mean sparsity over its sites; None where the method left the layer dense
    ratios = [1.0 - sum(by_layer[s.layer]) / len(by_layer[s.layer]) if s.layer in by_layer else None for s in sites]
    touched = [r for r in ratios if r is not None]
    return {"ppl_ratio": math.exp(float(sparse.sum() - dense.sum()) / (tokens.shape[0] * per_sequence)),
            "ppl_ci_low": low, "ppl_ci_high": high, "flops_skipped": flops_skipped(sites, realised),
            "realised": realised, "activation_ratio": ratios,
            "mean_activation_ratio": sum(touched) / len(touched) if touched else 1.0}


@torch.no_grad()
def explore_grid(models: dict, tokens: Tensor, calibration: Tensor, methods=METHODS, targets=TARGETS,
                 cett_targets=CETT_TARGETS, layers="all+each", progress: bool = True) -> SparsityGrid:
    """Measure every model × method × layer choice × target (see the module docstring).

    ``models``: name → HookedTransformer. ``tokens`` (held out) and ``calibration`` are
    [n_seq, seq_len] and must share no sequence. ``layers``: "all+each" (every layer together,
    then each alone), "all", "each", or a list of "all" and layer indices.
    """
    from tqdm.auto import tqdm

    check_disjoint(calibration, tokens)
    plan = {name: _layer_choices(layers, len(describe_mlps(model))) for name, model in models.items()}
    grid_of = {m: tuple(cett_targets if target_kind(m) == "cett" else targets) for m in methods}
    total = sum(len(plan[name]) * len(grid_of[m]) for name in models for m in methods)
    rows, info = [], {}
    start = time.perf_counter()
    with tqdm(total=total, desc="sparsity grid", unit="point", disable=not progress) as bar:
        for name, model in models.items():
            sites = describe_mlps(model)
            dense = sequence_losses(model, tokens)
            lazy = lazy_neuron_stats((model, tokens))
            info[name] = {"n_layers": len(sites), "gated": bool(model.cfg.gated_mlp), "act_fn": str(model.cfg.act_fn),
                          "dense_loss": float(dense.sum()) / (tokens.shape[0] * (tokens.shape[1] - 1)),
                          "dense_activation_ratio": [s.nonzero_fraction for s in lazy]}
            for method_name in methods:
                method = get_method(method_name, max_tokens=calibration.numel())
                for target in grid_of[method_name]:
                    bar.set_postfix_str(f"{name} {method_name} {target:g}", refresh=False)
                    fitted = _fit(method, model, calibration, target, plan[name], len(sites))
                    for layer in plan[name]:
                        thresholds = fitted["all"] if layer == "all" else fitted["each"].select([layer])
                        rows.append({"model": name, "method": method_name, "layer": layer, "target": float(target),
                                     "target_kind": target_kind(method_name),
                                     **_measure(model, sites, method, thresholds, tokens, dense)})
                        bar.update()
    meta = {"n_tokens": int(tokens.numel()), "n_sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "n_calibration_tokens": int(calibration.numel()), "seconds": round(time.perf_counter() - start, 2)}
    return SparsityGrid(rows, info, meta)


def plot_selection(grid: SparsityGrid, model: str, method: str, layer, target: float, width: str | float = "double"):
    """Paper figure of one selection. Left: perplexity ratio (log, 95% intervals) vs fraction
    of MLP FLOPs skipped along the (model, method, layer) curve, the current point marked.
    Right: each layer's activation ratio at that point beside the dense model's."""
    from ..figures import OKABE_ITO, paper_figure, paper_style

    current = grid.point(model, method, layer, target)
    curve = grid.curve(model, method, layer)
    with paper_style():
        fig, (left, right) = paper_figure(width, aspect=0.36, ncols=2, gridspec_kw={"width_ratios": [1.35, 1]})
        x = [r["flops_skipped"] for r in curve]
        y = [r["ppl_ratio"] for r in curve]
        yerr = [[r["ppl_ratio"] - r["ppl_ci_low"] for r in curve], [r["ppl_ci_high"] - r["ppl_ratio"] for r in curve]]
        left.errorbar(x, y, yerr=yerr, marker="o", markersize=3, capsize=1.5, color=OKABE_ITO[0], label=method)
        left.errorbar([current["flops_skipped"]], [current["ppl_ratio"]],
                      yerr=[[current["ppl_ratio"] - current["ppl_ci_low"]], [current["ppl_ci_high"] - current["ppl_ratio"]]],
                      marker="o", markersize=7, capsize=2.5, color=OKABE_ITO[3], zorder=5,
                      label=f"current: {target_label(method).removeprefix('target ')} {target:g}")
        left.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        left.set_yscale("log")
        _plain_log_ticks(left, [r["ppl_ci_low"] for r in curve] + [1.0], [r["ppl_ci_high"] for r in curve] + [1.0])
        left.set(xlabel="fraction of MLP FLOPs skipped", ylabel="perplexity ratio (sparse / dense)",
                 title=f"{model}: {method}, {layer_label(layer)}")
        left.legend(loc="best")

        ratios = current["activation_ratio"]
        dense = grid.info.get(model, {}).get("dense_activation_ratio")
        index = list(range(len(ratios)))
        bar_width = 0.4 if dense else 0.7
        if dense:
            right.bar([i - bar_width / 2 for i in index], dense, bar_width, color="0.75", label="dense (x1 ≠ 0)")
        shift = bar_width / 2 if dense else 0.0
        right.bar([i + shift for i, r in zip(index, ratios) if r is not None], [r for r in ratios if r is not None],
                  bar_width, color=OKABE_ITO[3], label=method)
        right.set_xticks(index, [f"{i}" if r is not None else f"{i}\n(dense)" for i, r in zip(index, ratios)])
        right.set_ylim(0, 1.3)  # headroom above 1 for the legend, so it never covers a bar
        right.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        right.set(xlabel="layer", ylabel="activation ratio", title=f"per layer, {target_label(method)} {target:g}")
        right.legend(loc="upper center", ncol=2)
        fig.tight_layout()
    return fig


def _plain_log_ticks(ax, lows: list[float], highs: list[float]) -> None:
    """Ticks a reader can read on a log axis: plain numbers (1.02, not 1.02×10⁰), evenly
    spaced ones when the range is under a decade or so (the usual case: ratios near 1),
    matplotlib's decades otherwise."""
    from matplotlib import ticker

    low, high = min(lows), max(highs)
    if low > 0 and high / low < 20:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
