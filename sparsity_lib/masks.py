"""Masks on a model: which weights are prunable, attaching masks, reading them back, making them permanent.

A mask is a boolean tensor shaped like the weight (``True`` = keep). It lives on the model as a
:mod:`torch.nn.utils.parametrize` parametrization, so that the weight a layer *uses* is ``original * mask``:

* masked weights are exactly zero in every forward pass, and their gradient is zero, so they stay zero through
  optimizer steps (momentum, weight decay), ``state_dict`` round-trips and ``copy.deepcopy``;
* unlike ``torch.nn.utils.prune``'s forward pre-hooks, nothing is recomputed behind the user's back and the
  parametrization can be removed cleanly with :func:`remove_masks`, which restores plain parameters and the
  dense ``state_dict`` keys.

**What is prunable.** Every weight *matrix* of the standard layers, by its dense name: the ``weight`` of
``nn.Linear`` and ``nn.Conv1d/2d/3d`` (:data:`PRUNABLE_TYPES`) and the input projections of
``nn.MultiheadAttention`` (:data:`ATTENTION_TYPES`): ``in_proj_weight`` (query, key and value rows stacked,
``(3E, E)``), or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when key and value widths differ; the
attention's ``out_proj`` is an ``nn.Linear``. So ``sl.prunable`` of an ``nn.TransformerEncoder`` lists
``layers.0.self_attn.in_proj_weight``, ``layers.0.self_attn.out_proj.weight``, ``layers.0.linear1.weight``, ...,
and sparsity is counted over all of them. Internally a prunable weight is a (module, attribute name) pair
(:func:`prunable_entries`); the attribute is the last component of the name, and every function here reads and
parametrizes that attribute (``layer.parametrizations.in_proj_weight.original`` is the stored tensor of a masked
in-projection). PyTorch's attention forward (fast and slow path) reads the parametrized ``in_proj_weight``, so
the mask applies there as everywhere. Methods that hook layer inputs or differentiate twice run attention through
:func:`sparsity_lib.plumbing.attention_math` (plain tensor operations, ``out_proj`` called as a module).
Biases, norms and embeddings are not prunable.

**The mask protocol.** Any parametrization of a prunable weight that has a method
``hard_mask() -> bool tensor of the weight's shape`` is a mask: the library's :class:`Mask`, edge-popup's
learned :class:`sparsity_lib.lottery.TopKSupermask`, gates. :func:`get_masks` returns the AND of a layer's hard
masks; :func:`sparsity` and :func:`sparsity_report` count a weight as removed when a hard mask removes it or the
deterministically evaluated weight is zero (a stochastic gate in training mode is reported by its hard mask);
:func:`remove_masks` bakes masks into plain parameters and removes only mask parametrizations.

**Other people's transforms.** A parametrization of the user's registered *after* the mask (e.g.
``torch.nn.utils.parametrizations.spectral_norm``) composes: ``weight = f(original * mask)``, and
:func:`remove_masks` leaves it in place. Masks are refused, before anything changes, on a weight under someone
else's transform (a parametrization registered before the mask, ``parametrizations.weight_norm``, the hook-based
``weight_norm`` / ``spectral_norm``, ``torch.nn.utils.prune``) and on a weight tied to another module's (an
embedding shared with the output layer), which would silently train the pruned values through the other use.
``torch.func.functional_call`` accepts a masked weight under its dense name (the value stands in for the stored
weight; the mask applies), a masked forward pass compiles without graph breaks, and :func:`frozen` evaluates a
masked model at dense speed.

**Masks that change** during training (dense gradients for RigL, :func:`replace_masks` that revives weights,
:func:`reset_optimizer_state`) are defined in :mod:`sparsity_lib.mask_growth` and exported here.

Survey §2.1 (model sparsity) and §3 (what to prune). Defined for Chapter 01, used by every chapter.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .mask_property import install_weight_property

#: Layer types whose ``weight`` is prunable (fully connected and convolutional layers).
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Attention layers whose input-projection matrices are prunable: ``in_proj_weight`` (query, key and value
#: projections stacked, ``(3E, E)``), or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the key and
#: value widths differ (``_qkv_same_embed_dim`` False). Their ``out_proj`` is an ``nn.Linear`` (prunable as such).
ATTENTION_TYPES = (nn.MultiheadAttention,)


def weight_attributes(module: nn.Module) -> tuple:
    """The names of ``module``'s own prunable weight attributes: ``("weight",)`` for Linear/Conv,
    ``("in_proj_weight",)`` or ``("q_proj_weight", "k_proj_weight", "v_proj_weight")`` for
    ``nn.MultiheadAttention``, ``()`` otherwise."""
    if isinstance(module, PRUNABLE_TYPES):
        return ("weight",)
    if isinstance(module, ATTENTION_TYPES):
        if module._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return ()


def _attr(name: str) -> str:
    """The attribute of a prunable name: ``"fc1.weight"`` -> ``"weight"``, ``"attn.in_proj_weight"`` ->
    ``"in_proj_weight"``."""
    return name.rsplit(".", 1)[-1]


class Mask(nn.Module):
    """Parametrization ``W -> W * mask`` with a boolean ``mask`` buffer (saved in ``state_dict``).

    The multiplication uses a floating-point copy of the mask (multiplying a float tensor by a bool tensor
    converts the bool tensor on every call, which made a masked training step of LeNet-300-100 ~25% slower than
    a dense one). The copy is a non-persistent buffer, so ``state_dict`` holds only the boolean mask; it is
    refreshed whenever ``mask`` changes (in-place edits and ``load_state_dict`` included), detected through the
    tensor's version counter.

    ``hard_mask()`` returns ``mask``: the library's own mask is the simplest user of the mask protocol (see the
    module docstring). With dense-gradient tracking on (:func:`track_dense_gradients`), the forward pass also
    records :math:`\\partial L / \\partial (W \\odot M)` (see :func:`dense_gradients`); off, it costs one
    attribute test.
    """

    # class-level defaults: masks pickled whole before the dense-gradient mode existed still load and run
    track_dense_grad = False
    #: the weight property may call ``_masked`` directly (sparsity_lib.mask_property); subclasses opt in again
    _sl_plain_mask = True
    _dense_grad: Optional[torch.Tensor] = None
    _generation, _grad_generation = 0, -1

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().to(torch.bool))
        self.register_buffer("multiplier", self.mask.to(torch.get_default_dtype()), persistent=False)
        self._synced = self._mask_version()
        self.track_dense_grad = False
        self._dense_grad: Optional[torch.Tensor] = None  # dL/d(W*M) of the last forward -> backward cycle
        self._generation = 0       # forward passes that started a new record
        self._grad_generation = -1  # the generation _dense_grad belongs to

    def _mask_version(self):
        return (self.mask.data_ptr(), self.mask._version)

    def hard_mask(self) -> torch.Tensor:
        return self.mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Compiled: the bool -> float conversion fuses into the multiplication, and the Python-side cache
            # (data pointers, version counters) would break the graph. The compiled graph reads ``mask`` itself.
            out = weight * self.mask.to(weight.dtype)
            if self.track_dense_grad and out.requires_grad:
                self._watch(out)
            return out
        return self._masked(weight)

    def _masked(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight * mask`` outside compilation, with the cached float multiplier."""
        # read the buffers from their dict: a Module's ``self.mask`` goes through ``__getattr__`` (slow per call)
        buffers = self._buffers
        mask, multiplier = buffers["mask"], buffers["multiplier"]
        version = (mask.data_ptr(), mask._version)
        if self._synced != version or multiplier.dtype != weight.dtype:
            multiplier = buffers["multiplier"] = mask.to(device=weight.device, dtype=weight.dtype)
            self._synced = version
        out = weight * multiplier
        if self.track_dense_grad and out.requires_grad:
            self._watch(out)
        return out

    def _watch(self, out: torch.Tensor) -> None:
        # A forward pass starts a new record once the previous record has received its gradient; the uses of
        # the weight within one forward pass (a layer called twice) share the record and their gradients add up.
        if self._grad_generation == self._generation:
            self._generation += 1
        generation = self._generation

        def store(grad: torch.Tensor) -> None:
            if self._grad_generation != generation or self._dense_grad is None:
                self._dense_grad = grad.detach().clone()
                self._grad_generation = generation
            else:
                self._dense_grad = self._dense_grad + grad.detach()

        out.register_hook(store)

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"shape={tuple(self.mask.shape)}, kept={kept}/{self.mask.numel()}"


