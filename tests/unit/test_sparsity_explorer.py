"""The sparsity explorer: its precomputed grid (checked against a direct fit/apply/measure)
and the widget, which only looks points up."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

matplotlib.use("Agg")

from tests.helpers.tiny import tiny_model, tiny_tokens  # noqa: E402
from workbench.evals import bootstrap_ratio_ci, sequence_losses  # noqa: E402
from workbench.sparsity import describe_mlps, get_method  # noqa: E402
from workbench.sparsity.explore import CETT_TARGETS, TARGETS, SparsityGrid, explore_grid, plot_selection  # noqa: E402
from workbench.sparsity.flops import flops_skipped  # noqa: E402
from workbench.sparsity.methods import SparsityMethod  # noqa: E402

ROWS = tiny_tokens(n_seq=24)
EVALUATION, CALIBRATION = ROWS[:16], ROWS[16:]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models():
    return {"relu": tiny_model(), "swiglu": tiny_model(act_fn="silu", gated=True)}


@pytest.fixture(scope="module")
def grid(models):
    return explore_grid(models, EVALUATION, CALIBRATION, targets=(0.5, 0.8), cett_targets=(0.1, 0.2), progress=False)


@pytest.mark.parametrize("model_name, method_name, layer, target", [
    ("relu", "cats", "all", 0.8), ("swiglu", "teal", 1, 0.5), ("swiglu", "cett", "all", 0.2), ("relu", "wina", 0, 0.8),
    ("swiglu", "topk", 0, 0.5), ("relu", "cett", 1, 0.1),
])
def test_grid_points_equal_a_direct_fit_apply_and_measure(grid, models, model_name, method_name, layer, target):
    model = models[model_name]
    method = get_method(method_name, max_tokens=CALIBRATION.numel())
    if layer == "all":
        thresholds = method.fit((model, CALIBRATION), target)
    else:  # single layers: one fit on dense activations, restricted to the layer
        thresholds = method.fit((model, CALIBRATION), target, sequential=False).select([layer])
    dense = sequence_losses(model, EVALUATION)
    with method.apply(model, thresholds) as meter:
        sparse = sequence_losses(model, EVALUATION)
    realised = meter.sparsity()
    n = EVALUATION.shape[0] * (EVALUATION.shape[1] - 1)

    row = grid.point(model_name, method_name, layer, target)
    assert row["realised"] == pytest.approx(realised, abs=1e-12)
    assert row["ppl_ratio"] == pytest.approx(math.exp(float(sparse.sum() - dense.sum()) / n), rel=1e-9)
    assert (row["ppl_ci_low"], row["ppl_ci_high"]) == pytest.approx(bootstrap_ratio_ci(dense, sparse, EVALUATION.shape[1] - 1))
    assert row["flops_skipped"] == pytest.approx(flops_skipped(describe_mlps(model), realised))
    for index, ratio in enumerate(row["activation_ratio"]):
        mine = [v for k, v in realised.items() if k.startswith(f"blocks.{index}.")]
        assert ratio == (pytest.approx(1 - sum(mine) / len(mine)) if mine else None)
    if layer != "all":
        assert all(k.startswith(f"blocks.{layer}.") for k in realised) and row["activation_ratio"][1 - layer] is None


def test_cett_has_its_own_target_grid(grid):
    assert grid.targets("cett") == [0.1, 0.2] and grid.targets("cats") == [0.5, 0.8]
    assert {r["target_kind"] for r in grid.rows if r["method"] == "cett"} == {"cett"}
    assert {r["target_kind"] for r in grid.rows if r["method"] != "cett"} == {"sparsity"}
    assert set(CETT_TARGETS) != set(TARGETS) and max(CETT_TARGETS) <= 0.3
    # a CETT target is a share of the output norm dropped, not the fraction of entries dropped
    point = grid.point("swiglu", "cett", "all", 0.2)
    assert point["mean_activation_ratio"] != pytest.approx(0.8, abs=0.02)


def test_lookups(grid):
    assert grid.models == ["relu", "swiglu"]
    assert grid.methods == ["cats", "topk", "teal", "wina", "cett"]
    assert grid.layers("relu") == ["all", 0, 1]
    assert len(grid.rows) == 2 * 5 * 3 * 2
    curve = grid.curve("relu", "cats", 0)
    assert [r["target"] for r in curve] == [0.5, 0.8] and all(r["layer"] == 0 for r in curve)
    assert curve[0]["flops_skipped"] < curve[1]["flops_skipped"]
    assert grid.point("relu", "cats", 0, 0.5) is curve[0]
    assert grid.point("relu", "cats", 0, 0.1 + 0.4) is curve[0]  # float noise, same grid point
    with pytest.raises(KeyError, match="targets"):
        grid.point("relu", "cats", 0, 0.55)  # not interpolated: the slider steps over grid points
    with pytest.raises(KeyError):
        grid.curve("relu", "nope", "all")
    assert grid.info["swiglu"]["gated"] and len(grid.info["relu"]["dense_activation_ratio"]) == 2


def test_save_load_round_trip_is_identical(grid, tmp_path):
    path = grid.save(tmp_path / "grid.json")
    loaded = SparsityGrid.load(path)
    assert loaded.rows == grid.rows and loaded.info == grid.info and loaded.meta == grid.meta
    assert loaded.layers("relu") == ["all", 0, 1] and loaded.point("relu", "cats", "all", 0.8) == grid.point("relu", "cats", "all", 0.8)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.json"]  # atomic: no temporary file left
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a sparsity grid"):
        SparsityGrid.load(tmp_path / "other.json")


def test_overlapping_token_sets_are_refused(models):
    with pytest.raises(ValueError, match="also occur"):
        explore_grid(models, ROWS[:16], ROWS[8:20], methods=("cats",), targets=(0.5,), progress=False)


def test_layer_choices(models):
    small = {"relu": models["relu"]}
    only = explore_grid(small, EVALUATION, CALIBRATION, methods=("cats",), targets=(0.5,), layers=[1], progress=False)
    assert only.layers("relu") == [1] and only.rows[0]["activation_ratio"][0] is None
    with pytest.raises(ValueError, match="do not exist"):
        explore_grid(small, EVALUATION, CALIBRATION, methods=("cats",), targets=(0.5,), layers=[2], progress=False)
    with pytest.raises(ValueError, match="all\\+each"):
        explore_grid(small, EVALUATION, CALIBRATION, methods=("cats",), targets=(0.5,), layers="every", progress=False)


def test_plot_selection_renders(grid):
    from workbench.widgets.sparsity_explorer import _figure_png

    png = _figure_png(plot_selection(grid, "swiglu", "teal", 1, 0.8))
    assert png.startswith(PNG) and len(png) > 5000


@pytest.fixture()
def no_fitting(monkeypatch):
    """After the grid is built nothing may fit, apply or run a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the explorer recomputed instead of looking a grid point up")

    import workbench.sparsity.explore as explore
    import workbench.sparsity.methods as methods

    monkeypatch.setattr(methods, "get_method", refuse)
    monkeypatch.setattr(explore, "get_method", refuse)
    monkeypatch.setattr(SparsityMethod, "fit", refuse)
    monkeypatch.setattr(SparsityMethod, "apply", refuse)
    monkeypatch.setattr(explore, "sequence_losses", refuse)


