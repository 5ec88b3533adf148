"""The activation-sparsity study over the zoo, as tables (lists of dicts) and figures.

What the CLI (``python -m workbench sparsity``), notebook 04 and the demo print:

1. lazy neurons per model and layer (Li et al. 2022), and along training checkpoints;
2. PPL-p% sparsity per model (Luo et al. 2024) for p = 1%, 5%, 10%;
3. sparsity–performance curves of every training-free method (``curves``);
4. the Sparsing-Law trend: activation ratio at PPL-1% vs training tokens (``curves``);
5. ProSparse fine-tuning: sparsity gained and perplexity cost (``workbench.sparsity.prosparse``).
"""

from __future__ import annotations

from torch import Tensor

from .lazy import lazy_neuron_stats
from .ppl import PPLSearch

PS = (0.01, 0.05, 0.1)


LAZY_COLUMNS = {"nonzero_fraction": "nonzero", "positive_pre_fraction": "pre > 0", "dead_fraction": "dead",
                "always_on_fraction": "always on"}


def lazy_table(models: dict, tokens: Tensor, eps: float = 1e-2, compact: bool = True, progress: bool = True) -> list[dict]:
    """One row per (model, layer): Li et al.'s nonzero fraction, the positive-pre-activation
    fraction, dead and always-on neurons (``compact``, formatted to read; ``compact=False``:
    every statistic, e.g. the |h| < eps fraction, as floats). ``models``: name → model."""
    from tqdm.auto import tqdm

    rows = []
    for name, model in tqdm(models.items(), desc="lazy neurons", disable=not progress):
        for stats in lazy_neuron_stats((model, tokens), eps=eps):
            row = stats.table()
            rows.append({"model": name, "layer": row["layer"], **{short: f"{row[key]:.3f}" for key, short in LAZY_COLUMNS.items()}}
                        if compact else {"model": name, **row})
    return rows


def lazy_over_training(name: str, tokens: Tensor, eps: float = 1e-2, device=None) -> list[dict]:
    """Mean (over layers) nonzero and positive-pre-activation fractions at each training
    checkpoint of zoo model ``name`` and its final weights: the emergence of sparsity."""
    from ..models import load_model
    from .curves import training_points

    rows = []
    for tokens_seen, path in training_points(name):
        stats = lazy_neuron_stats((load_model(name, device=device, checkpoint=path), tokens), eps=eps)
        rows.append({"model": name, "tokens_seen": tokens_seen,
                     "nonzero_fraction": sum(s.nonzero_fraction for s in stats) / len(stats),
                     "positive_pre_fraction": sum(s.positive_pre_fraction for s in stats) / len(stats),
                     "dead_fraction": sum(len(s.dead) for s in stats) / sum(s.d_mlp for s in stats)})
    return rows


def ppl_table(models: dict, tokens: Tensor, calibration: Tensor, ps=PS, progress: bool = True, **search) -> list[dict]:
    """One row per (model, p): the global CETT searched on ``calibration``, the perplexity
    ratio there and on the held-out ``tokens`` (with its 95% bootstrap interval), the
    held-out activation ratio overall and per layer, and what the search cost (passes over
    the calibration tokens, seconds)."""
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(models) * len(ps), desc="PPL-p% searches", disable=not progress)
    for name, model in models.items():
        searcher = PPLSearch(model, calibration, **search)
        for p in ps:
            bar.update()
            result = searcher.score(searcher.solve(p), tokens)
            rows.append({"model": name, "p": p, "cett": result.cett, "search_ppl_ratio": result.search_ppl_ratio,
                         "ppl_ratio": result.ppl_ratio, "ppl_ci": f"[{result.ppl_ratio_ci[0]:.4f}, {result.ppl_ratio_ci[1]:.4f}]",
                         "activation_ratio": result.activation_ratio,
                         "layer_activation_ratio": [round(r, 4) for r in result.layer_activation_ratio],
                         "passes": result.passes, "seconds": result.seconds})
    bar.close()
    return rows


def plot_lazy_over_training(rows: list[dict], width: str | float = "single"):
    """Nonzero (ReLU) / positive-pre-activation fraction vs training tokens, one line per model."""
    from ..figures import paper_figure, paper_style

    with paper_style():
        fig, ax = paper_figure(width)
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["tokens_seen"])
            ax.plot([r["tokens_seen"] / 1e6 for r in mine], [r["positive_pre_fraction"] for r in mine], marker="o", label=model)
        ax.set(xlabel="training tokens (millions)", ylabel="fraction of positive pre-activations")
        ax.legend()
        fig.tight_layout()
    return fig


