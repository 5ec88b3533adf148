"""Circuit viewer: a sparse feature circuit as a layered graph, inline in the notebook.

The layout follows Marks et al. 2024 (Fig. 1, 4): one row per module in forward order
(attn0, mlp0, resid0, attn1, ... bottom to top), one column per position when the circuit
keeps positions (token labels underneath), else nodes side by side by |effect|. A node's
area grows with |effect| and its colour gives the sign (blue raises the metric, vermillion
lowers it; Okabe–Ito); error nodes are squares with a dashed outline; an edge's width grows
with |weight|, coloured by sign. The threshold sliders re-filter the stored effects (no
model run); hovering a feature shows its top activating and promoted tokens (from a
feature index, when given); clicking it opens it in a ``FeatureBrowser`` below.

Everything is drawn by ``circuit.js`` (shipped in the package, no CDN, no server): SVG
elements built from numbers, every string set as textContent. ``circuit_graph`` (pure,
tested) builds what is sent: only the nodes and edges above the thresholds.

DOM classes (stable, for the browser test): ``.wb-circuit`` (root), ``.wb-circuit-node``
(``data-node`` = node id, ``data-kind`` feature|error), ``.wb-circuit-edge``,
``.wb-circuit-tooltip``, ``.wb-circuit-summary``, ``.wb-circuit-node-threshold`` and
``.wb-circuit-edge-threshold`` (sliders), ``.wb-circuit-export`` (Button),
``.wb-circuit-status`` (HTML), ``.wb-circuit-browser`` (where a clicked feature opens).
"""

from __future__ import annotations

import html
import math
import pathlib

import anywidget
import ipywidgets as widgets
import traitlets

from .feature_browser import _token, _visible, vocabulary

MAX_PER_ROW = 12  # nodes drawn per module (per position when kept), largest |effect| first


def _node_id(node) -> str:
    return f"{node.hook}|{'e' if node.feature is None else node.feature}|{'' if node.position is None else node.position}"


def describe_feature(index, f: int, vocab: list[str], n: int = 5) -> list[str]:
    """Hover lines for feature f: the tokens it fires on most, and those it promotes."""
    lines = []
    firing = []
    for context in index.contexts(f):
        if context.kind == "top":
            token = _visible(_token(vocab, context.tokens[context.centre]))
            if token not in firing:
                firing.append(token)
        if len(firing) == n:
            break
    if firing:
        lines.append("fires on: " + "  ".join(firing))
    logits = index.logit_tokens(f)
    if logits is not None:
        lines.append("promotes: " + "  ".join(_visible(_token(vocab, t)) for t, _ in logits["top"][:n]))
    lines.append(f"density {index.density(f):.2%}")
    return lines


def circuit_graph(circuit, node_threshold: float | None = None, edge_threshold: float = 0.0, tokens: list[str] | None = None,
                  indexes: dict | None = None, vocab: list[str] | None = None, max_per_row: int = MAX_PER_ROW) -> dict:
    """What the view draws: rows (modules), columns (positions or ranks), the nodes with
    |effect| > node_threshold (at most ``max_per_row`` per module and position) and the edges
    among them with |weight| > edge_threshold. Effects are read from ``circuit``: nothing is
    recomputed. ``indexes`` ({hook: FeatureIndex}) adds hover lines per feature."""
    threshold = circuit.node_threshold if node_threshold is None else max(float(node_threshold), 0.0)
    rows = [circuit.labels[h] for h in circuit.hooks]
    grouped: dict[tuple, list] = {}
    for node, effect in circuit.nodes(threshold):
        grouped.setdefault((node.hook, node.position), []).append((node, effect))
    nodes, shown = [], set()
    for (hook, position), members in grouped.items():
        members = members[:max_per_row]  # circuit.nodes is sorted by |effect|
        for rank, (node, effect) in enumerate(members):
            item = {"id": _node_id(node), "row": circuit.hooks.index(hook), "module": circuit.labels[hook],
                    "hook": hook, "kind": "error" if node.feature is None else "feature", "feature": node.feature,
                    "position": node.position, "rank": rank, "effect": float(effect),
                    "label": ("ε" if node.feature is None else str(node.feature)), "info": []}
            if node.feature is not None and indexes and hook in indexes and vocab is not None:
                item["info"] = describe_feature(indexes[hook], node.feature, vocab)
            nodes.append(item)
            shown.add(node)
        hidden = len(grouped[(hook, position)]) - len(members)
        if hidden > 0:
            nodes[-1]["more"] = hidden
    edges = [{"source": _node_id(u), "target": _node_id(d), "weight": float(w)}
             for u, d, w in circuit.edges_above(threshold, edge_threshold) if u in shown and d in shown]
    positions = circuit.feature_effects[circuit.hooks[0]].shape[0] if circuit.per_position else 0
    column_centres, width = _place(nodes, circuit.per_position, positions)
    finite = [abs(n["effect"]) for n in nodes if math.isfinite(n["effect"])]
    weights = [abs(e["weight"]) for e in edges]
    return {"rows": rows, "width": width, "column_centres": column_centres, "per_position": circuit.per_position,
            "tokens": list(tokens or []) if circuit.per_position else [], "nodes": nodes, "edges": edges,
            "max_effect": max(finite, default=1.0), "max_weight": max(weights, default=1.0),
            "node_threshold": threshold, "edge_threshold": float(edge_threshold),
            "summary": f"{circuit.task}: {len(nodes)} nodes shown (|effect| > {threshold:.3g}), {len(edges)} edges "
                       f"(|weight| > {edge_threshold:.3g}); metric {circuit.metric_clean:.2f} clean → "
                       f"{circuit.metric_patch:.2f} patch; {circuit.method}, {circuit.n_pairs} pairs"}


