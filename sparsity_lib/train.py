"""A small, explicit training loop (step 5 of *score -> select -> mask -> schedule -> train*).

One step of :func:`fit` is the textbook one, in this order::

    optimizer.zero_grad()
    loss = loss_fn(model(inputs), targets) (+ penalty(model))
    loss.backward()            # masked weights get a zero gradient (the mask is a parametrization)
    callbacks: on_after_backward(state)
    optimizer.step()
    learning rate of the next step
    callbacks: on_step_end(state)

Nothing in the loop knows about sparsity: masks are :mod:`torch.nn.utils.parametrize` parametrizations
(:mod:`sparsity_lib.masks`), so a masked weight is zero in every forward pass and its ``original`` entry gets
a zero gradient; with plain SGD, momentum, weight decay or Adam it therefore stays exactly zero. Methods that
change masks *during* training (gradual pruning, regrowth) are callbacks.

Callbacks
---------
A callback is either a plain function ``callback(state)``, called after every optimizer step, or an object
with any of these methods (the others are skipped), each given the :class:`TrainState`:

* ``on_train_begin(state)``: before the first step;
* ``on_after_backward(state)``: after ``loss.backward()``, before ``optimizer.step()``. The gradients the
  optimizer will use are in ``.grad``: for a masked layer that is ``original.grad``, which is *zero* at pruned
  positions (e.g. for sparse gradients). The dense gradient that RigL grows by, :math:`\\partial L / \\partial
  (W \\odot M)` at every position, is not in ``.grad``: switch on the dense-gradient mode with
  ``sl.masks.track_dense_gradients(model)`` before training and read it here with
  ``sl.masks.dense_gradients(model)`` (the record of this step's forward and backward pass);
* ``on_step_end(state)``: after the optimizer step and the learning-rate update (``state.step`` counts the
  steps done; gradual pruning and regrowth live here);
* ``on_epoch_end(state)``: after each epoch and its evaluation (``state.history[-1]`` is the new entry);
* ``on_train_end(state)``: after the last epoch.

Setting ``state.stop = True`` ends training after the current step.

Survey §2.4 (when to sparsify: the training schedule) and §4 (sparse training). Defined in Chapter 01.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import config
from .data import Task
from .masks import sparsity as model_sparsity
from .plumbing import eval_mode

LrSchedule = Union[None, str, Callable[[int, int], float]]
#: Default learning rates of the optimizers :func:`fit` builds by name.
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
LR_SCHEDULES = ("constant", "cosine", "linear")
CALLBACK_EVENTS = ("on_train_begin", "on_after_backward", "on_step_end", "on_epoch_end", "on_train_end")


@dataclass
class TrainState:
    """What a callback sees: the model, the optimizer and where training stands.

    Attributes:
        model, optimizer, task: what is being trained, by what, on what.
        epoch: the current epoch, counted from 0 (during ``on_epoch_end``: the epoch just finished).
        epochs: number of epochs of this call of :func:`fit`.
        step: optimizer steps done so far (0 before the first; ``total_steps`` at the end).
        steps_per_epoch, total_steps: ``total_steps = epochs * steps_per_epoch``.
        base_lr: the learning rate the schedule multiplies; ``lr``: the learning rate of the next step.
        batch: the current ``(inputs, targets)``; ``loss``: its loss (a 0-d tensor, detached after backward).
        history: the list :func:`fit` returns, one dict per epoch.
        stop: set it to True to end training after the current step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: Task
    epochs: int
    steps_per_epoch: int
    total_steps: int
    base_lr: float
    lr: float
    epoch: int = 0
    step: int = 0
    batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    loss: Optional[torch.Tensor] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    stop: bool = False


# -------------------------------------------------------------------------------------------- learning rate
def lr_multiplier(schedule: LrSchedule, step: int, total_steps: int) -> float:
    """The factor of the base learning rate at ``step`` (0-based) of ``total_steps``.

    * ``"constant"`` (or ``None``): 1;
    * ``"cosine"``: cosine decay to 0 (Loshchilov & Hutter's SGDR without restarts),
      :math:`\\tfrac12\\,(1 + \\cos(\\pi\\, t / T))`;
    * ``"linear"``: linear decay to 0, :math:`1 - t / T`;
    * a callable ``schedule(step, total_steps) -> multiplier``.
    """
    if schedule is None or schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - step / total_steps)
    return float(schedule(step, total_steps))


def _check_lr_schedule(lr_schedule):
    if lr_schedule is None or callable(lr_schedule) or lr_schedule in LR_SCHEDULES:
        return lr_schedule
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, None or a callable (step, total_steps) -> "
                     f"multiplier, got {lr_schedule!r}")