STUDY_PARTS = ("lazy", "ppl", "curves", "law", "prosparse")


def run_study(names: list[str], parts=STUDY_PARTS, eval_tokens: int = 32_768, calibration_tokens: int = 16_384,
              ps=PS, methods=None, targets=None, out_dir=None, say=print) -> dict[str, list[dict]]:
    """The whole study on zoo models ``names``: each part's table printed with ``say`` and
    its figure saved to ``out_dir``. Calibration tokens (thresholds, the PPL-p% search) and
    evaluation tokens (every reported number) are disjoint slices of the validation split,
    checked by ``check_disjoint``. Returns the tables by part."""
    from ..data import check_disjoint, load_tokens
    from ..figures import save_figure
    from ..models import load_model
    from ..tables import markdown_table
    from . import curves

    unknown = [p for p in parts if p not in STUDY_PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {STUDY_PARTS}")
    val = load_tokens("stdlib", "val")
    seq = val.shape[1]
    evaluation = val[: max(1, eval_tokens // seq)]
    calibration = val[evaluation.shape[0]: evaluation.shape[0] + max(1, calibration_tokens // seq)]
    check_disjoint(calibration, evaluation)
    models = {name: load_model(name) for name in names}
    tables: dict[str, list[dict]] = {}
    if "lazy" in parts:
        tables["lazy"] = lazy_table(models, evaluation)
        say("lazy neurons (Li et al. 2022), per layer", markdown_table(tables["lazy"]))
    if "ppl" in parts:
        tables["ppl"] = ppl_table(models, evaluation, calibration, ps=ps)
        say("PPL-p% sparsity (Luo et al. 2024): one global CETT searched on the calibration tokens, all layers "
            "masked together; ratios on held-out tokens",
            markdown_table(tables["ppl"]))
    if "curves" in parts:
        rows = []
        for name, model in models.items():
            rows += curves.sparsity_performance(model, evaluation, calibration, model_name=name,
                                                **({"methods": methods} if methods else {}),
                                                **({"targets": targets} if targets else {}))
        tables["curves"] = rows
        say("training-free methods on held-out tokens: perplexity ratio vs MLP FLOPs skipped", markdown_table(rows))
        paths = save_figure(curves.plot_sparsity_performance(rows), "sparsity_performance", out_dir=out_dir)
        say("figure", ", ".join(str(p) for p in paths))
    if "law" in parts:
        from ..models import zoo_checkpoints

        rows, lazy_rows = [], []
        with_checkpoints = [name for name in names if zoo_checkpoints(name)]
        if len(with_checkpoints) < len(names):
            say("Sparsing Law", f"skipped {sorted(set(names) - set(with_checkpoints))}: no training checkpoints "
                                "(shipped for stdlib-relu and stdlib-swiglu; `python -m workbench.zoo train NAME` makes them)")
        for name in with_checkpoints:
            rows += curves.sparsing_law(name, evaluation, calibration, p=ps[0])
            lazy_rows += lazy_over_training(name, evaluation)
        tables["law"], tables["lazy_training"] = rows, lazy_rows
        say(f"Sparsing Law: activation ratio at PPL-{ps[0]:.0%} along training", markdown_table(rows))
        say("lazy neurons along training", markdown_table(lazy_rows))
        paths = save_figure(curves.plot_sparsing_law(rows, p=ps[0]), "sparsing_law", out_dir=out_dir)
        paths += save_figure(plot_lazy_over_training(lazy_rows), "lazy_over_training", out_dir=out_dir)
        say("figures", ", ".join(str(p) for p in paths))
    if "prosparse" in parts:
        from .prosparse import ProSparseConfig, prosparse

        rows = []
        for name in names:
            result = prosparse(name, ProSparseConfig(fatrelu_threshold=0.01), progress=False)
            rows += [{"base": name, **row} for row in result.table()]
        tables["prosparse"] = rows
        say("ProSparse (Song et al. 2024): ReLU swap, L1 on x1 rising along sine stages, FATReLU",
            markdown_table(rows))
    return tables
