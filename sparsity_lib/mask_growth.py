"""Masks that change during training: the dense-gradient mode, replacing masks (weights that come back) and
resetting the optimizer state of revived weights. The tools of dynamic sparse training (survey §4: SET, RigL,
DSR...); part of the API of :mod:`sparsity_lib.masks` (``sl.masks.replace_masks`` etc.), which re-exports them.

One connectivity update of RigL (Evci et al. {cite}`evci2020rigging`) with them::

    sl.masks.track_dense_gradients(model)                      # once, after masking
    ...  loss.backward()                                       # in a training step
    grads = sl.masks.dense_gradients(model)                    # dL/d(W*M), pruned positions included
    new = {n: sl.select.drop_and_grow(m, w.abs(), grads[n].abs(), k[n])
           for (n, m), w in zip(sl.get_masks(model).items(), sl.prunable(model).values()) if n in grads}
    revived = sl.masks.replace_masks(model, new, init=0.0)     # grown weights start at zero
    sl.masks.reset_optimizer_state(optimizer, model, revived)  # and without momentum

Defined for Chapter 09.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Union

import torch
from torch import nn

from .masks import _chain, _check_has_prunable, _mask_module, _original, _prepare_masks, apply_masks, is_mask


def trainable(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{name: nn.Parameter}``: the tensor the optimizer updates for every prunable weight, by dense name
    (``<layer>.parametrizations.weight.original`` when the layer is masked, ``<layer>.weight`` otherwise)."""
    out = {}
    for name, module in _check_has_prunable(model).items():
        param = _original(module, name)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"trainable: {name} is not a parameter but recomputed from others (e.g. by the "
                             "hook-based torch.nn.utils.weight_norm or spectral_norm): sparsity_lib cannot mask it")
        out[name] = param
    return out


def track_dense_gradients(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the dense-gradient mode of every masked layer on (or off) and return ``model``.

    With the mode on, each forward pass of a masked layer (with gradients enabled) records the gradient that
    reaches the effective weight :math:`\\tilde W = W \\odot M` in the backward pass,

    .. math::  G = \\frac{\\partial L}{\\partial \\tilde W}, \\qquad
               \\frac{\\partial L}{\\partial W} = G \\odot M ,

    at *every* position, pruned ones included: the gradient RigL grows by (Evci et al. {cite}`evci2020rigging`,
    survey §4.2). What the optimizer sees does not change: ``original.grad`` stays :math:`G \\odot M`. Read
    :math:`G` with :func:`dense_gradients`. Off (the default), a masked forward pass costs nothing extra.

    Only the library's :class:`Mask` layers are tracked, those present now (call again after masking new layers;
    :func:`apply_masks` / :func:`replace_masks` on an already masked layer keep its setting). Survey §4.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    layers = {name: _mask_module(m, name) for name, m in _check_has_prunable(model).items()}
    layers = {name: m for name, m in layers.items() if m is not None}
    if enabled and not layers:
        raise ValueError("track_dense_gradients: the model has no masked layer (apply masks first, e.g. with "
                         "sl.apply_masks or sl.prune); an unmasked weight's .grad is already dense")
    for mask in layers.values():
        mask.track_dense_grad = enabled
        if not enabled:
            mask._dense_grad = None
    return model


