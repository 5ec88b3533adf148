"""SIGKILL a caching run at points chosen by a fixed seed (during set-up, in the middle of a
shard, between a file's write and its rename, during the manifest's write), rerun, and get
the cache an uninterrupted run writes, byte for byte. Also: a full disk is an OSError, not
a dead process.

One subprocess imports torch once and forks a child per run to kill (a fresh interpreter
per kill would cost ~10 s each); each child arms one library function to SIGKILL the
process at its N-th call. The library has no test hooks.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import HOOKS, tiny_model, tiny_tokens
from workbench.cache import ActivationCache, cache_activations

REPO = Path(__file__).resolve().parents[2]
ARGS = dict(with_grads=True, batch_size=4, shard_tokens=128, progress=False)  # 6 shards of 2 batches
SEED = 20240611
# What a kill can be armed on: (module, function). The shard writer's batch store is where a
# shard's files are half written; mkstemp and os.replace bracket every file's write.
TARGETS = {"mkstemp": ("tempfile", "mkstemp"), "replace": ("os", "replace"),
           "store": ("workbench.cache.writer", "_to_storage_checked")}

SERVER = r"""
import importlib, json, os, signal, sys, traceback
import torch
torch.set_num_threads(1)  # no OpenMP pool in the parent: forking stays safe
from tests.helpers.tiny import HOOKS, tiny_model, tiny_tokens
from workbench.cache import cache_activations

ARGS, TARGETS = json.loads(sys.argv[1]), json.loads(sys.argv[2])
model, tokens = tiny_model(), tiny_tokens()

def arm(kind, n):
    # mkstemp: die just after the temporary file exists; the others: just before the call.
    module, name = importlib.import_module(TARGETS[kind][0]), TARGETS[kind][1]
    real, calls = getattr(module, name), [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and kind != "mkstemp":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, wrapper)

def run(folder, kill, **overrides):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if kill:
                arm(*kill)
            cache_activations(model, tokens, HOOKS, folder, **{**ARGS, **overrides})
        except OSError as err:
            print(f"child: {err!r}", file=sys.stderr)
            code = 3
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"

jobs = json.loads(sys.stdin.read())
outcomes = {folder: [run(folder, kill) for kill in kills] for folder, kills in jobs["kills"].items()}
if jobs["full_disk"]:  # one big float32 shard: files are created sparse, then filled
    outcomes[jobs["full_disk"]] = [run(jobs["full_disk"], None, dtype="float32", shard_tokens=4096, with_grads=False)]
print(json.dumps(outcomes))
"""


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _count_calls(model, tokens, folder: Path, monkeypatch) -> dict[str, int]:
    """Calls of each function the server arms, in one uninterrupted run."""
    counts = dict.fromkeys(TARGETS, 0)
    for kind, (module, name) in TARGETS.items():
        module = importlib.import_module(module)

        def counting(*args, _real=getattr(module, name), _kind=kind, **kwargs):
            counts[_kind] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    cache_activations(model, tokens, HOOKS, folder, **ARGS)
    monkeypatch.undo()
    return counts


def _kill_plan(counts: dict[str, int]) -> dict[str, list[list]]:
    """Runs to kill, by folder name: fixed points for the set-up and the last manifest write,
    the rest drawn with a fixed seed (shard writes happen between set-up and manifest)."""
    rng = random.Random(SEED)
    return {
        "setup-tokens-temp": [["mkstemp", 1]],  # tokens.npy's temporary file is created, empty
        "setup-before-config": [["replace", 2]],  # tokens.npy is in place, the config is not
        "mid-shard-a": [["store", rng.randint(1, counts["store"])]],
        "mid-shard-b": [["store", rng.randint(1, counts["store"])]],
        "rename-a": [["replace", rng.randint(3, counts["replace"] - 1)]],
        "rename-b": [["replace", rng.randint(3, counts["replace"] - 1)]],
        "temp-file": [["mkstemp", rng.randint(2, counts["mkstemp"] - 1)]],
        "last-manifest-temp": [["mkstemp", counts["mkstemp"]]],
        "last-manifest-rename": [["replace", counts["replace"]]],
        # killed again while resuming (the second point may lie past the resumed run's end)
        "twice": [["store", rng.randint(1, counts["store"])], ["replace", rng.randint(1, 12)]],
    }


@pytest.fixture(scope="module")
def single_thread():
    """Same thread count as the forked children, so float results agree to the bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 64 KiB tmpfs: room for the set-up and for creating the first shard's files, not
    for filling them (with a memory map, that was a SIGBUS). Needs root."""
    mount = tmp_path_factory.mktemp("small_disk")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        yield None
        return
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, single_thread, small_disk):
    """(model, tokens, reference folder, plan, outcomes, server's stderr) once the server ran
    every planned kill (and the full-disk run, where a small disk could be mounted)."""
    root = tmp_path_factory.mktemp("kills")
    model, tokens = tiny_model(), tiny_tokens()
    counts = _count_calls(model, tokens, root / "reference", pytest.MonkeyPatch())
    plan = {str(root / name): kills for name, kills in _kill_plan(counts).items()}
    jobs = {"kills": plan, "full_disk": str(small_disk / "cache") if small_disk else None}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SERVER, json.dumps(ARGS), json.dumps(TARGETS)], input=json.dumps(jobs), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return model, tokens, root / "reference", plan, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_kills_at_seeded_points_then_rerun_give_the_uninterrupted_cache(killed_runs):
    model, tokens, reference, plan, outcomes, stderr = killed_runs
    expected = _snapshot(reference)
    for folder, kills in plan.items():
        assert outcomes[folder][0] == "signal 9", f"{Path(folder).name}: {kills} did not kill the run: {outcomes[folder]}\n{stderr[-2000:]}"
        cache_activations(model, tokens, HOOKS, folder, **ARGS)
        assert _snapshot(Path(folder)) == expected, f"{Path(folder).name}: killed at {kills}"
        ActivationCache.open(folder).verify()


def test_full_disk_is_an_oserror_not_a_dead_process(killed_runs, small_disk):
    if small_disk is None:
        pytest.skip("mounting a small tmpfs needs root")
    *_, outcomes, stderr = killed_runs
    assert outcomes[str(small_disk / "cache")] == ["exit 3"], stderr[-2000:]  # SIGBUS was 'signal 7'
    assert "No space left on device" in stderr
    assert not [p.name for p in (small_disk / "cache").iterdir() if p.name.startswith(".shard_")]
