"""Ephemeral sparsity: zeros recomputed for every example or every step, not stored in the model.

Model sparsity (Chapters 01-10) is a property of the weights; *ephemeral* sparsity (survey §2.4.4 and §5) lives
in what flows through the network while it runs or trains:

* **activations** (survey §5.1): a ReLU outputs exact zeros; :func:`activation_sparsity` measures them per
  layer and :func:`activation_l1` / :func:`activation_hoyer` are penalties that raise them (Glorot et al.
  {cite}`glorot2011deep`, Kurtz et al. {cite}`kurtz2020inducing`);
* **the dropout family** (survey §5.2): :class:`DropConnect` drops weights at random (Wan et al.
  {cite}`wan2013regularization`), :class:`TargetedDropout` only among the small ones (Gomez et al.
  {cite}`gomez2019learning`); standard dropout (Srivastava et al. {cite}`srivastava2014dropout`) is
  ``torch.nn.Dropout``;
* **gradients** (survey §5.3): :class:`TopK` and :class:`RandomK` compressors with error feedback (Strom
  {cite}`strom2015scalable`, Aji & Heafield {cite}`aji2017sparse`, Lin et al. {cite}`lin2018deep`, Stich et al.
  {cite}`stich2018sparsified`, Karimireddy et al. {cite}`karimireddy2019error`) and the training callback
  :class:`GradientCompression`; :func:`meprop` sparsifies the back-propagated errors (survey §5.4, Sun et al.
  {cite}`sun2017meprop`).

Conditional computation (survey §5.5, mixtures of experts) is in :mod:`sparsity_lib.moe`. The experiments of
Chapter 11, which return records for the chapter's figures and widgets, are in :mod:`sparsity_lib.ephemeral_runs`.
Defined in Chapter 11.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from . import formats
from .masks import PRUNABLE_TYPES


# ----------------------------------------------------------------------------------------------- validation
def _check_fraction(value, name: str, *, low_open: bool, high_open: bool, low: float = 0.0, high: float = 1.0):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
    if not bad:
        bad = (value <= low if low_open else value < low) or (value >= high if high_open else value > high)
    if bad:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_ratio(ratio) -> float:
    """A kept fraction of a compressor or of meProp: a number in (0, 1]."""
    return _check_fraction(ratio, "ratio", low_open=True, high_open=False)


def check_drop_probability(p, name: str = "p") -> float:
    """A dropout probability: a number in [0, 1) (p = 1 would drop everything and divide by zero)."""
    return _check_fraction(p, name, low_open=False, high_open=True)


def check_strength(strength, name: str = "strength") -> float:
    """A penalty coefficient: a finite number >= 0."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {strength!r}")
    return float(strength)


def kept_count(numel: int, ratio: float) -> int:
    """Entries a compressor keeps of a tensor of ``numel`` entries: :math:`k = \\max(1, \\lceil r n \\rceil)`."""
    return max(1, min(numel, math.ceil(ratio * numel - 1e-9)))


