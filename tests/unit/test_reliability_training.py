"""Reliability of SAE training: resumes are exact whatever the kill point, non-finite data is
caught, a resume checks it is the same run, training is reproducible under threads, a
finished run is not redone, and the gradient SAE refuses data without gradients.

A kill is simulated by raising ``_Killed`` (a BaseException, which no ``except Exception``
catches) in place of the N-th ``os.replace`` onto a given file name: every file the trainer
writes is committed by that rename, so this stops it exactly between two files (the
subprocess test tests/integration/test_kill_training.py sends real SIGKILLs).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.sae import ARCHITECTURES
from workbench.trainer import TrainConfig, train_sae, train_saes
from workbench.trainer.step import SAETrainer

D_IN, BATCH, STEPS = 16, 32, 8


class _Killed(BaseException):
    """Stands for SIGKILL."""


@contextlib.contextmanager
def _killed_at(monkeypatch, name: str, n: int):
    """Raise _Killed instead of the n-th os.replace onto a file called ``name``."""
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            calls.append(dst)
            if len(calls) == n:
                raise _Killed(str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        yield
    monkeypatch.setattr(os, "replace", real)


@pytest.fixture()
def count_steps(monkeypatch):
    """A list that grows by one per SAETrainer.step call."""
    calls, real = [], SAETrainer.step

    def step(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SAETrainer, "step", step)
    return calls


def _pairs(steps: int = STEPS, d_in: int = D_IN, batch: int = BATCH, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, g) batches of sparse combinations of 3·d_in directions, so every architecture learns."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(3 * d_in, d_in, generator=gen)
    out = []
    for _ in range(steps):
        codes = (torch.rand(batch, 3 * d_in, generator=gen) < 0.08) * torch.rand(batch, 3 * d_in, generator=gen)
        out.append((codes @ features + 0.01 * torch.randn(batch, d_in, generator=gen),
                    0.1 * torch.randn(batch, d_in, generator=gen)))
    return out


def _config(arch: str = "topk", **kw) -> TrainConfig:
    base = dict(d_sae=32, k=4, batch_size=BATCH, total_tokens=BATCH * STEPS, warmup_steps=2, log_every=2,
                checkpoint_every=2, device="cpu")
    return TrainConfig(architecture=arch, **{**base, **kw})


def _configs(**kw) -> list[TrainConfig]:
    return [_config(arch, **kw) for arch in ARCHITECTURES]


def _assert_identical(a, b):
    for one, other in zip(a, b):
        for name, tensor in one.state_dict().items():
            assert torch.equal(tensor, other.state_dict()[name]), (one.architecture, name)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads((folder / "metrics.json").read_text()) for folder in sorted(run_dir.iterdir())]


# --- 1. a sweep killed between two folders' checkpoints -------------------------------------
def test_a_sweep_killed_between_two_folders_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    data = _pairs()
    straight = train_saes(_configs(), data, run_dir=tmp_path / "a", progress=False)
    # Checkpoints at steps 2, 4, 6 (one file per SAE each): the (2n + 4)th write is the 4th
    # SAE's at step 6, so SAEs 0-2 are left at step 6 and the others at step 4.
    n = len(ARCHITECTURES)
    with _killed_at(monkeypatch, "checkpoint.safetensors", 2 * n + 4):
        train_saes(_configs(), data, run_dir=tmp_path / "b", progress=False)
    folders = sorted((tmp_path / "b").iterdir(), key=lambda f: int(f.name.split("-")[0]))
    assert [int(load_file(f / "checkpoint.safetensors")["counters"][0]) for f in folders] == [6, 6, 6] + [4] * (n - 3)
    resumed = train_saes(_configs(), data, run_dir=tmp_path / "b", progress=False)
    _assert_identical(straight, resumed)
    assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")  # the same steps and the same logged curve


def test_a_resume_given_less_data_than_its_checkpoints_is_refused(tmp_path, monkeypatch):
    data = _pairs()
    with _killed_at(monkeypatch, "checkpoint.safetensors", 2 * len(ARCHITECTURES) + 4):  # 3 SAEs at step 6
        train_saes(_configs(), iter(data), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"(?s)data ended after 4 batches.*step 6.*not the data the run started with"):
        train_saes(_configs(), iter(data[:4]), run_dir=tmp_path, progress=False)


# --- 2. NaN / inf ----------------------------------------------------------------------------
def _with_nan(data, batch: int, row: int, in_g: bool = False):
    data = [(x.clone(), g.clone()) for x, g in data]
    data[batch][1 if in_g else 0][row, 2] = float("nan") if not in_g else float("inf")
    return data


def test_nan_in_a_batch_stops_training_naming_it_and_keeps_the_checkpoint(tmp_path):
    data = [x for x, _ in _with_nan(_pairs(), batch=5, row=3)]
    with pytest.raises(FloatingPointError, match=r"(?s)batch 5 \(step 6\).*1 NaN/inf entries in x, in rows \[3\].*skip_nonfinite"):
        train_sae(_config(), data, run_dir=tmp_path, progress=False)
    checkpoint = load_file(str(tmp_path / "0-topk-k4-32" / "checkpoint.safetensors"))
    assert int(checkpoint["counters"][0]) == 4  # the last one before the bad batch, untouched
    assert all(torch.isfinite(t).all() for t in checkpoint.values() if t.is_floating_point())
    assert not (tmp_path / "0-topk-k4-32" / "sae.safetensors").exists()
    # skip_nonfinite may be turned on for the same run: it resumes past the batch and counts it.
    sae = train_sae(_config(skip_nonfinite=True), data, run_dir=tmp_path, progress=False)
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())
    [metrics] = _metrics(tmp_path)
    assert metrics["steps"] == STEPS and metrics["skipped_nonfinite"] == 1 and metrics["skipped_batches"] == [5]
    assert metrics["tokens"] == BATCH * (STEPS - 1)


def test_inf_in_the_gradients_stops_the_gradient_sae(tmp_path):
    data = _with_nan(_pairs(), batch=4, row=5, in_g=True)
    with pytest.raises(FloatingPointError, match=r"batch 4 .*NaN/inf entries in g, in rows \[5\]"):
        train_saes([_config("gradient"), _config("topk")], data, progress=False)
    # A sweep without the gradient SAE reads only x: the same batches train.
    train_sae(_config("topk"), data, progress=False)


def test_a_loss_that_overflows_is_caught_on_finite_data(tmp_path):
    data = [x for x, _ in _pairs()]
    data[5] = data[5] * 1e20  # finite, but its square overflows float32
    with pytest.raises(FloatingPointError, match=r"(?s)batch 5 \(step 6\), SAE 0-topk-k4-32: the loss .* is NaN/inf"):
        train_sae(_config(), data, run_dir=tmp_path, progress=False)
    sae = train_sae(_config(skip_nonfinite=True), data, progress=False)
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())


def test_nan_from_a_cache_names_the_hook_and_the_cache(tiny_cache, monkeypatch):
    real = tiny_cache.batches

    def poisoned(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                batch = batch.clone()
                batch[0, 0] = float("nan")
            yield batch

    monkeypatch.setattr(tiny_cache, "batches", poisoned)
    hook = tiny_cache.hooks[0]
    with pytest.raises(FloatingPointError, match=rf"batch 2 \(step 3\) of hook '{hook}' from the cache {tiny_cache.path}"):
        train_sae(_config(hook_name=hook, total_tokens=None), tiny_cache, progress=False)


# --- 3. a resume checks that it is the same run ---------------------------------------------
@pytest.mark.parametrize("change, expected", [
    ({"lr": 2e-3}, "lr 0.001 → 0.002"),
    ({"seed": 1}, "seed 0 → 1"),
    ({"data": 1}, "data: list of batches"),
])
def test_a_resume_with_other_settings_is_refused_saying_what_differs(tmp_path, monkeypatch, change, expected):
    data = _pairs()
    with _killed_at(monkeypatch, "checkpoint.safetensors", 2):
        train_sae(_config(lr=1e-3), data, run_dir=tmp_path, progress=False)
    change = dict(change)
    other = _pairs(seed=change.pop("data")) if "data" in change else data
    changed = _config(**{"lr": 1e-3, **change})
    with pytest.raises(ValueError, match=rf"(?s){expected}.*resume=False.*resume='force'"):
        train_sae(changed, other, run_dir=tmp_path, progress=False)
    # Deliberately: "force" continues the checkpoint; False trains from the start.
    train_sae(changed, other, run_dir=tmp_path, resume="force", progress=False)
    fresh = train_sae(changed, other, run_dir=tmp_path, resume=False, progress=False)
    _assert_identical([fresh], [train_sae(changed, other, progress=False)])
    [metrics] = _metrics(tmp_path)
    assert metrics["train_config"]["seed"] == change.get("seed", 0) and metrics["train_config"]["lr"] == change.get("lr", 1e-3)


def test_a_finished_run_with_other_settings_is_refused(tmp_path):
    train_sae(_config(), _pairs(), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"(?s)k=4 d_sae=32: warmup_steps 2 → 3.*resume=False"):
        train_sae(_config(warmup_steps=3), _pairs(), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="finished SAE has none left"):
        train_sae(_config(warmup_steps=3), _pairs(), run_dir=tmp_path, resume="force", progress=False)
    # Where and how often may change: a different checkpoint_every is the same run.
    train_sae(_config(checkpoint_every=0, log_every=5), _pairs(), run_dir=tmp_path, progress=False)


def test_the_data_fingerprint_is_recorded(tmp_path):
    rows = torch.cat([x for x, _ in _pairs()])
    train_sae(_config(), rows, run_dir=tmp_path / "tensor", progress=False)
    [metrics] = _metrics(tmp_path / "tensor")
    assert metrics["data"]["kind"] == "tensor" and metrics["data"]["shape"] == [BATCH * STEPS, D_IN]
    assert len(metrics["data"]["sha256"]) == 64
    train_sae(_config(), iter(rows.split(BATCH)), run_dir=tmp_path / "iterator", progress=False)
    [metrics] = _metrics(tmp_path / "iterator")
    assert metrics["data"]["sha256"] is None and "cannot be fingerprinted" in metrics["data"]["note"]


# --- 4. reproducible under threads ------------------------------------------------------------
def test_every_architecture_trains_bit_identically_twice_with_two_threads():
    """Sizes past torch's parallel grain (batch·k·d_in > 32768), so index gathers' backward
    runs on two threads: HierarchicalTopK's W_dec[indices] summed in a varying order there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = [x for x, _ in _pairs(steps=3, d_in=32, batch=256)]
        data = [(x, 0.1 * x.flip(0)) for x in data]
        configs = [TrainConfig(architecture=arch, d_sae=64, k=8, batch_size=256, total_tokens=256 * 3, warmup_steps=1,
                               device="cpu") for arch in ARCHITECTURES]
        _assert_identical(train_saes(configs, data, progress=False), train_saes(configs, data, progress=False))
    finally:
        torch.set_num_threads(threads)


