"""Notebook widgets: thin views over pure, tested data functions (DESIGN.md, "Widgets").

- ``TokenView`` (token_view.py): text in, tokens coloured by loss; a token's next-token
  guesses and top MLP neurons per layer on hover or click;
- ``ActivationViewer`` (activation_viewer.py): over an activation cache, a neuron's top
  contexts with tokens highlighted by its activation, or a row's top neurons;
- ``SparsityExplorer`` (sparsity_explorer.py): model, method, layer and a target slider over
  a precomputed ``workbench.sparsity.explore.SparsityGrid``; no model run per move;
- ``FeatureBrowser`` (feature_browser.py): one SAE feature's dashboard from a feature index
  (``workbench.features``), found by id, by search or on typed text; steering; export;
- ``CircuitViewer`` (circuit_viewer.py): a sparse feature circuit (``workbench.circuits``) as
  a layered graph with threshold sliders; hover a feature for its tokens, click to browse it;

Token sequences are drawn by one anywidget ES module shipped here (tokens.js), circuits by
another (circuit.js): no CDN, every string set as text, never as HTML.
"""

from .circuit_viewer import CircuitViewer, circuit_graph, plot_circuit
from .feature_browser import FeatureBrowser, feature_data, prompt_features, search_features
from .activation_viewer import ActivationViewer, context_activations, row_top_neurons, top_activating_rows
from .sparsity_explorer import SparsityExplorer
from .token_view import TokenView, token_view_data

__all__ = ["ActivationViewer", "CircuitViewer", "circuit_graph", "plot_circuit", "FeatureBrowser", "feature_data", "prompt_features", "search_features", "SparsityExplorer", "TokenView", "context_activations", "row_top_neurons", "token_view_data",
           "top_activating_rows"]
