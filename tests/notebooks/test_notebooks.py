"""Every notebook runs top to bottom (in quick mode) without an error."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_QUICK", "1")
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "figures"))  # the kernel inherits it
    notebook = nbformat.read(path, as_version=4)
    # Run in a scratch folder so exported figures do not land in the repository.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    assert any(tmp_path.glob("figures/*.pdf")) or "save_figure" not in path.read_text()
