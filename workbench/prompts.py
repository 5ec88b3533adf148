"""Look at one prompt through a model: loss per token and the top predictions at each step."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptReport:
    """What a model makes of a prompt.

    ``tokens[i]`` is the i-th token (0 is BOS); ``losses[i]`` is the cross-entropy in nats
    of predicting ``tokens[i]`` from everything before it (NaN for BOS, which is given);
    ``top_predictions[i]`` are the k likeliest next tokens after position i, with their
    probabilities, so the last entry is the model's guess of what follows the prompt.
    """

    text: str
    tokens: list[str]
    losses: list[float]
    top_predictions: list[list[tuple[str, float]]]

    @property
    def mean_loss(self) -> float:
        scored = [loss for loss in self.losses if not math.isnan(loss)]
        return sum(scored) / len(scored)

    def rows(self) -> list[dict]:
        return [
            {"position": i, "token": tok, "loss": loss, "top_next": ", ".join(f"{t!r} {p:.2f}" for t, p in top)}
            for i, (tok, loss, top) in enumerate(zip(self.tokens, self.losses, self.top_predictions))
        ]

    def _repr_html_(self) -> str:
        """A table for notebooks; token text is escaped (it is arbitrary user text)."""
        cells = "".join(
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>".format(
                row["position"],
                html.escape(repr(row["token"])),
                "" if math.isnan(row["loss"]) else f"{row['loss']:.2f}",
                html.escape(row["top_next"]),
            )
            for row in self.rows()
        )
        return (
            f"<p>mean loss {self.mean_loss:.3f} nats/token over {len(self.tokens) - 1} predicted tokens</p>"
            "<table><tr><th>pos</th><th>token</th><th>loss (nats)</th><th>top next tokens</th></tr>"
            f"{cells}</table>"
        )


@torch.no_grad()
def prompt_report(model, text: str, k: int = 5) -> PromptReport:
    """Run ``text`` (BOS prepended) through ``model`` and report per-token loss and top-k."""
    if not text:
        raise ValueError("the prompt is empty: give at least one character of text")
    tokens = model.to_tokens(text, truncate=False)  # [1, pos], BOS first; not cut at n_ctx, refused below
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"the prompt is {tokens.shape[1]} tokens; {model.cfg.model_name} reads at most {model.cfg.n_ctx}")
    logits = model(tokens).float()[0]  # [pos, vocab]
    log_probs = logits.log_softmax(-1)
    ids = tokens[0]
    losses = [math.nan] + (-log_probs[:-1].gather(-1, ids[1:, None])[:, 0]).tolist()
    top_p, top_i = log_probs.exp().topk(k, dim=-1)
    top = [
        [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(ps, is_)]
        for ps, is_ in zip(top_p, top_i)
    ]
    strings = [model.tokenizer.decode([int(i)]) for i in ids]
    return PromptReport(text=text, tokens=strings, losses=losses, top_predictions=top)


def plot_token_losses(report: PromptReport, width: str | float = "double"):
    """Bar chart of loss per token, in the paper style. Returns the figure."""
    from .figures import paper_figure, paper_style

    fig, ax = paper_figure(width, aspect=0.35)
    with paper_style():
        positions = list(range(1, len(report.tokens)))
        ax.bar(positions, report.losses[1:], width=0.8)
        ax.set_xticks(positions)
        ax.set_xticklabels([repr(t)[1:-1].replace(" ", "·") for t in report.tokens[1:]], rotation=90, fontfamily="monospace")
        ax.set_ylabel("loss (nats)")
        ax.set_title(f"loss per token (mean {report.mean_loss:.2f} nats)")
        ax.grid(axis="x", visible=False)
    return fig