def prunable_entries(model: nn.Module) -> Dict[str, tuple]:
    """``{"fc1.weight": (module, "weight"), "attn.in_proj_weight": (attn, "in_proj_weight"), ...}``: every
    prunable weight as a (module, attribute name) pair, by its dense name, in module order."""
    out = {}
    for module_name, module in model.named_modules():
        for attr in weight_attributes(module):
            out[f"{module_name}.{attr}" if module_name else attr] = (module, attr)
    return out


def _prunable_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{"fc1.weight": module} for every prunable weight, in module order (the attribute is ``_attr(name)``)."""
    return {name: module for name, (module, _) in prunable_entries(model).items()}


def _weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The effective weight of a prunable entry (``name`` a dense name or an attribute name)."""
    return getattr(module, _attr(name))


def is_mask(parametrization) -> bool:
    """Whether a parametrization counts as a mask: it has a method ``hard_mask()`` (the mask protocol)."""
    return callable(getattr(parametrization, "hard_mask", None))


def _chain(module: nn.Module, attr: str = "weight") -> list:
    """The parametrizations of ``module.<attr>``, in order of application (empty when there are none)."""
    attr = _attr(attr)
    if parametrize.is_parametrized(module, attr):
        return list(module.parametrizations[attr])
    return []


def _mask_module(module: nn.Module, attr: str = "weight") -> Mask | None:
    """The library's own :class:`Mask` of a layer's ``attr``, if any."""
    for p in _chain(module, attr):
        if isinstance(p, Mask):
            return p
    return None


