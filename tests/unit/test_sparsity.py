"""Activation-sparsity metrics on hand-built tensors and tiny models: CETT, per-neuron
thresholds, activation ratio, the CATS quantile, CHESS and WINA scores, Top-k, lazy neurons."""

from __future__ import annotations

import math

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.cache import ActivationCache, cache_activations
from workbench.sparsity import (
    WINA,
    activation_ratio,
    cats_threshold,
    cett,
    cett_threshold,
    chess_thresholds,
    describe_mlps,
    lazy_neuron_stats,
    neuron_magnitudes,
    neuron_thresholds,
)
from workbench.sparsity.masking import threshold_keep, topk_keep

# Two tokens, three neurons, d_model = 2. W_out rows (TransformerLens layout) are the math
# columns W_out[:, i]: e1, e2 and (1, 1), with norms 1, 1 and √2.
W_OUT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
X1 = torch.tensor([[1.0, 2.0, 0.5],
                   [0.0, 3.0, 1.0]])
# n_i = x1_i · W_out[:, i]:
#   token 0: (1, 0), (0, 2), (0.5, 0.5)  norms 1, 2, 0.707;  Σ = (1.5, 2.5)
#   token 1: (0, 0), (0, 3), (1, 1)      norms 0, 3, 1.414;  Σ = (1, 4)


def test_cett_on_a_hand_worked_example():
    # ε = 1.5 drops neurons 0 and 2 of both tokens: tails (1.5, 0.5) and (1, 1).
    expected = (math.sqrt(1.5**2 + 0.5**2) / math.sqrt(1.5**2 + 2.5**2) + math.sqrt(2) / math.sqrt(17)) / 2
    assert cett(X1, W_OUT, 1.5) == pytest.approx(expected, rel=1e-12)
    assert cett(X1, W_OUT, 0.0) == 0.0  # nothing is below 0
    assert cett(X1, W_OUT, 3.01) == pytest.approx(1.0)  # everything is
    # ε = 0.8 drops (0.5, 0.5) from token 0 and only the zero neuron from token 1.
    assert cett(X1, W_OUT, 0.8) == pytest.approx((math.sqrt(0.5) / math.sqrt(8.5)) / 2, rel=1e-12)


def test_cett_skips_tokens_whose_output_is_zero_and_is_chunk_invariant():
    with_zero = torch.cat([X1, torch.zeros(1, 3)])
    assert cett(with_zero, W_OUT, 1.5) == pytest.approx(cett(X1, W_OUT, 1.5), rel=1e-12)
    assert math.isnan(cett(torch.zeros(4, 3), W_OUT, 1.0))
    generator = torch.Generator().manual_seed(0)
    x1, w_out = torch.randn(300, 16, generator=generator).relu(), torch.randn(16, 8, generator=generator)
    assert cett(x1, w_out, 0.5, chunk_tokens=7) == pytest.approx(cett(x1, w_out, 0.5), rel=1e-10)


def test_cett_threshold_lands_on_the_jump_that_crosses_the_target():
    # CETT steps: 0.121 on (0.707, 1], 0.271 on (1, √2], 0.443 on (√2, 2]: target 0.3 is
    # crossed when neuron 2 of token 1 (‖n‖ = √2) joins the tail.
    epsilon = cett_threshold(X1, W_OUT, 0.3, rtol=1e-9)
    assert epsilon == pytest.approx(math.sqrt(2), rel=1e-8)
    assert epsilon <= math.sqrt(2) and cett(X1, W_OUT, epsilon) <= 0.3 < cett(X1, W_OUT, epsilon * (1 + 1e-6))
    assert cett_threshold(X1, W_OUT, 0.0) == 0.0
    assert cett(X1, W_OUT, cett_threshold(X1, W_OUT, 1.0)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="target_cett"):
        cett_threshold(X1, W_OUT, 1.5)


def test_neuron_thresholds_magnitudes_and_activation_ratio():
    assert torch.allclose(neuron_magnitudes(X1, W_OUT), torch.tensor([[1.0, 2.0, 0.5 * math.sqrt(2)], [0.0, 3.0, math.sqrt(2)]]))
    assert torch.allclose(neuron_thresholds(1.5, W_OUT), torch.tensor([1.5, 1.5, 1.5 / math.sqrt(2)]))
    assert torch.equal(neuron_thresholds(0.0, W_OUT), torch.zeros(3))
    assert torch.isinf(neuron_thresholds(1.0, torch.tensor([[0.0, 0.0], [1.0, 0.0]])))[0]
    # ‖n_i‖ ≥ 1.5: only neuron 1 of each token → 2 of 6 entries.
    assert activation_ratio(X1, W_OUT, 1.5) == pytest.approx(2 / 6)
    assert activation_ratio(X1, W_OUT, 1.0) == pytest.approx(4 / 6)  # 1, 2 | 3, √2
    # The per-neuron activation-space threshold keeps exactly the entries with ‖n_i‖ ≥ ε.
    assert threshold_keep(neuron_thresholds(1.5, W_OUT))(X1.abs()).float().mean() == pytest.approx(2 / 6)


