"""Threshold methods on tiny TransformerLens models (plain ReLU and gated SiLU): fit/apply
agree, targets are met, hooks leave the model exactly as it was, methods compose, and the
cache source rebuilds what the model source captures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.cache import ActivationCache, cache_activations
from workbench.sparsity import CATS, CETT, METHODS, TEAL, WINA, CacheSource, ModelSource, TopK, cett, chess_thresholds, describe_mlps, get_method

FLAVOURS = {"relu": dict(act_fn="relu"), "swiglu": dict(act_fn="silu", gated=True)}
TARGET = {"cett": 0.2}  # CETT's target is a CETT value; the others' a sparsity


def _model(flavour: str):
    model = tiny_model(**FLAVOURS[flavour])
    with torch.no_grad():  # non-trivial ln2 weights and b_in, so the affine and b_in paths are exercised
        generator = torch.Generator().manual_seed(1)
        for block in model.blocks:
            block.ln2.w.copy_(1 + 0.3 * torch.randn(block.ln2.w.shape, generator=generator))
            block.ln2.b.copy_(0.1 * torch.randn(block.ln2.b.shape, generator=generator))
            block.mlp.b_in.copy_(0.05 * torch.randn(block.mlp.b_in.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def flavour(request):
    return request.param


@pytest.fixture(scope="module")
def model(flavour):
    return _model(flavour)


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens(n_seq=16)


def _no_hooks_left(model) -> bool:
    return (all(not point.fwd_hooks and not point._forward_hooks for point in model.hook_dict.values())
            and all(not block.mlp._forward_pre_hooks for block in model.blocks))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_apply_changes_the_output_and_leaves_the_model_unchanged(model, tokens, name):
    method = get_method(name)
    thresholds = method.fit((model, tokens), TARGET.get(name, 0.5))
    with torch.no_grad():
        before = model(tokens)
        with method.apply(model, thresholds) as meter:
            sparse = model(tokens)
        after = model(tokens)
    assert not torch.allclose(sparse, before, atol=1e-3)
    assert torch.equal(after, before) and _no_hooks_left(model)
    assert set(meter.sparsity()) == set(thresholds.values) and 0.3 < meter.mean < 0.99
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), method.apply(model, thresholds):
        model(tokens)
        raise RuntimeError("inside")
    assert _no_hooks_left(model) and torch.equal(model(tokens), before)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fit_meets_the_target_and_apply_realises_what_fit_measured(model, tokens, name):
    method = get_method(name)
    thresholds = method.fit((model, tokens), TARGET.get(name, 0.5), sequential=False)
    assert thresholds.n_tokens == tokens.numel() and thresholds.layers == [0, 1]
    if name != "cett":
        assert abs(thresholds.realised_mean - 0.5) < 0.02
    for key in thresholds.values:  # one site alone, on the calibration tokens: dense inputs, as in fit
        alone = dataclasses.replace(thresholds, values={key: thresholds.values[key]})
        with torch.no_grad(), method.apply(model, alone) as meter:
            model(tokens)
        assert meter.sparsity()[key] == pytest.approx(thresholds.realised[key], abs=1e-6)


@pytest.mark.parametrize("name", ["cats", "teal", "chess"])
def test_the_default_fit_holds_the_target_with_every_layer_applied(model, tokens, name):
    # Several layers from a model: calibrated layer by layer on the sparsified model by default.
    method = get_method(name)
    thresholds = method.fit((model, tokens), 0.6)
    with torch.no_grad(), method.apply(model, thresholds) as meter:
        model(tokens)
    assert meter.sparsity() == pytest.approx(thresholds.realised, abs=1e-6)
    assert all(abs(value - 0.6) < 0.01 for value in meter.sparsity().values())


def test_chess_defaults_to_the_released_codes_statistic(tokens):
    model = _model("swiglu")
    site = describe_mlps(model)[0]
    assert get_method("chess").statistic == "abs"
    thresholds = get_method("chess").fit((model, tokens), 0.5).select([0])
    acts = ModelSource(model, tokens).collect([site.hook_pre, site.hook_pre_linear])
    _, expected = chess_thresholds(site.act(acts[site.hook_pre]).abs(), acts[site.hook_pre_linear], 0.5, "abs")
    assert torch.allclose(thresholds.values["blocks.0.mlp.gate"], expected)


def test_top_k_methods_keep_exactly_k_per_token_and_wina_weighs_by_w_out(tokens):
    model = _model("swiglu")  # SiLU: no exact zeros, so exactly k survive
    site = describe_mlps(model)[1]
    _, dense = model.run_with_cache(tokens, names_filter=site.hook_post)
    seen = {}
    for method in (TopK(on="x1", scope="token"), WINA(sites=("x1",))):
        thresholds = method.fit((model, tokens), 0.75)
        assert int(thresholds.values["blocks.1.mlp.x1"]) == 16  # 64 − round(0.75·64)
        with torch.no_grad(), method.apply(model, thresholds.select([1])), \
                model.hooks(fwd_hooks=[(site.hook_post, lambda act, hook: seen.__setitem__(method.name, act.clone()))]):
            model(tokens)
        seen[method.name] = seen[method.name] != site.b_in  # kept entries (dropped ones hold b_in)
        assert (seen[method.name].sum(-1) == 16).all()
    score = site.x1_from_post(dense[site.hook_post]).abs() * site.w_out_norms
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(16, dim=-1).indices, True)
    assert torch.equal(seen["wina"], expected)
    assert not torch.equal(seen["wina"], seen["topk"])  # the weight norms changed the choice


def test_top_k_defaults_to_the_reference_gate_score_ranked_over_the_batch(tokens):
    model = _model("swiglu")
    site = describe_mlps(model)[1]
    thresholds = TopK().fit((model, tokens), 0.75)
    assert list(thresholds.values) == ["blocks.0.mlp.gate", "blocks.1.mlp.gate"]
    seen = {}
    with torch.no_grad():
        _, dense = model.run_with_cache(tokens, names_filter=site.hook_pre)
        with TopK().apply(model, thresholds.select([1])), \
                model.hooks(fwd_hooks=[(site.hook_post, lambda act, hook: seen.__setitem__("post", act.clone()))]):
            model(tokens)
    kept = seen["post"] != site.b_in
    score = site.act(dense[site.hook_pre]).abs().flatten()
    expected = torch.zeros_like(score, dtype=torch.bool)
    expected[score.topk(16 * tokens.numel()).indices] = True
    assert torch.equal(kept.flatten(), expected)  # the 16·tokens largest |act(gate)| of the batch
    per_token = kept.sum(-1)
    assert per_token.float().mean() == 16 and per_token.min() < 16 < per_token.max()


def test_cats_on_a_gated_mlp_zeroes_the_gate_so_dropped_neurons_keep_only_b_in(tokens):
    model = _model("swiglu")
    site = describe_mlps(model)[0]
    thresholds = CATS().fit((model, tokens), 0.5)
    assert list(thresholds.values) == ["blocks.0.mlp.gate", "blocks.1.mlp.gate"]
    seen = {}
    with torch.no_grad():
        _, dense = model.run_with_cache(tokens, names_filter=lambda n: n in (site.hook_pre, site.hook_post))
        with CATS().apply(model, thresholds.select([0])), \
                model.hooks(fwd_hooks=[(site.hook_post, lambda act, hook: seen.__setitem__("x1", act.clone()))]):
            model(tokens)
    dropped = site.act(dense[site.hook_pre]).abs() < thresholds.values["blocks.0.mlp.gate"]
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(seen["x1"][dropped], site.b_in.expand_as(seen["x1"])[dropped])
    assert torch.equal(seen["x1"][~dropped], dense[site.hook_post][~dropped])


def test_cett_method_thresholds_are_epsilon_over_the_down_projection_norms(model, tokens):
    thresholds = CETT(rtol=1e-6).fit((model, tokens), 0.2, sequential=False)
    _, dense = model.run_with_cache(tokens)
    for site in describe_mlps(model):
        epsilon = thresholds.extras[f"blocks.{site.layer}.mlp.epsilon"]
        assert torch.allclose(thresholds.values[f"blocks.{site.layer}.mlp.x1"], epsilon / site.w_out_norms)
        x1 = site.x1_from_post(dense[site.hook_post]).reshape(-1, site.d_mlp)
        assert cett(x1, site.w_out, epsilon) <= 0.2 < cett(x1, site.w_out, epsilon * (1 + 1e-4))


def test_methods_compose_and_unwind(model, tokens):
    cats, teal = CATS(), TEAL(sites=("input",))
    cats_t, teal_t = cats.fit((model, tokens), 0.5), teal.fit((model, tokens), 0.5)
    with torch.no_grad():
        before = model(tokens)
        with cats.apply(model, cats_t):
            only_cats = model(tokens)
            with teal.apply(model, teal_t) as meter:
                both = model(tokens)
            assert torch.equal(model(tokens), only_cats)  # the inner block's hooks are gone
        # Layer 0's MLP input is upstream of every CATS mask: it sees dense activations, as in fit.
        assert meter.sparsity()["blocks.0.mlp.input"] == pytest.approx(teal_t.realised["blocks.0.mlp.input"], abs=1e-6)
        assert not torch.allclose(both, only_cats, atol=1e-3)
        assert torch.equal(model(tokens), before) and _no_hooks_left(model)
    with pytest.raises(ValueError, match="fitted by 'teal'"):
        cats.apply(model, teal_t)


def test_teal_reads_the_mlp_input_after_ln2s_affine_weights(model, tokens):
    with torch.no_grad():
        before = model(tokens)
        nothing = TEAL().fit((model, tokens), 0.0)  # drops only exact zeros: must change nothing
        with TEAL().apply(model, nothing) as meter:
            assert torch.equal(model(tokens), before)
    assert meter.sparsity()["blocks.0.mlp.input"] == 0.0
    site = describe_mlps(model)[0]
    captured = ModelSource(model, tokens).collect([site.input_name])[site.input_name]
    _, cache = model.run_with_cache(tokens, names_filter=site.hook_normalized)
    rebuilt = site.input_from_normalized(cache[site.hook_normalized]).reshape(-1, site.d_model)
    assert torch.allclose(captured, rebuilt, atol=1e-6)
    assert not torch.allclose(captured, cache[site.hook_normalized].reshape(-1, site.d_model), atol=1e-2)


def test_fitting_from_a_cache_equals_fitting_from_the_model(model, tokens, tmp_path):
    sites = describe_mlps(model)
    hooks = sorted({name for site in sites for name in (site.hook_normalized, site.hook_pre, site.hook_post, site.hook_pre_linear) if name})
    cache_activations(model, tokens, hooks, tmp_path, dtype="float32", batch_size=4, shard_tokens=64, progress=False)
    cache = ActivationCache.open(tmp_path)
    for method in (TEAL(), CATS(), get_method("chess"), get_method("fat")):
        from_model = method.fit((model, tokens), 0.5, **({} if method.name == "fat" else {"sequential": False}))
        from_cache = method.fit((cache, model), 0.5)
        assert from_cache.values.keys() == from_model.values.keys()
        for key, value in from_model.values.items():
            assert torch.allclose(from_cache.values[key], value, rtol=1e-5, atol=1e-6), (method.name, key)
    with pytest.raises(ValueError, match="not an offline zoo model"):
        TEAL().fit(cache, 0.5)  # the tiny model's ln2 weights cannot be found from the manifest
    with pytest.raises(KeyError, match="does not hold"):
        CacheSource(cache, model).collect(["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="sequential"):
        CATS().fit((cache, model), 0.5, sequential=True)


def test_bad_arguments_are_refused(model, tokens):
    with pytest.raises(ValueError, match="target sparsity"):
        CATS().fit((model, tokens), 1.5)
    with pytest.raises(TypeError, match="a source is"):
        CATS().fit(tokens, 0.5)
    with pytest.raises(ValueError, match="unknown sparsity method"):
        get_method("nope")
    with pytest.raises(ValueError, match="TEAL sparsifies"):
        TEAL(sites=("gate",))
    with pytest.raises(ValueError, match="statistic"):
        get_method("chess", statistic="cube")


# --- one bias convention for every method (a gated MLP's b_in belongs to the kept part) ---

ALL_AT_ONCE = {"teal": dict(sites=("x1",)), "wina": dict(sites=("x1",))}  # the input sites change x1 itself


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_drops_exactly_the_neuron_contributions_and_keeps_b_in(tokens, name):
    # Hand-built gated MLP with a large b_in: a method that scored or zeroed hook_post itself
    # would see |b_in| everywhere and drop b_in·W_out along with the neuron.
    model = _model("swiglu")
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_in.copy_(torch.linspace(-1, 1, block.mlp.b_in.numel()))
    site = describe_mlps(model)[1]
    method = get_method(name, **ALL_AT_ONCE.get(name, {}))
    thresholds = method.fit((model, tokens), TARGET.get(name, 0.5)).select([1])
    seen = {}
    with torch.no_grad():
        _, dense = model.run_with_cache(tokens, names_filter=lambda n: n == site.hook_post)
        with method.apply(model, thresholds) as meter, \
                model.hooks(fwd_hooks=[(site.hook_post, lambda act, hook: seen.__setitem__("post", act.clone()))]):
            model(tokens)
    post, b_in = seen["post"], site.b_in.expand_as(seen["post"])
    x1 = site.x1_from_post(dense[site.hook_post])
    kept = post != b_in
    assert torch.equal(post[kept], dense[site.hook_post][kept])  # kept neurons untouched
    dropped_fraction = 1 - kept.float().mean()
    (realised,) = meter.sparsity().values()
    assert float(dropped_fraction) == pytest.approx(realised, abs=1e-6)  # what is dropped is what is counted
    assert 0.1 < realised < 0.95
    # Dropping everything leaves the MLP output at the constant b_in·W_out + b_out, for every method.
    everything = dataclasses.replace(thresholds, values={
        key: torch.tensor(0) if method.topk else torch.full_like(value, float("inf")) for key, value in thresholds.values.items()})
    with torch.no_grad(), method.apply(model, everything), \
            model.hooks(fwd_hooks=[(f"blocks.1.hook_mlp_out", lambda act, hook: seen.__setitem__("out", act.clone()))]):
        model(tokens)
    constant = site.b_in @ site.w_out + model.blocks[1].mlp.b_out
    assert torch.allclose(seen["out"], constant.expand_as(seen["out"]), atol=1e-5)
    assert x1.abs().min() < site.b_in.abs().max()  # the example is one where b_in matters


def test_sources_return_x1_without_the_gated_bias(tokens):
    model = _model("swiglu")
    site = describe_mlps(model)[0]
    got = ModelSource(model, tokens).collect([site.hook_post])[site.hook_post]
    _, dense = model.run_with_cache(tokens, names_filter=lambda n: n in (site.hook_pre, site.hook_pre_linear))
    x1 = (site.act(dense[site.hook_pre]) * dense[site.hook_pre_linear]).reshape(-1, site.d_mlp)
    assert torch.allclose(got, x1, atol=1e-6)


def test_fat_defaults_to_the_gate_of_gated_mlps(tokens):
    model = _model("swiglu")
    thresholds = get_method("fat").fit((model, tokens), 0.5)
    assert list(thresholds.values) == ["blocks.0.mlp.gate", "blocks.1.mlp.gate"]
    assert list(get_method("fat", on="x1").fit((model, tokens), 0.5).values) == ["blocks.0.mlp.x1", "blocks.1.mlp.x1"]
    with pytest.raises(ValueError, match="on must be"):
        get_method("topk", on="up")