def _original(module: nn.Module, attr: str = "weight") -> torch.nn.Parameter:
    """The underlying trainable tensor of ``module.<attr>`` (``original`` when masked, the parameter otherwise);
    ``attr`` may be a dense name (``"attn.in_proj_weight"``)."""
    attr = _attr(attr)
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        if not hasattr(plist, "original"):
            raise ValueError(f"the weight of this {type(module).__name__} is parametrized by "
                             f"{[type(p).__name__ for p in plist]} over several tensors "
                             f"({[k for k in plist._parameters]}): sparsity_lib cannot mask or read it")
        return plist.original
    return getattr(module, attr)


def _hard_mask(module: nn.Module, name: str = "weight") -> Optional[torch.Tensor]:
    """AND of the ``hard_mask()`` of every mask on the layer's weight (a new tensor); ``None`` if it has none."""
    out, shape = None, None
    for p in _chain(module, name):
        if not is_mask(p):
            continue
        hard = p.hard_mask()
        if shape is None:
            with torch.no_grad():
                shape = tuple(_weight(module, name).shape)
        if not isinstance(hard, torch.Tensor) or hard.dtype != torch.bool or tuple(hard.shape) != shape:
            raise TypeError(f"{type(p).__name__}.hard_mask() on {name} must return a bool tensor of the weight's "
                            f"shape {shape}, got "
                            f"{getattr(hard, 'dtype', type(hard).__name__)} {tuple(getattr(hard, 'shape', ()))}")
        hard = hard.detach()
        out = hard.clone() if out is None else out & hard.to(out.device)
    return out


def _eval_weight(module: nn.Module, attr: str = "weight") -> torch.Tensor:
    """The layer's weight evaluated deterministically: its parametrizations in eval mode, no gradient."""
    attr = _attr(attr)
    if not parametrize.is_parametrized(module, attr):
        return getattr(module, attr).detach()
    plist = module.parametrizations[attr]
    modes = [(m, m.training) for m in plist.modules()]
    plist.eval()
    try:
        with torch.no_grad():
            return getattr(module, attr).detach().clone()
    finally:
        for m, mode in modes:
            m.training = mode


