"""Feature browser: one SAE feature's dashboard, live in the notebook, from a feature index.

What a feature dashboard shows (SAE-Vis, Neuronpedia; DESIGN.md "Feature dashboards"):
density and the histogram of nonzero activations; the top activating contexts and samples
from activation-quantile bins, tokens shaded by the feature's activation; the tokens its
decoder direction promotes and suppresses (W_dec[f]·W_U); its nearest features by decoder
cosine and its most correlated and co-occurring features. Plus: finding a feature by id,
by a token or substring of its top contexts, or by what fires on text the user types; and
steering with it (``workbench.steering``).

The kernel keeps the index (memory-mapped) and sends one feature at a time: the notebook
never holds the index, and a switch reads a few kB (DESIGN.md "Widgets"). Pure data
functions (``feature_data``, ``search_features``, ``prompt_features``, ``feature_html``)
are tested on their own; ``FeatureBrowser`` only lays them out. Token and user text reach
the DOM as textContent (the shared ``tokens.js`` view) or through ``html.escape`` (the
ipywidgets HTML panels, whose strings are built here from escaped parts and numbers).

DOM classes (stable, for the browser test):
- ``.wb-feature`` (BoundedIntText: type an id, Enter), ``.wb-search`` (Text: a token or
  substring, Enter; results are buttons ``.wb-search-result``), ``.wb-prompt-input``
  (Textarea: text for "what fires here");
- ``.wb-feature-header``, ``.wb-feature-stats``, ``.wb-feature-logits``: HTML panels;
- ``.wb-feature-contexts``: the contexts view (``.wb-context`` lines, ``.wb-marked`` tokens);
- ``.wb-related-button``: neighbour / correlated / co-occurring features (click: go to it);
- ``.wb-prompt-features``: the prompt view (click a token: its top features, each a link);
- ``.wb-steer`` (Button), ``.wb-steer-alpha`` (FloatText), ``.wb-steering`` (HTML result);
- ``.wb-export`` (Button), ``.wb-export-status`` (HTML).
"""

from __future__ import annotations

import html
import pathlib
import time

import anywidget
import ipywidgets as widgets
import numpy as np
import torch
import traitlets

from .token_view import TokenSequences, _check_text, finite

DEFAULT_PROMPT = 'def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n'
WHITESPACE = {" ": "\u00b7", "\n": "\u23ce", "\t": "\u2192", "\r": "\u240d"}


def vocabulary(tokenizer, d_vocab: int) -> list[str]:
    """Every token id's string (decoded once per browser; ``[id]`` without a tokenizer)."""
    from .activation_viewer import _decode

    return _decode(tokenizer, list(range(d_vocab)))


def _visible(text: str) -> str:
    return "".join(WHITESPACE.get(ch, ch) for ch in text) or "\u2205"


def _token(vocab: list[str], i: int) -> str:
    return vocab[i] if 0 <= i < len(vocab) else f"[{i}]"


def feature_data(index, f: int, vocab: list[str]) -> dict:
    """Everything the dashboard shows for feature ``f``, JSON-serialisable; reads only f's bytes."""
    stats = index.stats(f)
    counts, edges = index.histogram(f)
    contexts = [{"kind": c.kind, "row": c.row, "activation": c.activation, "centre": c.centre,
                 "tokens": [_token(vocab, t) for t in c.tokens], "acts": [finite(a) for a in c.acts]}
                for c in index.contexts(f)]
    logits = index.logit_tokens(f)
    if logits is not None:
        logits = {"top": [[_token(vocab, t), v] for t, v in logits["top"]],
                  "bottom": [[_token(vocab, t), v] for t, v in logits["bottom"]],
                  "histogram": logits["histogram"].tolist(), "edges": [float(logits["edges"][0]), float(logits["edges"][-1])]}
    return {"feature": int(f), "d_sae": index.d_sae, "hook": index.meta["hook"], "n_rows": index.n_rows, "stats": stats,
            "histogram": {"counts": counts.tolist(), "max": float(edges[-1])}, "contexts": contexts, "logits": logits,
            "neighbours": index.neighbours(f), "correlated": index.correlated(f), "cooccurring": index.cooccurring(f),
            "heads": index.head_shares(f)}


