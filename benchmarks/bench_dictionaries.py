"""Every dictionary architecture on the default model: FVU and spliced-in CE loss against L0.

    .venv/bin/python benchmarks/bench_dictionaries.py            # writes the bench_dictionaries section
    .venv/bin/python benchmarks/bench_dictionaries.py --quick    # tiny sizes, prints only

The paper-style Pareto comparison: one cache of the residual stream after block 2 of the
default model (with the loss gradient, for the g-SAE), then, from one pass per seed, every
registered architecture at three sparsities: k ∈ {8, 16, 32} for the TopK family
(BatchTopK and Matryoshka on average per row), the L1 weight for ReLU-L1, and the target L0
{8, 16, 32} of JumpReLU's quadratic penalty. Every point is a real training run; each is
scored on a cache of validation tokens (FVU, L0, dead latents) and spliced into the
model (CE loss; the g-SAE selects with the label-free entropy gradient), all on held-out
validation tokens. Seeds 0 and 1 give mean ± half the range.

What would make the comparison unfair: every SAE trains on the same 393,216 tokens with the
trainer's defaults for lr and schedule, which favours architectures that converge fast
(penalty SAEs keep improving long after TopK has settled); the widths are small (1,024
latents); penalty SAEs land at their own L0, so compare them on the curve, not per row.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model_data import default_model_data, spread  # noqa: E402
from results import machine, table, write_section  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.sae import ARCHITECTURES  # noqa: E402
from workbench.sae.compare import compare_saes, plot_comparison  # noqa: E402

HOOK = "blocks.2.hook_resid_post"
LEVELS = (8, 16, 32)  # k of the TopK family, target L0 of JumpReLU
RELU_L1 = (0.4, 0.2, 0.1)  # ReLU-L1's weights, roughly the same L0 range
SEEDS = (0, 1)
FULL = dict(train_tokens=393_216, d_sae=1024, eval_tokens=32_768)
QUICK = dict(train_tokens=32_768, d_sae=256, eval_tokens=4_096)


def configs(d_sae: int, total_tokens: int, seed: int) -> list:
    """One config per (architecture, sparsity level), sharing the stream of one seed."""
    out = []
    for arch in ARCHITECTURES:
        for level, l1 in zip(LEVELS, RELU_L1):
            extra = {"relu": {"l1_coefficient": l1}, "jumprelu": {"target_l0": float(level)}}.get(arch, {})
            out.append(wb.TrainConfig(architecture=arch, d_sae=d_sae, k=level, hook_name=HOOK, seed=seed,
                                      total_tokens=total_tokens, batch_size=1024, sae_kwargs=extra))
    return out


def label(cfg) -> str:
    if cfg.architecture == "relu":
        return f"λ={cfg.sae_kwargs['l1_coefficient']}"
    if cfg.architecture == "jumprelu":
        return f"target L0={cfg.sae_kwargs['target_l0']:g}"
    return f"k={cfg.k}"


def main() -> None:
    # Held out: validation tokens, cached (with gradients, for the g-SAE) for the reconstruction
    # metrics and spliced in for the CE loss.
    setup = default_model_data(__doc__, FULL, QUICK, [HOOK], "resid2", with_grads=True)
    size, cache, val, val_cache, model = setup.size, setup.cache, setup.val, setup.val_cache, setup.model
    points: dict[tuple[str, str], list[dict]] = {}
    for seed in SEEDS:
        sweep = configs(size["d_sae"], cache.n_tokens, seed)
        started = time.perf_counter()
        saes = wb.train_saes(sweep, cache, progress=False)
        print(f"seed {seed}: trained {len(saes)} SAEs in {time.perf_counter() - started:.0f} s", flush=True)
        rows = compare_saes(saes, val_cache, model=model, tokens=val, n_batches=val.numel() // 4096, progress=False)
        for cfg, row in zip(sweep, rows):
            points.setdefault((cfg.architecture, label(cfg)), []).append(row)
    body = report(points, cache.n_tokens, val.numel(), size)
    print(body)
    if not setup.quick:
        write_section("bench_dictionaries", body)
        figure = plot_comparison([mean_row(rows) for rows in points.values()])
        figure_path = Path(__file__).with_name("dictionaries_pareto.png")
        figure.savefig(figure_path, dpi=200)
        wb.figures.save_figure(figure, "bench_dictionaries_pareto")
        print(f"figure: {figure_path}")


def mean_row(rows: list[dict]) -> dict:
    """The seeds' mean of every number in a compare_saes row."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.fmean(r[key] for r in rows)
    return out


def report(points: dict, n_train: int, n_val: int, size: dict) -> str:
    clean = next(iter(points.values()))[0]["ce_clean"]
    lines = [[arch, setting, spread(rows, "l0", 1), spread(rows, "fvu", 4), spread(rows, "dead_fraction", 3),
              spread(rows, "ce_spliced", 4), spread(rows, "ce_recovered_vs_zero", 3)]
             for (arch, setting), rows in points.items()]
    return "\n".join([
        "## bench_dictionaries: every architecture, FVU and spliced-in CE against L0",
        "",
        f"`.venv/bin/python benchmarks/bench_dictionaries.py` on {machine()}. Default model "
        f"({wb.DEFAULT_MODEL}), `{HOOK}`, d_sae {size['d_sae']}, {n_train:,} training tokens (batch 1,024, the "
        f"trainer's default lr and schedule), seeds {', '.join(map(str, SEEDS))} (mean ± half the range). On "
        f"{n_val:,} held-out validation tokens: L0, FVU and dead fraction (no firing there), and the CE loss with "
        f"the SAE spliced in (clean model {clean:.4f} nats); the g-SAE selects with the label-free entropy gradient. ReLU-L1 and JumpReLU reach "
        "their own L0: read them against the TopK curve, not row by row. All trained on the same short budget, "
        "which favours the architectures that converge fastest. Figure: `benchmarks/dictionaries_pareto.png`.",
        "",
        table(["architecture", "setting", "L0", "FVU", "dead", "CE spliced (nats)", "CE recovered vs zero"], lines),
    ])


if __name__ == "__main__":
    main()
