"""Fixtures for the real-browser tests: one JupyterLab server and one Chromium per session, a
fresh browser context (and page) per test, kernels shut down after each test.

Screenshots go to the test's tmp_path/screenshots; with WORKBENCH_SCREENSHOTS=1 they are also
copied to tests/browser/screenshots/<test>/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

from contextlib import suppress

import pytest

from .jupyterlab import VIEWPORT, JupyterLabServer, Lab, launch_chromium, publish_screenshots, require_chromium

_TIMINGS: list[tuple[str, float]] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium (needs /usr/bin/chromium)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)  # lets the `lab` fixture see whether the test failed


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.section("JupyterLab Run All times (browser)")
        for name, seconds in _TIMINGS:
            terminalreporter.write_line(f"{seconds:8.1f} s  {name}")


@pytest.fixture(scope="session")
def chromium_executable():
    return require_chromium()


@pytest.fixture(scope="session")
def jupyterlab_server(chromium_executable, tmp_path_factory):
    with JupyterLabServer(tmp_path_factory.mktemp("jupyterlab")) as server:
        yield server


@pytest.fixture(scope="session")
def chromium(chromium_executable):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium_executable)
        try:
            yield browser
        finally:
            with suppress(Exception):
                browser.close()


@pytest.fixture()
def lab(jupyterlab_server, chromium, tmp_path, request):
    """A fresh page on the session's JupyterLab; see tests/browser/jupyterlab.py:Lab."""
    out_dir = tmp_path / "screenshots"
    context = chromium.new_context(viewport=dict(VIEWPORT), device_scale_factor=1)
    page = context.new_page()
    lab = Lab(jupyterlab_server, page, out_dir)
    try:
        yield lab
    finally:
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        if failed and not lab.screenshots:
            with suppress(Exception):
                lab.screenshot("failure")
        with suppress(Exception):
            context.close()
        with suppress(Exception):
            jupyterlab_server.shutdown_kernels()
        _TIMINGS.extend((f"{request.node.name}: {name}", seconds) for name, seconds in lab.timings.items())
        target = publish_screenshots(out_dir, request.node.name)
        if target is not None:
            print(f"screenshots copied to {target}")
