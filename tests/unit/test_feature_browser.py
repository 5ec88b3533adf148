"""The feature browser's data functions and widget, in Python (the browser test drives the view):
one feature's data is the index's, search finds exactly the features whose activating tokens
match, a click on a related feature goes to it, hostile token text is escaped, export writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.cache import ActivationCache, cache_activations
from workbench.features import build_index
from workbench.sae import create
from workbench.widgets import FeatureBrowser, feature_data, search_features
from workbench.widgets.feature_browser import vocabulary

HOOK = "blocks.0.hook_resid_post"
HOSTILE = "<img src=x onerror=alert(1)>"


class HostileTokenizer:
    """Token 3 decodes to markup; the others to 't<id>'."""

    def decode(self, ids):
        return "".join(HOSTILE if i == 3 else f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("cache")
    cache_activations(model, tiny_tokens(), [HOOK], folder, dtype="float32", batch_size=8, progress=False)
    torch.manual_seed(0)
    sae = create("topk", d_in=32, d_sae=48, k=4, hook_name=HOOK)
    return build_index(sae, ActivationCache.open(folder), out_dir=tmp_path_factory.mktemp("index"), top_n=5, model=model,
                       window=(3, 2), n_bins=4, samples_per_bin=2, batch_size=100, progress=False)


@pytest.fixture()
def browser(index):
    model = tiny_model()
    model.tokenizer = HostileTokenizer()
    return FeatureBrowser(index, model)


def test_feature_data_is_the_index_feature_and_json(index):
    vocab = vocabulary(HostileTokenizer(), 64)
    data = feature_data(index, 5, vocab)
    json.dumps(data)  # what the widget sends must be JSON
    assert [c["row"] for c in data["contexts"] if c["kind"] == "top"] == [r for r, _, _ in index.top_contexts(5)]
    assert data["contexts"][0]["tokens"] == [vocab[t] for t in index.top_contexts(5)[0][2]]
    assert data["stats"]["density"] == index.density(5)
    assert data["neighbours"] == index.neighbours(5)


def test_search_returns_the_features_whose_activating_tokens_match(index):
    vocab = vocabulary(HostileTokenizer(), 64)
    found = search_features(index, "t1", vocab)  # t1, t10..t19
    matching = {i for i, s in enumerate(vocab) if "t1" in s}
    expected = {}
    for f in range(index.d_sae):
        hits = sum(ids[c.centre] in matching for c in index.contexts(f) if c.kind == "top" for ids in [c.tokens])
        if hits:
            expected[f] = hits
    assert dict(found) == dict(sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:20]) and found
    assert [h for _, h in found] == sorted((h for _, h in found), reverse=True)
    assert search_features(index, "   ", vocab) == [] and search_features(index, "zzz", vocab) == []


def test_select_and_clicking_a_related_feature_move_the_dashboard(browser):
    browser.select(7)
    assert browser.data["feature"] == 7 and browser.feature_input.value == 7 and "feature 7" in browser.html()
    neighbour = browser.data["neighbours"][0][0]
    nearest = browser.related.groups[0]
    assert nearest["title"].startswith("nearest") and nearest["items"][0][0] == neighbour
    browser.related._handle_custom_msg({"select_neuron": neighbour}, [])  # what clicking its button sends
    assert browser.data["feature"] == neighbour and browser.feature_input.value == neighbour
    browser.feature_input.value = 9  # typing in the box
    assert browser.data["feature"] == 9
    assert browser.contexts.lines and browser.contexts.lines[0]["marked"] is not None


def test_search_box_shows_result_buttons_and_the_best_match(browser):
    found = browser.search("t2")
    assert found and browser.data["feature"] == found[0][0]
    assert [b.description for b in browser.search_results.children] == [f"{f} ({h})" for f, h in found]


def test_hostile_token_text_is_escaped_in_every_html_panel(browser, index):
    feature = next(f for f in range(index.d_sae)
                   if any(3 in c.tokens for c in index.contexts(f)) or 3 in [t for t, _ in index.logit_tokens(f)["top"]])
    browser.select(feature)
    shown = browser.html() + browser.logits_panel.value + browser.header.value + browser.stats_panel.value
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown
    assert "<img" not in shown
    # The view receives it as data, to be set as textContent.
    assert any(t["text"] == HOSTILE for line in browser.contexts.lines for t in line["tokens"]) or \
        HOSTILE in [t for t, _ in browser.data["logits"]["top"]]


def test_export_writes_the_figure(browser, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path))
    saved = browser.export("feature_panel")
    assert sorted(p.suffix for p in saved) == [".pdf", ".png", ".svg"] and all(p.stat().st_size > 1000 for p in saved)
    assert "saved" in browser.export_status.value


def test_bad_feature_ids_are_refused(browser):
    with pytest.raises(IndexError, match="feature must lie in"):
        browser.select(48)
    with pytest.raises(ValueError, match="needs FeatureBrowser"):
        browser.set_prompt("x")
    assert np.isfinite(browser.latencies).all()
