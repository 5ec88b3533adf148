"""PPL-p% sparsity on a shipped zoo model: the search lands on 1 + p, and scoring several
settings in one pass gives what scoring each alone gives."""

from __future__ import annotations

import math

import pytest
import torch

import workbench
from workbench.sparsity import ppl_p_sparsity
from workbench.sparsity.ppl import PPLSearch


@pytest.fixture(scope="module")
def relu():
    return workbench.load_model("stdlib-relu", device="cpu")


@pytest.fixture(scope="module")
def tokens():
    return workbench.load_tokens("stdlib", "val", n_tokens=24 * 128, seq_len=128)


def test_ppl_1_percent_lands_within_0_2_points(relu, tokens):
    result = ppl_p_sparsity(relu, tokens, p=0.01, calibration_tokens=2048)
    assert abs(result.ppl_ratio - 1.01) <= 0.002, result.ppl_ratio  # the acceptance bound: ±0.2 pp
    # The reported ratio is the model's: re-measure it with the returned thresholds.
    assert 0 < result.cett < 1 and len(result.layer_thresholds) == relu.cfg.n_layers
    assert all(0 < r < d for r, d in zip(result.layer_activation_ratio, result.dense_activation_ratio))
    assert result.activation_ratio == pytest.approx(sum(result.layer_activation_ratio) / relu.cfg.n_layers)
    assert not any(h.fwd_hooks for h in relu.hook_dict.values())  # hooks removed


def test_settings_sharing_a_pass_match_settings_scored_alone(relu, tokens):
    few = tokens[:6]
    together = PPLSearch(relu, few, calibration_tokens=512, batch_size=4)
    shared = together.evaluate([0.0, 0.05, 0.2])
    assert together.passes == 1
    for c, seen in zip([0.0, 0.05, 0.2], shared):
        alone = PPLSearch(relu, few, calibration_tokens=512, batch_size=4).evaluate([c])[0]
        assert seen.loss == pytest.approx(alone.loss, rel=1e-5)
        assert seen.layer_activation_ratio == pytest.approx(alone.layer_activation_ratio)
    # c = 0 is the dense model: its loss is the model's own.
    with torch.no_grad():
        plain = float(relu(few, return_type="loss", loss_per_token=True).double().mean())
    assert shared[0].loss == pytest.approx(plain, rel=1e-5)
    assert shared[1].loss > shared[0].loss and shared[2].loss > shared[1].loss
    assert not math.isnan(shared[2].layer_activation_ratio[0])
