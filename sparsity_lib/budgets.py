"""Layer budgets: how much of each layer to remove for a given overall sparsity (survey §3.9, Chapter 04).

A budget is a dict ``{name: layer sparsity}`` that :func:`sparsity_lib.prune` accepts as ``scope``. Every budget
here *averages to the target*: ``sum_l s_l * p_l / sum_l p_l == sparsity`` (``p_l`` = weights of layer l), so
budgets can be compared at an equal number of surviving weights.

* :func:`uniform`: every layer gets the same sparsity;
* :func:`erdos_renyi` (ER, Mocanu et al. {cite}`mocanu2018scalable`): density of layer l proportional to
  ``(n_in + n_out) / (n_in * n_out)``;
* :func:`erk` (Erdős–Rényi-Kernel, Evci et al. {cite}`evci2020rigging`): density proportional to the sum of *all*
  dimensions of the weight over their product, ``(n_out + n_in + k_1 + ... ) / (n_out * n_in * k_1 * ...)``,
  which is ER for a Linear layer and also scales with the kernel size for convolutions.

Densities are capped at 1: a layer that the formula would make denser than dense is kept dense and the rest of
the budget is shared again among the other layers (the loop in Evci et al.'s reference implementation).
``dense`` names layers to keep dense on purpose (e.g. the first layer, as Gale et al. {cite}`gale2019state` do).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Union

import torch
from torch import nn

from .catalogue import table as _table
from .masks import prunable
from .select import check_sparsity

Shapes = Union[nn.Module, Mapping[str, Union[torch.Tensor, tuple]]]


def _shapes(model_or_shapes: Shapes) -> Dict[str, tuple]:
    if isinstance(model_or_shapes, nn.Module):
        shapes = {n: tuple(w.shape) for n, w in prunable(model_or_shapes).items()}
    else:
        shapes = {n: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for n, v in model_or_shapes.items()}
    if not shapes:
        raise ValueError("model has no prunable weights")
    return shapes


def _check_dense(dense: Iterable[str], shapes: Mapping[str, tuple]) -> set:
    dense = set([dense] if isinstance(dense, str) else dense)
    unknown = dense - set(shapes)
    if unknown:
        raise ValueError(f"dense: unknown layer name(s) {sorted(unknown)}; prunable weights are {list(shapes)}")
    return dense


def _from_raw_densities(shapes: Mapping[str, tuple], sparsity: float, raw: Mapping[str, float], dense: set):
    """Scale ``raw`` densities by one factor eps so the kept weights average to 1 - sparsity, capping at 1."""
    params = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(params.values())
    keep_total = (1.0 - sparsity) * total
    dense = set(dense)
    while True:
        keep_dense = sum(params[n] for n in dense)
        free = [n for n in shapes if n not in dense]
        if not free:
            if keep_dense > keep_total + 1e-9:
                raise ValueError(
                    f"sparsity={sparsity} cannot be reached with the layers in dense kept dense: "
                    f"they alone hold {keep_dense / total:.4f} of the weights"
                )
            break
        eps = (keep_total - keep_dense) / sum(raw[n] * params[n] for n in free)
        if eps < 0:
            raise ValueError(
                f"sparsity={sparsity} cannot be reached with the layers in dense kept dense: "
                f"they alone hold {keep_dense / total:.4f} of the weights"
            )
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 0.0 if n in dense else 1.0 - eps * raw[n] for n in shapes}


def uniform(model: Shapes, sparsity: float, dense: Iterable[str] = ()) -> Dict[str, float]:
    """The same sparsity in every layer; layers in ``dense`` stay dense and the others get a little more, so
    the overall sparsity is still ``sparsity``."""
    sparsity = check_sparsity(sparsity)
    shapes = _shapes(model)
    return _from_raw_densities(shapes, sparsity, {n: 1.0 for n in shapes}, _check_dense(dense, shapes))


def erdos_renyi(model: Shapes, sparsity: float, dense: Iterable[str] = ()) -> Dict[str, float]:
    """Erdős–Rényi budget: density proportional to (n_in + n_out) / (n_in * n_out) (kernel dims ignored)."""
    sparsity = check_sparsity(sparsity)
    shapes = _shapes(model)
    raw = {}
    for n, s in shapes.items():
        n_out, n_in = s[0], s[1] if len(s) > 1 else 1
        raw[n] = (n_in + n_out) / (n_in * n_out)
    return _from_raw_densities(shapes, sparsity, raw, _check_dense(dense, shapes))


def erk(model: Shapes, sparsity: float, dense: Iterable[str] = ()) -> Dict[str, float]:
    """Erdős–Rényi-Kernel budget: density proportional to sum(dims) / prod(dims) of each weight, capped at 1.

    Equation (Evci et al. 2020, §3): ``d_l = eps * (n_{l-1} + n_l + w_l + h_l) / (n_{l-1} * n_l * w_l * h_l)``,
    with eps chosen so that the overall density is ``1 - sparsity``.
    """
    sparsity = check_sparsity(sparsity)
    shapes = _shapes(model)
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    return _from_raw_densities(shapes, sparsity, raw, _check_dense(dense, shapes))


def overall_sparsity(model: Shapes, budget: Mapping[str, float]) -> float:
    """The overall sparsity a budget gives (its parameter-weighted mean)."""
    shapes = _shapes(model)
    params = {n: math.prod(s) for n, s in shapes.items()}
    return sum(budget.get(n, 0.0) * params[n] for n in shapes) / sum(params.values())


#: ``{name: budget function}``, read from the catalogue (``sl.catalogue("budget")``): "uniform", "er", "erk"
BUDGETS = _table("budget")
