"""``train_sae`` / ``train_saes``: feed one stream of batches to one or several SAEs.

The loop knows nothing about models: data is any iterable of batches (tensors, ``(x, g)``
pairs for the gradient SAE, ``(x, y)`` pairs for a transcoder), a tensor of rows, or an
``ActivationCache``.
What a run folder holds, and why a kill at any point resumes exactly: ``run_folder``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .. import sae as saes
from ..distributed import collective_view, rank_and_world
from ..models import best_device
from .config import TrainConfig
from .init import geometric_median
from .run_folder import CHECKPOINT_FILE, RunFolder  # noqa: F401  (CHECKPOINT_FILE: for callers)
from .step import NonFiniteError, SAETrainer, any_rank

log = logging.getLogger(__name__)
NOTEBOOK_CHECKPOINT_SECONDS = 60  # in a notebook, at most this much training is lost to a dead kernel
LOGGED_SKIPS = 10  # skipped non-finite batches logged one by one; later ones are only counted


def _batches(data, cfg: TrainConfig, with_grads: bool) -> Iterator:
    """An iterator of batches from a tensor, an ActivationCache or any iterable."""
    from ..cache import ActivationCache

    if isinstance(data, ActivationCache):
        if not cfg.hook_name:
            raise ValueError(f"training from a cache needs TrainConfig.hook_name; the cache has {data.hooks}")
        stream = data.batches(cfg.hook_name, cfg.batch_size, seed=cfg.seed, with_grads=with_grads, drop_last=True,
                              target_hook=cfg.target_hook or None)
    elif isinstance(data, torch.Tensor):
        if data.ndim != 2:
            raise ValueError(f"a tensor of training rows must be [n, d_in], got shape {tuple(data.shape)}")
        order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
        stream = (data[order[i:i + cfg.batch_size]] for i in range(0, data.shape[0] - cfg.batch_size + 1, cfg.batch_size))
    else:
        stream = iter(data)
    rank, world = rank_and_world()
    if world > 1:
        stream = itertools.islice(stream, rank, None, world)  # each rank its own batches
    return stream


def _split(batch, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"a batch must be a tensor x or an (x, g) or (x, y) pair, got a {type(batch).__name__} of "
                             f"{len(batch)}")
        x, g = batch
        return x.to(device, torch.float32), g.to(device, torch.float32)
    return batch.to(device, torch.float32), None


def _broadcast_from_rank_zero(sae) -> None:
    """Under torchrun, every replica starts from rank 0's SAE (b_dec came from its own batch)."""
    _, world = rank_and_world()
    if world > 1:
        with torch.no_grad():
            for tensor in list(sae.parameters()) + list(sae.buffers()):
                torch.distributed.broadcast(collective_view(tensor.data), src=0)


def new_trainer(cfg: TrainConfig, rows: torch.Tensor, targets: torch.Tensor, device) -> SAETrainer:
    """A fresh SAE of ``cfg`` and its trainer, initialised from the first batch's finite
    ``rows`` and ``targets`` (b_dec, a transcoder's input centre, the architecture's data
    scale), as ``train_saes`` starts each SAE; its ``step(x)`` then trains on one batch."""
    torch.manual_seed(cfg.seed)
    sae = saes.create(cfg.architecture, rows.shape[1], cfg.d_sae, cfg.k, hook_name=cfg.hook_name,
                      target_hook=cfg.target_hook, model_name=cfg.model_name, **cfg.sae_kwargs).to(device)
    if rows.shape[0]:
        _init_centre(sae.b_dec, targets[: cfg.init_samples], cfg.b_dec_init)
        if sae.is_transcoder:
            _init_centre(sae.input_centre, rows[: cfg.init_samples], cfg.b_dec_init)
        sae.prepare(rows[: cfg.init_samples], targets[: cfg.init_samples])
    _broadcast_from_rank_zero(sae)
    return SAETrainer(sae, cfg)


def _init_centre(centre: torch.Tensor, rows: torch.Tensor, how: str) -> None:
    """b_dec (or a transcoder's input_centre) from the first rows: TrainConfig.b_dec_init."""
    with torch.no_grad():
        if how == "geometric_median":
            centre.copy_(geometric_median(rows))
        elif how == "mean":
            centre.copy_(rows.mean(0))


def train_saes(configs: list[TrainConfig], data, run_dir: str | Path | None = None, resume: bool | str = True,
               progress: bool = True, live_plot: bool | None = None) -> list[saes.SparseAutoencoder]:
    """Train one SAE per config from ONE pass over ``data`` (a sweep shares every batch).

    With ``run_dir``, each SAE is saved to ``run_dir/<i>-<architecture>-k<k>-<d_sae>/``
    (cfg.json, sae.safetensors, metrics.json), with a resumable checkpoint every
    ``checkpoint_every`` steps (and every minute in a notebook). Calling again with the
    same configs and data

    - after an interruption or a kill, at any point (even mid-write), resumes to exactly the
      result of an uninterrupted run: the data is replayed from its start, and each SAE
      continues from its own checkpoint, skipping the batches it has trained on;
    - after the run finished, trains nothing: it loads the saved SAEs and returns them.

    Checkpoints and metrics.json record each SAE's config and a fingerprint of the data (an
    ActivationCache's manifest, a tensor's or a list of batches' bytes; an iterator cannot be
    fingerprinted, so the same one must be given again). A call with other settings (lr,
    seed, data, …) is refused with the differences listed: ``resume=False`` discards what
    the folder holds and trains from the start; ``resume="force"`` continues its checkpoints
    with the new settings. ``device``, ``checkpoint_every``, ``log_every`` and
    ``skip_nonfinite`` may change between calls. (File layout and crash safety: ``run_folder``.)

    NaN/inf in a batch (x, or g for the gradient SAE), or a non-finite loss or gradient,
    stops training with a ``NonFiniteError`` that names the batch; nothing is updated or
    saved from it, so the checkpoints stay as they were. ``skip_nonfinite`` skips such
    batches instead and counts them in metrics.json. Ctrl-C / Kernel → Interrupt stops after
    the current step, with a checkpoint. In a notebook a live plot shows the curves
    (``live_plot`` overrides).
    """
    if not configs:
        raise ValueError("give at least one TrainConfig")
    shared = {(c.batch_size, c.seed, c.hook_name, c.target_hook, c.total_tokens) for c in configs}
    if len(shared) > 1:
        raise ValueError("SAEs trained from one stream must share batch_size, seed, hook_name, target_hook and total_tokens")
    lead = configs[0]
    device = torch.device(lead.device) if lead.device else best_device()
    grads_needed = _grads_needed(data, configs)
    with_grads = grads_needed is not None
    targets_needed = _targets_needed(data, lead)
    objective = _objective_of(data, lead)
    rank, world = rank_and_world()
    run = RunFolder(run_dir, configs, data, world) if run_dir is not None else None
    plan = run.plan(resume) if run else "fresh"
    if plan == "finished":
        log.info("%s holds these SAEs, trained with these settings: loading them (pass resume=False to train again)",
                 run.path)
        _barrier()  # every rank has read the folder before rank 0 tidies it
        if rank == 0:
            run.cleanup()  # checkpoints and temporary files left by a kill after the last save
        return run.load_finished(device)

    stream = _batches(data, lead, with_grads)
    first = next(stream, None)
    if first is None:
        raise ValueError("the data yielded no batch (is it smaller than one batch_size?)")
    x0, second = _split(first, device)
    if targets_needed:
        _check_targets(x0, second, 0, targets_needed)
    y0 = second if targets_needed else x0  # what b_dec (the output's bias) starts from
    finite = torch.isfinite(x0).all(1) & torch.isfinite(y0).all(1)  # NaN rows would make b_dec NaN (reported below)
    init_rows, init_targets = x0[finite], y0[finite]

    trainers = [new_trainer(cfg, init_rows, init_targets, device) for cfg in configs]
    names = run.names if run else [f"{i}-{c.architecture}" for i, c in enumerate(configs)]

    total = lead.total_steps()
    if total is not None:
        total //= world  # each step consumes one batch per rank
    history: list[list[dict]] = [[] for _ in trainers]
    saved_at: list[int | None] = [None] * len(trainers)  # the step of each SAE's checkpoint on disk
    if plan == "train":
        for i, (trainer, h) in enumerate(zip(trainers, history)):
            checkpoint = run.load_checkpoint(i)
            if checkpoint is None:
                continue  # killed before its first checkpoint: it starts from step 0, the replay feeds it
            tensors, extra = checkpoint
            trainer.load_state_tensors(tensors)
            trainer.skipped = list(extra["skipped"])
            h.extend(extra["history"])
            saved_at[i] = trainer.step_count
            if total is not None and trainer.step_count > total:
                raise ValueError(f"{run.folders[i]} was checkpointed at step {trainer.step_count}, past this run's "
                                 f"{total} steps: pass resume=False to train it again with these settings")
    _barrier()  # every rank has read the checkpoints before rank 0 writes any
    writer = run if run and rank == 0 else None  # one process writes the run's files
    if writer and plan == "fresh":
        writer.discard()

    # Each SAE trains on batch i when it is at step i. After a kill between two folders'
    # checkpoints the SAEs are at different steps: the data is replayed from the earliest,
    # and those further on skip the batches they have already trained on.
    start = min(t.step_count for t in trainers)
    if any(step is not None for step in saved_at):
        log.info("resuming %d SAE(s) at steps %s", len(trainers), [t.step_count for t in trainers])
    batches = itertools.islice(itertools.chain([first], stream), start, total)
    in_notebook = _in_notebook()
    plot = _live_plot(configs) if (live_plot if live_plot is not None else in_notebook) else None
    # In a notebook, a kernel may be interrupted or restarted at any time: keep a recent
    # checkpoint even when the config asks for none (a checkpoint costs one save per SAE).
    every_seconds = NOTEBOOK_CHECKPOINT_SECONDS if in_notebook and not lead.checkpoint_every else None
    last_saved = time.monotonic()
    bar = tqdm(batches, total=None if total is None else total - start, desc="train SAEs", unit="step",
               disable=not progress)
    data_skips = 0
    where = functools.partial(_where, data, lead, rank, world)  # where(index): the batch, in words for errors
    with _interrupts_between_steps() as interrupted:
        for index, batch in enumerate(bar, start):
            x, second = _split(batch, device)
            g = second if with_grads else None
            y = second if targets_needed else None
            if with_grads:
                _check_grads(x, g, index, grads_needed)
            if targets_needed:
                _check_targets(x, y, index, targets_needed)
            problem = _nonfinite(x=x, g=g, y=y)
            bad = any_rank(problem is not None, device)  # every replica skips, or none does
            if bad and not lead.skip_nonfinite:
                raise NonFiniteError(f"{where(index)} has {problem or 'NaN/inf on another rank'}. Nothing was trained on "
                                     f"it{_checkpoints_kept(run)}. Find where the NaN/inf come from, or pass "
                                     "TrainConfig(skip_nonfinite=True) to skip such batches (counted in metrics.json).")
            if bad:
                data_skips += 1
                if data_skips <= LOGGED_SKIPS:
                    log.warning("skipping %s: %s (skip_nonfinite)", where(index), problem or "NaN/inf on another rank")
            for i, (trainer, h) in enumerate(zip(trainers, history)):
                if trainer.step_count > index:
                    continue  # checkpointed past this batch before a kill: it rejoins at its own step
                if bad:
                    trainer.skip()
                    continue
                try:
                    stats = trainer.step(x, g if trainer.cfg.needs_grads else None, y, objective)
                except NonFiniteError as err:
                    raise NonFiniteError(f"{where(index)}, SAE {names[i]}: {err}. Nothing was trained on this batch"
                                         f"{_checkpoints_kept(run)}.") from None
                if stats is None:
                    if len(trainer.skipped) <= LOGGED_SKIPS:
                        log.warning("SAE %s skipped %s: its loss or gradient is NaN/inf (skip_nonfinite)", names[i],
                                    where(index))
                elif trainer.step_count % lead.log_every == 0:
                    h.append({"step": trainer.step_count, "tokens": trainer.tokens_seen, **stats.__dict__})
                    if i == 0:
                        bar.set_postfix(fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.1f}", dead=f"{stats.dead_fraction:.2f}")
            step = index + 1
            if plot and step % lead.log_every == 0:
                plot.update(history)
            due = (lead.checkpoint_every and step % lead.checkpoint_every == 0) or (
                every_seconds is not None and time.monotonic() - last_saved > every_seconds)
            if writer and (due or interrupted()):
                _checkpoint(writer, trainers, history, saved_at)
                last_saved = time.monotonic()
            if interrupted():
                bar.close()
                saved = f"; checkpoint in {run.path}: run the same call again to resume" if run else \
                    " (no run_dir was given, so nothing was saved)"
                raise KeyboardInterrupt(f"training interrupted after step {step}{saved}")
    if plot:
        plot.update(history)  # the final curves stay in the cell's output
    _check_data_length(trainers, names, total, lead)
    if writer:
        writer.finish(trainers, history)
    for trainer in trainers:
        trainer.sae.eval()
    return [t.sae for t in trainers]


