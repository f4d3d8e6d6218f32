"""Plumbing: the small mechanics every data-driven method needs, written once.

Nothing here is a pruning method. These are the pieces that the second-order methods (:mod:`sparsity_lib.curvature`,
:mod:`sparsity_lib.obs`, :mod:`sparsity_lib.layerwise`) and the data-driven scores (:mod:`sparsity_lib.scores`)
share, so that each is implemented, validated and tested in one place:

* :func:`batches`: calibration data (one batch, an input tensor, or an iterable of batches) parsed into a list of
  ``(inputs, targets)`` pairs on the model's device, consumed once (a one-shot generator works), non-finite values
  refused;
* :func:`eval_mode`: evaluation mode (no dropout noise, no running-statistics updates) entered and every module's
  own training flag restored afterwards;
* :func:`capture_inputs`: run the model over batches and hand each named layer's input to a callback, through
  forward *pre*-hooks (the input exactly as the layer receives it), the hooks always removed, optionally stopping
  the forward pass once the last layer of interest was reached;
* :func:`attention_math` / :func:`attention_forward`: ``nn.MultiheadAttention`` run in plain tensor operations
  (``out_proj`` called as a module so that hooks fire, second derivatives available), and
  :func:`projection_input`: the input an attention in-projection weight multiplies;
* :func:`layer_rows` / :func:`unfold_conv_input`: the rows ``x`` such that a layer computes ``W_2d x`` (a Linear
  layer's input vectors; a convolution's unfolded im2col patches, any padding mode, per group);
* :func:`flatten` / :func:`unflatten` / :func:`weight_matrix`: ``{name: tensor}`` to one flat vector and back
  (``sl.prunable`` order), and a weight viewed as ``(out, fan_in)``;
* :func:`check_positive_int`, :func:`check_number`, :func:`check_bool`, :func:`check_finite`: argument checks whose
  messages name the argument and the allowed values.

Used from Chapter 05 on.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]


# ================================================================================================ checks
def check_positive_int(value, name: str, *, allow_none: bool = False, none_means: str = "") -> Optional[int]:
    """``value`` as an ``int >= 1`` (``None`` passes through with ``allow_none``); ``ValueError`` naming ``name``
    otherwise. Booleans are refused (``True`` is not a count); numpy integers are accepted."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and hasattr(value, "__index__")
    if ok:
        value = int(value.__index__())
    if not ok or value < 1:
        extra = f" or None{f' ({none_means})' if none_means else ''}" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}")
    return value


def check_number(value, name: str, *, minimum: Optional[float] = None, strict: bool = False,
                 maximum: Optional[float] = None, meaning: str = "") -> float:
    """``value`` as a finite float in the given range (``minimum < value`` with ``strict``, else ``<=``);
    ``ValueError`` naming ``name``, the range and ``meaning`` otherwise. Booleans are refused."""
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if ok:
        value = float(value)
        if minimum is not None and (value <= minimum if strict else value < minimum):
            ok = False
        if maximum is not None and value > maximum:
            ok = False
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if strict else '>='} {minimum:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        what = "a number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{name} must be {what}{f' ({meaning})' if meaning else ''}, got {value!r}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_loss_fn(loss_fn) -> Callable:
    """``loss_fn`` as a callable ``loss_fn(outputs, targets)``: ``None`` means cross-entropy (``sl.prune`` decides
    before scoring whether that default is meaningful for the data); anything else must be callable."""
    if loss_fn is None:
        return F.cross_entropy
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    return loss_fn


def check_finite(tensor: torch.Tensor, what: str, advice: str = "") -> torch.Tensor:
    """Raise ``ValueError`` if a floating-point ``tensor`` holds NaN or inf (``what`` names it). A single NaN
    in calibration data or curvature turns every OBS update into NaN: refuse before anything is written."""
    if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"{what} contains {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) out of "
                             f"{tensor.numel()}. " + (advice or "Clean the data first: nothing was changed."))
    return tensor


