"""CATS on a shipped zoo model (stdlib-relu, loaded offline): thresholds calibrated on some
validation rows hit the target sparsity on other, held-out rows."""

from __future__ import annotations

import pytest
import torch

import workbench
from workbench.cache import ActivationCache, cache_activations
from workbench.sparsity import CATS, describe_mlps

TOLERANCE = 0.01  # ±1 percentage point


@pytest.fixture(scope="module")
def relu():
    return workbench.load_model("stdlib-relu", device="cpu")


@pytest.fixture(scope="module")
def split():
    """Calibration and held-out rows: disjoint, drawn at random (seeded) from the validation split."""
    rows = workbench.load_tokens("stdlib", "val", n_tokens=64 * 128, seq_len=128)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
    return rows[order[:32]], rows[order[32:]]


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_cats_realises_the_target_on_held_out_tokens(relu, split, target):
    calibration, held_out = split
    thresholds = CATS().fit((relu, calibration), target, sequential=False)
    # The target asks for more than ReLU's own zeros (≈ 50–75% here): every threshold is above 0.
    assert all(float(t) > 0 for t in thresholds.values.values())
    assert all(abs(r - target) < 1e-3 for r in thresholds.realised.values())
    for layer in range(len(describe_mlps(relu))):  # each layer alone: its inputs are dense, as in calibration
        with torch.no_grad(), CATS().apply(relu, thresholds.select([layer])) as meter:
            relu(held_out, stop_at_layer=layer + 1)
        assert abs(meter.sparsity()[f"blocks.{layer}.mlp.x1"] - target) <= TOLERANCE, (layer, meter.sparsity())
    # All layers at once, the default fit (layer by layer on the sparsified model): the target still holds.
    sequential = CATS().fit((relu, calibration), target)
    with torch.no_grad(), CATS().apply(relu, sequential) as meter:
        relu(held_out)
    assert all(abs(value - target) <= TOLERANCE for value in meter.sparsity().values()), meter.sparsity()


def test_a_zoo_cache_alone_is_a_source(relu, split, tmp_path):
    calibration = split[0][:8]
    hooks = [site.hook_post for site in describe_mlps(relu)]
    cache_activations(relu, calibration, hooks, tmp_path, dtype="float32", batch_size=8, progress=False)
    from_cache = CATS().fit(ActivationCache.open(tmp_path), 0.85)  # the model is found by its zoo name
    from_model = CATS().fit((relu, calibration), 0.85, sequential=False)  # a cache holds dense activations
    assert from_cache.values.keys() == from_model.values.keys()
    assert all(torch.allclose(from_cache.values[k], from_model.values[k], rtol=1e-5) for k in from_model.values)
