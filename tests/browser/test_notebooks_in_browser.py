"""Each notebook, opened in JupyterLab in headless Chromium and run with Run → Run All Cells,
shows no error, no unrendered widget, and a figure under every cell that plots; then its
interactive view answers one UI action with the expected change (``INTERACTIONS``), and
hostile token text typed into notebook 01's view renders as text, never as HTML.

Run alone:  WORKBENCH_QUICK=1 .venv/bin/python -m pytest -q tests/browser -x
Look at it: WORKBENCH_SCREENSHOTS=1 ... (copies screenshots to tests/browser/screenshots/)
Some only:  WORKBENCH_BROWSER_NOTEBOOKS=01,02 ...   Timeout per notebook: WORKBENCH_BROWSER_TIMEOUT_S
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time

import pytest

from .jupyterlab import NOTEBOOKS_DIR

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ALL_NOTEBOOKS = sorted(path.name for path in NOTEBOOKS_DIR.glob("0[1-9]_*.ipynb"))
# WORKBENCH_BROWSER_NOTEBOOKS=01,02 runs only those (03/04 take ~6 and ~10 min at quick size).
_ONLY = [p.strip() for p in os.environ.get("WORKBENCH_BROWSER_NOTEBOOKS", "").split(",") if p.strip()]
NOTEBOOKS = [name for name in ALL_NOTEBOOKS if not _ONLY or any(name.startswith(p) for p in _ONLY)]
# Per notebook. Measured on two busy CPU cores: 01 14 s, 02 34 s, 03 6 min, 04 10 min, 05 15 s.
TIMEOUT_S = float(os.environ.get("WORKBENCH_BROWSER_TIMEOUT_S", 1200))
# A call of a plotting function: wb.plot_token_losses(...), curves.plot_sparsing_law(...),
# paper_figure(...), plt.anything. An import of plot_x (no call) does not count.
PLOTS = re.compile(r"\b(?:\w+_)?plot_\w*\s*\(|\bpaper_figure\s*\(|\bplt\.")


def _code(source: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in source.splitlines())


def test_there_are_notebooks():
    assert len(ALL_NOTEBOOKS) >= 6, f"expected notebooks 01..06 under {NOTEBOOKS_DIR}, found {ALL_NOTEBOOKS}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(lab, name):
    stem = name.removesuffix(".ipynb")
    lab.open(name)
    seconds = lab.run_all(timeout_s=TIMEOUT_S)
    cells = lab.cells()
    page = lab.screenshot(stem)

    problems = []
    for cell in cells:
        plots = bool(PLOTS.search(_code(cell.source)))
        if cell.error or cell.placeholders or (plots and not cell.has_image):
            shot = lab.cell_screenshot(cell.index, f"{stem}-cell{cell.index}")
        if cell.error:
            problems.append(f"{cell.label()} raised (see {shot}):\n{cell.error[-2000:]}")
        if cell.placeholders:
            problems.append(f"{cell.label()} shows an unrendered widget {cell.placeholders} (see {shot}):\n{cell.text[-500:]}")
        if plots and not cell.has_image:
            problems.append(f"{cell.label()} calls a plotting function but shows no image (see {shot}):\n{cell.source}")
        if cell.execution_count is None and not any(c.error for c in cells[: cell.index]):
            problems.append(f"{cell.label()} did not run")

    assert not problems, (
        f"{name} in JupyterLab ({seconds:.0f} s): " + "\n\n".join(problems) + f"\n\nwhole-notebook screenshot: {page}"
    )
    interact = INTERACTIONS.get(stem[:2])
    if interact:
        interact(lab)
        lab.screenshot(f"{stem}-after-interaction")


HOSTILE = "x = '<img src=x onerror=alert(1)>' # <script>alert(2)</script>"


def _token_view(lab) -> None:
    """Notebook 01: typing re-runs the model; a click pins a token's details; markup stays text."""
    dialogs = []
    lab.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    lab.type(".wb-prompt", HOSTILE)
    lab.wait_for_text(".wb-token-view", "onerror", timeout_s=60)
    view = lab.locator(".wb-token-view")
    assert view.locator("img, script").count() == 0, "token text was rendered as HTML"
    shown = "".join(view.locator("span.wb-token").all_inner_texts())
    assert "<img" in shown and "<script>" in shown, shown  # the characters themselves, as text
    lab.click("span.wb-token[data-position='3']")
    lab.wait_for(".wb-token-view .wb-selected")
    lab.wait_for_text(".wb-token-detail", "layer 0", timeout_s=30)
    lab.page.wait_for_timeout(500)
    assert not dialogs, f"a script ran: {dialogs}"


