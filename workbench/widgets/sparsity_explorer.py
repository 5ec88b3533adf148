"""Sparsity explorer: move along precomputed sparsity–performance curves in a notebook.

A thin view over a ``SparsityGrid`` (``workbench.sparsity.explore``): every number it shows
is a grid point looked up, never recomputed, so a slider move costs one dictionary lookup
and (the first time a point is shown) one PNG render, cached after that.

    grid = explore_grid(models, evaluation, calibration)      # minutes, once; grid.save(path)
    SparsityExplorer(grid)                                     # the widget (last line of a cell)

DOM classes for browser tests: ``wb-sparsity-explorer`` (root), ``wb-model``, ``wb-method``,
``wb-layer`` (dropdowns), ``wb-target`` (slider), ``wb-readout`` (numbers), ``wb-figure``
(PNG image), ``wb-export`` (button) and ``wb-export-status`` (where the figure went).
"""

from __future__ import annotations

import html
import io
import re
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as widgets

from ..sparsity.explore import SparsityGrid, layer_label, plot_selection, target_kind, target_label


def _figure_png(fig, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig``, closed after so pyplot neither keeps nor re-displays it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _file_stem(*parts) -> str:
    """A safe file stem from user-given names (a model name may hold '/' or spaces)."""
    stem = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)).strip("-.") for p in parts)
    return stem or "sparsity"


