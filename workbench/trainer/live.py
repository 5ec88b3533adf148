"""A live training plot for notebooks: loss, FVU, L0 and dead fraction per SAE.

It is one PNG in one display handle, replaced in place on each ``update``. Not an
ipywidgets ``Output``: that context manager swallows exceptions raised inside it, so a
Kernel → Interrupt landing during a redraw was caught there and training carried on; and a
saved notebook shows an ``Output`` as the text ``Output()``. A display handle raises like
any code and leaves its last image in the saved notebook: the final curves.
"""

from __future__ import annotations

import io

METRICS = (("loss", "loss", True), ("fvu", "FVU", True), ("l0", "L0", False), ("dead_fraction", "dead fraction", False))
"""(history key, panel title, log scale): loss and FVU span orders of magnitude while training."""


def plot_history(labels: list[str], history: list[list[dict]], width: str | float = "double"):
    """The four panels against training tokens (millions), one line with markers per SAE and
    one shared legend under the panels (never over the tick labels). Returns the figure."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    from ..figures import paper_figure, paper_style

    most = max((r["tokens"] for rows in history for r in rows), default=1)
    scale, unit = (1e6, "M") if most >= 1e6 else (1e3, "k")
    with paper_style():
        fig, axes = paper_figure(width, aspect=0.3, ncols=len(METRICS))
        for ax, (key, title, log_scale) in zip(axes, METRICS):
            for label, rows in zip(labels, history):
                # Markers, so a curve of one point (the first log step) is still visible.
                ax.plot([r["tokens"] / scale for r in rows], [r[key] for r in rows], marker="o", markersize=2, label=label)
            ax.set_title(title)
            ax.set_xlabel(f"tokens ({unit})")
            ax.set_xlim(0, most / scale * 1.05)  # from the start: no zoom onto one point's rounding noise
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            if log_scale and all(r[key] > 0 for rows in history for r in rows):
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks crowd the axis
        handles, names = axes[0].get_legend_handles_labels()
        rows_of_legend = -(-len(names) // 3)
        fig.tight_layout(rect=(0, 0.09 * rows_of_legend if handles else 0, 1, 1))
        if handles:
            fig.legend(handles, names, loc="lower center", ncol=3, fontsize=6)
    return fig


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # the legend under the panels stays in
    plt.close(fig)
    return buffer.getvalue()


class LivePlot:
    """Redraws ``plot_history`` into one notebook display slot."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.handle = None

    def update(self, history: list[list[dict]]) -> None:
        from IPython.display import Image, display

        if not any(history):
            return
        image = Image(data=_png(plot_history(self.labels, history)), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
