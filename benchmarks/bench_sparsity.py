"""Cost of one PPL-p% search: workbench's against the naive search, on the zoo models.

    .venv/bin/python benchmarks/bench_sparsity.py

Both find the global CETT c whose perplexity ratio is 1 + p (p = 1%, within ±0.05 pp) on
the same evaluation tokens, with thresholds calibrated on the same other tokens.

- naive: bisection on c; every step fits each layer's threshold by its own bisection on
  CETT (the library's ``CETT`` method: one bisection per layer per step) and runs one full
  evaluation of the sparsified model;
- workbench (``PPLSearch``): each layer's CETT curve once, thresholds interpolated on it,
  and four settings (the dense reference included) scored per pass over the evaluation
  tokens, placed by regula falsi.

Reported: forward passes over the evaluation tokens, settings evaluated, seconds, and
what was found. Results go to the ``bench_sparsity`` section of RESULTS.md.
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
from workbench.evals import model_loss  # noqa: E402
from workbench.sparsity import get_method  # noqa: E402
from workbench.sparsity.ppl import DEFAULT_TOLERANCE, PPLSearch  # noqa: E402

MODELS = ("stdlib-relu", "stdlib-gelu", "stdlib-swiglu")
P, EVAL_SEQUENCES, CALIBRATION_TOKENS = 0.01, 128, 4096


def naive(model, evaluation, calibration, p: float) -> dict:
    started = time.perf_counter()
    method = get_method("cett", max_tokens=CALIBRATION_TOKENS)
    dense = model_loss(model, evaluation)
    passes, lo, hi = 1, 0.0, 1.0
    best = None
    for _ in range(40):
        c = (lo + hi) / 2
        thresholds = method.fit((model, calibration), c)  # a bisection per layer, every step
        with method.apply(model, thresholds) as meter:
            ratio = math.exp(model_loss(model, evaluation) - dense)
        passes += 1
        best = (c, ratio, 1 - meter.mean)
        if abs(ratio - (1 + p)) <= DEFAULT_TOLERANCE:
            break
        lo, hi = (c, hi) if ratio < 1 + p else (lo, c)
    return {"search": "naive", "passes": passes, "settings": passes, "seconds": time.perf_counter() - started,
            "cett": best[0], "ppl_ratio": best[1], "activation_ratio": best[2]}


def ours(model, evaluation, p: float) -> dict:
    started = time.perf_counter()
    result = PPLSearch(model, evaluation, calibration_tokens=CALIBRATION_TOKENS).solve(p)
    return {"search": "workbench", "passes": result.passes, "settings": result.settings_evaluated,
            "seconds": time.perf_counter() - started, "cett": result.cett, "ppl_ratio": result.ppl_ratio,
            "activation_ratio": result.activation_ratio}


def main() -> None:
    torch.manual_seed(0)
    val = wb.load_tokens("stdlib", "val")
    evaluation = val[:EVAL_SEQUENCES]
    rows = []
    for name in MODELS:
        model = wb.load_model(name)
        # Calibration: the first tokens of the evaluation set, as PPLSearch takes them.
        calibration = evaluation[: CALIBRATION_TOKENS // evaluation.shape[1]]
        for result in (ours(model, evaluation, P), naive(model, evaluation, calibration, P)):
            print(name, result, flush=True)
            rows.append([name, result["search"], result["passes"], result["settings"], f"{result['seconds']:.1f}",
                         f"{result['cett']:.4f}", f"{result['ppl_ratio']:.5f}", f"{result['activation_ratio']:.4f}"])
    body = "\n".join([
        "## bench_sparsity: cost of one PPL-1% search",
        "",
        f"`.venv/bin/python benchmarks/bench_sparsity.py` on {machine()}. {EVAL_SEQUENCES * evaluation.shape[1]:,} "
        f"validation tokens for perplexity, thresholds calibrated on their first {CALIBRATION_TOKENS:,}; target "
        f"ratio {1 + P} ± {DEFAULT_TOLERANCE}. Passes: forward passes over the evaluation tokens (a workbench pass "
        "scores up to four settings at once, so its batches are four times larger).",
        "",
        table(["model", "search", "passes", "settings evaluated", "seconds", "CETT found", "perplexity ratio",
               "activation ratio"], rows),
    ])
    write_section("bench_sparsity", body)
    print(body)


if __name__ == "__main__":
    main()
