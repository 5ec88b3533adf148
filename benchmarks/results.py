"""Each benchmark owns one section of benchmarks/RESULTS.md and rewrites only that section."""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each owns one section.\n"


def machine() -> str:
    import os

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section of RESULTS.md between this benchmark's markers."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def commit() -> str:
    """The short hash of the checked-out commit, recorded beside each result."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def read_record(path: Path) -> list[dict]:
    """The runs a long benchmark has finished, one JSON object per line (none if no file)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_record(path: Path, run: dict) -> None:
    """Add one finished run to the record, as soon as it finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(run) + "\n")
