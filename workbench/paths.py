"""Where the workbench keeps shipped data, caches and checkpoints.

Everything is relative to the repository root (the package is installed editable), and
``WORKBENCH_DATA`` can point the data folder somewhere else (a shared cluster disk, say).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shipped data folder: tokenizer, zoo weights and model cards."""
    return Path(os.environ.get("WORKBENCH_DATA", REPO_ROOT / "data"))


def cache_dir() -> Path:
    """Git-ignored caches (token arrays, activations); safe to delete, rebuilt on demand."""
    path = data_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """Where ``save_figure`` writes by default: ``figures/`` at the repository root, whatever
    the working directory (a notebook runs in ``notebooks/``); ``WORKBENCH_FIGURES`` moves it."""
    return Path(os.environ.get("WORKBENCH_FIGURES", REPO_ROOT / "figures"))


def checkpoints_dir() -> Path:
    """Git-ignored intermediate training checkpoints of the zoo models."""
    return data_dir() / "checkpoints"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so a reader never sees a half-written file.

    The bytes go to a temporary file in the same folder, which is then renamed over the
    target (a rename within one file system is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
