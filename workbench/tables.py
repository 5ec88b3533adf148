"""Rows of results (lists of dicts) as markdown tables, for notebooks, the CLI and the demo."""

from __future__ import annotations


def markdown_table(rows: list[dict], keys: list[str] | None = None) -> str:
    """A markdown table of ``rows`` over ``keys`` (default: the first row's); floats to 4 decimals."""
    if not rows:
        return "(no rows)"
    keys = keys or list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