def _nearest(options: list[float], old_options: list[float], old_value) -> float:
    """The option at the same position along the slider when the method (its grid) changes."""
    if old_value in options:
        return old_value
    if old_value is None or old_value not in old_options or len(old_options) < 2:
        return options[len(options) // 2]
    fraction = old_options.index(old_value) / (len(old_options) - 1)
    return options[round(fraction * (len(options) - 1))]


class SparsityExplorer:
    """Dropdowns for model, method and layer, a slider over the method's grid targets, the
    readout, the figure and an export button. ``select`` drives it from code the same way."""

    def __init__(self, grid: SparsityGrid, out_dir: str | Path | None = None, formats=("pdf", "svg", "png")):
        if not grid.rows:
            raise ValueError("the grid is empty: build it with explore_grid(models, tokens, calibration)")
        # None: save_figure's default, figures/ at the repository root (paths.figures_dir)
        self.grid, self.out_dir, self.formats = grid, (Path(out_dir) if out_dir is not None else None), tuple(formats)
        self._png: dict[tuple, bytes] = {}
        self._quiet = False

        model = grid.models[0]
        method = grid.methods[0]
        self.model = widgets.Dropdown(options=grid.models, value=model, description="model")
        self.method = widgets.Dropdown(options=grid.methods, value=method, description="method")
        self.layer = widgets.Dropdown(options=self._layer_options(model), value=grid.layers(model)[0], description="layer")
        targets = grid.targets(method)
        # continuous_update=False: a drag shows its end point, not a queue of renders on the way
        self.target = widgets.SelectionSlider(options=self._target_options(method), value=targets[len(targets) // 2],
                                              description=self._slider_label(method), continuous_update=False,
                                              style={"description_width": "initial"})
        self.readout_html = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.export_button = widgets.Button(description="Export figure", icon="download",
                                            tooltip="save_figure of the current selection (PDF, SVG, PNG)",
                                            layout=widgets.Layout(width="auto", min_width="9em"))
        self.export_status = widgets.HTML()
        for control, css in ((self.model, "wb-model"), (self.method, "wb-method"), (self.layer, "wb-layer"),
                             (self.target, "wb-target"), (self.readout_html, "wb-readout"), (self.image, "wb-figure"),
                             (self.export_button, "wb-export"), (self.export_status, "wb-export-status")):
            control.add_class(css)

        self.model.observe(self._on_model, names="value")
        self.method.observe(self._on_method, names="value")
        self.layer.observe(self._on_value, names="value")
        self.target.observe(self._on_value, names="value")
        self.export_button.on_click(lambda _: self.export())

        self.widget = widgets.VBox([
            widgets.HBox([self.model, self.method, self.layer]),
            self.target,
            self.readout_html,
            self.image,
            widgets.HBox([self.export_button, self.export_status]),
        ])
        self.widget.add_class("wb-sparsity-explorer")
        self._refresh()

    # --- options ---------------------------------------------------------------------------
    def _layer_options(self, model: str) -> list[tuple[str, object]]:
        return [(layer_label(layer), layer) for layer in self.grid.layers(model)]

    def _target_options(self, method: str) -> list[tuple[str, float]]:
        return [(f"{t:g}", t) for t in self.grid.targets(method)]

    @staticmethod
    def _slider_label(method: str) -> str:
        return target_label(method)

    # --- events: the controls and select() both end here ------------------------------------
    @contextmanager
    def _batch(self):
        """Change several controls, then refresh once (not once per control)."""
        quiet, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = quiet
        if not quiet:
            self._refresh()

    def _on_model(self, change) -> None:
        with self._batch():
            layers = self.grid.layers(change["new"])
            keep = self.layer.value if self.layer.value in layers else layers[0]
            self.layer.options = self._layer_options(change["new"])
            self.layer.value = keep

    def _on_method(self, change) -> None:
        with self._batch():
            old_targets = self.grid.targets(change["old"]) if change["old"] in self.grid.methods else []
            new_targets = self.grid.targets(change["new"])
            value = _nearest(new_targets, old_targets, self.target.value)
            self.target.options = self._target_options(change["new"])
            self.target.value = value
            self.target.description = self._slider_label(change["new"])

    def _on_value(self, change) -> None:
        if not self._quiet:
            self._refresh()

    def select(self, model: str | None = None, method: str | None = None, layer=None, target: float | None = None):
        """Set any of the controls from code, as a user would; returns ``self``.

        ``layer``: "all" (or "all layers") or a layer index; ``target``: one of
        ``grid.targets(method)``."""
        grid = self.grid
        with self._batch():
            if model is not None:
                _check_choice("model", model, grid.models)
                self.model.value = model
            if method is not None:
                _check_choice("method", method, grid.methods)
                self.method.value = method
            if layer is not None:
                layer = "all" if layer in ("all", "all layers") else layer
                _check_choice("layer", layer, grid.layers(self.model.value))
                self.layer.value = layer
            if target is not None:
                targets = grid.targets(self.method.value)
                match = [t for t in targets if abs(t - float(target)) <= 1e-9 * max(1.0, abs(t))]
                if not match:
                    raise ValueError(f"{target_label(self.method.value)} {target!r} is not on the grid; choose one of {targets}")
                self.target.value = match[0]
        return self

    # --- what is shown -----------------------------------------------------------------------
    @property
    def key(self) -> tuple:
        return self.model.value, self.method.value, self.layer.value, self.target.value

    def point(self) -> dict:
        return self.grid.point(*self.key)

    def readout(self) -> dict:
        """The current selection and its numbers."""
        row = self.point()
        return {"model": row["model"], "method": row["method"], "layer": row["layer"], "target": row["target"],
                "target_kind": row["target_kind"], "ppl_ratio": row["ppl_ratio"], "ppl_ci_low": row["ppl_ci_low"],
                "ppl_ci_high": row["ppl_ci_high"], "flops_skipped": row["flops_skipped"],
                "activation_ratio": row["mean_activation_ratio"],
                "activation_ratio_per_layer": list(row["activation_ratio"])}

    def html(self) -> str:
        """The readout as HTML, every text escaped (model and method names come from users)."""
        r = self.readout()
        kind = "CETT" if r["target_kind"] == "cett" else "sparsity"
        where = "mean over all layers" if r["layer"] == "all" else f"layer {r['layer']}"
        cells = [
            ("selection", f"{r['model']} · {r['method']} · {layer_label(r['layer'])} · target {kind} {r['target']:g}"),
            ("perplexity ratio", f"{r['ppl_ratio']:.4f} (95% CI {r['ppl_ci_low']:.4f}–{r['ppl_ci_high']:.4f})"),
            ("MLP FLOPs skipped", f"{r['flops_skipped']:.1%}"),
            ("activation ratio", f"{r['activation_ratio']:.1%} ({where})"),
        ]
        rows = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                       f"<td>{html.escape(v)}</td></tr>" for k, v in cells)
        return f"<table class='wb-readout-table'>{rows}</table>"

    def figure(self):
        """The paper figure of the current selection (a new matplotlib Figure)."""
        return plot_selection(self.grid, *self.key)

    def png(self) -> bytes:
        """PNG of the current figure, rendered once per grid point."""
        key = self.key
        if key not in self._png:
            self._png[key] = _figure_png(self.figure())
        return self._png[key]

    def _refresh(self) -> None:
        self.readout_html.value = self.html()
        self.image.value = self.png()

    def export(self, name: str | None = None, out_dir: str | Path | None = None) -> list[Path]:
        """``save_figure`` of the current selection; the paths are also shown under the button."""
        from ..figures import save_figure

        model, method, layer, target = self.key
        name = name or _file_stem("sparsity", model, method, "all" if layer == "all" else f"layer{layer}",
                                  f"{'cett' if target_kind(method) == 'cett' else 's'}{target:g}")
        fig = self.figure()
        try:
            paths = save_figure(fig, name, formats=self.formats, out_dir=out_dir or self.out_dir)
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
        self.export_status.value = "wrote " + ", ".join(f"<code>{html.escape(str(p))}</code>" for p in paths)
        return paths

    def _repr_mimebundle_(self, **kwargs):
        # The explorer shows as its root widget when it is the last value of a cell.
        return self.widget._repr_mimebundle_(**kwargs)


def _check_choice(what: str, value, choices: list) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; the grid has {choices}")
