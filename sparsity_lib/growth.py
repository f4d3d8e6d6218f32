"""Dynamic sparse training: the network is sparse from the first step to the last, and its mask moves (survey §4).

Every method here is one *connectivity update* repeated every ``update_every`` (:math:`\\Delta T`) steps until
``end`` (:math:`T_{end}`): in each layer, drop the :math:`c` active weights with the lowest *drop scores* and
activate the :math:`c` inactive ones with the highest *grow scores*,

.. math::  K = \\operatorname{top}_{a - c}\\{d_i : m_i = 1\\}, \\qquad
           m' = K \\cup \\operatorname{top}_{c}\\{g_i : i \\notin K\\}, \\qquad
           c = \\lfloor f(t)\\, a \\rfloor ,                                              \\tag{9.1}

(:func:`sparsity_lib.select.drop_and_grow`; :math:`a` active weights, :math:`f(t)` the drop fraction) with the
drop fraction annealed by the cosine schedule of Evci et al. {cite}`evci2020rigging` (:func:`cosine_fraction`)

.. math::  f(t) = \\frac{\\alpha}{2}\\Big(1 + \\cos\\frac{\\pi t}{T_{end}}\\Big) \\ (t < T_{end}), \\qquad 0 \\text{ after.}
           \\tag{9.2}

The methods differ only where their papers differ (as in ``google-research/rigl``):

* :class:`Static`: never updates (the baseline: sparse training with a fixed random mask, §2.4.3);
* :class:`SET` (Mocanu et al. {cite}`mocanu2018scalable`): drop :math:`|w|`, grow at random; counts per layer fixed;
* :class:`RigL` (Evci et al. {cite}`evci2020rigging`): drop :math:`|w|`, grow by :math:`|\\partial L/\\partial w|` of
  the *dense* gradient; counts per layer fixed;
* :class:`DeepR` (Bellec et al. {cite}`bellec2018deep`): fixed signs, drop the weights whose sign flipped, grow at
  random; counts per layer fixed;
* :class:`SNFS` (Dettmers & Zettlemoyer {cite}`dettmers2019sparse`): drop :math:`|w|`, grow by the momentum of the
  dense gradient; regrowth *redistributed* across layers by mean momentum (total fixed);
* :class:`DSR` (Mostafa & Wang {cite}`mostafa2019parameter`): drop below an adaptive global threshold, grow at
  random, redistributed in proportion to each layer's surviving weights (total fixed);
* :class:`TopKAST` (Jayakumar et al. {cite}`jayakumar2020top`): forward set = top-k :math:`|\\theta|`, a larger
  backward set is trained too; counts per layer fixed.

Rhythm (as ``torch.ao.pruning`` sparsifiers): construct on the *dense* model and its optimizer (construction
applies the initial random sparse mask), then call ``step()`` once per training step **after**
``loss.backward()`` and **before** ``optimizer.step()`` (it is the ``on_after_backward`` callback of
:func:`sparsity_lib.train.fit`). On update steps it replaces the masks (:func:`sparsity_lib.masks.replace_masks`:
grown weights start at exactly zero), resets the optimizer state (momentum, Adam moments) of every dropped and
grown weight, and zeroes their gradient for this step, so a grown weight is still exactly zero after the
optimizer step (it has to earn its value from the next gradient on). Otherwise masked weights stay zero by the
parametrization itself.

**Across processes** (``torch.nn.parallel.DistributedDataParallel``): nothing to do. Pass the DDP model or its
``module``; every rank must construct the sparsifier with the same arguments (the same ``seed``: random draws
come from a ``torch.Generator`` of this object, not the global RNG, so every rank draws the same). DDP
all-reduces ``.grad``, which holds only the active positions; the *dense* gradient that RigL, SNFS and Top-KAST
read is all-reduced (averaged) here when a process group is initialized. With the same weights, the same
averaged gradients and a deterministic tie-break, every rank computes the same mask (tested with two gloo
processes).

Survey §4 (4.1 random, 4.2 gradient-based regrowth), §2.4.3 and §2.4.6. Defined in Chapter 09.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import budgets as _budgets
from .masks import (apply_masks, dense_gradients, get_masks, is_masked, prunable, replace_masks,
                    reset_optimizer_state, track_dense_gradients, trainable)
from .select import check_budget, check_sparsity, drop_and_grow

DISTRIBUTIONS = ("uniform", "erk")
SCHEDULES = ("cosine", "constant")
Masks = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------- pure functions
def cosine_fraction(step: int, alpha: float, end: int) -> float:
    """Drop fraction at ``step``: :math:`\\frac{\\alpha}{2}(1 + \\cos(\\pi\\, t / T_{end}))` before ``end``, 0 from
    ``end`` on (equation 9.2; Evci et al. {cite}`evci2020rigging`, survey §4.2)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
        raise ValueError(f"step must be a number >= 0, got {step!r}")
    alpha = _check_alpha(alpha)
    end = _check_int(end, "end", 0, "the step after which the mask no longer changes")
    if step >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end))


