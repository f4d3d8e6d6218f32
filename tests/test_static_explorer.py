"""sl.widgets.static_explorer: the kernel-free explorer of the rendered book (a Plotly figure whose controls only
switch the visibility of precomputed traces)."""
import json

import numpy as np
import pytest

pytest.importorskip("plotly")
import sparsity_lib as sl  # noqa: E402

ACC = {("magnitude", 0.5): 0.9, ("magnitude", 0.9): 0.7, ("random", 0.5): 0.8, ("random", 0.9): 0.3}


def traces(method, sparsity):
    return [{"x": [0.5, 0.9], "y": np.array([ACC[method, 0.5], ACC[method, 0.9]]), "name": method},
            {"x": [sparsity], "y": [ACC[method, sparsity]], "mode": "markers"}]


def test_every_combination_has_its_own_traces_and_controls_switch_them():
    ex = sl.widgets.static_explorer({"method": ["magnitude", "random"], "sparsity": [0.5, 0.9]}, traces,
                                    initial={"sparsity": 0.9}, yaxis_title="accuracy")
    fig = ex.figure
    assert len(fig.data) == 6 and ex.combinations[0] == ("magnitude", 0.5)   # the 2 curves are shared
    # only the initial combination is visible at first
    assert [t.visible for t in fig.data] == ex.visible(method="magnitude", sparsity=0.9)
    assert sum(ex.visible(method="random", sparsity=0.5)) == 2
    # the marker trace of (random, 0.5) holds that precomputed value
    marker = fig.data[ex.groups[ex.combinations.index(("random", 0.5))][1]]
    assert list(marker.y) == [0.8]
    # the dropdown's "random" button shows random at the initial sparsity and rebuilds the slider for "random"
    button = fig.layout.updatemenus[0].buttons[1]
    assert button.label == "random"
    assert button.args[0]["visible"] == ex.visible(method="random", sparsity=0.9)
    steps = button.args[1]["sliders"][0]["steps"]
    assert [s["args"][0]["visible"] for s in steps] == [ex.visible(method="random", sparsity=s) for s in (0.5, 0.9)]
    assert fig.layout.sliders[0].active == 1 and fig.layout.yaxis.title.text == "accuracy"


def test_html_draws_with_the_page_plotly_and_never_inlines_it():
    ex = sl.widgets.static_explorer({"sparsity": [0.5, 0.9]}, lambda sparsity: traces("random", sparsity),
                                    formats={"sparsity": lambda s: f"{100 * s:.0f}%"})
    html = ex.to_html()
    assert 'class="sl-static-explorer"' in html and "Plotly.newPlot" in html
    assert len(html) < 20_000 and "cdn" not in html.lower()       # plotly.js itself is served by the book
    assert [s.label for s in ex.figure.layout.sliders[0].steps] == ["50%", "90%"]
    bundle = ex._repr_mimebundle_()
    json.dumps(bundle["application/vnd.plotly.v1+json"])          # JupyterLab's plotly renderer gets plain JSON
    assert ex.figure.layout.updatemenus == ()


def test_numbers_are_rounded_to_keep_pages_small():
    ex = sl.widgets.static_explorer({"k": ["a"]}, lambda k: [{"x": [0.1 + 0.2], "y": [1 / 3]}])
    assert list(ex.figure.data[0].x) == [0.3] and list(ex.figure.data[0].y) == [0.3333]


@pytest.mark.parametrize("controls", [{}, {"a": [1], "b": [2], "c": [3]}, {"a": []}, {"a": "abc"}])
def test_bad_controls_are_refused(controls):
    with pytest.raises(ValueError, match="controls"):
        sl.widgets.static_explorer(controls, lambda **v: [])


def test_bad_initial_formats_and_traces_are_refused():
    with pytest.raises(ValueError, match="initial"):
        sl.widgets.static_explorer({"a": [1, 2]}, lambda a: [], initial={"a": 3})
    with pytest.raises(ValueError, match="formats"):
        sl.widgets.static_explorer({"a": [1, 2]}, lambda a: [], formats={"b": str})
    with pytest.raises(TypeError, match="traces"):
        sl.widgets.static_explorer({"a": [1, 2]}, lambda a: {"x": [1]})


def test_matplotlib_colours_become_plotly_colours():
    ex = sl.widgets.static_explorer({"k": ["a"]}, lambda k: [{"y": [1], "line": {"color": "C1"},
                                                               "marker": {"color": "rgba(0,0,0,0)"}}])
    assert ex.figure.data[0].line.color == "#ff7f0e" and ex.figure.data[0].marker.color == "rgba(0,0,0,0)"


def test_a_long_dropdown_fits_in_the_figure():
    methods = [f"method {i}" for i in range(12)]
    ex = sl.widgets.static_explorer({"method": methods, "s": [1, 2]}, lambda method, s: [{"y": [s]}], height=300)
    assert ex.figure.layout.height >= 36 * len(methods) + 100


def test_a_trace_shared_by_several_combinations_is_stored_once():
    # the curve depends on the method only, the marker on both controls: 2 curves + 4 markers
    ex = sl.widgets.static_explorer({"method": ["magnitude", "random"], "sparsity": [0.5, 0.9]}, traces)
    assert len(ex.figure.data) == 6
    for method in ("magnitude", "random"):
        for s in (0.5, 0.9):
            shown = [t for t, v in zip(ex.figure.data, ex.visible(method=method, sparsity=s)) if v]
            assert [list(t.y) for t in shown] == [[ACC[method, 0.5], ACC[method, 0.9]], [ACC[method, s]]]


def test_one_control_of_names_is_a_dropdown_without_slider():
    ex = sl.widgets.static_explorer({"method": ["magnitude", "random"]}, lambda method: traces(method, 0.9))
    assert ex.figure.layout.sliders == () and len(ex.figure.layout.updatemenus[0].buttons) == 2
    assert ex.figure.layout.updatemenus[0].buttons[1].args[0]["visible"] == ex.visible(method="random")


def test_long_end_labels_of_the_slider_fit_in_the_margins():
    """Plotly centres a slider label under its tick, so half of the last label sticks out right of the plot:
    the right margin must hold it (chapter 14's "accuracy density" was cut off), and a wider caller margin stays."""
    ex = sl.widgets.static_explorer({"family": ["a", "b"], "metric": ["accuracy", "accuracy density"]},
                                    lambda family, metric: [{"y": [1, 2]}])
    assert ex.figure.layout.sliders
    size = ex.figure.layout.font.size
    assert ex.figure.layout.margin.r >= 0.5 * 0.5 * size * len("accuracy density")
    assert ex.figure.layout.margin.l >= 0.5 * 0.5 * size * len("accuracy")
    wide = sl.widgets.static_explorer({"family": ["a", "b"], "metric": ["a", "b"]}, lambda family, metric: [{"y": [1]}],
                                      margin={"l": 200, "r": 150})
    assert (wide.figure.layout.margin.l, wide.figure.layout.margin.r) == (200, 150)
