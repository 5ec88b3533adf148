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

- bf16 selection: the latents are chosen from pre-activations of a bf16 product (where bf16
  matmuls are fast, ``selection_precision="auto"`` does this; the chosen values are then
  recomputed exactly in float32). Where bf16 matmuls are slow (CPUs without AVX512-BF16 or
  AMX) it is emulated: inputs and weights rounded to bf16, products summed in float32, the
  result rounded to bf16, which is what a bf16 GEMM with float32 accumulation returns.

Each finished run is appended to ``--record`` (a JSON-lines file, kept in the repository),
and the section is written from the whole record, so runs at other token counts or from
other sessions stand side by side; a variant already in the record is not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_record, commit, machine, read_record, table, write_section  # noqa: E402

import torch  # noqa: E402

from workbench import synthetic  # noqa: E402
from workbench.sae.base import SparseAutoencoder  # noqa: E402
from workbench.sae.sparse_ops import fast_bf16_matmul  # noqa: E402
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
    ("bf16 selection", "latents chosen from a bf16 product", {"selection_precision": "bfloat16"}),
]
REFERENCE_LR = 2e-3
RECORD = Path(__file__).with_name("records") / "topk_ablations.jsonl"


def _emulated_bf16_selection(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``_selection_pre_acts`` as a bf16 GEMM computes it (bf16 inputs and weights, float32
    accumulation, bf16 result), in float32 arithmetic: fast where bf16 matmuls are not."""
    weights = torch.cat([self.W_enc, (self.b_enc - self.input_bias @ self.W_enc)[None]]).bfloat16().float()
    rows = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1).bfloat16().float()
    return (rows @ weights).bfloat16()


@contextlib.contextmanager
def bf16_selection():
    """Train with bf16 selection: native where bf16 matmuls are fast, emulated elsewhere."""
    if fast_bf16_matmul(torch.device("cpu")):
        yield "native"
        return
    native = SparseAutoencoder._selection_pre_acts
    SparseAutoencoder._selection_pre_acts = _emulated_bf16_selection
    try:
        yield "emulated"
    finally:
        SparseAutoencoder._selection_pre_acts = native


def held_out_fvu(reconstruct, rows: torch.Tensor) -> float:
    with torch.no_grad():
        err = sum(float((reconstruct(r).double() - r.double()).pow(2).sum()) for r in rows.split(BATCH))
    return err / float((rows.double() - rows.double().mean(0)).pow(2).sum())


def train_workbench(train: torch.Tensor, d_sae: int, folder: Path, variants: list) -> list[dict]:
    """One pass trains the float32-selection variants; the bf16-selection ones get their own pass
    (the emulation replaces the selection for every SAE of a pass)."""
    fp32 = [v for v in variants if v[2].get("selection_precision") != "bfloat16"]
    bf16 = [v for v in variants if v[2].get("selection_precision") == "bfloat16"]
    out = _train_pass(train, d_sae, folder / "fp32", fp32) if fp32 else []
    if bf16:
        with bf16_selection() as how:
            out += _train_pass(train, d_sae, folder / "bf16", bf16)
        for run in out[len(out) - len(bf16):]:
            run["change"] += f" ({how})"
    return out


def _train_pass(train: torch.Tensor, d_sae: int, folder: Path, variants: list) -> list[dict]:
    configs = [TrainConfig(architecture="topk", d_sae=d_sae, k=K, batch_size=BATCH, total_tokens=train.shape[0],
                           device="cpu", log_every=4, **{"selection_precision": "float32", **overrides})
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
    parser.add_argument("--tokens", type=int, help=f"training tokens (default {SIZE[2]:,})")
    parser.add_argument("--data", type=Path, help="keep the generated rows in this file and reuse them")
    parser.add_argument("--record", type=Path, default=RECORD, help="the JSON-lines record of finished runs")
    args = parser.parse_args()
    d_in, d_sae, tokens = QUICK_SIZE if args.quick else SIZE
    tokens = args.tokens or tokens
    record = Path(tempfile.mkdtemp()) / "quick.jsonl" if args.quick else args.record
    done = read_record(record)
    have = {r["variant"] for r in done if (r["d_in"], r["d_sae"], r["tokens"]) == (d_in, d_sae, tokens)}
    variants = [v for v in VARIANTS if (not args.variants or v[0] in args.variants) and v[0] not in have]
    reference = "sparsify, Adam" not in have
    if variants or reference:
        for run in train_all(d_in, d_sae, tokens, variants, reference, args.data):
            append_record(record, {"d_in": d_in, "d_sae": d_sae, "tokens": tokens, "commit": commit(), **run})
    body = report(read_record(record))
    print(body)
    if not args.quick:
        write_section("bench_topk_ablations", body)


def train_all(d_in: int, d_sae: int, tokens: int, variants: list, reference: bool, data_file: Path | None) -> list[dict]:
    """Train our variants (and sparsify with plain Adam, if ``reference``) on one set of rows;
    each run's held-out FVU, MMCS and gradient-norm figures."""
    torch.manual_seed(0)
    data = synthetic.superposition(d=d_in, n_features=d_sae, avg_active=8, noise=0.01, seed=0)
    started = time.perf_counter()
    if data_file and data_file.exists():
        train, held_out = torch.load(data_file).values()
        if train.shape[0] != tokens:
            raise SystemExit(f"{data_file} holds {train.shape[0]:,} training rows, not {tokens:,}: give another --data file")
    else:
        # Generated straight into one tensor: a list of batches and its concatenation would
        # hold the rows twice (6 GiB at the full size).
        train = torch.empty(tokens, d_in)
        for i, batch in enumerate(data.batches(BATCH, tokens, seed=1)):
            train[i * BATCH:(i + 1) * BATCH] = batch
        held_out = torch.cat(list(data.batches(BATCH, HELD_OUT, seed=2)))
        if data_file:
            torch.save({"train": train, "held_out": held_out}, data_file)
    print(f"data: {time.perf_counter() - started:.0f} s", flush=True)
    runs = []
    if reference:
        runs.append(train_sparsify_adam(train, d_sae))
        print(f"sparsify: {runs[0]['seconds']:.0f} s", flush=True)
    if variants:
        with tempfile.TemporaryDirectory() as folder:
            for run in train_workbench(train, d_sae, Path(folder), variants):
                sae = run.pop("sae")
                runs.append({**run, "reconstruct": lambda rows, sae=sae: sae(rows).x_hat, "decoder": sae.W_dec.detach()})
    out = []
    for run in runs:
        out.append({"variant": run["name"], "change": run["change"], "seconds": run["seconds"],
                    "fvu": held_out_fvu(run["reconstruct"], held_out), "mmcs": synthetic.mmcs(run["decoder"], data.features),
                    "clipped": run["clipped"], "median_norm": run["median_norm"]})
        print(out[-1], flush=True)
    return out


def report(runs: list[dict]) -> str:
    order = [name for name, _, _ in VARIANTS] + ["sparsify, Adam"]
    runs = sorted(runs, key=lambda r: (r["d_in"], r["d_sae"], -r["tokens"], order.index(r["variant"])))
    rows = [[f"{r['tokens']:,}", r["variant"], r["change"], f"{r['fvu']:.4f}", f"{r['mmcs']:.4f}",
             "—" if r["median_norm"] is None else f"{r['median_norm']:.2f}",
             "—" if r["clipped"] is None else f"{r['clipped']:.0%}", f"{r['seconds']:.0f}", r["commit"]] for r in runs]
    sizes = sorted({(r["d_in"], r["d_sae"]) for r in runs})
    return "\n".join([
        "## bench_topk_ablations: TopK's defaults at width, one change at a time",
        "",
        f"`.venv/bin/python benchmarks/bench_topk_ablations.py` on {machine()}; every run is kept in "
        f"`benchmarks/records/{RECORD.name}`. Synthetic superposition data ("
        + ", ".join(f"d_in {d}, {m:,} true features" for d, m in sizes)
        + f" with power-law frequencies, ~8 active per row, noise 0.01), TopK k {K}, d_sae = true features, batch "
        f"{BATCH}, default lr {', '.join(f'{default_lr(m):.1e}' for _, m in sizes)}; at each token count every variant "
        f"on the same rows in the same order, one seed; held-out FVU on {HELD_OUT:,} unseen rows, MMCS against the true "
        "features. Gradient norms are before clipping, logged every 4 steps; \"clipped\": the share of those above "
        "1.0. Seconds: a shared pass divided by the number of variants in it.",
        "",
        table(["tokens", "variant", "change", "held-out FVU", "MMCS", "median grad norm", "clipped", "seconds", "commit"],
              rows),
    ])


if __name__ == "__main__":
    main()
