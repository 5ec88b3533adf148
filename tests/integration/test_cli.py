"""The command line: cache activations of the default model, then train SAEs on the cache."""

import subprocess
import sys
from pathlib import Path

import workbench

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "workbench", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_cache_then_train_from_the_command_line(tmp_path):
    out = _run("cache", "--model", "stdlib-gelu", "--hooks", "blocks.1.hook_resid_post", "blocks.0.mlp.hook_post",
               "--tokens", "16384", "--out", str(tmp_path / "cache"), "--grads", "--seq-len", "64")
    cache = workbench.ActivationCache.open(tmp_path / "cache")
    assert cache.n_tokens == 16384 and cache.has_grads and "ActivationCache(" in out
    assert cache.manifest["model"]["name"] == "stdlib-gelu"

    out = _run("train", "--cache", str(tmp_path / "cache"), "--hook", "blocks.1.hook_resid_post",
               "--architectures", "topk", "gradient", "--k", "8", "--d-sae", "256", "--batch-size", "512",
               "--out", str(tmp_path / "run"))
    assert "topk" in out and "gradient" in out and "FVU" in out
    for folder in ("0-topk-k8-256", "1-gradient-k8-256"):
        sae = workbench.sae.load(tmp_path / "run" / folder)
        assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.d_in == 128
        assert (tmp_path / "run" / folder / "metrics.json").exists()
