"""``sl.prune``: score -> select -> mask, with every method, scope and structure of the book.

Defined in Chapter 01 and extended by every chapter that adds a method (through the registry of
:mod:`sparsity_lib.scores`).

Every argument is validated here, before anything changes (no silent wrong results): the sparsity
(numpy scalars accepted), the method and its options (``seed`` must be an integer), ``loss_fn`` (a callable; the
default cross-entropy only where the targets are class indices that fit the outputs), ``data`` (a one-shot
generator is read once and kept, non-finite values refused), scores and new weights (finite), structured
selections (no layer emptied unless ``allow_empty_layers``), and, inside a ``torch.distributed`` process group
or on a ``DistributedDataParallel`` model, the agreement of all ranks on one mask (:mod:`sparsity_lib.distributed`).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import distributed as _dist
from . import scores as _scores
from .plumbing import check_finite, eval_mode
from .masks import apply_masks, check_maskable, get_masks, set_weights, validate_masks
from .select import (check_budget, check_sparsity, check_structure, global_masks, is_n_m, layerwise_masks,
                     n_m_masks)

Scope = Union[str, Mapping[str, float]]

#: Data-driven methods that never evaluate a loss (they read activations or layer inputs only): no ``loss_fn``
#: is needed, so no default is checked for them. A method may also say so itself with ``uses_loss = False``.
LOSS_FREE_METHODS = frozenset({"apoz", "mean_activation", "output_sensitivity", "wanda", "obc", "sparsegpt"})


def _check_scope(scope, names, sparsity):
    if isinstance(scope, str):
        if scope not in ("global", "layerwise"):
            raise ValueError(f"scope must be 'global', 'layerwise' or a {{name: sparsity}} budget, got {scope!r}")
        return scope, (None if scope == "global" else {n: sparsity for n in names})
    if isinstance(scope, Mapping):
        return "budget", check_budget(scope, names, "scope")
    raise ValueError(f"scope must be 'global', 'layerwise' or a {{name: sparsity}} budget, got {scope!r}")


def _check_options(method: "_scores.Method", options: dict):
    fn = method.score or method.pruner
    params = inspect.signature(fn).parameters
    if "seed" in options:
        seed = options["seed"]
        if seed is not None and (isinstance(seed, bool) or not hasattr(seed, "__index__")):
            raise TypeError(f"seed must be an integer (or None), got {seed!r}")
        if seed is not None:
            options["seed"] = int(seed.__index__())
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("model", "plan", "data", "loss_fn")]
    for key in options:
        if key not in allowed:
            raise TypeError(f"method {method.name!r} has no option {key!r}; its options are {allowed}")


def _uses_loss(spec) -> bool:
    flag = getattr(spec, "uses_loss", None)
    if isinstance(flag, bool):
        return flag
    return spec.name not in LOSS_FREE_METHODS


# ---------------------------------------------------------------------------------------------- data and loss
def _materialize(data, num_batches):
    """A one-shot iterator (generator, ``iter(loader)``) is read once here, so that methods that pass over the
    data several times (OBD, OBS, GraSP, ...) all see every batch. Lists, tuples, tensors and re-iterable loaders
    are returned as they are."""
    if data is None or isinstance(data, (torch.Tensor, list, tuple)):
        return data
    if isinstance(data, (str, bytes)):
        raise TypeError("data must be an iterable of (inputs, targets) batches (or one such batch), got a string")
    try:
        one_shot = iter(data) is data
    except TypeError:  # not iterable: a method may take its own kind of data (edgepopup takes a Task)
        return data
    if not one_shot:
        return data
    items = list(data if num_batches is None else itertools.islice(data, num_batches))
    if not items:
        raise ValueError("data is an iterator that yielded no batches (was it already consumed?): pass a list of "
                         "(inputs, targets) batches or a DataLoader, which can be read more than once")
    return items


def _items(data):
    """The batches of in-memory data (tensor, one (inputs, targets) tuple, list), or None for a loader."""
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data    # one batch: a tuple (inputs, targets), or a list [inputs, targets] with per-sample targets
        if isinstance(data, tuple) or (1 <= y.dim() < x.dim() and x.shape[0] == y.shape[0]):
            return [tuple(data)]
    if isinstance(data, (list, tuple)):
        return list(data)
    return None


def _tensors(item):
    if isinstance(item, torch.Tensor):
        return [("inputs", item)]
    if isinstance(item, (tuple, list)):
        names = ["inputs", "targets"] + [f"element {k}" for k in range(2, len(item))]
        return [(n, t) for n, t in zip(names, item) if isinstance(t, torch.Tensor)]
    return []


def _check_finite_data(items):
    for i, item in enumerate(items):
        for what, t in _tensors(item):
            check_finite(t, f"data: the {what} of batch {i}")


def _first_batch(data):
    items = _items(data)
    if items is not None:
        return items[0] if items else None
    try:
        for item in data:  # a re-iterable loader: read its first batch only
            return item
    except TypeError:  # not iterable (e.g. a Task for edgepopup): the method reads it
        pass
    return None


def _check_loss(spec, model, data, loss_fn):
    """``loss_fn`` as a callable. ``None`` becomes cross-entropy only when it is meaningful: the targets are integer
    class indices, shaped like the outputs without their class dimension (dim 1), and each below the number of
    classes; otherwise the caller must say which loss (a regression head has no classes)."""
    if loss_fn is not None:
        if isinstance(loss_fn, str):
            raise TypeError(f"loss_fn must be a callable loss_fn(outputs, targets) -> scalar tensor, e.g. "
                            f"torch.nn.functional.cross_entropy or torch.nn.MSELoss(); got the string {loss_fn!r} "
                            f"(loss names are not looked up)")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable loss_fn(outputs, targets) -> scalar tensor, e.g. "
                            f"torch.nn.functional.cross_entropy; got {type(loss_fn).__name__}")
        return loss_fn
    if not _uses_loss(spec):
        return F.cross_entropy  # passed along, never evaluated
    batch = _first_batch(data)
    tensors = dict(_tensors(batch)) if batch is not None else {}
    x, y = tensors.get("inputs"), tensors.get("targets")
    if x is None or y is None:
        return F.cross_entropy  # the method itself reports missing targets
    advice = (f"method {spec.name!r} evaluates a loss: pass loss_fn=..., e.g. torch.nn.functional.mse_loss for a "
              f"regression head")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"loss_fn is required: the default cross-entropy needs integer class targets, but the "
                         f"targets of data have dtype {y.dtype}; {advice}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        out = model(x.to(device))
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ValueError(f"loss_fn is required: the default cross-entropy needs class scores of shape "
                         f"(batch, classes, ...), but the model returns "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}; {advice}")
    expected = tuple(out.shape[:1]) + tuple(out.shape[2:])
    if tuple(y.shape) != expected:
        raise ValueError(f"loss_fn is required: the default cross-entropy reads dim 1 of the outputs "
                         f"{tuple(out.shape)} as classes and expects targets of shape {expected}, got "
                         f"{tuple(y.shape)} (for (batch, time, classes) outputs flatten them in a loss_fn); {advice}")
    classes = out.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"loss_fn is required: the targets of data range over [{int(y.min())}, {int(y.max())}], "
                         f"which are not class indices of the model's {classes} outputs; {advice}")
    return F.cross_entropy


class _Preserve:
    """Restore training mode and gradients after scoring: scoring must not change the model."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.training = {m: m.training for m in self.model.modules()}
        self.grads = {p: (None if p.grad is None else p.grad.clone()) for p in self.model.parameters()}
        return self

    def __exit__(self, *exc):
        for m, t in self.training.items():
            m.train(t)
        for p, g in self.grads.items():
            p.grad = g
        return False


