"""Shared fixtures. Tests run in quick mode (WORKBENCH_QUICK=1): small token counts."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WORKBENCH_QUICK", "1")


@pytest.fixture(scope="session")
def default_model():
    import workbench

    return workbench.load_model(workbench.DEFAULT_MODEL, device="cpu")


@pytest.fixture()
def offline_hub(monkeypatch):
    """Make the hub unreachable the way an offline machine sees it: its host does not resolve."""
    from workbench import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()
