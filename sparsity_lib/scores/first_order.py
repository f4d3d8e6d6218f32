"""First-order criteria: Taylor, movement (survey §3.4 "selection based on 1st order Taylor expansion";
§2.4.5 "sparsity for transfer learning and fine tuning").

Removing a weight ``w_i`` is the perturbation ``delta w = -w_i e_i``; to first order the loss changes by
``delta L ~ -g_i w_i`` (survey §3.4, ``delta L = grad L . delta w + ...``). Two ways of using that product:

* **Taylor** (Molchanov et al. {cite}`molchanov2019importance`): ``(g_i w_i)^2``, squared so that a weight whose
  removal would change the loss in *either* direction counts, averaged over mini-batches; for a neuron, the square
  of the *sum* over its weights ``(sum_{i in j} g_i w_i)^2``, the first-order estimate of removing the whole neuron;
* **movement** (Sanh et al. {cite}`sanh2020movement`): ``-sum_t g_i^(t) w_i^(t)`` summed over the steps of
  fine-tuning: weights that move *towards zero* score low, weights that move away from zero score high, whatever
  their magnitude.

Wanda (Sun et al. {cite}`sun2023simple`), ``|W_ij| * ||X_j||_2``, lives in :mod:`sparsity_lib.layerwise`, beside
OBC and SparseGPT: ``||X_j||^2 = H_jj / 2`` of the layer-wise Hessian, so it is their diagonal, update-free relative.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..masks import _check_has_prunable, _original, _weight
from ._common import batches, broadcast_rows, check_loss_fn, effective_weights, scoring, weight_params


def _grads(model, params: Dict[str, torch.Tensor], x, y, loss_fn, create_graph: bool = False, scale=None):
    """``{name: dL/dparam}`` for one batch (zeros for parameters the loss does not reach)."""
    out = model(x)
    if scale is not None:
        out = out / scale
    loss = loss_fn(out, y)
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, create_graph=create_graph)
    return {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}


# ------------------------------------------------------------------------------------------------- Taylor
def taylor(model: nn.Module, data=None, loss_fn=None, num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """First-order Taylor score of every weight (Molchanov et al. {cite}`molchanov2019importance`, eq. 6;
    survey §3.4)::

        I_i = (1/B) sum_{b=1..B} (g_i^(b) w_i)^2

    with ``g^(b)`` the gradient of the mean loss ``loss_fn`` on mini-batch b (one per batch of ``data``,
    the first ``num_batches`` only if given). Returns ``{name: tensor}`` shaped like the weights, higher = keep.
    Evaluation mode; the model (weights, ``.grad``, training mode) is not changed. Defined in Chapter 05.
    """
    loss_fn = check_loss_fn(loss_fn)
    items = batches(data, model, num_batches, need_targets=True)
    with scoring(model) as modules:
        params, w = weight_params(modules), effective_weights(modules)
        acc = {n: torch.zeros_like(w[n]) for n in modules}
        for x, y in items:
            g = _grads(model, params, x, y, loss_fn)
            for n in modules:
                acc[n] += (g[n].detach() * w[n]) ** 2
        return {n: a / len(items) for n, a in acc.items()}


def taylor_per_neuron(model: nn.Module, data, loss_fn=None, num_batches: Optional[int] = None,
                      include_bias: bool = True) -> Dict[str, torch.Tensor]:
    """Group Taylor score of every neuron (output row / channel), ``{name: (out,)}`` (Molchanov et al.
    {cite}`molchanov2019importance`, eq. 7; survey §3.4)::

        I_j = (1/B) sum_b ( sum_{i in row j} g_i^(b) w_i  +  g_{b_j}^(b) b_j )^2

    the square of the *sum* over the neuron's weights (not the sum of squares): ``sum_i g_i w_i + g_b b`` is the
    first-order estimate of the loss change when the neuron is removed (its row and bias zeroed, exactly what
    :func:`sparsity_lib.scores.oracle_neuron_loss_increase` measures), equivalently the gradient of a gate on the
    neuron's output. ``include_bias=False`` drops the bias term (weights only, as in eq. 7 for a layer without
    bias). Defined in Chapter 05.
    """
    loss_fn = check_loss_fn(loss_fn)
    if not isinstance(include_bias, bool):
        raise TypeError(f"include_bias must be True or False, got {include_bias!r}")
    items = batches(data, model, num_batches, need_targets=True)
    with scoring(model, with_biases=include_bias) as modules:
        params, w = weight_params(modules), effective_weights(modules)
        biases = {}
        if include_bias:
            biases = {n: m.bias for n, m in modules.items() if isinstance(getattr(m, "bias", None), torch.Tensor)}
            params.update({("bias", n): b for n, b in biases.items()})
        acc = {n: torch.zeros(w[n].shape[0], dtype=w[n].dtype, device=w[n].device) for n in modules}
        for x, y in items:
            g = _grads(model, params, x, y, loss_fn)
            for n in modules:
                contribution = (g[n].detach() * w[n]).reshape(w[n].shape[0], -1).sum(1)
                if n in biases:
                    contribution = contribution + g[("bias", n)].detach() * biases[n].detach()
                acc[n] += contribution ** 2
        return {n: a / len(items) for n, a in acc.items()}


def taylor_neuron(model: nn.Module, data=None, loss_fn=None, num_batches: Optional[int] = None,
                  include_bias: bool = True) -> Dict[str, torch.Tensor]:
    """The neuron score of :func:`taylor_per_neuron` given to every weight of the neuron (shaped like the
    weights), so that ``sl.prune(..., method="taylor_neuron", structure="neuron")`` removes the neurons with the
    smallest ``(sum_{i in j} g_i w_i + g_b b_j)^2``. Survey §3.4. Defined in Chapter 05.
    """
    per_neuron = taylor_per_neuron(model, data, loss_fn, num_batches, include_bias)
    return broadcast_rows(per_neuron, _check_has_prunable(model))


# ----------------------------------------------------------------------------------------------- movement
class MovementScore:
    """Movement score accumulated during (fine-)training, a callback for ``sl.train.fit(..., callbacks=[ms])``
    (Sanh et al. {cite}`sanh2020movement`; survey §2.4.5, §3.4)::

        S_i = - sum_t  g_i^(t) * w_i^(t)

    ``g^(t)`` is the gradient of step t and ``w^(t)`` the weight it was computed at (the value *before* step t's
    update). A weight that gradient descent pushes towards zero (``g`` and ``w`` of the same sign) loses score,
    one pushed away from zero gains: higher = keep. Sanh et al. multiply by the learning rate of the scores, a
    constant factor that does not change the ranking.

    How it is fed: :func:`sparsity_lib.train.fit` calls ``ms.on_after_backward(state)`` after
    ``loss.backward()`` and before ``optimizer.step()``, when ``.grad`` holds ``g^(t)`` and the weights are still
    ``w^(t)``, so the sum is exact. In a hand-written loop call ``ms.step()`` at the same place::

        loss.backward(); ms.step(); optimizer.step()

    (Called after ``optimizer.step()`` instead, it would pair ``g^(t)`` with ``w^(t+1)``: a close approximation
    for small learning rates, not the definition.) For a masked layer the gradient of the trainable ``original``
    is zero at masked entries, so pruned weights accumulate nothing.

    Use the scores with ``sl.prune(model, s, method="movement", movement=ms)`` or read them with
    :meth:`scores`. Defined in Chapter 05.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self._modules = _check_has_prunable(model)
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated movement."""
        self.steps = 0
        self._score = {n: torch.zeros_like(_weight(m, n), dtype=torch.float32).detach()
                       for n, m in self._modules.items()}

    def on_after_backward(self, state=None) -> None:
        """Accumulate ``-g * w`` for every prunable weight: call after ``loss.backward()``, before
        ``optimizer.step()`` (the training loop's ``on_after_backward`` event)."""
        model = getattr(state, "model", None)
        if model is not None and model is not self.model:
            raise ValueError("MovementScore: state.model is not the model this MovementScore was built for")
        found = False
        with torch.no_grad():
            for n, m in self._modules.items():
                g = _original(m, n).grad
                if g is not None:
                    self._score[n] -= (g * _weight(m, n).detach()).to(torch.float32)
                    found = True
        if not found:
            raise RuntimeError(
                "MovementScore found no gradients: call it after loss.backward() and before optimizer.step()"
            )
        self.steps += 1

    def step(self) -> None:
        """The same as :meth:`on_after_backward`, for a hand-written loop."""
        self.on_after_backward()

    def scores(self) -> Dict[str, torch.Tensor]:
        """``{name: S}`` (a copy), shaped like the weights, higher = keep."""
        return {n: s.clone() for n, s in self._score.items()}

    def __repr__(self) -> str:
        return f"MovementScore(layers={len(self._score)}, steps={self.steps})"


def movement(model: nn.Module, movement: Optional[MovementScore] = None) -> Dict[str, torch.Tensor]:
    """The movement scores ``S = -sum_t g^(t) w^(t)`` accumulated by ``movement`` (a :class:`MovementScore` that
    was passed as a callback to the training loop). Sanh et al. {cite}`sanh2020movement`; survey §3.4.
    Example: ``sl.prune(model, 0.9, method="movement", movement=ms)``.
    """
    if not isinstance(movement, MovementScore):
        raise ValueError("method 'movement' needs movement=<sl.scores.MovementScore> fed during training, "
                         f"got {type(movement).__name__}")
    if movement.model is not model:
        raise ValueError("movement: this MovementScore was built for another model")
    if movement.steps == 0:
        raise ValueError("movement: the MovementScore has seen no training step yet (pass it to the training loop)")
    return movement.scores()


# Wanda moved to sparsity_lib.layerwise (beside OBC and SparseGPT, its family); re-exported here for
# sparsity_lib.scores until the explicit catalogue lists it there.
from ..layerwise import per_row_masks, wanda, wanda_input_norms, wanda_pruner  # noqa: E402,F401

__all__ = ["taylor", "taylor_per_neuron", "taylor_neuron", "MovementScore", "movement"]
