"""Process-wide switches that every layer of the package may read (it imports nothing of ours)."""

from __future__ import annotations

import os


def quick_mode() -> bool:
    """True when ``WORKBENCH_QUICK`` asks for the small sizes that tests and CI use."""
    return os.environ.get("WORKBENCH_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}