# ======================================================================================= calibration data
def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _one_batch(data) -> bool:
    """A tuple ``(inputs, targets)`` of two tensors, or a list ``[inputs, targets]`` whose second tensor has fewer
    dimensions and the same number of samples (a list of two input batches is two batches)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
        return False
    if isinstance(data, tuple):
        return True
    x, y = data
    return y.dim() < x.dim() and y.dim() >= 1 and x.shape[0] == y.shape[0]


def batches(data, model: nn.Module, num_batches: Optional[int] = None, need_targets: bool = False,
            name: str = "data", finite: bool = True) -> List[Batch]:
    """The calibration data as a list of ``(inputs, targets)`` pairs on the model's device.

    ``data`` may be one batch (a *tuple* or a list ``[inputs, targets]`` of two tensors), one tensor of inputs, or
    an iterable (list, DataLoader, generator) of either; it is iterated once, so a one-shot generator works.
    ``num_batches`` keeps only the first batches. Targets may be ``None`` when ``need_targets`` is False. With
    ``finite`` (default), NaN or inf in floating-point inputs or targets raise ``ValueError`` (nothing has been
    computed yet, so nothing changed).
    """
    num_batches = check_positive_int(num_batches, "num_batches", allow_none=True, none_means="all batches")
    if data is None:
        raise ValueError(f"{name} is required: an iterable of (inputs, targets) batches (or one such batch)")
    if isinstance(data, torch.Tensor):
        items = [data]
    elif _one_batch(data):
        items = [tuple(data)]  # a single (inputs, targets) batch
    else:
        if isinstance(data, (str, bytes)):
            raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, got a string")
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, got "
                            f"{type(data).__name__}") from None
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
            raise TypeError(f"{name}: batch {i} must be (inputs, targets) or an input tensor, got "
                            f"{type(item).__name__}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: the inputs of batch {i} must be a torch.Tensor, got {type(x).__name__}")
        if need_targets and y is None:
            raise ValueError(f"{name}: batch {i} has no targets, and this method needs a loss: pass (inputs, targets)")
        if y is not None and not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if finite:
            check_finite(x, f"{name}: the inputs of batch {i}")
            if y is not None:
                check_finite(y, f"{name}: the targets of batch {i}")
        out.append((x.to(device), None if y is None else y.to(device)))
    if not out:
        raise ValueError(f"{name} is empty: pass at least one (inputs, targets) batch (a generator that was "
                         "already consumed is empty too: pass a list)")
    return out


def batch_size(x) -> int:
    """The number of samples of a batch of inputs or targets (1 for a scalar)."""
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1


# ============================================================================================ model state
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluation mode inside the block (deterministic: no dropout, batch norm uses its running statistics, which
    are not updated); on exit every module gets back its *own* training flag (a model may mix both)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, t in modes.items():
            m.train(t)


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass early (no later layer is needed)."""


def capture_inputs(model: nn.Module, modules: Mapping[str, nn.Module], items: Iterable[Batch],
                   record: Callable[[str, nn.Module, torch.Tensor], None], *, stop_early: bool = False) -> None:
    """Run ``model`` on the inputs of every batch of ``items`` (eval mode, no gradients) and call
    ``record(name, module, x)`` with the input ``x`` (detached) each time a layer of ``modules`` is called.

    Forward *pre*-hooks see the input exactly as the layer receives it, also when it is passed as a keyword
    (``layer(input=x)``); the hooks are removed whatever happens. ``stop_early`` ends each forward pass as soon as
    every layer of ``modules`` was seen once (valid when later layers do not matter, as in SparseGPT's code
    {cite}`frantar2023sparsegpt`). Raises ``ValueError`` naming the layers that were never called.
    """
    wanted = set(modules)
    seen: set = set()
    called: set = set()

    def make_hook(name):
        def hook(module, args, kwargs):
            if isinstance(module, nn.MultiheadAttention):   # an in-projection weight: its own input
                x = projection_input(module, name, args, kwargs)
            else:
                x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"the input of layer {name} is not a tensor ({type(x).__name__})")
            record(name, module, x.detach())
            seen.add(name)
            called.add(name)
            if stop_early and seen >= wanted:
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad(), attention_math(model):
            for x, _ in items:
                seen.clear()
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in called]
    if missing:
        raise ValueError(f"layers {missing} were never called in a forward pass of the model over the data")


# ============================================================================================ layer inputs
CONV_LAYERS = (nn.Conv1d, nn.Conv2d)
INPUT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


