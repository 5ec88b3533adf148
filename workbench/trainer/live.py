"""A live-updating training plot for notebooks: loss, FVU, L0 and dead fraction per SAE."""

from __future__ import annotations

METRICS = (("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction"))


class LivePlot:
    """One ipywidgets Output holding a 1×4 paper-style figure, redrawn on ``update``."""

    def __init__(self, labels: list[str]):
        import ipywidgets
        from IPython.display import display

        self.labels = labels
        self.output = ipywidgets.Output()
        display(self.output)

    def update(self, history: list[list[dict]]) -> None:
        import matplotlib.pyplot as plt

        from ..figures import paper_figure, paper_style

        fig, axes = paper_figure("double", aspect=0.25, ncols=len(METRICS))
        with paper_style():
            for ax, (key, title) in zip(axes, METRICS):
                for label, rows in zip(self.labels, history):
                    ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], label=label)
                ax.set_title(title)
                ax.set_xlabel("tokens")
                if key in ("loss", "fvu"):
                    ax.set_yscale("log")
            axes[0].legend(fontsize=6)
            fig.tight_layout()
        with self.output:
            self.output.clear_output(wait=True)
            from IPython.display import display

            display(fig)
        plt.close(fig)
