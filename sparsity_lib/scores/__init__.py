"""Scores: how important is each weight? (step 1 of *score -> select -> mask*, survey §3).

A *score function* returns ``{name: tensor}`` with one tensor per prunable weight, shaped like the weight,
**higher = keep**, with the signature ``fn(model, *, data=None, loss_fn=None, **options)``; data-driven ones
receive ``data`` (an iterable of ``(inputs, targets)`` batches) and ``loss_fn``. Methods that do more than score,
because they also update the surviving weights (OBS, OBC, SparseGPT) or choose their masks by their own rule,
are *pruners*: given a :class:`Plan` (what to reach), they return the new masks and, optionally, new weights.

The library's methods are listed once, in :mod:`sparsity_lib.catalogue` (``sl.catalogue()``); :data:`METHODS`,
:func:`get_method` and :func:`known_methods` read that list. User code adds its own methods with a decorator, and
from then on every part of the library (``sl.prune``, the schedules, the experiment runner) can use them::

    @sl.scores.register("abs_cubed", description="|w|^3")
    def abs_cubed(model):
        return {name: w.detach().abs() ** 3 for name, w in sl.prunable(model).items()}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import MutableMapping
from typing import Callable, Dict, Mapping, Optional

import torch

from ..masks import prunable


@dataclass
class Method:
    """A pruning method as ``sl.prune`` uses it: a score function, or a full pruner."""

    name: str
    score: Optional[Callable] = None
    pruner: Optional[Callable] = None
    needs_data: bool = False
    description: str = ""

    @property
    def kind(self) -> str:
        return "score" if self.score is not None else "pruner"


_USER: Dict[str, Method] = {}  # methods registered by user code (sl.scores.register); the library's are in catalogue


def _builtin(name):
    from ..catalogue import ENTRIES, PRUNE_KINDS

    for entry in ENTRIES:
        if entry.name == name and entry.kind in PRUNE_KINDS:
            return entry
    return None


class _Methods(MutableMapping):
    """``{name: Method}``: the library's methods (read from :data:`sparsity_lib.catalogue.ENTRIES`, imported on
    first use) and those registered by user code. Only user methods can be removed."""

    def __init__(self):
        self._resolved: Dict[str, Method] = {}

    def _builtin_names(self):
        from ..catalogue import ENTRIES, PRUNE_KINDS

        return [e.name for e in ENTRIES if e.kind in PRUNE_KINDS]

    def __getitem__(self, name) -> Method:
        if name in _USER:
            return _USER[name]
        if name not in self._resolved:
            entry = _builtin(name) if isinstance(name, str) else None
            if entry is None:
                raise KeyError(name)
            fn = entry.resolve()
            self._resolved[name] = Method(name=name, needs_data=entry.needs_data, description=entry.description,
                                          **{"score" if entry.kind == "score" else "pruner": fn})
        return self._resolved[name]

    def __setitem__(self, name, method) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"METHODS values are scores.Method objects, got {type(method).__name__}")
        if _builtin(name) is not None:
            raise ValueError(f"{name!r} is a method of the library (sparsity_lib/catalogue.py); choose another name")
        _check_name(name)
        _USER[name] = method

    def __delitem__(self, name) -> None:
        if name in _USER:
            del _USER[name]
        elif _builtin(name) is not None:
            raise TypeError(f"{name!r} is a method of the library, listed in sparsity_lib/catalogue.py: it cannot be "
                            "removed")
        else:
            raise KeyError(name)

    def __iter__(self):
        return iter(self._builtin_names() + [n for n in _USER if _builtin(n) is None])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __contains__(self, name) -> bool:
        return name in _USER or (isinstance(name, str) and _builtin(name) is not None)

    def __repr__(self) -> str:
        return f"METHODS({sorted(self)})"


#: ``{name: Method}`` of every method ``sl.prune`` knows (see :class:`_Methods`)
METHODS = _Methods()


def _check_name(name: str):
    if not isinstance(name, str) or name != name.lower() or not name:
        raise ValueError(f"method names are short lowercase strings, got {name!r}")


def _add(name: str, fn, needs_data: bool, description: str, kind: str):
    _check_name(name)
    entry = _builtin(name)
    if entry is not None:
        if entry.target == f"{fn.__module__}:{fn.__qualname__}":
            return  # the library's own function, still decorated in its module: the catalogue already lists it
        raise ValueError(f"{name!r} is a method of the library (sparsity_lib/catalogue.py); choose another name")
    description = description or (fn.__doc__ or "").strip().split("\n")[0]
    _USER[name] = Method(name=name, needs_data=needs_data, description=description, **{kind: fn})


def register(name: str, *, needs_data: bool = False, description: str = ""):
    """Decorator for user code: register a score function ``fn(model, *, data=None, loss_fn=None, **options)``
    under ``name`` (the library's own methods are listed in :mod:`sparsity_lib.catalogue`)."""

    def decorator(fn):
        _add(name, fn, needs_data, description, "score")
        return fn

    return decorator


def register_pruner(name: str, *, needs_data: bool = False, description: str = ""):
    """Decorator for user code: register a pruner ``fn(model, plan, *, data=None, loss_fn=None, **options) ->
    (masks, weights)``.

    ``plan`` is a :class:`Plan`. The pruner must not change the model: it returns the new masks
    (``{name: bool tensor}`` for the layers it prunes) and ``weights`` (``{name: tensor}`` of new values for
    surviving weights, or ``None``); :func:`sparsity_lib.prune` validates both and then applies them.
    """

    def decorator(fn):
        _add(name, fn, needs_data, description, "pruner")
        return fn

    return decorator


def user_methods() -> list:
    """The methods registered by user code (not by the library), in registration order."""
    return [m for n, m in _USER.items() if _builtin(n) is None]


def known_methods() -> list:
    """Sorted names of every method ``sl.prune`` accepts."""
    return sorted(METHODS)


def get_method(name) -> Method:
    """The :class:`Method` called ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {known_methods()}, got {name!r}")
    return METHODS[name]


@dataclass
class Plan:
    """What :func:`sparsity_lib.prune` was asked to reach, handed to a pruner.

    ``sparsity`` is the overall target; ``budget`` the per-layer targets (``None`` under global scope);
    ``structure`` the canonical structure; ``current`` the masks already on the model; ``exclude`` layers that
    must keep their current mask. :meth:`select` turns any scores into masks with the library's standard
    selection, so a pruner that only needs a special score plus a weight update can reuse it.
    """

    sparsity: float
    scope: str
    budget: Optional[Dict[str, float]]
    structure: object
    current: Dict[str, torch.Tensor]
    exclude: tuple = field(default_factory=tuple)

    def select(self, scores: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        from ..select import global_masks, is_n_m, layerwise_masks, n_m_masks

        if is_n_m(self.structure):
            n, m = self.structure
            return n_m_masks({k: v for k, v in scores.items() if k not in self.exclude}, self.current, n, m) | {
                k: self.current[k].clone() for k in self.exclude
            }
        if self.budget is None:
            return global_masks(scores, self.current, self.sparsity, self.structure, self.exclude)
        return layerwise_masks(scores, self.current, self.budget, self.structure)


# ------------------------------------------------------------------------------------- the two base methods
def magnitude(model):
    """Magnitude score ``|w|`` (Han et al. {cite}`han2015learning`; survey §3.2). Defined in Chapter 01."""
    return {name: w.detach().abs() for name, w in prunable(model).items()}


def random(model, seed: Optional[int] = None):
    """Random scores (uniform in [0, 1)): random pruning, the control of survey §3.1. ``seed`` makes it repeatable."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return {name: torch.rand(w.shape, generator=generator).to(w.device) for name, w in prunable(model).items()}


__all__ = ["Method", "METHODS", "Plan", "register", "register_pruner", "known_methods", "get_method", "user_methods", "magnitude", "random"]


# ------------------------------------------- data-driven, first-order and at-initialization criteria (Ch. 05, 08)
from . import activations, first_order, at_init  # noqa: E402,F401
from .activations import (NEURON_CRITERIA, activation_statistics, apoz, mean_activation, neuron_scores,  # noqa: E402,F401
                          oracle_neuron_loss_increase, output_sensitivity, output_sensitivity_per_neuron)
from .first_order import (MovementScore, movement, per_row_masks, taylor, taylor_neuron, taylor_per_neuron,  # noqa: E402,F401
                          wanda, wanda_input_norms)
from .at_init import grasp, hessian_gradient_product, layer_connectivity, linearized_copy, snip, synflow  # noqa: E402,F401
from .activations import prune_neurons_iteratively, remove_lowest_neurons  # noqa: E402,F401  (Chapter 05)