def top_mask(scores: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """Boolean mask with exactly ``k`` True entries in every row of the 2-D ``scores``: the ``k`` largest (or
    smallest) of the row, ties broken towards the lower index (what a stable sort would choose), computed with
    ``torch.topk`` and a threshold, about 20x faster than a full sort on a 10^4-entry row."""
    rows, n = scores.shape
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    s = scores if largest else -scores
    threshold = torch.topk(s, k, dim=1).values[:, -1:]
    above = s > threshold
    need = k - above.sum(1, keepdim=True)
    equal = s == threshold
    if bool((equal.sum(1, keepdim=True) == need).all()):  # no tie at the threshold (the usual case)
        return above | equal
    return above | (equal & (equal.cumsum(1) <= need))


# ============================================================================================== activations
def _batches(data, batch_size: int = 2048):
    from .data import Task

    if isinstance(data, Task):
        x = data.x_test
        return [(b,) for b in x.split(batch_size)]
    if isinstance(data, torch.Tensor):
        return [(b,) for b in data.split(batch_size)]
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [(b,) for b in data[0].split(batch_size)]
    return [(b[0],) if isinstance(b, (tuple, list)) else (b,) for b in data]


def _activation_layers(model: nn.Module) -> Dict[str, nn.Module]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    if not layers:
        raise ValueError("model has no Linear or Conv layers whose inputs could be measured")
    return layers


def activation_sparsity(model: nn.Module, data, *, include_input: bool = False,
                        per_layer: bool = True):
    """Fraction of exactly-zero activations entering each Linear/Conv layer, over ``data``.

    For layer :math:`\\ell` with input activations :math:`a^{(\\ell)}` (the output of the previous layer's
    nonlinearity; :math:`N` examples of :math:`n_\\ell` entries each),

    .. math:: s_\\ell = \\frac{1}{N n_\\ell} \\sum_{i, j} [a^{(\\ell)}_{ij} = 0],

    the ephemeral sparsity that a kernel skipping zero inputs can exploit (survey §2.3 and §5.1; Glorot et al.
    {cite}`glorot2011deep`). Measured with forward pre-hooks on every Linear/Conv layer (so it works whether the
    nonlinearity is a module or a function), removed afterwards, in eval mode (the mode is restored) under
    ``torch.no_grad()``. The first layer to run sees the data, not an activation, and is left out unless
    ``include_input``.

    ``data``: a :class:`~sparsity_lib.data.Task` (its test split), a tensor of inputs, a pair ``(x, y)``, or
    an iterable of ``(inputs, targets)`` batches. Returns ``{layer name: s_l}`` in execution order (the name is
    the layer *receiving* the activations, e.g. ``"fc2"`` for the first hidden layer of an MLP), or with
    ``per_layer=False`` one float: the zero fraction over all measured activations.
    """
    layers = _activation_layers(model)
    zeros: Dict[str, int] = {}
    counts: Dict[str, int] = {}
    order: List[str] = []

    def make_hook(name):
        def hook(module, args):
            a = args[0]
            if name not in counts:
                zeros[name], counts[name] = 0, 0
                order.append(name)
            zeros[name] += int((a == 0).sum())
            counts[name] += a.numel()
        return hook

    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for (inputs,) in _batches(data):
                model(inputs.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise ValueError("data holds no examples")
    names = order if include_input else order[1:]
    if not names:
        raise ValueError("the model has a single Linear/Conv layer: its input is the data, there is no "
                         "activation to measure (pass include_input=True to measure the data)")
    if per_layer:
        return {name: zeros[name] / counts[name] for name in names}
    return sum(zeros[n] for n in names) / sum(counts[n] for n in names)


class ActivationPenalty:
    """A penalty on the activations of the last forward pass, for ``sl.train.fit(..., penalty=...)``.

    Forward pre-hooks on the model's Linear/Conv layers keep the inputs of the last forward (with their graph);
    calling the object returns ``strength * sum_l R(a^(l))`` over the layers after the first (the inputs of the
    first are the data). Build it with :func:`activation_l1` or :func:`activation_hoyer`; :meth:`remove` (or a
    ``with`` block) detaches the hooks. The penalty is computed from the most recent forward pass, which inside
    :func:`sparsity_lib.train.fit` is the training batch of the current step.
    """

    def __init__(self, model: nn.Module, strength: float, regularizer: Callable[[torch.Tensor], torch.Tensor],
                 kind: str):
        self.strength = check_strength(strength)
        self.model, self.kind, self.regularizer = model, kind, regularizer
        self._captured: Dict[str, torch.Tensor] = {}
        self._first: Optional[str] = None
        self._handles = []
        for name, m in _activation_layers(model).items():
            self._handles.append(m.register_forward_pre_hook(self._make_hook(name)))

    def _make_hook(self, name):
        def hook(module, args):
            if self._first is None:
                self._first = name
            if name != self._first and torch.is_grad_enabled():
                self._captured[name] = args[0]
        return hook

    def __call__(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        if model is not None and model is not self.model:
            raise ValueError("this penalty was built for another model")
        if not self._captured:
            raise RuntimeError("no activations captured yet: run a forward pass with gradients enabled first")
        total = sum(self.regularizer(a.flatten(1)) for a in self._captured.values())
        self._captured = {}
        return self.strength * total

    def remove(self) -> None:
        """Detach the hooks from the model (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles, self._captured = [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        return f"ActivationPenalty(kind={self.kind!r}, strength={self.strength:g})"


def l1_regularizer(a: torch.Tensor) -> torch.Tensor:
    """Mean absolute activation of a ``(N, n)`` batch: :math:`\\frac{1}{N n}\\sum_{ij} |a_{ij}|`."""
    return a.abs().mean()


def hoyer_regularizer(a: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Hoyer-square of each example's activations, averaged over the batch:
    :math:`\\frac1N \\sum_i \\frac{(\\sum_j |a_{ij}|)^2}{\\sum_j a_{ij}^2}` (between 1 for one nonzero and
    :math:`n` for all equal; scale-invariant, Kurtz et al. {cite}`kurtz2020inducing`). An all-zero row counts 0."""
    num = a.abs().sum(1) ** 2
    den = (a ** 2).sum(1)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num)).mean()


def activation_l1(model: nn.Module, strength: float) -> ActivationPenalty:
    """L1 penalty on activations, :math:`\\lambda \\sum_\\ell \\operatorname{mean}|a^{(\\ell)}|` (Glorot et al.
    {cite}`glorot2011deep`; survey §5.1, Georgiadis 2019). ``strength`` :math:`\\lambda \\ge 0`."""
    return ActivationPenalty(model, strength, l1_regularizer, "l1")


def activation_hoyer(model: nn.Module, strength: float) -> ActivationPenalty:
    """Hoyer-square penalty on activations, :math:`\\lambda \\sum_\\ell H(a^{(\\ell)})` with
    :func:`hoyer_regularizer` (Kurtz et al. {cite}`kurtz2020inducing`; survey §5.1). ``strength`` >= 0."""
    return ActivationPenalty(model, strength, hoyer_regularizer, "hoyer")


# ============================================================================================ dropout family
def drop_connect_weight(weight: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DropConnect of one weight tensor (Wan et al. {cite}`wan2013regularization`; survey §5.2):
    :math:`\\tilde W = W \\odot M / (1 - p)`, :math:`M_{ij} \\sim \\text{Bernoulli}(1 - p)` i.i.d., so that
    :math:`\\mathbb E[\\tilde W] = W` (inverted scaling, as ``torch.nn.Dropout`` does for activations)."""
    p = check_drop_probability(p)
    if p == 0.0:
        return weight
    keep = torch.rand(weight.shape, generator=generator, device=weight.device) >= p
    return weight * keep.to(weight.dtype) / (1.0 - p)


def targeted_dropout(weight: torch.Tensor, alpha: float, gamma: float, *, structure: str = "weight",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Targeted dropout of one weight matrix (Gomez et al. {cite}`gomez2019learning`; survey §5.2).

    ``structure="weight"``: in every output row :math:`i` the :math:`\\lceil \\gamma n_{in} \\rceil` weights of
    smallest :math:`|W_{ij}|` are the *targets*; ``"unit"``: the :math:`\\lceil \\gamma n_{out} \\rceil` output
    units (rows) of smallest L2 norm are. Each target is dropped with probability :math:`\\alpha`, and kept
    targets are scaled by :math:`1/(1 - \\alpha)`, so :math:`\\mathbb E[\\tilde W] = W`; non-targets pass
    unchanged. Training this way teaches the network not to rely on the weights that magnitude pruning at
    sparsity :math:`\\gamma` will remove. Ties are broken by position (lower index = smaller).
    """
    alpha = check_drop_probability(alpha, "alpha")
    gamma = _check_fraction(gamma, "gamma", low_open=False, high_open=False)
    if structure not in ("weight", "unit"):
        raise ValueError(f"structure must be 'weight' or 'unit', got {structure!r}")
    if alpha == 0.0 or gamma == 0.0:
        return weight
    w2 = weight.detach().reshape(weight.shape[0], -1)
    if structure == "weight":
        count = math.ceil(gamma * w2.shape[1] - 1e-9)
        target = top_mask(w2.abs(), count, largest=False)
        drop = target & (torch.rand(w2.shape, generator=generator, device=w2.device) < alpha)
    else:  # a targeted unit (output row) is dropped as a whole
        count = math.ceil(gamma * w2.shape[0] - 1e-9)
        target = top_mask(w2.norm(dim=1)[None], count, largest=False)[0][:, None].expand_as(w2)
        drop = target & (torch.rand(w2.shape[0], generator=generator, device=w2.device) < alpha)[:, None]
    factor = torch.where(target, torch.full_like(w2, 1.0 / (1.0 - alpha)), torch.ones_like(w2))
    factor = factor.masked_fill(drop, 0.0)
    return weight * factor.reshape(weight.shape)


class DropConnect(nn.Linear):
    """A Linear layer whose weights are dropped at random in training mode (Wan et al.
    {cite}`wan2013regularization`; survey §5.2): :math:`y = x (W \\odot M)^\\top / (1 - p) + b`, a new
    :math:`M` per forward pass (one for the batch, a common cheap variant of the paper's mask per example).
    In eval mode it is exactly ``nn.Linear``. It *is* an ``nn.Linear`` (same parameters, same ``state_dict``
    keys), so ``sl.prunable`` and ``sl.prune`` see it as one (remove the weight dropout before pruning, see
    :func:`remove_weight_dropout`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5):
        super().__init__(in_features, out_features, bias=bias)
        self.p = check_drop_probability(p)

    def dropped_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return drop_connect_weight(weight, self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.training:
            weight = self.dropped_weight(weight)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p:g}"


class TargetedDropout(DropConnect):
    """A Linear layer with targeted dropout (:func:`targeted_dropout`) in training mode; ``nn.Linear`` in eval
    mode (Gomez et al. {cite}`gomez2019learning`). ``alpha``: drop probability of a target; ``gamma``: targeted
    fraction; ``structure``: ``"weight"`` or ``"unit"``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, alpha: float = 0.5,
                 gamma: float = 0.5, structure: str = "weight"):
        super().__init__(in_features, out_features, bias=bias, p=check_drop_probability(alpha, "alpha"))
        self.alpha = self.p
        self.gamma = _check_fraction(gamma, "gamma", low_open=False, high_open=False)
        if structure not in ("weight", "unit"):
            raise ValueError(f"structure must be 'weight' or 'unit', got {structure!r}")
        self.structure = structure

    def dropped_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return targeted_dropout(weight, self.alpha, self.gamma, structure=self.structure)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + f", alpha={self.alpha:g}, gamma={self.gamma:g}, structure={self.structure!r}"


def _swap_linear_class(model: nn.Module, layers, cls, attrs: Mapping) -> nn.Module:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = list(linears) if layers is None else list(layers)
    if not names:
        raise ValueError("model has no nn.Linear layers")
    for name in names:
        if name not in linears:
            raise ValueError(f"unknown Linear layer {name!r}; the Linear layers are {list(linears)}")
        module = linears[name]
        if hasattr(module, "parametrizations"):
            raise ValueError(f"layer {name!r} is parametrized (masked): add weight dropout before pruning, "
                             f"or remove the masks first")
        if type(module) not in (nn.Linear, DropConnect, TargetedDropout):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not a plain nn.Linear")
    for name in names:  # validated: now change the model
        module = linears[name]
        module.__class__ = cls
        for key, value in attrs.items():
            setattr(module, key, value)
    return model


def add_drop_connect(model: nn.Module, p: float, layers: Optional[Sequence[str]] = None) -> nn.Module:
    """Turn the model's ``nn.Linear`` layers (or the named ``layers``) into :class:`DropConnect` in place, with
    the same parameters and ``state_dict`` keys; returns the model. :func:`remove_weight_dropout` undoes it."""
    p = check_drop_probability(p)
    return _swap_linear_class(model, layers, DropConnect, {"p": p})


def add_targeted_dropout(model: nn.Module, alpha: float, gamma: float, structure: str = "weight",
                         layers: Optional[Sequence[str]] = None) -> nn.Module:
    """Turn the model's ``nn.Linear`` layers (or the named ``layers``) into :class:`TargetedDropout` in place;
    returns the model. :func:`remove_weight_dropout` undoes it."""
    alpha = check_drop_probability(alpha, "alpha")
    gamma = _check_fraction(gamma, "gamma", low_open=False, high_open=False)
    if structure not in ("weight", "unit"):
        raise ValueError(f"structure must be 'weight' or 'unit', got {structure!r}")
    return _swap_linear_class(model, layers, TargetedDropout,
                              {"p": alpha, "alpha": alpha, "gamma": gamma, "structure": structure})


def remove_weight_dropout(model: nn.Module) -> nn.Module:
    """Turn every :class:`DropConnect` / :class:`TargetedDropout` layer back into a plain ``nn.Linear``.

    A layer that was masked (``sl.prune``) after weight dropout was added cannot be converted in place (its class
    is a parametrized subclass); then nothing is changed and a ``ValueError`` names the layer: remove the
    weight dropout before pruning, or the masks first (``sl.remove_masks``).
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DropConnect)]
    for name, module in layers:
        if hasattr(module, "parametrizations"):
            raise ValueError(f"layer {name!r} has weight dropout and masks: call remove_weight_dropout before "
                             f"pruning, or sl.remove_masks first")
    for _, module in layers:
        module.__class__ = nn.Linear
        for key in ("p", "alpha", "gamma", "structure"):
            module.__dict__.pop(key, None)
    return model


# ================================================================================================ gradients
@dataclass
class SparseUpdate:
    """What one worker sends for one tensor: ``values`` at flat ``indices`` (ascending) of a tensor of ``shape``."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: Tuple[int, ...]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    def mask(self) -> torch.Tensor:
        """Boolean tensor of ``shape``: True where a value is sent."""
        out = torch.zeros(math.prod(self.shape), dtype=torch.bool, device=self.indices.device)
        out[self.indices] = True
        return out.reshape(self.shape)


class Compressor:
    """Base of the gradient compressors: keep :math:`k = \\max(1, \\lceil r n \\rceil)` entries per tensor.

    With error feedback (Seide et al.; Strom {cite}`strom2015scalable`; Stich et al. {cite}`stich2018sparsified`,
    Karimireddy et al. {cite}`karimireddy2019error`; survey §5.3.1, §5.3.4) each tensor ``name`` has a residual
    memory :math:`e` and one call does

    .. math:: a = e + g, \\qquad u = C_k(a), \\qquad e \\leftarrow a - u,

    so :math:`\\sum_t u_t + e_T = \\sum_t g_t` exactly: nothing is lost, only delayed. Without it, :math:`u =
    C_k(g)` and the rest is dropped. Subclasses choose the :math:`k` positions (:meth:`select`).
    """

    name = "compressor"

    def __init__(self, ratio: float, error_feedback: bool = True):
        self.ratio = check_ratio(ratio)
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = error_feedback
        self.memory: Dict[str, torch.Tensor] = {}

    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Ascending flat indices of the ``k`` entries of ``flat`` to send."""
        raise NotImplementedError

    def compress(self, grad: torch.Tensor, name: str = "") -> SparseUpdate:
        """The sparse update sent for ``grad`` (and, with error feedback, the new residual of ``name``)."""
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise TypeError(f"grad must be a floating-point tensor, got {type(grad).__name__}")
        if not torch.isfinite(grad).all():
            raise ValueError(f"gradient {name!r} holds NaN or infinite entries")
        flat = grad.detach().reshape(-1)
        residual = self.memory.get(name) if self.error_feedback else None
        if residual is not None:
            if residual.shape != flat.shape:
                raise ValueError(f"gradient {name!r} has {flat.numel()} entries, its residual memory "
                                 f"{residual.numel()}: one compressor per model (reset() to start over)")
            flat = residual + flat          # a new tensor: the accumulator a = e + g
        k = kept_count(flat.numel(), self.ratio)
        indices = self.select(flat, k)
        values = flat[indices]              # advanced indexing copies
        if self.error_feedback:
            rest = flat if residual is not None else flat.clone()   # never write into the caller's gradient
            rest[indices] = 0.0
            self.memory[name] = rest
        return SparseUpdate(indices, values, tuple(grad.shape))

    def residual(self, name: str) -> Optional[torch.Tensor]:
        """The residual memory of ``name`` (flat), or None before the first call / without error feedback."""
        return self.memory.get(name)

    def reset(self) -> None:
        """Forget every residual."""
        self.memory = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio:g}, error_feedback={self.error_feedback})"


class TopK(Compressor):
    """Top-k sparsification: send the :math:`k` entries of largest :math:`|a_j|` (Aji & Heafield
    {cite}`aji2017sparse`, Lin et al. {cite}`lin2018deep`; survey §5.3.1). Ties go to the lower index (a stable
    sort), so exactly :math:`k` entries are sent and the choice is deterministic."""

    name = "topk"

    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        return top_mask(flat.abs()[None], k)[0].nonzero().reshape(-1)


class RandomK(Compressor):
    """Random-k sparsification: send :math:`k` entries chosen uniformly at random, without rescaling (Stich et al.
    {cite}`stich2018sparsified`; survey §5.3.2-5.3.4). ``seed`` fixes the draws (a private ``torch.Generator``)."""

    name = "randomk"

    def __init__(self, ratio: float, error_feedback: bool = True, seed: int = 0):
        super().__init__(ratio, error_feedback)
        self.generator = torch.Generator().manual_seed(int(seed))

    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        return torch.sort(torch.randperm(flat.numel(), generator=self.generator)[:k]).values.to(flat.device)


COMMUNICATION_FORMATS = ("dense", "bitmap", "coo", "delta")


def update_bits(updates: Mapping[str, SparseUpdate], fmt: str, value_bits: int = 32) -> int:
    """Exact bits to send ``{name: SparseUpdate}`` in storage format ``fmt`` of Chapter 01
    (:func:`sparsity_lib.formats.storage_bits`: values plus the index overhead of the format)."""
    return sum(formats.storage_bits(u.mask(), fmt, value_bits=value_bits) for u in updates.values())


class GradientCompression:
    """Training callback: compress every gradient before the optimizer step, as one worker of data-parallel
    training does before sending it (survey §5.3). Use with ``sl.train.fit(..., callbacks=[...])``.

    In ``on_after_backward`` each trainable parameter's ``.grad`` is replaced by ``compressor.compress(grad,
    name).to_dense()``, so the optimizer applies only what would be communicated. Attributes after training:
    ``steps``; ``values_sent`` and ``values_dense`` (totals over steps); ``last_updates`` (``{name:
    SparseUpdate}`` of the last step, for :func:`update_bits`).
    """

    def __init__(self, compressor: Compressor):
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor must be a TopK or RandomK, got {type(compressor).__name__}")
        self.compressor = compressor
        self.steps, self.values_sent, self.values_dense = 0, 0, 0
        self.last_updates: Dict[str, SparseUpdate] = {}

    def on_after_backward(self, state) -> None:
        updates = {}
        for name, param in state.model.named_parameters():
            if param.grad is None:
                continue
            update = self.compressor.compress(param.grad, name)
            param.grad.copy_(update.to_dense())
            updates[name] = update
            self.values_sent += update.nnz
            self.values_dense += param.grad.numel()
        self.last_updates = updates
        self.steps += 1


# ================================================================================================== meProp
class MePropHandle:
    """Returned by :func:`meprop`: ``remove()`` (or leaving a ``with`` block) detaches the backward hooks."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def topk_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` entries of largest magnitude in every row of ``x`` (last dimension; ties: lower index)."""
    rows = x.reshape(-1, x.shape[-1])
    if k >= rows.shape[1]:
        return x
    return (rows * top_mask(rows.abs(), k)).reshape(x.shape)