def _activation_viewer(lab) -> None:
    """Notebook 02: another neuron in the box lists that neuron's top contexts."""
    before = lab.text(".wb-activation-viewer .wb-summary")
    lab.type(".wb-neuron", "7", submit=True)
    lab.wait_for_text(".wb-activation-viewer .wb-summary", "neuron 7", timeout_s=120)
    assert lab.text(".wb-activation-viewer .wb-summary") != before
    assert lab.page.locator(".wb-activation-viewer .wb-context").count() > 0
    lab.click(".wb-activation-viewer .wb-context .wb-token.wb-marked")
    lab.wait_for_text(".wb-activation-viewer .wb-token-detail", re.compile(r"\d"), timeout_s=60)


def _sparsity_explorer(lab) -> None:
    """Notebook 04: another method (CETT: its own targets) and another layer change the readout and figure."""
    readout = ".wb-sparsity-explorer .wb-readout"
    before, figure = lab.text(readout), lab.locator(".wb-sparsity-explorer img.wb-figure").get_attribute("src")
    lab.wait_for(".wb-sparsity-explorer .wb-method select").select_option("wina")
    lab.wait_for_text(readout, "wina", timeout_s=60)
    assert lab.text(readout) != before
    lab.page.wait_for_function(
        "src => document.querySelector('.wb-sparsity-explorer img.wb-figure').getAttribute('src') !== src", arg=figure,
        timeout=60_000)
    lab.click(".wb-sparsity-explorer button.wb-export")
    lab.wait_for_text(".wb-sparsity-explorer .wb-export-status", "wrote", timeout_s=60)


HOSTILE_PROMPT = "s = '<script>alert(3)</script>' + '<img src=x onerror=alert(4)>'"


# Click to rendered panel, timed in the page: from the click event (capture phase, before any
# handler) to the frame that paints the header naming the new feature (the header is set last,
# after every other panel). The driver's own time around click() is recorded too; it adds
# Playwright's actionability checks (scroll, stability, hit test: 100-250 ms here), which are
# not the dashboard's.
CLICK_TO_RENDER = """([selector, text]) => {
  window.__wbRendered = null;
  const header = document.querySelector(selector);
  document.addEventListener("click", () => {
    const clicked = performance.now();
    const observer = new MutationObserver(() => {
      if (!(header.textContent || "").includes(text)) return;
      observer.disconnect();
      // The frame that shows it: rAF runs before its paint, a task queued there runs after it.
      requestAnimationFrame(() => setTimeout(() => { window.__wbRendered = performance.now() - clicked; }));
    });
    observer.observe(header, {childList: true, subtree: true, characterData: true});
  }, {capture: true, once: true});
}"""


