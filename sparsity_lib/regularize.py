"""Sparsity by regularization: L1, group lasso, Hoyer-square; L0 hard-concrete gates; sparse variational dropout.

Instead of choosing which weights to remove, these methods add a term to the training loss that drives weights
(or gates on them) to zero, and the sparsity is an *output* of training (survey §3.6, §3.7):

* penalties for :func:`sparsity_lib.train.fit`'s ``penalty=``: :func:`l1` (the convex relaxation of the
  :math:`\\ell_0` norm), :func:`group_lasso` (whole neurons), :func:`hoyer_square` (a scale-invariant ratio);
  their proximal steps :func:`soft_threshold` / :func:`group_soft_threshold` and the training callback
  :class:`Proximal`, which puts weights *exactly* on zero;
* **L0 gates** (Louizos et al.): :func:`add_l0_gates` puts a hard-concrete gate :math:`z \\in [0, 1]` on every
  weight (or neuron), :func:`l0_penalty` is the expected number of nonzero gates;
* **sparse variational dropout** (Molchanov et al.): :func:`add_variational_dropout` makes every weight
  Gaussian, :math:`w = \\theta (1 + \\sqrt{\\alpha}\\, \\varepsilon)`, trained with the local reparameterization
  trick; :func:`vd_penalty` is the KL term; weights with :math:`\\log \\alpha \\ge 3` are dropped.

Gates and variational dropout are parametrizations of the layer's weight that follow the mask protocol of
:mod:`sparsity_lib.masks` (they have ``hard_mask()``), so ``sl.sparsity``, ``sl.get_masks`` and
``sl.sparsity_report`` see what they would remove during training. :func:`finalize` turns them into ordinary
``sl`` masks and plain weights. :func:`compare_methods` is the experiment of Chapter 07 (gradual magnitude
pruning vs L0 vs VD vs random, after Gale et al. {cite}`gale2019state`). Defined in Chapter 07.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from . import masks as _masks
from .masks import apply_masks, get_masks

STRUCTURES = ("neuron", "input")
#: Louizos et al.'s hard-concrete defaults: temperature beta, stretch interval (gamma, zeta).
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
#: Molchanov et al.'s constants of the KL approximation (their Eq. 14).
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: log alpha is clipped to this range (as in Molchanov et al.'s code): beyond it the weight is pure noise.
LOG_ALPHA_RANGE = (-8.0, 8.0)


# ------------------------------------------------------------------------------------------------ checks
def _check_nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _check_structure(structure) -> str:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    return structure


def _check_concrete(beta, gamma, zeta):
    for name, v in (("beta", beta), ("gamma", gamma), ("zeta", zeta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if beta <= 0:
        raise ValueError(f"beta (the temperature) must be > 0, got {beta!r}")
    if gamma >= 0:
        raise ValueError(f"gamma (the lower end of the stretch) must be < 0, got {gamma!r}")
    if zeta <= 1:
        raise ValueError(f"zeta (the upper end of the stretch) must be > 1, got {zeta!r}")
    return float(beta), float(gamma), float(zeta)


def _groups(w: torch.Tensor, structure: str) -> torch.Tensor:
    """The weight as a matrix whose rows are the groups: output rows/channels ("neuron") or inputs ("input")."""
    rows = w.reshape(w.shape[0], -1)
    if structure == "neuron":
        return rows
    # "input": column j of a Linear, input channel j (all its kernel positions) of a Conv
    return w.transpose(0, 1).reshape(w.shape[1], -1)


# ------------------------------------------------------------------------------------------- penalties
def l1(model: nn.Module, strength: float = 1.0) -> torch.Tensor:
    """:math:`\\lambda \\sum_l \\lVert W_l \\rVert_1`: the L1 penalty (lasso) over the prunable weights.

    The convex relaxation of :math:`\\lambda \\lVert w \\rVert_0` (Tibshirani {cite}`tibshirani1996regression`;
    for pruning Han et al. {cite}`han2015learning`). Survey §3.6.2. Use as
    ``sl.train.fit(..., penalty=lambda m: sl.regularize.l1(m, 1e-4))``.
    """
    strength = _check_nonneg(strength, "strength")
    return strength * sum(w.abs().sum() for w in _masks.prunable(model).values())


def group_lasso(model: nn.Module, strength: float = 1.0, structure: str = "neuron") -> torch.Tensor:
    """:math:`\\lambda \\sum_g \\sqrt{n_g}\\, \\lVert w_g \\rVert_2`: the group lasso over neurons or inputs.

    Groups are the output rows of a Linear / output channels of a Conv (``"neuron"``) or the input columns /
    input channels (``"input"``); :math:`n_g` is the size of group :math:`g`. The norm is not squared, so whole
    groups reach zero together (Yuan & Lin {cite}`yuan2006model`; for networks Wen et al. {cite}`wen2016learning`).
    Survey §3.6.3.
    """
    strength = _check_nonneg(strength, "strength")
    structure = _check_structure(structure)
    total = 0.0
    for w in _masks.prunable(model).values():
        g = _groups(w, structure)
        total = total + math.sqrt(g.shape[1]) * g.norm(dim=1).sum()
    return strength * total


def hoyer_square(model: nn.Module, strength: float = 1.0) -> torch.Tensor:
    """:math:`\\lambda \\sum_l \\lVert W_l \\rVert_1^2 / \\lVert W_l \\rVert_2^2`, the Hoyer-square penalty.

    Between 1 (one nonzero) and the number of weights (all equal): it measures sparsity independently of the
    scale of the weights, so it does not shrink the weights it keeps as L1 does (Hoyer {cite}`hoyer2004non`;
    Yang et al. {cite}`yang2020deephoyer`). Survey §3.6 (beyond L1; cf. §3.6.4).
    """
    strength = _check_nonneg(strength, "strength")
    total = 0.0
    for w in _masks.prunable(model).values():
        total = total + w.abs().sum() ** 2 / (w.pow(2).sum() + 1e-12)
    return strength * total


def soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """:math:`\\operatorname{sign}(w) \\max(|w| - \\delta, 0)`, the proximal operator of
    :math:`\\delta \\lVert w \\rVert_1`.

    After a gradient step with learning rate :math:`\\eta` on the loss alone, applying it with
    :math:`\\delta = \\eta \\lambda` is one step of proximal gradient descent (ISTA) on loss + :math:`\\lambda \\lVert w
    \\rVert_1`; unlike a subgradient step it lands weights *exactly* on zero. Survey §3.6.2.
    """
    threshold = _check_nonneg(threshold, "threshold")
    return torch.sign(w) * torch.clamp(w.abs() - threshold, min=0)


def group_soft_threshold(w: torch.Tensor, threshold: float, structure: str = "neuron") -> torch.Tensor:
    """Proximal operator of :math:`\\delta \\sum_g \\sqrt{n_g} \\lVert w_g \\rVert_2`: each group is scaled by
    :math:`\\max(0, 1 - \\delta \\sqrt{n_g} / \\lVert w_g \\rVert_2)` (zero when its norm is below
    :math:`\\delta \\sqrt{n_g}`). Groups as in :func:`group_lasso`. Survey §3.6.3.
    """
    threshold = _check_nonneg(threshold, "threshold")
    structure = _check_structure(structure)
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dimensions (out, in, ...), got shape {tuple(w.shape)}")
    g = _groups(w, structure)
    norm = g.norm(dim=1, keepdim=True)
    scale = torch.clamp(1 - threshold * math.sqrt(g.shape[1]) / norm.clamp_min(1e-30), min=0)
    out = g * scale
    if structure == "neuron":
        return out.reshape(w.shape)
    return out.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1).contiguous()


class Proximal:
    """Training callback: after every optimizer step, the proximal step of L1 (or group lasso) on the weights.

    ``w <- soft_threshold(w, lr * strength)`` with the ``lr`` of the step just taken (or
    :func:`group_soft_threshold` with ``structure``), applied to the stored weights (``original`` when masked); positions already masked stay zero. With SGD this is
    proximal gradient descent; with Adam it is the common heuristic (the threshold ignores Adam's per-weight
    step sizes). Use it *instead of* the penalty in the loss: ``fit(..., callbacks=[Proximal(1e-3)])``.
    """

    def __init__(self, strength: float, structure: Optional[str] = None):
        self.strength = _check_nonneg(strength, "strength")
        self.structure = None if structure is None else _check_structure(structure)

    def on_after_backward(self, state) -> None:
        self._lr = state.lr   # the learning rate of the step about to be taken (state.lr moves on after it)

    def on_step_end(self, state) -> None:
        delta = getattr(self, "_lr", state.lr) * self.strength
        current = get_masks(state.model)
        with torch.no_grad():
            for name, module in _masks._prunable_modules(state.model).items():
                w = _masks._original(module, name)
                if self.structure is None:
                    new = soft_threshold(w, delta)
                else:
                    new = group_soft_threshold(w, delta, self.structure)
                w.copy_(new * current[name].to(w))

    def __repr__(self) -> str:
        return f"Proximal(strength={self.strength}, structure={self.structure!r})"


# ------------------------------------------------------------------------------------ hard-concrete gates
def hard_concrete(log_alpha: torch.Tensor, u: Optional[torch.Tensor] = None, beta: float = BETA,
                  gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """A hard-concrete gate (Louizos et al. {cite}`louizos2018learning`, Eq. 9-10; survey §3.6.1).

    With noise ``u`` ~ U(0, 1) (training): :math:`s = \\sigma((\\log u - \\log(1-u) + \\log\\alpha)/\\beta)`,
    stretched to :math:`\\bar s = s(\\zeta - \\gamma) + \\gamma` and clamped, :math:`z = \\min(1, \\max(0, \\bar s))`:
    exactly 0 or 1 with positive probability, differentiable in :math:`\\log\\alpha` in between. With ``u=None``
    (test time): :math:`\\hat z = \\min(1, \\max(0, \\sigma(\\log\\alpha)(\\zeta - \\gamma) + \\gamma))`.
    """
    beta, gamma, zeta = _check_concrete(beta, gamma, zeta)
    if u is None:
        s = torch.sigmoid(log_alpha)
    else:
        try:
            fits = torch.broadcast_shapes(u.shape, log_alpha.shape) == log_alpha.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"u must broadcast to log_alpha's shape {tuple(log_alpha.shape)}, got {tuple(u.shape)}")
        if not bool(((u > 0) & (u < 1)).all()):
            raise ValueError("u must lie strictly between 0 and 1 (uniform noise; clamp it away from 0 and 1)")
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def l0_expected(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA,
                zeta: float = ZETA) -> torch.Tensor:
    """:math:`P(z \\ne 0) = \\sigma(\\log\\alpha - \\beta \\log(-\\gamma/\\zeta))` per gate (Louizos et al., Eq. 12).

    Its sum is the expected :math:`\\ell_0` norm of the gates, differentiable in :math:`\\log\\alpha`. Survey §3.6.1.
    """
    beta, gamma, zeta = _check_concrete(beta, gamma, zeta)
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


class L0Gate(nn.Module):
    """Parametrization ``W -> W * z`` with hard-concrete gates ``z`` (one per weight or one per neuron).

    Training mode: one sample of ``u`` per forward pass (shared by the batch). Eval mode: the deterministic gate
    :math:`\\hat z`. ``hard_mask()`` is :math:`\\hat z > 0` (expanded to the weight's shape): the mask protocol.
    """

    def __init__(self, shape, structure: Optional[str], init_drop: float, beta: float, gamma: float, zeta: float):
        super().__init__()
        self.weight_shape = tuple(shape)
        self.structure = structure
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        gate_shape = self.weight_shape if structure is None else (shape[0],) + (1,) * (len(shape) - 1)
        mean = math.log(1 - init_drop) - math.log(init_drop)
        self.log_alpha = nn.Parameter(torch.randn(gate_shape) * 0.01 + mean)

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            return hard_concrete(self.log_alpha, u, self.beta, self.gamma, self.zeta)
        return hard_concrete(self.log_alpha, None, self.beta, self.gamma, self.zeta)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate()

    def hard_mask(self) -> torch.Tensor:
        z = hard_concrete(self.log_alpha.detach(), None, self.beta, self.gamma, self.zeta)
        return (z > 0).expand(self.weight_shape).clone()

    def group_size(self) -> int:
        return int(math.prod(self.weight_shape) // self.log_alpha.numel())

    def extra_repr(self) -> str:
        return f"structure={self.structure!r}, gates={self.log_alpha.numel()}"


def _prepare_gates(model: nn.Module, layers) -> Dict[str, nn.Module]:
    modules = _masks._check_has_prunable(model)
    if layers is not None:
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise ValueError(f"layers: unknown layer names {unknown}; prunable weights are {list(modules)}")
        modules = {n: modules[n] for n in layers}
        attention = [n for n in modules if _masks._attr(n) != "weight"]
        if attention:
            raise ValueError(f"layers: {attention} are attention input projections; L0 gates and variational "
                             "dropout support the weight of Linear and Conv layers only")
    else:
        modules = {n: m for n, m in modules.items() if _masks._attr(n) == "weight"}
    for name, module in modules.items():
        chain = _masks._chain(module)
        if chain:
            what = "gates or variational dropout are already attached" if any(
                isinstance(p, (L0Gate, VariationalDropout)) for p in chain) else "it is already masked/parametrized"
            raise ValueError(f"model: cannot add gates to {name}: {what} ({[type(p).__name__ for p in chain]}); "
                             "call sl.regularize.finalize(model) or sl.remove_masks(model) first")
        why = _masks._foreign(module)
        if why:
            raise ValueError(f"model: cannot add gates to {name}: {why}")
    return modules


def add_l0_gates(model: nn.Module, structure: Optional[str] = None, init_drop: float = 0.1, beta: float = BETA,
                 gamma: float = GAMMA, zeta: float = ZETA, layers: Optional[Sequence[str]] = None) -> nn.Module:
    """Attach hard-concrete L0 gates to the prunable weights (Louizos et al. {cite}`louizos2018learning`).

    ``structure=None`` gates every weight; ``"neuron"`` one gate per output row / channel. ``log_alpha`` starts
    at :math:`\\log((1-p)/p)` (+ small noise) with ``p = init_drop``. Train with ``penalty=`` :func:`l0_penalty`
    times a strength. Everything is checked before the model changes (gates twice: ``ValueError``). Survey §3.6.1.
    """
    beta, gamma, zeta = _check_concrete(beta, gamma, zeta)
    if structure is not None and structure != "neuron":
        raise ValueError(f"structure must be None (per weight) or 'neuron', got {structure!r}")
    if isinstance(init_drop, bool) or not isinstance(init_drop, (int, float)) or not 0 < init_drop < 1:
        raise ValueError(f"init_drop must be in (0, 1), got {init_drop!r}")
    modules = _prepare_gates(model, layers)
    for module in modules.values():
        w = module.weight
        gate = L0Gate(w.shape, structure, init_drop, beta, gamma, zeta).to(device=w.device, dtype=w.dtype)
        parametrize.register_parametrization(module, "weight", gate, unsafe=True)
    return model


def _find(model: nn.Module, kind) -> Dict[str, nn.Module]:
    out = {}
    for name, module in _masks._prunable_modules(model).items():
        for p in _masks._chain(module):
            if isinstance(p, kind):
                out[name] = p
    return out


def l0_penalty(model: nn.Module, reduction: str = "sum") -> torch.Tensor:
    """Expected number of nonzero weights under the gates, :math:`\\sum_g n_g\\, P(z_g \\ne 0)` (``"sum"``), or
    that divided by the number of gated weights (``"mean"``: the expected density, in [0, 1]). Survey §3.6.1."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    gates = _find(model, L0Gate)
    if not gates:
        raise ValueError("model has no L0 gates: call sl.regularize.add_l0_gates(model) first")
    total = sum(g.group_size() * l0_expected(g.log_alpha, g.beta, g.gamma, g.zeta).sum() for g in gates.values())
    if reduction == "mean":
        total = total / sum(math.prod(g.weight_shape) for g in gates.values())
    return total


# ------------------------------------------------------------------------------ sparse variational dropout
def vd_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s approximation of :math:`\\mathrm{KL}(q(w \\mid \\theta, \\alpha\\theta^2) \\Vert p(w))`
    under the log-uniform prior, per weight (their Eq. 14 {cite}`molchanov2017variational`; survey §3.7):

    .. math:: \\mathrm{KL} \\approx k_1 - k_1 \\sigma(k_2 + k_3 \\log\\alpha) + \\tfrac12 \\log(1 + 1/\\alpha),

    :math:`k_1 = 0.63576, k_2 = 1.87320, k_3 = 1.48695`. It falls to 0 as :math:`\\alpha \\to \\infty` (the weight
    is pure noise and can be dropped). Sum it for the network's KL.
    """
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


class VariationalDropout(nn.Module):
    """Parametrization of a weight as the mean :math:`\\theta` of :math:`w = \\theta(1 + \\sqrt\\alpha\\,\\varepsilon)`.

    It owns ``log_sigma2`` (:math:`\\log \\sigma^2`, Molchanov's additive parametrization, :math:`\\alpha =
    \\sigma^2/\\theta^2`). The weight a layer sees is :math:`\\theta` in training mode (the noise is added to the
    pre-activation by a forward hook, the local reparameterization trick: :func:`add_variational_dropout`) and
    :math:`\\theta \\odot [\\log\\alpha < \\text{threshold}]` in eval mode. ``hard_mask()`` is
    :math:`\\log\\alpha < \\text{threshold}` (the mask protocol).
    """

    def __init__(self, shape, threshold: float, init_log_sigma2: float):
        super().__init__()
        self.threshold = threshold
        self.log_sigma2 = nn.Parameter(torch.full(tuple(shape), float(init_log_sigma2)))

    def log_alpha(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.log_sigma2 - torch.log(theta * theta + 1e-8), *LOG_ALPHA_RANGE)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if self.training:
            return theta
        return theta * (self.log_alpha(theta) < self.threshold).to(theta.dtype)

    def hard_mask(self) -> torch.Tensor:
        theta = self._theta()
        return (self.log_alpha(theta).detach() < self.threshold).clone()

    def _theta(self) -> torch.Tensor:
        return self._owner_original.detach()

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def _vd_of(module: nn.Module) -> Optional[VariationalDropout]:
    for p in _masks._chain(module):
        if isinstance(p, VariationalDropout):
            return p
    return None


def _vd_forward_hook(module: nn.Module, args, output):
    """Local reparameterization: add :math:`\\sqrt{x^2 (\\alpha\\theta^2)^\\top}\\,\\varepsilon` to the output.

    A module-level function that looks the parametrization up on ``module``, so that ``copy.deepcopy`` and
    ``sl.remove_masks`` (after which it does nothing) stay correct.
    """
    vd = _vd_of(module)
    if vd is None or not vd.training:
        return None
    theta = module.parametrizations["weight"].original
    variance_w = torch.exp(vd.log_alpha(theta)) * theta * theta
    x2 = args[0] * args[0]
    if isinstance(module, nn.Linear):
        var = F.linear(x2, variance_w)
    else:
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d if isinstance(module, nn.Conv2d) else F.conv3d
        var = conv(x2, variance_w, None, module.stride, module.padding, module.dilation, module.groups)
    return output + torch.sqrt(var + 1e-8) * torch.randn_like(output)


def add_variational_dropout(model: nn.Module, threshold: float = 3.0, init_log_sigma2: float = -10.0,
                            layers: Optional[Sequence[str]] = None) -> nn.Module:
    """Sparse variational dropout on the prunable layers (Molchanov et al. {cite}`molchanov2017variational`).

    Every weight becomes :math:`w_{ij} = \\theta_{ij}(1 + \\sqrt{\\alpha_{ij}}\\,\\varepsilon_{ij})`. Training uses the
    local reparameterization trick (Kingma et al. {cite}`kingma2015variational`): for a Linear layer the
    pre-activation :math:`b = xW^\\top` is Gaussian with mean :math:`x\\theta^\\top` and variance
    :math:`x^2 (\\alpha \\odot \\theta^2)^\\top`, so it is sampled directly, one independent sample per example.

    Design: the mean is a :class:`VariationalDropout` parametrization of ``weight`` (so masks, reports and
    ``remove_masks`` work), and the noise is added to the layer's output by a forward hook (a weight transform
    alone cannot produce per-example noise). Convolutions (zero padding) get the same with ``conv(x^2,
    alpha theta^2)``. Train with ``penalty=`` :func:`vd_penalty` (the KL) divided by the training set size;
    :func:`finalize` keeps the weights with :math:`\\log\\alpha <` ``threshold``. Survey §3.7.
    """
    for name, v in (("threshold", threshold), ("init_log_sigma2", init_log_sigma2)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    modules = _prepare_gates(model, layers)
    for name, module in modules.items():
        if not isinstance(module, nn.Linear) and getattr(module, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"model: {name} uses padding_mode={module.padding_mode!r}; variational dropout "
                             "supports zero padding only")
    for module in modules.values():
        w = module.weight
        vd = VariationalDropout(w.shape, float(threshold), init_log_sigma2).to(device=w.device, dtype=w.dtype)
        parametrize.register_parametrization(module, "weight", vd, unsafe=True)
        # hard_mask() needs theta: keep a plain reference (not a submodule; deepcopy maps it to the copy's)
        object.__setattr__(vd, "_owner_original", module.parametrizations["weight"].original)
        module.register_forward_hook(_vd_forward_hook)
    return model


def _bind_vd(model: nn.Module) -> Dict[str, VariationalDropout]:
    out = {}
    for name, module in _masks._prunable_modules(model).items():
        vd = _vd_of(module)
        if vd is not None:
            object.__setattr__(vd, "_owner_original", module.parametrizations["weight"].original)
            out[name] = vd
    return out


def vd_log_alpha(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{name: log alpha}`` of every layer with variational dropout (clipped to [-8, 8]; differentiable)."""
    vds = _bind_vd(model)
    if not vds:
        raise ValueError("model has no variational dropout: call sl.regularize.add_variational_dropout first")
    return {name: vd.log_alpha(vd._owner_original) for name, vd in vds.items()}


def vd_penalty(model: nn.Module) -> torch.Tensor:
    """The network's KL term :math:`\\sum_{ij} \\mathrm{KL}_{ij}` (:func:`vd_kl` summed over all VD weights)."""
    return sum(vd_kl(la).sum() for la in vd_log_alpha(model).values())


# ------------------------------------------------------------------------------------------------ finalize
def finalize(model: nn.Module, threshold: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """Turn L0 gates / variational dropout into ordinary ``sl`` masks and plain weights; return the masks.

    Every gated layer gets the weight its deterministic (eval-mode) evaluation gives, :math:`\\theta \\odot \\hat z`
    for L0 gates (the test-time model of Louizos et al.) or :math:`\\theta` for VD, and the mask
    :math:`\\hat z > 0` or :math:`\\log\\alpha <` threshold (``threshold`` overrides the one given to
    :func:`add_variational_dropout`; Molchanov et al. use 3). Gates, ``log_alpha``/``log_sigma2`` and the noise
    hooks are removed; other layers are untouched. Afterwards ``sl.remove_masks``, reports, formats and
    fine-tuning work as after any ``sl.prune``.
    """
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    _bind_vd(model)
    gated = {n: m for n, m in _masks._prunable_modules(model).items()
             if any(isinstance(p, (L0Gate, VariationalDropout)) for p in _masks._chain(m))}
    if not gated:
        raise ValueError("model has no L0 gates or variational dropout to finalize")
    plan = {}
    for name, module in gated.items():
        vd = _vd_of(module)
        if vd is not None and threshold is not None:
            vd.threshold = float(threshold)
        hard = _masks._hard_mask(module, name)
        plan[name] = (_masks._eval_weight(module) * hard.to(module.weight.dtype), hard)
    for name, module in gated.items():
        for key in [k for k, hook in module._forward_hooks.items() if hook is _vd_forward_hook]:
            del module._forward_hooks[key]
        _masks._remove_weight_parametrization(module, plan[name][0])
        module._parameters = {"weight": module._parameters.pop("weight"), **module._parameters}
    masks = {name: hard for name, (_, hard) in plan.items()}
    apply_masks(model, masks)
    return masks


# -------------------------------------------------------------------------------- the chapter's experiment
METHODS = ("gmp", "l0", "vd", "random")


def training_memory(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                    penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None,
                    optimizer_slots: int = 2) -> Dict[str, int]:
    """Bytes a training step of ``model`` holds, counted exactly (not a process measurement):

    ``parameters`` (parameters and buffers, masks included), ``gradients`` (one per parameter),
    ``optimizer`` (``optimizer_slots`` tensors per parameter: 2 for Adam's moments) and ``activations``
    (the distinct tensors autograd saves for the backward pass of loss + penalty, found with
    ``torch.autograd.graph.saved_tensors_hooks``; parameters saved are not counted twice), and ``total``.
    The model is left as it was (one forward pass, no backward).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    saved: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(inputs), targets)
        if penalty is not None:
            loss = loss + penalty(model)
    del loss
    out = {"parameters": param_bytes + buffer_bytes, "gradients": param_bytes,
           "optimizer": optimizer_slots * param_bytes, "activations": sum(saved.values())}
    out["total"] = sum(out.values())
    return out


class _StepClock:
    """Callback: wall time of the training steps only (from the first step's start to the last step's end)."""

    def on_train_begin(self, state):
        self.start, self.end, self.steps = time.perf_counter(), None, 0

    def on_step_end(self, state):
        self.end, self.steps = time.perf_counter(), state.step

    def seconds_per_step(self) -> float:
        return (self.end - self.start) / max(self.steps, 1)


def compare_methods(task, seeds: Sequence[int], *, sparsities: Sequence[float] = (0.9, 0.99),
                    l0_strengths: Sequence[float] = (0.1, 1.0), vd_strengths: Sequence[float] = (1.0,),
                    methods: Sequence[str] = METHODS, hidden: Sequence[int] = (300, 100), epochs: int = 20,
                    lr: float = 0.01, gate_lr: float = 0.1, batch_size: int = 128, init_drop: float = 0.1,
                    model_fn: Optional[Callable[[int], nn.Module]] = None, keep: str = "first",
                    match: Sequence[str] = ()) -> List[dict]:
    """Gradual magnitude pruning vs L0 gates vs sparse VD vs random pruning on one task (Gale et al.'s comparison).

    For every seed, every method trains a fresh MLP ``in -> hidden -> classes`` (or ``model_fn(seed)``) from the
    same initialization with the same recipe (``epochs`` of Adam at ``lr``, cosine decay, ``batch_size``; the
    gates' ``log_alpha`` and VD's ``log_sigma2`` learn at ``gate_lr``: Adam moves a parameter by at most about
    its learning rate per step, and a gate must travel several units of ``log_alpha`` to close):

    * ``"gmp"``: Zhu & Gupta's gradual global magnitude pruning to each of ``sparsities`` (from 10% to 60% of the
      steps, every 2%), then training at that sparsity;
    * ``"random"``: a global random mask at each of ``sparsities`` at initialization, then training;
    * ``"l0"``: per-weight hard-concrete gates, loss + :math:`\\lambda \\cdot \\mathbb{E}\\lVert z \\rVert_0 /
      N_\\text{train}` (:func:`l0_penalty`, scaled per example as in Louizos et al.) for each :math:`\\lambda` in
      ``l0_strengths``;
    * ``"vd"``: sparse VD, loss + :math:`\\beta \\cdot \\mathrm{KL} / N_\\text{train}` (:math:`\\beta = 1` is the
      variational lower bound per example) for each :math:`\\beta` in ``vd_strengths``.

    L0 and VD models are :func:`finalize`-d, then evaluated (no fine-tuning). Returns one record per (method,
    strength, seed): ``method``, ``strength`` (target sparsity, :math:`\\lambda` or :math:`\\beta`), ``seed``,
    ``sparsity`` (achieved), ``accuracy``, ``densities`` ``{layer: density}``, ``seconds_per_step`` (training
    steps only), ``steps``, ``memory`` (:func:`training_memory` at ``batch_size``); for the first seed (``keep=
    "first"``) or every seed (``"all"``) also ``masks``, and for VD ``log_alpha`` (flat) and ``magnitude_iou``
    (IoU of VD's kept weights with the global magnitude mask of its own trained :math:`\\theta` at the same
    sparsity). With ``match=("l0", "vd")`` GMP also runs, in the same seed, at every sparsity those methods
    reached (a paired comparison at equal sparsity; its records carry ``match = (method, strength)`` and
    ``strength`` = that sparsity, capped at 0.999). Methods run interleaved per seed, so machine load affects
    them alike.
    """
    from . import models

    unknown = [m for m in match if m not in ("l0", "vd")]
    if unknown:
        raise ValueError(f"match: only 'l0' and 'vd' have learned sparsities to match, got {unknown}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; known are {METHODS}")
    if keep not in ("first", "all"):
        raise ValueError(f"keep must be 'first' or 'all', got {keep!r}")
    for s in sparsities:
        if not 0 <= s < 1:
            raise ValueError(f"sparsities must lie in [0, 1), got {s!r}")
    for name, values in (("l0_strengths", l0_strengths), ("vd_strengths", vd_strengths)):
        for v in values:
            _check_nonneg(v, name)
    n_train = len(task.y_train)
    steps = epochs * task.num_batches(batch_size)
    recipe = dict(epochs=epochs, batch_size=batch_size, eval_every=epochs, progress=False)
    if model_fn is None:
        def model_fn(seed):
            return models.mlp(task.in_features, tuple(hidden), task.num_classes, seed=seed)

    order = [m for m in ("l0", "vd", "gmp", "random") if m in methods]   # learned sparsities first (matching)
    runs = [(m, s) for m in order for s in
            {"gmp": sparsities, "random": sparsities, "l0": l0_strengths, "vd": vd_strengths}[m]]
    records = []
    for i, seed in enumerate(seeds):
        init = model_fn(seed)
        probe = next(iter(task.batches(batch_size, seed=seed)))
        seed_runs = [(m, s, None) for m, s in runs]
        for method, strength, matched in _with_matches(seed_runs, records, seed, match):
            record = _one_run(method, strength, init, seed, task, probe, steps, recipe, lr, gate_lr, init_drop,
                              n_train, keep_masks=keep == "all" or i == 0)
            if matched is not None:
                record["match"] = matched
            records.append(record)
    return records


def _with_matches(seed_runs, records, seed, match):
    """Yield the runs of one seed; after the last learned run, GMP at each sparsity it reached (``match``)."""
    for k, run in enumerate(seed_runs):
        yield run
        learned_done = run[0] in ("l0", "vd") and (k + 1 == len(seed_runs) or seed_runs[k + 1][0] not in ("l0", "vd"))
        if learned_done:
            for r in [r for r in records if r["seed"] == seed and r["method"] in match]:
                yield "gmp", min(r["sparsity"], 0.999), (r["method"], r["strength"])


def _one_run(method, strength, init, seed, task, probe, steps, recipe, lr, gate_lr, init_drop, n_train,
             keep_masks):
    """Train one copy of ``init`` with one method; the record of :func:`compare_methods`."""
    from . import schedules, train
    from .compare import iou
    from .pruning import prune

    model = copy.deepcopy(init)
    torch.manual_seed(1000 * seed + 7)
    penalty, callbacks = None, []
    if method == "gmp":
        callbacks.append(schedules.GradualPruner(model, strength, begin=steps // 10, end=int(0.6 * steps),
                                                 frequency=max(1, steps // 50)))
    elif method == "random":
        prune(model, strength, method="random", scope="global", seed=seed)
    elif method == "l0":
        add_l0_gates(model, init_drop=init_drop)
        penalty = (lambda lam: lambda m: lam * l0_penalty(m) / n_train)(strength)
    else:
        add_variational_dropout(model)
        penalty = (lambda beta: lambda m: beta * vd_penalty(m) / n_train)(strength)
    extra = [p for n, p in model.named_parameters() if n.endswith(("log_alpha", "log_sigma2"))]
    base = [p for n, p in model.named_parameters() if not n.endswith(("log_alpha", "log_sigma2"))]
    groups = [{"params": base, "lr": lr}] + ([{"params": extra, "lr": gate_lr}] if extra else [])
    clock = _StepClock()
    train.fit(model, task, seed=seed, penalty=penalty, callbacks=[*callbacks, clock],
              optimizer=torch.optim.Adam(groups), **recipe)
    model.train()
    record = {"method": method, "strength": strength, "seed": seed, "steps": clock.steps,
              "seconds_per_step": clock.seconds_per_step(),
              "memory": training_memory(model, *probe, penalty=penalty)}  # trained: GMP is masked now
    if method == "vd":
        log_alpha = {n: la.detach().clone() for n, la in vd_log_alpha(model).items()}
        theta = {n: vd._owner_original.detach().clone() for n, vd in _bind_vd(model).items()}
    if method in ("l0", "vd"):
        finalize(model)
    model.eval()
    kept = get_masks(model)
    record["sparsity"] = _masks.sparsity(model)
    record["accuracy"] = train.accuracy(model, task)
    record["densities"] = {n: float(m.float().mean()) for n, m in kept.items()}
    if keep_masks:
        record["masks"] = kept
    if method == "vd":
        record["log_alpha"] = torch.cat([la.flatten() for la in log_alpha.values()]).numpy()
        record["log_sigma2"] = torch.cat([(la + torch.log(theta[n] ** 2 + 1e-8)).flatten()
                                          for n, la in log_alpha.items()]).numpy()
        magnitude = _magnitude_masks(theta, record["sparsity"])
        record["magnitude_iou"] = iou({n: log_alpha[n] < 3.0 for n in log_alpha}, magnitude)
    return record
    return records


def _magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> Dict[str, torch.Tensor]:
    """Global magnitude masks keeping the ``round((1 - sparsity) * n)`` largest ``|w|`` over all layers."""
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    keep = int(round((1 - sparsity) * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep > 0:
        chosen[torch.topk(flat, keep).indices] = True
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = chosen[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return out
