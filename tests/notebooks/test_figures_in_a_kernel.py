"""In a real kernel, every figure cell shows its figure, including after a paper figure
(the paper style once switched off the inline backend's interactive mode on exit)."""

import nbformat
from nbclient import NotebookClient

CELLS = [
    "from workbench.figures import paper_figure, save_figure\nfig, ax = paper_figure()\nax.plot([1, 2, 3])",
    "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])",
    "fig, ax = paper_figure('double')\nax.plot([1, 0])",
]


def test_each_figure_cell_shows_an_image(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [sum("image/png" in out.get("data", {}) for out in cell.outputs) for cell in notebook.cells]
    assert images == [1, 1, 1], images
