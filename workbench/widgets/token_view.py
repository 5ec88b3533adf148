"""Token view: type text, see each token coloured by its loss, hover for the model's guesses.

Why: the first question about a model is "what does it find hard, and what does it expect
next?". The answer is per token, so it is shown on the tokens themselves: background colour =
next-token cross-entropy (nats) of that token, and on hover or click the token's top next-token
guesses and the MLP neurons most active there (by |x1|, per layer).

A thin view over a pure data function (DESIGN.md, "Widgets"): ``token_view_data`` is tested on
its own; ``TokenView`` only renders it. Both widgets of this package share one anywidget view,
``TokenSequences`` (ES module ``tokens.js``, shipped in the package, no CDN), which sets every
string with textContent, so token text such as ``<img src=x onerror=alert(1)>`` stays literal.

DOM classes (stable, for the browser test):
- ``.wb-prompt``: the Textarea (an ipywidgets Textarea; type into its ``textarea`` element);
- ``.wb-token-view``: the root of the view;
- ``span.wb-token[data-position]``: one per token (position 0 is BOS, uncoloured);
- ``.wb-selected``: the clicked (or ``select``-ed) token;
- ``.wb-token-detail``: the detail panel (top guesses and top neurons of the hovered or selected token);
- also ``.wb-line``, ``.wb-legend``, ``.wb-summary``, ``.wb-error``, ``.wb-detail-section``.
"""

from __future__ import annotations

import math
import pathlib

import anywidget
import ipywidgets as widgets
import torch
import traitlets

from ..prompts import prompt_report
from ..sparsity.mlp import describe_mlps

DEFAULT_TEXT = 'def greet(name):\n    return "Hello, " + name\n'


class TokenSequences(anywidget.AnyWidget):
    """Token sequences with a value per token (the view shared by both widgets).

    Only what is shown is synced: the lines on screen, never a whole cache or report.
    """

    _esm = pathlib.Path(__file__).with_name("tokens.js")
    _css = pathlib.Path(__file__).with_name("tokens.css")
    kind = traitlets.Unicode("token_view").tag(sync=True)
    """Root class: "token_view" → ``.wb-token-view``, "activation_viewer" → ``.wb-activation-viewer``."""
    title = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    scale = traitlets.Dict({"min": 0.0, "max": 1.0, "label": "value", "diverging": False}).tag(sync=True)
    lines = traitlets.List([]).tag(sync=True)
    """[{label, marked, tokens: [{text, value, row?, info?}]}]; see tokens.js for the schema."""
    selected = traitlets.Dict(None, allow_none=True).tag(sync=True)
    """{line, position} of the selected token, set by a click in the browser or by the kernel."""
    detail = traitlets.Dict(None, allow_none=True).tag(sync=True)
    """{line, position, sections}: what the kernel computed for the selected token."""


def finite(value) -> float | None:
    """A float for JSON, or None: NaN is not JSON, and the browser would refuse the message."""
    value = float(value)
    return value if math.isfinite(value) else None


def _check_text(model, text: str) -> torch.Tensor:
    """The tokens of ``text``, or the errors ``prompt_report`` gives for bad input.

    ``to_tokens`` truncates to n_ctx by default (DESIGN.md, "Known traps"), so the length is
    measured with ``truncate=False``: a long text is refused rather than silently cut.
    """
    if not text:
        raise ValueError("the prompt is empty: give at least one character of text")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"{model.cfg.model_name} has no tokenizer: the token view needs one to read text")
    tokens = model.to_tokens(text, truncate=False)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"the prompt is {tokens.shape[1]} tokens; {model.cfg.model_name} reads at most {model.cfg.n_ctx}")
    return tokens


