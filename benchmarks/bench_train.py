"""TopK SAE training speed: workbench vs SAELens vs EleutherAI sparsify, in one run.

    .venv/bin/python benchmarks/bench_train.py            # writes the bench_train section
    .venv/bin/python benchmarks/bench_train.py --quick    # tiny sizes, prints only

Each library trains a TopK SAE (k=32) on the same synthetic superposition data (the same
rows in the same order, batch 4096) for the same number of tokens, with its own training
step and its own default optimiser settings, as a user of that library would get them:

- workbench: ``train_sae`` (Adam, default lr, AuxK, unit-norm decoder, clipping);
- SAELens: ``SAETrainer`` on a ``TopKTrainingSAE`` (its defaults: Adam 3e-4, AuxK, decoder
  norm folded into the activations);
- sparsify: ``SparseCoder`` stepped as its ``Trainer`` steps it (default signum optimiser
  with schedule-free averaging, unit-norm decoder, b_dec initialised to the mean; its
  trainer needs a Hugging Face model, so the loop is reproduced around the SparseCoder).

Every library runs in its own subprocess, so peak memory (max RSS above the RSS with the
data loaded) is its own. Held-out FVU is computed the same way for all (float64 sums) on
rows none of them trained on. Tokens/s counts the whole training call after the data is in
memory. The matmul ceiling is this machine's best [4096, d_in] × [d_in, d_sae] product in
the dtype each library's encoder uses; "% of ceiling" is the encoder forward's 2·d_in·d_sae
FLOPs per token at the measured tokens/s over that ceiling — the one dense product a TopK
step cannot avoid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, table, write_section  # noqa: E402

K, BATCH = 32, 4096
# (d_in, d_sae, training tokens): the two sizes the target names.
SIZES = [(256, 2048, 1_048_576), (768, 16384, 262_144)]
QUICK_SIZES = [(64, 256, 16_384)]
HELD_OUT = 16_384
LIBRARIES = ("workbench", "workbench-fp32", "sae_lens", "sparsify")
# The BatchTopK family against SAELens's own, at the first size (batch selection: each row's
# latent count varies around k; Matryoshka adds nested prefix losses on the same code).
FAMILY = ("workbench-batchtopk", "workbench-matryoshka", "sae_lens-batchtopk", "sae_lens-matryoshka")
# SAEs sparse by a penalty, against SAELens's own trainers, at the first size. Both libraries
# optimise the same objective: SAELens's loss is Σ‖x − x̂‖² + λ_SL·penalty, ours divides the
# reconstruction by the data's variance V (and an L1 by √V), so λ_SL = λ·√V (L1) or λ·V (L0);
# JumpReLU's bandwidth and initial threshold are ours times the data's scale √V. ReLU-L1 at
# one λ; JumpReLU with the quadratic penalty around L0 = 32, so both land near TopK's L0.
PENALTY = ("workbench-relu", "workbench-jumprelu", "sae_lens-relu", "sae_lens-jumprelu")
RELU_L1 = 0.1
JUMPRELU = dict(target_l0=float(K), target_l0_coefficient=1e-2)
WORKERS = LIBRARIES + FAMILY + PENALTY


def prefixes(d_sae: int) -> list[int]:
    """Matryoshka's nested widths, the same for both libraries: workbench's default."""
    return sorted({max(1, d_sae // 2 ** i) for i in range(4, -1, -1)})


# --- the workers (one subprocess each) ----------------------------------------------------
def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (peak memory needs Linux)")


def _reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux ≥ 4.0), so loading the data does not count."""
    Path("/proc/self/clear_refs").write_text("5")


def _batches(x: torch.Tensor):
    for start in range(0, x.shape[0] - BATCH + 1, BATCH):
        yield x[start:start + BATCH]


def _sae_kwargs(architecture: str, d_sae: int) -> dict:
    return {"matryoshka": {"prefixes": prefixes(d_sae)}, "relu": {"l1_coefficient": RELU_L1},
            "jumprelu": JUMPRELU}.get(architecture, {})