def _place(nodes: list[dict], per_position: bool, positions: int) -> tuple[list[float], float]:
    """Give each node x (one unit per node) and y (its row). Per position, a column is as wide
    as its fullest module, so nodes of one cell sit side by side without overlapping (the
    paper's layout); returns the columns' centres and the total width."""
    if not per_position:
        for n in nodes:
            n["x"], n["y"] = n["rank"] + 0.5, float(n["row"])
        return [], float(max([n["rank"] for n in nodes], default=0) + 1)
    widths = [2] * positions  # room for the position's token label
    in_cell: dict[tuple, int] = {}
    for n in nodes:
        widths[n["position"]] = max(widths[n["position"]], n["rank"] + 1)
        in_cell[(n["row"], n["position"])] = in_cell.get((n["row"], n["position"]), 0) + 1
    starts = [sum(widths[:p]) for p in range(positions)]
    for n in nodes:
        count = in_cell[(n["row"], n["position"])]
        n["x"] = starts[n["position"]] + (widths[n["position"]] - count) / 2 + n["rank"] + 0.5
        n["y"] = float(n["row"])
    return [starts[p] + widths[p] / 2 for p in range(positions)], float(sum(widths))


BLUE, VERMILLION, GREY = "#0072B2", "#D55E00", "#7f7f7f"  # Okabe–Ito


def plot_circuit(graph: dict, width: str | float = "double"):
    """The graph as a paper figure (the view's layout), for ``save_figure`` (PDF/SVG/PNG)."""
    from matplotlib.patches import Circle, Rectangle

    from ..figures import paper_figure

    rows, units = len(graph["rows"]), max(graph["width"], 1.0)
    fig, ax = paper_figure(width, aspect=min(1.4, max(0.35, (rows + 1) / (units + 2))))
    centres = {n["id"]: (n["x"], n["y"]) for n in graph["nodes"]}
    for e in graph["edges"]:
        (x0, y0), (x1, y1) = centres[e["source"]], centres[e["target"]]
        ax.plot([x0, x1], [y0, y1], color=BLUE if e["weight"] > 0 else VERMILLION, alpha=0.5, zorder=1,
                linewidth=0.3 + 2.2 * abs(e["weight"]) / graph["max_weight"])
    for n in graph["nodes"]:
        x, y = centres[n["id"]]
        share = abs(n["effect"]) / graph["max_effect"]
        r = 0.12 + 0.3 * math.sqrt(share)  # < 0.5: neighbours one unit apart never overlap
        colour = BLUE if n["effect"] > 0 else VERMILLION
        if n["kind"] == "error":
            patch = Rectangle((x - r, y - r), 2 * r, 2 * r, facecolor=colour, alpha=0.25 + 0.75 * share,
                              edgecolor=GREY, linestyle="--", linewidth=0.6, zorder=2)
        else:
            patch = Circle((x, y), r, facecolor=colour, alpha=0.25 + 0.75 * share, edgecolor="black", linewidth=0.3,
                           zorder=2)
        ax.add_patch(patch)
        ax.text(x, y, n["label"], ha="center", va="center", fontsize=4.5, zorder=3)
    ax.set_xlim(-0.2, units + 0.2)
    ax.set_ylim(-0.7, rows - 0.3)
    ax.set_yticks(range(rows), graph["rows"])
    if graph["per_position"] and graph["tokens"]:
        ax.set_xticks(graph["column_centres"], [_visible(t) for t in graph["tokens"]], rotation=30, ha="right")
    else:
        ax.set_xticks([])
        ax.set_xlabel("nodes by |effect| (largest left)")
    ax.set_aspect("equal", adjustable="box")
    ax.spines[["top", "right", "bottom"]].set_visible(False)
    ax.set_title(graph["summary"].split(";")[0], fontsize=7)
    return fig


class CircuitGraph(anywidget.AnyWidget):
    """The drawing (circuit.js); ``graph`` is ``circuit_graph``'s dict."""

    _esm = pathlib.Path(__file__).with_name("circuit.js")
    _css = pathlib.Path(__file__).with_name("circuit.css")
    graph = traitlets.Dict({}).tag(sync=True)


