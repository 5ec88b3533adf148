"""Read an activation cache: shuffled batches with bounded memory, and random access by row."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .format import (
    BLOCK_ROWS,
    CONFIG_FILE,
    DTYPES,
    MANIFEST_FILE,
    CacheError,
    check_shard,
    data_file,
    from_storage,
    read_json,
    read_tokens,
    redo_hint,
)

REBUILD_HINT = "Rerun the same cache_activations call: it checks the shards and rewrites the manifest and config."

DEFAULT_BUFFER_ROWS = 1 << 16  # rows mixed at once when shuffling: memory ≈ buffer_rows · d · (2 or 4) bytes


@dataclass(frozen=True)
class _Block:
    shard: int  # position in the manifest's shard list
    start: int  # first row within the shard
    stop: int


class ActivationCache:
    """A cache written by ``cache_activations``, opened read-only and memory-mapped.

    Opening checks the manifest against the config, every listed file's size and .npy
    header against its record (a truncated shard, or a header whose dtype or byte order was
    changed, is named at once), and tokens.npy against the SHA-256 of the cached ids. Every
    block of rows read is checked against its CRC-32, so corruption is reported by file name
    instead of read as data. ``verify()`` does all of it for every row.
    """

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._shards = manifest["shards"]
        self._row_offsets = np.cumsum([0] + [s["rows"] for s in self._shards])
        self._files = {(s_i, f["name"]): f for s_i, s in enumerate(self._shards) for f in s["files"]}
        self._offsets: dict[str, int] = {}  # data offset of each file whose header was checked
        self._tokens: torch.Tensor | None = None

    @classmethod
    def open(cls, path: str | Path, allow_incomplete: bool = False) -> "ActivationCache":
        path = Path(path)
        if not (path / MANIFEST_FILE).exists():
            raise CacheError(f"{path} has no {MANIFEST_FILE}: it is not an activation cache, or caching "
                             "never finished a shard. Run cache_activations on it.")
        manifest, config = read_json(path / MANIFEST_FILE, REBUILD_HINT), read_json(path / CONFIG_FILE, REBUILD_HINT)
        try:
            indices = [s["index"] for s in manifest["shards"]]
            consistent = ({k: manifest[k] for k in config} == config and indices == sorted(set(indices))
                          and manifest["complete"] == (indices == list(range(config["n_shards"]))))
        except (KeyError, TypeError):
            consistent = False
        if not consistent:
            raise CacheError(f"{path / MANIFEST_FILE} does not match {CONFIG_FILE}: the manifest is damaged. {REBUILD_HINT}")
        if not manifest["complete"] and not allow_incomplete:
            raise CacheError(
                f"{path} is incomplete ({len(indices)} of {manifest['n_shards']} shards): "
                "run the same cache_activations call again to finish it, or open with allow_incomplete=True."
            )
        cache = cls(path, manifest)
        for shard in range(len(indices)):  # headers only: a few hundred bytes per file
            cache._check_headers(shard)
        read_tokens(path, manifest)  # 4 bytes per token, hashed at ~60M tokens/s: little next to the activations
        return cache

    # --- description -------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def n_tokens(self) -> int:
        """Rows available (all cached tokens when the cache is complete)."""
        return int(self._row_offsets[-1])

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def has_grads(self) -> bool:
        return self.manifest["with_grads"]

    def d(self, hook: str) -> int:
        self._check_hook(hook)
        return self.manifest["hooks"][hook]

    @property
    def tokens(self) -> torch.Tensor:
        """Token ids [n_seq, seq_len] of the cached sequences (row r ↔ tokens.view(-1)[r])."""
        if self._tokens is None:  # checked against the recorded SHA-256 as it is read
            self._tokens = torch.from_numpy(read_tokens(self.path, self.manifest).astype(np.int64))
        return self._tokens

    def position(self, row: int) -> tuple[int, int]:
        """(sequence, position) of a row."""
        return divmod(int(row), self.seq_len)

    def context(self, row: int, before: int = 16, after: int = 4) -> tuple[list[int], int]:
        """Token ids around a row, within its sequence, and the index of the row's own token.

        Decode them with the model's tokenizer, e.g. ``model.to_str_tokens(torch.tensor(ids))``.
        """
        seq, pos = self.position(row)
        if not 0 <= row < self.n_tokens:
            raise IndexError(f"row must lie in [0, {self.n_tokens}), got {row}")
        start = max(0, pos - before)
        return self.tokens[seq, start:pos + after + 1].tolist(), pos - start

    def __repr__(self) -> str:
        return (f"ActivationCache({str(self.path)!r}, model={self.manifest['model']['name']!r}, "
                f"n_tokens={self.n_tokens:,}, hooks={self.manifest['hooks']}, dtype={self.manifest['dtype']}, "
                f"grads={self.has_grads})")

    # --- reading -----------------------------------------------------------------------
    def _check_hook(self, hook: str) -> None:
        if hook not in self.manifest["hooks"]:
            raise KeyError(f"hook {hook!r} is not in this cache; it has {self.hooks}")

    def _check_headers(self, shard: int) -> None:
        """Check a shard's record and its files' sizes and headers; keep their data offsets."""
        record = self._shards[shard]
        self._offsets.update(check_shard(self.path, self.manifest, record["index"], record))

    def _layout(self, shard: int, hook: str, grad: bool) -> tuple[str, int]:
        """(file name, byte offset of row 0) of one shard file. Shape and dtype come from the
        record, never from the file: its header was checked to agree with them."""
        name = data_file(self._shards[shard]["index"], hook, grad)
        if name not in self._offsets:
            self._check_headers(shard)
        return name, self._offsets[name]

    def _read(self, shard: int, start: int, stop: int, hook: str, grad: bool, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of one shard file, verifying the CRC of each block touched.

        ``out``, when given, receives the rows (then start and stop must be block-aligned).

        Plain positioned reads rather than a memory map: mapped pages would count towards
        the process's resident memory and grow with the amount of cache read.
        """
        name, offset = self._layout(shard, hook, grad)
        rows, d, dtype = self._shards[shard]["rows"], self.d(hook), self._storage_dtype(grad)
        crcs = self._files[(shard, name)]["block_crc32"]
        first_block, last_block = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS
        lo, hi = first_block * BLOCK_ROWS, min((last_block + 1) * BLOCK_ROWS, rows)
        if out is None:
            out = np.empty((hi - lo, d), dtype=dtype)
        elif out.shape != (hi - lo, d) or out.dtype != dtype:
            raise ValueError(f"out must be {(hi - lo, d)} {dtype} for block-aligned rows {start}-{stop}")
        fd = os.open(self.path / name, os.O_RDONLY)
        try:
            got = os.preadv(fd, [memoryview(out).cast("B")], offset + lo * d * dtype.itemsize)
        finally:
            os.close(fd)
        if got != out.nbytes:
            raise CacheError(f"{self.path / name}: short read at rows {lo}–{hi}; the file is truncated. "
                             f"{redo_hint(self._shards[shard]['index'])}")
        for block in range(first_block, last_block + 1):  # CRC-32 runs at ~1 GB/s: cheaper than the float cast
            b_lo = (block - first_block) * BLOCK_ROWS
            if zlib.crc32(out[b_lo:b_lo + BLOCK_ROWS].data) != crcs[block]:
                raise CacheError(f"{self.path / name}: rows {block * BLOCK_ROWS}–{min((block + 1) * BLOCK_ROWS, rows)} "
                                 f"fail their checksum; the file is corrupted. {redo_hint(self._shards[shard]['index'])}")
        return out[start - lo:stop - lo]

    def activations(self, hook: str, rows, with_grads: bool = False, dtype: torch.dtype = torch.float32, device=None):
        """Rows by global index (any order, repeats allowed): a tensor [len(rows), d], or
        ``(x, g)`` with ``with_grads``."""
        self._check_hook(hook)
        self._check_grads(with_grads)
        rows = np.asarray(torch.as_tensor(rows).reshape(-1).cpu(), dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise IndexError(f"rows must lie in [0, {self.n_tokens}), got {rows.min()}..{rows.max()}")
        shard_of = np.searchsorted(self._row_offsets, rows, side="right") - 1
        local = rows - self._row_offsets[shard_of]
        # Read whole checksum blocks, each once, however the rows are scattered.
        block_keys = shard_of * (self._row_offsets[-1] // BLOCK_ROWS + 1) + local // BLOCK_ROWS
        out = {grad: np.empty((rows.size, self.d(hook)), dtype=self._storage_dtype(grad)) for grad in self._kinds(with_grads)}
        for key in np.unique(block_keys):
            where = np.nonzero(block_keys == key)[0]
            shard, start = int(shard_of[where[0]]), int(local[where[0]]) // BLOCK_ROWS * BLOCK_ROWS
            stop = min(start + BLOCK_ROWS, self._shards[shard]["rows"])
            for grad in out:
                out[grad][where] = self._read(shard, start, stop, hook, grad)[local[where] - start]
        tensors = [from_storage(out[grad], self._stored_dtype(grad)).to(device=device, dtype=dtype) for grad in out]
        return tuple(tensors) if with_grads else tensors[0]

    def _stored_dtype(self, grad: bool) -> str:
        """Name of the dtype activations (or gradients) were cached in."""
        return self.manifest["grad_dtype" if grad else "dtype"]

    def _storage_dtype(self, grad: bool) -> np.dtype:
        return DTYPES[self._stored_dtype(grad)][1]

    def _kinds(self, with_grads: bool) -> list[bool]:
        return [False, True] if with_grads else [False]

    def _check_grads(self, with_grads: bool) -> None:
        if with_grads and not self.has_grads:
            raise ValueError(f"{self.path} was cached without gradients; re-cache with with_grads=True")

    def _blocks(self) -> list[_Block]:
        return [
            _Block(shard, start, min(start + BLOCK_ROWS, s["rows"]))
            for shard, s in enumerate(self._shards)
            for start in range(0, s["rows"], BLOCK_ROWS)
        ]

    def batches(
        self,
        hook: str,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        with_grads: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
        buffer_rows: int = DEFAULT_BUFFER_ROWS,
        drop_last: bool = False,
        target_hook: str | None = None,
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of batches [batch_size, d] (``(x, g)`` pairs with ``with_grads``; ``(x, y)``
        pairs with ``target_hook``: y the same rows of that hook, a transcoder's targets).

        Shuffling is two-level, as in a shuffle buffer: blocks of ``BLOCK_ROWS`` contiguous
        rows are visited in a random order over the whole cache (every shard), and the rows
        of ``buffer_rows // BLOCK_ROWS`` blocks at a time are permuted together. Each row is
        yielded exactly once per epoch; memory is bounded by the buffer, not the cache size.
        """
        self._check_hook(hook)
        if target_hook is not None:
            self._check_hook(target_hook)
            if with_grads:
                raise ValueError("give with_grads or target_hook, not both: a batch is (x, g) or (x, y)")
        self._check_grads(with_grads)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        blocks = self._blocks()
        if shuffle:
            blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        per_buffer = max(1, buffer_rows // BLOCK_ROWS) if shuffle else 1
        # (hook, gradient?) of each tensor a batch holds: x, then g or y.
        kinds = [(hook, grad) for grad in self._kinds(with_grads)] + ([(target_hook, False)] if target_hook else [])
        leftover: list[torch.Tensor] | None = None  # < batch_size rows carried to the next buffer
        for first in range(0, len(blocks), per_buffer):
            chunk = blocks[first:first + per_buffer]
            stored = [self._read_blocks(chunk, name, grad) for name, grad in kinds]  # the buffer, in the stored dtype
            n = stored[0].shape[0]
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            # Gather each batch from the buffer and cast it alone: no permuted or float32
            # copy of the whole buffer is ever made.
            pos = 0
            if leftover is not None:
                pos = min(batch_size - leftover[0].shape[0], n)
                leftover = [torch.cat([rest, s.index_select(0, order[:pos]).to(dtype)]) for rest, s in zip(leftover, stored)]
                if leftover[0].shape[0] < batch_size:
                    continue
                yield self._emit(leftover, device)
                leftover = None
            while pos + batch_size <= n:
                index = order[pos:pos + batch_size]
                # index_select, not s[index]: the same rows, ~8x faster on CPU for float16 storage.
                yield self._emit([s.index_select(0, index).to(dtype) for s in stored], device)
                pos += batch_size
            if pos < n:
                leftover = [s.index_select(0, order[pos:]).to(dtype) for s in stored]
            del stored  # before the next buffer is read: one buffer alive at a time
        if leftover is not None and not drop_last:
            yield self._emit(leftover, device)

    def _read_blocks(self, blocks: list[_Block], hook: str, grad: bool) -> torch.Tensor:
        """Whole blocks read straight into one buffer (no per-block copies to concatenate)."""
        buffer = np.empty((sum(b.stop - b.start for b in blocks), self.d(hook)), dtype=self._storage_dtype(grad))
        pos = 0
        for block in blocks:
            rows = block.stop - block.start
            self._read(block.shard, block.start, block.stop, hook, grad, out=buffer[pos:pos + rows])
            pos += rows
        return from_storage(buffer, self._stored_dtype(grad))

    @staticmethod
    def _emit(tensors: list[torch.Tensor], device):
        if device is not None:
            tensors = [t.to(device, non_blocking=True) for t in tensors]
        return tuple(tensors) if len(tensors) == 2 else tensors[0]

    def verify(self) -> None:
        """Check everything on disk again: tokens.npy against its SHA-256, and ``verify_rows``."""
        read_tokens(self.path, self.manifest)
        self.verify_rows()

    def verify_rows(self) -> None:
        """Check every shard file's size and header, and every block of rows against its
        checksum: a full read of the cache, one block in memory at a time."""
        self._offsets.clear()  # read the headers again: they may have changed since opening
        for shard, s in enumerate(self._shards):
            self._check_headers(shard)
            for hook in self.hooks:
                for grad in self._kinds(self.has_grads):
                    for start in range(0, s["rows"], BLOCK_ROWS):
                        self._read(shard, start, min(start + BLOCK_ROWS, s["rows"]), hook, grad)
