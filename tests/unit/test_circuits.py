"""Sparse feature circuits on tiny hand-set models (Marks et al. 2024).

A linear model (no LayerNorm, uniform attention from W_Q = W_K = 0, an MLP whose ReLU never
clips, SAEs whose encoders never clip) makes attribution patching exact, so node and edge
effects must equal exact patching, computed here with plain hooks. A nonlinear model (LN,
GELU, TopK SAEs) checks that integrated gradients converge to the exact effect of patching
a whole module, that the error nodes make the SAE decomposition exact, and that thresholds
and aggregation behave as documented.
"""

import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import workbench as wb
from workbench.circuits import ContrastivePairs, Node, circuit_hooks, circuit_modules, find_circuit, logit_diff, upstream
from workbench.circuits.modules import join, module_states, split
from workbench.circuits.validation import clean_means, faithfulness_curve, patching_check
from workbench.widgets.circuit_viewer import circuit_graph

HOOKS = circuit_hooks(2)
D_MODEL, D_SAE, POS, VOCAB = 6, 4, 5, 7


def _model(linear: bool) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=POS, d_head=3, n_heads=2, d_mlp=8, d_vocab=VOCAB,
                                  act_fn="relu" if linear else "gelu", normalization_type=None if linear else "LN",
                                  seed=0, dtype=torch.float64 if linear else torch.float32)
    model = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5)
        if linear:
            for block in model.blocks:
                block.attn.W_Q.zero_()
                block.attn.W_K.zero_()  # uniform causal attention: attn_out is linear in the residual
                block.mlp.b_in.fill_(100.0)  # the ReLU never clips: the MLP is affine
                block.mlp.b_out.sub_(block.mlp.b_in @ block.mlp.W_out)  # ... and its output stays small
    model.eval()
    return model


def _sae(linear: bool, seed: int, **cfg):
    """Linear: d_sae < d_model, W_dec the pseudo-inverse of W_enc and b_enc large, so f is affine
    in x and ε (the part of x outside the decoder's span) is a nonzero linear function of x."""
    sae = wb.sae.create("topk", d_in=D_MODEL, d_sae=D_SAE if linear else 12, k=D_SAE if linear else 3, **cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=generator))
        if linear:
            sae.W_dec.copy_(torch.linalg.pinv(sae.W_enc))
            sae.b_enc.fill_(50.0)
        else:
            sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=generator) / 3)
            sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=generator) * 0.1)
    # float64 for the linear model: its large biases (ReLU and encoder kept from clipping)
    # would otherwise cost float32 ~1e-4 of cancellation, the size of the tolerances below.
    return (sae.double() if linear else sae).eval()


def _pairs(n: int = 6) -> ContrastivePairs:
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(0, VOCAB, (n, POS), generator=generator)
    patch = clean.clone()
    patch[:, 1] = (clean[:, 1] + 1) % VOCAB
    patch[:, 3] = (clean[:, 3] + 2) % VOCAB
    answers = torch.randperm(VOCAB, generator=generator)[:2]
    return ContrastivePairs(clean, patch, answers[0].repeat(n), answers[1].repeat(n), name="toy")


@pytest.fixture(scope="module")
def linear():
    model, saes, pairs = _model(True), {hook: _sae(True, i) for i, hook in enumerate(HOOKS)}, _pairs()
    with torch.no_grad():  # the premise of exactness: no encoder and no ReLU clips
        for tokens in (pairs.clean, pairs.patch):
            _, cache = model.run_with_cache(tokens)
            for hook in HOOKS:
                assert float(saes[hook].encode(cache[hook].reshape(-1, D_MODEL)).min()) > 0, hook
            for layer in range(2):
                assert float(cache[f"blocks.{layer}.mlp.hook_pre"].min()) > 0
    return model, saes, pairs