def _train_workbench(x: torch.Tensor, d_sae: int, precision: str, architecture: str = "topk"):
    from workbench.trainer import TrainConfig, train_sae

    cfg = TrainConfig(architecture=architecture, d_sae=d_sae, k=K, batch_size=BATCH, total_tokens=x.shape[0],
                      selection_precision=precision, device="cpu", sae_kwargs=_sae_kwargs(architecture, d_sae))
    sae = train_sae(cfg, _batches(x), progress=False)
    if architecture in ("relu", "jumprelu"):
        _LAST["sae"] = sae.eval()
    if architecture in ("topk", "relu", "jumprelu"):
        sae.eval()
        return lambda rows: sae(rows).x_hat
    # The batch rule on held-out batches of BATCH rows, as SAELens's training SAE applies it
    # (its inference threshold only exists once exported): one rule for both libraries.
    sae.train()
    return lambda rows: sae.decode_sparse(sae.select(sae.pre_acts(rows)))


def _train_sae_lens(x: torch.Tensor, d_sae: int, architecture: str = "topk"):
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())  # V of the comment at PENALTY
    if architecture == "topk":
        sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=K, device="cpu"))
    elif architecture == "relu":
        sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(
            d_in=x.shape[1], d_sae=d_sae, device="cpu", l1_coefficient=RELU_L1 * variance ** 0.5,
            l1_warm_up_steps=x.shape[0] // BATCH // 20))  # our 5% warm-up
    elif architecture == "jumprelu":
        sae = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(
            d_in=x.shape[1], d_sae=d_sae, device="cpu", jumprelu_sparsity_loss_mode="quadratic",
            target_l0=JUMPRELU["target_l0"], l0_coefficient=JUMPRELU["target_l0_coefficient"] * variance,
            jumprelu_bandwidth=1e-3 * variance ** 0.5, jumprelu_init_threshold=1e-3 * variance ** 0.5,
            l0_warm_up_steps=x.shape[0] // BATCH // 20))
    elif architecture == "batchtopk":
        sae = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=K,
                                                                                device="cpu"))
    else:
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=x.shape[1], d_sae=d_sae, k=K, device="cpu", matryoshka_widths=prefixes(d_sae)))
    # LanguageModelSAERunnerConfig's defaults (lr 3e-4 constant; lr_end is only read by cosine schedules).
    cfg = SAETrainerConfig(total_training_samples=x.shape[0], train_batch_size_samples=BATCH, device="cpu",
                           lr=3e-4, lr_end=3e-5, logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg, sae, data_provider=_batches(x))
    trainer.fit()
    sae.eval()
    if architecture in ("relu", "jumprelu"):
        _LAST["sae"] = sae
    return lambda rows: sae(rows)


def _train_sparsify(x: torch.Tensor, d_sae: int):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=K), device="cpu", dtype=torch.float32)
    # sparsify's Trainer defaults: signum + schedule-free, lr 5e-3/√(d_sae/2¹⁴), no AuxK.
    optimizer = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (d_sae / 2**14) ** 0.5)]),
                                    momentum=0.95)
    optimizer.train()
    for step, batch in enumerate(_batches(x)):
        if step == 0:
            sae.b_dec.data = batch.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.eval()  # schedule-free: evaluate at the averaged weights, as sparsify saves them
    return lambda rows: sae(rows).sae_out


def worker(library: str, data_path: str, d_sae: int) -> dict:
    torch.manual_seed(0)
    data = torch.load(data_path)
    train, held_out = data["train"], data["held_out"]
    import sae_lens  # noqa: F401  (imports settle before the memory baseline)
    import sparsify  # noqa: F401

    import workbench  # noqa: F401

    baseline = _status_kib("VmRSS")
    _reset_peak_rss()
    started = time.perf_counter()
    architecture = library.split("-")[1] if library in FAMILY + PENALTY else "topk"
    if library.startswith("workbench"):
        reconstruct = _train_workbench(train, d_sae, "float32" if library.endswith("fp32") else "auto", architecture)
    elif library.startswith("sae_lens"):
        reconstruct = _train_sae_lens(train, d_sae, architecture)
    else:
        reconstruct = _train_sparsify(train, d_sae)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    with torch.no_grad():
        err = total = 0.0
        mean = held_out.double().mean(0)
        for rows in held_out.split(4096):
            err += float((reconstruct(rows).double() - rows.double()).pow(2).sum())
            total += float((rows.double() - mean).pow(2).sum())
    return {"library": library, "tokens_per_s": train.shape[0] / seconds, "seconds": seconds,
            "peak_mib": (peak - baseline) / 1024, "fvu": err / total, "l0": _held_out_l0(library, held_out)}


