"""Every notebook runs top to bottom (in quick mode) without an error.

Where Debian's chromium is installed (always under CI=true), ``tests/browser`` runs every
notebook in a real JupyterLab instead, with stronger checks (figures shown, widgets rendered
and responding); running them here too would only double the suite's time. Without the
browser, they run here through nbclient, so a notebook is never left untested.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.browser.jupyterlab import CHROMIUM

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


IN_BROWSER = ("01", "02", "03", "04", "05", "06")  # the notebooks tests/browser runs in Chromium


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    if Path(CHROMIUM).exists() and path.name[:2] in IN_BROWSER:
        pytest.skip("run in a real browser by tests/browser/test_notebooks_in_browser.py")
    monkeypatch.setenv("WORKBENCH_QUICK", "1")
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))  # the kernel inherits it
    notebook = nbformat.read(path, as_version=4)
    # Run in a scratch folder so nothing the notebook writes lands in the repository.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    assert any(tmp_path.glob("figures/*.pdf")) or "save_figure" not in path.read_text()