def test_cats_threshold_is_the_quantile_that_zeroes_the_target_fraction():
    values = torch.arange(1.0, 101.0) * torch.tensor([1.0, -1.0]).repeat(50)  # |a| = 1..100, signs alternate
    shuffled = values[torch.randperm(100, generator=torch.Generator().manual_seed(0))].reshape(10, 10)
    assert cats_threshold(shuffled, 0.3) == 31.0  # exactly 30 values have |a| < 31
    assert cats_threshold(shuffled, 0.0) == 0.0
    assert (shuffled.abs() < cats_threshold(shuffled, 1.0)).all()
    big = torch.rand(1_000_000, generator=torch.Generator().manual_seed(1))
    sampled = cats_threshold(big, 0.25, max_elements=20_000)
    assert sampled == cats_threshold(big, 0.25, max_elements=20_000)  # seeded: deterministic
    assert abs(sampled - 0.25) < 0.01
    with pytest.raises(ValueError, match="sparsity"):
        cats_threshold(big, -0.1)


def test_topk_and_threshold_rules_count_zeros_as_inactive():
    score = torch.tensor([[5.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 4.0]])
    assert topk_keep(2)(score).tolist() == [[True, False, True, False], [False, False, False, True]]
    assert topk_keep(0)(score).sum() == 0
    per_channel = torch.tensor([1.0, 1.0, 4.0, 1.0])
    assert threshold_keep(per_channel)(score).tolist() == [[True, False, False, True], [False, False, False, True]]
    assert threshold_keep(0.0)(score).tolist() == (score > 0).tolist()


def test_chess_channel_thresholds_on_a_hand_worked_example():
    gate = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    up = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    # E[u²] = (1, 2); importance s²·E[u²] = [[1, 8], [9, 0.5]]; at 50% τ = 8 (third smallest),
    # so channel thresholds on |s| are √(8/1) and √(8/2) = 2.
    tau, per_channel = chess_thresholds(gate, up, 0.5, statistic="square")
    assert tau == 8.0 and torch.allclose(per_channel, torch.tensor([math.sqrt(8), 2.0]))
    assert threshold_keep(per_channel)(gate).tolist() == [[False, True], [True, False]]
    # The released code's statistic: |s|·E[|u|], E|u| = (1, 1): importance [[1, 2], [3, .5]], τ = 2.
    tau, per_channel = chess_thresholds(gate, up, 0.5, statistic="abs")
    assert tau == 2.0 and torch.allclose(per_channel, torch.tensor([2.0, 2.0]))
    tau, per_channel = chess_thresholds(gate, torch.zeros_like(up), 0.5)
    assert torch.isinf(per_channel).all()  # an up projection that is always zero: never kept


def _three_neuron_model(gated: bool = False) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=1, d_model=2, n_heads=1, d_head=2, d_mlp=3, n_ctx=4, d_vocab=5,
                                  act_fn="silu" if gated else "relu", gated_mlp=gated, seed=0, device="cpu")
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.blocks[0].mlp.W_out.copy_(torch.tensor([[0.1, 0.0], [0.0, 10.0], [1.0, 0.0]]))
        model.blocks[0].mlp.W_in.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
        if gated:
            model.blocks[0].mlp.W_gate.copy_(torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.0]]))
    return model


def test_describe_mlps_hooks_and_down_projection_norms():
    plain, gated = describe_mlps(_three_neuron_model())[0], describe_mlps(_three_neuron_model(gated=True))[0]
    assert (plain.gated, gated.gated, plain.act_fn, gated.act_fn) == (False, True, "relu", "silu")
    assert plain.hook_post == "blocks.0.mlp.hook_post" and plain.hook_pre_linear is None
    assert gated.hook_pre_linear == "blocks.0.mlp.hook_pre_linear"
    assert all(name in _three_neuron_model(True).hook_dict for name in (gated.hook_pre, gated.hook_pre_linear, gated.hook_post))
    assert plain.w_out.shape == (3, 2) and torch.allclose(plain.w_out_norms, torch.tensor([0.1, 10.0, 1.0]))
    # MLP-input weight norms: rows of W_in [d_model, d_mlp]; W_gate stacked on for gated MLPs.
    assert torch.allclose(plain.input_norms, torch.tensor([math.sqrt(5), 3.0]))
    assert torch.allclose(gated.input_norms, torch.tensor([math.sqrt(21), 3.0]))
    assert describe_mlps(tiny_model()) and len(describe_mlps(tiny_model())) == 2