def unfold_conv_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The im2col patches of a Conv1d/Conv2d input, ``(groups, positions, fan_in)`` with ``fan_in = in/groups *
    prod(kernel)``: group ``g``'s output channels compute ``weight_2d[rows of g] @ patch`` at every position
    (bias aside), ``weight_2d`` the weight viewed as ``(out, fan_in)``. Padding as the layer does it (zeros,
    reflect, replicate or circular; ``"same"`` included, also when asymmetric)."""
    if not isinstance(module, CONV_LAYERS):
        raise ValueError(f"unfold_conv_input supports nn.Conv1d and nn.Conv2d, got {type(module).__name__}")
    pad = tuple(module._reversed_padding_repeated_twice)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1,) + module.kernel_size, (1,) + module.stride, (1,) + module.dilation
        pad = pad + (0, 0)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    cols = F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)   # (B, in * k, L)
    g = module.groups
    cols = cols.reshape(cols.shape[0], g, cols.shape[1] // g, cols.shape[2])   # (B, g, in/g * k, L)
    return cols.permute(1, 0, 3, 2).reshape(g, -1, cols.shape[2])


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``x`` (one per output position, ``(positions, fan_in)``) such that the layer computes
    ``weight_2d @ x`` (bias aside): a Linear layer's input vectors, a convolution's unfolded patches. Grouped
    convolutions have one set of rows per group: use :func:`unfold_conv_input`; here they raise ``ValueError``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module, nn.MultiheadAttention):   # an in-projection's input (see projection_input)
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, CONV_LAYERS):
        if module.groups != 1:
            raise ValueError(f"this method supports convolutions with groups=1 only, got groups={module.groups}")
        return unfold_conv_input(module, x)[0]
    raise ValueError(f"supported layers are nn.Linear, nn.Conv1d and nn.Conv2d, got {type(module).__name__}")


def check_input_layers(modules: Mapping[str, nn.Module], method: str, alternative: str = "") -> None:
    """Raise ``ValueError`` naming the first layer that is not Linear, Conv1d or Conv2d (before anything runs)."""
    for name, module in modules.items():
        if not isinstance(module, INPUT_LAYERS):
            raise ValueError(f"{method} supports nn.Linear, nn.Conv1d, nn.Conv2d and the in-projections of "
                             f"nn.MultiheadAttention; {name} is a "
                             f"{type(module).__name__}{f' ({alternative})' if alternative else ''}")


# ============================================================================================ attention
def _float_mask(mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """A boolean mask (``True`` = not allowed) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_forward(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                      attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                      is_causal: bool = False):
    """``nn.MultiheadAttention``'s forward pass written out in plain tensor operations:

    .. math:: \\mathrm{softmax}\\big((x W_Q^T + b_Q)(x W_K^T + b_K)^T / \\sqrt{d_h} + M\\big)(x W_V^T + b_V)

    per head, concatenated and passed through ``out_proj`` *called as a module* (so its hooks fire, unlike in
    ``F.multi_head_attention_forward``). The in-projection reads ``mha.in_proj_weight`` (or ``q/k/v_proj_weight``),
    masks included; ``bias_k``/``bias_v``, ``add_zero_attn``, boolean or float ``attn_mask`` (2-D or 3-D) and
    ``key_padding_mask``, ``batch_first``, unbatched inputs and dropout (in training mode) as PyTorch does them.
    Only differentiable elementary operations: second derivatives (GraSP, OBD) work, which the fused kernel of
    PyTorch's fast path does not provide. Equal to PyTorch's forward to float rounding (tested).
    """
    shared = key is query and value is query   # self-attention (before any reshaping makes new tensors)
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    tgt_len, bsz, embed = query.shape
    heads, head_dim = mha.num_heads, mha.head_dim
    q, k, v = _in_projection(mha, query, key, value, shared)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(tgt_len, key.shape[0], dtype=torch.bool, device=query.device).triu(1)
    attn_mask = _float_mask(attn_mask, q.dtype)
    key_padding_mask = _float_mask(key_padding_mask, q.dtype)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, mha.bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz * heads, 1, head_dim)], dim=1)
        v = torch.cat([v, v.new_zeros(bsz * heads, 1, head_dim)], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[1]
    scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)                       # (B*H, L, S)
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(bsz, 1, 1, src_len).expand(bsz, heads, 1, src_len)
        scores = scores + pad.reshape(bsz * heads, 1, src_len)
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if mha.dropout > 0.0 and mha.training:
        weights = F.dropout(weights, p=mha.dropout)
    out = (weights @ v).transpose(0, 1).reshape(tgt_len, bsz, embed)
    out = mha.out_proj(out)
    if not batched:
        out = out.squeeze(1)
    elif mha.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    weights = weights.reshape(bsz, heads, tgt_len, src_len)
    if average_attn_weights:
        weights = weights.mean(dim=1)
    if not batched:
        weights = weights.squeeze(0)
    return out, weights


def _in_projection(mha: nn.MultiheadAttention, query, key, value, shared: bool):
    """``q, k, v``; each projection's output ("its neurons") is handed to the callbacks in
    ``mha.__dict__["_sl_projection_hooks"]`` (``{attribute: (layer name, fn(output))}``, set by scores that read
    layer outputs), as the very tensor the attention goes on with (so derivatives with respect to it are
    meaningful). ``shared``: query, key and value are one tensor (required for the stacked ``in_proj_weight``)."""
    hooks = mha.__dict__.get("_sl_projection_hooks") or {}
    b_q = b_k = b_v = None
    if mha.in_proj_bias is not None:
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    if mha._qkv_same_embed_dim:
        if "in_proj_weight" in hooks:   # one output for the stacked weight: the input must be shared
            name, fn = hooks["in_proj_weight"]
            if not shared:
                raise ValueError(_cross_attention_message(name))
            qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
            fn(qkv)
            return qkv.chunk(3, dim=-1)
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    out = []
    for attr, x, b in (("q_proj_weight", query, b_q), ("k_proj_weight", key, b_k), ("v_proj_weight", value, b_v)):
        y = F.linear(x, getattr(mha, attr), b)
        if attr in hooks:
            hooks[attr][1](y)
        out.append(y)
    return tuple(out)


@contextlib.contextmanager
def attention_math(model: nn.Module):
    """Inside the block every ``nn.MultiheadAttention`` of ``model`` runs :func:`attention_forward` (plain tensor
    operations, ``out_proj`` called as a module) and PyTorch's fused fast path of attention and transformer layers
    is off (``torch.backends.mha.set_fastpath_enabled(False)``). Hooks on ``out_proj`` then fire, and second
    derivatives exist. Everything is restored on exit; a model without attention is untouched."""
    layers = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not layers:
        yield model
        return
    fastpath = torch.backends.mha.get_fastpath_enabled()
    saved = [(m, m.__dict__.get("forward")) for m in layers]
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for m in layers:
            m.forward = (lambda mod: lambda *args, **kwargs: attention_forward(mod, *args, **kwargs))(m)
        yield model
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, forward in saved:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


#: which argument of ``nn.MultiheadAttention.forward(query, key, value)`` each in-projection weight multiplies
_PROJECTION_INPUT = {"q_proj_weight": (0, "query"), "k_proj_weight": (1, "key"), "v_proj_weight": (2, "value")}


def _attention_argument(module: nn.Module, name: str, args, kwargs, position: int, key: str):
    return args[position] if len(args) > position else kwargs.get(key)


def projection_input(module: nn.Module, name: str, args, kwargs) -> torch.Tensor:
    """The input that the prunable weight ``name`` of attention layer ``module`` multiplies, from the arguments of
    ``module(query, key, value, ...)``: the query for ``in_proj_weight`` in self-attention (``query``, ``key`` and
    ``value`` the same tensor); the query, key or value for ``q/k/v_proj_weight``. For ``in_proj_weight`` under
    cross-attention (different tensors) the three row blocks multiply different inputs: ``ValueError`` naming the
    layer."""
    attr = name.rsplit(".", 1)[-1]
    if attr in _PROJECTION_INPUT:
        return _attention_argument(module, name, args, kwargs, *_PROJECTION_INPUT[attr])
    query = _attention_argument(module, name, args, kwargs, 0, "query")
    key = _attention_argument(module, name, args, kwargs, 1, "key")
    value = _attention_argument(module, name, args, kwargs, 2, "value")
    if key is not query or value is not query:
        raise ValueError(_cross_attention_message(name))
    return query


def _cross_attention_message(name: str) -> str:
    return (f"{name}: this attention layer is called with different query, key and value tensors "
            "(cross-attention), so the query, key and value rows of in_proj_weight multiply different "
            "inputs; this method needs one input per layer: leave the layer out (exclude=[...]) or "
            "build the attention with kdim/vdim (separate q_proj_weight, k_proj_weight, v_proj_weight)")


# ============================================================================================ weights
def weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """A weight viewed as ``(out, fan_in)``: rows are output neurons / channels (a view when possible)."""
    return w.reshape(w.shape[0], -1)


def flatten(tensors: Mapping[str, torch.Tensor], names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """One flat vector of the tensors of ``names`` (default: all, in the mapping's order), each row-major."""
    names = list(tensors) if names is None else list(names)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor], dtype: bool = True) -> Dict[str, torch.Tensor]:
    """Cut a flat vector back into ``{name: tensor}`` shaped like ``like`` (its order); with ``dtype`` (default)
    each piece takes the dtype of its model, except boolean vectors, which stay boolean."""
    sizes = [t.numel() for t in like.values()]
    if flat.numel() != sum(sizes):
        raise ValueError(f"the flat vector has {flat.numel()} entries, the tensors {sum(sizes)}")
    out = {}
    for (name, t), chunk in zip(like.items(), torch.split(flat, sizes)):
        chunk = chunk.reshape(t.shape)
        out[name] = chunk.to(t.dtype) if dtype and flat.dtype != torch.bool else chunk
    return out


__all__ = [
    "check_positive_int", "check_number", "check_bool", "check_finite", "check_loss_fn", "model_device", "batches", "batch_size",
    "eval_mode", "capture_inputs", "unfold_conv_input", "layer_rows", "check_input_layers", "weight_matrix",
    "flatten", "unflatten", "attention_forward", "attention_math", "projection_input",
]
