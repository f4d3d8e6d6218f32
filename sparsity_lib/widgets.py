"""Live widgets of the book: explore *precomputed* results with sliders and pickers.

Every chapter has at least one widget. Its callback must be fast (well under a second), so a widget never
trains: the expensive part is computed once, in a sweep, and the widget only *looks up* a result and redraws a
figure. Three pieces:

* :class:`Explorer`: the general pattern. Give it the values each control may take, a ``lookup`` that returns the
  precomputed record for the current values, and a ``render`` that draws a record on a matplotlib Figure.
* :func:`sweep`: the precomputation behind the pruning explorer: prune copies of a trained model with every
  method x scope x structure x sparsity, evaluate them, keep accuracy, loss and masks.
* :func:`pruning_explorer`: the book's reusable explorer of a :func:`sweep` (accuracy curve, mask, layer bars);
  :func:`curves` turns a sweep into the static accuracy-vs-sparsity figure that goes next to it.

In the rendered book there is no kernel, so a widget is frozen; the chapters show the full sweep next to it in a
static figure. Ending a cell with an explorer displays the widget and nothing else (no callback repr)::

    results = sl.widgets.sweep(model, task, [0.0, 0.5, 0.8, 0.9, 0.95, 0.98])
    sl.viz.accuracy_vs_sparsity(sl.widgets.curves(results, structure=None), logit_x=True);   # static
    sl.widgets.pruning_explorer(results)                                                     # live

ipywidgets is imported only when a widget is built, so ``import sparsity_lib`` works without it.
"""

from __future__ import annotations

import base64
import copy
import inspect
import io
import itertools
import math
import numbers
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import viz
from .masks import get_masks
from .pruning import prune
from .scores import get_method
from .select import check_sparsity


# ------------------------------------------------------------------------------------------------- Explorer
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
            options = [(fmt(v), v) for v in values]
            value = initial.get(name, values[0])
            if value not in values:
                raise ValueError(f"initial[{name!r}]={value!r} is not one of the values {values}")
            common = dict(options=options, value=value, description=name, style={"description_width": "initial"})
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
        self.update()

    # ---------------------------------------------------------------------------------------------- state
    @property
    def values(self) -> Dict[str, Any]:
        """The current value of every control, ``{name: value}``."""
        return {name: control.value for name, control in self.controls.items()}

    def _on_change(self, change) -> None:
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


# ---------------------------------------------------------------------------------------------------- sweep
SWEEP_SCOPES = ("global", "layerwise")


def _structure_key(structure):
    return tuple(structure) if isinstance(structure, list) else structure


def structure_label(structure) -> str:
    """A short label for a ``structure`` argument: None -> "unstructured", (2, 4) -> "2:4", ("block", 4, 4) ->
    "block 4x4", "neuron" -> "neuron"."""
    if structure is None:
        return "unstructured"
    if isinstance(structure, (tuple, list)):
        if len(structure) == 2:
            return f"{structure[0]}:{structure[1]}"
        if len(structure) == 3 and structure[0] == "block":
            return f"block {structure[1]}x{structure[2]}"
    return str(structure)


def _metrics(result) -> Dict[str, float]:
    """``{"accuracy", "loss"}`` from what an evaluation function returned (a dict, an object or a number)."""
    if isinstance(result, Mapping):
        accuracy = result.get("accuracy", result.get("acc"))
        loss = result.get("loss")
    elif _is_number(result):
        accuracy, loss = result, None
    else:
        accuracy, loss = getattr(result, "accuracy", None), getattr(result, "loss", None)
    if accuracy is None:
        raise TypeError(
            "the evaluation must return a dict with 'accuracy' (and 'loss'), an object with those attributes, or "
            f"the accuracy as a number; got {type(result).__name__}"
        )
    as_float = lambda v: float(v.item() if hasattr(v, "item") else v)  # noqa: E731
    return {"accuracy": as_float(accuracy), "loss": float("nan") if loss is None else as_float(loss)}


def _scope_argument(model: nn.Module, scope: str, sparsity: float):
    """What ``sl.prune`` gets as ``scope``: "global"/"layerwise" as they are, a budget name as its budget."""
    from .budgets import BUDGETS

    if scope in SWEEP_SCOPES:
        return scope
    return BUDGETS[scope](model, sparsity)


