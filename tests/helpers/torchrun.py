"""Launch a test helper module under torchrun with 2 processes, on a free local port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_two_processes(module: str, *args: str, timeout: float = 300) -> None:
    """Run ``python -m module args`` as 2 torchrun workers; fail with their stderr if they fail.

    A hung rendezvous is killed with its whole process group rather than left behind."""
    with socket.socket() as probe:  # a free port for the rendezvous (port 0 is not accepted)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", module, *args]
    job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, stderr[-3000:]
