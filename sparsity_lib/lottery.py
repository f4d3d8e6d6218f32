"""Lottery tickets and rewinding: iterative magnitude pruning (IMP), weight and learning-rate rewinding, the
controls that test a ticket, and supermasks (survey §8.3, §2.4.6 step 7 "reset / rewind"). Defined in Chapter 10.

The lottery ticket hypothesis of Frankle & Carbin {cite}`frankle2019lottery`: a dense network
:math:`f(x; \\theta_0)` contains a subnetwork :math:`f(x; m \\odot \\theta_0)` that, trained in isolation from
the *same* initial values, reaches the accuracy of the dense network in as many iterations. IMP finds the mask
:math:`m` by alternating train -> prune a fraction ``rate`` of the remaining weights -> rewind the survivors:

.. math::

    \\theta_0 \\xrightarrow{\\text{train}} \\theta_T \\xrightarrow{\\text{prune}} m_1
    \\xrightarrow{\\text{rewind}} m_1 \\odot \\theta_0 \\xrightarrow{\\text{train}} \\dots,
    \\qquad s_r = 1 - (1 - \\text{rate})^r .

The pieces:

* :func:`capture` and :class:`Checkpoints` record :math:`\\theta_0` or :math:`\\theta_k` (the weights after
  ``k`` steps, Frankle et al. {cite}`frankle2020linear`) during :func:`sparsity_lib.train.fit`;
* :func:`rewind` resets the surviving weights to a captured state and keeps the masks;
* :func:`imp` is the loop; ``rewind_state`` chooses between tickets (:math:`\\theta_0`), rewinding
  (:math:`\\theta_k`) and fine-tuning / learning-rate rewinding (``None``);
* :func:`retrain` and :func:`retrain_schedule` express fine-tuning, weight rewinding and learning-rate
  rewinding (Renda et al. {cite}`renda2020comparing`) as learning-rate schedules of the same training loop;
* the controls: :func:`reinitialize` (same mask, new random values) and :func:`shuffle_masks` (random
  pruning with the same per-layer counts; :func:`mask_budget` gives those counts as a ``{name: sparsity}``
  budget for ``sl.prune``);
* :func:`edge_popup` (Ramanujan et al. {cite}`ramanujan2020whats`): a supermask (:class:`TopKSupermask`, a
  mask by the library's mask protocol) learned over frozen random weights; it trains, so it is a procedure
  (``sl.experiments.run("edge_popup", ...)``), not a pruning criterion of ``sl.prune``; :func:`signed_constant_init` sets the signed Kaiming constant weights of that paper
  (Zhou et al. {cite}`zhou2019deconstructing` found that the signs of the initial weights carry most of a
  ticket).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .data import Task
from .masks import _attr, _check_has_prunable, _prunable_modules, get_masks, prunable, remove_masks, set_weights
from .pruning import prune
from .select import check_budget, check_sparsity, topk_mask
from .train import fit, lr_multiplier

StateDict = Mapping[str, torch.Tensor]

# "<prefix>parametrizations.<tensor>.original" -> "<prefix><tensor>"; other keys under a parametrization are the
# parametrization's own state (the mask buffers) and are not model values.
_ORIGINAL = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.original$")
_PARAM_STATE = re.compile(r"^(?:.*\.)?parametrizations\.[^.]+\.\d+\.")


# ------------------------------------------------------------------------------------------ capturing states
def capture(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A detached copy of ``model.state_dict()``: the weights to rewind to later (:math:`\\theta_0`, :math:`\\theta_k`).

    ``copy.deepcopy(model.state_dict())`` does the same; this one never shares memory with the model, so later
    training cannot change it. The keys are those of the model at capture time (dense, or masked ones).
    """
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class Checkpoints:
    """Callback for :func:`sparsity_lib.train.fit` that captures the state after given optimizer steps or epochs.

    ``Checkpoints(steps=[k])`` records :math:`\\theta_k`, the weights after ``k`` optimizer steps, that
    Frankle et al. {cite}`frankle2020linear` rewind to ("rewinding to iteration k"); ``epochs=[e]`` records the
    state after ``e`` epochs (step ``e * steps_per_epoch``), which weight rewinding of Renda et al. needs;
    step/epoch 0 is the initial state. After training, ``ckpt[k]`` (or ``ckpt.at_step(k)``) and
    ``ckpt.at_epoch(e)`` return the captured ``state_dict`` copies.

    Example::

        >>> ckpt = sl.lottery.Checkpoints(steps=[0, 20])
        >>> sl.train.fit(model, task, epochs=10, callbacks=[ckpt])
        >>> theta_0, theta_20 = ckpt[0], ckpt[20]
    """

    def __init__(self, steps: Iterable[int] = (), epochs: Iterable[int] = ()):
        self.requested_steps = sorted({_check_count(s, "steps", 0) for s in steps})
        self.requested_epochs = sorted({_check_count(e, "epochs", 0) for e in epochs})
        if not self.requested_steps and not self.requested_epochs:
            raise ValueError("Checkpoints needs at least one step or epoch to capture (steps=[k] or epochs=[e])")
        self.states: Dict[int, Dict[str, torch.Tensor]] = {}
        self.steps_per_epoch: Optional[int] = None
        self._wanted: set = set()

    def on_train_begin(self, state) -> None:
        self.steps_per_epoch = state.steps_per_epoch
        self._wanted = set(self.requested_steps) | {e * state.steps_per_epoch for e in self.requested_epochs}
        beyond = [s for s in self._wanted if s > state.total_steps]
        if beyond:
            raise ValueError(f"Checkpoints: steps {sorted(beyond)} lie beyond the {state.total_steps} steps of this "
                             "training")
        if 0 in self._wanted:
            self.states[0] = capture(state.model)

    def on_step_end(self, state) -> None:
        if state.step in self._wanted:
            self.states[state.step] = capture(state.model)

    def at_step(self, step: int) -> Dict[str, torch.Tensor]:
        if step not in self.states:
            raise KeyError(f"no state captured at step {step}; captured steps: {sorted(self.states)}")
        return self.states[step]

    __getitem__ = at_step

    def at_epoch(self, epoch: int) -> Dict[str, torch.Tensor]:
        if self.steps_per_epoch is None:
            raise KeyError("no training has run with this callback yet")
        return self.at_step(epoch * self.steps_per_epoch)