def search_features(index, query: str, vocab: list[str], limit: int = 20) -> list[tuple[int, int]]:
    """Features whose top contexts' activating token contains ``query`` (case-insensitive), as
    (feature, how many of its top contexts match), most matches first (then by id)."""
    query = query.strip().lower()
    if not query:
        return []
    wanted = np.array([i for i, s in enumerate(vocab) if query in s.lower()], dtype=np.int64)
    if wanted.size == 0:
        return []
    top_n = index.meta["top_n"]
    centre = index.meta["window"][0]
    # The activating token of each top context: one column of the token windows.
    tokens = np.asarray(index._tables["context_tokens"][:, :top_n, centre])
    hits = np.isin(tokens, wanted).sum(1)
    order = np.lexsort((np.arange(hits.size), -hits))
    return [(int(f), int(hits[f])) for f in order[:limit] if hits[f] > 0]


@torch.no_grad()
def prompt_features(model, sae, text: str, n: int = 5, vocab: list[str] | None = None) -> dict:
    """What fires where on ``text``: per token (BOS first), its string and the SAE's ``n``
    most active features there, (feature, activation); and the dense activations [tokens,
    d_sae] of the features that appear, for colouring by one feature."""
    from ..evals import check_hook, evaluating

    hook = check_hook(model, sae.cfg.hook_name)
    ids = _check_text(model, text)
    captured = {}
    model.run_with_hooks(ids, return_type=None, fwd_hooks=[(hook, lambda act, hook: captured.__setitem__("x", act))],
                         stop_at_layer=int(hook.split(".")[1]) + 1 if hook.startswith("blocks.") else None)
    x = captured["x"][0].reshape(ids.shape[1], -1).float()
    with evaluating(sae):
        code = sae.encode_sparse(x.to(sae.W_dec.device))
    values, order = code.values.sort(dim=1, descending=True)
    indices = code.indices.gather(1, order)
    token_ids = ids[0].tolist()
    tokens = [_token(vocab, t) for t in token_ids] if vocab is not None else model.to_str_tokens(ids[0])
    per_token = [[(int(i), float(v)) for i, v in zip(idx[:n], val[:n]) if v > 0] for idx, val in zip(indices.tolist(), values.tolist())]
    return {"text": text, "hook": hook, "tokens": tokens, "ids": token_ids, "features": per_token,
            "code": (code.values.cpu(), code.indices.cpu())}


@torch.no_grad()
def prompt_sources(model, sae, prompt: dict, f: int) -> dict | None:
    """For an attention-output SAE: where feature f reads from at its strongest token of the
    prompt, as a line of tokens valued by their direct feature attribution (summed over heads;
    each token's info lists the heads). None for other SAEs, or when f does not fire there."""
    from ..features.attention import attention_layer, direct_feature_attribution

    acts = activation_of(prompt, f)
    if attention_layer(sae) is None or max(acts, default=0.0) <= 0:
        return None
    query = int(np.argmax(acts))
    dfa = direct_feature_attribution(model, sae, torch.tensor(prompt["ids"]), f, query)
    tokens = []
    for s, text in enumerate(prompt["tokens"]):
        heads = dfa.by_head_and_source[:, s].tolist() if s <= query else []
        tokens.append({"text": text, "value": finite(float(sum(heads))) if heads else 0.0,
                       "info": [{"title": f"DFA to feature {f} at token {query}, by head",
                                 "rows": [{"label": f"head {h}", "value": finite(v)} for h, v in enumerate(heads)]}]})
    return {"query": query, "pre_activation": dfa.pre_activation, "bias": dfa.bias, "by_head": dfa.by_head.tolist(),
            "tokens": tokens}


def activation_of(prompt: dict, f: int) -> list[float]:
    """Feature f's activation at every token of a ``prompt_features`` result."""
    values, indices = prompt["code"]
    return ((indices == f) * values).sum(1).tolist()


