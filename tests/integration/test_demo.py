"""The main job runs end to end (small sizes) and says what it did."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_stage(tmp_path):
    result = subprocess.run([sys.executable, "-m", "workbench", "demo", "--out", str(tmp_path)], cwd=REPO,
                            env={**os.environ, "WORKBENCH_QUICK": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = {line.split("]", 1)[0].lstrip("[") for line in result.stdout.splitlines() if line.startswith("[")}
    assert {"zoo", "model", "eval", "prompt", "figure", "cache", "sae", "features", "circuit", "sparsity", "done"} <= stages
    for arch in ("topk", "batchtopk", "matryoshka", "gradient", "hierarchical"):
        assert f"| {arch} |" in result.stdout
    assert (tmp_path / "demo_loss_per_token.pdf").exists() and (tmp_path / "demo_sae_comparison.pdf").exists()
    assert (tmp_path / "sparsity_performance.pdf").exists() and (tmp_path / "demo_feature.pdf").exists()
    assert (tmp_path / "demo_circuit.pdf").exists() and "held-out pairs" in result.stdout
    assert "top contexts, [activating token]:" in result.stdout
    assert "activation ratio at PPL-1% (searched on calibration tokens, measured on held-out ones): ReLU" in result.stdout
    assert "[prosparse]" in result.stdout