def make_optimizer(model: nn.Module, optimizer: str = "sgd", lr: Optional[float] = None, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"`` over all trainable parameters of ``model``.

    The trainable tensor of a masked layer is its ``original``; its masked entries get zero gradients.
    ``lr=None`` uses :data:`DEFAULT_LR`.
    """
    if not isinstance(optimizer, str) or optimizer.lower() not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LR)} or a torch.optim.Optimizer, "
                         f"got {optimizer!r}")
    name = optimizer.lower()
    lr = DEFAULT_LR[name] if lr is None else lr
    _check_nonnegative(lr, "lr", strictly=True)
    _check_nonnegative(weight_decay, "weight_decay")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if name == "sgd":
        _check_nonnegative(momentum, "momentum")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _check_nonnegative(value, name, strictly=False):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or \
        (value <= 0 if strictly else value < 0)
    if bad:
        raise ValueError(f"{name} must be a number {'> 0' if strictly else '>= 0'}, got {value!r}")


def _check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _callback_lists(callbacks) -> Dict[str, List[Callable]]:
    if callbacks is None:
        callbacks = ()
    if callable(callbacks) or any(hasattr(callbacks, e) for e in CALLBACK_EVENTS):
        callbacks = (callbacks,)
    hooks = {event: [] for event in CALLBACK_EVENTS}
    for i, cb in enumerate(callbacks):
        methods = [e for e in CALLBACK_EVENTS if callable(getattr(cb, e, None))]
        if methods:
            for event in methods:
                hooks[event].append(getattr(cb, event))
        elif callable(cb):
            hooks["on_step_end"].append(cb)
        else:
            raise TypeError(f"callbacks[{i}] must be a function callback(state) or an object with any of "
                            f"{CALLBACK_EVENTS}, got {type(cb).__name__}")
    return hooks


# ----------------------------------------------------------------------------------------------- evaluation
def _as_batches(data, split: str, batch_size: int) -> Iterable:
    if isinstance(data, Task):
        x, y = data.split(split)
        return zip(x.split(batch_size), y.split(batch_size))
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        return zip(x.split(batch_size), y.split(batch_size))
    return data


def evaluate(model: nn.Module, data, *, split: str = "test", loss_fn: Optional[Callable] = None,
             batch_size: int = 2048) -> Dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``data``: ``{"loss": float, "accuracy": float}``.

    :math:`\\text{loss} = \\frac1N \\sum_i \\ell(f(x_i), y_i)`, :math:`\\text{accuracy} = \\frac1N \\sum_i
    [\\arg\\max_k f(x_i)_k = y_i]`. ``data`` is a :class:`~sparsity_lib.data.Task` (its ``split``), a pair of
    tensors ``(x, y)``, or an iterable of ``(inputs, targets)`` batches. ``loss_fn`` (default cross-entropy)
    must return the batch mean. Runs under ``torch.no_grad()`` in eval mode and restores the model's mode.
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    _check_int(batch_size, "batch_size")
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(model), torch.no_grad():   # every module gets its own training flag back afterwards
        for inputs, targets in _as_batches(data, split, batch_size):
            logits = model(inputs)
            n = targets.shape[0]
            total_loss += float(loss_fn(logits, targets)) * n
            correct += int((logits.argmax(dim=1) == targets).sum())
            count += n
    if count == 0:
        raise ValueError("data holds no examples")
    return {"loss": total_loss / count, "accuracy": correct / count}


def accuracy(model: nn.Module, data, *, split: str = "test", batch_size: int = 2048) -> float:
    """Fraction of examples whose arg-max logit is the label (see :func:`evaluate`)."""
    return evaluate(model, data, split=split, batch_size=batch_size)["accuracy"]


# ----------------------------------------------------------------------------------------------------- fit
def _sparsity_or_nan(model: nn.Module) -> float:
    try:
        return model_sparsity(model)
    except ValueError:  # a model without Linear/Conv weights has no sparsity to report
        return math.nan


def fit(model: nn.Module, task: Task, *, epochs: int = 10, lr: Optional[float] = None,
        optimizer: Union[str, torch.optim.Optimizer] = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
        batch_size: int = 64, lr_schedule: LrSchedule = "cosine", loss_fn: Optional[Callable] = None,
        penalty: Optional[Callable[[nn.Module], torch.Tensor]] = None, callbacks=(), eval_every: int = 1,
        seed: int = 0, progress: Optional[bool] = None) -> List[Dict[str, float]]:
    """Train ``model`` on ``task`` in place with minibatch gradient descent; return the history.

    Minimizes :math:`\\frac1B \\sum_{i \\in \\text{batch}} \\ell(f(x_i; w \\odot m), y_i) + \\Omega(w)`, where
    the mask :math:`m` is whatever the model carries (its masked weights stay exactly zero) and
    :math:`\\Omega` is the optional ``penalty(model)`` (e.g. an L1 or group-lasso term, survey §3.6).

    Arguments:
        model: any ``nn.Module`` mapping a batch of inputs to logits (moved to nothing: the task goes to the
            model's device).
        task: a :class:`~sparsity_lib.data.Task`; one epoch is ``task.batches(batch_size)``, shuffled by a
            ``torch.Generator`` seeded with ``seed`` (the global RNG is not used).
        epochs, batch_size: positive integers; ``total_steps = epochs * ceil(n_train / batch_size)``.
        lr: base learning rate (``None``: 0.1 for SGD, 1e-3 for Adam/AdamW, or the given optimizer's own).
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"``, ``"adamw"``, or a ready ``torch.optim.Optimizer``.
        weight_decay: L2 coefficient passed to the optimizer.
        lr_schedule: ``"cosine"`` (decay to 0 over ``total_steps``), ``"linear"``, ``"constant"``/``None``, or
            a callable ``(step, total_steps) -> multiplier`` of the base learning rate.
        loss_fn: ``loss_fn(logits, targets)`` returning the batch mean (default cross-entropy).
        penalty: optional ``penalty(model) -> 0-d tensor`` added to the loss (it is not in ``train_loss``).
        callbacks: functions ``cb(state)`` called after every step, or objects with ``on_*`` methods (see the
            module docstring); they receive the :class:`TrainState`.
        eval_every: evaluate on the test split every ``eval_every`` epochs, and always after the last.
        seed: seed of the batch order.
        progress: show a tqdm bar over epochs; ``None`` shows it unless ``sl.config.progress_enabled()`` is
            False (under CI and in the book build).

    Returns:
        ``history``: one dict per epoch with ``epoch`` (1-based), ``step``, ``lr`` (of the next step),
        ``train_loss`` (mean over the epoch's batches), ``test_loss`` and ``test_acc`` (NaN on epochs
        without evaluation), ``sparsity`` (``sl.sparsity(model)``) and ``seconds`` (since the start).
        ``pandas.DataFrame(history)`` makes it a table.
    """
    # ---- validate everything before touching the model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task must be a sparsity_lib.data.Task, got {type(task).__name__}")
    epochs = _check_int(epochs, "epochs")
    batch_size = _check_int(batch_size, "batch_size")
    eval_every = _check_int(eval_every, "eval_every")
    seed = _check_int(seed, "seed", minimum=0)
    lr_schedule = _check_lr_schedule(lr_schedule)
    if penalty is not None and not callable(penalty):
        raise TypeError(f"penalty must be a callable penalty(model) -> tensor, got {type(penalty).__name__}")
    hooks = _callback_lists(callbacks)
    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is not None:
            _check_nonnegative(lr, "lr", strictly=True)
            for group in optimizer.param_groups:
                group["lr"] = lr
        opt = optimizer
    else:
        opt = make_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    show = config.progress_enabled() if progress is None else bool(progress)

    device = next(model.parameters()).device
    task = task.to(device)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = task.num_batches(batch_size)
    total_steps = epochs * steps_per_epoch
    base_lrs = [group["lr"] for group in opt.param_groups]
    state = TrainState(model=model, optimizer=opt, task=task, epochs=epochs, steps_per_epoch=steps_per_epoch,
                       total_steps=total_steps, base_lr=base_lrs[0], lr=base_lrs[0])

    def set_lr(step):
        factor = lr_multiplier(lr_schedule, step, total_steps)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor
        state.lr = base_lrs[0] * factor

    epoch_range = range(epochs)
    bar = None
    if show:
        from tqdm.auto import tqdm
        epoch_range = bar = tqdm(epoch_range, desc="epochs", leave=False)

    start = time.perf_counter()
    model.train()
    set_lr(0)
    for hook in hooks["on_train_begin"]:
        hook(state)
    for epoch in epoch_range:
        state.epoch = epoch
        loss_sum = torch.zeros((), device=device)  # summed as a tensor: one .item() per epoch, not per step
        n_batches = 0
        for inputs, targets in task.batches(batch_size, generator=generator):
            state.batch = (inputs, targets)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            objective = loss if penalty is None else loss + penalty(model)
            objective.backward()
            state.loss = loss.detach()
            for hook in hooks["on_after_backward"]:
                hook(state)
            opt.step()
            state.step += 1
            set_lr(state.step)
            loss_sum += state.loss
            n_batches += 1
            for hook in hooks["on_step_end"]:
                hook(state)
            if state.stop:
                break

        last = state.stop or epoch == epochs - 1
        entry = {"epoch": epoch + 1, "step": state.step, "lr": state.lr,
                 "train_loss": loss_sum.item() / max(n_batches, 1), "test_loss": math.nan, "test_acc": math.nan}
        if (epoch + 1) % eval_every == 0 or last:
            result = evaluate(model, task, split="test", loss_fn=loss_fn)
            entry["test_loss"], entry["test_acc"] = result["loss"], result["accuracy"]
        entry["sparsity"] = _sparsity_or_nan(model)
        entry["seconds"] = time.perf_counter() - start
        state.history.append(entry)
        if bar is not None:
            bar.set_postfix(loss=f"{entry['train_loss']:.3f}", acc=f"{entry['test_acc']:.3f}")
        for hook in hooks["on_epoch_end"]:
            hook(state)
        if state.stop:
            break
    if bar is not None:
        bar.close()
    for hook in hooks["on_train_end"]:
        hook(state)
    state.batch = None
    return state.history


__all__ = ["TrainState", "fit", "evaluate", "accuracy", "make_optimizer", "lr_multiplier", "LR_SCHEDULES",
           "DEFAULT_LR", "CALLBACK_EVENTS"]