def test_wina_prefers_the_entry_with_the_heavier_down_projection():
    site = describe_mlps(_three_neuron_model())[0]
    x1 = torch.tensor([[3.0, 1.0, 2.0]])
    score = WINA().score(site, "x1")(x1)
    assert torch.allclose(score, torch.tensor([[0.3, 10.0, 2.0]]))  # |x1_i|·‖W_out[:, i]‖
    assert topk_keep(1)(score).tolist() == [[False, True, False]]  # magnitude alone would keep neuron 0
    assert topk_keep(1)(x1.abs()).tolist() == [[True, False, False]]
    x = torch.tensor([[1.2, 1.0]])  # input norms (√5, 3): scores (2.68, 3)
    assert topk_keep(1)(WINA().score(site, "input")(x)).tolist() == [[False, True]]
    assert topk_keep(1)(x.abs()).tolist() == [[True, False]]


# --- lazy neurons ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lazy_model():
    """The tiny ReLU model with neuron 0 of layer 0 dead (pre = −1) and neuron 1 always on (pre = +1)."""
    model = tiny_model("relu")
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        mlp.W_in[:, :2] = 0.0
        mlp.b_in[0], mlp.b_in[1] = -1.0, 1.0
    return model


def test_lazy_stats_match_the_activations_and_find_dead_and_always_on_neurons(lazy_model):
    tokens = tiny_tokens(n_seq=12)
    stats = lazy_neuron_stats((lazy_model, tokens), eps=0.05)
    _, cache = lazy_model.run_with_cache(tokens)
    assert [s.layer for s in stats] == [0, 1]
    for s in stats:
        h = cache[f"blocks.{s.layer}.mlp.hook_post"].reshape(-1, 64)
        assert s.n_tokens == tokens.numel() and s.d_mlp == 64
        assert s.nonzero_fraction == pytest.approx(float((h != 0).double().mean()), abs=1e-9)
        assert s.positive_pre_fraction == pytest.approx(s.nonzero_fraction, abs=1e-9)  # ReLU: h ≠ 0 ⇔ pre > 0
        assert s.small_fraction == pytest.approx(float((h.abs() < 0.05).double().mean()), abs=1e-9)
        assert torch.allclose(s.frequency, (h > 0).float().mean(0), atol=1e-6)
        assert 0 < s.nonzero_fraction < 1 and s.nonzero_per_token_std > 0
    assert stats[0].dead.tolist() == [0] and stats[0].always_on.tolist() == [1]
    row = stats[0].table()
    assert row["dead_fraction"] == 1 / 64 and row["always_on_fraction"] == 1 / 64 and "small_fraction(eps=0.05)" in row


def test_lazy_stats_from_a_cache_equal_those_from_the_model(lazy_model, tmp_path):
    tokens = tiny_tokens(n_seq=12)
    hooks = [f"blocks.{layer}.mlp.{name}" for layer in (0, 1) for name in ("hook_pre", "hook_post")]
    cache_activations(lazy_model, tokens, hooks, tmp_path, dtype="float32", batch_size=4, shard_tokens=64, progress=False)
    from_cache = lazy_neuron_stats(ActivationCache.open(tmp_path))  # no model needed
    from_model = lazy_neuron_stats((lazy_model, tokens))
    for a, b in zip(from_cache, from_model, strict=True):
        assert a.table() == pytest.approx(b.table()) and torch.equal(a.frequency, b.frequency)
    capped = lazy_neuron_stats((lazy_model, tokens), max_tokens=100)
    assert capped[0].n_tokens == 100


def test_lazy_stats_of_a_gated_silu_mlp_use_the_gate():
    model, tokens = tiny_model("silu", gated=True), tiny_tokens(n_seq=8)
    stats = lazy_neuron_stats((model, tokens))
    _, cache = model.run_with_cache(tokens)
    gate = cache["blocks.1.mlp.hook_pre"].reshape(-1, 64)
    assert stats[1].positive_pre_fraction == pytest.approx(float((gate > 0).double().mean()), abs=1e-9)
    assert stats[1].nonzero_fraction == 1.0  # SiLU is never exactly zero


def test_cett_curve_matches_cett_at_each_threshold():
    from workbench.sparsity.cett import cett_curve

    generator = torch.Generator().manual_seed(3)
    x1 = torch.randn(300, 24, generator=generator).relu()
    w_out = torch.randn(24, 8, generator=generator)
    grid = torch.tensor([0.0, 0.1, 0.5, 1.0, 3.0, 100.0])
    curve = cett_curve(x1, w_out, grid, chunk_tokens=64)
    expected = torch.tensor([cett(x1, w_out, float(t)) for t in grid])
    torch.testing.assert_close(curve, expected.float(), rtol=1e-4, atol=1e-5)  # float32 vs float64
    assert curve[0] == 0 and curve[-1] == pytest.approx(1.0)
