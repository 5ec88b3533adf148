"""SIGKILL a sweep of every SAE architecture at points chosen by a fixed seed — mid-step,
mid-write, between two folders' checkpoints, during the final save, during the cleanup —
rerunning the same call after each kill, and check that the end result is bit-identical to
an uninterrupted run's, with nothing left over in the run folder.

The training runs in a subprocess (the script below) that kills itself with
``os.kill(os.getpid(), SIGKILL)`` at the N-th event of a chosen kind, the events being
observed by wrapping, in the script only, the calls every trainer write goes through:
writing a temporary file's bytes, renaming it into place (os.replace), deleting (os.unlink),
and each SAE's step. Every event is also logged, so the test sees what each run did.

Two chains of kills, each run to completion and compared: kills during training, then kills
at the end. (One chain would hide faults of the first kind: a kill in the final save that
restarts every SAE from step 0 also erases whatever a bad resume did before it.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from workbench.sae import ARCHITECTURES

REPO = Path(__file__).resolve().parents[2]
STEPS = 11  # checkpoints every 2 steps: the last at step 10, so a kill in the final save redoes one step

SCRIPT = r'''
import os, signal, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.set_num_threads(2)
run_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
kind, part, n = (os.environ["KILL_AT"].split(":") if os.environ.get("KILL_AT") else (None, None, 0))
seen = [0]
events = open(out + ".events", "w")


def event(what, name):
    """Log the event; kill this process at the n-th of the chosen kind whose file name contains part."""
    events.write(f"{what} {name}\n")
    events.flush()
    if what == kind and part in name:
        seen[0] += 1
        if seen[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)


real_replace, real_unlink, real_fdopen = os.replace, os.unlink, os.fdopen


def replace(src, dst, *args, **kwargs):
    event("replace", Path(dst).name)
    return real_replace(src, dst, *args, **kwargs)


def unlink(path, *args, **kwargs):
    event("unlink", Path(path).name)
    return real_unlink(path, *args, **kwargs)


class HalfWritten:
    """A file whose write puts down half the bytes, then meets the kill (if it is the chosen one)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, payload):
        name = Path(os.readlink(f"/proc/self/fd/{self.handle.fileno()}")).name
        if kind == "write" and part in name and seen[0] + 1 == int(n):
            self.handle.write(payload[: len(payload) // 2])
            self.handle.flush()
        event("write", name)
        return self.handle.write(payload)

    def __getattr__(self, attr):
        return getattr(self.handle, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def fdopen(fd, *args, **kwargs):
    return HalfWritten(real_fdopen(fd, *args, **kwargs))


os.replace, os.unlink, os.fdopen = replace, unlink, fdopen

from workbench.sae import ARCHITECTURES
from workbench.trainer import TrainConfig, train_saes
from workbench.trainer.step import SAETrainer

real_step = SAETrainer.step


def step(self, *args, **kwargs):
    event("step", self.sae.architecture)
    return real_step(self, *args, **kwargs)


SAETrainer.step = step

gen = torch.Generator().manual_seed(0)
features = torch.randn(48, 16, generator=gen)
data = []
for _ in range(steps):
    codes = (torch.rand(64, 48, generator=gen) < 0.08) * torch.rand(64, 48, generator=gen)
    data.append((codes @ features + 0.01 * torch.randn(64, 16, generator=gen), 0.1 * torch.randn(64, 16, generator=gen)))
configs = [TrainConfig(architecture=arch, d_sae=32, k=4, batch_size=64, total_tokens=64 * steps, warmup_steps=2,
                       log_every=2, checkpoint_every=2, device="cpu") for arch in ARCHITECTURES]
saes = train_saes(configs, data, run_dir=run_dir, progress=False)
save_file({f"{i}.{key}": value.contiguous() for i, sae in enumerate(saes) for key, value in sae.state_dict().items()}, out)
'''

# Each rerun is killed at the N-th event of a kind (N drawn from the range by a fixed seed),
# in this order; every range is one the rerun reaches, given where the previous one stopped.
KILLED_TRAINING = [
    ("step", "", (6, 40)),  # mid-sweep: some SAEs have stepped on a batch, others not
    ("write", "checkpoint", (1, 5)),  # half a checkpoint's bytes written to its temporary file
    ("replace", "checkpoint", (2, 4)),  # between two folders' checkpoints: the SAEs end at different steps
]
KILLED_FINISHING = [
    ("replace", "sae.safetensors", (2, 5)),  # the final save, between two folders
    ("unlink", "checkpoint", (1, 9)),  # deleting the checkpoints, every SAE saved
]


def _run(tmp_path: Path, run_dir: Path, name: str, kill: str | None = None) -> list[str]:
    """Run the script to its end (or to the kill, which must come); return its events."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "WORKBENCH_QUICK": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    env.pop("KILL_AT", None)
    if kill:
        env["KILL_AT"] = kill
    out = tmp_path / f"{name}.safetensors"
    result = subprocess.run([sys.executable, str(script), str(run_dir), str(out), str(STEPS)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if kill else 0
    assert result.returncode == expected, f"{name} {kill or ''}: exit {result.returncode}, {result.stderr[-3000:]}"
    return Path(f"{out}.events").read_text().splitlines()


def _kill_in_turn(tmp_path: Path, run_dir: Path, kills, rng: random.Random) -> list[list[str]]:
    return [_run(tmp_path, run_dir, f"{run_dir.name}-{i}", f"{kind}:{part}:{rng.randint(low, high)}")
            for i, (kind, part, (low, high)) in enumerate(kills)]


def _assert_same_as_reference(tmp_path: Path, run_dir: Path, name: str) -> None:
    expected, got = load_file(str(tmp_path / "reference.safetensors")), load_file(str(tmp_path / f"{name}.safetensors"))
    assert expected.keys() == got.keys() and len({key.split(".")[0] for key in got}) == len(ARCHITECTURES)
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{run_dir.name}: {key}"
    reference = tmp_path / "reference"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in reference.iterdir())
    for folder in sorted(reference.iterdir()):
        resumed = run_dir / folder.name
        assert sorted(p.name for p in resumed.iterdir()) == ["cfg.json", "metrics.json", "sae.safetensors"]  # no .tmp
        saved, fresh = load_file(str(resumed / "sae.safetensors")), load_file(str(folder / "sae.safetensors"))
        assert all(torch.equal(saved[key], fresh[key]) for key in fresh), folder.name
        assert json.loads((resumed / "metrics.json").read_text()) == json.loads((folder / "metrics.json").read_text())


def test_a_sweep_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    _run(tmp_path, tmp_path / "reference", "reference")
    rng = random.Random(20251202)

    _kill_in_turn(tmp_path, tmp_path / "training", KILLED_TRAINING, rng)
    _run(tmp_path, tmp_path / "training", "training-done")
    _assert_same_as_reference(tmp_path, tmp_path / "training", "training-done")

    _, after_save_kill = _kill_in_turn(tmp_path, tmp_path / "finishing", KILLED_FINISHING, rng)
    # The rerun after the kill in the final save resumed from the checkpoints of step 10:
    # one step per SAE, not a restart from step 0.
    assert sum(line.startswith("step ") for line in after_save_kill) == len(ARCHITECTURES)
    done = _run(tmp_path, tmp_path / "finishing", "finishing-done")
    assert not any(line.startswith("step ") for line in done)  # found finished: loaded, not trained
    _assert_same_as_reference(tmp_path, tmp_path / "finishing", "finishing-done")
