"""End-to-end against local SAEs on the default model: CE loss spliced in at equal L0.

    .venv/bin/python benchmarks/bench_e2e.py            # writes the bench_e2e section
    .venv/bin/python benchmarks/bench_e2e.py --quick    # tiny sizes, prints only

Braun et al. (2024)'s headline: SAEs trained end-to-end (KL of the spliced model from the
clean one) need fewer active latents than local SAEs (trained to reconstruct) for the same
CE loss, at the price of reconstructions far from the activations (high FVU). In miniature:
TopK SAEs on the default model's residual stream after block 2 at k ∈ {8, 16, 32} (TopK
fixes L0 = k, so the comparison is at exactly equal L0), trained local, e2e, and e2e+ds
(the later residual streams' normalised errors added, coefficient 1) on the same token
sequences, the same width, lr, schedule and batch (1,024 rows = 8 sequences); scored on
held-out validation tokens.

What would make the comparison unfair: e2e training costs a forward and backward pass of
the rest of the model per step; here both see the same tokens and steps, not the same compute.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model_data import default_model_data, spread  # noqa: E402
from results import machine, table, write_section  # noqa: E402

import torch  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.end_to_end import EndToEnd  # noqa: E402
from workbench.sae.compare import compare_saes  # noqa: E402

HOOK = "blocks.2.hook_resid_post"
LEVELS = (8, 16, 32)
SEEDS = (0, 1)
SEQUENCES_PER_BATCH = 8
FULL = dict(train_tokens=65_536, d_sae=1024, eval_tokens=32_768)
QUICK = dict(train_tokens=16_384, d_sae=256, eval_tokens=4_096)


def main() -> None:
    setup = default_model_data(__doc__, FULL, QUICK, [HOOK], "resid2-plain")
    size, tokens, cache, model = setup.size, setup.tokens, setup.cache, setup.model
    val, val_cache = setup.val, setup.val_cache
    later = tuple(f"blocks.{layer}.hook_resid_post" for layer in range(3, model.cfg.n_layers))
    points: dict[tuple[str, int], list[dict]] = {}
    seconds: dict[str, list[float]] = {}
    for seed in SEEDS:
        for kind in ("local", "e2e", "e2e+ds"):
            levels = LEVELS if kind != "e2e+ds" else (16,)
            if kind == "local":
                data = cache
            else:
                data = EndToEnd(model, tokens, HOOK, SEQUENCES_PER_BATCH, downstream=later if kind == "e2e+ds" else (),
                                seed=seed)
            sweep = [wb.TrainConfig(architecture="topk", d_sae=size["d_sae"], k=k, hook_name=HOOK, seed=seed,
                                    total_tokens=cache.n_tokens, batch_size=SEQUENCES_PER_BATCH * tokens.shape[1])
                     for k in levels]
            started = time.perf_counter()
            saes = wb.train_saes(sweep, data, progress=False)
            seconds.setdefault(kind, []).append((time.perf_counter() - started) / len(saes))
            print(f"seed {seed}, {kind}: trained {len(saes)} in {time.perf_counter() - started:.0f} s", flush=True)
            with torch.no_grad():
                rows = compare_saes(saes, val_cache, model=model, tokens=val, n_batches=val.numel() // 4096,
                                    progress=False)
            for cfg, row in zip(sweep, rows):
                points.setdefault((kind, cfg.k), []).append(row)
    body = report(points, seconds, cache.n_tokens, val.numel(), size, later)
    print(body)
    if not setup.quick:
        write_section("bench_e2e", body)


def report(points: dict, seconds: dict, n_train: int, n_val: int, size: dict, later: tuple) -> str:
    first = next(iter(points.values()))[0]
    order = {"local": 0, "e2e": 1, "e2e+ds": 2}
    lines = [[kind, str(k), spread(rows, "l0", 1), spread(rows, "ce_spliced", 4), spread(rows, "ce_recovered_vs_zero", 3),
              spread(rows, "kl", 4), spread(rows, "fvu", 3), spread(rows, "dead_fraction", 3)]
             for (kind, k), rows in sorted(points.items(), key=lambda item: (item[0][1], order[item[0][0]]))]
    per_sae = ", ".join(f"{kind} {sum(s) / len(s):.0f} s" for kind, s in seconds.items())
    return "\n".join([
        "## bench_e2e: end-to-end against local SAEs at equal L0",
        "",
        f"`.venv/bin/python benchmarks/bench_e2e.py` on {machine()}. Default model ({wb.DEFAULT_MODEL}), `{HOOK}`, "
        f"TopK SAEs (L0 = k exactly), d_sae {size['d_sae']}, {n_train:,} training tokens in batches of "
        f"{SEQUENCES_PER_BATCH} sequences (1,024 rows), the trainer's default lr and schedule; local: reconstruction "
        "loss; e2e: KL(clean ‖ spliced) (Braun et al. 2024); e2e+ds: plus the mean normalised error of "
        f"{', '.join(f'`{h}`' for h in later)} (coefficient 1). Seeds {', '.join(map(str, SEEDS))} (mean ± half "
        f"the range). On {n_val:,} held-out validation tokens: CE with the SAE spliced in (clean model "
        f"{first['ce_clean']:.4f} nats), CE recovered against zero-ablation, KL(clean ‖ spliced), FVU of the "
        f"activations, dead fraction. Training time per SAE (sweeps share batches): {per_sae}; e2e spends a forward "
        "and backward pass of the model's rest per step, so equal tokens are not equal compute.",
        "",
        table(["training", "k", "L0", "CE spliced (nats)", "CE recovered vs zero", "KL", "FVU", "dead"], lines),
    ])


if __name__ == "__main__":
    main()
