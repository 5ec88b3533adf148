"""Activation cache: exact round trip, gradients, resume, corruption, shuffling, distributed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.tiny import HOOKS, tiny_model, tiny_tokens
from tests.helpers.torchrun import run_two_processes
from workbench.cache import ActivationCache, CacheError, cache_activations
from workbench.cache.format import MANIFEST_FILE
from workbench.cache.writer import stop_layer

REPO = Path(__file__).resolve().parents[2]
STORED = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return tiny_tokens()


@pytest.fixture(scope="module")
def grad_cache(model, tokens, tmp_path_factory):
    path = tmp_path_factory.mktemp("grad_cache")
    cache_activations(model, tokens, HOOKS, path, with_grads=True, batch_size=4, shard_tokens=64, progress=False)
    return ActivationCache.open(path)


def _data_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.npy"))}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rows_equal_run_with_cache_at_the_stored_dtype(model, tokens, tmp_path, dtype):
    cache_activations(model, tokens, HOOKS, tmp_path, dtype=dtype, batch_size=4, shard_tokens=64, progress=False)
    cache = ActivationCache.open(tmp_path)
    _, reference = model.run_with_cache(tokens, names_filter=HOOKS)
    assert cache.n_tokens == tokens.numel() and cache.hooks == HOOKS
    for hook in HOOKS:
        expected = reference[hook].reshape(tokens.numel(), -1).to(STORED[dtype]).float()
        assert cache.d(hook) == expected.shape[1]  # hook_z is flattened to n_heads·d_head
        assert torch.equal(cache.activations(hook, torch.arange(cache.n_tokens)), expected)
    assert torch.equal(cache.tokens, tokens)


def test_gradients_equal_autograd(model, tokens, grad_cache):
    hook = "blocks.1.mlp.hook_post"
    for seq in (0, 17, 47):
        captured = {}
        with model.hooks(fwd_hooks=[(hook, lambda act, hook: captured.setdefault("act", act))]):
            loss = model(tokens[seq:seq + 1], return_type="loss", loss_per_token=True).sum()
        expected = torch.autograd.grad(loss, captured["act"])[0][0].half().float()
        rows = torch.arange(seq * 16, (seq + 1) * 16)
        x, g = grad_cache.activations(hook, rows, with_grads=True)
        assert torch.equal(g, expected)
        assert torch.equal(x, captured["act"][0].detach().half().float())


def test_stop_layer():
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.3.attn.hook_z"]) == 4
    assert stop_layer(["hook_embed"]) == 0
    assert stop_layer(["blocks.0.hook_resid_post", "ln_final.hook_normalized"]) is None


def test_epoch_yields_every_row_once_and_shuffles(grad_cache):
    hook = "blocks.0.hook_resid_post"
    everything = grad_cache.activations(hook, torch.arange(grad_cache.n_tokens))
    expected = sorted(map(tuple, everything.tolist()))
    for batch_size in (7, 64):
        epoch = torch.cat(list(grad_cache.batches(hook, batch_size, shuffle=True, seed=1, buffer_rows=1024)))
        assert sorted(map(tuple, epoch.tolist())) == expected
        assert not torch.equal(epoch, everything)  # not the identity order
    in_order = torch.cat(list(grad_cache.batches(hook, 100, shuffle=False)))
    assert torch.equal(in_order, everything)
    one = torch.cat(list(grad_cache.batches(hook, 50, seed=1)))
    two = torch.cat(list(grad_cache.batches(hook, 50, seed=2)))
    assert not torch.equal(one, two) and torch.equal(one, torch.cat(list(grad_cache.batches(hook, 50, seed=1))))


def test_shuffle_mixes_across_shards(tmp_path, model):
    tokens = tiny_tokens(n_seq=512)  # 8192 rows: 8 checksum blocks in 2 shards
    cache_activations(model, tokens, HOOKS[:1], tmp_path, batch_size=8, shard_tokens=4096, progress=False)
    cache = ActivationCache.open(tmp_path)
    assert len(cache.manifest["shards"]) == 2
    everything = cache.activations(HOOKS[0], torch.arange(cache.n_tokens))
    lookup = {tuple(row): i for i, row in enumerate(everything.tolist())}
    first = next(cache.batches(HOOKS[0], 512, seed=0, buffer_rows=4096))
    rows = np.array([lookup[tuple(r)] for r in first.tolist()])
    assert len(np.unique(rows // 1024)) >= 3  # one batch draws on several blocks...
    assert len(np.unique(rows // 4096)) == 2  # ...from both shards


def test_batches_pair_each_activation_with_its_own_gradient(grad_cache):
    hook = "blocks.0.hook_resid_post"
    x_all, g_all = grad_cache.activations(hook, torch.arange(grad_cache.n_tokens), with_grads=True)
    lookup = {tuple(row): i for i, row in enumerate(x_all.tolist())}
    x, g = next(grad_cache.batches(hook, 32, with_grads=True, seed=3))
    rows = [lookup[tuple(r)] for r in x.tolist()]
    assert torch.equal(g, g_all[rows])


def test_rerun_is_a_noop_and_other_inputs_are_refused(model, tokens, tmp_path):
    cache_activations(model, tokens, HOOKS, tmp_path, batch_size=4, shard_tokens=64, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.suffix == ".npy"}
    cache_activations(model, tokens, HOOKS, tmp_path, batch_size=4, shard_tokens=64, progress=False)
    assert before == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.suffix == ".npy"}
    with pytest.raises(CacheError, match="tokens_sha256"):
        cache_activations(model, tiny_tokens(seed=1), HOOKS, tmp_path, batch_size=4, shard_tokens=64, progress=False)
    other = tiny_model(act_fn="gelu")
    with pytest.raises(CacheError, match="model"):
        cache_activations(other, tokens, HOOKS, tmp_path, batch_size=4, shard_tokens=64, progress=False)


def test_bad_arguments_are_explained(model, tokens, tmp_path):
    with pytest.raises(ValueError, match="Did you mean"):
        cache_activations(model, tokens, ["blocks.0.hook_resid_pst"], tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_activations(model, tokens, HOOKS, tmp_path, dtype="int8")
    (tmp_path / "unrelated.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty"):
        cache_activations(model, tokens, HOOKS, tmp_path)
    with pytest.raises(CacheError, match="not an activation cache"):
        ActivationCache.open(tmp_path)


def test_corruption_is_reported_by_file_name(model, tokens, tmp_path):
    cache_activations(model, tokens, HOOKS, tmp_path, batch_size=4, shard_tokens=64, progress=False)
    victim = tmp_path / "shard_00002__blocks.1.mlp.hook_post.npy"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    cache = ActivationCache.open(tmp_path)  # same size: found when the block is read
    with pytest.raises(CacheError, match="shard_00002__blocks.1.mlp.hook_post.npy.*checksum"):
        list(cache.batches("blocks.1.mlp.hook_post", 16))
    with pytest.raises(CacheError, match="checksum"):
        cache.verify()
    victim.write_bytes(bytes(raw[:-100]))
    with pytest.raises(CacheError, match="shard_00002__blocks.1.mlp.hook_post.npy has .* bytes"):
        ActivationCache.open(tmp_path)


def test_overflow_and_nan_are_detected(tokens, tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.embed.W_E.mul_(1e6)  # residual values far beyond float16's 65504
    with pytest.raises(CacheError, match="NaN/inf.*float16"):
        cache_activations(model, tokens, ["blocks.0.hook_resid_post"], tmp_path, batch_size=4, progress=False)
    assert not [p for p in tmp_path.iterdir() if "shard_" in p.name]  # nothing half-written was kept


def _run_tiny(out: Path, *extra: str, background: bool = False):
    cmd = [sys.executable, "-m", "tests.helpers.tiny", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)


def test_kill_and_resume_gives_the_uninterrupted_cache(model, tokens, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    cache_activations(model, tokens, HOOKS, reference, with_grads=True, batch_size=4, shard_tokens=64, progress=False)
    job = _run_tiny(resumed, "--slow", "--grads", background=True)
    deadline = time.time() + 120
    while len(list(resumed.glob("shard_*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    written = len(list(resumed.glob("shard_*.json")))
    assert 2 <= written < 12, "the run should have been killed midway"
    cache_activations(model, tokens, HOOKS, resumed, with_grads=True, batch_size=4, shard_tokens=64, progress=False)
    assert _data_files(resumed) == _data_files(reference)
    assert not list(resumed.glob(".*tmp*"))
    ours = ActivationCache.open(resumed)
    assert ours.manifest["shards"] == ActivationCache.open(reference).manifest["shards"]


def test_two_process_distributed_equals_single_process(model, tokens, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    cache_activations(model, tokens, HOOKS, single, batch_size=4, shard_tokens=64, progress=False)
    run_two_processes("tests.helpers.tiny", str(multi))
    assert _data_files(multi) == _data_files(single)
    manifest = json.loads((multi / MANIFEST_FILE).read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 12
    a, b = ActivationCache.open(single), ActivationCache.open(multi)
    assert torch.equal(a.activations(HOOKS[2], torch.arange(a.n_tokens)), b.activations(HOOKS[2], torch.arange(b.n_tokens)))
