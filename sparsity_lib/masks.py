"""Masks on a model: which weights are prunable, attaching masks, reading them back, making them permanent.

A mask is a boolean tensor shaped like the weight (``True`` = keep). It lives on the model as a
:mod:`torch.nn.utils.parametrize` parametrization, so that the weight a layer *uses* is ``original * mask``:

* masked weights are exactly zero in every forward pass, and their gradient is zero, so they stay zero through
  optimizer steps (momentum, weight decay), ``state_dict`` round-trips and ``copy.deepcopy``;
* unlike ``torch.nn.utils.prune``'s forward pre-hooks, nothing is recomputed behind the user's back and the
  parametrization can be removed cleanly with :func:`remove_masks`, which restores plain parameters and the
  dense ``state_dict`` keys.

Survey §2.1 (model sparsity) and §3 (what to prune). Defined for Chapter 01, used by every chapter.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

#: Layer types whose ``weight`` is prunable (fully connected and convolutional layers).
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Mask(nn.Module):
    """Parametrization ``W -> W * mask`` with a boolean ``mask`` buffer (saved in ``state_dict``).

    The multiplication uses a floating-point copy of the mask (multiplying a float tensor by a bool tensor
    converts the bool tensor on every call, which made a masked training step of LeNet-300-100 ~25% slower than
    a dense one). The copy is a non-persistent buffer, so ``state_dict`` holds only the boolean mask; it is
    refreshed whenever ``mask`` changes (in-place edits and ``load_state_dict`` included), detected through the
    tensor's version counter.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().to(torch.bool))
        self.register_buffer("multiplier", self.mask.to(torch.get_default_dtype()), persistent=False)
        self._synced = self._mask_version()

    def _mask_version(self):
        return (self.mask.data_ptr(), self.mask._version)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._synced != self._mask_version() or self.multiplier.dtype != weight.dtype:
            self.multiplier = self.mask.to(device=weight.device, dtype=weight.dtype)
            self._synced = self._mask_version()
        return weight * self.multiplier

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"shape={tuple(self.mask.shape)}, kept={kept}/{self.mask.numel()}"


