"""Drive JupyterLab in a real browser: Debian's system Chromium through Python Playwright.

Three pieces, used by tests/browser/conftest.py:

- ``require_chromium()``: the system browser's path. When it is missing the test is skipped with
  a loud reason, except under ``CI=true`` where it fails and says to ``apt-get install chromium``
  (``playwright install`` downloads its own browser, which does not work offline).
- ``JupyterLabServer``: a context manager that runs ``jupyter lab`` from the repository's
  ``.venv`` on a free loopback port with a random token. Its root is a temporary *copy* of
  ``notebooks/`` (figures go to a temporary folder too), kernels run with ``WORKBENCH_QUICK=1``,
  and on exit, failure included, the server's process group and every kernel it started are
  killed within bounded waits.
- ``Lab``: one browser page on that server with one-line helpers::

      lab.open("01_explore_model.ipynb")
      lab.run_all(timeout_s=900)
      lab.type(".wb-prompt", "def f(x):")          # a container resolves to its <textarea>/<input>
      lab.wait_for_text(".wb-token-view", "def")   # substring or re.Pattern
      lab.click(".wb-token-view span.wb-token >> nth=0")
      lab.screenshot("01-after-click")             # whole notebook, not just the viewport
      cells = lab.cells()                          # per code cell: text, images, errors, widgets
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
SCREENSHOTS_DIR = Path(__file__).resolve().parent / "screenshots"  # only with WORKBENCH_SCREENSHOTS
CHROMIUM = Path(os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}
MAX_SCREENSHOT_HEIGHT = 24_000  # px; a taller notebook is cut at the bottom (and says so)

# Text that means a widget did not render: the text/plain fallback of an Output widget, the
# widget manager's placeholder, or its error box.
WIDGET_PLACEHOLDERS = ("Output()", "Loading widget", "Error displaying widget")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_chromium() -> Path:
    """The system Chromium, or skip loudly (fail under CI=true) when it or playwright is absent."""
    problem = hint = None
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        problem = f"{CHROMIUM} not found"
        hint = "install Debian's browser with `apt-get install chromium` (as root `make test` does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as error:
            problem = f"the playwright package is missing ({error})"
            hint = "install it with `pip install playwright` (no `playwright install` needed)"
    if problem is None:
        return CHROMIUM
    message = f"BROWSER TEST NOT RUN: {problem}; {hint}."
    if in_ci():
        pytest.fail(f"{message} CI=true, so a missing browser fails the suite instead of skipping.", pytrace=False)
    print(f"\n*** {message} ***", file=sys.stderr)
    pytest.skip(message)


def venv_python() -> Path:
    """The repository's .venv interpreter (the server's, hence the kernel's), else the current one."""
    candidate = REPO_ROOT / ".venv" / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_chromium(playwright, executable: Path = CHROMIUM):
    """Headless system Chromium with the flags the design notes list."""
    return playwright.chromium.launch(executable_path=str(executable), headless=True, args=CHROMIUM_ARGS)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

# User settings for a clean, quiet JupyterLab: no news/update toasts over the screenshots, and
# every cell attached to the DOM (the default windowing mode skips offscreen cells' rendering).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


