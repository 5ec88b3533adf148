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
Set-up writes ``tokens.npy`` and then ``cache_config.json``: a folder holding ``tokens.npy``
and no config (nor anything else but our temporary files) is a set-up that was interrupted,
and is redone. A folder with a config but no complete shard yet may be set up again with
other arguments: nothing computed would be lost. Clean-ups only ever delete our own names,
and a finished cache holds none of our temporary files. Shard files are written by appending,
not through a memory map, so a full disk is an OSError rather than a SIGBUS.

What protects what:

- data rows: CRC-32 per block of ``BLOCK_ROWS`` rows; the reader verifies exactly the
  blocks it reads, so verification costs no extra pass over the data;
- ``.npy`` headers (dtype with byte order, shape, data offset), which no checksum covers:
  checked against the records on open (reads then rely on the records, not the headers);
- ``tokens.npy``: header, and the SHA-256 of the ids recorded in the config, checked on
  open and whenever the tokens are read;
- the manifest: checked against the config on open;
- a rerun of ``cache_activations`` re-checks every complete shard (records, sizes,
  headers and checksums) and redoes the damaged ones, rewrites a damaged tokens.npy (or
  config, from the manifest's copy), and rebuilds the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
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
TOKENS_DTYPE = np.dtype("<i4")  # token ids as stored

# The names of our files, and of our temporary files: atomic_write_bytes' ".<name>.<random>.tmp"
# and the shard writer's ".<name>.tmp<pid>". Clean-ups delete only names matching these, so a
# user's own files in the folder are never touched.
_OURS = rf"(?:{re.escape(TOKENS_FILE)}|{re.escape(CONFIG_FILE)}|{re.escape(MANIFEST_FILE)}|shard_\d{{5,}}(?:__.+)?\.(?:npy|json))"
OUR_FILE = re.compile(_OURS)
OUR_TEMP = re.compile(rf"\.{_OURS}\.(?:\w+\.tmp|tmp\d+)")

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


def sha256_of_ids(ids: np.ndarray) -> str:
    """SHA-256 of token ids as int64 bytes in row-major order (whatever dtype they are held
    in), hashed a slice at a time so no int64 copy of a large token set is made."""
    flat, digest = ids.reshape(-1), hashlib.sha256()
    for start in range(0, flat.size, 1 << 20):
        digest.update(flat[start:start + (1 << 20)].astype(np.int64).tobytes())
    return digest.hexdigest()


def remove_temps(folder: Path) -> None:
    """Delete our temporary files (left by a killed run); never anything else."""
    for path in folder.iterdir():
        if OUR_TEMP.fullmatch(path.name):
            path.unlink(missing_ok=True)


def redo_hint(index: int) -> str:
    return (f"Delete {shard_stem(index)}.json (the shard's record) and rerun the same cache_activations call "
            "to redo the shard; a rerun also finds damaged shards and redoes them by itself.")


TOKENS_HINT = "Rerun the same cache_activations call: it rewrites tokens.npy from the tokens you pass."


def npy_data_offset(path: Path, dtype: np.dtype, shape: tuple[int, ...], fix: str, nbytes: int | None = None) -> int:
    """Where the data of the .npy file ``path`` starts, after checking that the file holds
    ``shape`` ``dtype`` in C order: size (``nbytes`` when recorded) and header. Checksums cover
    the data only, so a damaged header (say '<f2' turned '>f2') would otherwise be read as
    valid garbage. Reads the header only."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CacheError(f"{path} is missing: the cache is damaged. {fix}") from None
    if nbytes is not None and size != nbytes:
        raise CacheError(f"{path} has {size} bytes, the manifest says {nbytes}: the file is truncated or damaged. {fix}")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in {(1, 0), (2, 0)}:
                raise ValueError(f".npy format version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            found_shape, fortran, found_dtype = read(handle)
            offset = handle.tell()
    except (OSError, ValueError, SyntaxError, TypeError) as err:
        raise CacheError(f"{path}: its .npy header cannot be read ({err}): the file is damaged. {fix}") from err
    found = (found_dtype.str, tuple(found_shape), fortran, offset + math.prod(found_shape) * found_dtype.itemsize)
    if found != (dtype.str, tuple(shape), False, size):
        raise CacheError(
            f"{path}: its .npy header says {found_dtype.str} {tuple(found_shape)}{' Fortran order' if fortran else ''} "
            f"from byte {offset}, but the cache holds {dtype.str} {tuple(shape)} in C order filling its {size} bytes: "
            f"the header is damaged. {fix}")
    return offset


def read_tokens(folder: Path, config: dict) -> np.ndarray:
    """``tokens.npy`` [n_seq, seq_len] (int32), checked against the config: the header, and the
    SHA-256 of the ids recorded when caching (a flipped byte would pair rows with wrong tokens)."""
    path, shape = folder / TOKENS_FILE, (config["n_seq"], config["seq_len"])
    offset = npy_data_offset(path, TOKENS_DTYPE, shape, TOKENS_HINT)
    tokens = np.fromfile(path, dtype=TOKENS_DTYPE, count=math.prod(shape), offset=offset)
    if tokens.size != math.prod(shape) or sha256_of_ids(tokens) != config["tokens_sha256"]:
        raise CacheError(f"{path}: the token ids differ from those recorded when caching (SHA-256): "
                         f"the file is damaged. {TOKENS_HINT}")
    return tokens.reshape(shape)


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


def shard_rows(config: dict, index: int) -> tuple[int, int]:
    """(first sequence, number of sequences) of shard ``index``."""
    first = index * config["seqs_per_shard"]
    return first, min(config["seqs_per_shard"], config["n_seq"] - first)


def shard_targets(config: dict) -> list[tuple[str, bool]]:
    """(hook, is gradient) of each file a shard holds, in the order of its record."""
    return [(h, False) for h in config["hooks"]] + ([(h, True) for h in config["hooks"]] if config["with_grads"] else [])


def check_shard(folder: Path, config: dict, index: int, record: dict) -> dict[str, int]:
    """Check shard ``index``'s record against the config, and its files' sizes and .npy
    headers against the record (no data is read: checksums are checked as data is read).
    Returns the data offset of each file, by name."""
    first, n_seq = shard_rows(config, index)
    rows = n_seq * config["seq_len"]
    wanted = [(data_file(index, hook, grad), hook, grad) for hook, grad in shard_targets(config)]
    try:
        files = {f["name"]: f for f in record["files"]}
        matches = ((record["index"], record["first_seq"], record["n_seq"], record["rows"]) == (index, first, n_seq, rows)
                   and list(files) == [name for name, _, _ in wanted]
                   and all((files[name]["rows"], files[name]["d"], len(files[name]["block_crc32"]))
                           == (rows, config["hooks"][hook], math.ceil(rows / BLOCK_ROWS)) for name, hook, _ in wanted))
    except (KeyError, TypeError):  # not even shaped like a record
        matches = False
    if not matches:
        raise CacheError(f"{folder / shard_stem(index)}.json does not describe shard {index} of this cache: "
                         f"the record is damaged. {redo_hint(index)}")
    return {
        name: npy_data_offset(folder / name, DTYPES[config["grad_dtype" if grad else "dtype"]][1],
                              (rows, config["hooks"][hook]), redo_hint(index), files[name]["nbytes"])
        for name, hook, grad in wanted
    }


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def read_json(path: Path, fix: str = "") -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"cannot read {path}: {err}. The file is missing or damaged.{' ' + fix if fix else ''}") from err


def shard_records(folder: Path) -> dict[int, dict]:
    """The records of the complete shards in ``folder``, by shard index."""
    records = {}
    for path in sorted(folder.glob("shard_*.json")):
        record = read_json(path)
        records[int(record["index"])] = record
    return records


MANIFEST_ONLY = ("n_shards_complete", "complete", "shards")  # the manifest's keys beyond the config's


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
