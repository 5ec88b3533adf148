"""``train_sae`` / ``train_saes``: feed one stream of batches to one or several SAEs.

The loop knows nothing about models: data is any iterable of batches (tensors, or
``(x, g)`` pairs for the gradient SAE), a tensor of rows, or an ``ActivationCache``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import sae as saes
from ..distributed import collective_view, rank_and_world
from ..models import best_device
from ..paths import atomic_write_text
from .config import TrainConfig
from .init import geometric_median
from .step import SAETrainer, StepStats

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.safetensors"
HISTORY_FILE = "checkpoint-history.json"  # the logged curve up to the checkpoint
NOTEBOOK_CHECKPOINT_SECONDS = 60  # in a notebook, at most this much training is lost to a dead kernel


def _batches(data, cfg: TrainConfig, with_grads: bool) -> Iterator:
    """An iterator of batches from a tensor, an ActivationCache or any iterable."""
    from ..cache import ActivationCache

    if isinstance(data, ActivationCache):
        if not cfg.hook_name:
            raise ValueError(f"training from a cache needs TrainConfig.hook_name; the cache has {data.hooks}")
        stream = data.batches(cfg.hook_name, cfg.batch_size, seed=cfg.seed, with_grads=with_grads, drop_last=True)
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


def _init_b_dec(sae, rows: torch.Tensor, how: str) -> None:
    with torch.no_grad():
        if how == "geometric_median":
            sae.b_dec.copy_(geometric_median(rows))
        elif how == "mean":
            sae.b_dec.copy_(rows.mean(0))


def train_saes(configs: list[TrainConfig], data, run_dir: str | Path | None = None, resume: bool = True,
               progress: bool = True, live_plot: bool | None = None) -> list[saes.SparseAutoencoder]:
    """Train one SAE per config from ONE pass over ``data`` (a sweep shares every batch).

    With ``run_dir``, each SAE is saved to ``run_dir/<i>-<architecture>-k<k>-<d_sae>/``
    (cfg.json, sae.safetensors, metrics.json), and a resumable checkpoint is written every
    ``checkpoint_every`` steps; calling again with the same data resumes exactly where
    the checkpoint left off (the batches already consumed are skipped).
    """
    if not configs:
        raise ValueError("give at least one TrainConfig")
    shared = {(c.batch_size, c.seed, c.hook_name, c.total_tokens) for c in configs}
    if len(shared) > 1:
        raise ValueError("SAEs trained from one stream must share batch_size, seed, hook_name and total_tokens")
    lead = configs[0]
    device = torch.device(lead.device) if lead.device else best_device()
    with_grads = any(c.needs_grads for c in configs)
    stream = _batches(data, lead, with_grads)
    first = next(stream, None)
    if first is None:
        raise ValueError("the data yielded no batch (is it smaller than one batch_size?)")
    x0, _ = _split(first, device)
    d_in = x0.shape[1]

    trainers = []
    for i, cfg in enumerate(configs):
        torch.manual_seed(cfg.seed)
        sae = saes.create(cfg.architecture, d_in, cfg.d_sae, cfg.k, hook_name=cfg.hook_name,
                          model_name=cfg.model_name, **cfg.sae_kwargs).to(device)
        _init_b_dec(sae, x0[: cfg.init_samples], cfg.b_dec_init)
        _broadcast_from_rank_zero(sae)
        trainers.append(SAETrainer(sae, cfg))
    folders = [Path(run_dir) / f"{i}-{c.architecture}-k{c.k}-{c.d_sae}" for i, c in enumerate(configs)] if run_dir else None

    start_step = 0
    history: list[list[dict]] = [[] for _ in trainers]
    if folders and resume and all((f / CHECKPOINT_FILE).exists() for f in folders):
        for trainer, folder, h in zip(trainers, folders, history):
            trainer.load_state_tensors({k: v for k, v in load_file(str(folder / CHECKPOINT_FILE)).items()})
            if (folder / HISTORY_FILE).exists():
                h.extend(json.loads((folder / HISTORY_FILE).read_text()))
        start_step = trainers[0].step_count
        log.info("resuming %d SAE(s) from step %d", len(trainers), start_step)

    total = lead.total_steps()
    rank, world = rank_and_world()
    if total is not None:
        total //= world  # each step consumes one batch per rank
    writer = folders if rank == 0 else None  # one process writes the run's files
    batches = itertools.chain([first], stream)
    if start_step:
        batches = itertools.islice(batches, start_step, None)
    if total is not None:
        batches = itertools.islice(batches, max(0, total - start_step))
    in_notebook = _in_notebook()
    plot = _live_plot(configs) if (live_plot if live_plot is not None else in_notebook) else None
    # In a notebook, a kernel may be interrupted or restarted at any time: keep a recent
    # checkpoint even when the config asks for none (a checkpoint costs one save per SAE).
    every_seconds = NOTEBOOK_CHECKPOINT_SECONDS if in_notebook and not lead.checkpoint_every else None
    last_saved = time.monotonic()
    bar = tqdm(batches, total=None if total is None else total - start_step, desc="train SAEs", unit="step",
               disable=not progress)
    with _interrupts_between_steps() as interrupted:
        for batch in bar:
            x, g = _split(batch, device)
            stats: list[StepStats] = [t.step(x, g if t.cfg.needs_grads else None) for t in trainers]
            step = trainers[0].step_count
            if step % lead.log_every == 0:
                for h, s in zip(history, stats):
                    h.append({"step": step, "tokens": trainers[0].tokens_seen, **s.__dict__})
                bar.set_postfix(fvu=f"{stats[0].fvu:.3f}", l0=f"{stats[0].l0:.1f}", dead=f"{stats[0].dead_fraction:.2f}")
                if plot:
                    plot.update(history)
            due = (lead.checkpoint_every and step % lead.checkpoint_every == 0) or (
                every_seconds is not None and time.monotonic() - last_saved > every_seconds)
            if writer and (due or interrupted()):
                _checkpoint(trainers, writer, history)
                last_saved = time.monotonic()
            if interrupted():
                bar.close()
                where = f"; checkpoint in {Path(run_dir)}: run the same call again to resume" if writer else \
                    " (no run_dir was given, so nothing was saved)"
                raise KeyboardInterrupt(f"training interrupted after step {step}{where}")
    if plot:
        plot.update(history)  # the final curves stay in the cell's output
    if writer:
        for trainer, folder, h in zip(trainers, writer, history):
            trainer.sae.save(folder)
            atomic_write_text(folder / "metrics.json", json.dumps({"train_config": trainer.cfg.__dict__, "steps": trainer.step_count,
                                                                    "tokens": trainer.tokens_seen, "history": h}, indent=1, default=str))
            (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
            (folder / HISTORY_FILE).unlink(missing_ok=True)
    for trainer in trainers:
        trainer.sae.eval()
    return [t.sae for t in trainers]


def train_sae(config: TrainConfig, data, run_dir: str | Path | None = None, **kwargs) -> saes.SparseAutoencoder:
    """Train one SAE (see ``train_saes``)."""
    return train_saes([config], data, run_dir=run_dir, **kwargs)[0]


def _checkpoint(trainers: list[SAETrainer], folders: list[Path], history: list[list[dict]]) -> None:
    for trainer, folder, h in zip(trainers, folders, history):
        folder.mkdir(parents=True, exist_ok=True)
        # The curve so far first: a checkpoint found on resume always has its history.
        atomic_write_text(folder / HISTORY_FILE, json.dumps(h, default=str))
        tmp = folder / f".{CHECKPOINT_FILE}.tmp"
        save_file(trainer.state_tensors(), str(tmp))
        tmp.replace(folder / CHECKPOINT_FILE)


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
