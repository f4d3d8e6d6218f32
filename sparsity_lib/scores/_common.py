"""Plumbing shared by the data-driven score functions: batches, scoring mode, gradients, neuron broadcasting.

Private to :mod:`sparsity_lib.scores`; nothing here is a pruning criterion by itself.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..masks import _check_has_prunable, _original


def check_num_batches(num_batches, name: str = "num_batches") -> Optional[int]:
    if num_batches is None:
        return None
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"{name} must be a positive integer or None (all batches), got {num_batches!r}")
    return int(num_batches)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batches(data, model: nn.Module, num_batches: Optional[int] = None, need_targets: bool = False,
            name: str = "data") -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The calibration data as a list of ``(inputs, targets)`` pairs on the model's device.

    ``data`` may be one batch (a *tuple* ``(inputs, targets)`` of two tensors), one tensor of inputs, or an
    iterable (list, DataLoader) of either. ``num_batches`` keeps only the first batches. Targets may be ``None`` when ``need_targets`` is False.
    """
    num_batches = check_num_batches(num_batches)
    if data is None:
        raise ValueError(f"{name} is required: an iterable of (inputs, targets) batches (or one such batch)")
    if isinstance(data, torch.Tensor):
        items = [data]
    elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        items = [tuple(data)]  # a single (inputs, targets) batch
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, got {type(data).__name__}") from None
        items = []
        for item in iterator:
            items.append(item)
            if num_batches is not None and len(items) >= num_batches:
                break
    if num_batches is not None:
        items = items[:num_batches]
    device = model_device(model)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            x, y = item, None
        elif isinstance(item, (tuple, list)) and len(item) >= 1:
            x, y = item[0], (item[1] if len(item) > 1 else None)
        else:
            raise TypeError(f"{name}: batch {i} must be (inputs, targets) or an input tensor, got {type(item).__name__}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: the inputs of batch {i} must be a torch.Tensor, got {type(x).__name__}")
        if need_targets and y is None:
            raise ValueError(f"{name}: batch {i} has no targets, and this score needs a loss: pass (inputs, targets)")
        out.append((x.to(device), None if y is None else y.to(device)))
    if not out:
        raise ValueError(f"{name} is empty: pass at least one (inputs, targets) batch")
    return out


def batch_size(x: torch.Tensor) -> int:
    return int(x.shape[0]) if x.dim() > 0 else 1


def weighted_average(values: Iterable[Tuple[float, torch.Tensor]]):
    """sum_b n_b v_b / sum_b n_b for pairs (n_b, v_b)."""
    total, acc = 0, None
    for n, v in values:
        acc = v * n if acc is None else acc + v * n
        total += n
    return acc / total


def check_loss_fn(loss_fn):
    if loss_fn is None:
        return F.cross_entropy
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    return loss_fn


@contextlib.contextmanager
def scoring(model: nn.Module, with_biases: bool = False):
    """Score ``model`` without changing it: evaluation mode (no dropout noise, no running-statistics updates),
    gradients enabled, ``requires_grad`` switched on for the prunable weights (and their layers' biases with
    ``with_biases``); everything restored afterwards.

    Scores are taken with :func:`torch.autograd.grad`, which never writes ``.grad``, so existing gradients
    survive as they are.
    """
    modules = _check_has_prunable(model)
    training = {m: m.training for m in model.modules()}
    params = [_original(m) for m in modules.values()]
    if with_biases:
        params += [m.bias for m in modules.values() if isinstance(getattr(m, "bias", None), torch.Tensor)]
    requires = [p.requires_grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield modules
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        for m, t in training.items():
            m.train(t)


def weight_params(modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """The trainable tensors of the prunable weights (``original`` when masked): gradients are taken w.r.t. them.

    For a masked layer ``d L / d original = (d L / d W) * mask``, so pruned entries get a zero gradient, and the
    product ``g * w`` is the same whichever of the two is used (``w`` is zero there).
    """
    return {n: _original(m) for n, m in modules.items()}


def effective_weights(modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """The weights the layers use (``original * mask``), detached."""
    return {n: m.weight.detach() for n, m in modules.items()}


def broadcast_rows(neuron_scores: Dict[str, torch.Tensor], modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """Give every weight of output row / channel j the score of neuron j (shape of the weight)."""
    out = {}
    for n, v in neuron_scores.items():
        shape = _original(modules[n]).shape
        out[n] = v.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape).clone()
    return out


def layer_samples(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Reshape a layer output to ``(samples, neurons)``: every token / spatial position is a sample."""
    if isinstance(module, nn.Linear):
        return out.reshape(-1, out.shape[-1])
    # convolution: (B, C, *spatial) -> (B * spatial, C)
    return out.movedim(1, -1).reshape(-1, out.shape[1])


def neuron_sum_per_example(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Sum a layer-output-shaped tensor over everything but the example and the neuron: ``(B, neurons)``."""
    if isinstance(module, nn.Linear):
        return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1) if t.dim() > 1 else t.reshape(1, -1)
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)
