"""Held-out reporting (disjoint token sets, bootstrap intervals) and the FLOP-weighted axis."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.data import check_disjoint
from workbench.evals import bootstrap_ratio_ci, model_loss, sequence_losses
from workbench.sparsity import describe_mlps
from workbench.sparsity.curves import sparsity_performance
from workbench.sparsity.flops import flops_skipped, layer_flops_skipped


def test_check_disjoint_refuses_shared_rows_and_warns_when_it_cannot_tell(caplog):
    rows = tiny_tokens(n_seq=10)
    check_disjoint(rows[:5], rows[5:])
    with pytest.raises(ValueError, match="2 of the 6 calibration sequences"):
        check_disjoint(rows[:6], rows[4:])
    check_disjoint(rows[:2, :8], rows[2:])
    assert "cannot check" in caplog.text


def test_sequence_losses_sum_to_the_model_loss():
    model, tokens = tiny_model(), tiny_tokens(n_seq=6)
    per_sequence = sequence_losses(model, tokens, batch_size=4)
    assert per_sequence.shape == (6,) and per_sequence.dtype == torch.float64
    assert float(per_sequence.sum()) / (6 * 15) == pytest.approx(model_loss(model, tokens), rel=1e-9)


def test_bootstrap_interval_of_the_perplexity_ratio():
    dense = torch.full((50,), 10.0, dtype=torch.float64)
    # Every sequence 0.1 nats worse over 10 tokens: the ratio is exactly e^0.01, no spread.
    low, high = bootstrap_ratio_ci(dense, dense + 0.1, tokens_per_sequence=10)
    assert low == pytest.approx(math.exp(0.01)) and high == pytest.approx(math.exp(0.01))
    # Noisy gaps: the interval brackets the point estimate and narrows with more sequences.
    gaps = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.1
    point = math.exp(float(gaps.mean()) / 10)
    wide = bootstrap_ratio_ci(torch.zeros(40, dtype=torch.float64), gaps[:40], 10)
    narrow = bootstrap_ratio_ci(torch.zeros(400, dtype=torch.float64), gaps, 10)
    assert narrow[0] < point < narrow[1]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_flops_skipped_weighs_each_tensor_by_the_work_it_saves():
    plain, gated = describe_mlps(tiny_model())[0], describe_mlps(tiny_model(act_fn="silu", gated=True))[0]
    # Plain MLP: W_in and W_out. Half of x1 dropped skips half of W_out: a quarter of the work.
    assert layer_flops_skipped(plain, {"x1": 0.5}) == pytest.approx(0.25)
    assert layer_flops_skipped(plain, {"input": 0.5, "x1": 0.5}) == pytest.approx(0.5)
    # Gated: W_gate, W_in, W_out. A dropped gate entry skips its up column and down row (2 of 3).
    assert layer_flops_skipped(gated, {"gate": 0.6}) == pytest.approx(0.4)
    assert layer_flops_skipped(gated, {"x1": 0.6}) == pytest.approx(0.2)
    assert layer_flops_skipped(gated, {"input": 0.3}) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="not gated"):
        layer_flops_skipped(plain, {"gate": 0.5})
    sites = describe_mlps(tiny_model())
    assert flops_skipped(sites, {"blocks.0.mlp.x1": 0.5}) == pytest.approx(0.125)  # one of two equal layers


def test_sparsity_performance_reports_tensors_flops_and_intervals_on_held_out_tokens():
    model = tiny_model(act_fn="silu", gated=True)
    rows = tiny_tokens(n_seq=24)
    table = sparsity_performance(model, rows[:16], rows[16:], methods=("cats", "teal"), targets=(0.5,), progress=False)
    cats, teal = table
    assert cats["gate_sparsity"] == pytest.approx(0.5, abs=0.05) and cats["input_sparsity"] is None
    assert cats["flops_skipped"] == pytest.approx(2 / 3 * cats["gate_sparsity"])
    assert teal["input_sparsity"] is not None and teal["x1_sparsity"] is not None
    assert teal["flops_skipped"] == pytest.approx((2 * teal["input_sparsity"] + teal["x1_sparsity"]) / 3)
    for row in table:
        assert row["ppl_ci_low"] <= row["ppl_ratio"] <= row["ppl_ci_high"]
    with pytest.raises(ValueError, match="also occur"):
        sparsity_performance(model, rows[:16], rows[8:], methods=("cats",), targets=(0.5,), progress=False)
