"""Process-wide switches that every layer of the package may read (it imports nothing of ours)."""

from __future__ import annotations

import os


def quick_mode() -> bool:
    """True when ``WORKBENCH_QUICK`` asks for the small sizes that tests and CI use."""
    return os.environ.get("WORKBENCH_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}


NOTEBOOK_SIZES = ("default", "full")


def notebook_size(requested: str = "default") -> str:
    """The size a notebook runs at: ``requested`` ("default": minutes on a laptop CPU, or
    "full": the sizes of the benchmarks), or "test" under ``WORKBENCH_QUICK`` (the test suite)."""
    if requested not in NOTEBOOK_SIZES:
        raise ValueError(f"SIZE must be one of {NOTEBOOK_SIZES}, got {requested!r}")
    return "test" if quick_mode() else requested