class CircuitViewer(widgets.VBox):
    """A circuit (``workbench.circuits.find_circuit``) as an interactive graph.

    ``indexes`` ({hook: FeatureIndex}) gives hover text and makes feature nodes open in a
    ``FeatureBrowser``; ``model`` decodes tokens; ``tokens`` labels the positions of a
    per-position circuit (e.g. one clean prompt's tokens). ``set_thresholds`` does what the
    sliders do; ``select(node_id)`` what a click does; ``export()`` saves the paper figure.
    """

    def __init__(self, circuit, indexes: dict | None = None, model=None, sae_for: dict | None = None,
                 tokens: list[str] | None = None, node_threshold: float | None = None, edge_threshold: float = 0.0):
        self.circuit, self.indexes, self.model, self.saes = circuit, indexes or {}, model, sae_for or {}
        self.vocab = vocabulary(getattr(model, "tokenizer", None), model.cfg.d_vocab) if model is not None else None
        self.tokens = tokens
        self.browsers: dict[str, object] = {}
        largest = max((abs(e) for _, e in circuit.nodes(0.0)), default=1.0)
        low = max(circuit.node_threshold, 1e-4)
        start = low if node_threshold is None else max(node_threshold, low)
        self.node_slider = widgets.FloatLogSlider(value=start, base=10, min=math.log10(low),
                                                  max=math.log10(max(largest, low * 1.01)), step=0.05,
                                                  description="node |effect| >", readout_format=".3g",
                                                  continuous_update=False, layout=widgets.Layout(width="420px"),
                                                  style={"description_width": "110px"})
        self.node_slider.add_class("wb-circuit-node-threshold")
        weights = [abs(w) for w in circuit.edges.values()]
        top_weight = max(weights, default=1.0)
        self.edge_slider = widgets.FloatLogSlider(value=max(edge_threshold, top_weight * 1e-3), base=10,
                                                  min=math.log10(max(top_weight * 1e-3, 1e-8)),
                                                  max=math.log10(max(top_weight, 1e-8)), step=0.05,
                                                  description="edge |weight| >", readout_format=".3g",
                                                  continuous_update=False, layout=widgets.Layout(width="420px"),
                                                  style={"description_width": "110px"})
        self.edge_slider.add_class("wb-circuit-edge-threshold")
        self.view = CircuitGraph()
        self.export_button = widgets.Button(description="export figure", layout=widgets.Layout(width="auto"))
        self.export_button.add_class("wb-circuit-export")
        self.status = widgets.HTML()
        self.status.add_class("wb-circuit-status")
        self.browser_box = widgets.VBox()
        self.browser_box.add_class("wb-circuit-browser")
        super().__init__([widgets.HBox([self.node_slider, self.edge_slider]),
                          widgets.HBox([self.export_button, self.status]), self.view, self.browser_box])
        self.node_slider.observe(lambda _: self._draw(), names="value")
        self.edge_slider.observe(lambda _: self._draw(), names="value")
        self.view.on_msg(self._on_msg)
        self.export_button.on_click(lambda _: self.export())
        self._draw()

    @property
    def graph(self) -> dict:
        return self.view.graph

    def set_thresholds(self, node: float | None = None, edge: float | None = None) -> None:
        if node is not None:
            self.node_slider.value = node
        if edge is not None:
            self.edge_slider.value = edge

    def select(self, node_id: str):
        """Open a feature node in the FeatureBrowser of its module (needs ``indexes``);
        returns the browser, or None for an error node or a module without an index."""
        hook, feature, _ = node_id.split("|")
        if feature == "e":
            self.status.value = f"<span>{html.escape(hook)}: the SAE's error node (what the features miss)</span>"
            return None
        if hook not in self.indexes:
            self.status.value = f"<span>no feature index for {html.escape(hook)}: pass indexes={{hook: index}}</span>"
            return None
        from .feature_browser import FeatureBrowser

        if hook not in self.browsers:
            self.browsers[hook] = FeatureBrowser(self.indexes[hook], self.model, self.saes.get(hook), feature=int(feature))
        browser = self.browsers[hook]
        browser.select(int(feature))
        self.browser_box.children = [widgets.HTML(f"<b>{html.escape(self.circuit.labels[hook])}</b> "
                                                  f"({html.escape(hook)}), feature {int(feature)}"), browser]
        self.status.value = f"<span>opened {html.escape(self.circuit.labels[hook])}/{int(feature)} below</span>"
        return browser

    def export(self, name: str | None = None):
        """Save the graph as shown (thresholds applied) as a paper figure under figures/."""
        import matplotlib.pyplot as plt

        from ..figures import save_figure

        fig = plot_circuit(self.view.graph)
        saved = save_figure(fig, name or f"circuit_{self.circuit.task}")
        plt.close(fig)
        self.status.value = f"<span>saved {html.escape(', '.join(p.name for p in saved))}</span>"
        return saved

    def _draw(self) -> None:
        self.view.graph = circuit_graph(self.circuit, self.node_slider.value, self.edge_slider.value, self.tokens,
                                        self.indexes, self.vocab)

    def _on_msg(self, widget, content, buffers) -> None:
        if isinstance(content, dict) and isinstance(content.get("select"), str):
            self.select(content["select"])