# --- 5. the final save, and a rerun of a finished run ------------------------------------------
def test_a_kill_during_the_final_save_resumes_from_the_checkpoints(tmp_path, monkeypatch, count_steps):
    configs = _configs(total_tokens=BATCH * 7)  # last checkpoint at step 6: one step to redo
    straight = train_saes(configs, _pairs(), run_dir=tmp_path / "a", progress=False)
    with _killed_at(monkeypatch, "sae.safetensors", 2):  # the first SAE saved, the second not
        train_saes(configs, _pairs(), run_dir=tmp_path / "b", progress=False)
    stale = tmp_path / "b" / "0-batchtopk-k4-32" / ".metrics.json.x1y2z3.tmp"  # as a SIGKILLed writer leaves
    stale.write_text("{")
    count_steps.clear()
    resumed = train_saes(configs, _pairs(), run_dir=tmp_path / "b", progress=False)
    assert len(count_steps) == len(configs)
    _assert_identical(straight, resumed)
    assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")
    leftovers = [p.name for p in (tmp_path / "b").rglob("*") if p.name.endswith(".tmp") or "checkpoint" in p.name]
    assert not leftovers


def test_rerunning_a_finished_run_loads_it_without_training(tmp_path, count_steps):
    trained = train_saes(_configs(), _pairs(), run_dir=tmp_path, progress=False)
    count_steps.clear()
    again = train_saes(_configs(), _pairs(), run_dir=tmp_path, progress=False)
    assert not count_steps
    _assert_identical(trained, again)
    assert all(not sae.training for sae in again)


