"""PPL-p% sparsity on a shipped zoo model: the search lands on 1 + p on the calibration
tokens, the reported numbers come from disjoint held-out tokens, and scoring several
settings in one pass gives what scoring each alone gives."""

from __future__ import annotations

import math

import pytest
import torch

import workbench
from workbench.evals import model_loss
from workbench.sparsity import CETT, ppl_p_sparsity
from workbench.sparsity.ppl import PPLSearch


@pytest.fixture(scope="module")
def relu():
    return workbench.load_model("stdlib-relu", device="cpu")


@pytest.fixture(scope="module")
def split():
    rows = workbench.load_tokens("stdlib", "val", n_tokens=48 * 128, seq_len=128)
    return rows[:24], rows[24:]  # calibration, held-out evaluation: disjoint slices of one call


def test_ppl_1_percent_is_searched_on_calibration_and_reported_on_held_out_tokens(relu, split):
    calibration, evaluation = split
    result = ppl_p_sparsity(relu, evaluation, calibration, p=0.01, threshold_tokens=2048)
    assert result.held_out and result.n_eval_tokens == evaluation.numel() and result.n_calibration_tokens == calibration.numel()
    assert abs(result.search_ppl_ratio - 1.01) <= 0.002, result.search_ppl_ratio  # the acceptance bound: ±0.2 pp
    # The held-out ratio is the model's on the evaluation tokens: re-measure it with the same thresholds.
    method = CETT()
    thresholds = method.fit((relu, calibration[:16]), result.cett, sequential=False)
    thresholds.values = {f"blocks.{layer}.mlp.x1": torch.as_tensor(eps) / site_norms
                         for layer, (eps, site_norms) in enumerate(zip(result.layer_thresholds,
                                                                       [b.mlp.W_out.detach().norm(dim=1) for b in relu.blocks]))}
    with method.apply(relu, thresholds):
        sparse = model_loss(relu, evaluation)
    assert math.exp(sparse - model_loss(relu, evaluation)) == pytest.approx(result.ppl_ratio, rel=1e-5)
    low, high = result.ppl_ratio_ci
    assert low < result.ppl_ratio < high and high - low < 0.05
    assert 0 < result.cett < 1 and len(result.layer_thresholds) == relu.cfg.n_layers
    assert all(0 < r < d for r, d in zip(result.layer_activation_ratio, result.dense_activation_ratio))
    assert result.activation_ratio == pytest.approx(sum(result.layer_activation_ratio) / relu.cfg.n_layers)
    assert not any(h.fwd_hooks for h in relu.hook_dict.values())  # hooks removed


def test_overlapping_calibration_and_evaluation_tokens_are_refused(relu, split):
    calibration, evaluation = split
    with pytest.raises(ValueError, match="also occur in the evaluation tokens"):
        ppl_p_sparsity(relu, evaluation, torch.cat([calibration[:4], evaluation[:2]]))
    overlapping = workbench.load_tokens("stdlib", "val", n_tokens=8 * 128)  # load_tokens starts at the first row
    with pytest.raises(ValueError, match="disjoint slices"):
        PPLSearch(relu, overlapping).score(PPLSearch(relu, overlapping).solve(0.01, max_passes=1), calibration)


def test_settings_sharing_a_pass_match_settings_scored_alone(relu, split):
    few = split[0][:6]
    together = PPLSearch(relu, few, threshold_tokens=512, batch_size=4)
    shared = together.evaluate([0.0, 0.05, 0.2])
    assert together.passes == 1
    for c, seen in zip([0.0, 0.05, 0.2], shared):
        alone = PPLSearch(relu, few, threshold_tokens=512, batch_size=4).evaluate([c])[0]
        assert seen.loss == pytest.approx(alone.loss, rel=1e-5)
        assert seen.layer_activation_ratio == pytest.approx(alone.layer_activation_ratio)
    # c = 0 is the dense model: its loss is the model's own.
    with torch.no_grad():
        plain = float(relu(few, return_type="loss", loss_per_token=True).double().mean())
    assert shared[0].loss == pytest.approx(plain, rel=1e-5)
    assert shared[1].loss > shared[0].loss and shared[2].loss > shared[1].loss
    assert not math.isnan(shared[2].layer_activation_ratio[0])