def train_sae(config: TrainConfig, data, run_dir: str | Path | None = None, **kwargs) -> saes.SparseAutoencoder:
    """Train one SAE (see ``train_saes``)."""
    return train_saes([config], data, run_dir=run_dir, **kwargs)[0]


def _checkpoint(run: RunFolder, trainers: list[SAETrainer], history: list[list[dict]], saved_at: list[int | None]) -> None:
    """Checkpoint every SAE that trained since its last checkpoint (one file each, atomic)."""
    for i, (trainer, h) in enumerate(zip(trainers, history)):
        if saved_at[i] != trainer.step_count:
            run.write_checkpoint(i, trainer, h)
            saved_at[i] = trainer.step_count


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def _grads_needed(data, configs: list[TrainConfig]) -> str | None:
    """Why this sweep needs (x, g) batches (for messages), or None; refuses data that has no g."""
    from ..cache import ActivationCache

    needing = [f"{i}-{c.architecture}" for i, c in enumerate(configs) if c.needs_grads]
    if not needing:
        return None
    why = f"the gradient SAE ({', '.join(needing)}) ranks latents with g = ∂L/∂x, so it needs (x, g) batches"
    if isinstance(data, ActivationCache) and not data.has_grads:
        raise ValueError(f"{why}, but the cache {data.path} holds no gradients: make one with "
                         "cache_activations(..., with_grads=True)")
    if isinstance(data, torch.Tensor):
        raise ValueError(f"{why}, but a tensor holds activations only: give an ActivationCache made with "
                         "cache_activations(..., with_grads=True), or an iterable of (x, g) pairs")
    return why