def _feature_browser(lab) -> None:
    """Notebook 05: typing a feature id shows that feature (its top context with the activating
    token marked); a related feature's button goes to it (click-to-render latency measured);
    a typed prompt shows its tokens, markup as text; export writes the figure."""
    dialogs = []
    lab.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    header = ".wb-feature-header"
    lab.type(".wb-feature", "5", submit=True)
    lab.wait_for_text(header, "feature 5 of", timeout_s=60)
    lab.wait_for(".wb-feature-contexts .wb-context .wb-token.wb-marked")
    top = lab.text(".wb-feature-contexts .wb-context")
    assert top.startswith("#1"), top  # the first line is the top context
    latencies, driver = [], []
    for _ in range(20):
        button = lab.locator(".wb-related-button button, button.wb-related-button")
        target = button.inner_text().split()[0]
        lab.page.evaluate(CLICK_TO_RENDER, [header, f"feature {target} of"])
        started = time.perf_counter()
        button.click()
        rendered = lab.page.wait_for_function("() => window.__wbRendered", timeout=30_000).json_value()
        driver.append(time.perf_counter() - started)
        latencies.append(rendered / 1000)
    lab.type(".wb-prompt-input", HOSTILE_PROMPT)
    lab.wait_for_text(".wb-prompt-features", "onerror", timeout_s=60)
    view = lab.locator(".wb-prompt-features")
    assert view.locator("img, script").count() == 0, "prompt text was rendered as HTML"
    shown = "".join(view.locator("span.wb-token").all_inner_texts())
    assert "<script>" in shown and "<img" in shown, shown
    lab.click(".wb-prompt-features span.wb-token[data-position='2']")
    lab.wait_for_text(".wb-prompt-features .wb-token-detail", "feature", timeout_s=30)
    lab.click("button.wb-export, .wb-export button")
    lab.wait_for_text(".wb-export-status", "saved", timeout_s=60)
    lab.page.wait_for_timeout(500)
    assert not dialogs, f"a script ran: {dialogs}"
    # For benchmarks/RESULTS.md (bench_features): click to rendered panel, in the browser.
    record = {"click_to_render_s": latencies, "median_s": statistics.median(latencies),
              "p95_s": sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)],
              "driver_click_to_header_s": driver}
    (lab.out_dir / "feature_switch_latency.json").write_text(json.dumps(record, indent=1))
    assert record["p95_s"] < 2.0, record  # a loose bound for a loaded CI machine; the benchmark reports the numbers


def _attention_browser(lab) -> None:
    """Notebook 05's second browser, over an attention-output SAE: the heads writing the
    feature are drawn, and the prompt view has the line of where the feature reads from."""
    scope = ".wb-attention-browser"
    lab.wait_for_text(f"{scope} .wb-feature-stats", "heads writing it", timeout_s=60)
    assert lab.locator(f"{scope} .wb-feature-stats").inner_text().count("head ") >= 2
    lab.wait_for_text(f"{scope} .wb-prompt-features", "reads from", timeout_s=60)
    lab.locator(f"{scope}").scroll_into_view_if_needed()


def _circuit_viewer(lab) -> None:
    """Notebook 06: the graph is drawn; lowering the node threshold in the slider's readout
    re-filters it; hovering a feature node shows its tokens; clicking it opens that feature
    in the feature browser below; export writes the figure."""
    summary = ".wb-circuit .wb-circuit-summary"
    lab.wait_for(".wb-circuit .wb-circuit-node[data-kind='feature']")
    nodes = lab.page.locator(".wb-circuit .wb-circuit-node")
    before = nodes.count()
    readout = lab.locator(".wb-circuit-node-threshold .widget-readout")
    readout.click()
    lab.page.keyboard.press("Control+A")
    lab.page.keyboard.type("0.15")  # lower than the notebook's 0.4: more nodes, whatever the size
    lab.page.keyboard.press("Enter")
    lab.wait_for_text(summary, "> 0.15", timeout_s=60)
    after = nodes.count()
    assert 0 < before < after, (before, after)
    node = lab.locator(".wb-circuit .wb-circuit-node[data-kind='feature']").first
    feature = node.get_attribute("data-node").split("|")[1]
    node.hover()
    lab.wait_for_text(".wb-circuit-tooltip", "fires on", timeout_s=30)
    assert f"feature {feature} of" in lab.text(".wb-circuit-tooltip")
    node.click()
    lab.wait_for_text(".wb-circuit-browser .wb-feature-header", f"feature {feature} of", timeout_s=60)
    lab.wait_for(".wb-circuit-browser .wb-feature-contexts .wb-context .wb-token.wb-marked")
    lab.click("button.wb-circuit-export, .wb-circuit-export button")
    lab.wait_for_text(".wb-circuit-status", "saved", timeout_s=60)


INTERACTIONS = {"01": _token_view, "02": _activation_viewer, "04": _sparsity_explorer,
                "05": lambda lab: (_feature_browser(lab), _attention_browser(lab)),
                "06": _circuit_viewer}
