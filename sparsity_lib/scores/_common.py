"""Helpers shared by the data-driven score functions: scoring mode, gradients, neuron broadcasting.

Private to :mod:`sparsity_lib.scores`; nothing here is a pruning criterion by itself. The general plumbing
(calibration batches, eval mode, input capture, argument checks) lives in :mod:`sparsity_lib.plumbing` and is
re-exported here under its old names (``batches``, ``batch_size``, ``model_device``, ``check_num_batches``).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..masks import _check_has_prunable, _original, _weight
from ..plumbing import attention_math, batch_size, batches, check_loss_fn, check_positive_int, eval_mode, model_device  # noqa: F401,E501


def check_num_batches(num_batches, name: str = "num_batches") -> Optional[int]:
    return check_positive_int(num_batches, name, allow_none=True, none_means="all batches")


def weighted_average(values: Iterable[Tuple[float, torch.Tensor]]):
    """sum_b n_b v_b / sum_b n_b for pairs (n_b, v_b)."""
    total, acc = 0, None
    for n, v in values:
        acc = v * n if acc is None else acc + v * n
        total += n
    return acc / total


@contextlib.contextmanager
def scoring(model: nn.Module, with_biases: bool = False):
    """Score ``model`` without changing it: evaluation mode (no dropout noise, no running-statistics updates),
    gradients enabled, ``requires_grad`` switched on for the prunable weights (and their layers' biases with
    ``with_biases``); everything restored afterwards.

    Scores are taken with :func:`torch.autograd.grad`, which never writes ``.grad``, so existing gradients
    survive as they are.
    """
    modules = _check_has_prunable(model)
    params = list({id(p): p for p in (_original(m, n) for n, m in modules.items())}.values())
    if with_biases:
        params += [m.bias for m in modules.values() if isinstance(getattr(m, "bias", None), torch.Tensor)]
    requires = [p.requires_grad for p in params]
    with eval_mode(model):
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad(), attention_math(model):   # attention as plain operations: hooks, 2nd order
                yield modules
        finally:
            for p, r in zip(params, requires):
                p.requires_grad_(r)


def weight_params(modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """The trainable tensors of the prunable weights (``original`` when masked): gradients are taken w.r.t. them.

    For a masked layer ``d L / d original = (d L / d W) * mask``, so pruned entries get a zero gradient, and the
    product ``g * w`` is the same whichever of the two is used (``w`` is zero there).
    """
    return {n: _original(m, n) for n, m in modules.items()}


def effective_weights(modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """The weights the layers use (``original * mask``), detached."""
    return {n: _weight(m, n).detach() for n, m in modules.items()}


def broadcast_rows(neuron_scores: Dict[str, torch.Tensor], modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """Give every weight of output row / channel j the score of neuron j (shape of the weight)."""
    out = {}
    for n, v in neuron_scores.items():
        shape = _original(modules[n], n).shape
        out[n] = v.reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape).clone()
    return out


def layer_samples(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Reshape a layer output to ``(samples, neurons)``: every token / spatial position is a sample."""
    if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
        return out.reshape(-1, out.shape[-1])
    # convolution: (B, C, *spatial) -> (B * spatial, C)
    return out.movedim(1, -1).reshape(-1, out.shape[1])


def neuron_sum_per_example(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Sum a layer-output-shaped tensor over everything but the example and the neuron: ``(B, neurons)``."""
    if isinstance(module, nn.Linear):
        return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1) if t.dim() > 1 else t.reshape(1, -1)
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)