def _masked_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The weight as a deterministic evaluation sees it: eval-mode weight times the hard mask."""
    weight = _eval_weight(module, name)
    hard = _hard_mask(module, name)
    return weight if hard is None else weight * hard.to(device=weight.device, dtype=weight.dtype)


def _foreign(module: nn.Module, attr: str = "weight") -> Optional[str]:
    """Why masks cannot be attached to this layer's weight (someone else's transform sits under it), or None."""
    from torch.nn.utils import prune as torch_prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm, torch_prune.BasePruningMethod)):
            return (f"it carries a {type(hook).__name__} forward pre-hook (torch.nn.utils.weight_norm, "
                    "spectral_norm or prune) that recomputes the weight in every forward pass; remove it first "
                    "(torch.nn.utils.remove_weight_norm / remove_spectral_norm / prune.remove) or use "
                    "torch.nn.utils.parametrizations.spectral_norm registered after the mask")
    attr = _attr(attr)
    chain = _chain(module, attr)
    if not chain:
        return None
    plist = module.parametrizations[attr]
    if not hasattr(plist, "original"):
        return (f"its weight is parametrized by {[type(p).__name__ for p in chain]} over several tensors (e.g. "
                "parametrizations.weight_norm): a mask cannot be placed under it; remove it first "
                f"(torch.nn.utils.parametrize.remove_parametrizations(layer, {attr!r}))")
    own = next((i for i, p in enumerate(chain) if isinstance(p, Mask)), len(chain))
    before = [type(p).__name__ for p in chain[:own] if not is_mask(p)]
    if before:
        return (f"its weight is parametrized by {before}, which would sit under the mask (the mask must come "
                "first for masked weights to stay zero); apply the masks before registering your parametrization, "
                "or remove it first")
    return None


def prunable(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The prunable weights of ``model``: ``{"fc1.weight": tensor, ...}`` by their dense names, in module order.

    Prunable are the ``weight`` tensors of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers and the input
    projections of ``nn.MultiheadAttention`` (``in_proj_weight``, shape ``(3E, E)``: query, key and value rows
    stacked; or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when key and value widths differ); its
    ``out_proj`` is a Linear layer. So every weight matrix of an ``nn.TransformerEncoder`` is prunable. Biases,
    norms and embeddings are not. Each tensor is the *effective* weight (``original * mask`` when masked), so
    pruned entries read as exact zeros.
    """
    return {name: getattr(module, attr) for name, (module, attr) in prunable_entries(model).items()}


def _check_has_prunable(model: nn.Module) -> Dict[str, nn.Module]:
    modules = _prunable_modules(model)
    if not modules:
        raise ValueError(
            "model has no prunable weights: sparsity_lib prunes the 'weight' of "
            + ", ".join(t.__name__ for t in PRUNABLE_TYPES)
            + " layers and the input projections of nn.MultiheadAttention"
        )
    return modules


def _shared_weights(model: nn.Module, modules: Mapping[str, nn.Module]) -> Dict[str, List[str]]:
    """{prunable name: [other names of the same Parameter]} for prunable weights shared (tied) with another place."""
    holders: Dict[int, List[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(pname)
    out = {}
    for name, module in modules.items():
        try:
            param = _original(module, name)
        except ValueError:
            continue
        names = holders.get(id(param), [])
        if len(names) > 1:
            attr = _attr(name)
            own = {name, name[:-len(attr)] + f"parametrizations.{attr}.original"}
            out[name] = [n for n in names if n not in own]
    return {k: v for k, v in out.items() if v}


def _prepare_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]):
    """Validate ``masks`` against ``model`` and move each to its weight's device; nothing on the model changes."""
    modules = _check_has_prunable(model)
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict {{name: bool tensor}}, got {type(masks).__name__}")
    shared = _shared_weights(model, {n: modules[n] for n in masks if n in modules})
    ready = {}
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"masks: unknown layer name {name!r}; prunable weights are {list(modules)}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"masks[{name!r}] must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must have dtype torch.bool, got {mask.dtype}")
        why = _foreign(modules[name], name)
        if why:
            raise ValueError(f"masks[{name!r}]: cannot mask this layer: {why}")
        if name in shared and (_mask_module(modules[name], name) is not None or not bool(mask.all())):
            raise ValueError(f"masks[{name!r}]: this weight is shared (tied) with {shared[name]}: a mask on one "
                             "of them would leave the other using (and training) the pruned values, so the model "
                             "would be less sparse than reported. Untie the weights (e.g. give each its own "
                             "nn.Parameter) or leave this layer out of masks / sl.prune's scope")
        shape = tuple(_original(modules[name], name).shape)
        if tuple(mask.shape) != shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, the weight has shape {shape}")
        device = _original(modules[name], name).device
        try:
            ready[name] = mask.to(device=device)
        except Exception as error:  # noqa: BLE001 - e.g. a meta or unavailable device: a clear message
            raise ValueError(f"masks[{name!r}] is on {mask.device} and cannot be moved to the weight's device "
                             f"{device}: {error}") from error
    return modules, ready