def _prunable_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{"fc1.weight": module} for every prunable layer, in module order."""
    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            out[f"{module_name}.weight" if module_name else "weight"] = module
    return out


def _mask_module(module: nn.Module) -> Mask | None:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations["weight"]:
            if isinstance(p, Mask):
                return p
    return None


def _original(module: nn.Module) -> torch.nn.Parameter:
    """The underlying trainable tensor (``original`` when masked, ``weight`` otherwise)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def prunable(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The prunable weights of ``model``: ``{"fc1.weight": tensor, ...}`` by their dense names, in module order.

    Prunable are the ``weight`` tensors of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers; biases, norms and
    embeddings are not. Each tensor is the *effective* weight (``original * mask`` when the layer is masked),
    so pruned entries read as exact zeros.
    """
    return {name: module.weight for name, module in _prunable_modules(model).items()}


def _check_has_prunable(model: nn.Module) -> Dict[str, nn.Module]:
    modules = _prunable_modules(model)
    if not modules:
        raise ValueError(
            "model has no prunable weights: sparsity_lib prunes the 'weight' of "
            + ", ".join(t.__name__ for t in PRUNABLE_TYPES)
            + " layers"
        )
    return modules


def validate_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Dict[str, nn.Module]:
    """Check ``masks`` against ``model`` (names, shapes, dtypes) without changing anything; return the modules."""
    modules = _check_has_prunable(model)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict {{name: bool tensor}}, got {type(masks).__name__}")
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"masks: unknown layer name {name!r}; prunable weights are {list(modules)}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"masks[{name!r}] must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must have dtype torch.bool, got {mask.dtype}")
        shape = tuple(_original(modules[name]).shape)
        if tuple(mask.shape) != shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, the weight has shape {shape}")
    return modules


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Attach (or replace) masks on ``model`` in place and return it.

    ``masks`` maps dense weight names (``"fc1.weight"``) to boolean tensors of the weight's shape, ``True`` = keep.
    Layers not named keep whatever mask they have. On the module, ``weight`` becomes a parametrized property;
    the trainable tensor moves to ``<layer>.parametrizations.weight.original`` and the mask to the buffer
    ``<layer>.parametrizations.weight.0.mask`` (these are the ``state_dict`` keys until :func:`remove_masks`).
    The stored values of masked weights are also set to zero, so that nothing of them survives in ``original``.

    All masks are validated before anything changes: a wrong name, shape or dtype raises and leaves the model
    as it was.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> apply_masks(model, {"weight": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)})
        >>> float((model.weight == 0).float().mean())
        0.5
    """
    modules = validate_masks(model, masks)
    for name, mask in masks.items():
        module = modules[name]
        original = _original(module)
        mask = mask.to(device=original.device)
        existing = _mask_module(module)
        if existing is not None:
            existing.mask.copy_(mask)
        else:
            parametrize.register_parametrization(module, "weight", Mask(mask), unsafe=True)
        with torch.no_grad():
            _original(module).mul_(mask)
    return model


def get_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: bool tensor}`` for every prunable weight (an all-``True`` mask for a layer that has none).

    The tensors are copies: changing them does not change the model (use :func:`apply_masks`).
    """
    out = {}
    for name, module in _check_has_prunable(model).items():
        existing = _mask_module(module)
        if existing is not None:
            out[name] = existing.mask.detach().clone()
        else:
            out[name] = torch.ones_like(module.weight, dtype=torch.bool)
    return out


def is_masked(model: nn.Module) -> bool:
    """Whether any prunable layer of ``model`` carries a mask."""
    return any(_mask_module(m) is not None for m in _prunable_modules(model).values())


def remove_masks(model: nn.Module) -> nn.Module:
    """Make the pruning permanent: every masked layer gets a plain ``weight`` parameter with zeros where pruned.

    ``state_dict`` keys return to the dense ones (``fc1.weight``). Sparsity is kept (the zeros are stored), but
    nothing holds pruned weights at zero any more: further training may make them nonzero.
    """
    for module in _prunable_modules(model).values():
        if parametrize.is_parametrized(module, "weight"):
            _remove_weight_parametrization(module)
            # Linear and Conv register weight before bias: restore that order so state_dict keys read as before
            module._parameters = {"weight": module._parameters.pop("weight"), **module._parameters}
    return model


def _remove_weight_parametrization(module: nn.Module) -> None:
    """Turn a masked ``weight`` back into a plain parameter holding ``original * mask``.

    ``torch.nn.utils.parametrize.remove_parametrizations`` deletes the ``weight`` property from the module's
    class, but ``copy.deepcopy`` of a parametrized module *shares* that dynamically created class with the
    original: unmasking a copy would break the original model. When the mask is the only parametrization of the
    module (always so for masks made by this library), we instead restore the module's own class on this
    instance alone, which leaves every other instance untouched. The ``Parameter`` object is kept (as torch does),
    so optimizers that hold it keep working.
    """
    plist = module.parametrizations
    only_our_mask = list(plist.keys()) == ["weight"] and len(plist["weight"]) == 1 and isinstance(plist["weight"][0], Mask)
    if not only_our_mask:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return
    original = plist["weight"].original
    with torch.no_grad():
        original.mul_(plist["weight"][0].mask.to(original.dtype))
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]  # the class before parametrization, e.g. nn.Linear
    module.register_parameter("weight", original)


def set_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the stored (``original``) values of the named prunable weights, keeping masks.

    Masked positions end up zero whatever ``weights`` holds there. Used by methods that update surviving
    weights (OBS, OBC, SparseGPT) and by lottery-ticket rewinding.
    """
    modules = _check_has_prunable(model)
    for name, value in weights.items():
        if name not in modules:
            raise ValueError(f"weights: unknown layer name {name!r}; prunable weights are {list(modules)}")
        original = _original(modules[name])
        if tuple(value.shape) != tuple(original.shape):
            raise ValueError(f"weights[{name!r}] has shape {tuple(value.shape)}, expected {tuple(original.shape)}")
    with torch.no_grad():
        for name, value in weights.items():
            module = modules[name]
            original = _original(module)
            original.copy_(value.to(original))
            existing = _mask_module(module)
            if existing is not None:
                original.mul_(existing.mask)


def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights that are exactly zero (0.0 for a dense model, 0.9 after 90% pruning)."""
    total, zeros = 0, 0
    with torch.no_grad():
        for weight in prunable(model).values():
            total += weight.numel()
            zeros += int((weight == 0).sum())
    if total == 0:
        raise ValueError("model has no prunable weights")
    return zeros / total


def sparsity_report(model: nn.Module):
    """Per-layer table of the prunable weights: name, shape, parameters, nonzeros, sparsity (plus a total row).

    Returns a ``pandas.DataFrame`` when pandas is installed (it renders as a table in a notebook), else a list
    of dicts.
    """
    rows = []
    with torch.no_grad():
        for name, weight in prunable(model).items():
            nnz = int((weight != 0).sum())
            rows.append({"name": name, "shape": tuple(weight.shape), "params": weight.numel(), "nonzeros": nnz,
                         "sparsity": 1 - nnz / weight.numel()})
    if not rows:
        raise ValueError("model has no prunable weights")
    total = sum(r["params"] for r in rows)
    nnz = sum(r["nonzeros"] for r in rows)
    rows.append({"name": "total", "shape": "", "params": total, "nonzeros": nnz, "sparsity": 1 - nnz / total})
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        return rows
    return pd.DataFrame(rows).set_index("name").round({"sparsity": 4})


def count_params(model: nn.Module) -> int:
    """Number of prunable weights."""
    return sum(w.numel() for w in prunable(model).values())


__all__ = [
    "Mask", "PRUNABLE_TYPES", "prunable", "apply_masks", "get_masks", "remove_masks", "set_weights", "sparsity",
    "sparsity_report", "validate_masks", "is_masked", "count_params",
]
