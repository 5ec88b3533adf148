"""A training run's folder: one sub-folder per SAE, each describing itself.

::

    run_dir/
      0-topk-k32-2048/            one folder per SAE: <index>-<architecture>-k<k>-<d_sae>
        checkpoint.safetensors    while training: the SAE, Adam's moments and the counters; its
                                  metadata holds the run identity, the step, the logged curve
                                  and the skipped batches
        cfg.json, sae.safetensors
        metrics.json              written last when the SAE is trained: the run identity, the
                                  step count, the curve; it marks the SAE as finished
      1-batchtopk-k32-2048/ ...

The run identity of an SAE is what determines its result: its TrainConfig (less the
fields in MAY_CHANGE), a fingerprint of the data, and the number of processes.

Every file is written under a temporary name and renamed into place (fsynced first), so a
kill at any instruction leaves each file old or new, never half-written, and each
checkpoint is whole on its own: one SAE after some step. Nothing ties the folders
together, so nothing can disagree between them:

- A sweep's SAEs are checkpointed one after another, so a kill between two folders leaves
  them at different steps. That is allowed: the resume replays the data from the earliest
  step and each SAE rejoins at its own (``train_saes``), so every SAE sees exactly the
  batches of an uninterrupted run.
- Checkpoints are deleted only once every SAE's final files are written. A kill during the
  final save leaves every checkpoint, so the rerun resumes each SAE from its own; a kill
  while deleting them leaves every metrics.json, so the rerun finds the run finished.
- A fresh start (resume=False) deletes metrics.json files before checkpoints: a kill in
  between can leave checkpoints, never a half-deleted run that looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .. import sae as saes
from ..paths import atomic_write_bytes, atomic_write_text
from .config import TrainConfig
from .step import NonFiniteError, SAETrainer

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.json"
OLD_HISTORY_FILE = "checkpoint-history.json"  # beside the checkpoints of older workbenches
FORMAT = 1  # of the checkpoint metadata
MAY_CHANGE = ("device", "checkpoint_every", "log_every", "skip_nonfinite")
"""TrainConfig fields a resume may change: they say where and how often, not what is
learned. (skip_nonfinite: had a non-finite batch come before the checkpoint, the run would
have stopped there; turning it on to get past one changes nothing before it.)"""
FULL_HASH_BYTES = 1 << 30  # a tensor up to this size is hashed whole, a larger one by a strided sample of rows


class RunFolder:
    """The files of one run_dir (see the module docstring). ``plan`` and the loading methods
    only read; the writing methods are called by one process (rank 0 under torchrun)."""

    def __init__(self, run_dir: str | Path, configs: list[TrainConfig], data, world: int):
        self.path = Path(run_dir)
        self.names = [f"{i}-{c.architecture}-k{c.k}-{c.d_sae}" for i, c in enumerate(configs)]
        self.folders = [self.path / name for name in self.names]
        fingerprint = data_fingerprint(data)
        self.identities = [{"train_config": _plain(c), "data": fingerprint, "world_size": world} for c in configs]

    # --- reading: every rank, nothing is written ------------------------------------------------
    def plan(self, resume: bool | str) -> str:
        """"finished" (every SAE trained with these settings), "train" (resuming from whatever
        checkpoints there are) or "fresh" (resume=False). Raises ValueError when the folder
        holds SAEs or checkpoints of other settings, saying what differs and what to do."""
        if resume not in (True, False, "force"):
            raise ValueError(f"resume must be True, False or 'force', got {resume!r}")
        if resume is False:
            return "fresh"
        finished, refused, forced = [], [], []
        for name, folder, identity in zip(self.names, self.folders, self.identities):
            metrics = _read_json(folder / METRICS_FILE)
            if metrics is not None and "data" not in metrics:
                log.warning("%s was trained by an older workbench, which did not record its data: training it again",
                            folder)
            elif metrics is not None:
                differences = _differences(metrics, identity)
                refused += differences
                if not differences:
                    finished.append(name)
            extra = self._checkpoint_metadata(folder)
            if extra is not None:
                (forced if resume == "force" else refused).extend(_differences(extra["identity"], identity))
        if refused:
            raise ValueError(
                f"{self.path} holds SAEs or checkpoints trained with other settings than this call:\n  "
                + "\n  ".join(dict.fromkeys(refused)) + f"\nTo start fresh, delete {self.path}, use another run_dir, or pass "
                "resume=False (which replaces what is there). To continue its checkpoints with the new settings "
                "deliberately, pass resume='force' (a finished SAE has none left to continue).")
        if forced:
            log.warning("resume='force': continuing the checkpoints in %s despite:\n  %s", self.path,
                        "\n  ".join(dict.fromkeys(forced)))
        if self.identities[0]["data"]["sha256"] is None and (finished or any(
                (folder / CHECKPOINT_FILE).exists() for folder in self.folders)):
            log.warning("%s: the data is an iterator, which cannot be fingerprinted: resuming trusts that it yields the "
                        "same batches as the first call", self.path)
        return "finished" if len(finished) == len(self.folders) else "train"

    def _checkpoint_metadata(self, folder: Path) -> dict | None:
        file = folder / CHECKPOINT_FILE
        if not file.exists():
            return None
        try:
            with safe_open(str(file), framework="pt") as handle:
                extra = json.loads((handle.metadata() or {})["workbench"])
            if extra["format"] != FORMAT:
                raise ValueError(f"format {extra['format']}, this workbench reads {FORMAT}")
            return extra
        except Exception as err:  # safetensors' own errors name no file
            raise ValueError(f"{file} cannot be resumed ({err!r}): an older workbench wrote it without a record of its "
                             "settings, or it was changed after it was written. Delete it to train that SAE from the start "
                             f"(the others keep their checkpoints), or pass resume=False to train all from the start.") from err

    def load_checkpoint(self, i: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """SAE i's checkpoint as (tensors, {"step", "history", "skipped", ...}), or None if it has none."""
        file = self.folders[i] / CHECKPOINT_FILE
        if not file.exists():
            return None
        extra = self._checkpoint_metadata(self.folders[i])
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, extra

    def load_finished(self, device) -> list[saes.SparseAutoencoder]:
        try:
            return [saes.load(folder, device=device) for folder in self.folders]
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path} holds the metrics of a finished run, but {err}. Pass resume=False to train it "
                             "again.") from err

    # --- writing: one process -----------------------------------------------------------------
    def discard(self) -> None:
        """Before a fresh start: the finished marks first, so a kill midway never looks finished."""
        for folder in self.folders:
            (folder / METRICS_FILE).unlink(missing_ok=True)
        self._delete_checkpoints()

    def write_checkpoint(self, i: int, trainer: SAETrainer, history: list[dict]) -> None:
        state = trainer.state_tensors()
        _check_finite(state, f"{self.names[i]} at step {trainer.step_count}")
        extra = {"format": FORMAT, "identity": self.identities[i], "step": trainer.step_count, "history": history,
                 "skipped": trainer.skipped}
        atomic_write_bytes(self.folders[i] / CHECKPOINT_FILE,
                           safetensors_bytes(state, metadata={"workbench": json.dumps(extra, default=str)}))

    def finish(self, trainers: list[SAETrainer], history: list[list[dict]]) -> None:
        """Every SAE's final files (metrics.json last: it marks the SAE finished), then the
        checkpoints go, then the temporary files of killed writers."""
        for name, folder, identity, trainer, h in zip(self.names, self.folders, self.identities, trainers, history):
            _check_finite(trainer.sae.state_dict(), f"{name} at step {trainer.step_count}")
            trainer.sae.save(folder)
            metrics = {**identity, "steps": trainer.step_count, "tokens": trainer.tokens_seen,
                       "skipped_nonfinite": len(trainer.skipped), "skipped_batches": trainer.skipped, "history": h}
            atomic_write_text(folder / METRICS_FILE, json.dumps(metrics, indent=1, default=str))
        self.cleanup()

    def cleanup(self) -> None:
        """Delete the checkpoints, and the temporary files of writers that were killed."""
        self._delete_checkpoints()
        for folder in self.folders:
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def _delete_checkpoints(self) -> None:
        for folder in self.folders:
            (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
            (folder / OLD_HISTORY_FILE).unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({err}); it is written atomically, so something else changed it. Delete "
                         f"its folder, or pass resume=False to train from the start.") from err


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Never save a poisoned state (the step's checks should make this unreachable)."""
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise NonFiniteError(f"{what}: {', '.join(bad)} hold NaN/inf, so it was not saved and its last checkpoint stays "
                             "as it was. Lower the lr or check the data, then run the same call again to resume from it.")


def _plain(cfg: TrainConfig) -> dict:
    """The config as JSON gives it back (tuples as lists), so a recorded one compares equal."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _differences(recorded: dict, identity: dict) -> list[str]:
    """What differs between a recorded run identity and this call's, one line each ([]: the same)."""
    out = []
    old, new = recorded["train_config"], identity["train_config"]
    name = f"{new['architecture']} k={new['k']} d_sae={new['d_sae']}"
    defaults = _plain(TrainConfig())
    for key in sorted(set(old) | set(new)):
        # A setting added after the run was recorded counts as recorded at its default.
        before = old.get(key, defaults.get(key))
        if key not in MAY_CHANGE and before != new.get(key):
            out.append(f"{name}: {key} {before!r} → {new.get(key)!r}")
    old, new = recorded["data"], identity["data"]
    if old["kind"] != new["kind"] or (old["sha256"] and new["sha256"] and old["sha256"] != new["sha256"]):
        out.append(f"data: {_describe(old)} → {_describe(new)}")
    if recorded["world_size"] != identity["world_size"]:
        out.append(f"processes (torchrun world size) {recorded['world_size']} → {identity['world_size']}: each reads its "
                   "own share of the batches")
    return out


def _describe(fingerprint: dict) -> str:
    details = ", ".join(f"{key} {value}" for key, value in fingerprint.items() if key not in ("kind", "sha256", "note"))
    digest = f"sha256 {fingerprint['sha256'][:12]}…" if fingerprint["sha256"] else "not fingerprinted"
    return f"{fingerprint['kind']} ({details}{', ' if details else ''}{digest})"


def data_fingerprint(data) -> dict:
    """What identifies ``data`` between calls: its "kind" and "sha256" (None for an iterator,
    which cannot be fingerprinted without consuming it), with details for messages."""
    from ..cache import ActivationCache

    if callable(getattr(data, "fingerprint", None)):  # a data source that knows what identifies it (EndToEnd)
        return data.fingerprint()
    if isinstance(data, ActivationCache):
        # The manifest holds the cache's config (model and token hashes, hooks, dtypes) and
        # every shard's block checksums: its hash changes with any byte of the cache.
        manifest = json.dumps(data.manifest, sort_keys=True, default=str).encode()
        return {"kind": "ActivationCache", "sha256": hashlib.sha256(manifest).hexdigest(), "path": str(data.path),
                "n_tokens": data.n_tokens}
    if isinstance(data, torch.Tensor):
        digest, hashed = _tensor_digest(data)
        return {"kind": "tensor", "sha256": digest, "shape": list(data.shape), "dtype": str(data.dtype), "hashed": hashed}
    if isinstance(data, (list, tuple)) and data and all(_tensors_of(batch) for batch in data):
        digest = hashlib.sha256()
        for batch in data:
            for tensor in _tensors_of(batch):
                digest.update(_tensor_digest(tensor)[0].encode())
        return {"kind": "list of batches", "sha256": digest.hexdigest(), "batches": len(data)}
    return {"kind": type(data).__name__, "sha256": None,
            "note": "an iterator cannot be fingerprinted without consuming it: a resume trusts that it yields the same batches"}


def _tensors_of(batch) -> list[torch.Tensor]:
    """The tensors of one batch (x, or x and g), or [] if it is something else."""
    parts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    return parts if parts and all(isinstance(part, torch.Tensor) for part in parts) else []


def _tensor_digest(tensor: torch.Tensor) -> tuple[str, str]:
    """sha256 of the shape, dtype and bytes (of every s-th row of a tensor over
    FULL_HASH_BYTES, to bound the time: about a second per GiB)."""
    tensor = tensor.detach()
    size = tensor.numel() * tensor.element_size()
    stride = max(1, math.ceil(size / FULL_HASH_BYTES)) if tensor.ndim else 1
    digest = hashlib.sha256(f"{tuple(tensor.shape)} {tensor.dtype} {stride}".encode())
    rows = tensor[::stride] if stride > 1 else tensor
    digest.update(rows.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest(), "all rows" if stride == 1 else f"every {stride}th row"