def apportion(total: int, weights: Mapping[str, float], capacity: Mapping[str, int]) -> Dict[str, int]:
    """Split the integer ``total`` among layers in proportion to ``weights``, no layer above its ``capacity``.

    Largest-remainder rounding, so the parts add up to ``total`` *exactly*; a layer that the proportion would push
    over its capacity is filled and the rest is shared again among the others. Layers with zero weight get
    nothing unless the others are full. Used by the redistribution of SNFS and DSR (survey §4.1, "layer-wise
    addition"). Raises ``ValueError`` if ``total`` exceeds the summed capacity.
    """
    names = list(weights)
    if total > sum(capacity[n] for n in names):
        raise ValueError(f"cannot place {total} weights: the layers have room for {sum(capacity.values())}")
    out = {n: 0 for n in names}
    left = total
    open_ = [n for n in names if capacity[n] > 0]
    while left > 0:
        w = {n: max(float(weights[n]), 0.0) for n in open_}
        if sum(w.values()) <= 0:                       # nobody has a claim: share by free room
            w = {n: float(capacity[n] - out[n]) for n in open_}
        norm = sum(w.values())
        share = {n: left * w[n] / norm for n in open_}
        part = {n: int(math.floor(share[n])) for n in open_}
        rest = left - sum(part.values())
        for n in sorted(open_, key=lambda n: (-(share[n] - part[n]), names.index(n)))[:rest]:
            part[n] += 1
        full = [n for n in open_ if out[n] + part[n] >= capacity[n]]
        if not full:
            for n in open_:
                out[n] += part[n]
            break
        for n in full:                                  # fill the full layers, share the rest again
            left -= capacity[n] - out[n]
            out[n] = capacity[n]
        open_ = [n for n in open_ if n not in full]
    return out


