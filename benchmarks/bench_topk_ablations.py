"""Why TopK's quality per token falls behind at width: controlled ablations of the defaults.

    .venv/bin/python benchmarks/bench_topk_ablations.py            # writes the bench_topk_ablations section
    .venv/bin/python benchmarks/bench_topk_ablations.py --quick    # tiny sizes, prints only

At d_in 768 / d_sae 16,384 / k 32 / 1,048,576 tokens (256 steps of 4,096), workbench's TopK
at its defaults ended with a far worse held-out FVU and MMCS than sparsify's SparseCoder
trained with plain Adam at a constant lr 2e-3, while at 256 / 2,048 it was ahead. Each
candidate cause is switched off alone, all on the same rows in the same order (one pass
trains every variant: ``train_saes``), against sparsify with plain Adam as the reference:

- the grad-norm clip at 1.0 (on a variance-normalised loss, where the norm can sit above 1
  for the whole run, so clipping silently lowers the lr);
- the fixed 50-step warm-up (a fifth of a 256-step run);
- the final 20% linear decay to zero;
- the AuxK loss (α = 1/32);
- all three schedule parts at once (plain Adam at the default lr, as the reference).

bf16 selection, also a suspect, is not tested where bf16 matmuls are not fast (this
machine's CPUs: every encoder matmul is fp32 there, so it cannot be the cause here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, table, write_section  # noqa: E402

import torch  # noqa: E402

from workbench import synthetic  # noqa: E402
from workbench.trainer import TrainConfig, default_lr, train_saes  # noqa: E402

K, BATCH, HELD_OUT = 32, 4096, 16_384
SIZE = (768, 16_384, 1_048_576)
QUICK_SIZE = (64, 512, 65_536)
# (name, what changed, TrainConfig overrides): one change each from the defaults.
VARIANTS = [
    ("defaults", "—", {}),
    ("no clip", "grad_clip None", {"grad_clip": None}),
    ("no warm-up", "warmup_steps 0", {"warmup_steps": 0}),
    ("no decay", "decay_fraction 0", {"decay_fraction": 0.0}),
    ("no AuxK", "aux_alpha 0", {"aux_alpha": 0.0}),
    ("constant lr", "no clip, warm-up or decay", {"grad_clip": None, "warmup_steps": 0, "decay_fraction": 0.0}),
]
REFERENCE_LR = 2e-3


def held_out_fvu(reconstruct, rows: torch.Tensor) -> float:
    with torch.no_grad():
        err = sum(float((reconstruct(r).double() - r.double()).pow(2).sum()) for r in rows.split(BATCH))
    return err / float((rows.double() - rows.double().mean(0)).pow(2).sum())


def train_workbench(train: torch.Tensor, d_sae: int, folder: Path, variants: list) -> list[dict]:
    configs = [TrainConfig(architecture="topk", d_sae=d_sae, k=K, batch_size=BATCH, total_tokens=train.shape[0],
                           device="cpu", selection_precision="float32", log_every=4, **overrides)
               for _, _, overrides in variants]
    started = time.perf_counter()
    trained = train_saes(configs, train, run_dir=folder, progress=True, live_plot=False)
    seconds = time.perf_counter() - started
    out = []
    for (name, change, _), sae, metrics in zip(variants, trained, sorted(folder.glob("*/metrics.json"))):
        history = json.loads(metrics.read_text())["history"]
        norms = [h["grad_norm"] for h in history]
        out.append({"name": name, "change": change, "sae": sae.eval(), "seconds": seconds / len(variants),
                    "clipped": sum(n > 1.0 for n in norms) / len(norms), "median_norm": sorted(norms)[len(norms) // 2]})
    return out


def train_sparsify_adam(train: torch.Tensor, d_sae: int) -> dict:
    """sparsify's SparseCoder stepped as its trainer steps it, but with plain Adam at a constant lr."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(train.shape[1], SparseCoderConfig(num_latents=d_sae, k=K), device="cpu", dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=REFERENCE_LR)
    started = time.perf_counter()
    for step, batch in enumerate(train.split(BATCH)):
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(batch).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
    return {"name": "sparsify, Adam", "change": f"constant lr {REFERENCE_LR:g}", "seconds": time.perf_counter() - started,
            "reconstruct": lambda rows: sae(rows).sae_out, "decoder": sae.W_dec.detach(), "clipped": None,
            "median_norm": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; print, do not write RESULTS.md")
    parser.add_argument("--variants", nargs="+", choices=[name for name, _, _ in VARIANTS],
                        help="train only these of our variants (default: all)")
    parser.add_argument("--data", type=Path, help="keep the generated rows in this file and reuse them")
    args = parser.parse_args()
    d_in, d_sae, tokens = QUICK_SIZE if args.quick else SIZE
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants]
    torch.manual_seed(0)
    data = synthetic.superposition(d=d_in, n_features=d_sae, avg_active=8, noise=0.01, seed=0)
    started = time.perf_counter()
    if args.data and args.data.exists():
        train, held_out = torch.load(args.data).values()
    else:
        # Generated straight into one tensor: a list of batches and its concatenation would
        # hold the rows twice (6 GiB at the full size).
        train = torch.empty(tokens, d_in)
        for i, batch in enumerate(data.batches(BATCH, tokens, seed=1)):
            train[i * BATCH:(i + 1) * BATCH] = batch
        held_out = torch.cat(list(data.batches(BATCH, HELD_OUT, seed=2)))
        if args.data:
            torch.save({"train": train, "held_out": held_out}, args.data)
    print(f"data: {time.perf_counter() - started:.0f} s", flush=True)
    runs = [train_sparsify_adam(train, d_sae)]
    print(f"sparsify: {runs[0]['seconds']:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        ours = train_workbench(train, d_sae, Path(folder), variants)
    for run in ours:
        sae = run.pop("sae")
        run.update(reconstruct=lambda rows, sae=sae: sae(rows).x_hat, decoder=sae.W_dec.detach())
    runs = ours + runs
    rows = []
    for run in runs:
        fvu, mmcs = held_out_fvu(run["reconstruct"], held_out), synthetic.mmcs(run["decoder"], data.features)
        clipped = "—" if run["clipped"] is None else f"{run['clipped']:.0%}"
        norm = "—" if run["median_norm"] is None else f"{run['median_norm']:.2f}"
        rows.append([run["name"], run["change"], f"{fvu:.4f}", f"{mmcs:.4f}", norm, clipped, f"{run['seconds']:.0f}"])
        print(rows[-1], flush=True)
    body = "\n".join([
        "## bench_topk_ablations: TopK's defaults at width, one change at a time",
        "",
        f"`.venv/bin/python benchmarks/bench_topk_ablations.py` on {machine()}. Synthetic superposition data "
        f"(d_in {d_in}, {d_sae:,} true features with power-law frequencies, ~8 active per row, noise 0.01), "
        f"TopK k {K}, d_sae {d_sae:,}, batch {BATCH}, {tokens:,} training tokens ({tokens // BATCH} steps), default lr "
        f"{default_lr(d_sae):.1e}; every variant on the same rows in the same order, one seed; held-out FVU on "
        f"{HELD_OUT:,} unseen rows, MMCS against the true features. Gradient norms are before clipping, logged "
        "every 4 steps; \"clipped\": the share of those above 1.0. Seconds: the shared pass divided by the number of "
        "our variants.",
        "",
        table(["variant", "change", "held-out FVU", "MMCS", "median grad norm", "clipped", "seconds"], rows),
    ])
    print(body)
    if not args.quick:
        write_section("bench_topk_ablations", body)


if __name__ == "__main__":
    main()
