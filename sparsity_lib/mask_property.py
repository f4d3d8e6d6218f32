"""How a masked weight is read and assigned: the property that ``layer.weight`` becomes when a mask is attached.

torch.nn.utils.parametrize turns ``layer.weight`` into a property of a per-instance class; when
:func:`sparsity_lib.apply_masks` attaches a :class:`sparsity_lib.masks.Mask`, :func:`install_weight_property`
replaces that property by one with

* a fast getter (:func:`_fast_getter`): ``original * mask`` without torch's generic parametrization call, which
  cost about 10 us per weight read (a masked LeNet-300-100 training step 1.15x dense before, 1.10x after);
* a setter that lets ``torch.func.functional_call`` address the masked weight by its dense name
  (:func:`_functional_setter`).

Everything else (a user's parametrization after the mask, ``parametrize.cached()``, tracing, compiling, module
hooks, assignments other than functional_call's swap) goes to torch's own getter and setter. Survey §7 (the cost
of simulated sparsity). Used by :mod:`sparsity_lib.masks`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.utils import parametrize


def install_weight_property(module: nn.Module, attr: str = "weight") -> None:
    """Replace torch's property of a freshly masked weight by the library's: the fast getter
    (:func:`_fast_getter`), and a setter that lets ``torch.func.functional_call`` address the masked weight by its
    dense name (``"fc1.weight"``).

    functional_call swaps tensors in with ``setattr(layer, "weight", value)``, reads back what is there, and
    swaps the old value back in the same way. On a parametrized weight, torch turns the assignment into
    ``right_inverse`` (which a mask does not have). For assignments made by functional_call's swap only, the
    value passed stands in for the stored weight ``original`` during the call (the masks still apply: a masked
    model never uses a pruned weight, and gradients flow to the value), functional_call reads back the value
    it passed, and the swap back restores the model's own ``Parameter``. Any other assignment keeps torch's
    behaviour.
    """
    cls = type(module)
    prop = cls.__dict__.get(attr)
    if isinstance(prop, property) and prop.fset is not None and not getattr(prop.fset, "_sl_functional", False):
        getter = _fast_getter(prop.fget, attr)
        setattr(cls, attr, property(getter, _functional_setter(getter, prop.fset, attr)))


def _plain_call_path() -> bool:
    """True when calling a parametrization module is exactly calling its ``forward``: no parametrization cache,
    no tracing or compiling, no global module hooks (``nn.Module.__call__``'s own fast-path condition)."""
    hooks = _module_globals
    return not (parametrize._cache_enabled or _tracing_state() is not None or _is_compiling()
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


_module_globals = sys.modules[nn.Module.__module__]   # torch.nn.modules.module: its global hook registries
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _fast_getter(torch_getter, attr: str = "weight"):
    """The masked weight's property getter: ``original * mask`` without torch's generic machinery.

    torch's getter calls the ``ParametrizationList`` module, whose forward looks each further parametrization up
    by ``hasattr`` (an exception per call) and calls each through ``nn.Module.__call__``: about 10 us per weight
    read, which made a masked training step of LeNet-300-100 15% slower than a dense one (and slower than
    ``torch.nn.utils.prune``'s hooks). When the weight's only parametrization is a library :class:`sparsity_lib.masks.Mask` without
    hooks, and nothing that ``nn.Module.__call__`` would honour is active (:func:`_plain_call_path`), this calls
    ``Mask._masked`` on the stored weight directly: the same tensor operation, the same autograd graph.
    Everything else (a user's parametrization after the mask, ``parametrize.cached()``, compiling, tracing,
    hooks) takes torch's getter.
    """

    def get(self):
        plist = self._modules["parametrizations"]._modules[attr]
        chain = plist._modules
        if len(chain) == 1 and _plain_call_path() and not _has_hooks(plist):
            mask, original = chain["0"], plist._parameters.get("original")
            if type(mask).__dict__.get("_sl_plain_mask") and original is not None and not _has_hooks(mask):
                return mask._masked(original)
        return torch_getter(self)

    get._sl_fast = True
    return get


def _from_swap(frame) -> bool:
    return frame is not None and frame.f_code.co_name == "swap_tensor" and \
        frame.f_globals.get("__name__", "").startswith("torch.nn.utils")


def _functional_setter(torch_getter, torch_setter, attr: str = "weight"):
    key = "_sl_functional_stack" if attr == "weight" else f"_sl_functional_stack_{attr}"

    def get_during_swap(self):
        stack = self.__dict__.get(key)
        if stack and _from_swap(sys._getframe(1)):
            return stack[-1][2]  # functional_call reads back the value it swapped in
        return torch_getter(self)

    def set_weight(self, value):
        frame = sys._getframe(1)  # nn.Module.__setattr__, then the caller of setattr
        if frame.f_code.co_name == "__setattr__":
            frame = frame.f_back
        if not _from_swap(frame):
            return torch_setter(self, value)
        plist = self.parametrizations[attr]
        stack = self.__dict__.setdefault(key, [])
        if stack and value is stack[-1][0]:  # the swap back: restore what was stored before
            plist._parameters["original"] = stack.pop()[1]
            if not stack:
                setattr(type(self), attr, property(torch_getter, set_weight))
            return None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(plist.original.shape):
            raise ValueError(f"functional_call: the value for a masked weight must be a tensor of shape "
                             f"{tuple(plist.original.shape)}, got {tuple(getattr(value, 'shape', ()))}")
        stack.append((frame.f_locals.get("orig_tensor"), plist._parameters["original"], value))
        plist._parameters["original"] = value
        setattr(type(self), attr, property(get_during_swap, set_weight))
        return None

    set_weight._sl_functional = True
    return set_weight
