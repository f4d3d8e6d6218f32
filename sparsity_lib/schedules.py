"""Sparsity schedules: how much to prune at each step of training (survey §2.4, Chapter 02).

The gradual schedule of Zhu & Gupta {cite}`zhu2017prune` raises the sparsity from ``initial`` to ``final``
between steps ``begin`` and ``end`` along a cubic (in general polynomial) curve, pruning fast while many
redundant weights remain and slowly near the end:

.. math::  s_t = s_f + (s_i - s_f) \\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^{p}, \\qquad t_0 \\le t \\le t_1,

with ``s_t = s_i`` before ``t_0`` and ``s_t = s_f`` after ``t_1``. With ``p = 3`` it equals the sparsity levels
of ``torch.ao.pruning``'s ``CubicSL`` (``t_1 = t_0 + n * dt``), which the tests check.

Besides the pure function :func:`polynomial`, this module holds the *schedules as objects* that change the
masks of a model while it trains (survey §2.4.1, §2.4.2 and the general schedule of §2.4.6). Each is driven
like an optimizer or a learning-rate scheduler: call ``step()`` once after every optimizer step, or hand it to
:func:`sparsity_lib.train.fit` as a callback (its ``on_step_end`` calls ``step()``)::

    pruner = sl.schedules.GradualPruner(model, 0.95, begin=100, end=1000, frequency=50)
    for inputs, targets in batches:
        ...; optimizer.step()
        pruner.step()

* :class:`OneShot`: prune once at step ``at`` (train, prune, fine-tune; ``at=0`` prunes at initialization);
* :class:`IterativePruner`: Han et al.'s prune-retrain rounds {cite}`han2015learning`, a fixed fraction of the
  surviving weights removed in each round;
* :class:`GradualPruner`: Zhu & Gupta's polynomial schedule {cite}`zhu2017prune`;
* :class:`IHT` and :class:`DSD`: dense and sparse phases in alternation, iterative hard thresholding
  (Jin et al. {cite}`jin2016training`) and dense-sparse-dense training (Han et al. {cite}`han2017dsd`).

They all count optimizer steps themselves (``last_step``, 0 before the first ``step()``), prune through
:func:`sparsity_lib.prune` (so any registered scoring method, scope or structure works, and pruning is
cumulative: a pruned weight never returns, except when a dense phase of IHT/DSD removes the masks on purpose),
and save and restore their state with ``state_dict()`` / ``load_state_dict()``. ``level(t)`` gives the
sparsity a schedule holds after ``t`` steps from a dense start, so a schedule can be plotted without training.
"""

from __future__ import annotations

import abc
import math
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from .catalogue import table as _table
from . import scores as _scores
from .masks import apply_masks, get_masks, is_masked, remove_masks
from .select import check_sparsity

#: What a schedule does at a step where it removes the masks (the start of a dense phase of IHT/DSD).
DENSE = "dense"


def polynomial(step: float, initial: float, final: float, begin: float, end: float, power: float = 3) -> float:
    """Target sparsity at ``step`` under the Zhu & Gupta polynomial schedule (see the module docstring)."""
    initial = check_sparsity(initial, "initial")
    final = check_sparsity(final, "final")
    if initial > final:
        raise ValueError(f"initial ({initial}) must be at most final ({final})")
    if not end > begin:
        raise ValueError(f"end ({end}) must be greater than begin ({begin})")
    if not (isinstance(power, (int, float)) and power > 0 and math.isfinite(power)):
        raise ValueError(f"power must be a positive number, got {power!r}")
    if step <= begin:
        return initial
    if step >= end:
        return final
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** power


# ----------------------------------------------------------------------------------------------- validation
def _check_step(value, name: str, minimum: int = 0, what: str = "a count of optimizer steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}), got {value!r}")
    return int(value)


def _check_gradual(final, begin, end, frequency, initial, power):
    final = check_sparsity(final, "final_sparsity")
    initial = check_sparsity(initial, "initial")
    begin = _check_step(begin, "begin")
    end = _check_step(end, "end")
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"frequency must be an integer >= 1 (prune every `frequency` steps), got {frequency!r}")
    if not end > begin:
        raise ValueError(f"end ({end}) must be greater than begin ({begin})")
    if initial > final:
        raise ValueError(f"initial ({initial}) must be at most final_sparsity ({final})")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (power > 0 and math.isfinite(power)):
        raise ValueError(f"power must be a positive number, got {power!r}")
    return final, begin, end, int(frequency), initial, float(power)