# --- 6. the gradient SAE needs gradients -------------------------------------------------------
def test_the_gradient_sae_refuses_data_without_gradients(tiny_cache):
    rows = torch.cat([x for x, _ in _pairs()])
    with pytest.raises(ValueError, match=r"gradient SAE \(0-gradient\).*needs \(x, g\) batches.*tensor holds activations only"):
        train_sae(_config("gradient"), rows, progress=False)
    with pytest.raises(ValueError, match=r"needs \(x, g\) batches, but batch 0 is a single tensor"):
        train_sae(_config("gradient"), list(rows.split(BATCH)), progress=False)
    hook = tiny_cache.hooks[0]
    with pytest.raises(ValueError, match=r"needs \(x, g\) batches, but the cache .* holds no gradients.*with_grads=True"):
        train_sae(_config("gradient", hook_name=hook, total_tokens=None), tiny_cache, progress=False)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A cache of one hook of the tiny random model, without gradients."""
    from tests.helpers.tiny import HOOKS, tiny_model, tiny_tokens
    from workbench.cache import ActivationCache, cache_activations

    path = tmp_path_factory.mktemp("cache")
    cache_activations(tiny_model(), tiny_tokens(), HOOKS[:1], path, batch_size=4, shard_tokens=64, progress=False)
    return ActivationCache.open(path)
