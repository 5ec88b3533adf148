import re

import matplotlib
import pytest

matplotlib.use("Agg")

from workbench import figures  # noqa: E402


def _simple_figure():
    fig, ax = figures.paper_figure("single")
    ax.plot([0, 1, 2], [1, 0, 2], label="series")
    ax.set_xlabel("x label")
    ax.legend()
    return fig


def test_save_figure_writes_every_format(tmp_path):
    paths = figures.save_figure(_simple_figure(), "example", out_dir=tmp_path)
    assert [p.suffix for p in paths] == [".pdf", ".svg", ".png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pdf_embeds_truetype_not_type3(tmp_path):
    (pdf,) = figures.save_figure(_simple_figure(), "fonts", formats=("pdf",), out_dir=tmp_path)
    raw = pdf.read_bytes()
    assert b"/FontFile2" in raw  # an embedded TrueType font program
    assert not re.search(rb"/Subtype\s*/Type3", raw)


def test_figure_sizes_and_palette():
    assert figures.figure_size("single", 0.5) == (3.25, 1.625)
    assert figures.figure_size("double")[0] == 6.75
    fig, _ = figures.paper_figure("double")
    assert fig.get_size_inches()[0] == pytest.approx(6.75)
    assert len(set(figures.OKABE_ITO)) == 8


def test_style_does_not_leak_globally():
    before = matplotlib.rcParams["pdf.fonttype"]
    with figures.paper_style():
        assert matplotlib.rcParams["pdf.fonttype"] == 42
    assert matplotlib.rcParams["pdf.fonttype"] == before


@pytest.mark.parametrize("kwargs, message", [
    ({"formats": ("jpg",)}, "unsupported figure formats"),
    ({"name": "../escape"}, "plain file stem"),
])
def test_bad_arguments_are_explained(tmp_path, kwargs, message):
    args = {"name": "ok", "out_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        figures.save_figure(_simple_figure(), **args)


def test_bad_width_is_explained():
    with pytest.raises(ValueError, match="width must be one of"):
        figures.figure_size("triple")


def test_default_folder_is_the_repository_figures_whatever_the_working_directory(tmp_path, monkeypatch):
    from workbench.paths import REPO_ROOT, figures_dir

    monkeypatch.delenv("WORKBENCH_FIGURES", raising=False)
    monkeypatch.chdir(tmp_path)
    assert figures_dir() == REPO_ROOT / "figures"
    monkeypatch.setenv("WORKBENCH_FIGURES", str(tmp_path / "elsewhere"))
    saved = figures.save_figure(_simple_figure(), "where", formats=("png", "pdf"))
    assert saved == [tmp_path / "elsewhere" / "where.png", tmp_path / "elsewhere" / "where.pdf"]
    assert repr(saved) == f"saved where.{{png,pdf}} in {tmp_path / 'elsewhere'}"  # one line, not a list of PosixPaths
