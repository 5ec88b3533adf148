"""Compare trained SAEs side by side: one table row each, and the paper's two panels
(FVU vs L0, spliced-in CE loss vs L0)."""

from __future__ import annotations

import itertools

from ..evals import check_splice, downstream_metrics, reconstruction_metrics
from ..tables import markdown_table
from .base import did_you_mean


def compare_saes(saes: list, cache, model=None, tokens=None, n_batches: int = 8, batch_size: int = 4096,
                 progress: bool = True) -> list[dict]:
    """Reconstruction metrics of each SAE on ``n_batches`` of its hook in ``cache`` and, when
    ``model`` and ``tokens`` are given, the CE loss with it spliced in (and KL). A transcoder
    is scored on predicting its target hook (also in the cache) and spliced in its place.

    Every SAE is checked against the cache (and the model) before any is evaluated, so a
    mismatched one fails at once, not after the others' evaluations."""
    from tqdm.auto import tqdm

    if (model is None) != (tokens is None):
        raise ValueError("pass both model and tokens to measure the spliced-in CE loss, or neither")
    for i, sae in enumerate(saes):
        hook, name = sae.cfg.hook_name, f"SAE {i} ({sae.architecture}, d_in={sae.cfg.d_in})"
        if hook not in cache.hooks:
            recorded = f"was trained on {hook!r}, which" if hook else "records no hook_name, so it"
            raise ValueError(f"{name} {recorded} is not in this cache.{did_you_mean(hook, cache.hooks)} "
                             f"The cache has {cache.hooks}.")
        if cache.d(hook) != sae.cfg.d_in:
            raise ValueError(f"{name} reads {sae.cfg.d_in} values per row, but the cache holds {cache.d(hook)} for "
                             f"{hook!r}: the SAE was trained on another model or hook.")
        if sae.is_transcoder and sae.cfg.target_hook not in cache.hooks:
            raise ValueError(f"{name} is a transcoder to {sae.cfg.target_hook!r}, which is not in this cache (it has "
                             f"{cache.hooks}): cache its input and target hooks together")
        if model is not None:
            check_splice(model, sae, None, tokens)
    rows = []
    for sae in tqdm(saes, desc="evaluate SAEs", disable=not progress):
        hook = sae.cfg.hook_name
        batches = list(itertools.islice(cache.batches(hook, batch_size, seed=999, with_grads=sae.architecture == "gradient",
                                                      target_hook=sae.cfg.target_hook or None), n_batches))
        metrics = reconstruction_metrics(sae, batches)
        shown = f"{hook} → {sae.cfg.target_hook}" if sae.is_transcoder else hook
        row = {"architecture": sae.architecture, "k": sae.cfg.k if sae.uses_k else "—", "d_sae": sae.cfg.d_sae, "hook": shown,
               "fvu": metrics.fvu, "l0": metrics.l0, "dead_fraction": metrics.dead_fraction}
        if model is not None and tokens is not None:
            downstream = downstream_metrics(model, sae, tokens)
            row.update(ce_clean=downstream.ce_clean, ce_spliced=downstream.ce_spliced, kl=downstream.kl,
                       ce_recovered_vs_zero=downstream.ce_recovered_vs_zero)
        rows.append(row)
    return rows


def comparison_table(rows: list[dict]) -> str:
    """Markdown table of ``compare_saes`` rows."""
    shown = ("architecture", "hook", "k", "d_sae", "l0", "fvu", "dead_fraction", "ce_spliced", "ce_recovered_vs_zero", "kl")
    one_hook = len({row.get("hook") for row in rows}) == 1  # a column only where the hooks differ
    keys = [k for k in shown if k in rows[0] and not (k == "hook" and one_hook)]
    return markdown_table(rows, keys)


def plot_comparison(rows: list[dict], width: str | float = "double"):
    """FVU vs L0 and (when measured) spliced-in CE loss vs L0, one marker per architecture."""
    from ..figures import paper_figure, paper_style

    panels = 2 if "ce_spliced" in rows[0] else 1
    fig, axes = paper_figure(width, aspect=0.38, ncols=panels, squeeze=False)
    axes = axes[0]
    with paper_style():
        for arch in dict.fromkeys(row["architecture"] for row in rows):
            mine = sorted((r for r in rows if r["architecture"] == arch), key=lambda r: r["l0"])
            axes[0].plot([r["l0"] for r in mine], [r["fvu"] for r in mine], marker="o", label=arch)
            if panels == 2:
                axes[1].plot([r["l0"] for r in mine], [r["ce_spliced"] for r in mine], marker="o", label=arch)
        axes[0].set(xlabel="L0 (active latents per token)", ylabel="FVU", title="reconstruction")
        if panels == 2:
            axes[1].axhline(rows[0]["ce_clean"], color="0.4", linestyle="--", linewidth=0.8, label="clean model")
            axes[1].set(xlabel="L0 (active latents per token)", ylabel="CE loss, SAE spliced in (nats)", title="downstream")
        # Beside the panels, not on them: with eight or more architectures it covered points.
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
    return fig