def check_maskable(model: nn.Module, names=None) -> None:
    """Raise ``ValueError`` naming the first prunable layer (of ``names``, default all) that cannot carry a mask:
    a weight under someone else's transform (see :func:`apply_masks`) or tied to another module's weight.
    Changes nothing; for methods to call before any expensive scoring."""
    modules = _check_has_prunable(model)
    names = list(modules) if names is None else list(names)
    shared = _shared_weights(model, {n: modules[n] for n in names if n in modules})
    for name in names:
        if name not in modules:
            raise ValueError(f"unknown layer name {name!r}; prunable weights are {list(modules)}")
        why = _foreign(modules[name], name)
        if why:
            raise ValueError(f"{name}: cannot mask this layer: {why}")
        if name in shared:
            raise ValueError(f"{name}: this weight is shared (tied) with {shared[name]}; untie it or leave it out")


def validate_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Dict[str, nn.Module]:
    """Check ``masks`` against ``model`` (names, shapes, dtypes, devices, layers that can carry a mask: no
    foreign weight transform under it, no tied weight) without changing anything; return the modules."""
    return _prepare_masks(model, masks)[0]


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Attach (or replace) masks on ``model`` in place and return it.

    ``masks`` maps dense weight names (``"fc1.weight"``) to boolean tensors of the weight's shape, ``True`` = keep.
    Layers not named keep whatever mask they have. On the module, ``weight`` becomes a parametrized property;
    the trainable tensor moves to ``<layer>.parametrizations.weight.original`` and the mask to the buffer
    ``<layer>.parametrizations.weight.0.mask`` (these are the ``state_dict`` keys until :func:`remove_masks`).
    The stored values of masked weights are also set to zero, so that nothing of them survives in ``original``.

    All masks are validated before anything changes (all or nothing): a wrong name, shape, dtype or a device the
    mask cannot move to raises and leaves the model as it was. So does a layer that cannot carry a mask
    correctly: a weight tied to another module's, one recomputed by ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` / ``prune`` hooks, or one under a parametrization that is not a mask (register your own
    parametrizations, e.g. ``torch.nn.utils.parametrizations.spectral_norm``, *after* the mask: they then compose).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> apply_masks(model, {"weight": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)})
        >>> float((model.weight == 0).float().mean())
        0.5
    """
    modules, ready = _prepare_masks(model, masks)
    shared = _shared_weights(model, {n: modules[n] for n in ready})
    for name, mask in ready.items():
        module, attr = modules[name], _attr(name)
        if name in shared:  # an all-True mask on a tied weight (refused otherwise): nothing to attach
            continue
        existing = _mask_module(module, attr)
        if existing is not None:
            existing.mask.copy_(mask)
        else:
            # remember the parameters' order, so that remove_masks gives back the same state_dict key order
            if attr in module._parameters:
                module.__dict__.setdefault("_sl_parameter_order", list(module._parameters))
            parametrize.register_parametrization(module, attr, Mask(mask), unsafe=True)
            install_weight_property(module, attr)
        with torch.no_grad():
            _original(module, attr).mul_(mask)
    return model


def get_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: bool tensor}`` for every prunable weight (an all-``True`` mask for a layer that has none).

    A layer's mask is the AND of the ``hard_mask()`` of every mask parametrization on its weight (the mask
    protocol: the library's :class:`Mask`, a learned supermask, gates...). The tensors are copies: changing them
    does not change the model (use :func:`apply_masks`).
    """
    out = {}
    for name, module in _check_has_prunable(model).items():
        hard = _hard_mask(module, name)
        out[name] = hard if hard is not None else torch.ones_like(_weight(module, name), dtype=torch.bool)
    return out


def is_masked(model: nn.Module) -> bool:
    """Whether any prunable layer of ``model`` carries a mask (any parametrization with ``hard_mask()``)."""
    return any(is_mask(p) for n, m in _prunable_modules(model).items() for p in _chain(m, n))