# --- HTML panels (every string escaped; numbers formatted here) -----------------------------
def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _bars(counts: list[int], width: int = 260, height: int = 60, colour: str = "#0072B2") -> str:
    """A histogram as inline blocks: numbers only, no script, no external resource."""
    peak = max(max(counts, default=0), 1)
    bar = max(1, width // max(len(counts), 1))
    cells = "".join(f'<span style="display:inline-block;vertical-align:bottom;width:{bar}px;height:{round(height * c / peak)}px;'
                    f'background:{colour}" title="{int(c)}"></span>' for c in counts)
    return f'<div style="height:{height}px;line-height:0;border-bottom:1px solid #999">{cells}</div>'


def header_html(data: dict) -> str:
    s = data["stats"]
    fires = f"fires on {s['density']:.3%} of {data['n_rows']:,} rows" if s["count"] else "never fires on the indexed rows"
    return (f'<div class="wb-feature-title"><b>feature {data["feature"]}</b> of {data["d_sae"]:,} · {_e(data["hook"])} · '
            f"{fires}</div>")


def stats_html(data: dict) -> str:
    s, h = data["stats"], data["histogram"]
    quantiles = " · ".join(f"{_e(k)} {v:.3g}" for k, v in s.items() if k.startswith("q"))
    return (f'<div class="wb-panel-title">activations (nonzero)</div>'
            f'<div>max {s["max"]:.3g} · mean {s["mean"]:.3g} · {int(s["count"]):,} rows</div>'
            f'<div style="font-size:11px">{quantiles}</div>{_bars(h["counts"])}'
            f'<div style="font-size:11px;display:flex;justify-content:space-between"><span>0</span><span>{h["max"]:.3g}</span></div>'
            + heads_html(data))


def heads_html(data: dict) -> str:
    """An attention-output SAE's feature: its share of decoder norm per head, one bar each."""
    shares = data.get("heads")
    if not shares:
        return ""
    top = int(np.argmax(shares))
    bars = "".join(f'<div title="head {h}: {v:.1%}" style="display:flex;align-items:center;gap:4px;font-size:11px">'
                   f'<span style="width:44px">head {h}</span><span style="display:inline-block;height:8px;'
                   f'width:{200 * v:.0f}px;background:{"#0072B2" if h == top else "#999"}"></span>{v:.0%}</div>'
                   for h, v in enumerate(shares))
    return (f'<div class="wb-panel-title wb-heads">heads writing it (share of decoder norm)</div>{bars}')


def logits_html(data: dict) -> str:
    logits = data["logits"]
    if logits is None:
        return '<div class="wb-panel-title">logit effects</div><div>(index built without the model)</div>'

    def table(rows, sign):
        # A token of many spaces or newlines would widen the table over the next panel: cut it.
        return "<table>" + "".join(f'<tr><td style="font-family:monospace;white-space:pre"><span style="display:inline-block;'
                                   f'max-width:96px;overflow:hidden;text-overflow:ellipsis;vertical-align:bottom" '
                                   f'title="{_e(_visible(t))}">{_e(_visible(t))}</span></td>'
                                   f'<td style="text-align:right;color:{sign}">{v:+.3f}</td></tr>' for t, v in rows) + "</table>"

    lo, hi = logits["edges"]
    through = "·W_O" if data.get("heads") else ""  # an attention SAE's decoder row is mapped through W_O first
    return (f'<div class="wb-panel-title">logit effects W_dec[f]{through}·W_U</div>{_bars(logits["histogram"], colour="#999")}'
            f'<div style="font-size:11px;display:flex;justify-content:space-between"><span>{lo:+.2f}</span><span>{hi:+.2f}</span></div>'
            f'<div style="display:flex;gap:16px"><div><div>promotes</div>{table(logits["top"], "#0072B2")}</div>'
            f'<div><div>suppresses</div>{table(logits["bottom"], "#D55E00")}</div></div>')


def contexts_html(data: dict) -> str:
    """The contexts as escaped text (what ``FeatureBrowser.html`` reports; the view draws them)."""
    lines = []
    for c in data["contexts"]:
        tokens = "".join(f'<span data-act="{a or 0:.3g}"{" class=marked" if i == c["centre"] else ""}>{_e(t)}</span>'
                         for i, (t, a) in enumerate(zip(c["tokens"], c["acts"])))
        lines.append(f'<div class="context" data-kind="{_e(c["kind"])}">{_e(c["kind"])} row {c["row"]} · '
                     f'{c["activation"]:.3g}: {tokens}</div>')
    return "".join(lines)


def feature_html(data: dict) -> str:
    """The whole dashboard of one feature as static, escaped HTML."""
    related = "".join(f"<div>{_e(title)}: " + ", ".join(f"{j} ({v:.2f})" for j, v in data[key]) + "</div>"
                      for key, title in RELATED)
    return header_html(data) + stats_html(data) + logits_html(data) + contexts_html(data) + related


RELATED_SHOWN = 6  # buttons per kind of related feature
RELATED = (("neighbours", "nearest by decoder cosine"), ("correlated", "most correlated (Pearson)"),
           ("cooccurring", "most co-occurring (Jaccard)"))


def _context_lines(data: dict) -> list[dict]:
    lines = []
    for c in data["contexts"]:
        label = f"#{len(lines) + 1} {c['activation']:.3g}" if c["kind"] == "top" else f"{c['kind']}: {c['activation']:.3g}"
        lines.append({"label": label, "marked": c["centre"],
                      "tokens": [{"text": t, "value": a} for t, a in zip(c["tokens"], c["acts"])]})
    return lines


def plot_feature(data: dict, width: str | float = "double"):
    """Paper figure of the visible panels: activation histogram, logit-effect histogram, and
    the top promoted and suppressed tokens."""
    from ..figures import paper_figure, paper_style

    panels = 3 if data["logits"] is not None else 1
    fig, axes = paper_figure(width, aspect=0.3, ncols=panels, squeeze=False)
    axes = axes[0]
    with paper_style():
        counts = data["histogram"]["counts"]
        edges = np.linspace(0, data["histogram"]["max"], len(counts) + 1)
        axes[0].bar(edges[:-1], counts, width=np.diff(edges), align="edge")
        axes[0].set(xlabel="activation (nonzero)", ylabel="rows",
                    title=f"feature {data['feature']}: density {data['stats']['density']:.2%}")
        if panels == 3:
            lo, hi = data["logits"]["edges"]
            hist = data["logits"]["histogram"]
            axes[1].bar(np.linspace(lo, hi, len(hist) + 1)[:-1], hist, width=(hi - lo) / len(hist), align="edge", color="0.5")
            axes[1].set(xlabel="W_dec[f]·W_O·W_U" if data.get("heads") else "W_dec[f]·W_U", ylabel="tokens", title="logit effects")
            rows = data["logits"]["top"][:5] + data["logits"]["bottom"][:5][::-1]
            labels = [_visible(t).replace("$", r"\$") for t, _ in rows]  # no mathtext from token text
            axes[2].barh(range(len(rows)), [v for _, v in rows], color=["#0072B2"] * 5 + ["#D55E00"] * 5)
            axes[2].set_yticks(range(len(rows)), labels, fontfamily="monospace")
            axes[2].invert_yaxis()
            axes[2].set(xlabel="logit effect", title="promoted / suppressed")
        fig.tight_layout()
    return fig


class RelatedFeatures(anywidget.AnyWidget):
    """The related-feature lists of the shown feature (ES module ``related.js``): buttons
    ``.wb-related-button``; a click sends {select_neuron: f}, handled like a prompt-view link."""

    _esm = pathlib.Path(__file__).with_name("related.js")
    _css = pathlib.Path(__file__).with_name("tokens.css")
    groups = traitlets.List([]).tag(sync=True)
    """[{title, items: [[feature, value]]}]"""


class FeatureBrowser(widgets.VBox):
    """The feature dashboard over ``index`` (``workbench.features.FeatureIndex``).

    ``model`` decodes tokens (and, with ``sae``, powers "what fires here" and steering).
    ``select(f)`` does what typing f or clicking a related feature does; ``search(text)``
    what the search box does; ``set_prompt(text)`` what typing a prompt does; ``html()`` is
    the dashboard currently shown, as escaped HTML; ``data`` the current ``feature_data``.
    """

    def __init__(self, index, model=None, sae=None, feature: int | None = None, prompt: str = DEFAULT_PROMPT):
        self.index, self.model, self.sae = index, model, sae
        d_vocab = model.cfg.d_vocab if model is not None else 1 + max(
            int(np.asarray(index._tables["context_tokens"]).max()), 0)
        self.vocab = vocabulary(getattr(model, "tokenizer", None), d_vocab)
        self.data: dict | None = None
        self.prompt: dict | None = None
        self.latencies: list[float] = []  # seconds per feature switch, data path (read + build the panels)
        first = feature if feature is not None else int(np.argmax(np.asarray(index._tables["stats"][:, 0])))
        self.feature_input = widgets.BoundedIntText(value=first, min=0, max=index.d_sae - 1, description="feature")
        self.feature_input.add_class("wb-feature")
        self.search_box = widgets.Text(placeholder="token or substring of top contexts", description="search",
                                       continuous_update=False)
        self.search_box.add_class("wb-search")
        self.search_results = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.header = widgets.HTML()
        self.header.add_class("wb-feature-header")
        self.stats_panel = widgets.HTML(layout=widgets.Layout(width="300px"))
        self.stats_panel.add_class("wb-feature-stats")
        self.logits_panel = widgets.HTML(layout=widgets.Layout(width="340px"))
        self.logits_panel.add_class("wb-feature-logits")
        self.contexts = TokenSequences(kind="feature_contexts")
        # One view for the three lists: a switch sends one message, not one per button.
        self.related = RelatedFeatures(layout=widgets.Layout(width="360px"))
        self.related.on_msg(self._on_msg)
        self.prompt_input = widgets.Textarea(value=prompt, continuous_update=False, description="what fires here",
                                             layout=widgets.Layout(width="100%", height="6em"))
        self.prompt_input.add_class("wb-prompt-input")
        self.prompt_view = TokenSequences(kind="prompt_features")
        self.alpha = widgets.FloatText(value=0.0, description="steer α", layout=widgets.Layout(width="180px"))
        self.alpha.add_class("wb-steer-alpha")
        self.steer_button = widgets.Button(description="steer", tooltip="add α·W_dec[f] at the SAE's hook")
        self.steer_button.add_class("wb-steer")
        self.steering = widgets.HTML()
        self.steering.add_class("wb-steering")
        self.export_button = widgets.Button(description="export figure", layout=widgets.Layout(width="auto"))
        self.export_button.add_class("wb-export")
        self.export_status = widgets.HTML()
        self.export_status.add_class("wb-export-status")
        prompt_box = [self.prompt_input, self.prompt_view,
                      widgets.HBox([self.alpha, self.steer_button]), self.steering] if sae is not None and model is not None \
            else [widgets.HTML("<i>pass model= and sae= to see what fires on your text and to steer</i>")]
        super().__init__([
            widgets.HBox([self.feature_input, self.search_box, self.export_button, self.export_status]),
            self.search_results, self.header,
            widgets.HBox([self.stats_panel, self.logits_panel, self.related]),
            self.contexts, *prompt_box])
        self.feature_input.observe(lambda change: self._show(change["new"]), names="value")
        self.search_box.observe(lambda change: self.search(change["new"]), names="value")
        self.prompt_input.observe(lambda change: self.set_prompt(change["new"]), names="value")
        self.prompt_view.on_msg(self._on_msg)
        self.steer_button.on_click(lambda _: self.steer())
        self.export_button.on_click(lambda _: self.export())
        self._show(first)
        if sae is not None and model is not None:
            self.set_prompt(prompt)

    # --- actions (what the controls do) ---------------------------------------------------
    def select(self, f: int) -> None:
        """Show feature ``f``, exactly as typing it or clicking a related feature does."""
        f = int(f)
        if not 0 <= f < self.index.d_sae:
            raise IndexError(f"feature must lie in [0, {self.index.d_sae}), got {f}")
        self.feature_input.value = f  # the observer shows it
        self._show(f)

    def search(self, text: str) -> list[tuple[int, int]]:
        """Find features by a token or substring of their top contexts' activating tokens;
        the results become buttons, and the best match is shown."""
        found = search_features(self.index, text, self.vocab)
        buttons = []
        for f, hits in found:
            button = widgets.Button(description=f"{f} ({hits})", tooltip=f"feature {f}: {hits} top contexts match",
                                    layout=widgets.Layout(width="auto"))
            button.add_class("wb-search-result")
            button.on_click(lambda _, f=f: self.select(f))
            buttons.append(button)
        self.search_results.children = buttons or ([widgets.HTML(f"no feature's top contexts fire on "
                                                                  f"{_e(text)!s}")] if text.strip() else [])
        if found:
            self.select(found[0][0])
        return found

    def set_prompt(self, text: str) -> None:
        """Show what fires on ``text``, exactly as typing it into the prompt box does."""
        if self.sae is None or self.model is None:
            raise ValueError("the prompt view needs FeatureBrowser(index, model, sae=...)")
        if self.prompt_input.value != text:
            self.prompt_input.value = text  # the observer calls back here
            return
        try:
            self.prompt = prompt_features(self.model, self.sae, text, vocab=self.vocab)
        except ValueError as error:
            self.prompt = None
            with self.prompt_view.hold_sync():
                self.prompt_view.lines, self.prompt_view.title, self.prompt_view.error = [], "", str(error)
            return
        self._draw_prompt()

    def steer(self, alpha: float | None = None, max_new_tokens: int = 20):
        """Steer the prompt with the current feature (α from the box unless given)."""
        from ..steering import steer

        alpha = float(self.alpha.value if alpha is None else alpha)
        result = steer(self.model, self.sae, self.data["feature"], self.prompt_input.value, alpha=alpha,
                       max_new_tokens=max_new_tokens)
        rows = "".join(f"<tr><td style='font-family:monospace;white-space:pre'>{_e(_visible(a))}</td><td>{pa:.3f}</td>"
                       f"<td style='font-family:monospace;white-space:pre'>{_e(_visible(b))}</td><td>{pb:.3f}</td></tr>"
                       for (a, pa), (b, pb) in zip(result.baseline_next[:5], result.steered_next[:5]))
        self.steering.value = (f"<div><b>{_e(result.intervention)}</b> · KL(next token) {result.kl:.3f} nats</div>"
                               f"<div>without: <code style='white-space:pre-wrap'>{_e(result.baseline)}</code></div>"
                               f"<div>with: <code style='white-space:pre-wrap'>{_e(result.steered)}</code></div>"
                               f"<table><tr><th>next, without</th><th>p</th><th>with</th><th>p</th></tr>{rows}</table>")
        return result

    def export(self, name: str | None = None):
        """Save the visible panels as a paper figure (PDF, SVG, PNG) under figures/."""
        import matplotlib.pyplot as plt

        from ..figures import save_figure

        fig = plot_feature(self.data)
        saved = save_figure(fig, name or f"feature_{self.data['feature']}")
        plt.close(fig)
        self.export_status.value = f"{_e(repr(saved))}"
        return saved

    def html(self) -> str:
        """The dashboard currently shown, as static escaped HTML."""
        return feature_html(self.data) if self.data is not None else ""

    # --- drawing ---------------------------------------------------------------------
    def _show(self, f: int) -> None:
        f = int(f)
        if self.data is not None and self.data["feature"] == f:
            return
        started = time.perf_counter()
        data = feature_data(self.index, f, self.vocab)
        header, stats, logits = header_html(data), stats_html(data), logits_html(data)
        lines = _context_lines(data)
        self.latencies.append(time.perf_counter() - started)
        self.data = data
        peak = data["stats"]["max"] or 1.0
        self.stats_panel.value, self.logits_panel.value = stats, logits
        with self.contexts.hold_sync():
            self.contexts.scale = {"min": -peak, "max": peak, "label": f"feature {f}", "diverging": True}
            self.contexts.title = (f"top {sum(c['kind'] == 'top' for c in data['contexts'])} contexts, then samples "
                                   "from activation-quantile bins (bold: the activating token)")
            self.contexts.lines = lines
        self.related.groups = [{"title": title, "items": [[int(j), finite(v)] for j, v in list(data[key])[:RELATED_SHOWN]]}
                               for key, title in RELATED]
        self.alpha.value = round(2 * data["stats"]["max"], 2)  # twice its strongest firing: a visible push
        if self.prompt is not None:
            self._draw_prompt()
        # Last, so that a header naming feature f means every panel above already shows f.
        self.header.value = header

    def _draw_prompt(self) -> None:
        f = self.data["feature"]
        acts = activation_of(self.prompt, f)
        tokens = []
        for text, value, feats in zip(self.prompt["tokens"], acts, self.prompt["features"]):
            info = [{"title": "top features here (click: show it)",
                     "rows": [{"label": f"feature {j}", "value": v, "neuron": j} for j, v in feats]}]
            tokens.append({"text": text, "value": finite(value), "info": info})
        peak = max((abs(a) for a in acts), default=0.0) or self.data["stats"]["max"] or 1.0
        lines = [{"label": "", "marked": None, "tokens": tokens}]
        title = (f"feature {f} on your text (max {max(acts, default=0):.3g}); hover or click a token for the features "
                 "that fire there")
        sources = prompt_sources(self.model, self.sae, self.prompt, f)
        if sources is not None:  # an attention-output SAE: where the feature reads from (Kissane et al. 2024)
            lines.append({"label": "reads from", "marked": sources["query"], "tokens": sources["tokens"]})
            title += (f"; second line: each source token's direct feature attribution to it at token "
                      f"{sources['query']} (bold), summed over heads (hover for each head)")
        with self.prompt_view.hold_sync():
            self.prompt_view.error = ""
            self.prompt_view.scale = {"min": -peak, "max": peak, "label": f"feature {f}", "diverging": True}
            self.prompt_view.title = title
            self.prompt_view.lines = lines

    def _on_msg(self, widget, content, buffers) -> None:
        if isinstance(content, dict) and "select_neuron" in content:
            self.select(int(content["select_neuron"]))