class JupyterLabServer:
    """``jupyter lab`` on 127.0.0.1:<free port> with a random token, rooted at a copy of notebooks/."""

    def __init__(self, workdir: Path, notebooks: Path = NOTEBOOKS_DIR, startup_timeout_s: float = 120, env: dict | None = None):
        self.workdir = Path(workdir)
        self.notebooks = Path(notebooks)
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = dict(env or {})
        self.root = self.workdir / "root"
        self.runtime_dir = self.workdir / "runtime"
        self.log_path = self.workdir / "jupyterlab.log"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None
        self._log = None
        self._restore_sigterm = False

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "JupyterLabServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        shutil.copytree(self.notebooks, self.root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "figures"))
        dirs = {name: self.workdir / name for name in ("config", "data", "settings", "workspaces", "figures")}
        for path in [*dirs.values(), self.runtime_dir]:
            path.mkdir(parents=True, exist_ok=True)
        for relative, values in LAB_SETTINGS.items():
            target = dirs["settings"] / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values))
        python = venv_python()
        env = {
            **os.environ,
            "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "WORKBENCH_QUICK": "1",  # kernels run the notebooks' small sizes
            "WORKBENCH_FIGURES": str(dirs["figures"]),  # save_figure writes here, not into the repo
            # Isolated Jupyter state: no user kernelspecs (a user-level `python3` pointing at another
            # interpreter would shadow the .venv one), no saved workspaces, and a runtime dir of our
            # own, so every kernel we start can be found by its connection file at shutdown.
            "JUPYTER_CONFIG_DIR": str(dirs["config"]),
            "JUPYTER_DATA_DIR": str(dirs["data"]),
            "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
            "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
            "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        for name in ("JUPYTER_TOKEN", "JUPYTER_PATH", "MPLBACKEND"):
            env.pop(name, None)
        command = [
            str(python), "-m", "jupyterlab",
            "--no-browser", "--ip=127.0.0.1", f"--port={self.port}", "--port-retries=0",
            f"--ServerApp.token={self.token}", "--allow-root",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.terminals_enabled=False",
            "--MappingKernelManager.default_kernel_name=python3",
            # window.jupyterapp: run commands and read kernel/cell state without scraping.
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")
        self._exit_on_sigterm()
        # Own process group: stop() can kill the server and anything it spawned in one signal.
        # If this process dies without running stop() (SIGKILL), the kernel kills the server too
        # (PR_SET_PDEATHSIG), and ipykernel exits when its parent server is gone.
        self.process = subprocess.Popen(
            command, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        self._wait_until_up()
        specs = self.api("GET", "api/kernelspecs")
        if "python3" not in specs.get("kernelspecs", {}):
            raise RuntimeError(f"JupyterLab has no python3 kernel: {sorted(specs.get('kernelspecs', {}))}")

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            with suppress(OSError, urllib.error.URLError, ValueError):
                self.api("GET", "api/status", timeout=2)
                return
            time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer within {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut kernels down, then the server's process group; kill whatever is left. Bounded."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                with suppress(Exception):
                    self.shutdown_kernels(timeout=5)
                self._signal_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._signal_group(process, signal.SIGKILL)
                    with suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=10)
            self._signal_group(process, signal.SIGKILL)  # stragglers in the group, if any
        # jupyter_client starts each kernel in a session of its own, out of the server's group:
        # find them by their connection file, which lives in our private runtime dir.
        for pid in _pids_mentioning(str(self.runtime_dir)):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._restore_sigterm:
            with suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._restore_sigterm = False

    def _exit_on_sigterm(self) -> None:
        """`timeout` and CI runners stop pytest with SIGTERM, which by default skips every
        `finally`: turn it into SystemExit so stop() still runs."""
        import threading

        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

            def handler(signum, frame):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                raise SystemExit(128 + signum)

            signal.signal(signal.SIGTERM, handler)
            self._restore_sigterm = True

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    # -- REST ---------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path.lstrip('/')}{sep}token={self.token}"

    def api(self, method: str, path: str, timeout: float = 10):
        headers = {"Authorization": f"token {self.token}"}
        request = urllib.request.Request(self.base_url + path.lstrip("/"), method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self, timeout: float = 10) -> None:
        """Delete every session and kernel (frees the memory a notebook's kernel holds)."""
        for session in self.api("GET", "api/sessions", timeout=timeout) or []:
            with suppress(urllib.error.URLError, OSError):
                self.api("DELETE", f"api/sessions/{session['id']}", timeout=timeout)
        for kernel in self.api("GET", "api/kernels", timeout=timeout) or []:
            with suppress(urllib.error.URLError, OSError):
                self.api("DELETE", f"api/kernels/{kernel['id']}", timeout=timeout)

    def log_tail(self, n: int = 4000) -> str:
        if self._log is not None:
            self._log.flush()
        with suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return ""


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent (pytest) dies. Linux only."""
    with suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _pids_mentioning(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with suppress(OSError):
            if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


@dataclass
class CellReport:
    """What one code cell shows in the browser after a run."""

    index: int  # among code cells, 0-based
    source: str
    execution_count: int | None
    prompt: str
    output_types: list[str]  # from the notebook model: stream, execute_result, display_data, error
    mime_types: list[str]  # of the rendered outputs
    text: str  # all outputs' visible text
    stderr: str
    images: int  # <img> elements in the output area (matplotlib PNGs are .jp-RenderedImage img)
    error: str | None = None  # traceback text when the cell raised
    placeholders: list[str] = field(default_factory=list)  # "Output()", "Loading widget", ...

    @property
    def has_image(self) -> bool:
        return self.images > 0

    def label(self) -> str:
        return f"code cell {self.index} {self.prompt.strip() or '[ ]:'}"


_CURRENT_PANEL_JS = """
const app = window.jupyterapp;
if (!app) throw new Error('window.jupyterapp is missing: start JupyterLab with --LabApp.expose_app_in_browser=True');
const panel = app.shell.currentWidget;
if (!panel || !panel.content || !panel.sessionContext) throw new Error('the current JupyterLab tab is not a notebook');
const codeCells = panel.content.widgets.filter(w => w.model.type === 'code');
const promptOf = w => (w.node.querySelector('.jp-InputPrompt') || {}).textContent || '';
"""

_STATE_JS = (
    "() => {" + _CURRENT_PANEL_JS + """
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {
    kernel: kernel ? kernel.status : 'none',
    kernelName: kernel ? kernel.name : null,
    counts: codeCells.map(w => w.model.executionCount),
    running: codeCells.map(w => promptOf(w).includes('*')),
    errors: codeCells.map(w => w.model.outputs.toJSON().some(o => o.output_type === 'error')),
    dialog: (document.querySelector('.jp-Dialog') || {}).innerText || null,
  };
}"""
)

_CELLS_JS = (
    "() => {" + _CURRENT_PANEL_JS + """
  return codeCells.map((w, index) => {
    const node = w.node;
    const outputs = Array.from(node.querySelectorAll('.jp-OutputArea-output'));
    const json = w.model.toJSON();
    return {
      index,
      source: Array.isArray(json.source) ? json.source.join('') : json.source,
      execution_count: w.model.executionCount,
      prompt: promptOf(w),
      output_types: w.model.outputs.toJSON().map(o => o.output_type),
      mime_types: outputs.map(o => o.getAttribute('data-mime-type')
                    || (o.querySelector('[data-mime-type]') || {getAttribute: () => ''}).getAttribute('data-mime-type') || ''),
      text: outputs.map(o => o.innerText).join('\\n'),
      stderr: Array.from(node.querySelectorAll('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'))
                .map(e => e.innerText).join('\\n'),
      images: node.querySelectorAll('.jp-OutputArea img').length,
      error_texts: w.model.outputs.toJSON().filter(o => o.output_type === 'error')
                     .map(o => o.ename + ': ' + o.evalue + '\\n' + (o.traceback || []).join('\\n')),
      output_texts: outputs.map(o => o.innerText),
    };
  });
}"""
)

# Height the viewport needs so the notebook's own scroller shows everything at once.
_NEEDED_HEIGHT_JS = (
    "() => {" + _CURRENT_PANEL_JS + """
  const scroller = panel.node.querySelector('.jp-WindowedPanel-outer') || panel.content.node;
  scroller.scrollTop = 0;
  // Up to the last cell's bottom, not scrollHeight: that adds the notebook's scroll-past-end pad.
  const cells = panel.content.widgets;
  const bottom = cells.length ? cells[cells.length - 1].node.getBoundingClientRect().bottom : 0;
  const hidden = Math.min(bottom - scroller.getBoundingClientRect().bottom, scroller.scrollHeight - scroller.clientHeight);
  return Math.ceil(window.innerHeight + Math.max(0, hidden) + 40);
}"""
)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Lab:
    """One Playwright page on a JupyterLabServer, with one-line helpers for tests."""

    def __init__(self, server: JupyterLabServer, page, out_dir: Path, default_timeout_s: float = 60):
        self.server = server
        self.page = page
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.page.set_default_timeout(default_timeout_s * 1000)
        self.screenshots: list[Path] = []
        self.timings: dict[str, float] = {}
        self.notebook: str | None = None

    # -- notebooks ----------------------------------------------------------------------------
    def open(self, name: str, timeout_s: float = 180) -> None:
        """Open notebooks/<name> (the server's copy) in a fresh workspace; wait for its kernel."""
        self.notebook = name
        workspace = f"wb-{secrets.token_hex(4)}"  # no tabs restored from an earlier test
        self.page.goto(self.server.url(f"lab/workspaces/{workspace}/tree/{quote(name)}"), wait_until="domcontentloaded")
        self.page.wait_for_selector(".jp-Notebook", state="visible", timeout=timeout_s * 1000)
        self.page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
            " && window.jupyterapp.shell.currentWidget.context"
            f" && window.jupyterapp.shell.currentWidget.context.path.endsWith({json.dumps(name)})",
            timeout=timeout_s * 1000,
        )
        self.wait_for_kernel(timeout_s=timeout_s)

    def wait_for_kernel(self, timeout_s: float = 180) -> None:
        """Wait until the notebook's kernel is idle (accepting a kernel-selection dialog if shown)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state()
            if state["kernel"] == "idle":
                if state["kernelName"] != "python3":
                    raise AssertionError(f"{self.notebook}: kernel is {state['kernelName']!r}, expected the .venv's python3")
                return
            if state["dialog"]:
                self.accept_dialog()
            if time.monotonic() > deadline:
                self.screenshot("kernel-timeout")
                raise TimeoutError(f"{self.notebook}: kernel not idle after {timeout_s:.0f} s (state {state})")
            time.sleep(0.5)

    def state(self) -> dict:
        return self.page.evaluate(_STATE_JS)

    def accept_dialog(self) -> str | None:
        dialog = self.page.locator(".jp-Dialog")
        if not dialog.count():
            return None
        text = dialog.first.inner_text()
        dialog.locator(".jp-Dialog-button.jp-mod-accept").first.click()
        return text

    def command(self, name: str, args: dict | None = None):
        """Run a JupyterLab command by id (e.g. 'notebook:run-all-cells')."""
        return self.page.evaluate("([n, a]) => window.jupyterapp.commands.execute(n, a)", [name, args or {}])

    def run_all(self, timeout_s: float = 900, poll_s: float = 1.0) -> float:
        """Run → Run All Cells from the menu bar; wait until every code cell ran (or one raised).

        Done means: kernel idle, no `[*]` prompt, and every code cell has an execution count
        newer than before the run, or a cell that ran in this run shows an error (Run All stops
        there). The condition must hold on two polls in a row. Returns the seconds it took.
        """
        before = self.state()
        baseline = max([c for c in before["counts"] if c is not None], default=0)
        start = time.monotonic()
        self.page.locator("#jp-menu-panel .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        # The Run menu's item is the generic `runmenu:run-all` command: find it by its label.
        label = self.page.locator('.lm-Menu-itemLabel:text-is("Run All Cells")')
        self.page.locator(".lm-Menu .lm-Menu-item:not(.lm-mod-disabled)", has=label).click()
        stable, state = 0, before
        while True:
            time.sleep(poll_s)
            state = self.state()
            if state["kernel"] in {"dead", "none"}:
                self.screenshot("kernel-died")
                raise AssertionError(f"{self.notebook}: the kernel died during Run All (state {state})\n{self.server.log_tail()}")
            if state["dialog"]:
                text = self.accept_dialog()
                raise AssertionError(f"{self.notebook}: a dialog interrupted Run All: {text!r}")
            ran = [c is not None and c > baseline for c in state["counts"]]
            raised = any(r and e for r, e in zip(ran, state["errors"]))
            done = state["kernel"] == "idle" and not any(state["running"]) and (all(ran) or raised)
            stable = stable + 1 if done else 0
            if stable >= 2:
                break
            if time.monotonic() - start > timeout_s:
                self.screenshot("run-all-timeout")
                raise TimeoutError(
                    f"{self.notebook}: Run All not finished after {timeout_s:.0f} s; kernel {state['kernel']}, "
                    f"counts {state['counts']}, running {state['running']}; screenshot in {self.out_dir}"
                )
        seconds = time.monotonic() - start - poll_s  # the last confirming poll is not run time
        self.timings[self.notebook or "?"] = seconds
        return seconds

    def cells(self) -> list[CellReport]:
        """Per code cell: what the browser shows. Also written to <out_dir>/<notebook>.cells.json."""
        reports = []
        for raw in self.page.evaluate(_CELLS_JS):
            output_texts = raw.pop("output_texts")
            error_texts = raw.pop("error_texts")
            report = CellReport(**raw)
            # An error output renders as stderr text too: the DOM check catches a traceback that
            # was printed (not raised), the model's error outputs the rest, without doubling.
            tracebacks = error_texts or ([report.stderr] if "Traceback" in report.stderr else [])
            if tracebacks:
                report.error = _ANSI.sub("", "\n".join(tracebacks))
            report.placeholders = [p for p in WIDGET_PLACEHOLDERS if any(p in text for text in output_texts)]
            reports.append(report)
        stem = Path(self.notebook or "notebook").stem
        (self.out_dir / f"{stem}.cells.json").write_text(json.dumps([asdict(r) for r in reports], indent=1))
        return reports

    # -- interaction: one line each ----------------------------------------------------------
    def locator(self, selector: str):
        return self.page.locator(selector).first

    def wait_for(self, selector: str, timeout_s: float = 60, state: str = "visible"):
        locator = self.locator(selector)
        locator.wait_for(state=state, timeout=timeout_s * 1000)
        return locator

    def type(self, selector: str, text: str, *, submit: bool = False, timeout_s: float = 60) -> None:
        """Replace the text of the element at ``selector`` and commit it (blur, or Enter with submit).

        A container (e.g. an ipywidgets ``.wb-prompt`` whose class sits on the outer div) resolves
        to the <textarea>/<input>/contenteditable inside it.
        """
        target = self.wait_for(selector, timeout_s)
        editable = target.evaluate("e => e.matches('textarea, input, [contenteditable=\"\"], [contenteditable=\"true\"]')")
        if not editable:
            target = target.locator("textarea, input, [contenteditable='true'], [contenteditable='']").first
        target.fill(text)
        if submit:
            target.press("Enter")
        else:
            target.blur()  # fires 'change': ipywidgets with continuous_update=False sync on it

    def click(self, selector: str, timeout_s: float = 60) -> None:
        self.wait_for(selector, timeout_s).click()

    def press(self, selector: str, key: str, timeout_s: float = 60) -> None:
        self.wait_for(selector, timeout_s).press(key)

    def wait_for_text(self, selector: str, text: str | re.Pattern, timeout_s: float = 60) -> None:
        """Wait until the first element at ``selector`` contains ``text`` (substring or regex)."""
        from playwright.sync_api import expect

        expect(self.locator(selector)).to_contain_text(text, timeout=timeout_s * 1000)

    def text(self, selector: str) -> str:
        return self.wait_for(selector).inner_text()

    # -- screenshots -------------------------------------------------------------------------
    def screenshot(self, name: str, *, whole_notebook: bool = True) -> Path:
        """PNG of the page; with whole_notebook the viewport grows so every cell is in the picture."""
        path = self.out_dir / f"{_safe(name)}.png"
        original = self.page.viewport_size or VIEWPORT
        try:
            if whole_notebook:
                with suppress(Exception):  # not a notebook tab: plain viewport screenshot
                    needed = self.page.evaluate(_NEEDED_HEIGHT_JS)
                    height = min(max(needed, original["height"]), MAX_SCREENSHOT_HEIGHT)
                    if height != original["height"]:
                        self.page.set_viewport_size({"width": original["width"], "height": height})
                        self.page.wait_for_timeout(600)  # let Lumino lay the panels out again
                        self.page.evaluate(_NEEDED_HEIGHT_JS)  # scroll back to the top
            self.page.screenshot(path=str(path), animations="disabled")
        finally:
            if self.page.viewport_size != original:
                self.page.set_viewport_size(original)
        self.screenshots.append(path)
        return path

    def cell_screenshot(self, index: int, name: str) -> Path:
        """PNG of one code cell (input and outputs)."""
        path = self.out_dir / f"{_safe(name)}.png"
        cell = self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell.jp-CodeCell").nth(index)
        cell.scroll_into_view_if_needed()
        cell.screenshot(path=str(path), animations="disabled")
        self.screenshots.append(path)
        return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "screenshot"


def publish_screenshots(out_dir: Path, test_name: str) -> Path | None:
    """Copy a test's screenshots to tests/browser/screenshots/<test>/ when WORKBENCH_SCREENSHOTS is set."""
    if not os.environ.get("WORKBENCH_SCREENSHOTS") or not Path(out_dir).is_dir():
        return None
    target = SCREENSHOTS_DIR / _safe(test_name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(out_dir, target)
    return target
