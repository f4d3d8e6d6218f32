"""``sl.prune``: score -> select -> mask, with every method, scope and structure of the book.

Defined in Chapter 01 and extended by every chapter that adds a method (through the registry of
:mod:`sparsity_lib.scores`).
"""

from __future__ import annotations

import inspect
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import scores as _scores
from .masks import apply_masks, get_masks, set_weights, validate_masks
from .select import check_budget, check_sparsity, check_structure, is_n_m

Scope = Union[str, Mapping[str, float]]


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
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("model", "plan", "data", "loss_fn")]
    for key in options:
        if key not in allowed:
            raise TypeError(f"method {method.name!r} has no option {key!r}; its options are {allowed}")


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


def prune(model: nn.Module, sparsity: float, method: str = "magnitude", scope: Scope = "global",
          structure=None, data: Optional[Iterable] = None, loss_fn=None, *, exclude: Iterable[str] = (),
          **method_options) -> Dict[str, torch.Tensor]:
    """Prune ``model`` in place to ``sparsity`` with ``method``; return the masks (``{name: bool tensor}``).

    Arguments:
        model: any ``nn.Module``; its prunable weights are those of :func:`sparsity_lib.prunable`.
        sparsity: target fraction of all prunable weights removed, in [0, 1). Pruning is cumulative: weights
            already masked stay masked and count towards the target.
        method: a registered method name (``sl.scores.known_methods()``): "magnitude", "random", ...
        scope: ``"global"`` ranks all layers together; ``"layerwise"`` gives every layer ``sparsity``;
            a dict ``{name: sparsity}`` (e.g. from :mod:`sparsity_lib.budgets`) gives each layer its own.
        structure: ``None`` (unstructured), ``"neuron"`` (output rows / channels), ``(n, m)`` for N:M (then
            ``sparsity`` must equal ``1 - n/m``), or ``("block", rows, cols)``.
        data, loss_fn: calibration batches ``(inputs, targets)`` and a loss (default cross-entropy) for the
            data-driven methods.
        exclude: layer names that keep their current mask (e.g. the output layer under global scope); the
            target still counts all prunable weights.
        method_options: passed to the method (e.g. ``seed`` for "random").

    Effect on the model: each pruned layer gets a :class:`sparsity_lib.masks.Mask` parametrization (see
    :func:`sparsity_lib.apply_masks`); methods that update surviving weights (OBS, ...) also change their
    stored values. Every argument is validated before anything changes: on error the model is left as it was.

    Example::

        >>> masks = sl.prune(model, 0.9, method="magnitude", scope="global")
        >>> round(sl.sparsity(model), 3)
        0.9
    """
    sparsity = check_sparsity(sparsity)
    spec = _scores.get_method(method)
    structure = check_structure(structure)
    current = get_masks(model)  # raises for a model without prunable weights
    names = list(current)
    exclude = tuple([exclude] if isinstance(exclude, str) else exclude)
    for name in exclude:
        if name not in current:
            raise ValueError(f"exclude: unknown layer name {name!r}; prunable weights are {names}")
    scope_kind, budget = _check_scope(scope, names, sparsity)
    if budget is not None:
        budget = {n: s for n, s in budget.items() if n not in exclude}
    if is_n_m(structure):
        n, m = structure
        if abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"structure ({n}, {m}) means sparsity 1 - n/m = {1 - n / m:g}; got sparsity={sparsity}")
    if spec.needs_data and data is None:
        raise ValueError(f"method {method!r} is data-driven: pass data (an iterable of (inputs, targets) batches)")
    _check_options(spec, method_options)
    if spec.needs_data and loss_fn is None:
        loss_fn = F.cross_entropy
    plan = _scores.Plan(sparsity=sparsity, scope=scope_kind, budget=budget, structure=structure, current=current,
                        exclude=exclude)
    kwargs = dict(method_options)
    if spec.needs_data:
        kwargs.update(data=data, loss_fn=loss_fn)

    weights = None
    with _Preserve(model):
        if spec.pruner is not None:
            masks, weights = spec.pruner(model, plan, **kwargs)
        else:
            with torch.no_grad() if not spec.needs_data else torch.enable_grad():
                layer_scores = spec.score(model, **kwargs)
            missing = [n for n in names if n not in layer_scores and n not in exclude]
            if missing:
                raise ValueError(f"method {method!r} returned no scores for {missing}")
            masks = plan.select({n: s for n, s in layer_scores.items() if n in current})
    validate_masks(model, masks)
    for name, mask in masks.items():  # pruning never brings a weight back
        masks[name] = mask & current[name]
    if weights is not None:
        validate_masks(model, {n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()})
        set_weights(model, weights)
    apply_masks(model, masks)
    return get_masks(model)
