"""First-order criteria: Taylor, movement, Wanda (survey §3.4 "selection based on 1st order Taylor expansion";
§2.4.5 "sparsity for transfer learning and fine tuning").

Removing a weight ``w_i`` is the perturbation ``delta w = -w_i e_i``; to first order the loss changes by
``delta L ~ -g_i w_i`` (survey §3.4, ``delta L = grad L . delta w + ...``). Three ways of using that product:

* **Taylor** (Molchanov et al. {cite}`molchanov2019importance`): ``(g_i w_i)^2``, squared so that a weight whose
  removal would change the loss in *either* direction counts, averaged over mini-batches; for a neuron, the square
  of the *sum* over its weights ``(sum_{i in j} g_i w_i)^2``, the first-order estimate of removing the whole neuron;
* **movement** (Sanh et al. {cite}`sanh2020movement`): ``-sum_t g_i^(t) w_i^(t)`` summed over the steps of
  fine-tuning: weights that move *towards zero* score low, weights that move away from zero score high, whatever
  their magnitude;
* **Wanda** (Sun et al. {cite}`sun2023simple`): ``|W_ij| * ||X_j||_2``, weight magnitude times the norm of the
  input feature it multiplies, compared within each output row; no gradient and no weight update.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..masks import _check_has_prunable, _original
from . import register, register_pruner
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
@register("taylor", needs_data=True, description="(g*w)^2 averaged over batches (Molchanov et al. 2019)")
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


@register("taylor_neuron", needs_data=True,
          description="neuron Taylor (sum_row g*w + g_b*b)^2, broadcast to the row: use structure='neuron'")
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
        self._score = {n: torch.zeros_like(m.weight, dtype=torch.float32).detach()
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
                g = _original(m).grad
                if g is not None:
                    self._score[n] -= (g * m.weight.detach()).to(torch.float32)
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


@register("movement", description="-sum_t g*w accumulated during fine-tuning by a MovementScore (Sanh et al. 2020)")
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


# -------------------------------------------------------------------------------------------------- Wanda
def _conv_input_sq_norms(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum over examples and positions of the squared im2col columns of a Conv1d/Conv2d input: ``(in * k)``."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1,) + module.kernel_size, (1,) + module.stride, (1,) + module.dilation
        pad = tuple(module._reversed_padding_repeated_twice) + (0, 0)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        pad = tuple(module._reversed_padding_repeated_twice)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)  # (B, in * k, L)
    return cols.double().pow(2).sum((0, 2))


def wanda_input_norms(model: nn.Module, data, num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``||X_j||_2`` for every input feature j of every prunable layer, over all calibration samples:
    ``{name: (fan_in,)}`` (for a convolution: ``(groups, in/groups * k1 * k2)``, the unfolded im2col columns).

    The input statistic of Wanda {cite}`sun2023simple` (survey §3.3). Collected with forward pre-hooks on the layers; every example, token and output position is a sample.
    Linear, Conv1d and Conv2d layers; Conv3d raises ValueError.
    """
    items = batches(data, model, num_batches)
    modules = _check_has_prunable(model)
    for n, m in modules.items():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"wanda supports Linear, Conv1d and Conv2d layers; {n} is a {type(m).__name__}")
    sq: Dict[str, torch.Tensor] = {}

    def record(name, module, args):
        x = args[0].detach()
        if isinstance(module, nn.Linear):
            s = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        else:
            s = _conv_input_sq_norms(module, x)
        sq[name] = sq.get(name, 0) + s

    with scoring(model) as modules, torch.no_grad():
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: record(name, mod, args))
                   for name, m in modules.items()]
        try:
            for x, _ in items:
                model(x)
        finally:
            for h in handles:
                h.remove()
    missing = [n for n in modules if n not in sq]
    if missing:
        raise ValueError(f"layers {missing} were never called in the forward pass of the model")
    out = {}
    for n, m in modules.items():
        norms = sq[n].sqrt().float()
        if not isinstance(m, nn.Linear):
            norms = norms.reshape(m.groups, -1)
        out[n] = norms
    return out


