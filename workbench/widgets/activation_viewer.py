"""Activation viewer: where a neuron (a column of a cached hook) fires most, in context.

Why: a unit is understood from the text it responds to (the "top activating contexts" of
feature dashboards; DESIGN.md, "Feature dashboards"). The data functions stream the cache
once with bounded memory and read back only the rows shown, so the notebook never holds the
cache, and the view receives only the top-n contexts (DESIGN.md, "Widgets").

Pure, tested data functions: ``top_activating_rows``, ``context_activations``,
``row_top_neurons``. ``ActivationViewer`` is a thin view over them, rendered by the shared
``TokenSequences`` view (``tokens.js``: every string set with textContent).

DOM classes (stable, for the browser test):
- ``.wb-hook``: the hook Dropdown (an ipywidgets Dropdown; its ``select`` element);
- ``.wb-neuron``: the neuron BoundedIntText (its ``input`` element; change it and press Enter);
- ``.wb-activation-viewer``: the root of the view;
- ``.wb-context``: one line per top context (``data-line`` = rank), in order of activation;
- ``span.wb-token[data-position][data-row]``: a token, coloured by the neuron's activation;
  ``.wb-marked`` is the activating token of its context;
- ``.wb-selected``: the clicked token; ``.wb-token-detail``: its row's top neurons (each
  ``.wb-action[data-neuron]`` switches the viewer to that neuron when clicked).
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache.format import BLOCK_ROWS, DTYPES
from .token_view import TokenSequences, finite

PROGRESS_ROWS = 1 << 17  # caches at least this large show a progress bar while scanned


def _check_neuron(cache, hook: str, neuron: int) -> None:
    d = cache.d(hook)  # KeyError naming the hooks when the hook is not cached
    if not 0 <= int(neuron) < d:
        raise IndexError(f"neuron must lie in [0, {d}) for {hook}, got {neuron}")


def top_activating_rows(cache, hook: str, neuron: int, n: int = 10, chunk_rows: int = 8 * BLOCK_ROWS,
                        progress: bool | None = None) -> list[tuple[int, float]]:
    """The ``n`` rows where column ``neuron`` of ``hook`` is largest, as (row, value), largest
    first; ties go to the earlier row, NaN never counts. One in-order pass over the cache,
    memory bounded by ``chunk_rows`` rows (``progress`` None: a bar for caches of ≥ 2¹⁷ rows).

    Reads contiguous row ranges with ``cache.activations`` at the cached dtype, which is exact
    (float16/bfloat16 → float64 loses nothing). Measured here on a 2²⁰-row, d = 128 float16
    cache: about 1 s, against 40 s through ``cache.batches(shuffle=False)``, whose per-batch
    gather and float32 cast of every column dominate when only one column is wanted.
    """
    _check_neuron(cache, hook, neuron)
    stored = DTYPES[cache.manifest["dtype"]][0]
    best_v, best_r = np.empty(0, np.float64), np.empty(0, np.int64)
    show = cache.n_tokens >= PROGRESS_ROWS if progress is None else progress
    with tqdm(total=cache.n_tokens, unit="tok", desc=f"scanning {hook}[{neuron}]", disable=not show, leave=False) as bar:
        for start in range(0, cache.n_tokens, chunk_rows):
            rows = np.arange(start, min(start + chunk_rows, cache.n_tokens))
            column = cache.activations(hook, rows, dtype=stored)[:, neuron].double().numpy()
            values = np.concatenate([best_v, np.nan_to_num(column, nan=-np.inf)])
            rows = np.concatenate([best_r, rows])
            keep = np.lexsort((rows, -values))[:n]  # by value descending, then row ascending
            best_v, best_r = values[keep], rows[keep]
            bar.update(column.size)
    return [(int(r), float(v)) for r, v in zip(best_r, best_v) if v != -np.inf]


def _decode(tokenizer, ids: list[int]) -> list[str]:
    """One string per id. ``tokenizer``: anything with ``decode(list[int])`` (a transformers or
    ``tokenizers`` tokenizer), a model with a ``.tokenizer``, or None (ids shown as ``[id]``)."""
    if tokenizer is not None and not hasattr(tokenizer, "decode"):
        tokenizer = getattr(tokenizer, "tokenizer", None)
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def context_activations(cache, hook: str, neuron: int, row: int, before: int = 16, after: int = 4,
                        tokenizer=None) -> dict:
    """The context of ``row`` (within its own sequence, as ``cache.context`` clips it) with the
    neuron's activation at every context token.

    Returns ``{"row", "sequence", "rows", "ids", "tokens", "values", "position"}``: ``rows`` the
    global rows of the context, ``values[i]`` the activation at ``rows[i]`` (None if not finite),
    ``position`` the index of ``row`` itself.
    """
    _check_neuron(cache, hook, neuron)
    ids, position = cache.context(int(row), before, after)
    first = int(row) - position  # context never crosses its sequence, so its rows are consecutive
    rows = list(range(first, first + len(ids)))
    values = cache.activations(hook, rows)[:, neuron].tolist()
    return {
        "row": int(row),
        "sequence": cache.position(row)[0],
        "rows": rows,
        "ids": [int(i) for i in ids],
        "tokens": _decode(tokenizer, ids),
        "values": [finite(v) for v in values],
        "position": position,
    }


def row_top_neurons(cache, hook: str, row: int, n: int = 10) -> list[tuple[int, float]]:
    """The ``n`` largest columns of ``hook`` at ``row``, as (neuron, value), largest first
    (by value, as ``top_activating_rows`` ranks: what "fires most" means)."""
    x = cache.activations(hook, [int(row)])[0].nan_to_num(nan=-torch.inf)
    values, index = x.sort(descending=True, stable=True)
    return [(int(i), float(v)) for i, v in zip(index[:n], values[:n])]


class ActivationViewer(widgets.VBox):
    """Hook Dropdown (``.wb-hook``) + neuron BoundedIntText (``.wb-neuron``) over the top contexts.

    ``select(hook=None, neuron=None)`` does what the controls do; ``select_row(row)`` shows a
    row (pinned above the top contexts when it is not among them) and its top neurons, as
    clicking a token does. Scans are cached per (hook, neuron). ``data`` holds what is shown.
    """

    def __init__(self, cache, tokenizer=None, hook: str | None = None, neuron: int = 0, n: int = 10,
                 before: int = 16, after: int = 4):
        self.cache, self.tokenizer, self.n, self.before, self.after = cache, tokenizer, n, before, after
        hook = hook if hook is not None else cache.hooks[0]
        _check_neuron(cache, hook, neuron)
        self._scans: dict[tuple[str, int], list[tuple[int, float]]] = {}
        self._shown: tuple[str, int] | None = None
        self._pinned: int | None = None
        self._quiet = False
        self.data: dict | None = None
        self.hook_dropdown = widgets.Dropdown(options=cache.hooks, value=hook, description="hook")
        self.hook_dropdown.add_class("wb-hook")
        self.neuron_input = widgets.BoundedIntText(value=neuron, min=0, max=cache.d(hook) - 1, description="neuron")
        self.neuron_input.add_class("wb-neuron")
        self.view = TokenSequences(kind="activation_viewer")
        super().__init__([widgets.HBox([self.hook_dropdown, self.neuron_input]), self.view])
        self.hook_dropdown.observe(self._on_control, names="value")
        self.neuron_input.observe(self._on_control, names="value")
        self.view.observe(self._on_selected, names="selected")
        self.view.on_msg(self._on_msg)
        self._refresh()

    # --- the controls ------------------------------------------------------------------
    def select(self, hook: str | None = None, neuron: int | None = None) -> None:
        """Show ``hook`` and/or ``neuron``, exactly as choosing them in the controls would."""
        hook = self.hook_dropdown.value if hook is None else hook
        neuron = self.neuron_input.value if neuron is None else int(neuron)
        _check_neuron(self.cache, hook, neuron)  # KeyError / IndexError before any control moves
        self._quiet = True  # one refresh for both controls
        try:
            self.hook_dropdown.value = hook
            self.neuron_input.max = self.cache.d(hook) - 1
            self.neuron_input.value = neuron
        finally:
            self._quiet = False
        self._refresh()

    def select_row(self, row: int) -> None:
        """Show ``row`` in its context and its top neurons, as clicking its token does."""
        if not 0 <= int(row) < self.cache.n_tokens:
            raise IndexError(f"row must lie in [0, {self.cache.n_tokens}), got {row}")
        self._pinned = int(row)
        self._shown = None
        self._refresh()

    def _on_control(self, change) -> None:
        if self._quiet:
            return
        if change["owner"] is self.hook_dropdown:  # a narrower hook clamps the neuron: one refresh
            self._quiet = True
            try:
                self.neuron_input.max = self.cache.d(change["new"]) - 1
            finally:
                self._quiet = False
        self._refresh()

    def _on_msg(self, widget, content, buffers) -> None:
        if isinstance(content, dict) and "select_neuron" in content:
            self.select(neuron=int(content["select_neuron"]))

    # --- rendering ---------------------------------------------------------------------
    def top_rows(self, hook: str, neuron: int) -> list[tuple[int, float]]:
        """``top_activating_rows``, scanned once per (hook, neuron)."""
        key = (hook, int(neuron))
        if key not in self._scans:
            self._scans[key] = top_activating_rows(self.cache, hook, neuron, self.n)
        return self._scans[key]

    def _refresh(self) -> None:
        hook, neuron = self.hook_dropdown.value, int(self.neuron_input.value)
        if (hook, neuron) == self._shown:
            return
        self._shown = (hook, neuron)
        top = self.top_rows(hook, neuron)
        rows = [r for r, _ in top]
        if self._pinned is not None and self._pinned not in rows:
            rows = [self._pinned] + rows
        contexts = [context_activations(self.cache, hook, neuron, r, self.before, self.after, self.tokenizer)
                    for r in rows]
        self.data = {"hook": hook, "neuron": neuron, "top": top, "contexts": contexts}
        values = [abs(v) for c in contexts for v in c["values"] if v is not None]
        peak = max(values, default=1.0) or 1.0
        ranked = {r: i for i, (r, _) in enumerate(top)}
        lines = []
        for c in contexts:
            rank = ranked.get(c["row"])
            value = c["values"][c["position"]]
            label = f"#{rank + 1}" if rank is not None else "picked"
            label += f" row {c['row']} · {'—' if value is None else f'{value:.3g}'}"
            lines.append({"label": label, "marked": c["position"], "tokens": [
                {"text": t, "value": v, "row": r} for t, v, r in zip(c["tokens"], c["values"], c["rows"])]})
        with self.view.hold_sync():
            self.view.selected = None
            self.view.detail = None
            self.view.scale = {"min": -peak, "max": peak, "label": f"{hook}[{neuron}]", "diverging": True}
            self.view.title = (f"{hook}, neuron {neuron}: top {len(top)} of {self.cache.n_tokens:,} rows"
                               + ("" if top and top[0][1] > 0 else " (it never fires above 0)"))
            self.view.lines = lines
        if self._pinned is not None:
            line = next(i for i, c in enumerate(contexts) if c["row"] == self._pinned)
            self.view.selected = {"line": line, "position": contexts[line]["position"]}

    def _on_selected(self, change) -> None:
        where = change["new"]
        contexts = self.data["contexts"] if self.data else []
        if not where or not 0 <= where.get("line", -1) < len(contexts) \
                or not 0 <= where.get("position", -1) < len(contexts[where["line"]]["rows"]):
            self.view.detail = None
            return
        row = contexts[where["line"]]["rows"][where["position"]]
        hook = self.data["hook"]
        self.view.detail = {"line": where["line"], "position": where["position"], "sections": [{
            "title": f"top neurons of {hook} at row {row}",
            "rows": [{"label": f"neuron {i}", "value": finite(v), "neuron": i} for i, v in row_top_neurons(self.cache, hook, row, self.n)],
        }]}