def dense_gradients(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: G}`` with :math:`G = \\partial L / \\partial (W \\odot M)` for every tracked masked layer.

    Rule: :math:`G` belongs to the last forward -> backward cycle. A forward pass (with gradients enabled) after
    a backward pass starts a new record; the uses of a layer within one forward pass add up (as ``.grad`` does
    for a weight used twice); a forward pass whose graph is never backpropagated does not count. Gradient
    accumulation over several backward passes is therefore *not* summed here: sum the records yourself. The
    tensors are copies. Raises ``RuntimeError`` naming the layer when no gradient has been recorded for it since
    tracking was switched on (see :func:`track_dense_gradients`).
    """
    out = {}
    for name, module in _check_has_prunable(model).items():
        mask = _mask_module(module, name)
        if mask is None or not mask.track_dense_grad:
            continue
        if mask._dense_grad is None:
            raise RuntimeError(f"dense_gradients: no gradient recorded for {name} yet: run a forward and a backward "
                               "pass with tracking on (sl.masks.track_dense_gradients(model))")
        out[name] = mask._dense_grad.clone()
    if not out:
        raise RuntimeError("dense_gradients: no masked layer of the model is tracked; call "
                           "sl.masks.track_dense_gradients(model) before the forward pass")
    return out


def replace_masks(model: nn.Module, masks: Mapping[str, torch.Tensor],
                  init: Union[float, Mapping[str, torch.Tensor]] = 0.0) -> Dict[str, torch.Tensor]:
    """Replace the masks of the named layers, allowing weights to come back; return the revived positions.

    Unlike cumulative :func:`sparsity_lib.prune` (which ANDs a new mask with the old one), the new mask is taken
    as it is: positions it keeps that the old mask removed are *revived* and their stored values set to ``init``
    (a float for all, zero by default as in RigL and SET, or ``{name: tensor of the weight's shape}``, of which
    only the revived positions are read); positions it removes are zeroed as in :func:`apply_masks`; surviving
    weights keep their values. Returns ``{name: bool tensor}``, True where a weight was revived. The optimizer's
    state of revived weights is not touched: see :func:`reset_optimizer_state`.

    An existing ``.grad`` of the stored weight is masked with the new mask (it stays the gradient the optimizer
    sees), so an update between ``backward()`` and ``optimizer.step()`` (a callback's ``on_after_backward``) is
    safe. Momentum still moves the stored values of weights just dropped (the model never uses them, and they
    restart at ``init`` when revived); pass those positions to :func:`reset_optimizer_state` too to stop that.

    All arguments are validated before anything changes. A layer whose weight carries another mask (e.g. a
    learned supermask) that would keep a revived weight at zero is refused. Survey §4 (regrowth). Defined for
    Chapter 09.
    """
    modules, ready = _prepare_masks(model, masks)
    if isinstance(init, bool) or not isinstance(init, (int, float, Mapping)):
        raise TypeError(f"init must be a float or a dict {{name: tensor}}, got {type(init).__name__}")
    if isinstance(init, Mapping):
        for name, value in init.items():
            if name not in ready:
                raise ValueError(f"init: {name!r} is not a layer of masks ({list(ready)})")
            shape = tuple(_original(modules[name], name).shape)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                raise ValueError(f"init[{name!r}] must be a tensor of the weight's shape {shape}, got "
                                 f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
            if not torch.isfinite(value).all():
                raise ValueError(f"init[{name!r}] contains NaN or infinite values")
    elif not math.isfinite(init):
        raise ValueError(f"init must be finite, got {init!r}")
    revived = {}
    for name, mask in ready.items():
        module = modules[name]
        own = _mask_module(module, name)
        old = own.mask.clone() if own is not None else torch.ones_like(mask)
        others = [p for p in _chain(module, name) if is_mask(p) and p is not own]
        for p in others:
            blocked = mask & ~p.hard_mask().to(mask.device)
            if blocked.any():
                raise ValueError(f"replace_masks: {name} also carries {type(p).__name__}, which keeps "
                                 f"{int(blocked.sum())} of the positions masks[{name!r}] keeps at zero")
        revived[name] = mask & ~old
    for name, mask in ready.items():
        original = _original(modules[name], name)
        apply_masks(model, {name: mask})
        if original.grad is not None:
            original.grad.mul_(mask.to(original.grad.dtype))
        if revived[name].any():
            with torch.no_grad():
                if isinstance(init, Mapping):
                    if name in init:
                        value = init[name].to(original)
                        original[revived[name]] = value[revived[name]]
                else:
                    original[revived[name]] = float(init)
    return revived


#: Per-parameter optimizer state that :func:`reset_optimizer_state` zeroes (SGD, Adam, AdamW, amsgrad).
OPTIMIZER_MOMENTS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def reset_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                          positions: Mapping[str, torch.Tensor]) -> None:
    """Zero the optimizer's moments at the given positions of prunable weights: SGD's ``momentum_buffer``,
    Adam/AdamW's ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` (``amsgrad``). Nothing else changes
    (the step counts stay, other positions keep their state).

    ``positions`` is ``{name: bool tensor of the weight's shape}`` (e.g. what :func:`replace_masks` returns):
    a revived weight then starts without the momentum it gathered while masked, as in RigL
    (Evci et al. {cite}`evci2020rigging`). A weight without state yet (before the first step) is skipped.
    Validated before anything changes: unknown names, wrong shapes or dtypes, a weight the optimizer does not
    hold, or a per-weight state tensor this function does not know (another optimizer) raise ``ValueError``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    params = trainable(model)
    if not isinstance(positions, Mapping):
        raise TypeError(f"positions must be a dict {{name: bool tensor}}, got {type(positions).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    work = []
    for name, where in positions.items():
        if name not in params:
            raise ValueError(f"positions: unknown layer name {name!r}; prunable weights are {list(params)}")
        param = params[name]
        if not isinstance(where, torch.Tensor) or where.dtype != torch.bool or where.shape != param.shape:
            raise ValueError(f"positions[{name!r}] must be a bool tensor of the weight's shape "
                             f"{tuple(param.shape)}")
        if id(param) not in held:
            raise ValueError(f"positions[{name!r}]: the optimizer does not update this weight")
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and key not in OPTIMIZER_MOMENTS:
                raise ValueError(f"reset_optimizer_state: unknown per-weight state {key!r} of "
                                 f"{type(optimizer).__name__}; supported: SGD, Adam, AdamW ({OPTIMIZER_MOMENTS})")
        work.append((state, where))
    with torch.no_grad():
        for state, where in work:
            for key in OPTIMIZER_MOMENTS:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    value[where.to(value.device)] = 0