def _removal_plan(name: str, module: nn.Module):
    """How to take the masks off one layer: ``None`` (no mask), ``"all"`` (every parametrization of the weight is
    a mask) or ``k`` (the first ``k`` are masks, the rest a user's); raises if a mask follows a user's transform."""
    chain = _chain(module, name)
    flags = [is_mask(p) for p in chain]
    if not any(flags):
        return None
    if all(flags):
        return "all"
    k = flags.index(False)
    if any(flags[k:]):
        raise ValueError(f"remove_masks: {name} has a mask after a parametrization that is not a mask "
                         f"({[type(p).__name__ for p in chain]}): it cannot be baked into the stored weight "
                         "without removing the other one too; remove that parametrization first "
                         "(torch.nn.utils.parametrize.remove_parametrizations), then call remove_masks")
    if not hasattr(module.parametrizations[_attr(name)], "original"):  # pragma: no cover - masks take one tensor
        raise ValueError(f"remove_masks: {name}'s parametrizations take several tensors; cannot bake the mask")
    return k


def remove_masks(model: nn.Module) -> nn.Module:
    """Make the pruning permanent: every masked layer gets a plain ``weight`` parameter with zeros where pruned.

    ``state_dict`` keys return to the dense ones (``fc1.weight``). Sparsity is kept (the zeros are stored), but
    nothing holds pruned weights at zero any more: further training may make them nonzero.

    Every parametrization with ``hard_mask()`` counts as a mask. When all parametrizations of a weight are masks,
    the weight becomes the plain parameter :math:`W_{\\text{eval}} \\odot M`: the parametrized weight evaluated
    deterministically (the parametrizations in eval mode, no gradient) times the AND of the hard masks. A user's
    own parametrization registered *after* the masks (e.g. ``spectral_norm``) stays: the masks before it are baked
    into its input and only they are removed. Masks after a user's parametrization cannot be undone cleanly:
    ``ValueError`` before anything changes.
    """
    plans = {name: _removal_plan(name, module) for name, module in _prunable_modules(model).items()}
    modules = _prunable_modules(model)
    for name, plan in plans.items():
        module = modules[name]
        if plan == "all":
            baked = _masked_weight(module, name)
            attr = _attr(name)
            _remove_weight_parametrization(module, baked, attr)
            # restore the parameters' order (Linear and Conv: weight before bias) so state_dict keys read as before
            order = module.__dict__.get("_sl_parameter_order") or [attr]
            order = order if attr in order else [attr]
            params = module._parameters
            module._parameters = {**{k: params[k] for k in order if k in params}, **params}
            if not parametrize.is_parametrized(module):
                module.__dict__.pop("_sl_parameter_order", None)
        elif plan is not None:
            _bake_mask_prefix(module, plan, name)
    return model


def _bake_mask_prefix(module: nn.Module, k: int, name: str) -> None:
    """Apply the first ``k`` parametrizations (all masks, in eval mode) to ``original`` and drop them."""
    plist = module.parametrizations[_attr(name)]
    original = plist.original
    modes = [(m, m.training) for m in plist.modules()]
    plist.eval()
    try:
        with torch.no_grad():
            x = original.detach()
            hard = None
            for p in list(plist)[:k]:
                x = p(x)
                h = p.hard_mask().detach()
                hard = h if hard is None else hard & h
            original.copy_(x * hard.to(x))
    finally:
        for m, mode in modes:
            m.training = mode
    for _ in range(k):
        del plist[0]


