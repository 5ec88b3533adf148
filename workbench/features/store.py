"""A feature index on disk: one memory-mapped ``.npy`` file per table, feature-major.

Every table is an array whose first axis is the feature, so feature f's entries are one
contiguous slice of each file: opening maps the files (no read), and reading a feature
touches only its own bytes (a few kB). ``index.json`` describes the build and is written
last, so a folder without it is not an index (a killed build is simply rebuilt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..paths import atomic_write_bytes

INDEX_FILE = "index.json"
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
STATS = ("count", "density", "max", "mean", *(f"q{q:g}" for q in QUANTILES))
FILES = {
    "stats": "per feature: " + ", ".join(STATS) + " of its nonzero activations",
    "histogram": "counts of nonzero activations in equal bins of (0, max]",
    "context_rows": "cache row of each context's activating token (top-N, then quantile-bin samples; -1: none)",
    "context_values": "the feature's activation at that token",
    "context_tokens": "token ids of the window around it (-1: outside the sequence)",
    "context_acts": "the feature's activation at every token of the window",
    "neighbour_ids": "nearest features by decoder cosine",
    "neighbour_cos": "their cosines",
    "correlated_ids": "most correlated features (Pearson, activations)",
    "correlated_r": "their correlations",
    "cooccurring_ids": "most co-occurring features (Jaccard of the rows they fire on)",
    "cooccurring_jaccard": "their Jaccard indices",
    "logit_top_ids": "tokens W_dec[f]·W_U promotes most", "logit_top_values": "their logit effects",
    "logit_bottom_ids": "tokens it suppresses most", "logit_bottom_values": "their logit effects",
    "logit_histogram": "counts of W_dec[f]·W_U over the vocabulary, 32 bins of logit_range",
    "logit_range": "min and max of W_dec[f]·W_U",
    "head_share": "attention-output SAEs: share of the decoder norm in each head's slice (Kissane et al. 2024)",
}


def write_array(folder: Path, name: str, array: np.ndarray) -> None:
    """One table, atomically (a reader sees the old file or the new one, never half)."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    atomic_write_bytes(folder / f"{name}.npy", buffer.getvalue())


@dataclass
class Context:
    """One context of a feature: the window of tokens around ``row`` with the feature's
    activation at each; ``centre`` is the index of the row's own token in ``tokens``."""

    row: int
    activation: float
    tokens: list[int]
    acts: list[float]
    centre: int
    kind: str  # "top" or "bin b" (activation-quantile bin b, 0 = lowest)