@dataclasses.dataclass
class _Plan(_scores.Plan):
    """:class:`sparsity_lib.scores.Plan` that also carries ``allow_empty_layers`` into the selection."""

    allow_empty_layers: bool = False

    def select(self, scores):
        scores = {k: v for k, v in scores.items() if k in self.current}
        if is_n_m(self.structure):
            n, m = self.structure
            return n_m_masks({k: v for k, v in scores.items() if k not in self.exclude}, self.current, n, m) | {
                k: self.current[k].clone() for k in self.exclude
            }
        if self.budget is None:
            return global_masks(scores, self.current, self.sparsity, self.structure, self.exclude,
                                allow_empty_layers=self.allow_empty_layers)
        return layerwise_masks(scores, self.current, self.budget, self.structure,
                               allow_empty_layers=self.allow_empty_layers)


# ------------------------------------------------------------------------------------------------ sl.prune
def prune(model: nn.Module, sparsity: float, method: str = "magnitude", scope: Scope = "global",
          structure=None, data: Optional[Iterable] = None, loss_fn=None, *, exclude: Iterable[str] = (),
          allow_empty_layers: bool = False, sync: Optional[str] = "broadcast",
          **method_options) -> Dict[str, torch.Tensor]:
    """Prune ``model`` in place to ``sparsity`` with ``method``; return the masks (``{name: bool tensor}``).

    Arguments:
        model: any ``nn.Module``; its prunable weights are those of :func:`sparsity_lib.prunable`. A
            ``DistributedDataParallel`` model is accepted when its layers already carry masks (see "Distributed").
        sparsity: target fraction of all prunable weights removed, in [0, 1) (a Python or numpy number).
            Pruning is cumulative: weights already masked stay masked and count towards the target.
        method: a registered method name (``sl.scores.known_methods()``): "magnitude", "random", ...
        scope: ``"global"`` ranks all layers together; ``"layerwise"`` gives every layer ``sparsity``;
            a dict ``{name: sparsity}`` (e.g. from :mod:`sparsity_lib.budgets`) gives each layer its own.
        structure: ``None`` (unstructured), ``"neuron"`` (output rows / channels), ``(n, m)`` for N:M (then
            ``sparsity`` must equal ``1 - n/m``), or ``("block", rows, cols)``.
        data: calibration batches ``(inputs, targets)`` for the data-driven methods: a list, a DataLoader, one
            batch, or a one-shot generator (read once here and kept, so every pass of the method sees all of it).
            Non-finite values are refused.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for the methods that evaluate a loss. Left ``None``, it
            is cross-entropy, but only when the targets are integer class indices that fit the outputs; otherwise
            (a regression head, float targets) ``loss_fn`` must be given.
        exclude: layer names that keep their current mask (e.g. the output layer under global scope); the
            target still counts all prunable weights.
        allow_empty_layers: with ``structure`` "neuron" or blocks, every layer keeps at least its best group
            unless this is ``True`` (an emptied layer disconnects the network). When keeping them stops the target
            from being reached, a ``UserWarning`` gives the sparsity reached (``sl.sparsity`` reports it).
        sync: only inside a ``torch.distributed`` process group of several ranks (all ranks must call
            ``sl.prune`` together): ``"broadcast"`` (default) computes the masks (and any updated weights) on rank
            0 and broadcasts them, ``"scores"`` averages the scores of all ranks before selecting (score methods
            only), ``None`` prunes each rank on its own (masks may then differ). Outside a group it is ignored.
        method_options: passed to the method (e.g. ``seed`` for "random", an integer).

    Effect on the model: each pruned layer gets a :class:`sparsity_lib.masks.Mask` parametrization (see
    :func:`sparsity_lib.apply_masks`); methods that update surviving weights (OBS, ...) also change their
    stored values. Every argument is validated before anything changes: on error the model is left as it was.

    Distributed: attach masks *before* wrapping the model in ``DistributedDataParallel`` (``sl.prune`` once, or
    ``sl.apply_masks(model, sl.get_masks(model))`` for all-True masks); later ``sl.prune(ddp_model, ...)`` only
    rewrites the mask buffers, and in the process group every rank gets the same mask. A DDP model whose layers
    have no mask yet is refused (attaching one would change its parameters under DDP), and ranks whose current
    masks already differ are refused with the layers named (:func:`sparsity_lib.distributed.broadcast_masks`
    repairs that).

    Example::

        >>> masks = sl.prune(model, 0.9, method="magnitude", scope="global")
        >>> round(sl.sparsity(model), 3)
        0.9
    """
    if sync not in ("broadcast", "scores", None, "none"):
        raise ValueError(f"sync must be 'broadcast', 'scores' or None (each rank on its own), got {sync!r}")
    sync = None if sync == "none" else sync
    inner, prefix = _dist.unwrap(model)
    group = _dist.active(sync)
    call = dict(sparsity=sparsity, method=method, scope=scope, structure=structure, data=data, loss_fn=loss_fn,
                exclude=exclude, allow_empty_layers=allow_empty_layers, method_options=method_options)
    if group is None:
        job = _prepare(model, inner, prefix, **call)
        return _finish(job, *_compute(job))
    return _dist.agreed_prune(inner, prefix, sync, lambda: _prepare(model, inner, prefix, **call), _compute, _finish)


