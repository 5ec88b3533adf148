"""Cost of one PPL-p% search: workbench's against the naive search, on the zoo models.

    .venv/bin/python benchmarks/bench_sparsity.py

Both find the global CETT c whose perplexity ratio is 1 + p (p = 1%, within ±0.05 pp) on
the same search tokens (calibration), with thresholds from the first 4,096 of them; the c
found is then scored once on disjoint held-out tokens (perplexity ratio with a 95%
bootstrap interval over sequences, activation ratio), which is what a paper should quote.

- naive: bisection on c; every step fits each layer's threshold by its own bisection on
  CETT (the library's ``CETT`` method: one bisection per layer per step) and runs one full
  evaluation of the sparsified model;
- workbench (``PPLSearch``): each layer's CETT curve once, thresholds interpolated on it,
  and four settings (the dense reference included) scored per pass over the search
  tokens, placed by regula falsi.

Reported: forward passes over the search tokens, settings evaluated, seconds (search
only), and what was found. Results go to the ``bench_sparsity`` section of RESULTS.md.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, table, write_section  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.data import check_disjoint  # noqa: E402
from workbench.evals import bootstrap_ratio_ci, model_loss, sequence_losses  # noqa: E402
from workbench.sparsity import get_method  # noqa: E402
from workbench.sparsity.ppl import DEFAULT_TOLERANCE, PPLSearch  # noqa: E402

MODELS = ("stdlib-relu", "stdlib-gelu", "stdlib-swiglu")
P, SEQUENCES, THRESHOLD_TOKENS = 0.01, 128, 4096  # search and held-out sets: 128 sequences each


def naive(model, search, p: float) -> dict:
    started = time.perf_counter()
    method = get_method("cett", max_tokens=THRESHOLD_TOKENS)
    calibration = search[: THRESHOLD_TOKENS // search.shape[1]]
    dense = model_loss(model, search)
    passes, lo, hi = 1, 0.0, 1.0
    best = None
    for _ in range(40):
        c = (lo + hi) / 2
        thresholds = method.fit((model, calibration), c, sequential=False)  # a bisection per layer, every step
        with method.apply(model, thresholds):
            ratio = math.exp(model_loss(model, search) - dense)
        passes += 1
        best = (c, ratio, thresholds)
        if abs(ratio - (1 + p)) <= DEFAULT_TOLERANCE:
            break
        lo, hi = (c, hi) if ratio < 1 + p else (lo, c)
    return {"search": "naive", "passes": passes, "settings": passes, "seconds": time.perf_counter() - started,
            "cett": best[0], "search_ratio": best[1], "thresholds": best[2]}


def naive_held_out(model, thresholds, held_out) -> tuple[float, tuple[float, float], float]:
    dense = sequence_losses(model, held_out)
    with get_method("cett").apply(model, thresholds) as meter:
        sparse = sequence_losses(model, held_out)
    n = held_out.shape[0] * (held_out.shape[1] - 1)
    return math.exp(float(sparse.sum() - dense.sum()) / n), bootstrap_ratio_ci(dense, sparse, held_out.shape[1] - 1), 1 - meter.mean


def ours(model, search, held_out, p: float) -> dict:
    started = time.perf_counter()
    searcher = PPLSearch(model, search, threshold_tokens=THRESHOLD_TOKENS)
    result = searcher.solve(p)
    seconds = time.perf_counter() - started
    scored = searcher.score(result, held_out)
    return {"search": "workbench", "passes": result.passes, "settings": result.settings_evaluated, "seconds": seconds,
            "cett": result.cett, "search_ratio": result.search_ppl_ratio, "held_out_ratio": scored.ppl_ratio,
            "ci": scored.ppl_ratio_ci, "activation_ratio": scored.activation_ratio}


def main() -> None:
    torch.manual_seed(0)
    val = wb.load_tokens("stdlib", "val")
    search, held_out = val[:SEQUENCES], val[SEQUENCES:2 * SEQUENCES]
    check_disjoint(search, held_out)
    rows = []
    for name in MODELS:
        model = wb.load_model(name)
        found = naive(model, search, P)
        found["held_out_ratio"], found["ci"], found["activation_ratio"] = naive_held_out(model, found.pop("thresholds"), held_out)
        for result in (ours(model, search, held_out, P), found):
            print(name, result, flush=True)
            rows.append([name, result["search"], result["passes"], result["settings"], f"{result['seconds']:.1f}",
                         f"{result['cett']:.4f}", f"{result['search_ratio']:.5f}",
                         f"{result['held_out_ratio']:.5f} [{result['ci'][0]:.4f}, {result['ci'][1]:.4f}]",
                         f"{result['activation_ratio']:.4f}"])
    body = "\n".join([
        "## bench_sparsity: cost of one PPL-1% search",
        "",
        f"`.venv/bin/python benchmarks/bench_sparsity.py` on {machine()}. The search runs on {search.numel():,} "
        f"validation tokens (thresholds from their first {THRESHOLD_TOKENS:,}), target ratio {1 + P} ± "
        f"{DEFAULT_TOLERANCE}; the CETT found is then scored on {held_out.numel():,} other validation tokens "
        "(held-out ratio, 95% bootstrap interval over sequences, held-out activation ratio). Passes: forward passes "
        "over the search tokens (a workbench pass scores up to four settings at once, so its batches are four times "
        "larger); seconds: the search alone.",
        "",
        table(["model", "search", "passes", "settings evaluated", "seconds", "CETT found", "ratio (search set)",
               "ratio (held out) [95% CI]", "activation ratio (held out)"], rows),
    ])
    write_section("bench_sparsity", body)
    print(body)


if __name__ == "__main__":
    main()
