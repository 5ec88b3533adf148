"""Transcoders against MLP-output SAEs on the default model: FVU and CE with the MLP replaced.

    .venv/bin/python benchmarks/bench_transcoders.py            # writes the bench_transcoders section
    .venv/bin/python benchmarks/bench_transcoders.py --quick    # tiny sizes, prints only

Dunefsky et al. (2024, §3.2, Fig. 2) report that transcoders are on par with SAEs trained on
the MLP's output on the sparsity/fidelity frontier, so that replacing SAEs by transcoders
(for their input-invariant circuits) costs no fidelity. Here, in miniature: block 2's MLP of
the default model, its input (``ln2.hook_normalized``) and output (``hook_mlp_out``) cached in
one pass; TopK transcoders (input → output) and TopK SAEs (output → output) at k ∈ {8, 16, 32},
two seeds each, the same tokens, width, lr and schedule. Both are scored on held-out
validation tokens on the same quantity: the MLP's output (FVU of the prediction, and the CE
loss with the MLP's output replaced by it; CE recovered is measured against zero-ablating
the MLP).

What would make the comparison unfair: the SAE sees the very vector it reconstructs, the
transcoder must compute it through the MLP's nonlinearity, and at this short budget the
transcoder (whose encoder starts unrelated to its decoder) may not have converged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model_data import default_model_data, spread  # noqa: E402
from results import machine, table, write_section  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.sae import transcoder_hooks  # noqa: E402
from workbench.sae.compare import compare_saes  # noqa: E402

LAYER = 2
LEVELS = (8, 16, 32)
SEEDS = (0, 1)
FULL = dict(train_tokens=393_216, d_sae=1024, eval_tokens=32_768)
QUICK = dict(train_tokens=32_768, d_sae=256, eval_tokens=4_096)


def configs(kind: str, d_sae: int, total_tokens: int, seed: int) -> list:
    source, target = transcoder_hooks(LAYER)
    hooks = dict(hook_name=source, target_hook=target) if kind == "transcoder" else dict(hook_name=target)
    return [wb.TrainConfig(architecture="topk", d_sae=d_sae, k=k, seed=seed, total_tokens=total_tokens, batch_size=1024,
                           **hooks) for k in LEVELS]


def main() -> None:
    setup = default_model_data(__doc__, FULL, QUICK, list(transcoder_hooks(LAYER)), f"mlp{LAYER}-io")
    size, cache, val, val_cache, model = setup.size, setup.cache, setup.val, setup.val_cache, setup.model
    points: dict[tuple[str, int], list[dict]] = {}
    for seed in SEEDS:
        for kind in ("transcoder", "MLP-output SAE"):
            sweep = configs(kind, size["d_sae"], cache.n_tokens, seed)
            started = time.perf_counter()
            saes = wb.train_saes(sweep, cache, progress=False)
            print(f"seed {seed}, {kind}: trained {len(saes)} in {time.perf_counter() - started:.0f} s", flush=True)
            rows = compare_saes(saes, val_cache, model=model, tokens=val, n_batches=val.numel() // 4096, progress=False)
            for cfg, row in zip(sweep, rows):
                points.setdefault((kind, cfg.k), []).append(row)
    body = report(points, cache.n_tokens, val.numel(), size)
    print(body)
    if not setup.quick:
        write_section("bench_transcoders", body)


def report(points: dict, n_train: int, n_val: int, size: dict) -> str:
    first = next(iter(points.values()))[0]
    lines = [[kind, str(k), spread(rows, "l0", 1), spread(rows, "fvu", 4), spread(rows, "dead_fraction", 3),
              spread(rows, "ce_spliced", 4), spread(rows, "ce_recovered_vs_zero", 3)]
             for (kind, k), rows in sorted(points.items(), key=lambda item: (item[0][1], item[0][0]))]
    source, target = transcoder_hooks(LAYER)
    return "\n".join([
        "## bench_transcoders: transcoders against MLP-output SAEs",
        "",
        f"`.venv/bin/python benchmarks/bench_transcoders.py` on {machine()}. Default model ({wb.DEFAULT_MODEL}), "
        f"block {LAYER}'s MLP: TopK transcoders `{source}` → `{target}` and TopK SAEs on `{target}`, d_sae "
        f"{size['d_sae']}, {n_train:,} training tokens (batch 1,024, the trainer's default lr and schedule), seeds "
        f"{', '.join(map(str, SEEDS))} (mean ± half the range). On {n_val:,} held-out validation tokens: FVU of the "
        f"MLP's output, dead fraction, and the CE loss with the MLP's output replaced (clean model "
        f"{first['ce_clean']:.4f} nats; CE recovered is against zero-ablating the MLP). The SAE reconstructs the "
        "vector it is given; the transcoder must compute it from the MLP's input.",
        "",
        table(["dictionary", "k", "L0", "FVU", "dead", "CE spliced (nats)", "CE recovered vs zero"], lines),
    ])


if __name__ == "__main__":
    main()
