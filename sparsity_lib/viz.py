"""Figures of the book: one look for every chapter, one function per kind of figure.

Every function draws on an ``ax`` you give it (or on a new figure when ``ax=None``) and returns what it drew on
(the ``Axes``, or the ``Figure`` for multi-panel plots). Nothing here calls ``plt.show()``: a notebook shows the
figure at the end of the cell; end the cell with ``;`` to hide the returned object's text. Chapters call
:func:`style` once in their set-up cell so that every figure of the book looks the same.

=============================  ===========================================================================
:func:`style`                  the book's matplotlib defaults, sized for the book's column (:data:`COLUMN_WIDTH`)
:func:`figsize`                the size of a figure of n x m panels that fits the column, text legible at 100%
:func:`panels`                 n panels in rows of at most 2 (or ``ncols``), sized for the column
:func:`accuracy_vs_sparsity`   mean over seeds with a shaded spread, optionally on a log-density axis
:func:`mask_image`             one mask as a black (kept) / white (pruned) image, density in the title
:func:`masks_grid`             one mask image per layer
:func:`layer_densities`        grouped bars: the density of every layer under several budgets or methods
:func:`sparsity_curve`         a schedule's sparsity over training
:func:`heatmap`                an annotated matrix (method x sparsity tables)
:func:`table`                  a rounded ``pandas.DataFrame`` for claim tables
:func:`show_source`            a function's code, highlighted, next to the equation it implements
=============================  ===========================================================================

Example::

    import sparsity_lib as sl
    sl.viz.style()
    sl.viz.accuracy_vs_sparsity({"magnitude": (sparsities, accuracies)}, logit_x=True);
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional, Sequence

import matplotlib
import matplotlib.font_manager
import numpy as np
from matplotlib import ticker

#: Width in inches of a figure that fills the book's text column. The rendered book (sphinx-book-theme, a 1280 px
#: window) gives a figure a ~688 px column, and a notebook shows a figure at ``figure.dpi`` = 100 px per inch: a
#: figure 6.6 in wide appears at its natural size, so its 9-10 pt text reads as 12-14 px at 100% zoom. A wider
#: figure is shrunk to the column and its text with it (a 13 in figure: 6-7 px, too small to read).
COLUMN_WIDTH = 6.6

#: The rcParams :func:`style` sets (sized for the book's column, readable at 100% zoom; see :data:`COLUMN_WIDTH`).
STYLE = {
    "figure.figsize": (COLUMN_WIDTH, 3.6),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,   # panels, labels and legends never overlap or leave the figure
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 10.5,
    "figure.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.8,
    "lines.markersize": 4.5,
    "image.interpolation": "nearest",
}


def figsize(ncols: int = 1, nrows: int = 1, aspect: Optional[float] = None, width: float = COLUMN_WIDTH) -> tuple:
    """``(width, height)`` in inches of a figure of ``nrows`` x ``ncols`` panels that fits the book's column.

    ``aspect`` is one panel's height / width (default 0.55 for one panel, 0.75 for two or more side by side).
    Example: ``plt.subplots(1, 2, figsize=sl.viz.figsize(2))`` is (6.6, 2.8): two legible panels.

        >>> figsize(2)
        (6.6, 2.8)
    """
    if int(ncols) < 1 or int(nrows) < 1:
        raise ValueError(f"ncols and nrows must be positive integers, got ncols={ncols}, nrows={nrows}")
    if aspect is None:
        aspect = 0.55 if ncols == 1 else 0.75
    if aspect <= 0 or width <= 0:
        raise ValueError(f"aspect and width must be positive, got aspect={aspect}, width={width}")
    height = nrows * (width / ncols) * aspect + 0.3   # + room for a title row
    return (round(float(width), 2), round(float(height), 1))


def panels(n: int, ncols: int = 2, aspect: Optional[float] = None, fig=None, sharex: bool = False,
           sharey: bool = False, **subplot_kw):
    """A figure of ``n`` panels in rows of at most ``ncols``, sized for the book's column; returns
    ``(fig, axes)`` with ``axes`` a flat list of ``n`` Axes (row by row).

    A wide row of 3-5 panels shrinks its text below legibility in the book's column: use ``panels(4)`` (two rows
    of two) instead of ``plt.subplots(1, 4)``. A last row with fewer panels is centred, every panel the same size.
    ``sharex``/``sharey`` share the axes of all panels with the first; ``subplot_kw`` goes to
    :meth:`~matplotlib.figure.Figure.add_subplot` (e.g. ``projection=``).

        >>> fig, axes = panels(3)
        >>> len(axes)
        3
    """
    n, ncols = int(n), int(ncols)
    if n < 1 or ncols < 1:
        raise ValueError(f"n and ncols must be positive integers, got n={n}, ncols={ncols}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize(ncols, nrows, aspect=aspect), layout="constrained")
    grid = fig.add_gridspec(nrows, 2 * ncols)
    axes = []
    for i in range(n):
        row, col = divmod(i, ncols)
        in_row = min(ncols, n - row * ncols)
        start = 2 * col + (ncols - in_row)   # centre a short last row
        shared = {"sharex": axes[0] if sharex and axes else None, "sharey": axes[0] if sharey and axes else None}
        axes.append(fig.add_subplot(grid[row, start:start + 2], **shared, **subplot_kw))
    return fig, axes


#: Sparsities that get a tick on a log-density axis (``logit_x=True``).
LOG_DENSITY_TICKS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


def style(**overrides) -> dict:
    """Set the book's matplotlib defaults (:data:`STYLE`, updated with ``overrides``) and return them.

    Call it once per chapter, in the set-up cell. Keys are matplotlib rcParams names; pass them as a dict
    (``style(**{"font.size": 12})``) because they contain dots.

    Example::

        >>> sl.viz.style()["axes.spines.top"]
        False
    """
    params = dict(STYLE)
    params.update(overrides)
    matplotlib.rcParams.update(params)
    return params


# -------------------------------------------------------------------------------------------------- helpers
def _new_axes(ax, figsize=None):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _percent(value: float, digits: int = 4) -> str:
    """0.9 -> '90%', 0.995 -> '99.5%', 0.999 -> '99.9%' (``digits`` significant digits)."""
    return f"{100 * value:.{digits}g}%"


class _DensityTicks(ticker.Locator):
    """The ticks of :data:`LOG_DENSITY_TICKS` in view that fit the axis without overlapping labels: the decades
    first (0, 90, 99, 99.9%), then 50, 95, 99.5%, then 80, 98, 99.8%, each kept only if it is at least a label's
    width (x) or height (y) away from those already kept. A narrow panel of a two-panel figure gets 5-6 ticks,
    a full-width axis all ten."""

    PRIORITY = (0.0, 0.9, 0.99, 0.999, 0.5, 0.95, 0.995, 0.8, 0.98, 0.998)

    def __call__(self):
        lo, hi = sorted(self.axis.get_view_interval())
        inside = [t for t in self.PRIORITY if lo - 1e-12 <= t <= hi + 1e-12]
        axes = self.axis.axes
        if len(inside) <= 2 or axes is None or axes.figure is None:
            return sorted(inside)
        is_x = self.axis is axes.xaxis
        other = axes.get_ylim()[0] if is_x else axes.get_xlim()[0]
        points = [(t, other) if is_x else (other, t) for t in inside]
        try:
            screen = axes.transData.transform(points)[:, 0 if is_x else 1]
        except Exception:  # noqa: BLE001  (no renderer or degenerate limits yet: every tick)
            return sorted(inside)
        size = matplotlib.font_manager.FontProperties(size=matplotlib.rcParams["xtick.labelsize" if is_x else
                                                                              "ytick.labelsize"]).get_size_in_points()
        gap = size * axes.figure.dpi / 72 * (3.3 if is_x else 1.5)   # "99.5%" is about 3.3 em wide
        kept = []
        for t, pos in zip(inside, screen):
            if all(abs(pos - other_pos) >= gap for _, other_pos in kept):
                kept.append((t, pos))
        return sorted(t for t, _ in kept)


def _log_density_axis(ax, axis: str = "x", lowest_density: Optional[float] = None):
    """Put sparsity s on the axis at position -log10(1 - s): equal steps for 0, 90, 99, 99.9% sparsity."""

    def forward(s):
        s = np.asarray(s, dtype=float)
        return -np.log10(np.clip(1.0 - s, 1e-9, None))

    def inverse(t):
        return 1.0 - np.power(10.0, -np.asarray(t, dtype=float))

    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    set_scale("function", functions=(forward, inverse))
    axis_obj = ax.xaxis if axis == "x" else ax.yaxis
    axis_obj.set_major_locator(_DensityTicks())
    axis_obj.set_major_formatter(ticker.FuncFormatter(lambda v, _: _percent(v)))
    axis_obj.set_minor_locator(ticker.NullLocator())


def _percent_axis(ax, axis: str = "y"):
    axis_obj = ax.xaxis if axis == "x" else ax.yaxis
    axis_obj.set_major_formatter(ticker.PercentFormatter(xmax=1.0, decimals=0))


# ------------------------------------------------------------------------------------- accuracy vs sparsity
def accuracy_vs_sparsity(results: Mapping[str, tuple], ax=None, x: str = "sparsity", ylabel: str = "test accuracy",
                         logit_x: bool = False, spread: Optional[str] = "minmax", markers: bool = True,
                         title: Optional[str] = None, colors: Optional[Sequence] = None):
    """Plot a metric against sparsity for several methods: the mean over seeds as a line with markers and the
    spread over seeds as a shaded band. Returns the ``Axes``.

    The standard figure of the pruning literature (Gale et al. {cite}`gale2019state`, Fig. 2-4; survey §8.1).

    Arguments:
        results: ``{label: (sparsities, values)}`` with ``sparsities`` of shape ``(S,)`` and ``values`` of shape
            ``(seeds, S)`` (or ``(S,)`` for a single seed); lists, NumPy arrays and tensors are accepted.
        ax: the Axes to draw on (default: a new figure).
        x: the x-axis label (what ``sparsities`` holds).
        ylabel: the y-axis label.
        logit_x: put the x axis on a *log-density* scale: position ``-log10(1 - s)``, so that 0%, 90%, 99% and
            99.9% sparsity are equally spaced and ticks read as sparsities (needs ``sparsities`` in [0, 1)).
        spread: ``"minmax"`` (band from the minimum to the maximum over seeds), ``"std"`` (mean +- one standard
            deviation) or ``None`` (no band). With one seed no band is drawn.
        markers: draw a marker at every measured sparsity.
        colors: one colour per label, in order (default: the style's colour cycle).

    One line per label (``len(ax.lines) == len(results)``) and one band per label with more than one seed.

    Example::

        >>> s = [0.0, 0.5, 0.9, 0.99]
        >>> ax = accuracy_vs_sparsity({"magnitude": (s, [[.97, .97, .95, .80], [.96, .97, .94, .78]]),
        ...                            "random": (s, [[.97, .93, .60, .20], [.96, .92, .55, .18]])}, logit_x=True)
    """
    if spread not in ("minmax", "std", None):
        raise ValueError(f"spread must be 'minmax', 'std' or None, got {spread!r}")
    if not isinstance(results, Mapping) or not results:
        raise TypeError("results must be a non-empty dict {label: (sparsities, values)}")
    ax = _new_axes(ax)
    for i, (label, pair) in enumerate(results.items()):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"results[{label!r}] must be a pair (sparsities, values), got {type(pair).__name__}")
        xs = _to_numpy(pair[0]).astype(float).reshape(-1)
        values = _to_numpy(pair[1]).astype(float)
        if values.ndim == 1:
            values = values[None, :]
        if values.ndim != 2 or values.shape[1] != len(xs):
            raise ValueError(
                f"results[{label!r}]: values must have shape (seeds, {len(xs)}) to match the {len(xs)} sparsities, "
                f"got {values.shape}"
            )
        if logit_x and ((xs < 0) | (xs >= 1)).any():
            raise ValueError(f"results[{label!r}]: logit_x needs sparsities in [0, 1), got {xs.tolist()}")
        order = np.argsort(xs, kind="stable")
        xs, values = xs[order], values[:, order]
        with warnings.catch_warnings():  # a sparsity where every seed is NaN (skipped) is simply not drawn
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
        color = None if colors is None else colors[i % len(colors)]
        (line,) = ax.plot(xs, mean, marker="o" if markers else None, label=str(label), color=color)
        if spread is not None and values.shape[0] > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if spread == "minmax":
                    low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
                else:
                    std = np.nanstd(values, axis=0)
                    low, high = mean - std, mean + std
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if logit_x:
        _log_density_axis(ax, "x")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


# ---------------------------------------------------------------------------------------------------- masks
def _as_2d_mask(mask) -> np.ndarray:
    m = _to_numpy(mask)
    if m.dtype != bool:
        m = m != 0  # a weight tensor: nonzero = kept
    if m.ndim == 0:
        raise ValueError("mask must have at least one dimension")
    if m.ndim == 1:
        return m[None, :]
    return m.reshape(m.shape[0], -1)  # a convolution (out, in, k, k) -> (out, in * k * k)


def mask_image(mask, ax=None, title: Optional[str] = None, cmap: str = "gray_r"):
    """Show a mask as an image: black = kept weight, white = pruned; the density is in the title. Returns the Axes.

    ``mask`` is a boolean tensor or array (a weight tensor also works: nonzero = kept). A Linear mask is shown
    as it is (rows = output neurons, columns = inputs); a convolution mask ``(out, in, k1, k2)`` is flattened
    to ``(out, in * k1 * k2)``, the view in which structured pruning removes rows (survey §3.1). Very wide or
    very tall masks are stretched to fill the panel.

    Example::

        >>> ax = mask_image(sl.get_masks(model)["0.weight"], title="first layer")
        >>> ax.get_title()
        'first layer: density 10%'
    """
    m = _as_2d_mask(mask)
    ax = _new_axes(ax)
    h, w = m.shape
    aspect = "equal" if max(h / w, w / h) <= 3 else "auto"
    ax.imshow(m.astype(np.uint8), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
    density = float(m.mean())
    text = f"density {_percent(density, 3)}"
    ax.set_title(f"{title}: {text}" if title else text)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():  # a thin frame, so that an all-pruned (white) region still has an edge
        spine.set_visible(True)
        spine.set_color("0.6")
        spine.set_linewidth(0.8)
    return ax


def masks_grid(masks, ncols: Optional[int] = None, panel_size: float = 1.65, suptitle: Optional[str] = None,
               fig=None):
    """One :func:`mask_image` panel per layer of ``masks`` (``{name: mask}``, or a model: its current masks).

    Returns the ``Figure``. ``ncols`` defaults to all layers in one row (at most 4 per row).

    Example::

        >>> sl.prune(model, 0.9)
        >>> fig = masks_grid(sl.get_masks(model), suptitle="global magnitude, 90%")
        >>> len(fig.axes) == len(sl.get_masks(model))
        True
    """
    from torch import nn

    if isinstance(masks, nn.Module):
        from .masks import get_masks

        masks = get_masks(masks)
    if not isinstance(masks, Mapping) or not masks:
        raise TypeError("masks must be a non-empty dict {name: mask} or a model")
    n = len(masks)
    ncols = min(n, 4) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols}")
    nrows = math.ceil(n / ncols)
    if fig is None:
        import matplotlib.pyplot as plt

        width = min(panel_size * ncols, COLUMN_WIDTH)   # never wider than the book's column
        fig = plt.figure(figsize=(width, width / ncols * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, mask) in zip(axes.flat, masks.items()):
        mask_image(mask, ax=ax, title=name)
    for ax in list(axes.flat)[n:]:
        ax.remove()
    if suptitle:
        fig.suptitle(suptitle)
    return fig


# ---------------------------------------------------------------------------------------------- layer bars
def _short_count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    if n >= 1_000:
        return f"{n / 1e3:.3g}k"
    return str(int(n))


def layer_densities(budgets: Mapping[str, Mapping[str, float]], ax=None, kind: str = "density",
                    params: Optional[Mapping[str, int]] = None, log: bool = False, colors: Optional[Sequence] = None,
                    title: Optional[str] = None):
    """Grouped bars of the *density* (fraction of weights kept) of every layer, one colour per label.
    Returns the Axes.

    Shows how a budget spreads a global sparsity over the layers (survey §3.9): uniform gives every layer the
    same density, ERK {cite}`evci2020rigging` and global magnitude keep small layers denser.

    Arguments:
        budgets: ``{label: {layer: value}}``, e.g. ``{"uniform": sl.budgets.uniform(model, 0.9),
            "ERK": sl.budgets.erk(model, 0.9)}``. Layers are shown in order of first appearance; a layer missing
            from a label has no bar there.
        kind: what the values are: ``"density"`` (kept fraction) or ``"sparsity"`` (removed fraction, as
            :mod:`sparsity_lib.budgets` returns; shown as ``1 - value``).
        params: ``{layer: number of weights}``; when given, each layer's tick label also shows its size.
        log: a logarithmic density axis (for budgets that span orders of magnitude).
        colors: one colour per label (default: the style's colour cycle).

    Draws ``len(budgets) * number of layers`` bars (``ax.containers`` holds one ``BarContainer`` per label).

    Example::

        >>> ax = layer_densities({"ERK": sl.budgets.erk(model, 0.9)}, kind="sparsity",
        ...                      params={n: w.numel() for n, w in sl.prunable(model).items()})
    """
    if kind not in ("density", "sparsity"):
        raise ValueError(f"kind must be 'density' or 'sparsity' (what the values are), got {kind!r}")
    if not isinstance(budgets, Mapping) or not budgets:
        raise TypeError("budgets must be a non-empty dict {label: {layer: value}}")
    layers = []
    for label, budget in budgets.items():
        if not isinstance(budget, Mapping):
            raise TypeError(f"budgets[{label!r}] must be a dict {{layer: {kind}}}, got {type(budget).__name__}")
        for layer in budget:
            if layer not in layers:
                layers.append(layer)
    ax = _new_axes(ax)
    n_labels = len(budgets)
    width = 0.8 / n_labels
    positions = np.arange(len(layers))
    for i, (label, budget) in enumerate(budgets.items()):
        values = np.array([float(budget[layer]) if layer in budget else np.nan for layer in layers])
        if ((values < 0) | (values > 1)).any():
            raise ValueError(f"budgets[{label!r}]: every {kind} must lie in [0, 1], got {values.tolist()}")
        densities = values if kind == "density" else 1.0 - values
        keep = ~np.isnan(densities)
        color = None if colors is None else colors[i % len(colors)]
        ax.bar(positions[keep] + (i - (n_labels - 1) / 2) * width, densities[keep], width=width, label=str(label),
               color=color)
    ticks = list(layers)
    if params is not None:
        ticks = [f"{layer}\n{_short_count(params[layer])}" if layer in params else layer for layer in layers]
    ax.set_xticks(positions)
    ax.set_xticklabels(ticks, rotation=0 if len(layers) <= 6 else 45, ha="center" if len(layers) <= 6 else "right")
    ax.grid(False, axis="x")
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.05)
        _percent_axis(ax, "y")
    ax.set_ylabel("density (kept)")
    if title:
        ax.set_title(title)
    if n_labels > 1:
        ax.legend()
    return ax


# ------------------------------------------------------------------------------------------------ schedules
def sparsity_curve(steps, sparsities, ax=None, label: Optional[str] = None, xlabel: str = "training step",
                   drawstyle: str = "default", marks: Optional[Sequence] = None, **plot_options):
    """Plot a schedule's sparsity over training as one line (the y axis in percent, 0 to 100%). Returns the Axes.

    E.g. the gradual schedule of Zhu & Gupta {cite}`zhu2017prune` ``s_t = s_f + (s_i - s_f)(1 - (t - t_0) /
    (n Δt))^3`` (survey §2.4.2) from :func:`sparsity_lib.schedules.polynomial`; use ``drawstyle="steps-post"``
    for schedules that jump (one-shot, iterative pruning). Call again on the same ``ax`` to compare schedules.

    Arguments:
        steps, sparsities: equal-length sequences (the sparsity at each step, in [0, 1]).
        label: legend entry (a legend is drawn when any line has a label).
        marks: steps at which to draw a dot on the curve (e.g. when masks were updated).
        plot_options: passed to ``ax.plot`` (color, linestyle, ...).

    Example::

        >>> steps = range(0, 1001, 10)
        >>> s = [sl.schedules.polynomial(t, 0.0, 0.9, 100, 800) for t in steps]
        >>> ax = sparsity_curve(steps, s, label="cubic, 0 -> 90%")
    """
    as_array = lambda v: _to_numpy(v if hasattr(v, "__len__") else list(v)).astype(float).reshape(-1)  # noqa: E731
    xs, ys = as_array(steps), as_array(sparsities)
    if len(xs) != len(ys):
        raise ValueError(f"steps and sparsities must have the same length, got {len(xs)} and {len(ys)}")
    ax = _new_axes(ax)
    (line,) = ax.plot(xs, ys, label=label, drawstyle=drawstyle, **plot_options)
    if marks is not None:
        marks = np.asarray(list(marks), dtype=float)
        ax.plot(marks, np.interp(marks, xs, ys), "o", color=line.get_color(), linestyle="none")
    ax.set_ylim(-0.02, 1.02)
    _percent_axis(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sparsity")
    if any(not str(l.get_label()).startswith("_") for l in ax.lines):
        ax.legend()
    return ax


# -------------------------------------------------------------------------------------------------- heatmap
def heatmap(matrix, row_labels: Sequence, col_labels: Sequence, ax=None, fmt: str = ".2f", cmap: str = "viridis",
            colorbar: bool = True, vmin: Optional[float] = None, vmax: Optional[float] = None,
            xlabel: Optional[str] = None, ylabel: Optional[str] = None, title: Optional[str] = None):
    """An annotated heatmap: one coloured cell per entry of ``matrix`` with its value written in it
    (formatted with ``fmt``; NaN cells are left blank and marked "–"). Returns the Axes.

    Used for method x sparsity tables (accuracy of every method at every sparsity, Chapter 14 and Gale et al.
    {cite}`gale2019state`). Text is white on dark cells and black on light ones. Draws one image and
    ``rows * cols`` texts.

    Example::

        >>> ax = heatmap([[0.97, 0.95], [0.96, 0.60]], ["magnitude", "random"], ["90%", "99%"],
        ...              xlabel="sparsity", title="test accuracy")
    """
    data = _to_numpy(matrix).astype(float)
    if data.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {data.shape}")
    if len(row_labels) != data.shape[0] or len(col_labels) != data.shape[1]:
        raise ValueError(
            f"matrix has shape {data.shape} but there are {len(row_labels)} row_labels and {len(col_labels)} col_labels"
        )
    ax = _new_axes(ax)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(np.arange(data.shape[1]), labels=[str(c) for c in col_labels])
    ax.set_yticks(np.arange(data.shape[0]), labels=[str(r) for r in row_labels])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    lo, hi = image.norm.vmin, image.norm.vmax
    colormap = image.get_cmap()
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            if math.isnan(v):
                ax.text(j, i, "–", ha="center", va="center", color="0.4")
                continue
            rgba = colormap(0.5 if hi == lo else (v - lo) / (hi - lo))
            luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, format(v, fmt), ha="center", va="center", color="black" if luminance > 0.5 else "white")
    if colorbar:
        ax.figure.colorbar(image, ax=ax)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


# ---------------------------------------------------------------------------------------------------- table
def table(rows, decimals: int = 3, index: Optional[str] = None):
    """A ``pandas.DataFrame`` of ``rows`` with every float rounded to ``decimals``: the claim tables of the book.

    ``rows`` is a list of dicts (one per row), a dict of dicts (``{row label: {column: value}}``) or a
    DataFrame; ``index`` names a column to use as the index. Tensors and NumPy scalars become plain numbers.

    Example::

        >>> table([{"method": "magnitude", "accuracy": 0.95123}, {"method": "random", "accuracy": 0.6}],
        ...       index="method")
                   accuracy
        method
        magnitude     0.951
        random        0.600
    """
    import pandas as pd

    def plain(v):
        if hasattr(v, "detach") and getattr(v, "numel", lambda: 0)() == 1:
            return v.item()
        if isinstance(v, np.generic):
            return v.item()
        return v

    if isinstance(rows, pd.DataFrame):
        frame = rows.copy()
    elif isinstance(rows, Mapping):
        frame = pd.DataFrame.from_dict({k: {c: plain(v) for c, v in r.items()} for k, r in rows.items()},
                                       orient="index")
    else:
        rows = list(rows)
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("rows must be a list of dicts, a dict of dicts or a pandas DataFrame")
        frame = pd.DataFrame([{c: plain(v) for c, v in r.items()} for r in rows])
    if index is not None:
        if index not in frame.columns:
            raise ValueError(f"index must be one of the columns {list(frame.columns)}, got {index!r}")
        frame = frame.set_index(index)
    return frame.round(decimals)


# ------------------------------------------------------------------------------------------------ source code
class SourceCode:
    """Code to show in a notebook and in the rendered book: highlighted HTML (Pygments with inline styles, so
    it needs no stylesheet and works offline), Markdown (a fenced ``python`` block) or plain text. ``code`` is
    the text shown, ``title`` where it comes from (file and lines)."""

    def __init__(self, code: str, title: str = ""):
        self.code = code
        self.title = title

    def _repr_html_(self) -> str:
        import html

        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        body = highlight(self.code, PythonLexer(), HtmlFormatter(noclasses=True, style="default", nobackground=True))
        caption = (f'<div style="font-size:0.85em;color:#555;margin-bottom:2px"><code>{html.escape(self.title)}'
                   "</code></div>") if self.title else ""
        return (f'<div class="sl-source" style="border-left:3px solid #ccc;padding:2px 8px;margin:4px 0;'
                f'background:#f8f8f8">{caption}{body}</div>')

    def _repr_markdown_(self) -> str:
        caption = f"`{self.title}`\n\n" if self.title else ""
        return f"{caption}```python\n{self.code}\n```"

    def __str__(self) -> str:
        return self.code

    def __repr__(self) -> str:
        return (f"# {self.title}\n" if self.title else "") + self.code


def _line_of(lines: Sequence[str], marker: str, first: int, what: str) -> int:
    for i in range(first, len(lines)):
        if marker in lines[i]:
            return i
    raise ValueError(f"{what}={marker!r} is not in the source after its docstring")


def show_source(obj, docstring: bool = False, start: Optional[str] = None, end: Optional[str] = None) -> SourceCode:
    """The source code of a function, method or class of the library (or any Python object with source),
    highlighted: end a notebook cell with it to show the code next to the equation it implements, e.g.
    ``sl.viz.show_source(sl.lottery.imp, start="def target")``.

    Arguments:
        obj: the function, method or class.
        docstring: keep the docstring (default: drop it; the prose around the cell explains).
        start: show the body from the first line that contains this text (after the signature and a ``...``
            line that says how many lines were left out, e.g. argument checks); an absent text raises
            ``ValueError``, so a chapter notices when the code it shows changed.
        end: stop after the first line (from ``start`` on) that contains this text.

    Returns a :class:`SourceCode` (HTML with inline styles in a notebook and in the rendered book, Markdown or
    text elsewhere); its ``title`` gives the file and the lines shown.
    """
    import ast
    import inspect
    import textwrap

    try:
        lines, first_line = inspect.getsourcelines(obj)
        path = inspect.getsourcefile(obj) or "?"
    except (TypeError, OSError) as error:
        raise TypeError(f"obj must be a function, method or class with Python source, got {obj!r}: {error}") from None
    text = textwrap.dedent("".join(lines))
    lines = text.splitlines()
    node = ast.parse(text).body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        raise TypeError(f"obj must be a function, method or class, got {type(obj).__name__}")
    body_start = node.body[0].lineno - 1  # 0-based index of the first statement of the body
    header = lines[:body_start]
    has_doc = (isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
               and isinstance(node.body[0].value.value, str))
    after_doc = node.body[0].end_lineno if has_doc else body_start
    if has_doc and len(node.body) == 1:
        after_doc = len(lines)
    doc = lines[body_start:after_doc] if has_doc and docstring else []
    begin = after_doc
    shown = header + doc
    indent = " " * (len(lines[after_doc]) - len(lines[after_doc].lstrip())) if after_doc < len(lines) else "    "
    if start is not None:
        begin = _line_of(lines, start, after_doc, "start")
        if begin > after_doc:
            shown.append(f"{indent}...  # {begin - after_doc} lines left out (argument checks, set-up)")
    stop = len(lines)
    if end is not None:
        stop = _line_of(lines, end, begin, "end") + 1
    shown += lines[begin:stop]
    if stop < len(lines):
        shown.append(f"{indent}...  # {len(lines) - stop} more lines")
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds sparsity_lib/
    where = os.path.relpath(path, root) if os.path.abspath(path).startswith(root + os.sep) else path
    title = f"{where}, lines {first_line}-{first_line + len(lines) - 1}: {getattr(obj, '__qualname__', obj)}"
    return SourceCode("\n".join(shown), title)


__all__ = ["STYLE", "style", "accuracy_vs_sparsity", "mask_image", "masks_grid", "layer_densities", "sparsity_curve",
           "heatmap", "table", "show_source", "SourceCode"]
