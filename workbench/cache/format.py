"""On-disk format of an activation cache.

::

    <cache>/
      cache_config.json         what was asked (model and tokens hashes, hooks, dtypes, layout);
                                written first, compared on every resume
      tokens.npy                the token ids [n_seq, seq_len] (int32), so rows map to contexts
      shard_00000.json          one record per COMPLETE shard: its files, sizes, block checksums
      shard_00000__<hook>.npy   activations of the shard's rows, [rows, d] (float16/32, bf16 as uint16)
      shard_00000__<hook>.grad.npy   loss gradients, same shape (with_grads only)
      manifest.json             everything above in one file, rebuilt from the shard records

Row ``r`` of the cache is position ``r % seq_len`` of sequence ``r // seq_len``; shard ``i``
holds sequences ``[i*S, (i+1)*S)`` for a fixed S, so a shard's contents depend on its
index alone: resuming, or splitting the work across processes, gives identical files.

Every file is written to a temporary name and renamed into place; a shard's record is
written only after all its files are, so a record is the proof that a shard is complete.
Checksums are CRC-32 per block of ``BLOCK_ROWS`` rows: the reader verifies exactly the
blocks it reads, so verification costs no extra pass over the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..paths import atomic_write_text

FORMAT_VERSION = 1
BLOCK_ROWS = 1024  # rows per checksum block, and the unit of shuffled reads
CONFIG_FILE = "cache_config.json"
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.npy"

# dtype name -> (torch dtype, numpy storage dtype). bfloat16 has no numpy type: its bits
# are stored as uint16 and viewed back on read.
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),
    "float32": (torch.float32, np.dtype(np.float32)),
}


class CacheError(RuntimeError):
    """A cache on disk is corrupted, incomplete, or does not match what was asked."""


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return name


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array as a torch tensor of its cached dtype (copies out of a memory map)."""
    if not array.flags.writeable:  # a memory map: copy, so callers may write to the result
        array = np.array(array)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def shard_stem(index: int) -> str:
    return f"shard_{index:05d}"


def data_file(index: int, hook: str, grad: bool = False) -> str:
    return f"{shard_stem(index)}__{hook}{'.grad' if grad else ''}.npy"


def sha256_of_tensor(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def model_fingerprint(model) -> dict:
    """Name, config hash and a cheap weights hash of a TransformerLens model.

    The weights hash reads a strided sample of every parameter, so a fine-tuned copy of
    the same architecture is told apart without hashing gigabytes.
    """
    cfg = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else dict(vars(model.cfg))
    cfg = {k: v for k, v in cfg.items() if k not in {"device", "n_devices"}}
    config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    weights = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().flatten()
        step = max(1, flat.numel() // 4096)
        weights.update(name.encode())
        weights.update(flat[::step].float().cpu().numpy().tobytes())
    return {"name": getattr(model.cfg, "model_name", "unknown"), "config_sha256": config_hash, "weights_sha256": weights.hexdigest()}


@dataclass(frozen=True)
class FileRecord:
    name: str
    rows: int
    d: int
    nbytes: int
    block_crc32: list[int]


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"cannot read {path}: {err}. The file is missing or damaged.") from err


def shard_records(folder: Path) -> dict[int, dict]:
    """The records of the complete shards in ``folder``, by shard index."""
    records = {}
    for path in sorted(folder.glob("shard_*.json")):
        record = read_json(path)
        records[int(record["index"])] = record
    return records


def write_manifest(folder: Path, config: dict) -> dict:
    """Rebuild ``manifest.json`` from the config and the complete shards' records."""
    records = shard_records(folder)
    shards = [records[i] for i in sorted(records)]
    manifest = {
        **config,
        "n_shards_complete": len(shards),
        "complete": len(shards) == config["n_shards"],
        "shards": shards,
    }
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest
