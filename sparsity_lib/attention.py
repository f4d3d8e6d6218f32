"""Sparse attention: boolean (query, key) patterns, head importance and head pruning.

**Patterns.** A pattern is a bool tensor ``M`` of shape ``(L, L)``; ``M[i, j]`` says whether query ``i`` may attend
to key ``j``. Attention with a pattern is :math:`\\mathrm{softmax}(QK^\\top/\\sqrt{d} + \\log M)V` (eq. 12.2 of the
chapter): disallowed pairs get weight exactly zero, and the cost of the score and value products is the number of
allowed pairs, :math:`\\mathrm{nnz}(M)`, instead of :math:`L^2` (survey §6.2.3):

* :func:`local_window` (sliding window): allowed iff :math:`|i - j| \\le w`;
* :func:`strided` (Child et al. {cite}`child2019generating`): allowed iff :math:`|i - j| \\le w` or
  :math:`(i - j) \\bmod s = 0`;
* :func:`global_window` (Longformer, Beltagy et al. {cite}`beltagy2020longformer`): the window, plus every pair
  whose query or key is one of the ``global_tokens``;
* :func:`bigbird` (Zaheer et al. {cite}`zaheer2020big`): window + global + ``r`` random keys per query;
* :func:`topk_pattern`: data-dependent, the ``k`` largest scores of each query (``MultiHeadAttention.topk``);
* ``causal=True`` on any of them intersects with :math:`j \\le i`.

**Heads.** Michel et al. {cite}`michel2019sixteen` put a gate :math:`\\xi_h` on every head's output and score a
head by :math:`I_h = \\mathbb{E}_x \\left|\\partial L / \\partial \\xi_h\\right|` at :math:`\\xi = 1` (their eq. 2),
the first-order estimate of the loss change when the head is removed; :func:`head_importance` computes it (per
layer, normalized by its L2 norm across the layer's heads as they do when pruning globally), :func:`prune_heads`
sets the gates of the least important heads to zero (``TinyTransformer``'s ``head_gate`` buffers). Survey §6.2.1.
Chapter 12.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from .masks import prunable


def _check_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    return length


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (how far a query sees to each side), got {window!r}")
    return window


def _finish(pattern: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:
        pattern &= torch.ones_like(pattern).tril()
    return pattern


def _distance(length: int) -> torch.Tensor:
    i = torch.arange(length)
    return i[:, None] - i[None, :]


def full(length: int, causal: bool = False) -> torch.Tensor:
    """Dense attention: every pair allowed (``causal``: :math:`j \\le i`)."""
    return _finish(torch.ones(_check_length(length), length, dtype=torch.bool), causal)


def local_window(length: int, window: int, causal: bool = False) -> torch.Tensor:
    """Sliding window: ``M[i, j]`` iff :math:`|i - j| \\le` ``window``."""
    length, window = _check_length(length), _check_window(window)
    return _finish(_distance(length).abs() <= window, causal)


def strided(length: int, window: int, stride: int, causal: bool = False) -> torch.Tensor:
    """Strided (Child et al. {cite}`child2019generating`): iff :math:`|i-j| \\le w` or :math:`(i-j) \\bmod s = 0`."""
    length, window = _check_length(length), _check_window(window)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    d = _distance(length)
    return _finish((d.abs() <= window) | (d.remainder(stride) == 0), causal)


def _global_positions(length: int, global_tokens) -> torch.Tensor:
    positions = torch.as_tensor(list(global_tokens), dtype=torch.long)
    if positions.numel() and (positions.min() < -length or positions.max() >= length):
        raise ValueError(f"global_tokens must be positions in [-{length}, {length}), got {list(global_tokens)}")
    return positions.remainder(length)


def global_window(length: int, window: int, global_tokens=(0,), causal: bool = False) -> torch.Tensor:
    """Longformer (Beltagy et al. {cite}`beltagy2020longformer`): the local window, plus row and column of every
    global position (a global token attends to all and is attended by all). Negative positions count from the
    end (``-1`` is the last token, e.g. a classification query)."""
    pattern = local_window(length, window)
    g = _global_positions(length, global_tokens)
    pattern[g, :] = True
    pattern[:, g] = True
    return _finish(pattern, causal)


def bigbird(length: int, window: int, global_tokens=(0,), num_random: int = 2, seed: int = 0,
            causal: bool = False) -> torch.Tensor:
    """BigBird (Zaheer et al. {cite}`zaheer2020big`): :func:`global_window` plus ``num_random`` keys per query drawn
    uniformly (without replacement) from ``seed``; allowed iff window or global or drawn."""
    pattern = global_window(length, window, global_tokens)
    if isinstance(num_random, bool) or not isinstance(num_random, int) or not 0 <= num_random <= length:
        raise ValueError(f"num_random must be an integer in [0, length={length}], got {num_random!r}")
    g = torch.Generator().manual_seed(int(seed))
    drawn = torch.rand(length, length, generator=g).argsort(dim=1)[:, :num_random]
    pattern.scatter_(1, drawn, True)
    return _finish(pattern, causal)


def topk_pattern(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Data-dependent sparse attention: for scores ``(..., L_q, L_k)``, allowed iff the key is among the ``k``
    largest scores of its query (exactly ``k`` per query; ties broken by ``torch.topk``)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be an integer in [1, {scores.shape[-1]}] (the number of keys), got {k!r}")
    index = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def pattern_density(pattern: torch.Tensor) -> float:
    """Fraction of allowed (query, key) pairs, the cost of attention relative to dense: :math:`nnz(M)/L^2`."""
    return float(pattern.float().mean())


def attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every attention with a ``head_gate`` (e.g. :class:`~sparsity_lib.models.MultiHeadAttention`)."""
    found = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "head_gate", None), torch.Tensor)}
    if not found:
        raise ValueError(f"model has no attention module with a head_gate (got {type(model).__name__}); use "
                         f"sparsity_lib.models.tiny_transformer")
    return found