@torch.no_grad()
def token_view_data(model, text: str, k: int = 5, top_neurons: int = 5) -> dict:
    """Per token of ``text`` (BOS first): its string, its loss, the top-k next-token guesses
    after it, and per layer the MLP neurons with the largest |x1| at it. JSON-serialisable.

    Loss and guesses come from ``prompt_report`` (one definition of the loss in the package);
    the MLP activations are captured from that same forward pass. x1 is ``hook_post`` with a
    gated MLP's b_in removed (``MLPSite.x1_from_post``): b_in is a constant, not the neuron's
    response to the text. Neurons are ranked by |x1| and reported with their signed x1.

    Returns ``{"text", "model", "n_ctx", "loss_scale", "mean_loss", "layers", "tokens"}``
    with ``tokens[i] = {"position", "id", "token", "loss" (None for BOS),
    "top_predictions": [[token, prob], ...], "top_neurons": [[[index, x1], ...] per layer]}``.
    ``loss_scale`` = ln(d_vocab), the loss of a uniform guess: a fixed colour scale, so
    colours mean the same from one text to the next.
    """
    ids = _check_text(model, text)[0]
    sites = describe_mlps(model)
    posts: dict[int, torch.Tensor] = {}

    def capture(layer):
        return lambda act, hook: posts.__setitem__(layer, act[0].detach())

    with model.hooks(fwd_hooks=[(site.hook_post, capture(site.layer)) for site in sites]):
        report = prompt_report(model, text, k=k)
    neurons = []  # per layer: (indices [pos, m], values [pos, m])
    for site in sites:
        x1 = site.x1_from_post(posts[site.layer]).float()
        index = x1.abs().topk(min(top_neurons, site.d_mlp), dim=-1).indices
        neurons.append((index.tolist(), x1.gather(-1, index).tolist()))
    tokens = []
    for pos, token in enumerate(report.tokens):
        loss = report.losses[pos]
        tokens.append({
            "position": pos,
            "id": int(ids[pos]),
            "token": token,
            "loss": None if math.isnan(loss) else float(loss),
            "top_predictions": [[s, float(p)] for s, p in report.top_predictions[pos]],
            "top_neurons": [[[i, finite(v)] for i, v in zip(index[pos], values[pos])] for index, values in neurons],
        })
    return {
        "text": text,
        "model": str(model.cfg.model_name),
        "n_ctx": int(model.cfg.n_ctx),
        "loss_scale": math.log(model.cfg.d_vocab),
        "mean_loss": float(report.mean_loss),
        "layers": [site.hook_post for site in sites],
        "tokens": tokens,
    }


def token_view_line(data: dict) -> dict:
    """The view's line for ``token_view_data``: value = loss, hover info = guesses and neurons."""
    tokens = []
    for tok in data["tokens"]:
        info = [{"title": "next token guesses (probability)", "tokens": True,
                 "rows": [{"label": s, "value": p} for s, p in tok["top_predictions"]]}]
        info += [{"title": f"layer {layer} MLP: top neurons by |x1|",
                  "rows": [{"label": f"neuron {i}", "value": v} for i, v in layer_neurons]}
                 for layer, layer_neurons in enumerate(tok["top_neurons"])]
        tokens.append({"text": tok["token"], "value": tok["loss"], "info": info})
    return {"label": "", "marked": None, "tokens": tokens}


class TokenView(widgets.VBox):
    """A Textarea (``.wb-prompt``) over the token view; typing re-runs the model.

    ``set_text(text)`` does what typing does, ``select(position)`` what a click does; ``data``
    is the current ``token_view_data`` (None while the text is refused, e.g. empty).
    """

    def __init__(self, model, text: str = DEFAULT_TEXT, k: int = 5, top_neurons: int = 5):
        self.model, self.k, self.top_neurons = model, k, top_neurons
        self.data: dict | None = None
        self._shown: str | None = None
        self.textarea = widgets.Textarea(value=text, placeholder="Type text for the model to read",
                                         layout=widgets.Layout(width="100%", height="10em"))
        self.textarea.add_class("wb-prompt")
        self.view = TokenSequences(kind="token_view")
        super().__init__([self.textarea, self.view])
        self.textarea.observe(self._on_text, names="value")
        self._update(text)

    def set_text(self, text: str) -> None:
        """Replace the text, exactly as typing it into the Textarea would."""
        self.textarea.value = text
        self._update(text)  # no-op when the observer already showed it

    def select(self, position: int) -> None:
        """Select the token at ``position`` (0 is BOS), exactly as clicking it would."""
        n = len(self.data["tokens"]) if self.data else 0
        if not 0 <= position < n:
            raise IndexError(f"position must lie in [0, {n}) for the current text, got {position}")
        self.view.selected = {"line": 0, "position": int(position)}

    def _on_text(self, change) -> None:
        self._update(change["new"])

    def _update(self, text: str) -> None:
        if text == self._shown:
            return
        self._shown = text
        try:
            data = token_view_data(self.model, text, k=self.k, top_neurons=self.top_neurons)
        except ValueError as error:  # shown in the view: an observer's exception would be lost
            self.data = None
            with self.view.hold_sync():
                self.view.selected = None
                self.view.lines = []
                self.view.title = ""
                self.view.error = str(error)
            return
        self.data = data
        with self.view.hold_sync():
            self.view.selected = None
            self.view.error = ""
            self.view.scale = {"min": 0.0, "max": data["loss_scale"], "label": "loss (nats)", "diverging": False}
            self.view.title = (f"{data['model']}: mean loss {data['mean_loss']:.3f} nats over "
                               f"{len(data['tokens']) - 1} predicted tokens (colour: loss; white = BOS or 0)")
            self.view.lines = [token_view_line(data)]
