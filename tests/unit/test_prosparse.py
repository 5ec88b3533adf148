"""ProSparse (Song et al. 2024): the λ schedule, the ReLU/FATReLU swap, and a tiny training run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.sparsity.prosparse import FATReLU, ProSparseConfig, lambda_schedule, prosparse, schedule_stages, substitute_relu


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a shared machine its spin-waits
    make each step tens of times slower; the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# relu [0, 100) λ=0 · warmup [100, 200) λ=0.5 · stage 1 [200, 400) 0.5→1 · stage 2 [400, 800) 1→3 · hold [800, 900) λ=3
SCHEDULE = ProSparseConfig(relu_tokens=100, warmup_tokens=100, warmup_lambda=0.5, stages=((200, 1.0), (400, 3.0)),
                           hold_tokens=100)


@pytest.mark.parametrize("tokens, expected", [
    (0, 0.0), (99, 0.0),                                   # step 1: ReLU continual training, no L1
    (100, 0.5), (199, 0.5),                                # warmup stage: the constant λ_0
    (200, 0.5),                                            # stage 1 starts from the previous factor
    (200 + 200 / 3, 0.5 + 0.5 * 0.5),                      # sin(π/6) = 1/2 of the way at a third of the stage
    (300, 0.5 + 0.5 * math.sqrt(0.5)),                     # sin(π/4) at the middle: above the straight line
    (400, 1.0),                                            # stage 1's peak at its end
    (400 + 400 / 3, 1.0 + 2.0 * 0.5),
    (600, 1.0 + 2.0 * math.sqrt(0.5)),
    (800, 3.0), (850, 3.0), (900, 3.0), (10**9, 3.0),      # the last peak, held to the end and after
])
def test_lambda_schedule_by_hand(tokens, expected):
    assert lambda_schedule(tokens, SCHEDULE) == pytest.approx(expected, abs=1e-12)


def test_lambda_schedule_is_monotone_and_reaches_each_peak():
    grid = [lambda_schedule(t, SCHEDULE) for t in range(0, 1001)]
    assert all(b >= a for a, b in zip(grid, grid[1:]))
    assert lambda_schedule(399.999, SCHEDULE) == pytest.approx(1.0, abs=1e-6)  # approaches the peak smoothly
    assert lambda_schedule(400, SCHEDULE) == 1.0
    # Within a stage the rise is a quarter sine: steep at the start, flat at the peak.
    first, last = (lambda_schedule(210, SCHEDULE) - lambda_schedule(200, SCHEDULE),
                   lambda_schedule(400, SCHEDULE) - lambda_schedule(390, SCHEDULE))
    assert first > 10 * last
    stages = schedule_stages(SCHEDULE)
    assert [(s.name, s.start, s.end, s.lambda_start, s.lambda_end) for s in stages] == [
        ("relu", 0, 100, 0.0, 0.0), ("warmup", 100, 200, 0.5, 0.5), ("stage 1", 200, 400, 0.5, 1.0),
        ("stage 2", 400, 800, 1.0, 3.0), ("hold", 800, 900, 3.0, 3.0)]
    assert SCHEDULE.total_tokens == 900


def test_config_refuses_a_falling_factor_and_empty_stages():
    with pytest.raises(ValueError, match="non-decreasing"):
        ProSparseConfig(stages=((100, 2.0), (100, 1.0)))
    with pytest.raises(ValueError, match="below the factor"):
        ProSparseConfig(warmup_lambda=1.0, stages=((100, 0.5),))
    with pytest.raises(ValueError, match="positive token count"):
        ProSparseConfig(stages=((0, 1.0),))
    assert all(lam == 0 for _, lam in SCHEDULE.unregularized().stages) and SCHEDULE.unregularized().warmup_lambda == 0


def _x1(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(("mlp.hook_post", "mlp.hook_pre")))
    return cache


@pytest.mark.parametrize("act_fn, gated", [("gelu_new", False), ("silu", True)])
def test_relu_swap_zeroes_x1_and_keeps_the_weights(act_fn, gated):
    model, tokens = tiny_model(act_fn, gated), tiny_tokens(8, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _x1(model, tokens)
    substitute_relu(model)
    assert model.cfg.act_fn == "relu"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # b_in is 0 at init: nothing to fold
    swapped = _x1(model, tokens)
    for layer in range(model.cfg.n_layers):
        post, pre = swapped[f"blocks.{layer}.mlp.hook_post"], swapped[f"blocks.{layer}.mlp.hook_pre"]
        assert float((dense[f"blocks.{layer}.mlp.hook_post"] == 0).float().mean()) < 0.01
        assert float((post == 0).float().mean()) > 0.3  # exact zeros, where the (gate) pre-activation is ≤ 0
        assert torch.equal(post == 0, pre <= 0) if not gated else torch.all(post[pre <= 0] == 0)
        if not gated:
            assert torch.equal(post, F.relu(pre))


def test_gated_b_in_is_folded_into_b_out_without_changing_the_function():
    model, tokens = tiny_model("silu", gated=True), tiny_tokens(8, 16)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_in.normal_(0, 0.1)
    reference = copy.deepcopy(model)  # ReLU with b_in kept inside x1: the function the fold must preserve
    for block in reference.blocks:
        block.mlp.act_fn = F.relu
    substitute_relu(model)
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-4, atol=1e-4)
    for block, ref in zip(model.blocks, reference.blocks):
        assert torch.equal(block.mlp.b_in, torch.zeros_like(block.mlp.b_in)) and not block.mlp.b_in.requires_grad
        assert torch.equal(block.mlp.W_in, ref.mlp.W_in) and torch.equal(block.mlp.W_gate, ref.mlp.W_gate)
    assert float((_x1(model, tokens)["blocks.0.mlp.hook_post"] == 0).float().mean()) > 0.3


def test_fatrelu_zeroes_values_up_to_the_threshold():
    x = torch.tensor([-1.0, 0.0, 0.05, 0.1, 0.1001, 0.5, 2.0])
    assert torch.equal(FATReLU(0.1)(x), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1001, 0.5, 2.0]))
    assert torch.equal(FATReLU(0.0)(x), F.relu(x))
    with pytest.raises(ValueError):
        FATReLU(-0.1)
    model, tokens = tiny_model("relu"), tiny_tokens(8, 16)
    substitute_relu(model, threshold=0.1)
    cache = _x1(model, tokens)
    post, pre = cache["blocks.1.mlp.hook_post"], cache["blocks.1.mlp.hook_pre"]
    assert torch.equal(post, torch.where(pre > 0.1, pre, torch.zeros_like(pre)))
    assert bool(((pre > 0) & (pre <= 0.1)).any())  # the threshold had something to remove


TINY = dict(relu_tokens=256, warmup_tokens=256, warmup_lambda=0.5, stages=((768, 4.0), (768, 8.0)), hold_tokens=256,
            lr=1e-2, warmup_steps=2, batch_size=8, eval_tokens=256)


@pytest.mark.parametrize("act_fn, gated", [("gelu_new", False), ("silu", True)])
def test_l1_makes_a_tiny_model_sparser_than_the_same_training_without_it(act_fn, gated):
    model, tokens, val = tiny_model(act_fn, gated), tiny_tokens(48, 16), tiny_tokens(16, 16, seed=1)
    config = ProSparseConfig(**TINY)
    result = prosparse(model, config, tokens=tokens, val_tokens=val, progress=False)
    control = prosparse(model, config.unregularized(), tokens=tokens, val_tokens=val, progress=False)
    assert model.cfg.act_fn == act_fn and model.blocks[0].mlp.act_fn is not F.relu  # the input was copied, not changed

    sparse, dense = result.measurements["prosparse"], control.measurements["prosparse"]
    assert result.measurements["relu"].activation_ratio == control.measurements["relu"].activation_ratio
    # Measured: 0.07 vs 0.49 active (plain), 0.23 vs 0.51 (gated).
    assert sparse.activation_ratio < 0.6 * dense.activation_ratio, (sparse, dense)
    assert math.isfinite(sparse.val_loss)
    # The history follows the schedule, and L1 falls only where λ > 0.
    assert [r.lam for r in result.history] == [lambda_schedule(r.step * 128, config) for r in result.history]
    assert result.history[-1].l1 < 0.5 * control.history[-1].l1
    assert len(result.history) == config.total_tokens // 128 and result.history[-1].tokens_seen == config.total_tokens


def test_training_is_deterministic_and_fatrelu_is_measured():
    model, tokens, val = tiny_model("relu"), tiny_tokens(48, 16), tiny_tokens(16, 16, seed=1)
    config = ProSparseConfig(**{**TINY, "fatrelu_threshold": 0.05})
    first = prosparse(model, config, tokens=tokens, val_tokens=val, progress=False)
    second = prosparse(model, config, tokens=tokens, val_tokens=val, progress=False)
    assert first.history == second.history
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert list(first.measurements) == ["original", "relu", "prosparse", "fatrelu"]
    assert first.final is first.measurements["fatrelu"]
    assert first.final.activation_ratio < first.measurements["prosparse"].activation_ratio
    assert isinstance(first.model.blocks[0].mlp.act_fn, FATReLU)


def test_a_model_outside_the_zoo_needs_its_own_tokens():
    with pytest.raises(ValueError, match="tokens="):
        prosparse(tiny_model(), ProSparseConfig(**TINY), progress=False)