def sweep(model: nn.Module, task, sparsities: Iterable[float], methods: Sequence[str] = ("magnitude", "random"),
          scopes: Sequence[str] = SWEEP_SCOPES, structures: Sequence = (None,),
          finetune: Optional[Callable[[nn.Module], Any]] = None, data: Optional[Iterable] = None,
          loss_fn: Optional[Callable] = None, seed: int = 0, *,
          evaluate: Optional[Callable] = None) -> Dict[tuple, dict]:
    """Prune copies of a trained ``model`` with every combination of method, scope, structure and sparsity and
    evaluate each: the precomputation behind :func:`pruning_explorer` (and behind the accuracy-vs-sparsity figures
    of one-shot pruning, survey §2.4.1 and Gale et al. {cite}`gale2019state`).

    For each combination: ``m = copy.deepcopy(model)``; ``sl.prune(m, sparsity, method, scope, structure, data,
    loss_fn)``; ``finetune(m)`` if given; ``sl.train.evaluate(m, task)``. ``model`` itself is never changed.

    Arguments:
        model: the trained model (it may already carry masks: pruning is cumulative).
        task: what the evaluation takes (a :class:`sparsity_lib.data.Task`).
        sparsities: target sparsities, each in [0, 1).
        methods: registered method names (``sl.scores.known_methods()``).
        scopes: ``"global"``, ``"layerwise"``, or a budget of :mod:`sparsity_lib.budgets` by name (``"uniform"``,
            ``"er"``, ``"erk"``), computed for each sparsity.
        structures: ``None``, ``"neuron"``, ``(n, m)``, ``("block", r, c)``.
        finetune: ``finetune(model)`` trains the pruned copy in place (masks stay); ``None`` = one-shot.
        data, loss_fn: calibration batches and loss for data-driven methods (default ``task.calibration()``
            when the task has one).
        seed: seeds torch before each point and is passed to methods that take a ``seed`` (``"random"``).
        evaluate: ``evaluate(model, task)`` returning ``{"accuracy", "loss"}`` (default ``sl.train.evaluate``).

    Returns ``{(method, scope, structure, sparsity): record}`` with ``record`` = ``{"accuracy", "loss", "masks"
    ({layer: bool tensor on the CPU}), "densities" ({layer: kept fraction}), "sparsity" (achieved: the fraction of
    prunable weights masked), "skipped": None}``. A combination that ``sl.prune`` rejects (e.g. N:M with a
    sparsity other than ``1 - n/m``, a layer that N:M or blocks do not tile) is not raised but recorded with
    ``"skipped"`` = the reason and NaN accuracy and loss.

    Example::

        >>> results = sweep(model, task, [0.5, 0.9], structures=(None, (2, 4)))
        >>> results[("magnitude", "global", None, 0.9)]["accuracy"]
        0.93...
        >>> results[("magnitude", "global", (2, 4), 0.9)]["skipped"]
        'structure (2, 4) means sparsity 1 - n/m = 0.5; got sparsity=0.9'
    """
    from .budgets import BUDGETS

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsities = [check_sparsity(s, "sparsities[...]") for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities must contain at least one sparsity in [0, 1)")
    methods = list(methods)
    specs = {m: get_method(m) for m in methods}  # raises ValueError listing the known methods
    scopes = list(scopes)
    for scope in scopes:
        if not isinstance(scope, str) or (scope not in SWEEP_SCOPES and scope not in BUDGETS):
            raise ValueError(f"scopes must be names among {list(SWEEP_SCOPES) + list(BUDGETS)}, got {scope!r}")
    structures = [_structure_key(s) for s in structures]
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable finetune(model) or None, got {type(finetune).__name__}")
    if evaluate is None:
        from . import train

        evaluate = train.evaluate
    if data is None and any(spec.needs_data for spec in specs.values()) and callable(getattr(task, "calibration", None)):
        data = task.calibration()

    results: Dict[tuple, dict] = {}
    for method, scope, structure, sparsity in itertools.product(methods, scopes, structures, sparsities):
        spec = specs[method]
        options = {"seed": seed} if "seed" in inspect.signature(spec.score or spec.pruner).parameters else {}
        with torch.random.fork_rng(devices=[]):  # seeded per point, and the caller's RNG state is left alone
            torch.manual_seed(seed)
            pruned = copy.deepcopy(model)
            try:
                masks = prune(pruned, sparsity, method=method, scope=_scope_argument(pruned, scope, sparsity),
                              structure=structure, data=data if spec.needs_data else None,
                              loss_fn=loss_fn if spec.needs_data else None, **options)
            except ValueError as error:  # an invalid combination (the library's validation): record why
                results[(method, scope, structure, sparsity)] = {
                    "accuracy": float("nan"), "loss": float("nan"), "masks": None, "densities": None,
                    "sparsity": float("nan"), "skipped": str(error),
                }
                continue
            if finetune is not None:
                finetune(pruned)
                masks = get_masks(pruned)
            metrics = _metrics(evaluate(pruned, task))
        masks = {name: mask.detach().to("cpu", torch.bool).clone() for name, mask in masks.items()}
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        results[(method, scope, structure, sparsity)] = {
            **metrics,
            "masks": masks,
            "densities": {name: float(m.float().mean()) for name, m in masks.items()},
            "sparsity": 1.0 - kept / total,
            "skipped": None,
        }
    return results


KEY_FIELDS = ("method", "scope", "structure")


def curves(sweep_results, metric: str = "accuracy", **fixed) -> Dict[str, tuple]:
    """Turn :func:`sweep` results into the ``{label: (sparsities, values)}`` of
    :func:`sparsity_lib.viz.accuracy_vs_sparsity`: the static figure of a whole sweep, next to its explorer.

    ``fixed`` picks one value of some key fields (``method=``, ``scope=``, ``structure=``); there is one curve per
    combination of the other fields, labelled by their values (e.g. ``"magnitude, global"``). ``metric`` is a
    record field (``"accuracy"``, ``"loss"``, ``"sparsity"``). Skipped points are left out. ``sweep_results`` may
    also be a list of sweeps of the same grid, one per seed: then ``values`` has shape ``(seeds, S)`` (over the
    sparsities valid in every seed) and the figure shows the spread over seeds.

    Example::

        >>> runs = [sweep(model, task, [0.0, 0.5, 0.9], seed=s) for s in range(3)]
        >>> sl.viz.accuracy_vs_sparsity(curves(runs, scope="global", structure=None), logit_x=True);
    """
    runs = [sweep_results] if isinstance(sweep_results, Mapping) else list(sweep_results)
    if not runs or not all(isinstance(r, Mapping) for r in runs):
        raise TypeError("sweep_results must be the dict returned by sweep, or a list of them (one per seed)")
    for name in fixed:
        if name not in KEY_FIELDS:
            raise ValueError(f"fixed fields must be among {KEY_FIELDS}, got {name!r}")
    fixed = {name: _structure_key(value) if name == "structure" else value for name, value in fixed.items()}
    free = [i for i, name in enumerate(KEY_FIELDS) if name not in fixed]
    groups: Dict[tuple, list] = {}
    for key in runs[0]:
        if all(key[KEY_FIELDS.index(name)] == value for name, value in fixed.items()):
            groups.setdefault(tuple(key[i] for i in free), []).append(key[3])
    out = {}
    for group, sparsities in groups.items():
        points = []
        for sparsity in sorted(sparsities):
            key = list(fixed.get(name) for name in KEY_FIELDS)
            for i, value in zip(free, group):
                key[i] = value
            key = (*key, sparsity)
            records = [run.get(key) for run in runs]
            if all(r is not None and r.get("skipped") is None for r in records):
                if metric not in records[0]:
                    raise ValueError(f"metric must be a record field such as 'accuracy' or 'loss', got {metric!r}")
                points.append((sparsity, [float(r[metric]) for r in records]))
        if points:
            label = ", ".join(structure_label(v) if KEY_FIELDS[i] == "structure" else str(v)
                              for i, v in zip(free, group)) or str(metric)
            values = np.array([p[1] for p in points]).T  # (seeds, S)
            out[label] = ([p[0] for p in points], values if len(runs) > 1 else values[0])
    return out


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
        raise TypeError("sweep_results must be the non-empty dict returned by sl.widgets.sweep")
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


__all__ = ["Explorer", "sweep", "curves", "pruning_explorer", "structure_label"]
