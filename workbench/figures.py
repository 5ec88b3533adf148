"""One matplotlib style for papers, and ``save_figure`` to export it.

Widths follow the common two-column templates (ICML/NeurIPS/ACL: 3.25 in single column,
6.75 in double). Fonts are sized to stay readable when the figure is placed at 100%.
Colours are the Okabe–Ito palette (Okabe & Ito 2008), distinguishable under the common
colour-vision deficiencies. PDFs embed TrueType (Type 42) fonts, as publishers require
(Type 3 fonts are rejected by some submission systems); SVG text is drawn as paths so it
renders identically without the font installed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

COLUMN_WIDTH_IN = {"single": 3.25, "double": 6.75}
OKABE_ITO = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
FORMATS = ("pdf", "svg", "png")

PAPER_RC = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib: identical everywhere
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.prop_cycle": matplotlib.cycler(color=list(OKABE_ITO)),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "figure.dpi": 150,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "path",
}


def figure_size(width: str | float = "single", aspect: float = 0.62) -> tuple[float, float]:
    """(width, height) in inches: ``width`` is "single", "double" or inches; height = aspect·width."""
    if isinstance(width, str):
        if width not in COLUMN_WIDTH_IN:
            raise ValueError(f"width must be one of {sorted(COLUMN_WIDTH_IN)} or a number of inches, got {width!r}")
        width = COLUMN_WIDTH_IN[width]
    if width <= 0 or aspect <= 0:
        raise ValueError(f"width and aspect must be positive, got width={width}, aspect={aspect}")
    return float(width), float(width) * aspect


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """Apply the paper style inside a ``with`` block; the keys it sets are restored after.

    Not ``matplotlib.rc_context``: that restores *every* rcParam on exit. In a notebook the
    first ``import matplotlib.pyplot`` switches on interactive mode (IPython's inline
    backend); done inside ``rc_context``, that was undone on exit, and no later cell of the
    kernel showed its figure. So pyplot is imported (and the backend resolved) first, and
    only the style's own keys are put back.
    """
    import matplotlib.pyplot  # noqa: F401  (backend set-up happens here, outside the style)

    saved = {key: matplotlib.rcParams[key] for key in PAPER_RC}
    matplotlib.rcParams.update(PAPER_RC)
    try:
        yield
    finally:
        matplotlib.rcParams.update(saved)


def use_paper_style() -> None:
    """Apply the paper style globally (for a whole notebook)."""
    matplotlib.rcParams.update(PAPER_RC)


def paper_figure(width: str | float = "single", aspect: float = 0.62, nrows: int = 1, ncols: int = 1, **subplots_kw):
    """``plt.subplots`` at a paper width, drawn in the paper style. Returns (fig, axes)."""
    import matplotlib.pyplot as plt

    with paper_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=figure_size(width, aspect), **subplots_kw)
    return fig, axes


class SavedFigure(list):
    """The paths ``save_figure`` wrote (a list of Paths), shown in a notebook as one line."""

    def __repr__(self) -> str:
        if not self:
            return "no figure written"
        first = self[0]
        return f"saved {first.stem}.{{{','.join(p.suffix[1:] for p in self)}}} in {first.parent}"

    def _repr_html_(self) -> str:
        import html

        return f"<code>{html.escape(repr(self))}</code>"


def save_figure(fig, name: str, formats: Sequence[str] = FORMATS, out_dir: str | Path | None = None) -> SavedFigure:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format; returns the paths written.

    ``out_dir`` defaults to ``paths.figures_dir()``: ``figures/`` at the repository root,
    the same from a notebook, a script or the demo (``WORKBENCH_FIGURES`` moves it).
    Saving happens inside the paper style, so font embedding holds even for a figure made
    outside it.
    """
    from .paths import figures_dir

    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise ValueError(f"unsupported figure formats {unknown}; choose from {FORMATS}")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem such as 'loss_per_token', got {name!r}")
    out = Path(out_dir) if out_dir is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = SavedFigure()
    with paper_style():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, format=fmt)
            paths.append(path)
    return paths