def set_pattern(model: nn.Module, pattern: Optional[torch.Tensor] = None, topk: Optional[int] = None) -> None:
    """Give every attention of ``model`` the (query, key) ``pattern`` (``None`` = dense) and data-dependent
    ``topk`` (``None`` = off)."""
    if pattern is not None and (pattern.dtype != torch.bool or pattern.dim() != 2):
        raise ValueError(f"pattern must be a 2-D bool tensor (query, key), got {pattern.dtype} {tuple(pattern.shape)}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive integer or None, got {topk!r}")
    for module in attention_modules(model).values():
        module.pattern, module.topk = pattern, topk


def head_importance(model: nn.Module, data, loss_fn=None, normalize: bool = True) -> Dict[str, torch.Tensor]:
    """Michel et al.'s head importance :math:`I_h = \\mathbb{E}_x |\\partial L/\\partial \\xi_h|` at the current
    gates (their eq. 2; averaged over the batches of ``data``), ``{attention name: (num_heads,) tensor}``. Pruned
    heads (gate 0) get 0. ``normalize`` divides each layer's vector by its L2 norm (their §4.1, so that layers
    compare under a global ranking). The model's parameters and gates are unchanged."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    modules = attention_modules(model)
    totals = {n: torch.zeros_like(m.head_gate) for n, m in modules.items()}
    count = 0
    training = model.training
    model.eval()
    try:
        for inputs, targets in data:
            gates = {n: m.head_gate.detach().clone().requires_grad_(True) for n, m in modules.items()}
            hooks = [m.register_forward_pre_hook(lambda mod, args, kw, g=gates[n]: (args, {**kw, "gate": g}),
                                                 with_kwargs=True) for n, m in modules.items()]
            try:
                loss = loss_fn(model(inputs), targets)
                grads = torch.autograd.grad(loss, list(gates.values()))
            finally:
                for h in hooks:
                    h.remove()
            for (n, _), g in zip(gates.items(), grads):
                totals[n] += g.abs().detach() * inputs.shape[0]
            count += inputs.shape[0]
    finally:
        model.train(training)
    if count == 0:
        raise ValueError("data must hold at least one (inputs, targets) batch")
    out = {}
    for n, m in modules.items():
        value = totals[n] / count * (m.head_gate != 0)
        if normalize and value.norm() > 0:
            value = value / value.norm()
        out[n] = value
    return out


def prune_heads(model: nn.Module, num_heads: int, importance: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Set to zero the gates of the ``num_heads`` least important heads over the whole model (global ranking of
    ``importance``, e.g. from :func:`head_importance`; already pruned heads count). Returns the gates."""
    modules = attention_modules(model)
    names = list(modules)
    total = sum(modules[n].head_gate.numel() for n in names)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or not 0 <= num_heads < total:
        raise ValueError(f"num_heads must be an integer in [0, {total}) (at least one head stays), got {num_heads!r}")
    missing = [n for n in names if n not in importance]
    if missing:
        raise ValueError(f"importance has no entry for attention layers {missing}")
    flat = torch.cat([importance[n].detach().reshape(-1).double() for n in names])
    order = torch.argsort(flat, stable=True)[:num_heads]
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order] = False
    start, gates = 0, {}
    with torch.no_grad():
        for n in names:
            m = modules[n]
            h = m.head_gate.numel()
            m.head_gate.mul_(keep[start:start + h].to(m.head_gate))
            gates[n] = m.head_gate.clone()
            start += h
    return gates