def _keep_top(mask: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` active positions with the highest scores (ties: earlier position first, as drop_and_grow)."""
    flat = mask.reshape(-1)
    idx = torch.nonzero(flat).reshape(-1)
    order = idx[torch.sort(scores.detach().reshape(-1).double()[idx], descending=True, stable=True).indices]
    out = torch.zeros_like(flat)
    out[order[:keep]] = True
    return out.reshape(mask.shape)


def drop_then_grow(mask: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, n_drop: int,
                   n_grow: int) -> torch.Tensor:
    """Equation (9.1) with different counts: keep the ``a - n_drop`` best active weights by drop score, then grow
    the ``n_grow`` best of all positions not kept by grow score. With ``n_drop == n_grow`` it *is*
    :func:`sparsity_lib.select.drop_and_grow` (called as such); methods that move weights between layers (SNFS,
    DSR) need the general case."""
    if n_drop == n_grow:
        return drop_and_grow(mask, drop_scores, grow_scores, n_drop)
    active = int(mask.sum())
    if not 0 <= n_drop <= active or not 0 <= n_grow <= mask.numel() - active + n_drop:
        raise ValueError(f"n_drop={n_drop}, n_grow={n_grow} do not fit a mask with {active} of {mask.numel()} active")
    if n_grow > n_drop:    # drop_and_grow for n_drop, then the next n_grow - n_drop best among the rest
        first = drop_and_grow(mask, drop_scores, grow_scores, n_drop)
        extra = _keep_top(~first, grow_scores, n_grow - n_drop)
        return first | extra
    fewer = _keep_top(mask, drop_scores, active - (n_drop - n_grow))   # drop the surplus first
    return drop_and_grow(fewer, drop_scores, grow_scores, n_grow)


# ------------------------------------------------------------------------------------------- validation
def _check_int(value, name, minimum, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}), got {value!r}")
    return int(value)


def _check_alpha(alpha, name="alpha"):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or math.isnan(alpha) or not 0 < alpha <= 1:
        raise ValueError(f"{name} must be in (0, 1] (the fraction of active weights dropped at an update), "
                         f"got {alpha!r}")
    return float(alpha)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean(tensors: Mapping[str, torch.Tensor]) -> Masks:
    """Average ``tensors`` over the ranks of the default process group (DDP averages ``.grad`` the same way)."""
    if not _distributed():
        return dict(tensors)
    import torch.distributed as dist
    out = {}
    for name, t in tensors.items():
        t = t.clone()
        dist.all_reduce(t)
        out[name] = t / dist.get_world_size()
    return out


# ----------------------------------------------------------------------------------------------- the base
class DynamicSparsity:
    """The shared machinery of every dynamic sparse training method (see the module docstring).

    Arguments:
        model: a *dense* model (or its ``DistributedDataParallel`` wrapper); changed in place.
        optimizer: the ``torch.optim`` optimizer over the model's parameters (SGD, Adam or AdamW), built before
            or after construction (the masked layer's trainable tensor is the same ``Parameter``).
        sparsity: overall target sparsity in [0, 1): the fraction of prunable weights that are zero throughout.
        distribution: the initial layer budget: ``"uniform"``, ``"erk"`` (:mod:`sparsity_lib.budgets`), or a
            ``{name: sparsity}`` dict (unnamed layers stay dense and are never updated; its overall sparsity
            must be ``sparsity``).
        update_every: :math:`\\Delta T >= 1`, steps between connectivity updates.
        end: :math:`T_{end} >= 0`: no update at or after this step (the mask is final).
        alpha: drop fraction :math:`\\alpha \\in (0, 1]` of equation (9.2).
        schedule: ``"cosine"`` (equation 9.2), ``"constant"`` (:math:`\\alpha` until ``end``) or a callable
            ``fraction(step) -> float``.
        seed: seed of this object's ``torch.Generator`` (initial mask, random growth): equal on every rank.

    Attributes: ``last_step`` (calls of :meth:`step` so far), ``ever_active`` (``{name: bool}``: every position
    that was active at some update, the in-time over-parameterization of Liu et al. {cite}`liu2021sparse`),
    ``history`` (one dict per update: step, fraction, dropped, grown, per-layer active counts).
    Every argument is checked before the model changes.

    Under ``DistributedDataParallel`` a user does nothing special: construct it with the same arguments on every
    rank (the default ``seed`` is the same everywhere), on the DDP model or its ``module``; dense gradients are
    averaged over the ranks here and random draws come from the shared generator, so all ranks hold the same mask.
    """

    needs_dense_gradient = False   # RigL (on update steps), SNFS and Top-KAST (every step)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float, *,
                 distribution: Union[str, Mapping[str, float]] = "uniform", update_every: int = 100,
                 end: int, alpha: float = 0.3, schedule: Union[str, Callable[[int], float]] = "cosine",
                 seed: int = 0):
        inner = _unwrap(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.sparsity = check_sparsity(sparsity)
        self.update_every = _check_int(update_every, "update_every", 1, "steps between mask updates")
        self.end = _check_int(end, "end", 0, "the step after which the mask no longer changes")
        self.alpha = _check_alpha(alpha)
        if not (callable(schedule) or schedule in SCHEDULES):
            raise ValueError(f"schedule must be one of {SCHEDULES} or a callable fraction(step), got {schedule!r}")
        self.schedule = schedule
        self.seed = _check_int(seed, "seed", 0, "seed of the random draws, the same on every rank")
        if is_masked(inner):
            raise ValueError("model already carries masks: dynamic sparse training starts from a dense model "
                             "(sl.remove_masks(model) first, or build a fresh one)")
        weights = prunable(inner)          # raises for a model without prunable weights
        self.budget = self._budget(inner, distribution, weights)
        params = trainable(inner)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in params.items() if id(p) not in held]
        if missing:
            raise ValueError(f"optimizer does not update {missing}: build it on this model's parameters")
        self._validate_options()
        self.model, self.optimizer, self.distribution = inner, optimizer, distribution
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_step = 0
        self.history: List[dict] = []
        masks = self._initial_masks(weights)
        dense_values = {n: p.detach().clone() for n, p in params.items()}
        apply_masks(inner, masks)
        self._after_init(dense_values)
        self.ever_active = {n: m.clone() for n, m in masks.items()}
        self.updated = [n for n in masks if 0.0 < self.budget.get(n, 0.0)]
        if self.needs_dense_gradient:
            track_dense_gradients(inner, self._track_at(1))

    # ------------------------------------------------------------------------------- construction parts
    def _budget(self, model, distribution, weights) -> Dict[str, float]:
        if isinstance(distribution, Mapping):
            budget = check_budget(distribution, weights, "distribution")
            total = sum(w.numel() for w in weights.values())
            overall = sum(budget[n] * weights[n].numel() for n in budget) / total
            if abs(overall - self.sparsity) > 1e-3:
                raise ValueError(f"distribution gives an overall sparsity of {overall:.4f}, but sparsity="
                                 f"{self.sparsity}: they must agree")
            return {n: budget.get(n, 0.0) for n in weights}
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS} or a dict {{name: sparsity}}, "
                             f"got {distribution!r}")
        return dict(_budgets.BUDGETS[distribution](model, self.sparsity))

    def _validate_options(self) -> None:
        """Method-specific argument checks (before the model changes)."""

    def _initial_masks(self, weights) -> Masks:
        """A random mask with exactly ``round(s_l * n_l)`` zeros in every layer, drawn from the shared generator."""
        masks = {}
        for name, w in weights.items():
            n = w.numel()
            keep = n - round(self.budget.get(name, 0.0) * n)
            order = torch.randperm(n, generator=self.generator)
            flat = torch.zeros(n, dtype=torch.bool)
            flat[order[:keep]] = True
            masks[name] = flat.reshape(w.shape).to(w.device)
        return masks

    def _after_init(self, dense_values: Masks) -> None:
        """Hook for methods that keep state about the dense initialization (DeepR's signs, Top-KAST)."""

    # ------------------------------------------------------------------------------------------- rhythm
    def fraction(self, step: int) -> float:
        """The drop fraction :math:`f(t)` of an update at ``step`` (0 at and after ``end``)."""
        if step >= self.end:
            return 0.0
        if self.schedule == "cosine":
            return cosine_fraction(step, self.alpha, self.end)
        if self.schedule == "constant":
            return self.alpha
        return float(self.schedule(step))

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end and step % self.update_every == 0

    def _track_at(self, step: int) -> bool:
        return self.is_update_step(step)

    def step(self) -> Optional[dict]:
        """Call once per training step after ``loss.backward()``; returns the update's record on update steps."""
        self.last_step += 1
        t = self.last_step
        self._every_step(t)
        record = self._update(t) if self.is_update_step(t) else None
        if self.needs_dense_gradient:
            track_dense_gradients(self.model, self._track_at(t + 1))
        return record

    def on_after_backward(self, state) -> None:
        """:func:`sparsity_lib.train.fit` callback: ``callbacks=[rigl]`` calls :meth:`step` at the right time."""
        self.step()

    def _every_step(self, t: int) -> None:
        """Work done at every step (SNFS's momentum, Top-KAST's backward set, DeepR's prior and noise)."""

    def _dense_gradients(self) -> Masks:
        """:math:`\\partial L / \\partial (W \\odot M)` at every position, averaged over the ranks under DDP."""
        return _all_reduce_mean(dense_gradients(self.model))

    def _update(self, t: int) -> dict:
        fraction = self.fraction(t)
        params = trainable(self.model)
        old = get_masks(self.model)
        new = self.new_masks(old, fraction, params)
        new = {n: new.get(n, old[n]) for n in old}
        kept_values = {n: p.detach().clone() for n, p in params.items()}
        revived = replace_masks(self.model, new, init=self.grow_init(new, old))
        dropped = {n: old[n] & ~new[n] for n in old}
        changed = self._reset_positions(old, new, revived, dropped)
        reset_optimizer_state(self.optimizer, self.model, changed)
        self._after_update(old, new, kept_values)
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is not None:
                    p.grad[changed[n]] = 0
        for n in new:
            self.ever_active[n] |= new[n]
        record = {"step": t, "fraction": fraction,
                  "dropped": sum(int(v.sum()) for v in dropped.values()),
                  "grown": sum(int(v.sum()) for v in revived.values()),
                  "active": {n: int(m.sum()) for n, m in new.items()}}
        self.history.append(record)
        return record

    def _reset_positions(self, old, new, revived, dropped) -> Masks:
        return {n: revived[n] | dropped[n] for n in old}

    def _after_update(self, old, new, kept_values) -> None:
        """Hook after the masks were replaced (Top-KAST restores its backward set)."""

    def grow_init(self, new: Masks, old: Masks):
        """Value of grown weights: zero (RigL, and SET as re-implemented by Evci et al.)."""
        return 0.0

    def new_masks(self, masks: Masks, fraction: float, params) -> Masks:
        """Per-layer equation (9.1) with :meth:`drop_scores` and :meth:`grow_scores` and a constant count."""
        out = {}
        for name in self.updated:
            mask = masks[name]
            count = int(math.floor(fraction * int(mask.sum())))
            if count == 0:
                continue
            out[name] = drop_and_grow(mask, self.drop_scores(name, params[name], mask),
                                      self.grow_scores(name, params[name], mask), count)
        return out

    def drop_scores(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Higher = keep. Magnitude :math:`|w|` unless a method says otherwise."""
        return weight.detach().abs()

    def grow_scores(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume (the masks themselves are in the model's ``state_dict``)."""
        return {"last_step": self.last_step, "generator": self.generator.get_state(),
                "ever_active": {n: m.clone() for n, m in self.ever_active.items()},
                "history": copy.deepcopy(self.history), "extra": self._extra_state()}

    def load_state_dict(self, state: Mapping) -> None:
        missing = {"last_step", "generator", "ever_active", "history", "extra"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}: pass what state_dict() returned")
        if set(state["ever_active"]) != set(self.ever_active):
            raise ValueError(f"state is for layers {sorted(state['ever_active'])}, this model has "
                             f"{sorted(self.ever_active)}")
        self.last_step = int(state["last_step"])
        self.generator.set_state(state["generator"])
        self.ever_active = {n: m.clone() for n, m in state["ever_active"].items()}
        self.history = copy.deepcopy(state["history"])
        self._load_extra_state(state["extra"])
        if self.needs_dense_gradient:
            track_dense_gradients(self.model, self._track_at(self.last_step + 1))

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: Mapping) -> None:
        pass

    def explored(self) -> float:
        """Fraction of the prunable weights that have been active at some point (in-time over-parameterization,
        Liu et al. {cite}`liu2021sparse`); :math:`1 - s` for a static mask."""
        total = sum(m.numel() for m in self.ever_active.values())
        return sum(int(m.sum()) for m in self.ever_active.values()) / total

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sparsity={self.sparsity}, distribution={self.distribution!r}, "
                f"update_every={self.update_every}, end={self.end}, alpha={self.alpha}, step={self.last_step})")


# ------------------------------------------------------------------------------------------------ methods
class Static(DynamicSparsity):
    """The baseline: the same random initial mask, never updated (sparse training with a fixed mask, §2.4.3)."""

    def is_update_step(self, step: int) -> bool:
        return False


class SET(DynamicSparsity):
    """Sparse Evolutionary Training (Mocanu et al. {cite}`mocanu2018scalable`, survey §4.1): drop the smallest
    :math:`|w|`, grow at random. ``init="zero"`` starts grown weights at 0 (Evci et al.'s re-implementation);
    ``init="random"`` draws them like PyTorch's default init, uniform in :math:`\\pm 1/\\sqrt{\\text{fan-in}}`
    (the original paper's random values), from the shared generator."""

    def __init__(self, model, optimizer, sparsity, *, init: str = "zero", **options):
        if init not in ("zero", "random"):
            raise ValueError(f"init must be 'zero' or 'random', got {init!r}")
        self.init = init
        super().__init__(model, optimizer, sparsity, **options)

    def grow_scores(self, name, weight, mask):
        return torch.rand(mask.shape, generator=self.generator).to(mask.device)

    def grow_init(self, new, old):
        if self.init == "zero":
            return 0.0
        out = {}
        for name, m in new.items():
            fan_in = m[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            out[name] = ((torch.rand(m.shape, generator=self.generator) * 2 - 1) * bound).to(m.device)
        return out


class RigL(DynamicSparsity):
    """Rigging the Lottery (Evci et al. {cite}`evci2020rigging`, survey §4.2): drop the smallest :math:`|w|`,
    grow where the *dense* gradient :math:`|\\partial L / \\partial (W \\odot M)|` is largest. The dense gradient is
    recorded only on update steps (every :math:`\\Delta T`), which is RigL's point: the cost of a dense backward
    pass is paid once per :math:`\\Delta T` steps. Under DDP it is averaged over the ranks first."""

    needs_dense_gradient = True

    def new_masks(self, masks, fraction, params):
        self._grads = self._dense_gradients()
        try:
            return super().new_masks(masks, fraction, params)
        finally:
            self._grads = None

    def grow_scores(self, name, weight, mask):
        return self._grads[name].abs()


class DeepR(DynamicSparsity):
    """Deep Rewiring (Bellec et al. {cite}`bellec2018deep`, survey §4.1). Every connection has a fixed sign
    :math:`s_i` (that of the dense initial weight) and :math:`w_i = s_i \\theta_i` with :math:`\\theta_i \\ge 0`.
    Each step adds the prior and the noise of the paper's update to the active weights,
    :math:`\\theta \\leftarrow \\theta - \\eta\\, \\ell_1 + \\sqrt{2 \\eta T}\\, \\nu` (:math:`\\eta` the optimizer's
    current learning rate, :math:`\\nu \\sim N(0, 1)` from the shared generator); at an update every active weight
    whose sign has flipped (:math:`s_i w_i < 0`, i.e. :math:`\\theta_i < 0`) goes dormant and as many dormant
    connections are re-activated at random, at zero. The count is set by the sign flips, not by ``alpha``.
    DeepR updates every step in the paper: ``update_every=1``."""

    def __init__(self, model, optimizer, sparsity, *, l1: float = 1e-5, temperature: float = 1e-7, **options):
        for name, v in (("l1", l1), ("temperature", temperature)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.l1, self.temperature = float(l1), float(temperature)
        super().__init__(model, optimizer, sparsity, **options)

    def _after_init(self, dense_values):
        self.signs = {n: torch.where(v >= 0, 1.0, -1.0).to(v) for n, v in dense_values.items()}

    def _every_step(self, t):
        if t >= self.end or (self.l1 == 0 and self.temperature == 0):
            return
        lr = float(self.optimizer.param_groups[0]["lr"])
        masks = get_masks(self.model)
        with torch.no_grad():
            for name in self.updated:
                p = trainable(self.model)[name]
                delta = -lr * self.l1 * self.signs[name]
                if self.temperature > 0:
                    noise = torch.randn(p.shape, generator=self.generator).to(p)
                    delta = delta + math.sqrt(2 * lr * self.temperature) * noise
                p.add_(delta * masks[name])

    def new_masks(self, masks, fraction, params):
        out = {}
        for name in self.updated:
            mask, w = masks[name], params[name].detach()
            aligned = self.signs[name] * w
            flipped = mask & (aligned < 0)
            count = int(flipped.sum())
            if count:
                grow = torch.rand(mask.shape, generator=self.generator).to(mask.device)
                grow[flipped] = -math.inf        # a flipped connection goes dormant: re-activate others
                out[name] = drop_and_grow(mask, aligned, grow, count)
        return out

    def _extra_state(self):
        return {"signs": {n: s.clone() for n, s in self.signs.items()}}

    def _load_extra_state(self, extra):
        self.signs = {n: s.clone() for n, s in extra["signs"].items()}


class SNFS(DynamicSparsity):
    """Sparse Networks From Scratch (Dettmers & Zettlemoyer {cite}`dettmers2019sparse`, survey §4.2). Every step
    it smooths the dense gradient, :math:`M \\leftarrow \\beta M + (1 - \\beta) \\nabla L` (all positions). At an
    update each layer drops :math:`\\lfloor f(t)\\, a_l \\rfloor` weights by magnitude; the total :math:`K` is
    regrown across layers in proportion to the mean :math:`|M|` over each layer's active weights (*momentum
    redistribution*; :func:`apportion`, so the total is exact), within a layer where :math:`|M|` is largest."""

    needs_dense_gradient = True

    def __init__(self, model, optimizer, sparsity, *, beta: float = 0.9, **options):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1) (the smoothing of the gradient momentum), got {beta!r}")
        self.beta = float(beta)
        self.momentum: Masks = {}
        super().__init__(model, optimizer, sparsity, **options)

    def _track_at(self, step):
        return step < self.end

    def _every_step(self, t):
        if t >= self.end:
            return
        grads = self._dense_gradients()
        for name in self.updated:
            g = grads[name]
            m = self.momentum.get(name)
            self.momentum[name] = (1 - self.beta) * g if m is None else self.beta * m + (1 - self.beta) * g

    def layer_shares(self, masks: Masks) -> Dict[str, float]:
        """Mean :math:`|M|` over the active weights of each layer (the redistribution weights)."""
        return {n: float(self.momentum[n].abs()[masks[n]].mean()) if masks[n].any() else 0.0 for n in self.updated}

    def new_masks(self, masks, fraction, params):
        drops = {n: int(math.floor(fraction * int(masks[n].sum()))) for n in self.updated}
        total = sum(drops.values())
        if total == 0:
            return {}
        capacity = {n: masks[n].numel() - int(masks[n].sum()) + drops[n] for n in self.updated}
        grows = apportion(total, self.layer_shares(masks), capacity)
        return {n: drop_then_grow(masks[n], params[n].detach().abs(), self.momentum[n].abs(), drops[n], grows[n])
                for n in self.updated}

    def _extra_state(self):
        return {"momentum": {n: m.clone() for n, m in self.momentum.items()}}

    def _load_extra_state(self, extra):
        self.momentum = {n: m.clone() for n, m in extra["momentum"].items()}


class DSR(DynamicSparsity):
    """Dynamic Sparse Reparameterization (Mostafa & Wang {cite}`mostafa2019parameter`, survey §4.1). An adaptive
    *global* threshold :math:`H`: at an update every active weight with :math:`|w| < H` is dropped (every layer
    keeps at least its largest weight), and :math:`H` is doubled if fewer than :math:`(1 - \\delta) N_p` were
    dropped, halved if more than :math:`(1 + \\delta) N_p`, with :math:`N_p = \\lfloor f(t) \\cdot \\text{active}
    \\rfloor`. The :math:`K` dropped weights are regrown at random, spread over the layers in proportion to
    their surviving weights (:func:`apportion`: the total is exact). :math:`H` starts at the :math:`N_p`-th
    smallest active magnitude of the first update."""

    def __init__(self, model, optimizer, sparsity, *, tolerance: float = 0.1, **options):
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1) (delta, the slack around N_p), got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.threshold: Optional[float] = None
        super().__init__(model, optimizer, sparsity, **options)

    def new_masks(self, masks, fraction, params):
        active = {n: int(masks[n].sum()) for n in self.updated}
        target = int(math.floor(fraction * sum(active.values())))
        if target == 0:
            return {}
        mags = {n: params[n].detach().abs() for n in self.updated}
        if self.threshold is None:
            values = torch.cat([mags[n][masks[n]] for n in self.updated])
            self.threshold = float(torch.sort(values).values[min(target, len(values) - 1)])
        drops = {n: min(int((masks[n] & (mags[n] < self.threshold)).sum()), max(active[n] - 1, 0))
                 for n in self.updated}
        total = sum(drops.values())
        if total < (1 - self.tolerance) * target:
            self.threshold *= 2.0
        elif total > (1 + self.tolerance) * target:
            self.threshold /= 2.0
        if total == 0:
            return {}
        survivors = {n: float(active[n] - drops[n]) for n in self.updated}
        capacity = {n: masks[n].numel() - active[n] + drops[n] for n in self.updated}
        grows = apportion(total, survivors, capacity)
        return {n: drop_then_grow(masks[n], mags[n], torch.rand(masks[n].shape, generator=self.generator)
                                  .to(masks[n].device), drops[n], grows[n]) for n in self.updated}

    def _extra_state(self):
        return {"threshold": self.threshold}

    def _load_extra_state(self, extra):
        self.threshold = extra["threshold"]


class TopKAST(DynamicSparsity):
    """Top-KAST (Jayakumar et al. {cite}`jayakumar2020top`, survey §4.2). The parameters :math:`\\theta` are kept
    dense; the forward pass uses the set :math:`A` = top-:math:`D` of :math:`|\\theta|` per layer (the mask), the
    backward pass a larger set :math:`B \\supseteq A` = top-:math:`(D + M)`, whose weights outside :math:`A` get
    the dense gradient (they learn without being used) and, with ``l2``, Top-KAST's penalty
    :math:`\\ell_2 (\\|\\theta_A\\|^2 + \\|\\theta_{B \\setminus A}\\|^2 / D)` pushing them down until they earn a place.
    At an update both sets are recomputed by magnitude: equation (9.1) with :math:`|\\theta|` as both scores.
    ``backward_sparsity`` (< ``sparsity``; default: twice the forward density, capped at dense) sizes :math:`B`.
    The initial :math:`A` is the top-:math:`D` of :math:`|\\theta_0|` (the paper), not a random mask. Stored
    values outside :math:`A` are :math:`\\theta` (not zero); the weights the layer *uses* are zero there. The
    optimizer state is reset only for weights entering :math:`B` from outside (the others trained all along).
    The optimizer's own ``weight_decay`` acts on every stored value, outside :math:`B` too: use ``l2`` instead."""

    needs_dense_gradient = True

    def __init__(self, model, optimizer, sparsity, *, backward_sparsity: Optional[float] = None,
                 l2: float = 0.0, **options):
        self.backward_sparsity = None if backward_sparsity is None else check_sparsity(backward_sparsity,
                                                                                       "backward_sparsity")
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
            raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
        self.l2 = float(l2)
        super().__init__(model, optimizer, sparsity, **options)

    def _validate_options(self):
        if self.backward_sparsity is not None and self.backward_sparsity >= self.sparsity:
            raise ValueError(f"backward_sparsity ({self.backward_sparsity}) must be below sparsity "
                             f"({self.sparsity}): the backward set contains the forward set")

    def _backward_keep(self, name, numel) -> int:
        density = 1 - self.budget.get(name, 0.0)
        if self.backward_sparsity is None:
            factor = 2.0
        else:
            factor = (1 - self.backward_sparsity) / (1 - self.sparsity)
        return min(numel, int(round(density * factor * numel)))

    def _initial_masks(self, weights):
        masks = {}
        for name, w in weights.items():
            keep = w.numel() - round(self.budget.get(name, 0.0) * w.numel())
            masks[name] = _keep_top(torch.ones_like(w, dtype=torch.bool), w.detach().abs(), keep)
        return masks

    def _after_init(self, dense_values):
        params = trainable(self.model)
        masks = get_masks(self.model)
        self.backward = {}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(dense_values[n])     # theta stays dense; the mask decides what the layer uses
                self.backward[n] = _keep_top(torch.ones_like(masks[n]), p.abs(), self._backward_keep(n, p.numel())) \
                    | masks[n]

    def _track_at(self, step):
        return step < self.end

    def _every_step(self, t):
        if t >= self.end:
            return
        grads = self._dense_gradients()
        masks = get_masks(self.model)
        density = {n: 1 - self.budget.get(n, 0.0) for n in masks}
        with torch.no_grad():
            for name, p in trainable(self.model).items():
                if name not in self.updated or p.grad is None:
                    continue
                extra = self.backward[name] & ~masks[name]
                p.grad[extra] += grads[name][extra]
                if self.l2:
                    p.grad[masks[name]] += self.l2 * p[masks[name]]
                    p.grad[extra] += self.l2 / density[name] * p[extra]

    def new_masks(self, masks, fraction, params):
        out = {}
        for name in self.updated:
            mask, score = masks[name], params[name].detach().abs()
            keep = int(mask.sum())
            top = _keep_top(torch.ones_like(mask), score, keep)
            count = int((mask & ~top).sum())
            out[name] = drop_and_grow(mask, score, score, count) if count else mask
        self._old_backward = self.backward
        self.backward = {n: _keep_top(torch.ones_like(masks[n]), params[n].detach().abs(),
                                      self._backward_keep(n, masks[n].numel())) | out.get(n, masks[n])
                         for n in masks}
        return out

    def _reset_positions(self, old, new, revived, dropped):
        return {n: self.backward[n] & ~self._old_backward[n] for n in old}

    def _after_update(self, old, new, kept_values):
        params = trainable(self.model)
        with torch.no_grad():
            for n, p in params.items():
                p[~new[n]] = kept_values[n][~new[n]]     # replace_masks zeroed the dropped: theta stays dense

    def grow_init(self, new, old):
        return {n: p.detach().clone() for n, p in trainable(self.model).items() if n in new}

    def fraction(self, step):
        return 1.0 if step < self.end else 0.0     # the count comes from the top-k, not from alpha

    def _extra_state(self):
        return {"backward": {n: m.clone() for n, m in self.backward.items()}}

    def _load_extra_state(self, extra):
        self.backward = {n: m.clone() for n, m in extra["backward"].items()}


#: The methods by short name (``sl.growth.METHODS["rigl"]`` is :class:`RigL`), as :func:`sparsity_lib.growth_runs.train_sparse` takes them.
METHODS = {"static": Static, "set": SET, "rigl": RigL, "deepr": DeepR, "snfs": SNFS, "dsr": DSR, "topkast": TopKAST}


__all__ = ["DynamicSparsity", "Static", "SET", "RigL", "DeepR", "SNFS", "DSR", "TopKAST", "METHODS", "cosine_fraction",
           "apportion", "drop_then_grow", "DISTRIBUTIONS", "SCHEDULES"]