def _with_transcoders(linear: bool, saes: dict) -> dict:
    """``saes`` with each MLP output's SAE replaced by a transcoder from the MLP's input (the
    residual stream before the MLP in the linear model, which has no LayerNorm)."""
    out = dict(saes)
    for layer in range(2):
        source = f"blocks.{layer}.hook_resid_mid" if linear else f"blocks.{layer}.ln2.hook_normalized"
        target = f"blocks.{layer}.hook_mlp_out"
        out[target] = _sae(linear, 10 + layer, hook_name=source, target_hook=target)
    return out


@pytest.fixture(scope="module")
def nonlinear():
    return _model(False), {hook: _sae(False, i) for i, hook in enumerate(HOOKS)}, _pairs()


@torch.no_grad()
def _metric(model, tokens, pairs, hooks=()):
    with model.hooks(fwd_hooks=list(hooks)):
        return float(logit_diff(model(tokens), pairs).mean())


@torch.no_grad()
def _states(model, sae, hook, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    x = cache[hook]
    f = sae.encode(x.reshape(-1, D_MODEL)).reshape(*x.shape[:2], -1)
    return x, f, x - (f.reshape(-1, f.shape[-1]) @ sae.W_dec + sae.b_dec).reshape(x.shape)


def _patch_feature(sae, hook, feature, value):
    """A hook that sets one feature of ``hook``'s SAE to ``value`` ([batch, pos]), keeping the rest and ε."""
    def fn(x, hook=None):
        f = sae.encode(x.reshape(-1, D_MODEL)).reshape(*x.shape[:2], -1)
        return x + (value - f[..., feature])[..., None] * sae.W_dec[feature]
    return (hook, fn)


def test_the_error_node_makes_the_decomposition_exact(nonlinear):
    model, saes, pairs = nonlinear
    rewritten = [(hook, lambda x, hook: join(saes[hook.name], *split(saes[hook.name], x), x)) for hook in HOOKS]
    without_error = [(hook, lambda x, hook: join(saes[hook.name], split(saes[hook.name], x)[0], torch.zeros_like(x), x))
                     for hook in HOOKS]
    clean = _metric(model, pairs.clean, pairs)
    assert _metric(model, pairs.clean, pairs, rewritten) == pytest.approx(clean, abs=1e-5)
    assert abs(_metric(model, pairs.clean, pairs, without_error) - clean) > 1e-2  # the SAEs alone are lossy


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_node_effects_equal_exact_patching_on_a_linear_model(linear, method):
    model, saes, pairs = linear
    circuit = find_circuit(model, saes, pairs, method=method, steps=3, edges=False, progress=False)
    clean = _metric(model, pairs.clean, pairs)
    for hook in ("blocks.0.hook_attn_out", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"):
        _, _, _ = _states(model, saes[hook], hook, pairs.clean)
        _, f_patch, e_patch = _states(model, saes[hook], hook, pairs.patch)
        for feature in range(D_SAE):
            exact = _metric(model, pairs.clean, pairs, [_patch_feature(saes[hook], hook, feature, f_patch[..., feature])]) - clean
            assert circuit.node_effect(Node(hook, feature, None)) == pytest.approx(exact, abs=1e-4, rel=1e-4)
        x_c, _, e_c = _states(model, saes[hook], hook, pairs.clean)
        exact = _metric(model, pairs.clean, pairs, [(hook, lambda x, hook: x + (e_patch - e_c))]) - clean
        assert circuit.node_effect(Node(hook, None, None)) == pytest.approx(exact, abs=1e-4, rel=1e-4)


def test_edge_effects_equal_exact_path_patching_on_a_linear_model(linear):
    """Edge u -> d: patch u with the other upstream modules of d held at clean (the direct path),
    read d's new value, then patch d alone to it in the clean run: the change in the metric."""
    model, saes, pairs = linear
    circuit = find_circuit(model, saes, pairs, method="atp", node_threshold=0.0, progress=False)
    clean = _metric(model, pairs.clean, pairs)
    links = upstream(circuit_modules(saes))
    down_hook = "blocks.1.hook_resid_post"
    for up_hook in links[down_hook]:
        _, f_up_patch, _ = _states(model, saes[up_hook], up_hook, pairs.patch)
        held = {hook: _states(model, saes[hook], hook, pairs.clean)[0] for hook in links[down_hook] if hook != up_hook}
        for up_feature in range(D_SAE):
            recorded = {}
            hooks = [(h, lambda x, hook, v=v: v) for h, v in held.items()]
            hooks.append(_patch_feature(saes[up_hook], up_hook, up_feature, f_up_patch[..., up_feature]))
            hooks.append((down_hook, lambda x, hook: recorded.setdefault("x", x.clone())))
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                model(pairs.clean)
            f_down = saes[down_hook].encode(recorded["x"].reshape(-1, D_MODEL)).reshape(*recorded["x"].shape[:2], -1)
            for down_feature in range(D_SAE):
                exact = _metric(model, pairs.clean, pairs,
                                [_patch_feature(saes[down_hook], down_hook, down_feature, f_down[..., down_feature])]) - clean
                edge = circuit.edges[(Node(up_hook, up_feature, None), Node(down_hook, down_feature, None))]
                assert edge == pytest.approx(exact, abs=1e-4, rel=1e-3), (up_hook, up_feature, down_feature)


def test_integrated_gradients_converge_to_the_exact_effect_of_a_module(nonlinear):
    """IG's completeness: a module's node effects (features + error) sum to the effect of patching
    the whole module, up to the quadrature error, which shrinks with the steps."""
    model, saes, pairs = nonlinear
    clean = _metric(model, pairs.clean, pairs)
    errors = {}
    for steps in (1, 4, 32):
        circuit = find_circuit(model, saes, pairs, method="ig", steps=steps, edges=False, progress=False)
        errors[steps] = []
        for hook in ("blocks.0.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.0.hook_resid_post"):
            x_patch = _states(model, saes[hook], hook, pairs.patch)[0]
            exact = _metric(model, pairs.clean, pairs, [(hook, lambda x, hook: x_patch)]) - clean
            total = float(circuit.feature_effects[hook].sum() + circuit.error_effects[hook].sum())
            errors[steps].append(abs(total - exact) / max(abs(exact), 1e-3))
    assert max(errors[32]) < 5e-3, errors
    assert max(errors[32]) < max(errors[1]), errors


def test_thresholds_and_aggregation(nonlinear):
    model, saes, pairs = nonlinear
    summed = find_circuit(model, saes, pairs, method="atp", node_threshold=0.01, progress=False)
    per_position = find_circuit(model, saes, pairs, method="atp", node_threshold=0.01, per_position=True, progress=False)
    for hook in HOOKS:  # per-position effects sum to the aggregated ones
        assert per_position.feature_effects[hook].shape == (POS, 12)
        torch.testing.assert_close(per_position.feature_effects[hook].sum(0), summed.feature_effects[hook], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(per_position.error_effects[hook].sum(0), summed.error_effects[hook], atol=1e-6, rtol=1e-5)
    for threshold in (0.0, 0.01, 0.05):
        kept = {node for node, _ in summed.nodes(threshold)}
        every = [Node(h, f, None) for h in HOOKS for f in range(12)] + [Node(h, None, None) for h in HOOKS]
        assert kept == {node for node in every if abs(summed.node_effect(node)) > threshold}
        effects = [abs(e) for _, e in summed.nodes(threshold)]
        assert effects == sorted(effects, reverse=True)
    assert {n.position for n, _ in per_position.nodes()} <= set(range(POS)) and per_position.nodes()
    assert all(n.position is not None for n, _ in per_position.nodes())
    # edges: only among nodes above the threshold they were computed at, filtered by weight
    kept = {node for node, _ in summed.nodes()}
    assert summed.edges and all(u in kept and d in kept for u, d in summed.edges)
    strong = summed.edges_above(0.05, edge_threshold=0.02)
    assert all(abs(w) > 0.02 and abs(summed.node_effect(u)) > 0.05 and abs(summed.node_effect(d)) > 0.05
               for u, d, w in strong)
    assert len(strong) < len(summed.edges_above())
    # edges run only between consecutive modules (the paper's graph)
    links = upstream(circuit_modules(saes))
    assert all(u.hook in links[d.hook] for u, d in summed.edges)


def test_bad_input_is_named(nonlinear):
    model, saes, pairs = nonlinear
    with pytest.raises(ValueError, match="method must be"):
        find_circuit(model, saes, pairs, method="exact", progress=False)
    with pytest.raises(ValueError, match="hook_attn_out"):
        find_circuit(model, {"blocks.0.hook_resid_pre": saes[HOOKS[0]]}, pairs, progress=False)
    with pytest.raises(ValueError, match="equal"):
        ContrastivePairs(pairs.clean, pairs.patch[:, :-1], pairs.clean_answer, pairs.patch_answer)
    with pytest.raises(ValueError, match="same token"):
        ContrastivePairs(pairs.clean, pairs.patch, pairs.clean_answer, pairs.clean_answer)


def test_faithfulness_runs_from_the_empty_to_the_full_circuit(nonlinear):
    """F(C) = (m(C) − m(∅)) / (m(M) − m(∅)): keeping every node gives 1 and completeness 0;
    keeping none gives 0 and completeness 1; m(M) is the model itself (error nodes kept)."""
    model, saes, pairs = nonlinear
    circuit = find_circuit(model, saes, pairs, method="atp", edges=False, progress=False)
    every, none, middle = -1.0, float("inf"), 0.05
    rows = faithfulness_curve(model, saes, pairs, circuit, [every, middle, none], progress=False)
    assert rows[0]["metric_full"] == pytest.approx(_metric(model, pairs.clean, pairs), abs=1e-4)
    assert rows[0]["faithfulness"] == pytest.approx(1.0, abs=1e-4) and rows[0]["completeness"] == pytest.approx(0.0, abs=1e-4)
    assert rows[2]["faithfulness"] == pytest.approx(0.0, abs=1e-4) and rows[2]["completeness"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["nodes"] == len(HOOKS) * 13 and rows[2]["nodes"] == 0
    assert 0 < rows[1]["nodes"] < rows[0]["nodes"]
    # m(∅) is the metric with every node at its clean mean: the same for every pair's prompt
    means = clean_means(model, saes, pairs)
    for hook in HOOKS:
        assert means[hook][0].shape == (POS, 12) and means[hook][1].shape == (POS, D_MODEL)


def test_exact_patching_matches_attribution_patching_on_a_linear_model(linear):
    model, saes, pairs = linear
    check = patching_check(model, saes, pairs, per_module=4, steps=2, progress=False)
    assert set(check.correlation) == {"attn", "mlp", "resid"}
    for row in check.rows:  # linear model: AtP and IG are exact, so both equal exact patching
        assert row["atp"] == pytest.approx(row["exact"], abs=1e-6, rel=1e-6)
        assert row["ig"] == pytest.approx(row["exact"], abs=1e-6, rel=1e-6)
    assert all(r["atp"] > 0.999999 and r["ig"] > 0.999999 for r in check.correlation.values())
    assert sum(row["node"].feature is None for row in check.rows) == len(HOOKS)  # each error node checked
    assert "| attn |" in check.table()


def test_circuit_graph_shows_what_the_thresholds_keep(nonlinear):
    model, saes, pairs = nonlinear
    circuit = find_circuit(model, saes, pairs, method="atp", node_threshold=0.01, progress=False)
    for node_threshold, edge_threshold in ((0.01, 0.0), (0.05, 0.01), (0.2, 0.05)):
        graph = circuit_graph(circuit, node_threshold, edge_threshold, max_per_row=5)
        json.dumps(graph)  # what is synced must be plain JSON
        ids = [n["id"] for n in graph["nodes"]]
        assert len(ids) == len(set(ids))
        expected = circuit.nodes(node_threshold)
        for hook in HOOKS:
            row = [n for n in graph["nodes"] if n["hook"] == hook]
            kept = [node for node, _ in expected if node.hook == hook]
            assert len(row) == min(5, len(kept))  # the largest |effect| first, at most 5 per module
            assert [n["effect"] for n in row] == pytest.approx([circuit.node_effect(node) for node in kept[:5]])
        assert all(abs(n["effect"]) > node_threshold for n in graph["nodes"])
        assert all(set((e["source"], e["target"])) <= set(ids) and abs(e["weight"]) > edge_threshold
                   for e in graph["edges"])
        assert {n["kind"] for n in graph["nodes"]} <= {"feature", "error"}
    assert len(circuit_graph(circuit, 0.2)["nodes"]) < len(circuit_graph(circuit, 0.01)["nodes"])


def test_circuit_viewer_refilters_without_recomputing_and_exports(nonlinear, tmp_path, monkeypatch):
    model, saes, pairs = nonlinear
    circuit = find_circuit(model, saes, pairs, method="atp", node_threshold=0.01, progress=False)
    viewer = wb.CircuitViewer(circuit, model=model, tokens=["<img src=x onerror=alert(1)>"] * POS)
    shown = len(viewer.graph["nodes"])
    viewer.set_thresholds(node=0.2)
    assert len(viewer.graph["nodes"]) < shown
    assert viewer.graph == circuit_graph(circuit, viewer.node_slider.value, viewer.edge_slider.value)
    error = next(n for n in circuit_graph(circuit, 0.0)["nodes"] if n["kind"] == "error")
    assert viewer.select(error["id"]) is None and "error node" in viewer.status.value
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path))
    saved = viewer.export("toy_circuit")
    assert {p.suffix for p in saved} == {".pdf", ".svg", ".png"} and all(p.stat().st_size > 1000 for p in saved)


# --- transcoders at the MLP outputs (Dunefsky et al. 2024) ----------------------------------


def test_transcoder_error_node_makes_the_decomposition_exact_and_its_features_ignore_the_mlp(nonlinear):
    """MLP output = decode(encode(MLP input)) + ε exactly; and the transcoder's features are
    computed from the MLP's input, so changing the MLP's weights leaves them as they were (the
    input invariance), while an MLP-output SAE's features move with them."""
    model, saes, pairs = nonlinear
    with_tc = _with_transcoders(False, saes)
    _, states = module_states(model, with_tc, pairs.clean)
    _, sae_states = module_states(model, saes, pairs.clean)
    inputs = {}
    hooks = [(tc.cfg.hook_name, lambda x, hook: inputs.__setitem__(hook.name, x)) for h, tc in with_tc.items()
             if tc.is_transcoder]
    rewritten = hooks + [(h, lambda x, hook: join(with_tc[hook.name], *split(with_tc[hook.name], x,
                                                                               inputs.get(with_tc[hook.name].cfg.hook_name)), x))
                         for h in HOOKS]
    without_error = hooks + [(h, lambda x, hook: join(with_tc[hook.name], split(with_tc[hook.name], x, inputs.get(
        with_tc[hook.name].cfg.hook_name))[0], torch.zeros_like(x), x)) for h in HOOKS]
    clean = _metric(model, pairs.clean, pairs)
    assert _metric(model, pairs.clean, pairs, rewritten) == pytest.approx(clean, abs=1e-5)
    assert abs(_metric(model, pairs.clean, pairs, without_error) - clean) > 1e-2
    with pytest.raises(ValueError, match="capture it in the same pass"):
        split(with_tc["blocks.0.hook_mlp_out"], states["blocks.0.hook_mlp_out"][1])

    mlp = model.blocks[1].mlp
    saved = mlp.W_out.detach().clone()
    try:
        with torch.no_grad():
            mlp.W_out.mul_(-2.0)
        _, changed = module_states(model, with_tc, pairs.clean)
        _, sae_changed = module_states(model, saes, pairs.clean)
    finally:
        with torch.no_grad():
            mlp.W_out.copy_(saved)
    hook = "blocks.1.hook_mlp_out"
    torch.testing.assert_close(changed[hook][0], states[hook][0])  # features: from the input, unchanged
    assert not torch.allclose(changed[hook][1], states[hook][1])  # the error node carries the MLP's change
    assert not torch.allclose(sae_changed[hook][0], sae_states[hook][0])  # an SAE on the output moves


def test_transcoder_node_and_edge_effects_equal_exact_patching_on_a_linear_model(linear):
    """With transcoders at both MLP outputs of the linear model, AtP and IG node effects equal
    exact patching (patching_check), and the edges into a transcoder's features equal exact
    path patching, computed through its encoder of the MLP's input."""
    model, saes, pairs = linear
    with_tc = _with_transcoders(True, saes)
    with torch.no_grad():  # the premise of exactness: the transcoders' encoders never clip
        _, cache = model.run_with_cache(pairs.clean)
        for tc in with_tc.values():
            if tc.is_transcoder:
                assert float(tc.encode(cache[tc.cfg.hook_name].reshape(-1, D_MODEL)).min()) > 0
    check = patching_check(model, with_tc, pairs, per_module=4, steps=2, progress=False)
    for row in check.rows:
        assert row["atp"] == pytest.approx(row["exact"], abs=1e-6, rel=1e-6)
        assert row["ig"] == pytest.approx(row["exact"], abs=1e-6, rel=1e-6)
    assert any(row["node"].hook.endswith("mlp_out") for row in check.rows)

    circuit = find_circuit(model, with_tc, pairs, method="atp", node_threshold=0.0, progress=False)
    clean = _metric(model, pairs.clean, pairs)
    down_hook, tc = "blocks.1.hook_mlp_out", with_tc["blocks.1.hook_mlp_out"]
    links = upstream(circuit_modules(with_tc))

    def patch_down(feature, value):
        """Set the transcoder's feature to ``value``, its other features and ε as they are."""
        seen = {}

        def fn(x, hook):
            f = tc.encode(seen["x"].reshape(-1, D_MODEL)).reshape(*x.shape[:2], -1)
            return x + (value - f[..., feature])[..., None] * tc.W_dec[feature]
        return [(tc.cfg.hook_name, lambda x, hook: seen.__setitem__("x", x)), (down_hook, fn)]

    for up_hook in links[down_hook]:
        _, f_up_patch, _ = _states(model, with_tc[up_hook], up_hook, pairs.patch)
        held = {h: _states(model, with_tc[h], h, pairs.clean)[0] for h in links[down_hook] if h != up_hook}
        for up_feature in range(D_SAE):
            recorded = {}
            hooks = [(h, lambda x, hook, v=v: v) for h, v in held.items()]
            hooks.append(_patch_feature(with_tc[up_hook], up_hook, up_feature, f_up_patch[..., up_feature]))
            hooks.append((tc.cfg.hook_name, lambda x, hook: recorded.setdefault("x", x.clone())))
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                model(pairs.clean)
            f_down = tc.encode(recorded["x"].reshape(-1, D_MODEL)).reshape(*recorded["x"].shape[:2], -1)
            for down_feature in range(D_SAE):
                exact = _metric(model, pairs.clean, pairs, patch_down(down_feature, f_down[..., down_feature])) - clean
                edge = circuit.edges[(Node(up_hook, up_feature, None), Node(down_hook, down_feature, None))]
                assert edge == pytest.approx(exact, abs=1e-4, rel=1e-3), (up_hook, up_feature, down_feature)


def test_a_transcoder_must_stand_at_its_target(nonlinear):
    model, saes, pairs = nonlinear
    with_tc = _with_transcoders(False, saes)
    misplaced = {**saes, "blocks.0.hook_resid_post": with_tc["blocks.0.hook_mlp_out"]}
    with pytest.raises(ValueError, match="put it at that hook"):
        find_circuit(model, misplaced, pairs, progress=False)
