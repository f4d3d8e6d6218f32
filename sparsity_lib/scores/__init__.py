"""Scores: how important is each weight? (step 1 of *score -> select -> mask*, survey §3).

A *score function* returns ``{name: tensor}`` with one tensor per prunable weight, shaped like the weight,
**higher = keep**. It is registered under a short lowercase name, and from then on every part of the library
(``sl.prune``, the gradual pruner, the widgets) can use it::

    @register("magnitude", description="|w|")
    def magnitude(model, **options):
        return {name: w.detach().abs() for name, w in prunable(model).items()}

Score functions have the signature ``fn(model, *, data=None, loss_fn=None, **options)``; those registered with
``needs_data=True`` receive ``data`` (an iterable of ``(inputs, targets)`` batches) and ``loss_fn``.

Methods that do more than score, because they also update the surviving weights (OBS, OBC, SparseGPT) or
choose their masks by their own greedy rule, register a *pruner* with :func:`register_pruner` instead: it is
given a :class:`Plan` (what to reach) and returns the new masks and, optionally, new weight values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional

import torch

from ..masks import prunable


@dataclass
class Method:
    """A registered pruning method: a score function, or a full pruner."""

    name: str
    score: Optional[Callable] = None
    pruner: Optional[Callable] = None
    needs_data: bool = False
    description: str = ""


METHODS: Dict[str, Method] = {}


def _check_name(name: str):
    if not isinstance(name, str) or name != name.lower() or not name:
        raise ValueError(f"method names are short lowercase strings, got {name!r}")


def register(name: str, *, needs_data: bool = False, description: str = ""):
    """Decorator: register a score function ``fn(model, *, data=None, loss_fn=None, **options)`` under ``name``."""
    _check_name(name)

    def decorator(fn):
        METHODS[name] = Method(name=name, score=fn, needs_data=needs_data, description=description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorator


def register_pruner(name: str, *, needs_data: bool = False, description: str = ""):
    """Decorator: register a pruner ``fn(model, plan, *, data=None, loss_fn=None, **options) -> (masks, weights)``.

    ``plan`` is a :class:`Plan`. The pruner must not change the model: it returns the new masks
    (``{name: bool tensor}`` for the layers it prunes) and ``weights`` (``{name: tensor}`` of new values for
    surviving weights, or ``None``); :func:`sparsity_lib.prune` validates both and then applies them.
    """
    _check_name(name)

    def decorator(fn):
        METHODS[name] = Method(name=name, pruner=fn, needs_data=needs_data, description=description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorator


def known_methods() -> list:
    return sorted(METHODS)


def get_method(name) -> Method:
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
@register("magnitude", description="|w|: keep the largest weights (survey §3.2)")
def magnitude(model):
    """Magnitude score ``|w|`` (Han et al. {cite}`han2015learning`; survey §3.2). Defined in Chapter 01."""
    return {name: w.detach().abs() for name, w in prunable(model).items()}


@register("random", description="uniform random scores: the baseline every criterion must beat")
def random(model, seed: Optional[int] = None):
    """Random scores (uniform in [0, 1)): random pruning, the control of survey §3.1. ``seed`` makes it repeatable."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return {name: torch.rand(w.shape, generator=generator).to(w.device) for name, w in prunable(model).items()}


__all__ = ["Method", "METHODS", "Plan", "register", "register_pruner", "known_methods", "get_method", "magnitude", "random"]


# ------------------------------------------- data-driven, first-order and at-initialization criteria (Ch. 05, 08)
from . import activations, first_order, at_init  # noqa: E402,F401
from .activations import (NEURON_CRITERIA, activation_statistics, apoz, mean_activation, neuron_scores,  # noqa: E402,F401
                          oracle_neuron_loss_increase, output_sensitivity, output_sensitivity_per_neuron)
from .first_order import (MovementScore, movement, per_row_masks, taylor, taylor_neuron, taylor_per_neuron,  # noqa: E402,F401
                          wanda, wanda_input_norms)
from .at_init import grasp, hessian_gradient_product, layer_connectivity, linearized_copy, snip, synflow  # noqa: E402,F401
from .activations import prune_neurons_iteratively, remove_lowest_neurons  # noqa: E402,F401  (Chapter 05)