def gradual(step: int, final: float, begin: int, end: int, frequency: int, initial: float = 0.0,
            power: float = 3) -> float:
    """Sparsity a :class:`GradualPruner` holds after ``step`` optimizer steps, starting from a dense model.

    The pruner acts at the *pruning steps* ``t_k = begin + k * frequency <= end`` and at ``end``; in between it
    holds the level of the last pruning step:

    .. math::  s(t) = \\begin{cases} 0 & t < t_0 \\\\ \\mathrm{polynomial}(t_k) & t_k \\le t < t_{k+1} \\\\
               s_f & t \\ge t_1 \\end{cases}

    (Zhu & Gupta {cite}`zhu2017prune`, their equation (1) with :math:`n \\Delta t = t_1 - t_0`; survey §2.4.2).
    Defined in Chapter 02.
    """
    final, begin, end, frequency, initial, power = _check_gradual(final, begin, end, frequency, initial, power)
    if step < begin:
        return 0.0
    if step >= end:
        return final
    last = begin + ((step - begin) // frequency) * frequency
    return polynomial(last, initial, final, begin, end, power)


def pruning_steps(begin: int, end: int, frequency: int) -> List[int]:
    """The steps at which a :class:`GradualPruner` prunes: ``begin, begin + frequency, ...`` up to ``end``, and
    ``end`` itself (so the final sparsity is reached at ``end`` even when ``frequency`` does not divide
    ``end - begin``)."""
    _check_gradual(0.5, begin, end, frequency, 0.0, 3)
    steps = list(range(begin, end + 1, frequency))
    if steps[-1] != end:
        steps.append(end)
    return steps


def _check_method_and_scope(model: nn.Module, method: str, scope, final: float):
    """Validate ``method`` and ``scope`` up front (before any step prunes), as :func:`sparsity_lib.prune` would."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _scores.get_method(method)
    names = list(get_masks(model))  # raises for a model without prunable weights
    from .pruning import _check_scope
    _check_scope(scope, names, final)


# ------------------------------------------------------------------------------------------------ the base
class ScheduledPruner(abc.ABC):
    """Base of the schedules of this module: a step counter, pruning through ``sl.prune``, callback hooks.

    A subclass defines :meth:`action` (what to do after ``t`` optimizer steps: ``None``, a sparsity to prune
    to, or :data:`DENSE` to remove the masks) and :meth:`level` (the sparsity held after ``t`` steps from a
    dense start). Constructing a schedule applies its action for step 0, like torch's LR schedulers take
    their first step in the constructor: a schedule that prunes at step 0 prunes at initialization.

    Attributes:
        model: the model it prunes (in place).
        last_step: optimizer steps seen (0 before the first ``step()``).
        events: ``[(step, sparsity or "dense"), ...]`` in the order they happened.
    """

    def __init__(self, model: nn.Module, method: str = "magnitude", scope="global", final: float = 0.0,
                 **prune_options):
        _check_method_and_scope(model, method, scope, final)
        self.model = model
        self.method = method
        self.scope = scope
        self.final_sparsity = final
        self.prune_options = prune_options
        self.last_step = 0
        self.events: list = []

    # -------------------------------------------------------------------------------------- to override
    @abc.abstractmethod
    def action(self, step: int):
        """``None`` (nothing), a sparsity in [0, 1) to prune to, or :data:`DENSE`, after ``step`` steps."""

    @abc.abstractmethod
    def level(self, step: int) -> float:
        """Sparsity the schedule holds after ``step`` optimizer steps, starting from a dense model."""

    # --------------------------------------------------------------------------------------------- stepping
    def _scope_at(self, sparsity: float):
        """Under a ``{name: sparsity}`` budget, scale every layer's final sparsity by ``sparsity / final``."""
        if isinstance(self.scope, Mapping):
            ratio = sparsity / self.final_sparsity if self.final_sparsity > 0 else 0.0
            return {name: s * ratio for name, s in self.scope.items()}
        return self.scope

    def _apply(self, step: int) -> None:
        todo = self.action(step)
        if todo is None:
            return
        if todo == DENSE:
            remove_masks(self.model)
        elif todo > 0:
            from .pruning import prune
            prune(self.model, todo, method=self.method, scope=self._scope_at(todo), **self.prune_options)
        else:
            return
        self.events.append((step, todo))

    def _start(self) -> None:
        """Apply the action of step 0 (called at the end of each subclass constructor)."""
        self._apply(0)

    def step(self) -> float:
        """Advance by one optimizer step; prune (or go dense) if the schedule says so. Returns ``level``."""
        self.last_step += 1
        self._apply(self.last_step)
        return self.level(self.last_step)

    # ---------------------------------------------------------------------------- training-loop callbacks
    def on_step_end(self, state) -> None:
        """Callback of :func:`sparsity_lib.train.fit`: one ``step()`` after every optimizer step."""
        self.step()

    # ------------------------------------------------------------------------------------------ save/load
    def state_dict(self) -> Dict:
        """Everything needed to resume: the step count, the events so far and the model's current masks.

        Save it next to the model's and the optimizer's ``state_dict``. To resume, build the model, the
        optimizer and the schedule as at the start (in that order, so the optimizer lists the parameters in the
        same order), then call :meth:`load_state_dict` (it re-attaches the masks, so the model then has the
        ``state_dict`` keys of a masked model), ``model.load_state_dict`` and ``optimizer.load_state_dict``.
        """
        return {"last_step": self.last_step, "events": list(self.events), "masked": is_masked(self.model),
                "masks": {n: m.clone() for n, m in get_masks(self.model).items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the step count and events, and put the saved masks on the model (or none, if it was dense)."""
        missing = {"last_step", "events", "masked", "masks"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}: pass what state_dict() returned")
        last_step = _check_step(state["last_step"], "state['last_step']")
        if state["masked"]:
            apply_masks(self.model, state["masks"])  # validates names, shapes and dtypes first
        else:
            remove_masks(self.model)
        self.last_step = last_step
        self.events = list(state["events"])

    def curve(self, total_steps: int) -> List[float]:
        """``[level(0), level(1), ..., level(total_steps)]``: the schedule to plot."""
        total_steps = _check_step(total_steps, "total_steps")
        return [self.level(t) for t in range(total_steps + 1)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, scope={self.scope!r}, last_step={self.last_step})"


# ------------------------------------------------------------------------------------------ the schedules
class GradualPruner(ScheduledPruner):
    """Zhu & Gupta's gradual pruning {cite}`zhu2017prune` (survey §2.4.2), driven like an optimizer.

    At every ``frequency``-th step within ``[begin, end]`` (and at ``end``) it prunes the model to

    .. math::  s_t = s_f + (s_i - s_f) \\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^{p}

    (:func:`polynomial` with ``t_0 = begin``, ``t_1 = end``, ``p = power``), and holds it until the next pruning
    step; after ``end`` it holds ``final_sparsity``. The model is left as it is before ``begin``.

    Arguments:
        model: the model to prune in place.
        final_sparsity: ``s_f`` in [0, 1).
        begin, end: first and last pruning step, counted in optimizer steps (``0 <= begin < end``).
        frequency: prune every ``frequency`` steps (``Delta t``, an integer >= 1).
        initial: ``s_i`` in [0, final_sparsity], the level reached at ``begin``.
        power: ``p > 0`` (3 is Zhu & Gupta's cubic; 1 is linear).
        method, scope, prune_options: passed to :func:`sparsity_lib.prune` at every pruning step (any
            registered method: ``"magnitude"``, ``"random"``, ``"snip"`` with ``data=...``, ...). A
            ``{name: sparsity}`` scope is the *final* budget; at level ``s_t`` each layer gets its budget times
            ``s_t / s_f``.

    Effect on the model: from ``begin`` on it carries masks (:func:`sparsity_lib.apply_masks`); pruning is
    cumulative, so a pruned weight never returns. Every argument is checked before anything changes.

    Example::

        >>> pruner = GradualPruner(model, 0.9, begin=0, end=200, frequency=10)
        >>> sl.train.fit(model, task, epochs=10, callbacks=[pruner])

    Defined in Chapter 02.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, begin: int, end: int, frequency: int,
                 initial: float = 0.0, power: float = 3, method: str = "magnitude", scope="global",
                 **prune_options):
        (self.final_sparsity, self.begin, self.end, self.frequency, self.initial,
         self.power) = _check_gradual(final_sparsity, begin, end, frequency, initial, power)
        super().__init__(model, method, scope, self.final_sparsity, **prune_options)
        self._start()

    def action(self, step: int):
        if step < self.begin:
            return None
        if step >= self.end:
            # the first step at or after `end` reaches the final level; afterwards it holds it
            done = any(t >= self.end for t, _ in self.events)
            return None if done else self.final_sparsity
        if (step - self.begin) % self.frequency == 0:
            return polynomial(step, self.initial, self.final_sparsity, self.begin, self.end, self.power)
        return None

    def level(self, step: int) -> float:
        return gradual(step, self.final_sparsity, self.begin, self.end, self.frequency, self.initial, self.power)

    def target(self, step: Optional[int] = None) -> float:
        """The Zhu & Gupta target ``polynomial(step)`` (default: at ``last_step``), before quantization."""
        step = self.last_step if step is None else step
        return polynomial(step, self.initial, self.final_sparsity, self.begin, self.end, self.power)


class OneShot(ScheduledPruner):
    """Prune once, to ``sparsity``, after ``at`` optimizer steps; then training goes on sparse (fine-tuning).

    The *train, then sparsify* schedule of survey §2.4.1 when ``at`` is the end of dense training
    (Janowsky {cite}`janowsky1989pruning`; Han et al. {cite}`han2015learning` with a single round), and pruning
    at initialization when ``at = 0`` (constructing it then prunes right away). ``level(t)`` is 0 before ``at``
    and ``sparsity`` from ``at`` on. Defined in Chapter 02.
    """

    def __init__(self, model: nn.Module, sparsity: float, at: int, method: str = "magnitude", scope="global",
                 **prune_options):
        self.sparsity = check_sparsity(sparsity)
        self.at = _check_step(at, "at")
        super().__init__(model, method, scope, self.sparsity, **prune_options)
        self._start()

    def action(self, step: int):
        return self.sparsity if step == self.at else None

    def level(self, step: int) -> float:
        return self.sparsity if step >= self.at else 0.0


class IterativePruner(ScheduledPruner):
    """Iterative prune-retrain (Han et al. {cite}`han2015learning`; survey §2.4.2, step 6 of §2.4.6).

    ``rounds`` pruning rounds at steps ``begin, begin + interval, ..., begin + (rounds - 1) * interval``, each
    removing the same fraction ``rate`` of the weights that survive, with retraining in between:

    .. math::  s_k = 1 - (1 - r)^{k}, \\qquad r = 1 - (1 - s_f)^{1/R}, \\qquad k = 1, \\dots, R,

    so that round ``R`` reaches ``final_sparsity`` ``s_f``. Defined in Chapter 02.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, rounds: int, begin: int, interval: int,
                 method: str = "magnitude", scope="global", **prune_options):
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.rounds = _check_step(rounds, "rounds", minimum=1, what="the number of pruning rounds")
        self.begin = _check_step(begin, "begin")
        self.interval = _check_step(interval, "interval", minimum=1)
        #: fraction of the surviving weights removed in every round
        self.rate = 1.0 - (1.0 - self.final_sparsity) ** (1.0 / self.rounds)
        super().__init__(model, method, scope, self.final_sparsity, **prune_options)
        self._start()

    def round_level(self, k: int) -> float:
        """Sparsity after round ``k`` (``k = 0`` is dense, ``k = rounds`` is ``final_sparsity``)."""
        if k >= self.rounds:
            return self.final_sparsity
        return 1.0 - (1.0 - self.rate) ** k

    @property
    def steps(self) -> List[int]:
        """The steps of the pruning rounds."""
        return [self.begin + k * self.interval for k in range(self.rounds)]

    def action(self, step: int):
        if step < self.begin or (step - self.begin) % self.interval:
            return None
        k = (step - self.begin) // self.interval + 1
        return self.round_level(k) if k <= self.rounds else None

    def level(self, step: int) -> float:
        if step < self.begin:
            return 0.0
        return self.round_level(min((step - self.begin) // self.interval + 1, self.rounds))


class IHT(ScheduledPruner):
    """Iterative hard thresholding: sparse and dense phases in alternation (Jin et al. {cite}`jin2016training`;
    survey §2.4.2).

    From step ``begin`` on, ``cycles`` times: prune all but the top-k weights (``sparsity``; a fresh selection
    on the current weights) and train sparse for ``sparse_steps``; then remove the masks (pruned weights come
    back at zero, :func:`sparsity_lib.remove_masks`) and train dense for ``dense_steps``. With
    ``end_sparse=True`` the last cycle stops after its sparse phase, so training ends with a sparse model.
    The sparse phase is the hard-thresholding projection onto :math:`\\{w : \\|w\\|_0 \\le k\\}` (an
    :math:`L_0` constraint, survey §3.6); the dense phase relaxes it. Defined in Chapter 02.
    """

    def __init__(self, model: nn.Module, sparsity: float, begin: int, sparse_steps: int, dense_steps: int,
                 cycles: int = 1, end_sparse: bool = False, method: str = "magnitude", scope="global",
                 **prune_options):
        self.sparsity = check_sparsity(sparsity)
        self.begin = _check_step(begin, "begin")
        self.sparse_steps = _check_step(sparse_steps, "sparse_steps", minimum=1)
        self.dense_steps = _check_step(dense_steps, "dense_steps", minimum=1)
        self.cycles = _check_step(cycles, "cycles", minimum=1, what="the number of sparse-dense cycles")
        if not isinstance(end_sparse, bool):
            raise TypeError(f"end_sparse must be True or False, got {end_sparse!r}")
        self.end_sparse = end_sparse
        super().__init__(model, method, scope, self.sparsity, **prune_options)
        self._start()

    @property
    def period(self) -> int:
        return self.sparse_steps + self.dense_steps

    def _phase(self, step: int):
        """(cycle, offset within the cycle) for a step at or after ``begin``."""
        return divmod(step - self.begin, self.period)

    def action(self, step: int):
        if step < self.begin:
            return None
        cycle, offset = self._phase(step)
        if cycle >= self.cycles:
            return None
        if offset == 0:
            return self.sparsity
        if offset == self.sparse_steps and not (self.end_sparse and cycle == self.cycles - 1):
            return DENSE
        return None

    def level(self, step: int) -> float:
        if step < self.begin:
            return 0.0
        cycle, offset = self._phase(step)
        if cycle >= self.cycles:
            return self.sparsity if self.end_sparse else 0.0
        return self.sparsity if offset < self.sparse_steps else 0.0

    def _apply(self, step: int) -> None:
        if self.action(step) == self.sparsity and self.sparsity > 0:
            remove_masks(self.model)  # a fresh top-k on the current weights (none is masked in a dense phase)
        super()._apply(step)


class DSD(IHT):
    """Dense-sparse-dense training (Han et al. {cite}`han2017dsd`; survey §2.4.2): train dense until
    ``sparse_at``, prune to ``sparsity`` and retrain sparse until ``dense_at``, then remove the masks and train
    dense to the end. It is :class:`IHT` with one cycle. Defined in Chapter 02."""

    def __init__(self, model: nn.Module, sparsity: float, sparse_at: int, dense_at: int,
                 method: str = "magnitude", scope="global", **prune_options):
        sparse_at = _check_step(sparse_at, "sparse_at")
        dense_at = _check_step(dense_at, "dense_at")
        if not dense_at > sparse_at:
            raise ValueError(f"dense_at ({dense_at}) must be greater than sparse_at ({sparse_at})")
        # one cycle; the dense phase lasts to the end of training (its length only matters for level())
        super().__init__(model, sparsity, begin=sparse_at, sparse_steps=dense_at - sparse_at,
                         dense_steps=1, cycles=1, method=method, scope=scope, **prune_options)

    def level(self, step: int) -> float:
        return self.sparsity if self.begin <= step < self.begin + self.sparse_steps else 0.0


#: ``{name: schedule class}``, read from the catalogue (``sl.catalogue("schedule")``): "one-shot", "iterative",
#: "gradual", "iht", "dsd"
SCHEDULES = _table("schedule")

__all__ = ["polynomial", "gradual", "pruning_steps", "ScheduledPruner", "GradualPruner", "OneShot",
           "IterativePruner", "IHT", "DSD", "DENSE", "SCHEDULES"]
