"""Pruning at initialization: SNIP, GraSP, SynFlow (survey §2.4.3 "sparse training", fixed sparsity).

These criteria choose a sparse network *before* training, from the randomly initialized weights:

* **SNIP** (Lee et al. {cite}`lee2019snip`): connection sensitivity ``|g * w|`` on one batch;
* **GraSP** (Wang et al. {cite}`wang2020picking`): keep the weights whose removal would *reduce the gradient
  flow* ``g^T g`` most, scored by the Hessian-gradient product ``-w * Hg``;
* **SynFlow** (Tanaka et al. {cite}`tanaka2020pruning`): no data at all. The "synaptic flow" ``R = 1^T (prod_l
  |W_l|) 1`` of the network with every weight replaced by its absolute value is conserved layer by layer; pruning
  iteratively by ``|w * dR/dw|`` with an exponential schedule avoids *layer collapse*, where a layer loses all its
  weights and the network is disconnected (what one-shot SNIP or global magnitude can do at extreme sparsity).

:func:`layer_connectivity` answers "is the masked network still connected?" and counts the neurons still on a
path from input to output (Chapter 04 and 08 on layer collapse).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..masks import _check_has_prunable, _original, apply_masks
from ..select import is_n_m
from . import Plan
from ._common import (batch_size, batches, check_loss_fn, check_num_batches, effective_weights, scoring,
                      weight_params)
from .first_order import _grads


def _mean_gradient(model, params, items, loss_fn, temperature=None):
    """Batch-size-weighted mean of the per-batch gradients = gradient of the loss over all the items."""
    total, acc = 0, None
    for x, y in items:
        g = _grads(model, params, x, y, loss_fn, scale=temperature)
        b = batch_size(x)
        acc = {n: v.detach() * b for n, v in g.items()} if acc is None else {n: acc[n] + g[n].detach() * b for n in g}
        total += b
    return {n: v / total for n, v in acc.items()}


# --------------------------------------------------------------------------------------------------- SNIP
def snip(model: nn.Module, data=None, loss_fn=None, num_batches: Optional[int] = 1,
         normalize: bool = True) -> Dict[str, torch.Tensor]:
    """SNIP connection sensitivity (Lee et al. {cite}`lee2019snip`, eq. 6; survey §2.4.3)::

        s_i = |g_i * w_i| / sum_k |g_k * w_k|

    ``g = dL/dw`` on the first batch of ``data`` (the paper uses a single batch, about one example per class);
    with ``num_batches=k`` (or ``None``: all batches) ``g`` is the gradient of the loss over those batches
    (batch-size-weighted mean). The normalization by the sum over all weights (``normalize``) does not change the
    ranking. Returns ``{name: tensor}``, higher = keep; the model is not changed. Defined in Chapter 08.
    """
    loss_fn = check_loss_fn(loss_fn)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    items = batches(data, model, check_num_batches(num_batches), need_targets=True)
    with scoring(model) as modules:
        params, w = weight_params(modules), effective_weights(modules)
        g = _mean_gradient(model, params, items, loss_fn)
        scores = {n: (g[n] * w[n]).abs() for n in modules}
    if normalize:
        total = sum(float(s.double().sum()) for s in scores.values())
        if total > 0:
            scores = {n: s / total for n, s in scores.items()}
    return scores


# -------------------------------------------------------------------------------------------------- GraSP
def hessian_gradient_product(model: nn.Module, data, loss_fn=None, num_batches: Optional[int] = 1,
                             temperature: float = 1.0):
    """``(g, Hg)`` for the prunable weights, by double backpropagation (Pearlmutter's trick)::

        g = dL/dw (detached),   z = g^T dL/dw,   Hg = dz/dw

    ``L`` is ``loss_fn(model(x) / temperature, y)`` averaged over the first ``num_batches`` batches (batch-size
    weighted); ``H`` is the Hessian of that loss with respect to the prunable weights only (biases and other
    parameters held fixed), as in Wang et al.'s reference implementation {cite}`wang2020picking` (survey §2.4.3). Returns two dicts ``{name: tensor}``.
    """
    loss_fn = check_loss_fn(loss_fn)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    items = batches(data, model, check_num_batches(num_batches), need_targets=True)
    with scoring(model) as modules:
        params = weight_params(modules)
        g = _mean_gradient(model, params, items, loss_fn, float(temperature))
        hg = {n: torch.zeros_like(v) for n, v in g.items()}
        total = sum(batch_size(x) for x, _ in items)
        names = list(params)
        for x, y in items:
            grads = _grads(model, params, x, y, loss_fn, create_graph=True, scale=float(temperature))
            z = sum((g[n] * grads[n]).sum() for n in names)
            if not z.requires_grad:  # the loss does not depend on the weights at second order
                continue
            hvp = torch.autograd.grad(z, [params[n] for n in names], allow_unused=True)
            for n, h in zip(names, hvp):
                if h is not None:
                    hg[n] += h.detach() * (batch_size(x) / total)
    return g, hg


def grasp(model: nn.Module, data=None, loss_fn=None, num_batches: Optional[int] = 1, temperature: float = 200.0,
          invert: bool = False) -> Dict[str, torch.Tensor]:
    """GraSP, Gradient Signal Preservation (Wang et al. {cite}`wang2020picking`, eq. 8; survey §2.4.3).

    Removing weights ``delta = -w`` changes the gradient flow ``g^T g`` by about ``2 delta^T H g``; the paper's
    score is ``S(-w) = -w * Hg`` (elementwise) and it **removes the weights with the largest S**: their removal
    reduces the gradient norm least (or even increases it). In the library's convention (higher = keep) the score
    returned is therefore::

        keep_i = -S_i = w_i * (Hg)_i

    so ``sl.prune(..., method="grasp")`` removes exactly what the paper removes. ``invert=True`` returns ``S``
    itself: it keeps what GraSP would remove (the control of Chapter 08). ``g`` and ``Hg`` come from
    :func:`hessian_gradient_product` on ``num_batches`` batches with the logits divided by ``temperature``
    (T = 200 in the paper, which softens the softmax so that ``Hg`` is not dominated by a few examples).
    The model is not changed. Defined in Chapter 08.
    """
    if not isinstance(invert, bool):
        raise TypeError(f"invert must be True or False, got {invert!r}")
    _, hg = hessian_gradient_product(model, data, loss_fn, num_batches, temperature)
    w = effective_weights(_check_has_prunable(model))
    keep = {n: w[n] * hg[n] for n in w}
    return {n: -v for n, v in keep.items()} if invert else keep


# ------------------------------------------------------------------------------------------------ SynFlow
def _check_input_shape(input_shape) -> tuple:
    if isinstance(input_shape, int) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)
    if (not isinstance(input_shape, (tuple, list, torch.Size)) or not input_shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)):
        raise ValueError(f"input_shape must be the shape of one input without the batch dimension, a tuple of "
                         f"positive integers such as (16,) or (1, 28, 28); got {input_shape!r}")
    return tuple(int(d) for d in input_shape)


def linearized_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` for SynFlow ({cite}`tanaka2020pruning`, survey §2.4.3): every parameter replaced by its absolute value, every bias (and
    every batch-norm running mean) set to zero, evaluation mode. Masks are kept.

    With non-negative weights and a non-negative input every pre-activation is non-negative, so ReLU acts as the
    identity and the copy computes the linear map ``prod_l |W_l|``. Zeroing the biases is essential: a bias would
    feed signal into a neuron that has no incoming path from the input, so a disconnected network would still
    show a positive flow. (Valid for positively homogeneous networks: Linear/Conv, ReLU, pooling, batch norm in
    evaluation mode.)
    """
    clone = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.grad = None
            if name.split(".")[-1] == "bias":
                p.zero_()
            else:
                p.abs_()
        for name, b in clone.named_buffers():
            if name.split(".")[-1] == "running_mean":
                b.zero_()
    return clone


def _flow(linear_model: nn.Module, input_shape: tuple, with_neurons: bool = False):
    """Forward/backward on the linearized model with an all-ones input of batch 1.

    Returns ``(R, scores, neuron_flow)``: the flow ``R = sum(output)``, ``{name: |w * dR/dw|}`` and, if asked,
    ``{name: (out,)}`` the flow through each neuron ``sum_pos z * dR/dz`` (zero iff no input-output path
    passes through it)."""
    modules = _check_has_prunable(linear_model)
    device = next(linear_model.parameters()).device
    x = torch.ones((1,) + input_shape, dtype=torch.float64, device=device)
    outputs, handles = {}, []
    if with_neurons:
        for n, m in modules.items():
            handles.append(m.register_forward_hook(lambda mod, inp, out, name=n: outputs.setdefault(name, out)))
    params = weight_params(modules)
    requires = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            r = linear_model(x).sum()
            names = list(params)
            targets = [params[n] for n in names] + [outputs[n] for n in names if n in outputs]
            grads = torch.autograd.grad(r, targets, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(requires[n])
    w = effective_weights(modules)
    scores = {}
    for i, n in enumerate(names):
        g = grads[i] if grads[i] is not None else torch.zeros_like(w[n])
        scores[n] = (g * w[n]).abs()
    neuron_flow = {}
    if with_neurons:
        for j, n in enumerate([n for n in names if n in outputs]):
            g = grads[len(names) + j]
            z = outputs[n].detach()
            prod = torch.zeros_like(z) if g is None else z * g
            neuron_flow[n] = (prod.reshape(-1, prod.shape[-1]).sum(0) if isinstance(modules[n], nn.Linear)
                              else prod.reshape(prod.shape[0], prod.shape[1], -1).sum((0, 2)))
    return float(r.detach()), scores, neuron_flow


def synflow(model: nn.Module, input_shape: Sequence[int], normalize: bool = False) -> Dict[str, torch.Tensor]:
    """One round of the SynFlow score (Tanaka et al. {cite}`tanaka2020pruning`, Algorithm 1; survey §2.4.3)::

        R = 1^T ( prod_l |W_l| ) 1,        S_i = | w_i * dR/dw_i |

    computed on :func:`linearized_copy` (|weights|, zero biases, float64) with an all-ones input of shape
    ``(1, *input_shape)``; current masks are respected. For a bias-free two-layer linear network
    ``S(W1_ij) = |W1_ij| * sum_k |W2_ki|``. Conservation: the scores of every layer sum to ``R`` (each layer's
    weights carry all of the flow), so ``normalize=True`` divides by ``R`` and every layer sums to 1.
    Returns float64 tensors ``{name: tensor}`` (products of many ``|W|`` leave float32's range), higher = keep.
    The model is not changed. For the iterative method use ``sl.prune(model, s, method="synflow",
    input_shape=..., rounds=100)``. Defined in Chapter 08.
    """
    input_shape = _check_input_shape(input_shape)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    _check_has_prunable(model)
    r, scores, _ = _flow(linearized_copy(model), input_shape)
    if normalize and r > 0:
        scores = {n: s / r for n, s in scores.items()}
    return scores


def _max_normalized(scores: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Divide by the largest score (in float64) before the float32 selection: the ranking is unchanged and the
    largest scores are 1, so only scores below ~1e-38 of the maximum underflow."""
    top = max(float(s.max()) for s in scores.values()) if scores else 0.0
    if top > 0 and math.isfinite(top):
        return {n: (s / top).float() for n, s in scores.items()}
    return {n: s.float() for n, s in scores.items()}


def synflow_pruner(model: nn.Module, plan: Plan, input_shape: Optional[Sequence[int]] = None, rounds: int = 100):
    """Iterative SynFlow (Tanaka et al. {cite}`tanaka2020pruning`, Algorithm 1): for ``k = 1..rounds`` score the
    masked network with :func:`synflow` and prune to the exponentially scheduled sparsity::

        s_k = 1 - (1 - s)^(k / rounds)

    (per layer ``s_l,k = 1 - (1 - s_l)^(k/rounds)`` under a layerwise scope or budget; global scope, as in the
    paper, by default). Re-scoring after every round is what avoids layer collapse: as a layer thins, the flow
    through each of its surviving weights grows. ``rounds=1`` is one-shot SynFlow. With N:M structure there is
    nothing to iterate (the pattern is fixed per group), so a single round is used. Works on a float64 copy of
    the model; returns ``(masks, None)`` and does not change the model. Data-free: needs ``input_shape``, the
    shape of one input without the batch dimension.
    """
    if input_shape is None:
        raise ValueError("method 'synflow' needs input_shape=, the shape of one input without the batch "
                         "dimension, e.g. input_shape=(1, 28, 28)")
    input_shape = _check_input_shape(input_shape)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    work = linearized_copy(model)
    current = {n: m.clone() for n, m in plan.current.items()}
    apply_masks(work, current)
    if is_n_m(plan.structure):
        rounds = 1
    for k in range(1, rounds + 1):
        frac = k / rounds
        _, scores, _ = _flow(work, input_shape)
        budget = None
        if plan.budget is not None:
            budget = {n: 1.0 - (1.0 - s) ** frac for n, s in plan.budget.items()}
        step = Plan(sparsity=1.0 - (1.0 - plan.sparsity) ** frac, scope=plan.scope, budget=budget,
                    structure=plan.structure, current=current, exclude=plan.exclude)
        selected = step.select(_max_normalized(scores))
        current = {n: selected[n] & current[n] for n in current}
        apply_masks(work, current)
    return current, None


def layer_connectivity(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """Is the (masked) network still connected from input to output? Layer collapse diagnostics (Tanaka et al.
    {cite}`tanaka2020pruning`; survey §2.4.3).

    On :func:`linearized_copy` (|weights|, zero biases) with an all-ones input, the flow ``R = 1^T (prod |W|) 1``
    is positive iff at least one path of nonzero weights joins the input to the output. Returns a dict:

    * ``"connected"``: ``R > 0``; ``"flow"``: ``R``;
    * ``"alive_neurons"`` / ``"neurons"``: per layer, the number of output neurons (channels) that lie on some
      input-output path (flow through them ``sum z * dR/dz > 0``) / all of them;
    * ``"alive_weights"`` / ``"weights"``: per layer, the weights that lie on some path (SynFlow score > 0) /
      all of them. Unmasked weights that lie on no path are dead weight: they cannot affect the output.

    The model is not changed. Defined in Chapter 04.
    """
    input_shape = _check_input_shape(input_shape)
    work = linearized_copy(model)
    r, scores, neuron_flow = _flow(work, input_shape, with_neurons=True)
    modules = _check_has_prunable(work)
    return {
        "connected": r > 0,
        "flow": r,
        "alive_neurons": {n: int((neuron_flow[n] > 0).sum()) if n in neuron_flow else 0 for n in modules},
        "neurons": {n: int(_original(m, n).shape[0]) for n, m in modules.items()},
        "alive_weights": {n: int((s > 0).sum()) for n, s in scores.items()},
        "weights": {n: int(_original(m, n).numel()) for n, m in modules.items()},
    }


__all__ = ["snip", "hessian_gradient_product", "grasp", "linearized_copy", "synflow", "synflow_pruner",
           "layer_connectivity"]