def _strip(names, prefix, arg):
    """Names as seen on a DDP wrapper ("module.fc1.weight") or on its module ("fc1.weight"): the latter."""
    if not prefix:
        return names
    return [n[len(prefix):] if isinstance(n, str) and n.startswith(prefix) else n for n in names]


def _prepare(model, inner, prefix, *, sparsity, method, scope, structure, data, loss_fn, exclude,
             allow_empty_layers, method_options):
    """Validate every argument against ``inner`` (the model itself, or the module inside a DDP wrapper);
    nothing changes here. Returns everything :func:`_compute` and :func:`_finish` need."""
    sparsity = check_sparsity(sparsity)
    spec = _scores.get_method(method)
    structure = check_structure(structure)
    if not isinstance(allow_empty_layers, bool):
        raise TypeError(f"allow_empty_layers must be True or False, got {allow_empty_layers!r}")
    current = get_masks(inner)  # raises for a model without prunable weights
    names = list(current)
    exclude = tuple([exclude] if isinstance(exclude, str) else exclude)
    exclude = tuple(_strip(exclude, prefix, "exclude"))
    for name in exclude:
        if name not in current:
            raise ValueError(f"exclude: unknown layer name {name!r}; prunable weights are {names}")
    if isinstance(scope, Mapping) and prefix:
        scope = dict(zip(_strip(list(scope), prefix, "scope"), scope.values()))
    scope_kind, budget = _check_scope(scope, names, sparsity)
    if budget is not None:
        budget = {n: s for n, s in budget.items() if n not in exclude}
    # refuse layers that cannot carry a mask (someone else's weight transform, a tied weight) before any scoring
    check_maskable(inner, [n for n in names if n not in exclude and (budget is None or budget.get(n, 0) > 0)])
    if is_n_m(structure):
        n, m = structure
        if abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"structure ({n}, {m}) means sparsity 1 - n/m = {1 - n / m:g}; got sparsity={sparsity}")
    method_options = dict(method_options)
    _check_options(spec, method_options)
    if spec.needs_data:
        if data is None:
            raise ValueError(f"method {method!r} is data-driven: pass data (an iterable of (inputs, targets) batches)")
        num_batches = method_options.get("num_batches")
        if num_batches is not None and (isinstance(num_batches, bool) or not hasattr(num_batches, "__index__")
                                        or int(num_batches.__index__()) < 1):
            raise ValueError(f"num_batches must be a positive integer or None (all batches), got {num_batches!r}")
        data = _materialize(data, None if num_batches is None else int(num_batches.__index__()))
        items = _items(data)
        if items is not None:
            _check_finite_data(items)
        loss_fn = _check_loss(spec, inner, data, loss_fn)
    elif loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable loss_fn(outputs, targets) or None, got {loss_fn!r}")
    if prefix:
        _dist.check_masks_attached(inner, [n for n in names if n not in exclude and (budget is None or n in budget)],
                                   prefix)
    plan = _Plan(sparsity=sparsity, scope=scope_kind, budget=budget, structure=structure, current=current,
                 exclude=exclude, allow_empty_layers=allow_empty_layers)
    kwargs = dict(method_options)
    if spec.needs_data:
        kwargs.update(data=data, loss_fn=loss_fn)
    return dict(model=inner, prefix=prefix, spec=spec, plan=plan, kwargs=kwargs, names=names, current=current)


