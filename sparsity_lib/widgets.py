"""Live widgets of the book: explore *precomputed* results with sliders and pickers.

Every chapter has at least one widget. Its callback must be fast (well under a second), so a widget never
trains: the expensive part is computed once, in a sweep, and the widget only *looks up* a result and redraws a
figure. Three pieces:

* :class:`Explorer`: the general pattern. Give it the values each control may take, a ``lookup`` that returns the
  precomputed record for the current values, and a ``render`` that draws a record on a matplotlib Figure.
* :func:`pruning_explorer`: the book's reusable explorer of a :func:`sparsity_lib.experiments.sweep` (the
  precomputation: prune copies of a trained model with every method x scope x structure x sparsity, evaluate
  them, keep accuracy, loss and masks), with accuracy curve, mask and layer bars;
  :func:`sparsity_lib.experiments.curves` turns a sweep into the static accuracy-vs-sparsity figure next to it.
* :meth:`Explorer.self_test`: the check every chapter runs on its widget (hidden in the book).
* :func:`static_explorer`: the kernel-free twin of a chapter's explorer, for the rendered book: a Plotly figure
  whose slider / dropdown switch between precomputed traces in the reader's browser, with no kernel and no
  network (the book serves plotly.js once from its own ``_static/``; see ``tools/book_static.py``).

In the rendered book there is no kernel, so a widget is frozen; the chapters show the full sweep next to it in a
static figure. Ending a cell with an explorer displays the widget and nothing else (no callback repr)::

    results = sl.experiments.sweep(model, task, [0.0, 0.5, 0.8, 0.9, 0.95, 0.98])
    sl.viz.accuracy_vs_sparsity(sl.experiments.curves(results, structure=None), logit_x=True);   # static
    sl.widgets.pruning_explorer(results)                                                     # live

ipywidgets is imported only when a widget is built, so ``import sparsity_lib`` works without it.
"""

from __future__ import annotations

import base64
import io
import numbers
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from . import viz
from .experiments import SWEEP_SCOPES, curves, structure_label, sweep  # noqa: F401  (sl.widgets.sweep: the old name)


# ------------------------------------------------------------------------------------------------- Explorer
class _NoneOption:
    """Stands for the value ``None`` inside a selection widget: ipywidgets reads a ``None`` value as "nothing
    selected", so an option whose value is ``None`` (chapter 03's "unstructured") would never show as selected."""

    def __repr__(self) -> str:
        return "None"


_NONE = _NoneOption()


def _to_widget(value):
    return _NONE if value is None else value