def wanda(model: nn.Module, data, loss_fn=None, num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Wanda score (Sun et al. {cite}`sun2023simple`, eq. 1; survey §3.3-3.4)::

        S_ij = |W_ij| * ||X_j||_2

    ``X_j`` is input feature j of the layer over all calibration samples (``data``: inputs, targets are not
    needed; ``loss_fn`` is ignored). For a convolution the weight is viewed as ``(out, in/groups * k1 * k2)`` and
    ``X_j`` is column j of the unfolded (im2col) input. Returns ``{name: tensor}`` shaped like the weights. The
    scores are meant to be compared *within each output row* (the registered method "wanda" does so).
    Defined in Chapter 05.
    """
    norms = wanda_input_norms(model, data, num_batches)
    modules = _check_has_prunable(model)
    out = {}
    for n, m in modules.items():
        w = m.weight.detach()
        rows = w.abs().reshape(w.shape[0], -1)
        if isinstance(m, nn.Linear):
            s = rows * norms[n].to(rows)[None, :]
        else:
            group_of_row = torch.arange(w.shape[0], device=w.device) // (w.shape[0] // m.groups)
            s = rows * norms[n].to(rows)[group_of_row]
        out[n] = s.reshape(w.shape)
    return out


def per_row_masks(scores: Dict[str, torch.Tensor], current: Dict[str, torch.Tensor],
                  sparsities: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """Wanda's comparison group {cite}`sun2023simple`: in every output row i of layer l keep the weights with the
    highest ``scores[l][i, :]`` so that ``round(s_l * fan_in)`` of the row are removed (weights already masked
    count as removed)::

        mask_ij = [ rank of S_ij within row i  >=  round(s_l * fan_in) ]   (rank 0 = lowest)

    Layers missing from ``sparsities`` keep their mask. Survey §3.1 (structure of the selection)."""
    masks = {}
    for n, alive in current.items():
        if n not in sparsities:
            masks[n] = alive.clone()
            continue
        rows_a = alive.reshape(alive.shape[0], -1)
        rows_s = scores[n].detach().double().reshape(rows_a.shape)
        if torch.isnan(rows_s).any():
            raise ValueError(f"scores[{n!r}] contains NaN")
        remove = round(sparsities[n] * rows_a.shape[1])
        ranked = torch.where(rows_a, rows_s, torch.full_like(rows_s, -float("inf")))
        order = torch.sort(ranked, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(rows_a.shape[1]).expand_as(order).contiguous())
        masks[n] = ((rank >= remove) & rows_a).reshape(alive.shape)
    return masks


@register_pruner("wanda", needs_data=True, description="|W|*||X_j||, pruned within each output row (Sun et al. 2023)")
def wanda_pruner(model: nn.Module, plan, data=None, loss_fn=None, per_row: bool = True,
                 num_batches: Optional[int] = None):
    """Wanda pruning (Sun et al. {cite}`sun2023simple`): score ``|W_ij| * ||X_j||_2`` (:func:`wanda`), then in
    *every output row* remove the same fraction ``s_l`` of weights, the lowest-scoring ones. No weight update.

    Layer sparsities ``s_l``: the budget of ``scope`` (``"layerwise"`` or a dict); under ``scope="global"`` every
    layer gets the same sparsity (Wanda compares within rows, never across layers), chosen so that the overall
    target is met when ``exclude`` holds layers back. Each row removes ``round(s_l * fan_in)`` weights, so the
    overall sparsity can differ from the target by rounding. With ``per_row=False``, or a ``structure``
    (N:M, as in the paper's 2:4 results, neurons or blocks), the Wanda scores go through the standard selection of
    ``scope``/``structure`` instead. Returns ``(masks, None)``; the model is not changed.
    """
    if not isinstance(per_row, bool):
        raise TypeError(f"per_row must be True or False, got {per_row!r}")
    scores = wanda(model, data, num_batches=num_batches)
    if not per_row or plan.structure is not None:  # N:M, neurons, blocks: the standard selection
        return plan.select(scores), None
    if plan.budget is not None:
        sparsities = dict(plan.budget)
    else:
        names = [n for n in plan.current if n not in plan.exclude]
        total = sum(m.numel() for m in plan.current.values())
        held = sum(int((~plan.current[n]).sum()) for n in plan.exclude)
        free = sum(plan.current[n].numel() for n in names)
        uniform = (plan.sparsity * total - held) / free if free else 0.0
        if uniform > 1.0 + 1e-12:
            raise ValueError(f"sparsity={plan.sparsity} cannot be reached with the layers in exclude kept as they are")
        sparsities = {n: min(max(uniform, 0.0), 1.0) for n in names}
    return per_row_masks(scores, plan.current, sparsities), None


__all__ = ["taylor", "taylor_per_neuron", "taylor_neuron", "MovementScore", "movement", "wanda", "wanda_input_norms",
           "wanda_pruner", "per_row_masks"]