def test_select_shows_the_grid_point_without_recomputing(grid, no_fitting):
    from workbench.widgets.sparsity_explorer import SparsityExplorer

    explorer = SparsityExplorer(grid)
    assert explorer.widget._dom_classes == ("wb-sparsity-explorer",)
    explorer.select(model="swiglu", method="teal", layer=1, target=0.8)
    row = grid.point("swiglu", "teal", 1, 0.8)
    got = explorer.readout()
    assert (got["model"], got["method"], got["layer"], got["target"]) == ("swiglu", "teal", 1, 0.8)
    assert got["ppl_ratio"] == row["ppl_ratio"] and got["flops_skipped"] == row["flops_skipped"]
    assert (got["ppl_ci_low"], got["ppl_ci_high"]) == (row["ppl_ci_low"], row["ppl_ci_high"])
    assert got["activation_ratio"] == row["mean_activation_ratio"] == row["activation_ratio"][1]
    assert f"{row['ppl_ratio']:.4f}" in explorer.readout_html.value == explorer.html()
    assert bytes(explorer.image.value).startswith(PNG)  # ipywidgets hands a memoryview back

    # switching to CETT puts the slider on CETT's own grid, at the same relative position
    explorer.select(method="cett")
    assert list(explorer.target.options) == [("0.1", 0.1), ("0.2", 0.2)] and explorer.target.value == 0.2
    assert explorer.target.description == "target CETT" and "target CETT 0.2" in explorer.html()
    # moving a control does exactly what select does
    explorer.target.value = 0.1
    assert explorer.readout()["ppl_ratio"] == grid.point("swiglu", "cett", 1, 0.1)["ppl_ratio"]
    explorer.layer.value = "all"
    assert "all layers" in explorer.html() and explorer.readout()["layer"] == "all"
    with pytest.raises(ValueError, match="not on the grid"):
        explorer.select(target=0.15)
    with pytest.raises(ValueError, match="unknown model"):
        explorer.select(model="gpt2")


def test_rendered_figures_are_cached_per_point(grid, no_fitting, monkeypatch):
    import workbench.widgets.sparsity_explorer as module

    explorer = module.SparsityExplorer(grid)
    first = explorer.image.value
    explorer.select(target=grid.targets(grid.methods[0])[0])
    monkeypatch.setattr(module, "plot_selection", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-rendered")))
    explorer.select(target=grid.targets(grid.methods[0])[1])  # back to the first point: from the cache
    assert explorer.image.value == first


def test_user_given_names_are_escaped(grid, no_fitting):
    from workbench.widgets.sparsity_explorer import SparsityExplorer

    hostile = "<img src=x onerror=alert(1)>"
    rows = [{**r, "model": hostile if r["model"] == "relu" else r["model"], "method": "<b>" + r["method"]} for r in grid.rows]
    info = {hostile: grid.info["relu"], "swiglu": grid.info["swiglu"]}
    explorer = SparsityExplorer(SparsityGrid(rows, info, grid.meta))
    text = explorer.html()
    assert "<img" not in text and "<b>" not in text and "&lt;img src=x" in text


def test_export_writes_the_current_figure(grid, no_fitting, tmp_path):
    from workbench.widgets.sparsity_explorer import SparsityExplorer

    explorer = SparsityExplorer(grid, out_dir=tmp_path)
    explorer.select(model="relu", method="cats", layer=0, target=0.8)
    explorer.export_button.click()  # the button, as a user presses it
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["sparsity_relu_cats_layer0_s0.8.pdf", "sparsity_relu_cats_layer0_s0.8.png",
                       "sparsity_relu_cats_layer0_s0.8.svg"]
    assert (tmp_path / written[1]).read_bytes().startswith(PNG)
    assert "sparsity_relu_cats_layer0_s0.8.pdf" in explorer.export_status.value
    paths = explorer.export(name="custom", out_dir=tmp_path / "sub")
    assert [p.name for p in paths] == ["custom.pdf", "custom.svg", "custom.png"]