def _scores_of(job) -> Dict[str, torch.Tensor]:
    """The raw scores of a score method (no selection): used by :func:`_compute` and by ``sync="scores"``."""
    spec, model = job["spec"], job["model"]
    with _Preserve(model):
        with torch.no_grad() if not spec.needs_data else torch.enable_grad():
            layer_scores = spec.score(model, **job["kwargs"])
    missing = [n for n in job["names"] if n not in layer_scores and n not in job["plan"].exclude]
    if missing:
        raise ValueError(f"method {spec.name!r} returned no scores for {missing}")
    # +inf on a whole layer is a score's "I cannot score this layer" (bn_scale: no batch norm after it;
    # head_importance: not an attention projection), not a failure: say so, and what to pass
    unscored = [n for n, s in layer_scores.items() if n in job["current"] and n not in job["plan"].exclude
                and s.numel() and bool(torch.isposinf(s).all())]
    if unscored:
        raise ValueError(
            f"method {spec.name!r} cannot score the layers {unscored} (it gives them +inf: {spec.description}) "
            f"and does not say how much to remove from them. Pass exclude={unscored} (scope='global') to keep "
            f"them as they are, or choose a method that scores every layer; nothing was changed")
    return {n: s.detach() for n, s in layer_scores.items() if n in job["current"]}


def _compute(job, scores=None):
    """Masks (and new weights, or None) of the method; the model is not changed."""
    spec, model, plan = job["spec"], job["model"], job["plan"]
    if spec.pruner is not None:
        with _Preserve(model):
            masks, weights = spec.pruner(model, plan, **job["kwargs"])
    else:
        masks, weights = plan.select(_scores_of(job) if scores is None else scores), None
    validate_masks(model, masks)
    if weights is not None:
        validate_masks(model, {n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()})
        for name, w in weights.items():
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"method {spec.name!r} produced {int((~torch.isfinite(w)).sum())} non-finite new "
                                 f"values for {name!r} (NaN or inf: check the data and the damping); nothing was "
                                 f"changed")
    return masks, weights


def _finish(job, masks, weights):
    """Apply validated masks (never reviving a weight) and new weights; return the model's masks."""
    model, current = job["model"], job["current"]
    masks = {name: mask.to(current[name].device) & current[name] for name, mask in masks.items()}
    if weights is not None:
        set_weights(model, weights)
    apply_masks(model, masks)
    out = get_masks(model)
    return {job["prefix"] + n: m for n, m in out.items()} if job["prefix"] else out
