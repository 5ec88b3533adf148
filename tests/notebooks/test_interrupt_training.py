"""Kernel → Interrupt during training, in a real kernel: training stops (even when the
interrupt lands inside the live plot's redraw), a checkpoint is left, and running the same
cell again resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import queue
import time

import pytest
from jupyter_client.manager import start_new_kernel

SETUP = """
import time, torch, workbench as wb
from workbench.trainer import live
rows = torch.randn(64 * 60, 16, generator=torch.Generator().manual_seed(0))
configs = [wb.TrainConfig(architecture=a, d_sae=64, k=4, batch_size=64, total_tokens=rows.shape[0], log_every=2,
                          warmup_steps=2, device="cpu") for a in ("topk", "batchtopk")]
reference = wb.train_saes(configs, rows, progress=False, live_plot=False)
slow_redraw = live.LivePlot.update
def redraw_slowly(self, history):
    slow_redraw(self, history)
    time.sleep(0.5)  # the interrupt lands here, inside the redraw
live.LivePlot.update = redraw_slowly
"""
TRAIN = "saes = wb.train_saes(configs, rows, run_dir={run_dir!r}, progress=False)"
CHECK = """
import json
from safetensors.torch import load_file
same = all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for a, b in zip(saes, reference) for k in a.state_dict())
print("IDENTICAL" if same else "DIFFERENT")
"""


def _run(client, code: str, timeout: float = 300, interrupt_after_image=None):
    """Execute ``code``; return (reply content, outputs). Optionally interrupt once an image is shown."""
    msg_id = client.execute(code)
    outputs, deadline, interrupted = [], time.monotonic() + timeout, False
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout} s; outputs so far: {outputs}")
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind in ("display_data", "update_display_data", "stream", "error", "execute_result"):
            outputs.append((kind, content))
            if interrupt_after_image and not interrupted and kind in ("display_data", "update_display_data") \
                    and "image/png" in content.get("data", {}):
                time.sleep(0.1)  # inside redraw_slowly's sleep
                interrupt_after_image()
                interrupted = True
        if kind == "status" and content["execution_state"] == "idle":
            break
    while True:  # skip stale shell replies (a second kernel_info_reply from start-up, say)
        reply = client.get_shell_msg(timeout=30)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"], outputs


@pytest.fixture()
def kernel():
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        yield manager, client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_interrupt_stops_training_and_the_checkpoint_resumes(kernel, tmp_path):
    manager, client = kernel
    reply, outputs = _run(client, SETUP)
    assert reply["status"] == "ok", outputs
    run_dir = tmp_path / "run"
    reply, outputs = _run(client, TRAIN.format(run_dir=str(run_dir)), interrupt_after_image=manager.interrupt_kernel)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
    assert "checkpoint in" in reply["evalue"] and "run the same call again" in reply["evalue"], reply["evalue"]
    stopped_at = int(reply["evalue"].split("after step ")[1].split(";")[0])
    assert 0 < stopped_at < 60  # stopped early, not carried on to the end
    checkpoints = sorted(run_dir.glob("*/checkpoint.safetensors"))
    assert len(checkpoints) == 2 and not list(run_dir.glob("*/sae.safetensors"))
    assert any("image/png" in c.get("data", {}) for kind, c in outputs if kind != "stream")  # the live plot drew
    # Re-running the cell resumes and ends exactly where an uninterrupted run ends.
    reply, outputs = _run(client, TRAIN.format(run_dir=str(run_dir)) + "\n" + CHECK)
    assert reply["status"] == "ok", outputs
    printed = "".join(c.get("text", "") for kind, c in outputs if kind == "stream")
    assert "IDENTICAL" in printed, printed
    assert len(list(run_dir.glob("*/sae.safetensors"))) == 2 and not list(run_dir.glob("*/checkpoint.safetensors"))