class _TopKGradient(torch.autograd.Function):
    """Identity in the forward pass; :func:`topk_rows` of the incoming gradient in the backward pass."""

    @staticmethod
    def forward(ctx, y, k):
        ctx.k = k
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return topk_rows(grad, ctx.k), None


def meprop(model: nn.Module, k: int, layers: Optional[Sequence[str]] = None) -> MePropHandle:
    """Minimal-effort backpropagation (Sun et al. {cite}`sun2017meprop`; survey §5.4): in the backward pass of
    every chosen Linear layer keep only the ``k`` largest-magnitude entries of each example's output gradient
    :math:`\\delta = \\partial L / \\partial y`,

    .. math:: \\tilde\\delta_{i} = \\operatorname{top}_k(\\delta_{i}), \\qquad \\partial L/\\partial W \\approx
              \\tilde\\delta^\\top x, \\qquad \\partial L/\\partial x \\approx \\tilde\\delta W,

    so each example touches only :math:`k` rows of the weight gradient and the backward pass of the layer costs
    about :math:`k / n_{out}` of the dense one. ``layers``: names of Linear layers (default: all but the last,
    whose output gradient is the loss gradient of the logits). A forward hook passes each chosen layer's output
    through an identity whose backward keeps the top-k (ties: lower index); the forward pass is unchanged.
    Returns a :class:`MePropHandle` (``remove()`` or a ``with`` block).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError("model has no nn.Linear layers")
    names = list(linears)[:-1] if layers is None else list(layers)
    for name in names:
        if name not in linears:
            raise ValueError(f"unknown Linear layer {name!r}; the Linear layers are {list(linears)}")

    def hook(module, args, output):
        return _TopKGradient.apply(output, k) if torch.is_grad_enabled() else output

    return MePropHandle([linears[name].register_forward_hook(hook) for name in names])


__all__ = [
    "activation_sparsity", "ActivationPenalty", "activation_l1", "activation_hoyer", "l1_regularizer",
    "hoyer_regularizer", "drop_connect_weight", "targeted_dropout", "DropConnect", "TargetedDropout",
    "add_drop_connect", "add_targeted_dropout", "remove_weight_dropout", "SparseUpdate", "Compressor", "TopK",
    "RandomK", "GradientCompression", "update_bits", "COMMUNICATION_FORMATS", "kept_count", "meprop", "topk_rows",
    "MePropHandle", "top_mask", "check_ratio", "check_drop_probability", "check_strength",
]