def _held_out_l0(library: str, held_out: torch.Tensor) -> float | None:
    """Mean active latents per held-out row, for SAEs whose L0 is not fixed by k (recorded by
    the last SAE trained in this process)."""
    sae = _LAST.get("sae")
    if sae is None:
        return None
    with torch.no_grad():
        return float(torch.cat([(sae.encode(rows) != 0).sum(-1) for rows in held_out.split(4096)]).float().mean())


_LAST: dict = {}


# --- the driver ---------------------------------------------------------------------------
def matmul_ceiling(d_in: int, d_sae: int, dtype: torch.dtype) -> float:
    """Best GFLOP/s of a [4096, d_in] × [d_in, d_sae] product into a reused output."""
    a, b = torch.randn(BATCH, d_in, dtype=dtype), torch.randn(d_in, d_sae, dtype=dtype)
    out = torch.empty(BATCH, d_sae, dtype=dtype)
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * BATCH * d_in * d_sae / best / 1e9


def run_size(d_in: int, d_sae: int, tokens: int, folder: Path, family: bool = False,
             only: tuple[str, ...] | None = None) -> list[dict]:
    from workbench import synthetic
    from workbench.sae.sparse_ops import fast_bf16_matmul

    data = synthetic.superposition(d=d_in, n_features=d_sae, avg_active=8, noise=0.01, seed=0)
    path = folder / f"data-{d_in}-{d_sae}.pt"
    # Drawn in batches: one dense [tokens, d_sae] coefficient matrix would not fit in memory.
    train = torch.cat(list(data.batches(BATCH, tokens, seed=1)))
    held_out = torch.cat(list(data.batches(BATCH, HELD_OUT, seed=2)))
    torch.save({"train": train, "held_out": held_out}, path)
    del train, held_out
    rows = []
    for library in only or LIBRARIES + (FAMILY + PENALTY if family else ()):
        done = subprocess.run([sys.executable, __file__, "--worker", library, "--data", str(path), "--d-sae", str(d_sae)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{library} failed at d_in={d_in}, d_sae={d_sae}:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        bf16 = library.startswith("workbench") and library != "workbench-fp32" and fast_bf16_matmul(torch.device("cpu"))
        result["encoder_dtype"] = "bf16 (selection)" if bf16 else "fp32"
        ceiling = matmul_ceiling(d_in, d_sae, torch.bfloat16 if bf16 else torch.float32)
        result["ceiling_gflops"] = ceiling
        result["ceiling_fraction"] = 2 * d_in * d_sae * result["tokens_per_s"] / 1e9 / ceiling
        result.update(d_in=d_in, d_sae=d_sae, tokens=tokens)
        print(json.dumps(result), flush=True)
        rows.append(result)
    return rows


def report(results: list[dict]) -> str:
    header = ["d_in", "d_sae", "library", "encoder matmul", "tokens/s", "× fastest other", "peak MiB", "held-out FVU",
              "matmul ceiling GFLOP/s", "% of ceiling"]
    lines = []
    family = [r for r in results if r["library"] in FAMILY]
    penalty = [r for r in results if r["library"] in PENALTY]
    results = [r for r in results if r["library"] in LIBRARIES]
    for size in sorted({(r["d_in"], r["d_sae"]) for r in results}):
        group = [r for r in results if (r["d_in"], r["d_sae"]) == size]
        fastest_other = max(r["tokens_per_s"] for r in group if not r["library"].startswith("workbench"))
        for r in group:
            lines.append([r["d_in"], r["d_sae"], r["library"], r["encoder_dtype"], f"{r['tokens_per_s']:,.0f}",
                          f"{r['tokens_per_s'] / fastest_other:.2f}", f"{r['peak_mib']:,.0f}", f"{r['fvu']:.4f}",
                          f"{r['ceiling_gflops']:.0f}", f"{100 * r['ceiling_fraction']:.0f}%"])
    tokens = ", ".join(f"{d}/{m}: {t:,} tokens" for d, m, t in sorted({(r['d_in'], r['d_sae'], r['tokens']) for r in results}))
    return "\n".join([
        "## bench_train: TopK SAE training, workbench vs SAELens vs sparsify",
        "",
        f"`.venv/bin/python benchmarks/bench_train.py` on {machine()}. k={K}, batch {BATCH}, {tokens}; "
        "synthetic superposition data (d_sae true features, ~8 active per row, noise 0.01); each library with "
        "its own default optimiser and lr; held-out FVU on 16,384 unseen rows. `workbench-fp32` is workbench "
        "with `selection_precision=\"float32\"` (no bf16 anywhere). Peak MiB: max RSS above the RSS with the "
        "data loaded. % of ceiling: the encoder's 2·d_in·d_sae FLOPs per token at this speed over the "
        "machine's best matmul in that dtype.",
        "",
        table(header, lines),
        *family_report(family, results),
        *penalty_report(penalty, results),
    ])


def penalty_report(penalty: list[dict], topk: list[dict]) -> list[str]:
    """ReLU-L1 and JumpReLU, each library's against the other's same architecture and our TopK."""
    if not penalty:
        return []
    lines = []
    for r in penalty:
        library, architecture = r["library"].split("-")
        ours_topk = next(t for t in topk if t["library"] == "workbench" and (t["d_in"], t["d_sae"]) == (r["d_in"], r["d_sae"]))
        other = next(o for o in penalty if o["library"] == f"{'sae_lens' if library == 'workbench' else 'workbench'}-{architecture}")
        lines.append([r["d_in"], r["d_sae"], library, architecture, f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}", f"{r['tokens_per_s'] / ours_topk['tokens_per_s']:.2f}",
                      f"{r['peak_mib']:,.0f}", f"{r['l0']:.1f}", f"{r['fvu']:.4f}"])
    return ["", f"SAEs sparse by a penalty, on the same data and steps, both libraries optimising the same objective "
            f"(λ converted between the two losses' normalisations; see PENALTY in the script): ReLU-L1 at λ = {RELU_L1} "
            f"(L1 weighted by decoder norms, 5% warm-up), JumpReLU with the quadratic penalty around L0 = {K} "
            "(Gemma Scope 2), bandwidth and initial θ 0.001 of the data's scale. Each library with its own optimiser "
            "defaults. Held-out L0 and FVU with each SAE's inference rule.", "",
            table(["d_in", "d_sae", "library", "architecture", "tokens/s", "× other library", "× our TopK", "peak MiB",
                   "held-out L0", "held-out FVU"], lines)]


def family_report(family: list[dict], topk: list[dict]) -> list[str]:
    """BatchTopK and Matryoshka, each library's against its own TopK and the other's same architecture."""
    if not family:
        return []
    lines = []
    for r in family:
        library, architecture = r["library"].split("-")
        own_topk = next(t for t in topk if t["library"] == library and (t["d_in"], t["d_sae"]) == (r["d_in"], r["d_sae"]))
        other = next(o for o in family if o["library"] == f"{'sae_lens' if library == 'workbench' else 'workbench'}-{architecture}")
        lines.append([r["d_in"], r["d_sae"], library, architecture, f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s'] / own_topk['tokens_per_s']:.2f}", f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}",
                      f"{r['peak_mib']:,.0f}", f"{r['fvu']:.4f}"])
    return ["", "The BatchTopK family on the same data and steps (k = 32 on average per row; Matryoshka's nested "
            f"widths {prefixes(family[0]['d_sae'])}, level losses summed in both libraries). Held-out FVU with the batch "
            "rule on held-out batches of 4,096 rows for both (SAELens's training SAE has no other rule before export).",
            "", table(["d_in", "d_sae", "library", "architecture", "tokens/s", "× own TopK", "× other library",
                       "peak MiB", "held-out FVU"], lines)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; print, do not write RESULTS.md")
    parser.add_argument("--only", nargs="+", choices=WORKERS, help="run these workers at the first size; print only")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--d-sae", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.d_sae)))
        return
    results = []
    if args.only:
        with tempfile.TemporaryDirectory() as folder:
            run_size(*(QUICK_SIZES if args.quick else SIZES)[0], Path(folder), only=tuple(args.only))
        return
    with tempfile.TemporaryDirectory() as folder:
        for i, (d_in, d_sae, tokens) in enumerate(QUICK_SIZES if args.quick else SIZES):
            results += run_size(d_in, d_sae, tokens, Path(folder), family=i == 0)
    body = report(results)
    print(body)
    if not args.quick:
        write_section("bench_train", body)


if __name__ == "__main__":
    main()