def _check_grads(x: torch.Tensor, g: torch.Tensor | None, index: int, why: str) -> None:
    if g is None:
        raise ValueError(f"{why}, but batch {index} is a single tensor: give (x, g) pairs, e.g. from an ActivationCache "
                         "made with cache_activations(..., with_grads=True)")
    if g.shape != x.shape:
        raise ValueError(f"batch {index}: g has shape {tuple(g.shape)} but x has {tuple(x.shape)}; g must be ∂L/∂x, one "
                         "gradient per activation")


def _objective_of(data, cfg: TrainConfig):
    """The loss a model-in-the-loop data source brings (``EndToEnd.objective``), or None. Its
    batches are whole sequences, so their size is the source's, which the config must match
    (total_tokens counts steps of batch_size rows)."""
    objective = getattr(data, "objective", None)
    if objective is None:
        return None
    rows = getattr(data, "batch_rows", None)
    if rows is not None and rows != cfg.batch_size:
        raise ValueError(f"the {type(data).__name__} data yields batches of {rows} rows (sequences × positions); set "
                         f"TrainConfig.batch_size={rows}")
    if cfg.target_hook:
        raise ValueError("an end-to-end objective trains an SAE on its own hook; it cannot train a transcoder")
    return objective


def _targets_needed(data, cfg: TrainConfig) -> str | None:
    """Why this sweep needs (x, y) batches (for messages), or None; refuses data that has no y."""
    from ..cache import ActivationCache

    if not cfg.target_hook:
        return None
    why = f"a transcoder predicts {cfg.target_hook!r} from {cfg.hook_name or 'its input'!r}, so it needs (x, y) batches"
    if isinstance(data, ActivationCache) and cfg.target_hook not in data.hooks:
        raise ValueError(f"{why}, but the cache {data.path} holds {data.hooks}: cache both hooks in one pass, "
                         f"cache_activations(model, tokens, [{cfg.hook_name!r}, {cfg.target_hook!r}], ...)")
    if isinstance(data, torch.Tensor):
        raise ValueError(f"{why}, but a tensor holds one activation per row: give an ActivationCache of both hooks, "
                         "or an iterable of (x, y) pairs")
    return why


