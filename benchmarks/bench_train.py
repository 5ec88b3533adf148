"""TopK SAE training speed: workbench vs SAELens vs EleutherAI sparsify, in one run.

    .venv/bin/python benchmarks/bench_train.py            # writes the bench_train section
    .venv/bin/python benchmarks/bench_train.py --quick    # tiny sizes, prints only
    .venv/bin/python benchmarks/bench_train.py --resume runs.jsonl   # keeps finished workers

Each library trains a TopK SAE (k=32) on the same synthetic superposition data (the same
rows in the same order, batch 4096) for the same number of tokens, with its own training
step, twice: at its own default optimiser settings, as a user of that library would get
them, and with Adam at one shared lr (SHARED_LR), so a gap in quality cannot come from one
library's lr alone. Both on two data generators (GENERATORS) that differ in feature count,
frequency law and magnitude distribution, so no default is tuned to one data set:

- workbench: ``train_sae`` (Adam, default lr, AuxK, unit-norm decoder, clipping);
- SAELens: ``SAETrainer`` on a ``TopKTrainingSAE`` (its defaults: Adam 3e-4, AuxK, decoder
  norm folded into the activations);
- sparsify: ``SparseCoder`` stepped as its ``Trainer`` steps it (default signum optimiser
  with schedule-free averaging, unit-norm decoder, b_dec initialised to the mean; its
  trainer needs a Hugging Face model, so the loop is reproduced around the SparseCoder).

With the shared lr, workbench keeps its schedule (warm-up, final decay, clipping), SAELens its
constant schedule, and sparsify swaps signum + schedule-free for plain Adam at a constant lr.

Every library runs in its own subprocess, so peak memory (max RSS above the RSS with the
data loaded) is its own. Held-out FVU is computed the same way for all (float64 sums) on
rows none of them trained on, and MMCS of each decoder against the true features. Tokens/s
counts the whole training call after the data is in memory. The matmul ceiling is this machine's best [4096, d_in] × [d_in, d_sae] product in
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
from results import append_record, commit, machine, read_record, table, write_section  # noqa: E402

K, BATCH = 32, 4096
# (d_in, d_sae, training tokens): the two sizes the target names.
SIZES = [(256, 2048, 1_048_576), (768, 16384, 262_144)]
QUICK_SIZES = [(64, 256, 32_768)]  # 8 batches: the interleaved checks leave 3 out as warm-up
HELD_OUT = 16_384
LIBRARIES = ("workbench", "workbench-fp32", "sae_lens", "sparsify")
# The same three at one shared Adam lr: 2e-3, the lr at which sparsify with plain Adam beat
# our defaults at 768 / 16,384 in an earlier measurement (see bench_topk_ablations.py).
SHARED_LR = 2e-3
SHARED = ("workbench-shared_lr", "sae_lens-shared_lr", "sparsify-shared_lr")
# Two data generators: A as the benchmark always had (one true feature per latent, frequency
# exponent 0.5, magnitudes |N(0,1)| + 0.5); B with twice as many true features as latents, a
# steeper frequency law and Exp(1) magnitudes (many near-zero activations, a heavy tail).
GENERATORS = {"A": dict(features_per_latent=1, exponent=0.5, magnitudes="folded_normal"),
              "B": dict(features_per_latent=2, exponent=1.0, magnitudes="exponential")}
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
WORKERS = LIBRARIES + SHARED + FAMILY + PENALTY


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


def _our_config(architecture: str, d_sae: int, tokens: int, **settings):
    """Our TrainConfig for a run of ``tokens`` rows at this benchmark's k and batch, on CPU
    (``settings``: lr, selection precision), as every workbench worker and check trains."""
    from workbench.trainer import TrainConfig

    return TrainConfig(architecture=architecture, d_sae=d_sae, k=K, batch_size=BATCH, total_tokens=tokens,
                       device="cpu", sae_kwargs=_sae_kwargs(architecture, d_sae), **settings)


def _our_trainer(architecture: str, d_sae: int, x: torch.Tensor):
    """A fresh SAE and trainer for a whole run over ``x``, started from its first batch as
    ``train_sae`` starts one: the interleaved checks step it themselves."""
    from workbench.trainer.loop import new_trainer

    return new_trainer(_our_config(architecture, d_sae, x.shape[0]), x[:BATCH], x[:BATCH], torch.device("cpu"))


def _train_workbench(x: torch.Tensor, d_sae: int, precision: str, architecture: str = "topk", lr: float | None = None):
    from workbench.trainer import train_sae

    cfg = _our_config(architecture, d_sae, x.shape[0], lr=lr, selection_precision=precision)
    sae = train_sae(cfg, _batches(x), progress=False)
    _LAST["decoder"] = sae.W_dec
    if architecture in ("relu", "jumprelu"):
        _LAST["sae"] = sae.eval()
    if architecture in ("topk", "relu", "jumprelu"):
        sae.eval()
        return lambda rows: sae(rows).x_hat
    # The batch rule on held-out batches of BATCH rows, as SAELens's training SAE applies it
    # (its inference threshold only exists once exported): one rule for both libraries.
    sae.train()
    return lambda rows: sae.decode_sparse(sae.select(sae.pre_acts(rows)))


def _train_sae_lens(x: torch.Tensor, d_sae: int, architecture: str = "topk", lr: float = 3e-4, data=None):
    """``data``: the batches SAELens's trainer draws (default: x's, in order)."""
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
                           lr=lr, lr_end=lr / 10, logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg, sae, data_provider=_batches(x) if data is None else data)
    trainer.fit()
    sae.eval()
    _LAST["decoder"] = sae.W_dec
    if architecture in ("relu", "jumprelu"):
        _LAST["sae"] = sae
    return lambda rows: sae(rows)


def _sparsify_stepper(d_in: int, d_sae: int, adam_lr: float | None = None):
    """A sparsify SparseCoder, its optimiser, and ``step(batch)``: one step as its Trainer takes it."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=K), device="cpu", dtype=torch.float32)
    if adam_lr is None:
        # sparsify's Trainer defaults: signum + schedule-free, lr 5e-3/√(d_sae/2¹⁴), no AuxK.
        optimizer = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (d_sae / 2**14) ** 0.5)]),
                                        momentum=0.95)
        optimizer.train()
    else:  # its Trainer's "adam" option, at a constant lr
        optimizer = torch.optim.Adam(sae.parameters(), lr=adam_lr)
    started = []

    def step(batch: torch.Tensor) -> None:
        if not started:
            sae.b_dec.data = batch.mean(0)
            started.append(True)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(batch)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return sae, optimizer, step


