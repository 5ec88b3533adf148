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
    down_hook = "blocks.1.hook_resid_post"
    _assert_edges_equal_path_patching(model, saes, pairs, circuit, down_hook,
                                      lambda feature, value: [_patch_feature(saes[down_hook], down_hook, feature, value)])


def _assert_edges_equal_path_patching(model, saes, pairs, circuit, down_hook, patch_down):
    """Every edge into ``down_hook``'s features against exact path patching: patch one upstream
    feature with the other upstream modules held at clean, record the down module's input (its
    hook, or a transcoder's MLP input) and encode it, then set that down feature alone to its
    new value in the clean run (``patch_down(feature, value)`` gives the hooks)."""
    clean = _metric(model, pairs.clean, pairs)
    down = saes[down_hook]
    read_hook = down.cfg.hook_name if down.is_transcoder else down_hook
    links = upstream(circuit_modules(saes))
    for up_hook in links[down_hook]:
        _, f_up_patch, _ = _states(model, saes[up_hook], up_hook, pairs.patch)
        held = {h: _states(model, saes[h], h, pairs.clean)[0] for h in links[down_hook] if h != up_hook}
        for up_feature in range(D_SAE):
            recorded = {}
            hooks = [(h, lambda x, hook, v=v: v) for h, v in held.items()]
            hooks.append(_patch_feature(saes[up_hook], up_hook, up_feature, f_up_patch[..., up_feature]))
            hooks.append((read_hook, lambda x, hook: recorded.setdefault("x", x.clone())))
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                model(pairs.clean)
            f_down = down.encode(recorded["x"].reshape(-1, D_MODEL)).reshape(*recorded["x"].shape[:2], -1)
            for down_feature in range(D_SAE):
                exact = _metric(model, pairs.clean, pairs, patch_down(down_feature, f_down[..., down_feature])) - clean
                edge = circuit.edges[(Node(up_hook, up_feature, None), Node(down_hook, down_feature, None))]
                assert edge == pytest.approx(exact, abs=1e-4, rel=1e-3), (up_hook, up_feature, down_feature)


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
    down_hook, tc = "blocks.1.hook_mlp_out", with_tc["blocks.1.hook_mlp_out"]

    def patch_down(feature, value):
        """Set the transcoder's feature to ``value``, its other features and ε as they are."""
        seen = {}

        def fn(x, hook):
            f = tc.encode(seen["x"].reshape(-1, D_MODEL)).reshape(*x.shape[:2], -1)
            return x + (value - f[..., feature])[..., None] * tc.W_dec[feature]
        return [(tc.cfg.hook_name, lambda x, hook: seen.__setitem__("x", x)), (down_hook, fn)]

    _assert_edges_equal_path_patching(model, with_tc, pairs, circuit, down_hook, patch_down)


def test_a_transcoder_must_stand_at_its_target(nonlinear):
    model, saes, pairs = nonlinear
    with_tc = _with_transcoders(False, saes)
    misplaced = {**saes, "blocks.0.hook_resid_post": with_tc["blocks.0.hook_mlp_out"]}
    with pytest.raises(ValueError, match="put it at that hook"):
        find_circuit(model, misplaced, pairs, progress=False)
