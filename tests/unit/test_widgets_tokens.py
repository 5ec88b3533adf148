"""Token view and activation viewer: data functions against brute force, widgets' synced state,
and untrusted token text kept as plain strings (the JS sets it with textContent only)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.tiny import HOOKS, tiny_model, tiny_tokens
from workbench.cache import ActivationCache, cache_activations
from workbench.prompts import prompt_report
from workbench.sparsity.mlp import describe_mlps
from workbench.widgets import activation_viewer as av
from workbench.widgets import token_view as tv
from workbench.widgets.activation_viewer import (ActivationViewer, context_activations, row_top_neurons,
                                                 top_activating_rows)
from workbench.widgets.token_view import TokenView, token_view_data

XSS = "<img src=x onerror=alert(1)> and <script>alert(2)</script>"
JS = Path(tv.__file__).with_name("tokens.js")
MLP = "blocks.1.mlp.hook_post"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("widget_cache")  # 768 rows in 12 shards of 64
    cache_activations(tiny_model(), tiny_tokens(), HOOKS, path, batch_size=4, shard_tokens=64, progress=False)
    return ActivationCache.open(path)


def _brute_top(cache, hook, neuron, n):
    column = cache.activations(hook, torch.arange(cache.n_tokens))[:, neuron].double()
    order = sorted(range(cache.n_tokens), key=lambda r: (-float(column[r]), r))[:n]
    return [(r, float(column[r])) for r in order], column


# --- activation viewer: data ---------------------------------------------------------------
@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("n", [1, 10, 1000])
def test_top_rows_equal_brute_force(cache, hook, n):
    for neuron in (0, 5, cache.d(hook) - 1):
        got = top_activating_rows(cache, hook, neuron, n, chunk_rows=100)  # chunks straddle shards
        expected, column = _brute_top(cache, hook, neuron, n)
        assert got == expected
        assert [v for _, v in got] == column.topk(min(n, cache.n_tokens)).values.tolist()


def test_top_rows_refuse_bad_arguments(cache):
    with pytest.raises(IndexError, match="neuron must lie"):
        top_activating_rows(cache, MLP, cache.d(MLP))
    with pytest.raises(KeyError, match="not in this cache"):
        top_activating_rows(cache, "blocks.0.hook_nope", 0)
    assert top_activating_rows(cache, MLP, 3, 5, progress=True) == _brute_top(cache, MLP, 3, 5)[0]


@pytest.mark.parametrize("row", [0, 15, 16, 17, 40, 767])  # first, last and middle of sequences
def test_context_activations_equal_cache_rows(cache, row):
    neuron, seq = 7, row // cache.seq_len
    ctx = context_activations(cache, MLP, neuron, row, before=5, after=3)
    ids, position = cache.context(row, 5, 3)
    assert ctx["ids"] == ids and ctx["position"] == position and ctx["rows"][position] == row
    assert all(cache.position(r)[0] == seq for r in ctx["rows"])  # never crosses its sequence
    assert ctx["ids"] == cache.tokens.view(-1)[ctx["rows"]].tolist()
    assert ctx["values"] == cache.activations(MLP, ctx["rows"])[:, neuron].tolist()
    assert ctx["tokens"] == [f"[{i}]" for i in ids]
    json.dumps(ctx, allow_nan=False)


def test_context_tokens_decoded_with_a_tokenizer(cache):
    from workbench.tokenizer import load_fast_tokenizer

    fast = load_fast_tokenizer()
    ctx = context_activations(cache, MLP, 0, 40, tokenizer=fast)
    assert ctx["tokens"] == [fast.decode([i]) for i in ctx["ids"]]
    assert context_activations(cache, MLP, 0, 40, tokenizer=SimpleNamespace(tokenizer=fast))["tokens"] == ctx["tokens"]


def test_row_top_neurons_equal_sorted_row(cache):
    for hook in HOOKS:
        x = cache.activations(hook, [123])[0]
        got = row_top_neurons(cache, hook, 123, n=6)
        assert [v for _, v in got] == x.topk(6).values.tolist()
        assert all(x[i] == v for i, v in got)


# --- activation viewer: widget -------------------------------------------------------------
def test_activation_viewer_shows_the_top_contexts(cache):
    viewer = ActivationViewer(cache, hook=MLP, neuron=3, n=4)
    assert "wb-hook" in viewer.hook_dropdown._dom_classes and "wb-neuron" in viewer.neuron_input._dom_classes
    assert viewer.view.kind == "activation_viewer"
    top = top_activating_rows(cache, MLP, 3, 4)
    assert viewer.data["top"] == top and len(viewer.view.lines) == 4
    for line, (row, value) in zip(viewer.view.lines, top):
        ctx = context_activations(cache, MLP, 3, row)
        assert [t["value"] for t in line["tokens"]] == ctx["values"]
        assert [t["row"] for t in line["tokens"]] == ctx["rows"]
        assert line["marked"] == ctx["position"] and line["tokens"][line["marked"]]["value"] == value
    peak = max(abs(t["value"]) for line in viewer.view.lines for t in line["tokens"])
    assert viewer.view.scale["max"] == peak and viewer.view.scale["diverging"]
    assert len(json.dumps(viewer.view.get_state(), default=str)) < 100_000  # only what is shown


def test_activation_viewer_select_equals_the_controls(cache, monkeypatch):
    calls = []
    scan = av.top_activating_rows
    monkeypatch.setattr(av, "top_activating_rows", lambda *a, **k: calls.append(a[1:3]) or scan(*a, **k))
    viewer = ActivationViewer(cache, hook=MLP, neuron=3, n=3)
    viewer.select(neuron=5)
    assert viewer.neuron_input.value == 5 and viewer.data["top"] == scan(cache, MLP, 5, 3)
    viewer.neuron_input.value = 7  # what typing into .wb-neuron does
    assert viewer.data["neuron"] == 7 and viewer.data["top"] == scan(cache, MLP, 7, 3)
    viewer.select(hook=HOOKS[0], neuron=31)
    assert viewer.hook_dropdown.value == HOOKS[0] and viewer.neuron_input.max == cache.d(HOOKS[0]) - 1
    assert viewer.data["top"] == scan(cache, HOOKS[0], 31, 3)
    viewer.hook_dropdown.value = HOOKS[2]  # what the .wb-hook dropdown does
    assert viewer.data["hook"] == HOOKS[2] and viewer.neuron_input.max == cache.d(HOOKS[2]) - 1
    viewer.select(hook=MLP, neuron=3)
    assert calls == [(MLP, 3), (MLP, 5), (MLP, 7), (HOOKS[0], 31), (HOOKS[2], 31)]  # (MLP, 3) from the scan cache
    with pytest.raises(IndexError):
        viewer.select(neuron=cache.d(MLP))
    with pytest.raises(KeyError):
        viewer.select(hook="blocks.9.hook_nope")
    assert (viewer.hook_dropdown.value, viewer.neuron_input.value) == (MLP, 3)


def test_activation_viewer_click_shows_the_rows_top_neurons(cache):
    viewer = ActivationViewer(cache, hook=MLP, neuron=3, n=3)
    viewer.view.selected = {"line": 1, "position": 0}  # what a click on a token sends
    row = viewer.view.lines[1]["tokens"][0]["row"]
    detail = viewer.view.detail
    assert (detail["line"], detail["position"]) == (1, 0)
    assert [(r["neuron"], r["value"]) for r in detail["sections"][0]["rows"]] == row_top_neurons(cache, MLP, row, 3)
    viewer._on_msg(viewer.view, {"select_neuron": 2}, [])  # clicking a neuron in the detail panel
    assert viewer.neuron_input.value == 2 and viewer.view.selected is None
    viewer.select_row(100)  # not a top row of neuron 2: pinned above the top contexts
    assert viewer.view.lines[0]["label"].startswith("picked row 100")
    assert viewer.view.selected == {"line": 0, "position": viewer.view.lines[0]["marked"]}
    assert viewer.view.detail["sections"][0]["rows"][0]["neuron"] == row_top_neurons(cache, MLP, 100, 1)[0][0]


def test_activation_viewer_keeps_untrusted_token_text_plain(cache):
    viewer = ActivationViewer(cache, tokenizer=SimpleNamespace(decode=lambda ids: XSS), hook=MLP, n=2)
    assert {t["text"] for line in viewer.view.lines for t in line["tokens"]} == {XSS}


# --- token view ------------------------------------------------------------------------------
def test_token_view_data_equals_prompt_report(default_model):
    text = "def add(a, b):\n    return a + b\n"
    data = token_view_data(default_model, text, k=4, top_neurons=3)
    report = prompt_report(default_model, text, k=4)
    assert [t["token"] for t in data["tokens"]] == report.tokens
    assert data["tokens"][0]["loss"] is None
    assert [t["loss"] for t in data["tokens"][1:]] == pytest.approx(report.losses[1:], abs=1e-5)
    for tok, top in zip(data["tokens"], report.top_predictions):
        assert [s for s, _ in tok["top_predictions"]] == [s for s, _ in top]
        assert [p for _, p in tok["top_predictions"]] == pytest.approx([p for _, p in top], abs=1e-6)
    assert data["mean_loss"] == pytest.approx(report.mean_loss, abs=1e-5)
    assert data["loss_scale"] == pytest.approx(math.log(default_model.cfg.d_vocab))
    json.dumps(data, allow_nan=False)


@pytest.mark.parametrize("name", ["default", "stdlib-swiglu"])  # plain MLP, and gated with a b_in
def test_token_view_top_neurons_equal_run_with_cache(default_model, name):
    import workbench

    model = default_model if name == "default" else workbench.load_model(name, device="cpu")
    text = "import os\nprint(os.getcwd())"
    data = token_view_data(model, text, top_neurons=4)
    _, acts = model.run_with_cache(model.to_tokens(text))
    for site in describe_mlps(model):
        if site.gated:  # x1 = act(gate) ⊙ up, by definition: b_in (added by hook_post) is not in it
            x1 = site.act(acts[site.hook_pre][0]) * acts[site.hook_pre_linear][0]
        else:
            x1 = acts[site.hook_post][0]
        index = x1.abs().topk(4, dim=-1).indices
        for pos, tok in enumerate(data["tokens"]):
            got = tok["top_neurons"][site.layer]
            assert [i for i, _ in got] == index[pos].tolist()
            assert [v for _, v in got] == pytest.approx(x1[pos, index[pos]].tolist(), abs=1e-4)


def test_token_view_data_refuses_what_prompt_report_refuses(default_model):
    with pytest.raises(ValueError) as expected:
        prompt_report(default_model, "")
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        token_view_data(default_model, "")
    with pytest.raises(ValueError, match=f"reads at most {default_model.cfg.n_ctx}"):
        token_view_data(default_model, "x = 1\n" * 200)  # to_tokens would silently truncate it
    with pytest.raises(ValueError, match="no tokenizer"):
        token_view_data(tiny_model(), "a")


def test_token_view_widget(default_model, monkeypatch):
    calls = []
    compute = tv.token_view_data
    monkeypatch.setattr(tv, "token_view_data", lambda *a, **k: calls.append(a[1]) or compute(*a, **k))
    view = TokenView(default_model, text="a = 1\n", k=3)
    assert "wb-prompt" in view.textarea._dom_classes and view.view.kind == "token_view"
    assert [t["text"] for t in view.view.lines[0]["tokens"]] == [t["token"] for t in view.data["tokens"]]
    assert [t["value"] for t in view.view.lines[0]["tokens"]] == [t["loss"] for t in view.data["tokens"]]
    assert view.view.scale["max"] == view.data["loss_scale"]
    view.set_text(XSS)
    assert view.textarea.value == XSS and view.data["text"] == XSS
    texts = [t["text"] for t in view.view.lines[0]["tokens"]]
    assert "".join(texts[1:]) == XSS and any("<" in t for t in texts)  # plain strings, not escaped
    view.set_text(XSS)  # unchanged: not recomputed
    view.textarea.value = "b = 2"  # what typing does
    assert view.data["text"] == "b = 2" and calls == ["a = 1\n", XSS, "b = 2"]
    view.select(2)
    assert view.view.selected == {"line": 0, "position": 2}
    with pytest.raises(IndexError):
        view.select(len(view.data["tokens"]))
    view.set_text("")
    assert "empty" in view.view.error and view.data is None and view.view.lines == [] and view.view.selected is None
    view.set_text("c = 3")
    assert view.view.error == "" and view.data["text"] == "c = 3"
    assert len(json.dumps(view.view.get_state(), default=str)) < 200_000


# --- the shared ES module ------------------------------------------------------------------
def test_js_never_parses_data_as_html_and_loads_nothing():
    source = JS.read_text()
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "http://", "https://"):
        assert forbidden not in source, forbidden
    assert not re.search(r"^\s*import\b|\bimport\(", source, re.M)  # no imports at all, let alone from URLs
    assert "textContent" in source and "export default" in source
    for cls in ("wb-token-view", "wb-activation-viewer", "wb-token", "wb-selected", "wb-token-detail", "wb-context"):
        assert cls in source, cls
    assert JS.with_name("tokens.css").exists()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the ES module syntax check needs it")
def test_js_parses_as_an_es_module(tmp_path):
    module = tmp_path / "tokens.mjs"
    module.write_text(JS.read_text())
    result = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