def _check_targets(x: torch.Tensor, y: torch.Tensor | None, index: int, why: str) -> None:
    if y is None:
        raise ValueError(f"{why}, but batch {index} is a single tensor: give (x, y) pairs")
    if y.shape != x.shape:
        raise ValueError(f"batch {index}: y has shape {tuple(y.shape)} but x has {tuple(x.shape)}; a transcoder here "
                         "predicts a target of its input's width, one row per input row")


def _nonfinite(**tensors: torch.Tensor | None) -> str | None:
    """What in the batch is NaN/inf ("3 NaN/inf entries in x, in rows [5, 9] of the batch"), or None."""
    found = []
    for name, tensor in tensors.items():
        # One sum first: it is finite whenever every entry is (NaN/inf propagate; only an
        # overflow makes a finite batch's sum inf, and then the full check below finds nothing).
        # The elementwise check costs four passes over the batch, on every step.
        if tensor is not None and not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            bad = ~torch.isfinite(tensor)
            rows = bad.any(-1).nonzero().squeeze(1).tolist()
            found.append(f"{int(bad.sum())} NaN/inf entries in {name}, in rows {rows[:10]}{' …' if len(rows) > 10 else ''} "
                         "of the batch")
    return "; ".join(found) or None


def _where(data, cfg: TrainConfig, rank: int, world: int, index: int) -> str:
    """Which batch, in words an error can use ("batch 12 (step 13) of hook 'h' from the cache c")."""
    from ..cache import ActivationCache

    where = f"batch {index} (step {index + 1})" + (f" of rank {rank}" if world > 1 else "")
    if isinstance(data, ActivationCache):
        where += f" of hook {cfg.hook_name!r} from the cache {data.path} (shuffled with seed {cfg.seed})"
    return where


def _checkpoints_kept(run: RunFolder | None) -> str:
    if run is None:
        return " (no run_dir was given, so nothing was saved)"
    return (f", and the checkpoints in {run.path} are as they were (to continue from them: skip_nonfinite=True, which "
            "may change between calls, or repaired data with resume='force')")


def _check_data_length(trainers: list[SAETrainer], names: list[str], total: int | None, cfg: TrainConfig) -> None:
    """A resume whose data ends before the checkpoints was given other data; a run whose data
    ends before total_tokens never reached the end of its lr schedule."""
    steps = [t.step_count for t in trainers]
    if min(steps) < max(steps):
        ahead = [f"{name} (step {step})" for name, step in zip(names, steps) if step > min(steps)]
        raise ValueError(f"the data ended after {min(steps)} batches, but {', '.join(ahead)} had been checkpointed further: "
                         "this is not the data the run started with (a generator already partly consumed?). Give the "
                         "same data as the first call, or pass resume=False to train from the start.")
    if total is not None and steps[0] < total:
        log.warning("the data ran out after %d of the %d steps that total_tokens=%d asks for: the lr schedule did not "
                    "reach its end", steps[0], total, cfg.total_tokens)


@contextlib.contextmanager
def _interrupts_between_steps():
    """Turn Ctrl-C / Kernel → Interrupt into a request honoured after the current step.

    A KeyboardInterrupt raised mid-step (between Adam's update and the step counter, say)
    would leave SAEs whose state matches no step, and nothing consistent to checkpoint.
    Instead the first interrupt sets a flag the loop reads after each step (and after the
    live plot's redraw), checkpoints, and raises. A second interrupt raises at once.
    Yields a function that says whether an interrupt was requested.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signals can only be handled in the main thread
        return
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("interrupt received: stopping after this step (interrupt again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except ImportError:
        return False


def _live_plot(configs):
    from .live import LivePlot

    return LivePlot([f"{c.architecture} k={c.k} d_sae={c.d_sae}" for c in configs])
