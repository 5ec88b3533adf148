"""Write an activation cache: one pass of a TransformerLens model over a token tensor.

Activations of every requested hook (and, with ``with_grads``, the gradient of the
next-token loss with respect to each, as gradient SAEs need: Olmo et al. 2024) are
written shard by shard; see ``format.py`` for the layout and the guarantees.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..distributed import rank_and_world
from ..paths import atomic_write_bytes
from .format import (
    BLOCK_ROWS,
    CONFIG_FILE,
    DTYPES,
    FORMAT_VERSION,
    TOKENS_FILE,
    CacheError,
    FileRecord,
    check_dtype,
    data_file,
    model_fingerprint,
    read_json,
    sha256_of_tensor,
    shard_records,
    shard_stem,
    write_json,
    write_manifest,
)

log = logging.getLogger(__name__)
DEFAULT_SHARD_TOKENS = 65_536


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def _check_hooks(model, hooks: list[str]) -> None:
    import difflib

    if not hooks:
        raise ValueError("give at least one hook name, e.g. 'blocks.0.hook_resid_post'")
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"hook names repeat: {hooks}")
    for name in hooks:
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
            raise ValueError(f"{name!r} is not a hook of this model.{f' Did you mean {close}?' if close else ''} "
                             "List them with sorted(model.hook_dict).")


def stop_layer(hooks: list[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hooked block (None: run the whole model)."""
    layers = []
    for name in hooks:
        match = re.match(r"blocks\.(\d+)\.", name)
        if match:
            layers.append(int(match.group(1)))
        elif name in {"hook_embed", "hook_pos_embed", "hook_tokens"}:
            layers.append(-1)
        else:
            return None  # ln_final / unembed hooks need the full forward
    return max(layers) + 1


def _probe_dims(model, hooks: list[str]) -> dict[str, int]:
    """Width of each hook's activation, flattened past the position axis (hook_z: heads·d_head)."""
    dims = {}

    def record(act, hook):
        dims[hook.name] = int(math.prod(act.shape[2:])) if act.ndim > 2 else 1

    probe = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, record) for h in hooks]):
        model(probe, stop_at_layer=stop_layer(hooks))
    return {h: dims[h] for h in hooks}


def _flat(act: torch.Tensor) -> torch.Tensor:
    return act.reshape(act.shape[0] * act.shape[1], -1)


def _make_leaf(act, hook):
    """Make the embeddings a leaf that requires grad, so gradients reach every later
    activation even when the model's parameters are frozen."""
    return act.detach().requires_grad_(True)


def _run_batch(model, batch: torch.Tensor, hooks: list[str], with_grads: bool):
    """Activations (and loss gradients) of one batch, each flattened to [batch·pos, d]."""
    acts: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        acts[hook.name] = act

    if not with_grads:
        with torch.no_grad(), model.hooks(fwd_hooks=[(h, keep) for h in hooks]):
            model(batch, stop_at_layer=stop_layer(hooks))
        return {h: _flat(acts[h]) for h in hooks}, None
    leaves = [(h, _make_leaf) for h in ("hook_embed", "hook_pos_embed") if h in model.hook_dict]
    with torch.enable_grad(), model.hooks(fwd_hooks=leaves + [(h, keep) for h in hooks]):
        # The next-token loss summed over positions (and sequences, which do not interact),
        # so each row's gradient is d(its sequence's summed loss)/d(activation).
        loss = model(batch, return_type="loss", loss_per_token=True).sum()
        grads = torch.autograd.grad(loss, [acts[h] for h in hooks])
    return {h: _flat(acts[h].detach()) for h in hooks}, {h: _flat(g) for h, g in zip(hooks, grads)}


