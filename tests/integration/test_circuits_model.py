"""Sparse feature circuits on the default model with its shipped SAEs: the built-in tasks are
solved, the SAE + error decomposition at all 12 modules leaves the model's metric unchanged,
and attribution estimates track exact patching on the real model."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.circuits import circuit_hooks, find_circuit, logit_diff, module_states, task_pairs, task_performance
from workbench.circuits.modules import join, split
from workbench.circuits.validation import patching_check

HOOKS = circuit_hooks(4)


@pytest.fixture(scope="module")
def saes():
    return {hook: wb.load_sae(f"stdlib-gelu/{hook}/topk-2048", device="cpu") for hook in HOOKS}


@pytest.mark.parametrize("task", ["brackets", "quotes"])
def test_built_in_tasks_are_templated_pairs_the_model_solves(default_model, task):
    pairs = task_pairs(task, default_model, n=128)
    assert len(pairs) == 128 and pairs.clean.shape == pairs.patch.shape
    differs = (pairs.clean != pairs.patch).sum(1)
    assert bool((differs == 1).all())  # one token changes, at one position for every pair
    assert len({int(p) for p in (pairs.clean != pairs.patch).float().argmax(1)}) == 1
    assert len(set(pairs.texts)) == 128
    # half the pairs swap the roles of the two answers: a constant preference scores 50%
    assert 0.4 < float((pairs.clean_answer == pairs.clean_answer[0]).float().mean()) < 0.6
    performance = task_performance(default_model, pairs)
    # measured 0.95 (brackets) and 0.98 (quotes) on 256 pairs: 0.85 leaves room for the sample
    assert performance["accuracy"] > 0.85, performance
    assert performance["logit_diff_clean"] > 2 and performance["logit_diff_patch"] < -2, performance


def test_error_nodes_make_the_decomposition_exact_on_the_default_model(default_model, saes):
    pairs = task_pairs("brackets", default_model, n=16)
    with torch.no_grad():
        clean = logit_diff(default_model(pairs.clean), pairs)
        hooks = [(hook, lambda x, hook: join(saes[hook.name], *split(saes[hook.name], x), x)) for hook in HOOKS]
        with default_model.hooks(fwd_hooks=hooks):
            rebuilt = logit_diff(default_model(pairs.clean), pairs)
        _, states = module_states(default_model, saes, pairs.clean)
    torch.testing.assert_close(rebuilt, clean, atol=1e-4, rtol=1e-4)
    for hook in HOOKS:  # and the error terms are not trivially zero: the SAEs do not reconstruct exactly
        assert float(states[hook][1].norm()) > 0


def test_attribution_tracks_exact_patching_on_the_default_model(default_model, saes):
    pairs = task_pairs("brackets", default_model, n=16, seed=1)
    circuit = find_circuit(default_model, saes, pairs, method="atp", node_threshold=0.2, per_position=True, progress=False)
    assert circuit.metric_clean > 2 and circuit.metric_patch < -2
    assert circuit.nodes() and circuit.edges
    check = patching_check(default_model, saes, pairs, per_module=4, steps=4, progress=False)
    # measured r ≥ 0.996 (AtP and IG, every module type) on 64 pairs; 0.9 is the bar a linear
    # approximation must clear on this model to be useful
    for kind, r in check.correlation.items():
        assert r["atp"] > 0.9 and r["ig"] > 0.9, (kind, r)
