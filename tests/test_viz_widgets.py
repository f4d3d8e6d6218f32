"""Figures and widgets: every figure draws what its data say, every widget only looks up precomputed results.

Oracles: the shaded spread against NumPy's min/max/std of the input, the log-density axis against the closed form
-log10(1 - s), bar heights against the budgets (and the ERK budget's weighted mean against 1 - sparsity). The
sweep and the runner behind the explorers are tested in test_experiments.py.
"""

import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import sparsity_lib as sl  # noqa: E402
from sparsity_lib import viz, widgets  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------------------------------------- viz
def test_style_sets_the_book_defaults():
    params = viz.style(**{"font.size": 13})
    assert params["font.size"] == 13 and matplotlib.rcParams["font.size"] == 13
    assert matplotlib.rcParams["axes.spines.top"] is False and matplotlib.rcParams["axes.spines.right"] is False
    assert matplotlib.rcParams["axes.grid"] is True
    viz.style()



# The rendered book gives a figure a ~688 px column; a figure wider than that is shrunk, and its text with it.
COLUMN_PX = 688


def _text_px_on_screen(fig, points: float) -> float:
    """Height in screen px of ``points``-pt text once the figure (drawn at figure.dpi, bbox tight) fits the column."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
    width = Image.open(buffer).size[0]
    return points * fig.dpi / 72 * min(1.0, COLUMN_PX / width)


def test_style_fits_the_book_column_with_legible_text():
    params = viz.style()
    assert params["figure.figsize"][0] * params["figure.dpi"] <= COLUMN_PX
    smallest = min(params[k] for k in ("xtick.labelsize", "ytick.labelsize", "legend.fontsize"))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="a line"); ax.legend(); ax.set_title("a title"); ax.set_xlabel("x")
    assert _text_px_on_screen(fig, smallest) >= 11.5   # 9 pt at 100 dpi, not shrunk
    # a figure of the old width (13 in) would shrink its 9 pt ticks to about 6 px
    fig_wide = plt.figure(figsize=(13, 4)); fig_wide.subplots(1, 2)
    assert _text_px_on_screen(fig_wide, smallest) < 7


@pytest.mark.parametrize("ncols, nrows", [(1, 1), (2, 1), (2, 2), (3, 1), (4, 2)])
def test_figsize_fills_the_column(ncols, nrows):
    width, height = viz.figsize(ncols, nrows)
    assert width == viz.COLUMN_WIDTH
    aspect = 0.55 if ncols == 1 else 0.75
    assert height == pytest.approx(nrows * width / ncols * aspect + 0.3, abs=0.06)   # rounded to 0.1 in
    assert viz.figsize(2, aspect=1.0)[1] > viz.figsize(2)[1]
    with pytest.raises(ValueError, match="ncols"):
        viz.figsize(0)
    with pytest.raises(ValueError, match="aspect"):
        viz.figsize(2, aspect=-1)


def test_panels_wraps_rows_centres_the_last_and_shares_axes():
    viz.style()
    fig, axes = viz.panels(3, sharey=True)
    assert len(axes) == 3 and len(fig.axes) == 3
    assert fig.get_size_inches()[0] == pytest.approx(viz.COLUMN_WIDTH)
    fig.canvas.draw()
    boxes = [ax.get_position() for ax in axes]
    assert boxes[0].y0 == pytest.approx(boxes[1].y0) and boxes[2].y0 < boxes[0].y0   # two rows: 2 + 1
    centre = (boxes[2].x0 + boxes[2].x1) / 2
    assert centre == pytest.approx((boxes[0].x0 + boxes[1].x1) / 2, abs=0.03)         # the lone panel centred
    assert boxes[2].width == pytest.approx(boxes[0].width, rel=0.05)                   # same size as the others
    axes[0].set_ylim(0, 5)
    assert axes[2].get_ylim() == (0, 5)
    fig5, axes5 = viz.panels(5, ncols=3)
    assert len(axes5) == 5
    with pytest.raises(ValueError, match="n and ncols"):
        viz.panels(0)


def test_masks_grid_never_wider_than_the_column():
    import torch

    fig = viz.masks_grid({f"layer{i}": torch.rand(8, 8) > 0.5 for i in range(4)})
    assert fig.get_size_inches()[0] <= viz.COLUMN_WIDTH + 1e-9

def _band_by_x(collection):
    """{x: set of y} over the vertices of a fill_between polygon."""
    out = {}
    for x, y in collection.get_paths()[0].vertices:
        out.setdefault(round(float(x), 9), set()).add(round(float(y), 9))
    return out


@pytest.mark.parametrize("spread", ["minmax", "std"])
def test_accuracy_vs_sparsity_mean_line_and_spread(spread):
    rng = np.random.default_rng(0)
    s = np.array([0.0, 0.5, 0.9, 0.99])
    results = {"magnitude": (s, rng.uniform(0.7, 1.0, (3, 4))), "random": (list(s), rng.uniform(0.1, 1.0, (3, 4)))}
    ax = viz.accuracy_vs_sparsity(results, spread=spread)
    assert len(ax.lines) == 2 and len(ax.collections) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["magnitude", "random"]
    for line, collection, (xs, values) in zip(ax.lines, ax.collections, results.values()):
        values = np.asarray(values)
        np.testing.assert_allclose(line.get_ydata(), values.mean(0))
        if spread == "minmax":
            low, high = values.min(0), values.max(0)
        else:
            low, high = values.mean(0) - values.std(0), values.mean(0) + values.std(0)
        band = _band_by_x(collection)
        assert sorted(band) == sorted(round(float(x), 9) for x in xs)
        for x, lo, hi in zip(xs, low, high):
            assert band[round(float(x), 9)] == {round(float(lo), 9), round(float(hi), 9)}


def test_accuracy_vs_sparsity_one_seed_no_band_and_log_density_axis():
    s = [0.0, 0.9, 0.99, 0.999]
    ax = viz.accuracy_vs_sparsity({"m": (s, [0.9, 0.8, 0.7, 0.6])}, logit_x=True, spread="minmax")
    assert len(ax.lines) == 1 and len(ax.collections) == 0
    # Closed form: position -log10(1 - s), so 0 -> 90% -> 99% -> 99.9% are equally spaced on screen.
    px = ax.transData.transform(np.column_stack([s, np.zeros(4)]))[:, 0]
    np.testing.assert_allclose(np.diff(px), np.full(3, px[1] - px[0]), rtol=1e-6)
    ax.figure.canvas.draw()
    labels = {t.get_text() for t in ax.get_xticklabels()}
    assert {"0%", "90%", "99%", "99.9%"} <= labels


def test_accuracy_vs_sparsity_rejects_bad_input():
    with pytest.raises(ValueError, match="spread"):
        viz.accuracy_vs_sparsity({"m": ([0, 0.5], [1, 1])}, spread="iqr")
    with pytest.raises(ValueError, match=r"shape \(seeds, 2\)"):
        viz.accuracy_vs_sparsity({"m": ([0, 0.5], [[1, 1, 1]])})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        viz.accuracy_vs_sparsity({"m": ([0, 1.0], [1, 1])}, logit_x=True)


def test_mask_image_pixels_and_density():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask.view(-1)[torch.randperm(100, generator=torch.Generator().manual_seed(0))[:37]] = True
    ax = viz.mask_image(mask, title="fc1")
    assert len(ax.images) == 1
    image = ax.images[0]
    np.testing.assert_array_equal(np.asarray(image.get_array()), mask.numpy().astype(np.uint8))
    assert ax.get_title() == "fc1: density 37%"
    assert image.cmap(image.norm(1))[:3] == (0.0, 0.0, 0.0), "kept weights are black"
    conv = torch.rand(8, 4, 3, 3) < 0.25
    ax = viz.mask_image(conv)
    assert ax.images[0].get_array().shape == (8, 36)
    assert ax.get_title() == f"density {100 * conv.float().mean().item():.3g}%"


def test_masks_grid_one_panel_per_layer(mlp):
    sl.prune(mlp, 0.8)
    fig = viz.masks_grid(mlp, suptitle="global magnitude")
    assert len(fig.axes) == 3 and all(len(ax.images) == 1 for ax in fig.axes)
    for ax, (name, mask) in zip(fig.axes, sl.get_masks(mlp).items()):
        assert ax.get_title().startswith(name)
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), mask.numpy().astype(np.uint8))
    fig = viz.masks_grid({f"l{i}": torch.ones(2, 2, dtype=torch.bool) for i in range(5)}, ncols=2)
    assert len(fig.axes) == 5, "unused panels of the last row are removed"


def test_layer_densities_bars_match_budgets(mlp):
    uniform, erk = sl.budgets.uniform(mlp, 0.9), sl.budgets.erk(mlp, 0.9)
    params = {n: w.numel() for n, w in sl.prunable(mlp).items()}
    ax = viz.layer_densities({"uniform": uniform, "ERK": erk}, kind="sparsity", params=params)
    assert len(ax.containers) == 2 and len(ax.patches) == 6
    for container, budget in zip(ax.containers, (uniform, erk)):
        heights = np.array([bar.get_height() for bar in container])
        np.testing.assert_allclose(heights, [1 - budget[n] for n in params])
        # Closed form: every budget keeps 1 - sparsity of all weights on average.
        assert np.dot(heights, list(params.values())) / sum(params.values()) == pytest.approx(0.1)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [f"{n}\n{params[n]}" for n in params]
    ax = viz.layer_densities({"a": {"x": 0.5, "y": 0.25}, "b": {"y": 1.0}})
    assert len(ax.patches) == 3, "a layer missing from a label has no bar"
    with pytest.raises(ValueError, match="kind"):
        viz.layer_densities({"a": {"x": 0.5}}, kind="fraction")


def test_sparsity_curve_draws_the_schedule():
    steps = np.arange(0, 1001, 50)
    s = [sl.schedules.polynomial(t, 0.0, 0.9, 100, 800) for t in steps]
    ax = viz.sparsity_curve(steps, s, label="cubic", marks=[100, 800])
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), s)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.0, 0.9])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cubic"]
    with pytest.raises(ValueError, match="same length"):
        viz.sparsity_curve([0, 1], [0.0])


def test_heatmap_annotates_every_cell():
    m = np.array([[0.971, 0.95, 0.5], [0.96, np.nan, 0.123]])
    ax = viz.heatmap(m, ["magnitude", "random"], ["50%", "90%", "99%"], fmt=".2f")
    assert len(ax.images) == 1 and len(ax.texts) == 6
    assert [t.get_text() for t in ax.texts] == ["0.97", "0.95", "0.50", "0.96", "–", "0.12"]
    with pytest.raises(ValueError, match="row_labels"):
        viz.heatmap(m, ["a"], ["x", "y", "z"])


def test_table_rounds_and_indexes():
    frame = viz.table([{"method": "magnitude", "acc": np.float32(0.95123), "n": torch.tensor(3)},
                       {"method": "random", "acc": 0.6, "n": 4}], decimals=2, index="method")
    assert list(frame.index) == ["magnitude", "random"] and frame.loc["magnitude", "acc"] == 0.95
    assert frame.loc["magnitude", "n"] == 3
    assert viz.table({"a": {"x": 1.23456}}).loc["a", "x"] == 1.235
    with pytest.raises(TypeError, match="list of dicts"):
        viz.table([1, 2])


# ------------------------------------------------------------------------------------------------ Explorer
def test_explorer_controls_redraw_and_lookup_only():
    import ipywidgets

    train_calls = []

    def fake_train(method, sparsity):  # the expensive part: only ever called while precomputing
        train_calls.append((method, sparsity))
        return {"method": method, "sparsity": sparsity, "accuracy": 1 - sparsity / (2 if method == "magnitude" else 1)}

    grid = {"sparsity": [0.5, 0.8, 0.9], "method": ["magnitude", "random"],
            "layer": ["a", "b", "c", "d", "e"]}
    table = {(m, s): fake_train(m, s) for m in grid["method"] for s in grid["sparsity"]}
    precompute_calls = len(train_calls)
    lookups = []

    def lookup(sparsity, method, layer):
        lookups.append((sparsity, method, layer))
        return table[(method, sparsity)]

    def render(record, fig, sparsity, method, layer):
        ax = fig.subplots()
        ax.bar([method], [record["accuracy"]])
        ax.set_title(f"{layer} {sparsity}")

    explorer = widgets.Explorer(grid, lookup, render, figsize=(3, 2), initial={"sparsity": 0.8})
    assert isinstance(explorer.controls["sparsity"], ipywidgets.SelectionSlider)
    assert isinstance(explorer.controls["method"], ipywidgets.ToggleButtons)
    assert isinstance(explorer.controls["layer"], ipywidgets.Dropdown)
    slider_values = tuple(value for _, value in explorer.controls["sparsity"].options)
    assert slider_values == (0.5, 0.8, 0.9), "the slider reaches only precomputed values"
    assert isinstance(explorer.widget, ipywidgets.VBox) and explorer.output in explorer.widget.children
    assert explorer.render_count == 1 and explorer.last_record == table[("magnitude", 0.8)]

    before_record, before_output = explorer.last_record, explorer.output.outputs
    start = time.process_time()
    explorer.controls["sparsity"].value = 0.9
    cpu = time.process_time() - start
    assert explorer.render_count == 2 and lookups[-1] == (0.9, "magnitude", "a")
    assert explorer.last_record == table[("magnitude", 0.9)] != before_record
    assert explorer.output.outputs != before_output and "image/png" in explorer.output.outputs[0]["data"]
    assert 0 < explorer.last_callback_seconds and cpu < 1.0, "a redraw is a look-up and a small figure"
    explorer.controls["method"].value = "random"
    assert explorer.render_count == 3 and explorer.last_record == table[("random", 0.9)]
    explorer.update()
    assert explorer.render_count == 4
    assert len(train_calls) == precompute_calls, "moving a control never trains"


def test_explorer_missing_result_display_and_validation():
    explorer = widgets.Explorer({"k": [1, 2]}, lookup=lambda k: {1: "one"}[k],
                                render=lambda record, fig, k: fig.subplots().set_title(record), figsize=(2, 2))
    assert explorer.last_error is None
    explorer.controls["k"].value = 2
    assert explorer.last_record is None and "no precomputed result" in explorer.last_error
    bundle = explorer._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
    assert bundle["text/plain"].startswith("Explorer(k)") and len(bundle["text/plain"]) < 80
    noop = lambda *a, **k: None  # noqa: E731
    with pytest.raises(TypeError, match="controls"):
        widgets.Explorer({}, noop, noop)
    with pytest.raises(ValueError, match="initial"):
        widgets.Explorer({"k": [1, 2]}, noop, noop, initial={"k": 3})
    with pytest.raises(ValueError, match="unknown control"):
        widgets.Explorer({"k": [1, 2]}, noop, noop, formats={"j": str})
    with pytest.raises(TypeError, match="lookup"):
        widgets.Explorer({"k": [1]}, "table", noop)


def _structure_explorer():
    table = {(s, st): {"s": s, "st": st} for s in (0.5, 0.9) for st in (None, "neuron", (2, 4))}
    return widgets.Explorer({"sparsity": [0.5, 0.9], "structure": [None, "neuron", (2, 4)]},
                            lookup=lambda sparsity, structure: table[(sparsity, structure)],
                            render=lambda record, fig, **v: fig.subplots().set_title(str(record)), figsize=(2, 2),
                            formats={"structure": widgets.structure_label}), table


def test_explorer_shows_a_none_option_as_selected():
    explorer, table = _structure_explorer()
    control = explorer.controls["structure"]
    assert control.index == 0 and control.label == "unstructured", "None starts selected (issue 10, item 11)"
    assert explorer.values == {"sparsity": 0.5, "structure": None}
    assert explorer.last_record is table[(0.5, None)]
    explorer.set(structure="neuron")
    assert control.index == 1 and explorer.last_record is table[(0.5, "neuron")]
    count = explorer.render_count
    control.value = None  # what a notebook writes: selects the None option, one redraw
    assert control.index == 0 and control.label == "unstructured" and explorer.values["structure"] is None
    assert explorer.render_count == count + 1 and explorer.last_record is table[(0.5, None)]
    explorer.set(structure=(2, 4))
    assert explorer.values["structure"] == (2, 4)
    with pytest.raises(ValueError, match="not one of the values"):
        explorer.set(structure="block")
    with pytest.raises(ValueError, match="unknown control"):
        explorer.set(method="random")


def test_self_test_moves_checks_and_restores_the_designed_state(capsys):
    explorer, table = _structure_explorer()
    explorer = widgets.Explorer({"sparsity": [0.5, 0.9], "structure": [None, "neuron", (2, 4)]},
                                lookup=lambda sparsity, structure: table[(sparsity, structure)],
                                render=lambda record, fig, **v: fig.subplots().set_title(str(record)), figsize=(2, 2),
                                initial={"sparsity": 0.9, "structure": None})
    assert explorer.initial_values == {"sparsity": 0.9, "structure": None}
    seen = []
    out = explorer.self_test(check=lambda record, sparsity, structure: seen.append((sparsity, structure)) or
                             record is table[(sparsity, structure)])
    # default moves: each control to another value (its last, or first if it starts there) and back
    assert seen == [(0.5, None), (0.9, None), (0.9, (2, 4)), (0.9, None)] and out["moves"] == 4
    assert explorer.values == explorer.initial_values and explorer.last_record is table[(0.9, None)]
    assert explorer.controls["structure"].index == 0
    assert "widget self-test: 4 moves" in capsys.readouterr().out
    # chosen moves; the state is restored even when they end elsewhere
    explorer.self_test(moves=[("structure", "neuron"), ("sparsity", 0.5)], quiet=True)
    assert explorer.values == {"sparsity": 0.9, "structure": None}
    with pytest.raises(AssertionError, match=r"move 0 \(structure='neuron'"):
        explorer.self_test(moves=[("structure", "neuron")], check=lambda record, **v: False, quiet=True)
    explorer.restore()
    with pytest.raises(ValueError, match="already"):
        explorer.self_test(moves=[("sparsity", 0.9)])
    # a look-up that fails, or one that shows the same record, is caught
    broken = widgets.Explorer({"k": [1, 2]}, lookup=lambda k: {1: "one"}[k],
                              render=lambda record, fig, k: None, figsize=(2, 2))
    with pytest.raises(AssertionError, match="no precomputed result"):
        broken.self_test(quiet=True)
    same = object()
    stuck = widgets.Explorer({"k": [1, 2]}, lookup=lambda k: same, render=lambda record, fig, k: None, figsize=(2, 2))
    with pytest.raises(AssertionError, match="same record"):
        stuck.self_test(quiet=True)


# --------------------------------------------------------------------------------- results for the explorer
@pytest.fixture(scope="module")
def trained():
    """A small MLP trained (full-batch gradient descent) on a teacher-student task, and the task."""
    task = sl.data.teacher_student(n_train=512, n_test=256, in_features=16, hidden=16, num_classes=4, seed=0)
    model = sl.models.mlp(16, (32, 16), 4, seed=0)
    for _ in range(150):
        model.zero_grad()
        F.cross_entropy(model(task.x_train), task.y_train).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    model.zero_grad()
    return model, task


@pytest.fixture(scope="module")
def results(trained):
    model, task = trained
    return sl.experiments.sweep(model, task, [0.0, 0.5, 0.9], structures=(None, (2, 4)))


# ---------------------------------------------------------------------------------------- pruning explorer
def test_pruning_explorer_responds_without_pruning_or_training(results, monkeypatch):
    explorer = widgets.pruning_explorer(results, layer="fc2.weight")
    assert set(explorer.controls) == {"sparsity", "method", "scope", "structure"}
    assert explorer.controls["sparsity"].options == (("0%", 0.0), ("50%", 0.5), ("90%", 0.9))
    assert explorer.values == {"sparsity": 0.9, "method": "magnitude", "scope": "global", "structure": None}
    assert len(explorer.figure.axes) == 3

    def forbidden(*args, **kwargs):
        raise AssertionError("the explorer must only look up precomputed results")

    monkeypatch.setattr(sl.experiments, "prune", forbidden)
    monkeypatch.setattr(sl.pruning, "prune", forbidden)
    monkeypatch.setattr(sl.train, "evaluate", forbidden)
    monkeypatch.setattr(sl.train, "fit", forbidden)

    count, output = explorer.render_count, explorer.output.outputs
    explorer.controls["sparsity"].value = 0.5
    assert explorer.render_count == count + 1 and explorer.output.outputs != output
    assert explorer.last_record is results[("magnitude", "global", None, 0.5)]
    ax_curve, ax_mask, _ = explorer.figure.axes
    marker = ax_curve.lines[-1]
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (0.5, explorer.last_record["accuracy"])
    mask = explorer.last_record["masks"]["fc2.weight"]
    np.testing.assert_array_equal(np.asarray(ax_mask.images[0].get_array()), mask.numpy().astype(np.uint8))

    explorer.controls["structure"].value = (2, 4)
    assert explorer.last_record is results[("magnitude", "global", (2, 4), 0.5)]
    explorer.controls["sparsity"].value = 0.9
    assert explorer.last_record["skipped"] and explorer.last_error is None
    assert explorer.render_count == count + 3
    with pytest.raises(ValueError, match="layer"):
        widgets.pruning_explorer(results, layer="conv1.weight")


def test_pruning_explorer_hides_single_valued_pickers(results):
    unstructured = {k: r for k, r in results.items() if k[2] is None and k[0] == "magnitude"}
    explorer = widgets.pruning_explorer(unstructured)
    assert list(explorer.controls) == ["sparsity", "scope"]
    explorer.controls["scope"].value = "layerwise"
    assert explorer.last_record is results[("magnitude", "layerwise", None, 0.9)]


# ---------------------------------------------------------------------------------------------- show_source
def _example(x, y=2):
    """A docstring.

    Two lines."""
    if x < 0:
        raise ValueError("x")
    total = x + y
    return total * 2


def test_show_source_shows_the_code_with_its_origin_and_highlighting():
    import inspect
    import re

    lines, first = inspect.getsourcelines(_example)
    code = viz.show_source(_example)
    assert str(code).splitlines() == [lines[0].rstrip("\n")] + [line.rstrip("\n") for line in lines[4:]]
    assert code.title.endswith(f"lines {first}-{first + len(lines) - 1}: _example")
    assert "Two lines" in str(viz.show_source(_example, docstring=True))
    cut = str(viz.show_source(_example, start="total =", end="total ="))
    assert cut.splitlines() == ["def _example(x, y=2):", "    ...  # 2 lines left out (argument checks, set-up)",
                                "    total = x + y", "    ...  # 1 more lines"]
    with pytest.raises(ValueError, match="start='nowhere'"):
        viz.show_source(_example, start="nowhere")
    with pytest.raises(TypeError, match="obj must be"):
        viz.show_source(3)
    html = viz.show_source(sl.lottery.imp, start="def target")._repr_html_()
    assert "style=" in html and "class=\"sl-source\"" in html and "sparsity_lib/lottery.py" in html
    text = re.sub(r"<[^>]+>", "", html)
    assert "for r in range(1, rounds + 1):" in text.replace("&gt;", ">").replace("&lt;", "<")
    markdown = viz.show_source(_example)._repr_markdown_()
    assert markdown.split("\n")[2] == "```python" and markdown.endswith("```")


def test_log_density_ticks_thin_out_on_a_narrow_axis_and_never_overlap():
    viz.style()
    s = np.array(viz.LOG_DENSITY_TICKS)
    fig, axes = plt.subplots(1, 2, figsize=viz.figsize(2))
    for ax in axes:
        viz.accuracy_vs_sparsity({"m": (s, 1 - s)}, ax=ax, logit_x=True)
    fig_wide, ax_wide = plt.subplots(figsize=(12, 4))
    viz.accuracy_vs_sparsity({"m": (s, 1 - s)}, ax=ax_wide, logit_x=True)
    for figure in (fig, fig_wide):
        figure.canvas.draw()
    narrow = [t.get_text() for t in axes[0].get_xticklabels()]
    wide = [t.get_text() for t in ax_wide.get_xticklabels()]
    assert narrow[:2] == ["0%", "90%"] and "99%" in narrow and len(narrow) < len(wide) == len(viz.LOG_DENSITY_TICKS)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axes[0].get_xticklabels()]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))   # no two labels overlap