def _remove_weight_parametrization(module: nn.Module, baked: torch.Tensor, attr: str = "weight") -> None:
    """Turn a masked ``weight`` back into a plain parameter holding ``baked`` (the masked weight).

    ``torch.nn.utils.parametrize.remove_parametrizations`` deletes the ``weight`` property from the module's
    class, but ``copy.deepcopy`` of a parametrized module *shares* that dynamically created class with the
    original: unmasking a copy would break the original model. When only ``weight`` is parametrized (always so
    for masks made by this library), we instead restore the module's own class on this instance alone, which
    leaves every other instance untouched. The ``Parameter`` object is kept (as torch does), so optimizers that
    hold it keep working.
    """
    plist = module.parametrizations
    if not hasattr(plist[attr], "original"):   # pragma: no cover - masks take one tensor
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        with torch.no_grad():
            getattr(module, attr).copy_(baked)
        return
    original = plist[attr].original
    with torch.no_grad():
        original.copy_(baked)
    cls = module.__class__
    if list(plist.keys()) == [attr]:
        del module._modules["parametrizations"]
        module.__class__ = cls.__bases__[0]  # the class before parametrization, e.g. nn.Linear
    else:
        # other weights of this module stay parametrized (e.g. q/k/v_proj_weight of one attention layer): a new
        # class for this instance alone, without the property of ``attr``
        del plist[attr]
        body = {k: v for k, v in cls.__dict__.items() if k not in (attr, "__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)
    module.register_parameter(attr, original)


def set_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the stored (``original``) values of the named prunable weights, keeping masks.

    Masked positions end up zero whatever ``weights`` holds there. Used by methods that update surviving
    weights (OBS, OBC, SparseGPT) and by lottery-ticket rewinding.
    """
    modules = _check_has_prunable(model)
    for name, value in weights.items():
        if name not in modules:
            raise ValueError(f"weights: unknown layer name {name!r}; prunable weights are {list(modules)}")
        original = _original(modules[name], name)
        if tuple(value.shape) != tuple(original.shape):
            raise ValueError(f"weights[{name!r}] has shape {tuple(value.shape)}, expected {tuple(original.shape)}")
    with torch.no_grad():
        for name, value in weights.items():
            module = modules[name]
            original = _original(module, name)
            original.copy_(value.to(original))
            existing = _mask_module(module, name)
            if existing is not None:
                original.mul_(existing.mask)


def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights that are exactly zero (0.0 for a dense model, 0.9 after 90% pruning).

    A weight counts as zero when its hard mask removes it or when the deterministically evaluated weight is zero
    (learned masks in training mode may be stochastic: their ``hard_mask()`` is what is reported).
    """
    total, zeros = 0, 0
    for name, module in _prunable_modules(model).items():
        weight = _masked_weight(module, name)
        total += weight.numel()
        zeros += int((weight == 0).sum())
    if total == 0:
        raise ValueError("model has no prunable weights")
    return zeros / total


def sparsity_report(model: nn.Module):
    """Per-layer table of the prunable weights: name, shape, parameters, nonzeros, sparsity (plus a total row).

    Counts as :func:`sparsity` does (hard masks honoured). Returns a ``pandas.DataFrame`` when pandas is
    installed (it renders as a table in a notebook), else a list of dicts.
    """
    rows = []
    for name, module in _prunable_modules(model).items():
        weight = _masked_weight(module, name)
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


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Masked inference at dense speed: ``with sl.masks.frozen(model): model(x) ...``.

    Inside the block gradients are off and every parametrized weight (mask applied) is computed once, at its
    first use, and reused by the following forward passes (``torch.nn.utils.parametrize.cached``), so a masked
    model evaluates like a dense one instead of multiplying each weight by its mask in every forward pass.
    Changes to the masks or weights made inside the block are not seen until it ends. The model's training mode
    is not changed (call ``model.eval()`` yourself). Measured on LeNet-300-100 at batch 64 (one thread): a
    masked forward pass costs ~1.2x a dense one, ~1.01x inside this block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with torch.no_grad(), parametrize.cached():
        yield model


def count_params(model: nn.Module) -> int:
    """Number of prunable weights."""
    return sum(w.numel() for w in prunable(model).values())


# Masks that change during training (dense gradients, replacing masks, optimizer state) live in mask_growth.py
# and are part of this module's API (imported last: they build on everything above).
from .mask_growth import (OPTIMIZER_MOMENTS, dense_gradients, replace_masks, reset_optimizer_state,  # noqa: E402
                          track_dense_gradients, trainable)

__all__ = [
    "Mask", "PRUNABLE_TYPES", "ATTENTION_TYPES", "weight_attributes", "prunable_entries", "prunable", "apply_masks", "get_masks", "remove_masks", "set_weights", "sparsity",
    "sparsity_report", "validate_masks", "check_maskable", "is_masked", "is_mask", "count_params", "trainable",
    "track_dense_gradients", "dense_gradients", "replace_masks", "reset_optimizer_state", "OPTIMIZER_MOMENTS",
    "frozen",
]