def _train_sparsify(x: torch.Tensor, d_sae: int, adam_lr: float | None = None):
    sae, optimizer, step = _sparsify_stepper(x.shape[1], d_sae, adam_lr)
    for batch in _batches(x):
        step(batch)
    if adam_lr is None:
        optimizer.eval()  # schedule-free: evaluate at the averaged weights, as sparsify saves them
    _LAST["decoder"] = sae.W_dec
    return lambda rows: sae(rows).sae_out


def _median(values: list[float]) -> float:
    """The upper median: the interleaved checks' summary of per-step times and ratios."""
    return sorted(values)[len(values) // 2]


def interleaved(data_path: str, d_sae: int) -> dict:
    """Step times of our ``train_sae`` and both sparsify settings taken in turn on each batch,
    in one process: a drift in the machine's speed (other tenants of a shared host) slows
    all three alike, where sequential worker runs minutes apart can differ by it. Our time
    per step is the time between two batches drawn by train_sae (its whole loop); the
    first three steps are left out as warm-up. Ratios are medians of per-batch ratios. The
    whole run (every batch of the data): a step's cost changes as training goes on (the
    first steps ran at 1.41× sparsify's speed, the last at 1.68×, at 256/2,048)."""
    from workbench.trainer import train_sae

    torch.manual_seed(0)
    x = torch.load(data_path)["train"]
    others = {"sparsify": _sparsify_stepper(x.shape[1], d_sae)[2],
              "sparsify-shared_lr": _sparsify_stepper(x.shape[1], d_sae, SHARED_LR)[2]}
    times: dict[str, list[float]] = {"workbench": [], **{name: [] for name in others}}

    def stream():
        drawn = None
        for batch in _batches(x):
            if drawn is not None:
                times["workbench"].append(time.perf_counter() - drawn)
            for name, step in others.items():
                started = time.perf_counter()
                step(batch)
                times[name].append(time.perf_counter() - started)
            drawn = time.perf_counter()
            yield batch

    train_sae(_our_config("topk", d_sae, x.shape[0]), stream(), progress=False)
    n = len(times["workbench"])  # the last batch's step has no next draw to end it
    times = {name: t[3:n] for name, t in times.items()}
    return {"library": "interleaved", "steps": len(times["workbench"]),
            "step_ms": {name: 1000 * _median(t) for name, t in times.items()},
            "speedup": {name: _median([o / w for o, w in zip(times[name], times["workbench"])]) for name in others}}


def worker(library: str, data_path: str, d_sae: int) -> dict:
    torch.manual_seed(0)
    data = torch.load(data_path)
    train, held_out, features = data["train"], data["held_out"], data["features"]
    import sae_lens  # noqa: F401  (imports settle before the memory baseline)
    import sparsify  # noqa: F401

    import workbench  # noqa: F401

    baseline = _status_kib("VmRSS")
    _reset_peak_rss()
    started = time.perf_counter()
    architecture = library.split("-")[1] if library in FAMILY + PENALTY else "topk"
    shared = library in SHARED
    if library.startswith("workbench"):
        reconstruct = _train_workbench(train, d_sae, "float32" if library.endswith("fp32") else "auto", architecture,
                                       lr=SHARED_LR if shared else None)
    elif library.startswith("sae_lens"):
        reconstruct = _train_sae_lens(train, d_sae, architecture, **({"lr": SHARED_LR} if shared else {}))
    else:
        reconstruct = _train_sparsify(train, d_sae, adam_lr=SHARED_LR if shared else None)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    with torch.no_grad():
        err = total = 0.0
        mean = held_out.double().mean(0)
        for rows in held_out.split(4096):
            err += float((reconstruct(rows).double() - rows.double()).pow(2).sum())
            total += float((rows.double() - mean).pow(2).sum())
    from workbench.synthetic import mmcs

    return {"library": library, "tokens_per_s": train.shape[0] / seconds, "seconds": seconds,
            "peak_mib": (peak - baseline) / 1024, "fvu": err / total, "l0": _held_out_l0(library, held_out),
            "mmcs": mmcs(_LAST["decoder"].detach().float(), features)}


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


def workers_for(d_sae: int, generator: str, family: bool) -> tuple[str, ...]:
    """The workers of one (size, generator), leaving out runs identical to another:
    ``workbench-fp32`` where bf16 selection is not fast (``workbench`` selects in float32
    there), and ``workbench-shared_lr`` where our default lr is the shared one."""
    from workbench.sae.sparse_ops import fast_bf16_matmul
    from workbench.trainer import default_lr

    same = {"workbench-fp32"} if not fast_bf16_matmul(torch.device("cpu")) else set()
    if abs(default_lr(d_sae) - SHARED_LR) < 1e-9:
        same.add("workbench-shared_lr")
    extra = FAMILY + PENALTY if family and generator == "A" else ()
    return tuple(w for w in LIBRARIES + SHARED + extra if w not in same)


def make_data(d_in: int, d_sae: int, tokens: int, generator: str, path: Path) -> None:
    from workbench import synthetic

    settings = GENERATORS[generator]
    data = synthetic.superposition(d=d_in, n_features=d_sae * settings["features_per_latent"], avg_active=8,
                                   exponent=settings["exponent"], noise=0.01, seed=0, magnitudes=settings["magnitudes"])
    # Drawn in batches: one dense [tokens, n_features] coefficient matrix would not fit in memory.
    train = torch.cat(list(data.batches(BATCH, tokens, seed=1)))
    held_out = torch.cat(list(data.batches(BATCH, HELD_OUT, seed=2)))
    torch.save({"train": train, "held_out": held_out, "features": data.features}, path)


def run_size(d_in: int, d_sae: int, tokens: int, generator: str, folder: Path, workers: tuple[str, ...],
             done: list[dict], record: Path | None = None) -> list[dict]:
    """Run the workers not already in ``done`` (a resumed run's records) on one data set;
    append each result to ``record`` as it finishes, so a stopped run loses one worker at most."""
    from workbench.sae.sparse_ops import fast_bf16_matmul

    key = dict(d_in=d_in, d_sae=d_sae, tokens=tokens, generator=generator)
    rows = [r for r in done if all(r.get(k) == v for k, v in key.items()) and r["library"] in workers]
    # SAELens last: it is the slowest by far, so a run stopped early has the closest comparisons.
    todo = sorted((w for w in workers if w not in {r["library"] for r in rows}), key=lambda w: w.startswith("sae_lens"))
    if not todo:
        return rows
    path = folder / f"data-{d_in}-{d_sae}-{generator}.pt"
    make_data(d_in, d_sae, tokens, generator, path)
    for library in todo:
        process = subprocess.run([sys.executable, __file__, "--worker", library, "--data", str(path), "--d-sae", str(d_sae)],
                                 capture_output=True, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"{library} failed at d_in={d_in}, d_sae={d_sae}, data {generator}:\n{process.stderr[-3000:]}")
        result = json.loads(process.stdout.strip().splitlines()[-1])
        bf16 = library.startswith("workbench") and library != "workbench-fp32" and fast_bf16_matmul(torch.device("cpu"))
        result["encoder_dtype"] = "bf16 (selection)" if bf16 else "fp32"
        ceiling = matmul_ceiling(d_in, d_sae, torch.bfloat16 if bf16 else torch.float32)
        result["ceiling_gflops"] = ceiling
        result["ceiling_fraction"] = 2 * d_in * d_sae * result["tokens_per_s"] / 1e9 / ceiling
        result.update(key, commit=commit())
        print(json.dumps(result), flush=True)
        if record is not None:
            append_record(record, result)
        rows.append(result)
    return rows



def interleaved_penalty(data_path: str, d_sae: int, architecture: str) -> dict:
    """Whole training runs of our ReLU-L1 or JumpReLU SAE and SAELens's same architecture,
    taken a step of each in turn on the same batches in one process (as ``interleaved``):
    SAELens's trainer draws each batch, and before handing it over the stream steps our
    trainer on it. The whole run, not a few steps: the cost of a penalty SAE's step falls as
    its L0 does. Our time per step is ``SAETrainer.step``'s (what ``train_sae`` calls per
    batch), SAELens's the time between two of its draws (its whole loop)."""
    torch.manual_seed(0)
    x = torch.load(data_path)["train"]
    ours = _our_trainer(architecture, d_sae, x)
    times: dict[str, list[float]] = {"workbench": [], "sae_lens": []}

    def stream():
        drawn = None
        for batch in _batches(x):
            started = time.perf_counter()
            if drawn is not None:
                times["sae_lens"].append(started - drawn)
            ours.step(batch)
            times["workbench"].append(time.perf_counter() - started)
            drawn = time.perf_counter()
            yield batch

    _train_sae_lens(x, d_sae, architecture, data=stream())
    n = len(times["sae_lens"])  # SAELens's last step has no next draw to end it
    total = {name: sum(t[:n]) for name, t in times.items()}
    return {"library": f"interleaved-{architecture}", "steps": n,
            "tokens_per_s": {name: n * BATCH / seconds for name, seconds in total.items()},
            "speedup": total["sae_lens"] / total["workbench"]}


def interleaved_family(data_path: str, d_sae: int) -> dict:
    """Our TopK, BatchTopK and Matryoshka stepped in turn on the same batches in one process
    (``SAETrainer.step``, what ``train_sae`` calls per batch), as ``interleaved``: the
    family's target is a ratio to our own TopK, which sequential runs minutes apart on a
    drifting host cannot measure. Whole runs, as ``interleaved``."""
    x = torch.load(data_path)["train"]
    trainers = {architecture: _our_trainer(architecture, d_sae, x) for architecture in ("topk", "batchtopk", "matryoshka")}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for batch in _batches(x):
        for name, trainer in trainers.items():
            started = time.perf_counter()
            trainer.step(batch)
            times[name].append(time.perf_counter() - started)
    times = {name: t[3:] for name, t in times.items()}
    return {"library": "interleaved-family", "steps": len(times["topk"]),
            "step_ms": {name: 1000 * _median(t) for name, t in times.items()},
            "of_topk": {name: _median([a / b for a, b in zip(times["topk"], t)]) for name, t in times.items()}}


def run_interleaved(d_in: int, d_sae: int, tokens: int, folder: Path, record: Path | None, kind: str = "topk") -> dict:
    """``interleaved`` (kind "topk"), ``interleaved_family`` ("family") or ``interleaved_penalty``
    ("relu" or "jumprelu") at one size on data A, in its own process; appended to ``record``."""
    path = folder / f"data-{d_in}-{d_sae}-{tokens}-A.pt"
    if not path.exists():
        make_data(d_in, d_sae, tokens, "A", path)
    process = subprocess.run([sys.executable, __file__, "--interleaved-worker", kind, "--data", str(path),
                              "--d-sae", str(d_sae)], capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"the interleaved step check failed at d_in={d_in}, d_sae={d_sae}:\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result.update(d_in=d_in, d_sae=d_sae, tokens=tokens, generator="A", commit=commit())
    print(json.dumps(result), flush=True)
    if record is not None:
        append_record(record, result)
    return result


def interleaved_report(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [[r["d_in"], r["d_sae"], r["steps"], *(f"{r['step_ms'][n]:,.0f}" for n in ("workbench", "sparsify",
             "sparsify-shared_lr")), f"{r['speedup']['sparsify']:.2f}", f"{r['speedup']['sparsify-shared_lr']:.2f}",
              r["commit"]] for r in sorted(rows, key=lambda r: (r["d_in"], r["d_sae"]))]
    return ["", "Step times taken in turn on the same batches in one process (`--interleaved`; data A, used for the verdicts on both data sets), so that a "
            "change in the machine's speed during the runs above, which take minutes each, cannot favour either "
            "library: our time per step is the whole `train_sae` loop's, over the whole run of the size above; medians "
            "after three warm-up steps, and the speed-ups are medians of per-batch ratios.", "",
            table(["d_in", "d_sae", "steps", "workbench ms", "sparsify ms (defaults)", "sparsify ms (Adam)",
                   "× sparsify (defaults)", "× sparsify (Adam)", "commit"], lines)]


def _setting(library: str, d_sae: int) -> str:
    from workbench.trainer import default_lr

    if library.endswith("shared_lr"):
        return f"Adam {SHARED_LR:g}"
    if library.startswith("workbench"):
        return f"default (Adam {default_lr(d_sae):.2g})"
    return {"sae_lens": "default (Adam 3e-4)",
            "sparsify": f"default (signum {5e-3 / (d_sae / 2**14) ** 0.5:.2g}, schedule-free)"}[library]


def missing_workers(done: list[dict], sizes: list[tuple[int, int, int]]) -> list[tuple[str, int, int, str]]:
    """(worker, d_in, d_sae, generator) of every run a full benchmark has that ``done`` lacks."""
    missing = []
    for i, (d_in, d_sae, tokens) in enumerate(sizes):
        for generator in GENERATORS:
            have = {r["library"] for r in done if (r["d_in"], r["d_sae"], r["tokens"], r["generator"]) == (d_in, d_sae, tokens, generator)}
            missing += [(w, d_in, d_sae, generator) for w in workers_for(d_sae, generator, i == 0) if w not in have]
    return missing


def _latest(checks) -> list[dict]:
    """The last interleaved check of each kind and size in the record (earlier ones were
    taken at older commits, some over the first steps of a run only)."""
    return list({(r["library"], r["d_in"], r["d_sae"]): r for r in checks}.values())


def report(results: list[dict], missing: list[tuple[str, int, int, str]]) -> str:
    header = ["d_in", "d_sae", "data", "library", "optimiser", "encoder matmul", "tokens/s", "× fastest other default",
              "peak MiB", "held-out FVU", "MMCS", "% of matmul ceiling"]
    lines, targets = [], []
    family = [r for r in results if r["library"] in FAMILY]
    penalty = [r for r in results if r["library"] in PENALTY]
    steps = _latest(r for r in results if r["library"] == "interleaved")
    penalty_steps = _latest(r for r in results if r["library"] in ("interleaved-relu", "interleaved-jumprelu"))
    family_steps = _latest(r for r in results if r["library"] == "interleaved-family")
    results = [r for r in results if r["library"] in LIBRARIES + SHARED]
    for size in sorted({(r["d_in"], r["d_sae"], r["generator"]) for r in results}):
        group = [r for r in results if (r["d_in"], r["d_sae"], r["generator"]) == size]
        others = [r for r in group if not r["library"].startswith("workbench")]
        fastest_other = max((r["tokens_per_s"] for r in others if r["library"] not in SHARED), default=float("nan"))
        for r in group:
            lines.append([r["d_in"], r["d_sae"], r["generator"], r["library"].split("-")[0], _setting(r["library"], r["d_sae"]),
                          r["encoder_dtype"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / fastest_other:.2f}",
                          f"{r['peak_mib']:,.0f}", f"{r['fvu']:.4f}", f"{r['mmcs']:.3f}",
                          f"{100 * r['ceiling_fraction']:.0f}%"])
        ours = next((r for r in group if r["library"] == "workbench"), None)
        if ours and others:
            best = min(others, key=lambda r: r["fvu"])
            # The interleaved step check, where it measured that run: unlike the runs above, a
            # change in the machine's speed between runs cannot enter it, so the verdict uses it.
            check = next((r for r in steps if (r["d_in"], r["d_sae"]) == size[:2]), None)
            interleaved_speedup = (check or {}).get("speedup", {}).get(best["library"])
            speedup = interleaved_speedup or ours["tokens_per_s"] / best["tokens_per_s"]
            targets.append([size[0], size[1], size[2], f"{ours['fvu']:.4f}", f"{best['library'].split('-')[0]}, "
                            f"{_setting(best['library'], best['d_sae'])}", f"{best['fvu']:.4f}",
                            f"{ours['tokens_per_s'] / best['tokens_per_s']:.2f}",
                            "—" if interleaved_speedup is None else f"{interleaved_speedup:.2f}",
                            "open: runs missing" if any(m[1:] == size for m in missing)
                            else "yes" if ours["fvu"] <= best["fvu"] and speedup >= 2 else "no"])
    tokens = ", ".join(f"{d}/{m}: {t:,} tokens" for d, m, t in sorted({(r['d_in'], r['d_sae'], r['tokens']) for r in results}))
    commits = sorted({r["commit"] for r in results + family + penalty})
    generators = "; ".join(f"{name}: {v['features_per_latent']}× d_sae true features, frequency exponent {v['exponent']}, "
                           f"{'|N(0,1)| + 0.5' if v['magnitudes'] == 'folded_normal' else 'Exp(1)'} magnitudes"
                           for name, v in GENERATORS.items())
    return "\n".join([
        "## bench_train: TopK SAE training, workbench vs SAELens vs sparsify",
        "",
        f"`.venv/bin/python benchmarks/bench_train.py` on {machine()}, commit{'s' if len(commits) > 1 else ''} "
        f"{', '.join(commits)}. k={K}, batch {BATCH}, {tokens}; synthetic superposition data, ~8 active features per "
        f"row, noise 0.01, two generators ({generators}). Each library at its own default optimiser and lr, and with "
        f"Adam at a shared lr {SHARED_LR:g} (workbench keeps its warm-up, decay and clipping; SAELens its constant "
        "schedule; sparsify plain Adam at a constant lr). Held-out FVU on 16,384 unseen rows; MMCS of the decoder "
        "against the true features. Where our default lr is the shared one (d_sae 16,384), one workbench run stands "
        "for both settings; `workbench-fp32` (no bf16 anywhere) only runs where bf16 selection is fast. Peak "
        "MiB: max RSS above the RSS with the data loaded. % of matmul ceiling: the encoder's 2·d_in·d_sae FLOPs per "
        "token at this speed over the machine's best matmul in that dtype, measured after each run (on a shared host "
        "whose speed drifts, a run in a fast phase can read above 100%). Rows of different commits ran in different "
        "sessions: their tokens/s are not comparable with each other; the interleaved checks below are.",
        "",
        table(header, lines),
        "",
        "The target: our defaults at an FVU equal to or better than the best other run (either library, either "
        "optimiser setting) on the same data, at ≥ 2× that run's speed: the interleaved step check's speed-up "
        "where it measured that run (below), else the ratio of the runs' tokens/s.",
        "",
        table(["d_in", "d_sae", "data", "our FVU", "best other run", "its FVU", "our tokens/s ÷ its",
               "interleaved speed-up", "met"], targets),
        *(["", "Not run yet: " + ", ".join(f"{w} at {d}/{m} data {g}" for w, d, m, g in missing) + "."] if missing else []),
        *interleaved_report(steps),
        *family_report(family, [r for r in results if r["generator"] == "A"], family_steps),
        *penalty_report(penalty, [r for r in results if r["generator"] == "A"], penalty_steps),
    ])


def _ratio(row: dict, other: dict | None) -> str:
    """row's tokens/s over other's, or — where other has not run (a partial record)."""
    return "—" if other is None else f"{row['tokens_per_s'] / other['tokens_per_s']:.2f}"


def _partner(rows: list[dict], library: str, architecture: str) -> dict | None:
    """The other library's run of the same architecture."""
    name = f"{'sae_lens' if library == 'workbench' else 'workbench'}-{architecture}"
    return next((o for o in rows if o["library"] == name), None)


def penalty_report(penalty: list[dict], topk: list[dict], checks: list[dict] = ()) -> list[str]:
    """ReLU-L1 and JumpReLU, each library's against the other's same architecture and our TopK."""
    if not penalty:
        return []
    lines = []
    for r in penalty:
        library, architecture = r["library"].split("-")
        ours_topk = next((t for t in topk if t["library"] == "workbench" and (t["d_in"], t["d_sae"]) == (r["d_in"], r["d_sae"])),
                         None)
        lines.append([r["d_in"], r["d_sae"], library, architecture, f"{r['tokens_per_s']:,.0f}",
                      _ratio(r, _partner(penalty, library, architecture)), _ratio(r, ours_topk),
                      f"{r['peak_mib']:,.0f}", f"{r['l0']:.1f}", f"{r['fvu']:.4f}"])
    return ["", f"SAEs sparse by a penalty, on the same data and steps, both libraries optimising the same objective "
            f"(λ converted between the two losses' normalisations; see PENALTY in the script): ReLU-L1 at λ = {RELU_L1} "
            f"(L1 weighted by decoder norms, 5% warm-up), JumpReLU with the quadratic penalty around L0 = {K} "
            "(Gemma Scope 2), bandwidth and initial θ 0.001 of the data's scale. Each library with its own optimiser "
            "defaults. Held-out L0 and FVU with each SAE's inference rule.", "",
            table(["d_in", "d_sae", "library", "architecture", "tokens/s", "× other library", "× our TopK", "peak MiB",
                   "held-out L0", "held-out FVU"], lines), *_penalty_checks(checks)]


def _penalty_checks(checks) -> list[str]:
    if not checks:
        return []
    lines = [[r["d_in"], r["d_sae"], r["library"].split("-")[1], r["steps"], f"{r['tokens_per_s']['workbench']:,.0f}",
              f"{r['tokens_per_s']['sae_lens']:,.0f}", f"{r['speedup']:.2f}", r["commit"]] for r in checks]
    return ["", "The same two trainings again, a step of each in turn on the same batches in one process "
            "(`--interleaved`), so that a change in the machine's speed between the runs above cannot favour either "
            "library: tokens/s over the whole run.", "",
            table(["d_in", "d_sae", "architecture", "steps", "workbench tokens/s", "SAELens tokens/s",
                   "workbench ÷ SAELens", "commit"], lines)]


def family_report(family: list[dict], topk: list[dict], checks: list[dict] = ()) -> list[str]:
    """BatchTopK and Matryoshka, each library's against its own TopK and the other's same architecture."""
    if not family:
        return []
    lines = []
    for r in family:
        library, architecture = r["library"].split("-")
        own_topk = next((t for t in topk if t["library"] == library and (t["d_in"], t["d_sae"]) == (r["d_in"], r["d_sae"])),
                        None)
        lines.append([r["d_in"], r["d_sae"], library, architecture, f"{r['tokens_per_s']:,.0f}",
                      _ratio(r, own_topk), _ratio(r, _partner(family, library, architecture)),
                      f"{r['peak_mib']:,.0f}", f"{r['fvu']:.4f}"])
    return ["", "The BatchTopK family on the same data and steps (k = 32 on average per row; Matryoshka's nested "
            f"widths {prefixes(family[0]['d_sae'])}, level losses summed in both libraries). Held-out FVU with the batch "
            "rule on held-out batches of 4,096 rows for both (SAELens's training SAE has no other rule before export).",
            "", table(["d_in", "d_sae", "library", "architecture", "tokens/s", "× own TopK", "× other library",
                       "peak MiB", "held-out FVU"], lines), *_family_checks(checks)]


def _family_checks(checks) -> list[str]:
    if not checks:
        return []
    lines = [[r["d_in"], r["d_sae"], r["steps"], *(f"{r['step_ms'][a]:,.0f}" for a in ("topk", "batchtopk", "matryoshka")),
              f"{r['of_topk']['batchtopk']:.2f}", f"{r['of_topk']['matryoshka']:.2f}", r["commit"]] for r in checks]
    return ["", "Our three stepped in turn on the same batches in one process (`--interleaved`; the target: each at "
            "≥ 0.77× our TopK's speed, i.e. within 1.3× of its step time), over the whole run of the size above: "
            "medians after three warm-up steps, speeds relative to TopK as medians of per-batch ratios.", "",
            table(["d_in", "d_sae", "steps", "TopK ms", "BatchTopK ms", "Matryoshka ms", "BatchTopK × TopK",
                   "Matryoshka × TopK", "commit"], lines)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; print, do not write RESULTS.md")
    parser.add_argument("--only", nargs="+", choices=WORKERS, help="run these workers at the first size; print only")
    parser.add_argument("--data-generator", choices=tuple(GENERATORS), default="A", help="the data set --only uses")
    parser.add_argument("--resume", type=Path, help="a JSON-lines file of finished workers: they are kept, not rerun, "
                        "and each worker that finishes is appended (a stopped run loses one worker at most)")
    parser.add_argument("--partial", action="store_true", help="with --resume: write the section from the finished "
                        "workers alone, naming those not run yet; trains nothing")
    parser.add_argument("--interleaved", action="store_true", help="only the interleaved step-time check at every "
                        "size (appended to --resume's record, then the section is written from the record)")
    parser.add_argument("--skip", nargs="+", choices=("sae_lens", "sparsify"), help="leave this library's workers "
                        "out of this run (with --resume: run them later; the section names them as missing)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-worker", choices=("topk", "family", "relu", "jumprelu"), help=argparse.SUPPRESS)
    parser.add_argument("--checks", nargs="+", choices=("topk", "family", "relu", "jumprelu"),
                        default=["topk", "family", "relu", "jumprelu"], help="with --interleaved: which checks to run")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--d-sae", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.d_sae)))
        return
    if args.interleaved_worker == "topk":
        print(json.dumps(interleaved(args.data, args.d_sae)))
        return
    if args.interleaved_worker == "family":
        print(json.dumps(interleaved_family(args.data, args.d_sae)))
        return
    if args.interleaved_worker:
        print(json.dumps(interleaved_penalty(args.data, args.d_sae, args.interleaved_worker)))
        return
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.interleaved:
        with tempfile.TemporaryDirectory() as folder:
            if "topk" in args.checks:
                for d_in, d_sae, tokens in sizes:
                    run_interleaved(d_in, d_sae, tokens, Path(folder), args.resume)
            d_in, d_sae, tokens = sizes[0]  # the family's and the penalty SAEs' size
            if "family" in args.checks:
                run_interleaved(d_in, d_sae, tokens, Path(folder), args.resume, "family")
            for kind in ("relu", "jumprelu"):
                if kind in args.checks:
                    run_interleaved(d_in, d_sae, tokens, Path(folder), args.resume, kind)
        if args.resume and not args.quick:
            done = read_record(args.resume)
            write_section("bench_train", report(done, missing_workers(done, SIZES)))
        return
    if args.partial:
        if not (args.resume and args.resume.exists()):
            parser.error("--partial needs --resume FILE, the record of an earlier run")
        done = read_record(args.resume)
        write_section("bench_train", report(done, missing_workers(done, SIZES)))
        return
    if args.only:
        with tempfile.TemporaryDirectory() as folder:
            run_size(*sizes[0], args.data_generator, Path(folder), tuple(args.only), done=[])
        return
    done = read_record(args.resume) if args.resume else []
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for i, (d_in, d_sae, tokens) in enumerate(sizes):
            for generator in GENERATORS:
                workers = tuple(w for w in workers_for(d_sae, generator, family=i == 0)
                                if not any(w.startswith(library) for library in args.skip or ()))
                results += run_size(d_in, d_sae, tokens, generator, Path(folder), workers,
                                    done, args.resume)
    results = read_record(args.resume) if args.resume else results  # with runs of other libraries (--skip)
    body = report(results, missing_workers(results, sizes))
    print(body)
    if not args.quick:
        write_section("bench_train", body)


if __name__ == "__main__":
    main()