# --------------------------------------------------------------------------------------------------- rewind
def _dense_key(key: str) -> Optional[str]:
    """The key a state_dict entry has without parametrizations; ``None`` for a parametrization's own state."""
    match = _ORIGINAL.match(key)
    if match:
        return match.group("prefix") + match.group("tensor")
    if _PARAM_STATE.match(key):
        return None
    return key


def _dense_view(state: StateDict, what: str) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        dense = _dense_key(key)
        if dense is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        out[dense] = value
    return out


def _check_state(model: nn.Module, state, name: str = "state") -> Dict[str, torch.Tensor]:
    """Map ``state`` to dense keys and check it covers exactly the model's parameters and buffers, shape by shape."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    _check_has_prunable(model)
    target = _dense_view(model.state_dict(), "model.state_dict()")
    given = _dense_view(state, name)
    missing = [k for k in target if k not in given]
    unexpected = [k for k in given if k not in target]
    if missing or unexpected:
        raise ValueError(f"{name} does not match the model: missing keys {missing}, unexpected keys {unexpected} "
                         "(keys are compared by their dense names, e.g. 'fc1.weight' for "
                         "'fc1.parametrizations.weight.original')")
    for key, value in given.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}, the model's has "
                             f"{tuple(target[key].shape)}")
    return given


def rewind(model: nn.Module, state: StateDict) -> nn.Module:
    """Reset every parameter and buffer of ``model`` to its value in ``state``, keeping the current masks.

    .. math::  w \\leftarrow m \\odot w_{\\text{state}}

    Pruned weights stay exactly zero, surviving weights take their values from ``state`` (a ``state_dict``
    captured earlier with :func:`capture` or :class:`Checkpoints`: :math:`\\theta_0` for a lottery ticket,
    :math:`\\theta_k` for rewinding to iteration k). Biases and buffers are copied as they are. ``state`` may be
    dense (keys ``fc1.weight``, captured before pruning) or masked (``fc1.parametrizations.weight.original``):
    keys are matched by their dense names and the masks stored in ``state`` are ignored. A surviving weight
    that was zero in ``state`` (masked at capture time) stays zero.

    The optimizer is not part of the model: train a rewound model with a fresh optimizer (as
    :func:`sparsity_lib.train.fit` does when given an optimizer name).

    Frankle & Carbin {cite}`frankle2019lottery` (rewind to :math:`\\theta_0`); Frankle et al.
    {cite}`frankle2020linear` (rewind to :math:`\\theta_k`); survey §8.3, §2.4.6 step 7. Defined in Chapter 10.

    Raises ``ValueError`` (model unchanged) if the keys of ``state`` do not match the model's, or a shape differs.
    """
    given = _check_state(model, state)
    prunable_names = set(_prunable_modules(model))
    raw = model.state_dict()  # detached tensors that share memory with the parameters and buffers
    by_dense = {}
    for key in raw:
        dense = _dense_key(key)
        if dense is not None:
            by_dense[dense] = key
    set_weights(model, {k: v for k, v in given.items() if k in prunable_names})
    with torch.no_grad():
        for dense, value in given.items():
            if dense not in prunable_names:
                raw[by_dense[dense]].copy_(value.to(raw[by_dense[dense]]))
    return model


def reinitialize(model: nn.Module, seed: Optional[int] = None) -> nn.Module:
    """The random re-initialization control: new initial values for every parameter, keeping the masks.

    Every module with a ``reset_parameters()`` method (Linear, Conv, norms...) redraws its parameters from its
    default initializer under ``torch.manual_seed(seed)`` (the global RNG is left untouched when ``seed`` is
    given), in module order, so the new values equal those of a freshly built model with that seed (e.g.
    ``sl.models.mlp(..., seed=seed)``). Then :func:`rewind` puts them in place under the current masks.

    This is Frankle & Carbin's control "same mask, :math:`\\theta_0' \\sim \\mathcal{D}_\\theta`": it keeps the
    structure of the ticket and changes its values. It is *not* random pruning (a random mask with the same
    per-layer counts, see :func:`mask_budget`). Survey §8.3. Defined in Chapter 10.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    fresh = remove_masks(copy.deepcopy(model))
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return rewind(model, fresh.state_dict())


def mask_budget(masks: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """``{name: sparsity}`` of a set of masks: :math:`s_l = 1 - \\lVert m_l \\rVert_0 / n_l`.

    Passed as ``scope`` to :func:`sparsity_lib.prune` it reproduces the per-layer counts exactly
    (``round(s_l n_l)`` weights removed in layer l), e.g. for the random-pruning control of a ticket::

        sl.prune(fresh_model, 1 - density, method="random", scope=sl.lottery.mask_budget(ticket_masks), seed=1)
    """
    if not isinstance(masks, Mapping) or not masks:
        raise TypeError("masks must be a non-empty dict {name: bool tensor}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a torch.bool tensor")
        out[name] = 1.0 - int(mask.sum()) / mask.numel()
    return out


def shuffle_masks(masks: Mapping[str, torch.Tensor], seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Random pruning with the same per-layer counts: in every layer, keep as many weights as ``masks`` keeps,
    at positions drawn uniformly at random (a ``torch.Generator`` seeded with ``seed``; the global RNG is used
    when ``seed`` is None).

    The random-pruning control of a ticket (Frankle & Carbin {cite}`frankle2019lottery`; survey §8.3): same
    layer-wise budget :math:`\\lVert m_l \\rVert_0`, random structure, and (applied to a freshly initialized
    model) random values. Unlike ``sl.prune(..., method="random", scope=mask_budget(masks))`` it also handles a
    layer that ``masks`` removes entirely (a budget of sparsity 1). Defined in Chapter 10.
    """
    budget = mask_budget(masks)  # validates
    generator = None if seed is None else torch.Generator().manual_seed(_check_count(seed, "seed", 0))
    out = {}
    for name, mask in masks.items():
        kept = int(mask.sum())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[:kept]] = True
        out[name] = flat.reshape(mask.shape).to(mask.device)
    del budget
    return out


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of weights kept by ``masks`` over all layers, :math:`d = 1 - s`."""
    kept = sum(int(m.sum()) for m in masks.values())
    return kept / sum(m.numel() for m in masks.values())


# ------------------------------------------------------------------------------------------------------ IMP
def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_rate(rate, name: str = "rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or not 0 < rate < 1:
        raise ValueError(f"{name} must be a number in (0, 1), the fraction of the remaining weights pruned per "
                         f"round; got {rate!r}")
    return float(rate)


def per_layer_rates(model: nn.Module, rate: float, output_scale: float = 0.5) -> Dict[str, float]:
    """Per-round pruning rates as in Frankle & Carbin {cite}`frankle2019lottery`: ``rate`` for every prunable
    layer except the last, which is pruned at ``output_scale * rate`` (they prune the output layer of their
    fully connected networks at half the rate). Pass the result as ``scope`` to :func:`imp`."""
    rate = _check_rate(rate)
    if isinstance(output_scale, bool) or not isinstance(output_scale, (int, float)) or not 0 < output_scale <= 1:
        raise ValueError(f"output_scale must be a number in (0, 1], got {output_scale!r}")
    names = list(_check_has_prunable(model))
    out = {name: rate for name in names}
    out[names[-1]] = rate * output_scale
    return out


def round_target(rate: float, round_: int) -> float:
    """Sparsity after ``round_`` rounds that each prune ``rate`` of the remaining weights: :math:`1 - (1 - r)^k`."""
    return 1.0 - (1.0 - rate) ** round_


def rate_for(final_sparsity: float, rounds: int) -> float:
    """The per-round rate that reaches ``final_sparsity`` in ``rounds`` rounds: :math:`1 - (1 - s)^{1/R}`."""
    final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
    rounds = _check_count(rounds, "rounds")
    if final_sparsity == 0:
        raise ValueError("final_sparsity must be in (0, 1)")
    return 1.0 - (1.0 - final_sparsity) ** (1.0 / rounds)


_RESERVED = ("round", "sparsity", "trained_sparsity", "masks")


def imp(model: nn.Module, train_fn: Callable[[nn.Module], object], rounds: int, rate: float = 0.2,
        rewind_state: Optional[StateDict] = None, scope: Union[str, Mapping[str, float]] = "global",
        **prune_options) -> List[dict]:
    """Iterative magnitude pruning: ``rounds`` times train, prune ``rate`` of the remaining weights, rewind.

    Round :math:`r = 1 \\dots R`:

    1. ``metrics = train_fn(model)`` trains the model in place (at sparsity :math:`s_{r-1}`, :math:`s_0` = the
       model's sparsity on entry);
    2. :func:`sparsity_lib.prune` removes ``rate`` of the remaining weights: the cumulative target is
       :math:`s_r = 1 - (1 - s_0)(1 - \\text{rate})^r` of all prunable weights, :math:`1 - (1 - \\text{rate})^r`
       from a dense model (masked weights stay masked);
    3. if ``rewind_state`` is given, :func:`rewind` resets the survivors to it: :math:`\\theta_0` gives the
       lottery tickets of Frankle & Carbin {cite}`frankle2019lottery`, :math:`\\theta_k` rewinding to
       iteration k (Frankle et al. {cite}`frankle2020linear`); ``None`` continues from the trained weights,
       which is fine-tuning, or learning-rate rewinding (Renda et al. {cite}`renda2020comparing`) when
       ``train_fn`` restarts the learning-rate schedule.

    On return the model holds the round-R mask and the rewound weights (not yet trained): train it with
    ``train_fn`` to evaluate the ticket at sparsity :math:`s_R`.

    Arguments:
        model: the network, dense or already masked.
        train_fn: ``train_fn(model)`` trains in place and may return metrics (a dict is merged into the
            round's record, anything else is stored under ``"metrics"``).
        rounds: number of rounds, an integer >= 1.
        rate: fraction of the remaining weights pruned per round, in (0, 1) (0.2 in Frankle & Carbin).
        rewind_state: a ``state_dict`` to rewind to after each pruning (see above), dense or masked, whose keys
            and shapes match the model; checked before anything runs.
        scope: ``"global"`` (one ranking over all layers, target :math:`s_r`), ``"layerwise"`` (every layer at
            :math:`s_r`), or a dict ``{name: rate}`` of per-layer rates per round (layers not named use
            ``rate``; see :func:`per_layer_rates`), which prunes layer l to :math:`1 - (1 - \\text{rate}_l)^r`
            through a ``{name: sparsity}`` budget.
        prune_options: passed to :func:`sparsity_lib.prune` (``method`` — default "magnitude" —, ``exclude``,
            ``structure``, method options).

    Returns:
        One record per round: ``round``, ``trained_sparsity`` (:math:`s_{r-1}`, where ``train_fn`` trained),
        ``sparsity`` (:math:`s_r`, measured after pruning), ``masks`` (a copy of the round's masks, e.g. for
        the controls of :func:`reinitialize` and :func:`shuffle_masks`), and the metrics of ``train_fn``.

    Every argument is checked, and the pruning is tried on a copy of the model, before the first training:
    bad input raises ``ValueError``/``TypeError`` and leaves the model unchanged. Survey §8.3, §2.4.6.
    Defined in Chapter 10.
    """
    if not callable(train_fn):
        raise TypeError(f"train_fn must be a callable train_fn(model), got {type(train_fn).__name__}")
    rounds = _check_count(rounds, "rounds")
    rate = _check_rate(rate)
    if rewind_state is not None:
        _check_state(model, rewind_state, "rewind_state")
    names = list(_check_has_prunable(model))
    start = get_masks(model)
    start_sparsity = {n: 1.0 - int(m.sum()) / m.numel() for n, m in start.items()}
    if isinstance(scope, Mapping):
        rates = check_budget(scope, names, "scope", check=_check_rate)
        rates = {n: rates.get(n, rate) for n in names}
    elif scope in ("global", "layerwise"):
        rates = None
    else:
        raise ValueError(f"scope must be 'global', 'layerwise' or a {{name: rate per round}} dict, got {scope!r}")
    for key in ("sparsity", "scope"):
        if key in prune_options:
            raise TypeError(f"imp sets {key!r} of sl.prune itself; pass rate and scope to imp")
    base = 1.0 - density(start)

    def target(r):
        # the remaining weights shrink by (1 - rate) per round, from whatever the model had on entry
        overall = 1.0 - (1.0 - base) * (1.0 - rate) ** r
        if rates is None:
            return overall, scope
        budget = {n: 1.0 - (1.0 - start_sparsity[n]) * (1.0 - rates[n]) ** r for n in names}
        return overall, budget

    trial = copy.deepcopy(model)  # a dry run of the first pruning: fails early on a bad method or option
    sparsity_1, scope_1 = target(1)
    prune(trial, sparsity_1, scope=scope_1, **prune_options)
    del trial

    records = []
    for r in range(1, rounds + 1):
        trained_sparsity = 1.0 - density(get_masks(model))
        metrics = train_fn(model)
        sparsity_r, scope_r = target(r)
        masks = prune(model, sparsity_r, scope=scope_r, **prune_options)
        if rewind_state is not None:
            rewind(model, rewind_state)
        record = {"round": r, "trained_sparsity": trained_sparsity, "sparsity": 1.0 - density(masks),
                  "masks": {n: m.clone() for n, m in masks.items()}}
        if isinstance(metrics, Mapping):
            clash = [k for k in metrics if k in _RESERVED]
            if clash:
                raise ValueError(f"train_fn returned keys {clash} that imp reserves ({_RESERVED}); rename them")
            record.update(metrics)
        else:
            record["metrics"] = metrics
        records.append(record)
    return records


# ----------------------------------------------------------------------------- fine-tuning vs rewinding
RETRAIN_STRATEGIES = ("finetune", "lr_rewind", "weight_rewind")


def retrain_schedule(strategy: str, train_epochs: int, retrain_epochs: int, lr_schedule="cosine",
                     finetune_factor: float = 0.01) -> Callable[[int, int], float]:
    """The learning-rate multiplier of a retraining of ``retrain_epochs`` after a training of ``train_epochs``.

    Renda et al. {cite}`renda2020comparing` compare three ways to retrain for :math:`t` of the original
    :math:`T` epochs, with :math:`\\eta(\\cdot)` the original schedule:

    * ``"finetune"``: keep the trained weights, constant small rate :math:`\\eta_{\\text{ft}}`
      (``finetune_factor`` times the base rate; the final rate of their step schedules is about 1% of the base);
    * ``"weight_rewind"``: rewind the weights to epoch :math:`T - t` and replay :math:`\\eta(T - t \\dots T)`;
    * ``"lr_rewind"``: keep the trained weights and replay :math:`\\eta(T - t \\dots T)`.

    Returns a callable ``(step, total_steps) -> multiplier`` for ``sparsity_lib.train.fit(lr_schedule=...)``:
    with ``total_steps`` the steps of the retraining, the original run had
    ``total_steps * train_epochs / retrain_epochs`` steps and the replay starts where that many minus
    ``total_steps`` were done (same batch size assumed). Survey §8.3.2. Defined in Chapter 10.
    """
    if strategy not in RETRAIN_STRATEGIES:
        raise ValueError(f"strategy must be one of {RETRAIN_STRATEGIES}, got {strategy!r}")
    train_epochs = _check_count(train_epochs, "train_epochs")
    retrain_epochs = _check_count(retrain_epochs, "retrain_epochs")
    if retrain_epochs > train_epochs:
        raise ValueError(f"retrain_epochs ({retrain_epochs}) must be at most train_epochs ({train_epochs}): the "
                         "replayed schedule is the last retrain_epochs of the original one")
    if isinstance(finetune_factor, bool) or not isinstance(finetune_factor, (int, float)) or not finetune_factor > 0:
        raise ValueError(f"finetune_factor must be a number > 0, got {finetune_factor!r}")
    lr_multiplier(lr_schedule, 0, 1)  # validates the schedule (raises on an unknown name)
    if strategy == "finetune":
        return lambda step, total_steps: float(finetune_factor)

    def replay(step: int, total_steps: int) -> float:
        original_total = round(total_steps * train_epochs / retrain_epochs)
        return lr_multiplier(lr_schedule, original_total - total_steps + step, original_total)

    return replay


def retrain(model: nn.Module, task: Task, strategy: str, *, train_epochs: int, retrain_epochs: int,
            rewind_state: Optional[StateDict] = None, lr_schedule="cosine", finetune_factor: float = 0.01,
            **fit_options) -> List[dict]:
    """Retrain a pruned ``model`` by ``strategy`` for ``retrain_epochs``; return the history of ``fit``.

    ``"weight_rewind"`` needs ``rewind_state``, the state after ``train_epochs - retrain_epochs`` epochs of the
    original training (``Checkpoints(epochs=[...]).at_epoch(train_epochs - retrain_epochs)``), which
    :func:`rewind` puts under the current masks first. All three strategies then call the same
    :func:`sparsity_lib.train.fit` with the schedule of :func:`retrain_schedule`; ``fit_options`` (``lr``,
    ``optimizer``, ``batch_size``, ``seed``...) must be those of the original training for the comparison to be
    at an equal budget. Renda et al. {cite}`renda2020comparing`; survey §8.3.2. Defined in Chapter 10.
    """
    schedule = retrain_schedule(strategy, train_epochs, retrain_epochs, lr_schedule, finetune_factor)
    if strategy == "weight_rewind":
        if rewind_state is None:
            raise ValueError("strategy 'weight_rewind' needs rewind_state: the state after "
                             "train_epochs - retrain_epochs epochs of the original training")
        _check_state(model, rewind_state, "rewind_state")
    elif rewind_state is not None:
        raise ValueError(f"strategy {strategy!r} keeps the trained weights: rewind_state must be None")
    for key in ("epochs", "lr_schedule"):
        if key in fit_options:
            raise TypeError(f"retrain sets fit's {key!r} itself (retrain_epochs, strategy)")
    if strategy != "weight_rewind":
        return fit(model, task, epochs=retrain_epochs, lr_schedule=schedule, **fit_options)
    backup = capture(model)
    rewind(model, rewind_state)
    try:
        return fit(model, task, epochs=retrain_epochs, lr_schedule=schedule, **fit_options)
    except (TypeError, ValueError):  # fit rejected an option before training: leave the model as it was
        rewind(model, backup)
        raise


# ------------------------------------------------------------------------------------------- supermasks
def signed_constant_init(model: nn.Module, scale_fan: bool = False) -> nn.Module:
    """Set every prunable weight to :math:`\\operatorname{sign}(w)\\,\\sigma_l`, keeping masks: the "signed
    Kaiming constant" of Ramanujan et al. {cite}`ramanujan2020whats`.

    :math:`\\sigma_l = \\sqrt{2 / n_l}`, the standard deviation of Kaiming-normal initialization with fan-in
    :math:`n_l` (inputs per output unit, times the kernel size for a convolution). With ``scale_fan=True`` the
    fan-in is multiplied by the layer's current density :math:`d_l` (an option of the authors' code), which
    keeps the scale of the activations once a supermask of density :math:`d_l` is applied. The signs are the
    model's current ones (a random init gives random signs). Biases are left as they are. Defined in Chapter 10.
    """
    masks = get_masks(model)
    new = {}
    for name, weight in prunable(model).items():
        fan_in = weight[0].numel()
        d = float(masks[name].float().mean()) if scale_fan else 1.0
        sigma = math.sqrt(2.0 / max(fan_in * d, 1e-12))
        w = weight.detach()
        new[name] = torch.where(w >= 0, torch.full_like(w, sigma), torch.full_like(w, -sigma))
    set_weights(model, new)
    return model


class TopKSupermask(nn.Module):
    """Edge-popup's supermask as a weight parametrization: ``w -> w * h(|s|)``, with ``h`` the indicator of the
    ``keep`` largest :math:`|s|` of the layer among the ``alive`` positions, and a straight-through gradient

    .. math::  \\frac{\\partial L}{\\partial s} = \\frac{\\partial L}{\\partial h}
               \\operatorname{sign}(s) = \\frac{\\partial L}{\\partial \\tilde w} \\odot w \\odot
               \\operatorname{sign}(s) .

    The scores ``s`` are an ``nn.Parameter`` of the weight's shape (the only tensor edge-popup trains), ``alive``
    a bool tensor of positions that may be kept (masked ones stay out) and ``keep`` the number of weights kept
    (ties broken by ``torch.topk``). ``hard_mask()`` returns the current top-k: this makes it a mask for the
    library (the mask protocol of :mod:`sparsity_lib.masks`), so ``sl.get_masks``, ``sl.sparsity``,
    ``sl.sparsity_report`` and ``sl.remove_masks`` read it like a fixed mask. Register it with
    ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", TopKSupermask(...), unsafe=True)``.
    Ramanujan et al. {cite}`ramanujan2020whats`; survey §8.3.1. Defined in Chapter 10.
    """

    def __init__(self, scores: torch.Tensor, alive: torch.Tensor, keep: int):
        super().__init__()
        if not isinstance(alive, torch.Tensor) or alive.dtype != torch.bool or alive.shape != scores.shape:
            raise ValueError(f"alive must be a bool tensor of the scores' shape {tuple(scores.shape)}")
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= int(alive.sum()):
            raise ValueError(f"keep must be an integer in [0, {int(alive.sum())}] (the alive positions), "
                             f"got {keep!r}")
        self.scores = nn.Parameter(scores)
        self.register_buffer("alive", alive.clone())
        self.keep = keep

    def hard_mask(self) -> torch.Tensor:
        a = self.scores.detach().abs().masked_fill(~self.alive, -math.inf)
        return topk_mask(a, self.keep) & self.alive

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        a = self.scores.abs()
        hard = self.hard_mask().to(weight.dtype)
        return weight * (hard + (a - a.detach()))  # value: the 0/1 mask; gradient: straight through to |s|

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scores.shape)}, keep={self.keep}/{self.scores.numel()}"


_TopKSupermask = TopKSupermask  # the name before it became public


def _as_task(data) -> Task:
    if isinstance(data, Task):
        return data
    try:
        batches = list(data)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
    except Exception as error:  # noqa: BLE001 - turned into a clear message
        raise TypeError("data must be a sparsity_lib.data.Task or an iterable of (inputs, targets) batches") from error
    return Task(name="data", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=int(y.max()) + 1,
                description="batches given to edge_popup (evaluated on themselves)")


def edge_popup(model: nn.Module, data, sparsity: Union[float, Mapping[str, float]], *, epochs: int = 10,
               lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 64,
               lr_schedule="cosine", seed: int = 0, progress: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Edge-popup (Ramanujan et al. {cite}`ramanujan2020whats`): learn a supermask over frozen weights.

    Every prunable weight gets a score :math:`s`; the forward pass uses :math:`w \\odot h(|s|)` with
    :math:`h` the indicator of the top :math:`k_l = d_l n_l` scores of layer l, and the backward pass treats
    :math:`h` as the identity (straight-through estimator):

    .. math::  \\frac{\\partial L}{\\partial s_{ij}} = \\frac{\\partial L}{\\partial \\tilde w_{ij}}\\, w_{ij}
               \\operatorname{sign}(s_{ij}),\\qquad \\tilde w = w \\odot h(|s|).

    Only the scores are trained (SGD with momentum and weight decay on the scores, cosine schedule, through
    :func:`sparsity_lib.train.fit`); weights and biases never change. Scores start Kaiming-uniform like the
    authors' code. Weights already masked on ``model`` stay masked. ``model`` is not changed: the masks of the
    final top-k are returned: apply them with :func:`sparsity_lib.apply_masks`, or run the recipe
    ``sl.experiments.run("edge_popup", ...)``. Edge-popup trains, so it is a procedure of the catalogue, not a
    method of ``sl.prune`` (whose criteria never train a model).

    Arguments:
        data: a :class:`~sparsity_lib.data.Task` (its training split) or an iterable of ``(inputs, targets)``.
        sparsity: one sparsity for every layer, or a ``{name: sparsity}`` budget (unnamed layers keep their
            current mask and are not searched). Edge-popup keeps the top-k *per layer*; there is no global
            ranking (scores of different layers are not comparable).
        seed: seeds the score initialization and the batch order.

    Survey §8.3.1. Defined in Chapter 10.
    """
    names = list(_check_has_prunable(model))
    if isinstance(sparsity, Mapping):
        budget = check_budget(sparsity, names, "sparsity")
    else:
        s = check_sparsity(sparsity)
        budget = {n: s for n in names}
    _check_count(epochs, "epochs")
    seed = _check_count(seed, "seed", 0)
    task = _as_task(data)
    current = get_masks(model)

    net = remove_masks(copy.deepcopy(model))
    for p in net.parameters():
        p.requires_grad_(False)
    modules = _prunable_modules(net)
    generator = torch.Generator().manual_seed(seed)
    score_params = []
    for name in names:
        if name not in budget:
            continue
        weight = getattr(modules[name], _attr(name))
        fan_in = weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear's weights
        scores = (torch.rand(weight.shape, generator=generator) * 2 - 1).mul_(bound).to(weight)
        alive = current[name].to(weight.device)
        keep = min(weight.numel() - round(budget[name] * weight.numel()), int(alive.sum()))
        param = TopKSupermask(scores, alive, keep)
        parametrize.register_parametrization(modules[name], _attr(name), param, unsafe=True)
        score_params.append(param.scores)
    optimizer = torch.optim.SGD(score_params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    fit(net, task, epochs=epochs, optimizer=optimizer, batch_size=batch_size, lr_schedule=lr_schedule, seed=seed,
        eval_every=epochs, progress=progress)
    learned = get_masks(net)  # the supermasks are masks by the protocol: their hard_mask() is the top-k
    return {name: learned[name].cpu() & current[name] if name in budget else current[name].clone()
            for name in names}


__all__ = ["capture", "Checkpoints", "rewind", "reinitialize", "mask_budget", "shuffle_masks", "density", "per_layer_rates",
           "round_target", "rate_for", "imp", "RETRAIN_STRATEGIES", "retrain_schedule", "retrain",
           "signed_constant_init", "TopKSupermask", "edge_popup"]