def _to_storage_checked(values: torch.Tensor, dtype: str, what: str, first_seq: int, seq_len: int, shard: int) -> np.ndarray:
    """``values`` as the array written for ``dtype``; NaN/inf (after the cast, so float16
    overflow is caught too) is an error that names where it happened."""
    converted = values.detach().to(device="cpu", dtype=DTYPES[dtype][0]).contiguous()
    # NaN propagates through max/min, and ±inf is their value if present: two reductions
    # decide, without a boolean mask the size of the batch.
    if not (torch.isfinite(converted.amax()) and torch.isfinite(converted.amin())):
        bad = ~torch.isfinite(converted)
        seqs = sorted(set((bad.any(-1).nonzero()[:, 0] // seq_len + first_seq).tolist()))
        raise CacheError(
            f"{what} have {int(bad.sum())} NaN/inf entries in sequences {seqs[:10]} (shard {shard}); "
            "nothing of this shard was kept. In float16, values above 65504 overflow: use "
            "dtype='float32' or 'bfloat16'. Otherwise the model itself produces NaN on these tokens."
        )
    return converted.view(torch.uint16).numpy() if dtype == "bfloat16" else converted.numpy()


class _BlockCRC:
    """CRC-32 of each BLOCK_ROWS-row block, fed rows in order as they are written (the data
    is still in cache then, so checksums cost no second read of the file)."""

    def __init__(self, row_bytes: int):
        self.row_bytes, self.done, self.current, self.rows_in_block = row_bytes, [], 0, 0

    def update(self, rows: np.ndarray) -> None:
        raw, start = memoryview(np.ascontiguousarray(rows)).cast("B"), 0
        while start < len(raw):
            take = min(BLOCK_ROWS - self.rows_in_block, (len(raw) - start) // self.row_bytes)
            self.current = zlib.crc32(raw[start:start + take * self.row_bytes], self.current)
            start += take * self.row_bytes
            self.rows_in_block += take
            if self.rows_in_block == BLOCK_ROWS:
                self.done.append(self.current)
                self.current, self.rows_in_block = 0, 0

    def finish(self) -> list[int]:
        return self.done + ([self.current] if self.rows_in_block else [])


def _write_shard(model, tokens, index, config, folder: Path, bar) -> None:
    seqs = config["seqs_per_shard"]
    first, last = index * seqs, min((index + 1) * seqs, config["n_seq"])
    seq_len, batch_size = config["seq_len"], config["batch_size"]
    rows = (last - first) * seq_len
    targets = [(h, False) for h in config["hooks"]] + ([(h, True) for h in config["hooks"]] if config["with_grads"] else [])
    arrays, temps, crcs = {}, {}, {}
    for hook, grad in targets:
        dtype = config["grad_dtype"] if grad else config["dtype"]
        final = data_file(index, hook, grad)
        temps[(hook, grad)] = folder / f".{final}.tmp{os.getpid()}"
        arrays[(hook, grad)] = np.lib.format.open_memmap(
            temps[(hook, grad)], mode="w+", dtype=DTYPES[dtype][1], shape=(rows, config["hooks"][hook])
        )
        crcs[(hook, grad)] = _BlockCRC(config["hooks"][hook] * DTYPES[dtype][1].itemsize)
    try:
        for start in range(first, last, batch_size):
            batch = tokens[start:min(start + batch_size, last)].to(model.cfg.device)
            acts, grads = _run_batch(model, batch, list(config["hooks"]), config["with_grads"])
            lo, hi = (start - first) * seq_len, (start - first + batch.shape[0]) * seq_len
            for hook, grad in targets:
                values = (grads if grad else acts)[hook]
                dtype = config["grad_dtype"] if grad else config["dtype"]
                stored = _to_storage_checked(values, dtype, f"{'gradients' if grad else 'activations'} of {hook!r}", start, seq_len, index)
                arrays[(hook, grad)][lo:hi] = stored
                crcs[(hook, grad)].update(stored)
            bar.update(1)
    except BaseException:
        arrays.clear()
        for temp in temps.values():  # nothing of a failed shard stays behind
            temp.unlink(missing_ok=True)
        raise
    # No msync: it made the writer wait for the disk (4% of a small model's caching time).
    # The kernel writes the pages back; should power fail first, the block checksums in the
    # shard record report the damaged file by name on the next read.
    arrays.clear()  # unmaps the files
    files = []
    for key, temp in temps.items():
        final = data_file(index, *key)
        os.replace(temp, folder / final)
        record = FileRecord(final, rows, config["hooks"][key[0]], (folder / final).stat().st_size, crcs[key].finish())
        files.append(record.__dict__)
    write_json(folder / f"{shard_stem(index)}.json",
               {"index": index, "first_seq": first, "n_seq": last - first, "rows": rows, "files": files})


def cache_activations(
    model,
    tokens: torch.Tensor,
    hooks: list[str] | str,
    out_dir: str | Path,
    dtype: str = "float16",
    with_grads: bool = False,
    batch_size: int = 32,
    grad_dtype: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> Path:
    """Cache the activations of ``hooks`` (and optionally their loss gradients) to ``out_dir``.

    One forward pass per batch serves every hook (plus one backward with ``with_grads``);
    without gradients the forward stops after the last hooked block. Re-running with the
    same arguments resumes an interrupted cache, or does nothing on a complete one; a
    different model, tokens or settings is refused rather than mixed in. Under
    ``torchrun`` each rank writes its share of shards and rank 0 writes the manifest.
    Returns the cache folder; open it with ``ActivationCache.open``.
    """
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    _check_hooks(model, hooks)
    check_dtype(dtype)
    grad_dtype = check_dtype(grad_dtype or dtype)
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [n_seq, seq_len], got {tuple(tokens.shape)} {tokens.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_seq, seq_len = tokens.shape
    seqs_per_shard = max(1, shard_tokens // seq_len // batch_size) * batch_size
    config = {
        "version": FORMAT_VERSION,
        "model": model_fingerprint(model),
        "hooks": _probe_dims(model, hooks),
        "dtype": dtype,
        "grad_dtype": grad_dtype,
        "with_grads": with_grads,
        "n_seq": n_seq,
        "seq_len": seq_len,
        "n_tokens": n_seq * seq_len,
        "tokens_sha256": sha256_of_tensor(tokens.long()),
        "batch_size": batch_size,
        "seqs_per_shard": seqs_per_shard,
        "n_shards": math.ceil(n_seq / seqs_per_shard),
        "block_rows": BLOCK_ROWS,
    }
    folder = Path(out_dir)
    rank, world = rank_and_world()
    if rank == 0:
        _prepare_folder(folder, config, tokens)
    _barrier()
    if rank != 0 and read_json(folder / CONFIG_FILE) != config:
        raise CacheError(f"rank {rank} was given a different model, tokens or settings than rank 0; "
                         "every rank must call cache_activations with the same arguments")
    done = shard_records(folder)
    todo = [i for i in range(config["n_shards"]) if i % world == rank and i not in done]
    if done:
        log.info("resuming %s: %d of %d shards already complete", folder, len(done), config["n_shards"])
    # The last shard may be short: count its own batches, so the bar ends full, not red.
    total_batches = sum(math.ceil((min((i + 1) * seqs_per_shard, config["n_seq"]) - i * seqs_per_shard) / batch_size)
                        for i in todo)
    if not todo and rank == 0:
        log.info("%s is complete: nothing to cache", folder)
    # No bar when there is nothing to do (a complete cache would show an empty "0/0").
    with tqdm(total=total_batches, desc="cache", unit="batch", disable=not progress or rank != 0 or not todo) as bar:
        for index in todo:
            _write_shard(model, tokens, index, config, folder, bar)
            if world == 1:
                write_manifest(folder, config)
    _barrier()
    if rank == 0:
        manifest = write_manifest(folder, config)
        if not manifest["complete"]:
            raise CacheError(f"{folder}: only {manifest['n_shards_complete']} of {config['n_shards']} shards were written")
    return folder


def _prepare_folder(folder: Path, config: dict, tokens: torch.Tensor) -> None:
    """Create the cache folder, or check that an existing one was made with the same arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".shard_*.tmp*"):  # left by a killed run
        stale.unlink()
    config_path = folder / CONFIG_FILE
    if config_path.exists():
        existing = read_json(config_path)
        differs = sorted(k for k in set(existing) | set(config) if existing.get(k) != config.get(k))
        if differs:
            raise CacheError(
                f"{folder} already holds a cache made with different {', '.join(differs)} "
                f"(e.g. {differs[0]}: cached {existing.get(differs[0])!r}, now {config.get(differs[0])!r}). "
                "Refusing to mix data: choose another out_dir, or delete this one to rebuild it."
            )
        return
    if any(folder.iterdir()):
        raise CacheError(f"{folder} is not empty and holds no activation cache: choose an empty or new folder")
    buffer = io.BytesIO()
    np.save(buffer, tokens.to(torch.int32).cpu().numpy())
    atomic_write_bytes(folder / TOKENS_FILE, buffer.getvalue())
    write_json(config_path, config)  # last: its presence means the folder is initialised