def head_importance_scores(model: nn.Module, data=None, loss_fn=None) -> Dict[str, torch.Tensor]:
    """Head importance as a weight score for ``sl.prune`` (structure ``"neuron"``): the rows of ``q``, ``k``, ``v``
    that belong to head :math:`h` get :math:`I_h` (:func:`head_importance`); every other prunable weight gets
    ``+inf`` (never removed by this score). Survey §6.2.1."""
    if data is None:
        raise ValueError("head_importance needs data: an iterable of (inputs, targets) batches")
    importance = head_importance(model, data, loss_fn)
    weights = prunable(model)
    out = {name: torch.full_like(w, math.inf) for name, w in weights.items()}
    for attn_name, value in importance.items():
        module = dict(model.named_modules())[attn_name]
        rows = value.repeat_interleave(module.head_dim)
        for proj in ("q", "k", "v"):
            key = f"{attn_name}.{proj}.weight"
            if key in out:
                out[key] = rows[:, None].expand_as(out[key]).clone()
    return out


def compact_heads(model: nn.Module) -> nn.Module:
    """The smaller dense transformer that head pruning leaves: for every attention, the rows of ``q``, ``k``, ``v``
    (weights and biases) and the columns of ``out`` of the heads whose gate is 0 are deleted and ``num_heads``
    lowered; the model width (the residual stream) is unchanged. Masks are baked in, gates of the kept heads kept.
    Outputs equal the gated model's. A layer whose heads are all pruned keeps one head with gate 0 (it contributes
    nothing). ``model`` is unchanged. Each removed head saves :math:`d_h (4d + 3)` parameters. Survey §6.2.1."""
    from .structure import _baked_copy

    attention_modules(model)   # refuses a model without head gates
    new = _baked_copy(model)
    with torch.no_grad():
        for module in attention_modules(new).values():
            keep = (module.head_gate != 0).nonzero().flatten()
            if keep.numel() == 0:
                keep = torch.zeros(1, dtype=torch.long)
            rows = (keep[:, None] * module.head_dim + torch.arange(module.head_dim)).flatten()
            for proj in (module.q, module.k, module.v):
                proj.weight = nn.Parameter(proj.weight.detach()[rows].clone())
                if proj.bias is not None:
                    proj.bias = nn.Parameter(proj.bias.detach()[rows].clone())
                proj.out_features = len(rows)
            module.out.weight = nn.Parameter(module.out.weight.detach()[:, rows].clone())
            module.out.in_features = len(rows)
            module.head_gate = module.head_gate[keep].clone()
            module.num_heads = len(keep)
    new.train(model.training)
    return new


def attention_flops(length: int, dim: int, pattern: Optional[torch.Tensor] = None) -> int:
    """Multiply-adds of one attention's score and value products: :math:`2\\, d\\, \\mathrm{nnz}(M)` (dense:
    :math:`2 d L^2`, quadratic in the length)."""
    pairs = length * length if pattern is None else int(pattern[:length, :length].sum())
    return 2 * dim * pairs


__all__ = ["full", "local_window", "strided", "global_window", "bigbird", "topk_pattern", "pattern_density",
           "attention_modules", "set_pattern", "head_importance", "prune_heads", "head_importance_scores",
           "compact_heads", "attention_flops"]