class FeatureIndex:
    """Read side of ``build_index``: ``FeatureIndex.open(folder)``."""

    def __init__(self, folder: Path, meta: dict, tables: dict[str, np.ndarray]):
        self.path, self.meta, self._tables = folder, meta, tables

    @classmethod
    def open(cls, folder: str | Path) -> "FeatureIndex":
        folder = Path(folder)
        if not (folder / INDEX_FILE).exists():
            raise FileNotFoundError(f"{folder} holds no feature index ({INDEX_FILE} is missing: the build never finished "
                                    "there). Build one with workbench.features.build_index(sae, cache, out_dir=...)")
        meta = json.loads((folder / INDEX_FILE).read_text())
        tables = {}
        for name in meta["files"]:
            try:
                tables[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                raise ValueError(f"{folder / (name + '.npy')} cannot be read ({err}): rebuild the index") from err
            if tables[name].shape[0] != meta["d_sae"]:
                raise ValueError(f"{folder / (name + '.npy')} has {tables[name].shape[0]} rows, not d_sae="
                                 f"{meta['d_sae']}: the index is damaged; rebuild it")
        return cls(folder, meta, tables)

    # --- description ------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return self.meta["d_sae"]

    @property
    def n_rows(self) -> int:
        return self.meta["n_rows"]

    @property
    def has_logits(self) -> bool:
        return "logit_top_ids" in self._tables

    def _check(self, f) -> int:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < self.d_sae:
            raise ValueError(f"feature must be an integer in [0, {self.d_sae}), got {f!r}")
        return int(f)

    def table(self, name: str, f: int) -> np.ndarray:
        """Feature f's slice of one table (a copy: the map stays read-only)."""
        return np.array(self._tables[name][self._check(f)])

    # --- per feature ------------------------------------------------------------------
    def stats(self, f: int) -> dict[str, float]:
        """count, density, max, mean and quantiles of feature f's nonzero activations."""
        return dict(zip(STATS, map(float, self.table("stats", f))))

    def density(self, f: int) -> float:
        """Fraction of the indexed rows on which feature f fires."""
        return float(self.table("stats", f)[1])

    def histogram(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(counts, bin edges) of feature f's nonzero activations on equal bins of (0, max]."""
        counts = self.table("histogram", f)
        return counts, np.linspace(0.0, self.stats(f)["max"], counts.size + 1)

    def contexts(self, f: int) -> list[Context]:
        """Top-N contexts (by activation, descending), then the quantile-bin samples."""
        rows, values = self.table("context_rows", f), self.table("context_values", f)
        tokens, acts = self.table("context_tokens", f), self.table("context_acts", f)
        before = self.meta["window"][0]
        out = []
        for j, kind in enumerate(self.meta["context_kinds"]):
            if rows[j] < 0:
                continue
            keep = tokens[j] >= 0
            centre = before - int((~keep[:before]).sum())
            out.append(Context(int(rows[j]), float(values[j]), tokens[j][keep].tolist(),
                               acts[j][keep].astype(float).tolist(), centre, kind))
        return out

    def top_contexts(self, f: int) -> list[tuple[int, float, list[int]]]:
        """(cache row, activation, context token ids) of feature f's top-N rows, by activation."""
        return [(c.row, c.activation, c.tokens) for c in self.contexts(f) if c.kind == "top"]

    def neighbours(self, f: int) -> list[tuple[int, float]]:
        """Nearest features by decoder cosine, (feature, cosine)."""
        return list(zip(self.table("neighbour_ids", f).tolist(), self.table("neighbour_cos", f).tolist()))

    def correlated(self, f: int) -> list[tuple[int, float]]:
        """Most correlated features by activation (Pearson r), (feature, r)."""
        return [(j, r) for j, r in zip(self.table("correlated_ids", f).tolist(), self.table("correlated_r", f).tolist())
                if np.isfinite(r)]

    def cooccurring(self, f: int) -> list[tuple[int, float]]:
        """Features firing on the same rows most often (Jaccard index), (feature, jaccard)."""
        return [(j, s) for j, s in zip(self.table("cooccurring_ids", f).tolist(),
                                       self.table("cooccurring_jaccard", f).tolist()) if np.isfinite(s) and s > 0]

    def logit_tokens(self, f: int) -> dict | None:
        """Token ids W_dec[f]·W_U promotes and suppresses most, with their logit effects,
        and the histogram over the vocabulary (None when built without a model)."""
        if not self.has_logits:
            return None
        lo, hi = self.table("logit_range", f)
        return {"top": list(zip(self.table("logit_top_ids", f).tolist(), self.table("logit_top_values", f).tolist())),
                "bottom": list(zip(self.table("logit_bottom_ids", f).tolist(),
                                   self.table("logit_bottom_values", f).tolist())),
                "histogram": self.table("logit_histogram", f), "edges": np.linspace(lo, hi, 33)}

    def head_shares(self, f: int) -> list[float] | None:
        """An attention-output SAE's feature f: its share of decoder norm per head (None for
        other SAEs, or an index built without the model)."""
        return self.table("head_share", f).tolist() if "head_share" in self._tables else None

    def __repr__(self) -> str:
        return (f"FeatureIndex({self.path}: {self.d_sae:,} features of {self.meta['sae_architecture']} k={self.meta['k']} "
                f"on {self.meta['hook']!r}, {self.n_rows:,} rows)")
