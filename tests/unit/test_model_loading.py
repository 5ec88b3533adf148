import os
import subprocess
import sys

import pytest
import torch

import workbench
from workbench import hub


def test_zoo_lists_the_three_flavours():
    assert workbench.list_models() == ["stdlib-gelu", "stdlib-relu", "stdlib-swiglu"]
    assert workbench.DEFAULT_MODEL in workbench.list_models()


def test_pretrained_name_offline_fails_fast_naming_the_zoo(offline_hub):
    with pytest.raises(workbench.ModelUnavailableOffline) as err:
        workbench.load_model("gpt2-small")
    for name in workbench.list_models():
        assert name in str(err.value)


def test_offline_failure_is_fast_from_a_fresh_process():
    """Acceptance: under 10 s from `import workbench` to the error, in a new interpreter."""
    code = (
        "import time; t = time.perf_counter(); import workbench\n"
        "try:\n    workbench.load_model('gpt2-small')\n"
        "except workbench.ModelUnavailableOffline as e:\n    print(time.perf_counter() - t)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid"}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 10


def test_hf_hub_offline_switch_is_respected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    try:
        assert hub.hub_reachable() is False
    finally:
        hub.hub_reachable.cache_clear()


def test_typo_offline_suggests_the_zoo_name(offline_hub):
    with pytest.raises(workbench.ModelUnavailableOffline, match="Did you mean 'stdlib-gelu'"):
        workbench.load_model("stdlib-gelo")


def test_unknown_name_with_a_hub_is_checked_against_transformer_lens(monkeypatch):
    # The name check happens before any download, so pretending the hub answers is safe.
    monkeypatch.setattr("workbench.models.hub_reachable", lambda: True)
    with pytest.raises(ValueError, match="unknown model 'gpt2-smal'.*Did you mean 'gpt2-small'"):
        workbench.load_model("gpt2-smal")


def test_checkpoint_is_only_for_zoo_models():
    with pytest.raises(ValueError, match="only applies to offline zoo models"):
        workbench.load_model("gpt2-small", checkpoint="x.safetensors")


def test_best_device_is_usable():
    device = workbench.best_device()
    assert torch.zeros(1, device=device).device.type == device.type