def _from_widget(value):
    return None if value is _NONE else value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _default_format(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Explorer:
    """A widget that shows a precomputed result for every combination of control values.

    Arguments:
        controls: ``{name: list of values}``, in display order. A list of numbers becomes a ``SelectionSlider``
            (so only the precomputed values can be reached); any other list becomes ``ToggleButtons`` (up to 4
            short options) or a ``Dropdown``. Values may be any objects (``None``, tuples, strings).
        lookup: ``lookup(**values) -> record``: returns the precomputed record for the current values (keyword
            arguments named as the controls). It must only *look up*, never train. A ``KeyError`` means "not
            precomputed": the figure then says so instead of raising.
        render: ``render(record, fig, **values)``: draws the record on the empty matplotlib ``Figure`` ``fig``
            (``fig.subplots(...)``; the figure is cleared before every call).
        figsize: size of the figure in inches.
        formats: ``{name: function(value) -> str}`` for the labels of a control's values (default ``str``).
        initial: ``{name: value}`` to start from (default: the first value of each control).
        continuous_update: redraw while a slider is dragged (default: when it is released).

    Attributes:
        controls: ``{name: widget}``; set ``explorer.controls["sparsity"].value = 0.9`` to move a control in
            code (the figure is redrawn as if the reader had moved it).
        output: the ``ipywidgets.Output`` that holds the figure (as a PNG image).
        widget: the ``VBox`` of the controls and the output.
        figure: the matplotlib ``Figure`` that ``render`` draws on.
        last_record: the record of the last redraw; ``last_error``: the message of the last failed lookup or
            ``None``.
        render_count: number of redraws so far; ``last_callback_seconds``: duration of the last redraw
            (look-up, render and PNG encoding).
        initial_values: the designed starting state ``{name: value}``; :meth:`restore` returns to it, and
            :meth:`self_test` (the hidden check cell of every chapter) ends there.

    ``None`` is a value like any other: ``{"structure": [None, "neuron"]}`` shows "None" selected at the start
    (ipywidgets itself reads ``None`` as "no selection"; the explorer maps it). Move controls in code with
    :meth:`set` (or ``explorer.controls[name].value = value``).

    Example::

        >>> curves = {m: [0.97, 0.95, 0.90] for m in ("magnitude", "random")}   # precomputed
        >>> def draw(record, fig, method, sparsity):
        ...     ax = fig.subplots()
        ...     ax.bar([method], [record])
        >>> explorer = Explorer({"sparsity": [0.5, 0.8, 0.9], "method": ["magnitude", "random"]},
        ...                     lookup=lambda method, sparsity: curves[method][[0.5, 0.8, 0.9].index(sparsity)],
        ...                     render=draw)
        >>> explorer           # last line of a cell: shows the widget
    """

    def __init__(self, controls: Mapping[str, Sequence], lookup: Callable[..., Any],
                 render: Callable[..., None], figsize=(9.0, 3.2), formats: Optional[Mapping[str, Callable]] = None,
                 initial: Optional[Mapping[str, Any]] = None, continuous_update: bool = False, dpi: int = 100):
        import ipywidgets as widgets
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not isinstance(controls, Mapping) or not controls:
            raise TypeError("controls must be a non-empty dict {name: list of values}")
        if not callable(lookup):
            raise TypeError(f"lookup must be callable (lookup(**values) -> record), got {type(lookup).__name__}")
        if not callable(render):
            raise TypeError(f"render must be callable (render(record, fig, **values)), got {type(render).__name__}")
        formats = dict(formats or {})
        initial = dict(initial or {})
        for name in list(formats) + list(initial):
            if name not in controls:
                raise ValueError(f"unknown control {name!r}; the controls are {list(controls)}")

        self.lookup = lookup
        self.render = render
        self.dpi = int(dpi)
        self.controls: Dict[str, Any] = {}
        for name, values in controls.items():
            values = list(values)
            if not values:
                raise ValueError(f"controls[{name!r}] is empty: give at least one value")
            fmt = formats.get(name, _default_format)
            options = [(fmt(v), _to_widget(v)) for v in values]
            value = initial.get(name, values[0])
            if value not in values:
                raise ValueError(f"initial[{name!r}]={value!r} is not one of the values {values}")
            common = dict(options=options, value=_to_widget(value), description=name,
                          style={"description_width": "initial"})
            if all(_is_number(v) for v in values):
                control = widgets.SelectionSlider(continuous_update=continuous_update, readout=True, **common)
            elif len(values) <= 4 and sum(len(label) for label, _ in options) <= 40:
                control = widgets.ToggleButtons(**common)
            else:
                control = widgets.Dropdown(**common)
            control.observe(self._on_change, names="value")
            self.controls[name] = control

        self.figure = Figure(figsize=figsize, dpi=self.dpi, layout="constrained")
        self._canvas = FigureCanvasAgg(self.figure)  # drawn to PNG by hand: not shown twice, no pyplot state
        self.output = widgets.Output()
        box = widgets.HBox(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
        self.widget = widgets.VBox([box, self.output])
        self.last_record = None
        self.last_error: Optional[str] = None
        self.render_count = 0
        self.last_callback_seconds = float("nan")
        self.initial_values = self.values  # the designed starting state, which self_test restores
        self.update()

    # ---------------------------------------------------------------------------------------------- state
    @property
    def values(self) -> Dict[str, Any]:
        """The current value of every control, ``{name: value}``."""
        return {name: _from_widget(control.value) for name, control in self.controls.items()}

    def _on_change(self, change) -> None:
        control = change["owner"]
        if change["new"] is None and any(v is _NONE for _, v in control.options):
            control.value = _NONE  # ``control.value = None`` in code: select the None option (this redraws)
            return
        self.update()

    def set(self, **values) -> None:
        """Move controls in code, as a reader would (``explorer.set(sparsity=0.9, structure=None)``)."""
        for name, value in values.items():
            if name not in self.controls:
                raise ValueError(f"unknown control {name!r}; the controls are {list(self.controls)}")
            choices = [_from_widget(v) for _, v in self.controls[name].options]
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of the values {choices}")
            self.controls[name].value = _to_widget(value)

    def self_test(self, moves: Optional[Sequence[tuple]] = None, check: Optional[Callable[..., Any]] = None,
                  quiet: bool = False) -> Dict[str, Any]:
        """The widget check of a chapter (a hidden cell): move controls in code as a reader would, check that
        every move redraws the figure once with another record and no failed look-up, then restore the designed
        starting state (:attr:`initial_values`), so that the rendered book shows the widget as designed.

        Arguments:
            moves: ``[(control, value), ...]`` in order; default: each control in turn to another of its values
                (its last, or its first when it starts at the last). A move must change the control's value.
            check: ``check(record, **values)`` called after every move with the record shown and the control
                values; it must return a true value (e.g. that the record equals one computed independently).
            quiet: do not print the summary (moves and redraw times: printed, never asserted).

        Returns ``{"moves": number of moves, "seconds": redraw time of each move}``. A failed check raises
        ``AssertionError`` naming the move.
        """
        start_values = self.values
        if moves is None:
            moves = []
            for name, control in self.controls.items():
                values = [_from_widget(v) for _, v in control.options]
                if len(values) > 1:
                    moves.append((name, values[-1] if start_values[name] != values[-1] else values[0]))
                    moves.append((name, start_values[name]))
        if not moves:
            raise ValueError("moves is empty (every control has a single value): nothing to test")
        seconds = []
        for i, move in enumerate(moves):
            if not (isinstance(move, (tuple, list)) and len(move) == 2):
                raise ValueError(f"moves[{i}] must be a pair (control, value), got {move!r}")
            name, value = move
            if name in self.controls and self.values[name] == value:
                raise ValueError(f"moves[{i}]: {name} is already {value!r}; a move must change the value")
            count, record = self.render_count, self.last_record
            self.set(**{name: value})
            where = f"self_test move {i} ({name}={value!r}, values {self.values})"
            if self.render_count != count + 1:
                raise AssertionError(f"{where}: {self.render_count - count} redraws instead of one")
            if self.last_error is not None:
                raise AssertionError(f"{where}: {self.last_error}")
            if self.last_record is record:
                raise AssertionError(f"{where}: the figure shows the same record as before the move")
            if self.values[name] != value or self.controls[name].index is None:
                raise AssertionError(f"{where}: the control does not show {value!r} as selected")
            if check is not None and not check(self.last_record, **self.values):
                raise AssertionError(f"{where}: check(record, **values) failed")
            seconds.append(self.last_callback_seconds)
        self.restore()
        if not quiet:
            print(f"widget self-test: {len(moves)} moves, redraw {min(seconds):.3f}-{max(seconds):.3f} s "
                  "(printed, not asserted); restored to " + ", ".join(f"{k}={v!r}" for k, v in self.values.items()))
        return {"moves": len(moves), "seconds": seconds}

    def restore(self) -> None:
        """Put every control back to :attr:`initial_values` (the designed starting state) and redraw once more."""
        for name, value in self.initial_values.items():
            if self.values[name] != value:
                self.set(**{name: value})
        if self.values != self.initial_values:
            raise AssertionError(f"could not restore {self.initial_values}; the controls show {self.values}")
        self.update()

    def update(self) -> None:
        """Look up the record for the current control values, redraw the figure and show it in :attr:`output`.

        Called by every control change; call it yourself after changing what ``lookup`` reads.
        """
        start = time.perf_counter()
        values = self.values
        self.figure.clear()
        try:
            record = self.lookup(**values)
        except KeyError as error:
            record = None
            self.last_error = f"no precomputed result for {values}: {error}"
            self.figure.text(0.5, 0.5, self.last_error, ha="center", va="center", wrap=True)
        else:
            self.last_error = None
            self.render(record, self.figure, **values)
        self.last_record = record
        self._show()
        self.render_count += 1
        self.last_callback_seconds = time.perf_counter() - start

    def _show(self) -> None:
        """Replace the output's content with the figure as a PNG (works in a kernel and outside of one)."""
        buffer = io.BytesIO()
        self._canvas.print_png(buffer)  # one draw (Figure.savefig would draw twice)
        png = base64.b64encode(buffer.getvalue()).decode("ascii")
        text = "Figure: " + ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        self.output.outputs = (
            {"output_type": "display_data", "data": {"image/png": png, "text/plain": text}, "metadata": {}},
        )

    # ------------------------------------------------------------------------------------------- display
    def _repr_mimebundle_(self, **kwargs):
        bundle = dict(self.widget._repr_mimebundle_(**kwargs))
        bundle["text/plain"] = f"Explorer({', '.join(self.controls)}): run the notebook to use this widget"
        return bundle

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)

    def __repr__(self) -> str:
        return f"Explorer(controls={list(self.controls)}, render_count={self.render_count})"


# -------------------------------------------------------------------------------------------- the explorer
def _unique(values):
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def pruning_explorer(sweep_results: Mapping[tuple, dict], layer: Optional[str] = None, logit_x: bool = True,
                     figsize=(12.0, 3.6), initial: Optional[Mapping[str, Any]] = None) -> Explorer:
    """The book's pruning explorer over the results of :func:`sweep`: a sparsity slider and method / scope /
    structure pickers (a picker appears only when the sweep has more than one value) drive three panels:

    * left: accuracy vs sparsity of the chosen method and structure, one line per scope, with a marker at the
      selected point (x axis on the log-density scale of :func:`sparsity_lib.viz.accuracy_vs_sparsity` when
      ``logit_x``);
    * middle: the mask of ``layer`` (default: the first layer) at the selected point (:func:`viz.mask_image`);
    * right: the density of every layer at the selected point (:func:`viz.layer_densities`), with layer sizes.

    A combination the sweep skipped (e.g. 2:4 at 90% sparsity) shows its reason instead. Returns the
    :class:`Explorer`; end a cell with it to show it.

    Example::

        >>> results = sweep(model, task, [0.0, 0.5, 0.8, 0.9, 0.95, 0.98])
        >>> explorer = pruning_explorer(results, layer="0.weight")
        >>> explorer.controls["sparsity"].value = 0.95      # what a reader's slider does
    """
    if not isinstance(sweep_results, Mapping) or not sweep_results:
        raise TypeError("sweep_results must be the non-empty dict returned by sl.experiments.sweep")
    for key in sweep_results:
        if not (isinstance(key, tuple) and len(key) == 4):
            raise ValueError(f"sweep_results keys must be (method, scope, structure, sparsity), got {key!r}")
    keys = list(sweep_results)
    methods = _unique(k[0] for k in keys)
    scopes = _unique(k[1] for k in keys)
    structures = _unique(k[2] for k in keys)
    sparsities = sorted(_unique(k[3] for k in keys))
    valid = [r for r in sweep_results.values() if r.get("skipped") is None]
    if not valid:
        raise ValueError("sweep_results has no valid record: every combination was skipped")
    layers = list(valid[0]["masks"])
    if layer is None:
        layer = layers[0]
    elif layer not in layers:
        raise ValueError(f"layer must be one of {layers}, got {layer!r}")
    params = {name: mask.numel() for name, mask in valid[0]["masks"].items()}
    colors = {scope: f"C{i}" for i, scope in enumerate(scopes)}

    all_controls = {"sparsity": sparsities, "method": methods, "scope": scopes, "structure": structures}
    controls = {name: values for name, values in all_controls.items() if len(values) > 1 or name == "sparsity"}
    fixed = {name: values[0] for name, values in all_controls.items() if name not in controls}
    start = dict(initial or {})
    if "sparsity" not in start:  # start at the densest sparsity >= 90% if any (where methods differ), else the last
        high = [s for s in sparsities if s >= 0.9]
        start["sparsity"] = high[0] if high else sparsities[-1]
    start = {k: v for k, v in start.items() if k in controls}

    def lookup(**values):
        v = {**fixed, **values}
        return sweep_results[(v["method"], v["scope"], v["structure"], v["sparsity"])]

    def render(record, fig, **values):
        v = {**fixed, **values}
        ax_curve, ax_mask, ax_bars = fig.subplots(1, 3, width_ratios=[1.2, 1.0, 1.0])
        by_scope = curves(sweep_results, method=v["method"], structure=v["structure"])
        title = f"{v['method']}, {structure_label(v['structure'])}"
        if by_scope:
            viz.accuracy_vs_sparsity(by_scope, ax=ax_curve, logit_x=logit_x, title=title,
                                     colors=[colors[scope] for scope in by_scope])
        else:
            ax_curve.set_title(title)
            ax_curve.text(0.5, 0.5, "no valid point", ha="center", va="center", transform=ax_curve.transAxes)
        if record.get("skipped") is None:
            ax_curve.plot([v["sparsity"]], [record["accuracy"]], marker="o", markersize=12, markerfacecolor="none",
                          markeredgecolor="black", markeredgewidth=2, linestyle="none")
            viz.mask_image(record["masks"][layer], ax=ax_mask, title=layer)
            viz.layer_densities({v["scope"]: record["densities"]}, ax=ax_bars, params=params,
                                colors=[colors[v["scope"]]],
                                title=f"{v['scope']}: sparsity {100 * record['sparsity']:.3g}%, "
                                      f"acc {record['accuracy']:.3f}")
        else:
            for ax in (ax_mask, ax_bars):
                ax.axis("off")
            ax_mask.text(0.5, 0.5, "skipped:\n" + record["skipped"], ha="center", va="center", wrap=True,
                         transform=ax_mask.transAxes)

    formats = {"sparsity": lambda s: f"{100 * s:.4g}%", "structure": structure_label}
    return Explorer(controls, lookup, render, figsize=figsize, initial=start,
                    formats={name: fmt for name, fmt in formats.items() if name in controls})


# ------------------------------------------------------------------------------- the kernel-free explorer
def _compact(value, key=None):
    """Plain JSON-able lists with 4 significant digits (numpy / torch arrays included): keeps pages small.
    Matplotlib colour names (``"C0"``, ``"0.8"``, ``"tab:red"``) become the hex colours Plotly understands."""
    if key == "color" and isinstance(value, str):
        from matplotlib.colors import to_hex

        try:
            return to_hex(value)
        except ValueError:
            return value                          # Plotly's own forms, e.g. "rgba(0,0,0,0)"
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {k: _compact(v, k) for k, v in value.items()}
    return value


class StaticExplorer:
    """What :func:`static_explorer` returns: displays as the Plotly figure (``text/html`` for the book, Plotly's
    own mimetype for JupyterLab). ``figure`` is the ``plotly.graph_objects.Figure``; ``combinations`` lists the
    control values in the order of ``groups`` (the indices of each combination's traces)."""

    _count = 0

    def __init__(self, figure, controls, combinations, groups):
        self.figure, self.controls, self.combinations, self.groups = figure, controls, combinations, groups
        StaticExplorer._count += 1
        self.div_id = f"sl-static-explorer-{StaticExplorer._count}"

    def visible(self, **values):
        """The trace visibility a reader sees after choosing ``values`` (every control named)."""
        key = tuple(values[name] for name in self.controls)
        index = self.combinations.index(key)
        return [i in self.groups[index] for i in range(len(self.figure.data))]

    def to_html(self) -> str:
        """A ``<div>`` and a small script that draws the figure with the page's plotly.js (never inlined: the book
        loads ``_static/vendor/plotly.min.js`` once, on the pages that have this class of div)."""
        import json

        spec = json.dumps(self.figure.to_plotly_json(), separators=(",", ":"), default=str)
        config = '{"responsive":true,"displaylogo":false,"modeBarButtonsToRemove":["toImage"]}'
        return (
            f'<div class="sl-static-explorer" id="{self.div_id}" style="width:100%;min-height:'
            f'{int(self.figure.layout.height or 400)}px"></div>\n'
            f'<script type="text/javascript">(function(){{var id="{self.div_id}",f={spec};'
            f'function draw(){{var d=document.getElementById(id);if(!d)return;if(!window.Plotly){{d.textContent='
            f'"(interactive figure: plotly.js is not loaded here; run the notebook and use the explorer above)";'
            f'return;}}window.Plotly.newPlot(d,f.data,f.layout,{config});}}'
            f'if(document.readyState==="loading"){{document.addEventListener("DOMContentLoaded",draw);}}'
            f'else{{draw();}}}})();</script>')

    def _repr_mimebundle_(self, **kwargs):
        return {"text/html": self.to_html(),
                "application/vnd.plotly.v1+json": self.figure.to_plotly_json(),
                "text/plain": f"StaticExplorer({', '.join(self.controls)}): an interactive Plotly figure"}

    def __repr__(self) -> str:
        return f"StaticExplorer(controls={list(self.controls)}, traces={len(self.figure.data)})"


def static_explorer(controls: Mapping[str, Sequence], traces: Callable[..., Sequence[Mapping[str, Any]]], *,
                    formats: Optional[Mapping[str, Callable[[Any], str]]] = None,
                    initial: Optional[Mapping[str, Any]] = None, height: int = 380,
                    **layout) -> StaticExplorer:
    """The kernel-free twin of a chapter's explorer: every combination of control values is drawn *now*, from
    precomputed results, into one Plotly figure, and the reader's slider / dropdown only switches which traces are
    visible, in the browser, with no kernel and no network (the rendered book serves plotly.js from ``_static/``).

    Arguments:
        controls: ``{name: values}`` with one or two controls. One control becomes a slider (numbers) or a
            dropdown (anything else); with two, the first becomes a dropdown and the second a slider (the slider
            keeps the dropdown's choice).
        traces: ``traces(**values)`` returns the list of Plotly trace dicts of one combination of values, e.g.
            ``[{"x": xs, "y": ys, "name": "magnitude"}]``. It must only look up precomputed results.
            Arrays may be numpy / torch; numbers are rounded to 4 significant digits to keep the page small.
        formats: ``{name: function(value) -> str}`` for the labels of a control's values (default ``str`` /
            ``{:g}``).
        initial: the values shown first (default: each control's first value).
        height: figure height in pixels (the width follows the page column).
        layout: passed to Plotly's ``Figure.update_layout`` (``title=``, ``xaxis_title=``, ``yaxis_type="log"``,
            ``yaxis_range=[0, 1]``, ...).

    Returns a :class:`StaticExplorer`; end a cell with it to show it. Example::

        >>> sl.widgets.static_explorer(
        ...     {"method": ["magnitude", "random"], "sparsity": [0.5, 0.9]},
        ...     lambda method, sparsity: [{"type": "bar", "x": layers, "y": density[method, sparsity]}],
        ...     yaxis_title="density")
    """
    import itertools

    import plotly.graph_objects as go

    if not isinstance(controls, Mapping) or not 1 <= len(controls) <= 2:
        raise ValueError(f"controls must be a dict of one or two {{name: values}}, got {controls!r}")
    for name, values in controls.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"controls[{name!r}] must be a non-empty list of values, got {values!r}")
    if not callable(traces):
        raise TypeError(f"traces must be a function traces(**values) -> list of trace dicts, got {traces!r}")
    names = list(controls)
    formats = dict(formats or {})
    unknown = set(formats) - set(names)
    if unknown:
        raise ValueError(f"formats names unknown controls {sorted(unknown)}; the controls are {names}")
    label = {name: formats.get(name, _default_format) for name in names}
    initial = dict(initial or {})
    for name, value in initial.items():
        if name not in controls or value not in list(controls[name]):
            raise ValueError(f"initial[{name!r}] must be one of {list(controls.get(name, []))}, got {value!r}")
    start = tuple(initial.get(name, controls[name][0]) for name in names)

    import json

    unique, index_of = [], {}   # a trace drawn the same in several combinations is stored once (page weight)
    combinations, groups = [], []
    for combo in itertools.product(*(list(controls[name]) for name in names)):
        drawn = traces(**dict(zip(names, combo)))
        if isinstance(drawn, Mapping) or not isinstance(drawn, Sequence):
            raise TypeError(f"traces({dict(zip(names, combo))}) must return a list of trace dicts, got {drawn!r}")
        group = []
        for trace in drawn:
            trace = _compact(dict(trace))
            trace.setdefault("type", "scatter")
            key = json.dumps(trace, sort_keys=True, default=str)
            if key not in index_of:
                index_of[key] = len(unique)
                unique.append(trace)
            if index_of[key] not in group:
                group.append(index_of[key])
        combinations.append(combo)
        groups.append(group)
    n = len(unique)
    shown = set(groups[combinations.index(start)])
    figure = go.Figure([{**trace, "visible": i in shown} for i, trace in enumerate(unique)])

    def visibility(combo):
        on = set(groups[combinations.index(combo)])
        return [i in on for i in range(n)]

    def slider(fixed_first):   # the slider over the last control; with two controls the first is held at fixed_first
        last = names[-1]
        steps = []
        for value in controls[last]:
            combo = (value,) if len(names) == 1 else (fixed_first, value)
            steps.append({"method": "restyle", "label": label[last](value), "args": [{"visible": visibility(combo)}]})
        active = list(controls[last]).index(start[-1])
        return {"active": active, "steps": steps, "currentvalue": {"prefix": f"{last}: "},
                "pad": {"t": 40, "b": 0}, "len": 1.0, "x": 0.0}

    menus = []
    # one control of numbers: a slider; of anything else (method names...): a dropdown. Two: dropdown and slider.
    dropdown = len(names) == 2 or not all(_is_number(v) for v in controls[names[0]])
    if dropdown:   # the open dropdown hangs over the plot: make room for it (plotly.js scrolls a longer list)
        height = max(height, min(150 + 36 * len(controls[names[0]]), 600))
        first_name = names[0]
        if len(names) == 2:
            buttons = [{"method": "update", "label": label[first_name](value),
                        "args": [{"visible": visibility((value, start[-1]))}, {"sliders": [slider(value)]}]}
                       for value in controls[first_name]]
        else:
            buttons = [{"method": "restyle", "label": label[first_name](value),
                        "args": [{"visible": visibility((value,))}]} for value in controls[first_name]]
        menus = [{"type": "dropdown", "buttons": buttons, "active": list(controls[first_name]).index(start[0]),
                  "x": 0.0, "xanchor": "left", "y": 1.0, "yanchor": "bottom", "pad": {"b": 8},
                  "showactive": True}]
    sliders = [] if dropdown and len(names) == 1 else [slider(start[0])]
    figure.update_layout(sliders=sliders, updatemenus=menus, height=height,
                         margin={"l": 60, "r": 20, "t": 70 if menus else 40, "b": 40},
                         template="simple_white", font={"size": 13}, legend={"font": {"size": 12}})
    if layout:
        figure.update_layout(**layout)
    if sliders:
        _fit_slider_labels(figure, [label[names[-1]](v) for v in controls[names[-1]]])
    return StaticExplorer(figure, names, combinations, groups)


def _fit_slider_labels(figure, labels: Sequence[str]) -> None:
    """Widen the figure's left and right margins so that the slider's first and last labels fit inside it.

    Plotly centres each step's label under its tick and the slider spans the plotting area, so half of the first
    and of the last label stick out beyond it; with no legend beside the plot (a choice that shows one trace)
    a long last label ("accuracy density") was cut off at the right edge of the figure, and so of the page. The
    width of a label is estimated generously (0.6 font sizes per character); margins the caller set larger stay.
    """
    size = figure.layout.font.size or 13
    half = [0.6 * size * len(str(text)) / 2 + 6 for text in (labels[0], labels[-1])]
    margin = figure.layout.margin
    figure.update_layout(margin={"l": max(margin.l or 0, round(half[0])), "r": max(margin.r or 0, round(half[1]))})


__all__ = ["Explorer", "sweep", "curves", "pruning_explorer", "structure_label", "static_explorer"]
