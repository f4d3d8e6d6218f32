"""Chapter 09's training runs: dynamic sparse training against static masks and dense-to-sparse gradual
magnitude pruning at an equal number of steps, with the training cost of each (survey §4, §2.4.6).

:func:`train_sparse` trains one model with one method of :mod:`sparsity_lib.growth` (or ``"gmp"``) and returns
a record (accuracy curve, IoU of the mask with its final state, fraction of weights ever active, per-layer
density, training cost relative to dense training); :func:`compare` runs the grid the chapter plots. The
methods themselves live in :mod:`sparsity_lib.growth`.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from torch import nn

from . import budgets as _budgets
from . import schedules as _schedules
from .growth import METHODS, DynamicSparsity
from .masks import get_masks, prunable


def _active(model: nn.Module) -> Dict[str, int]:
    return {n: int(m.sum()) for n, m in get_masks(model).items()}


class _Recorder:
    """fit callback: training cost in dense-step units, mask snapshots and accuracy after every epoch."""

    def __init__(self, kind: str, sizes: Mapping[str, int], update: Optional[DynamicSparsity] = None):
        self.kind, self.sizes, self.dst = kind, dict(sizes), update
        self.dense = float(sum(sizes.values()))
        self.cost, self.snapshots, self.explored = 0.0, [], []

    def on_train_begin(self, state):
        self.snapshots.append(get_masks(state.model))
        self.explored.append(self.dst.explored() if self.dst else self._density())

    def _density(self):
        return sum(int(m.sum()) for m in self.snapshots[-1].values()) / self.dense

    def on_step_end(self, state):
        f_s = sum(_active(state.model).values()) / self.dense          # forward cost relative to dense
        if self.kind in ("snfs",):
            step = 2 * f_s + 1.0                                      # dense weight gradient every step
        elif self.kind == "topkast":
            f_b = sum(int(b.sum()) for b in self.dst.backward.values()) / self.dense
            step = 2 * f_s + f_b
        elif self.kind == "rigl" and self.dst.is_update_step(state.step):
            step = 3 * f_s + (1.0 - f_s)                              # one dense weight gradient per update
        else:
            step = 3 * f_s                                            # forward + two backward products
        self.cost += step / 3.0

    def on_epoch_end(self, state):
        self.snapshots.append(get_masks(state.model))
        self.explored.append(self.dst.explored() if self.dst else max(self.explored[-1], self._density()))


def train_sparse(method: str, task, model: nn.Module, sparsity: float, *, distribution="uniform", seed: int = 0,
                 epochs: int = 10, optimizer: str = "adam", lr: Optional[float] = None, batch_size: int = 128,
                 update_every: int = 8, end_fraction: float = 0.75, alpha: float = 0.3, **method_options) -> dict:
    """Train ``model`` (dense, changed in place) to ``sparsity`` with one method and return a record.

    ``method`` is a key of :data:`METHODS` (``"static"``, ``"set"``, ``"rigl"``, ``"deepr"``, ``"snfs"``,
    ``"dsr"``, ``"topkast"``) or ``"gmp"``: dense-to-sparse gradual magnitude pruning (Zhu & Gupta, Chapter 02,
    :class:`sparsity_lib.schedules.GradualPruner` from step 0 to ``end``, every ``update_every`` steps, into the
    same layer budget). All run ``epochs`` epochs of :func:`sparsity_lib.train.fit` (cosine learning rate), with
    ``end = end_fraction * total steps``. The record holds ``accuracy`` (final test accuracy), ``curve`` (test
    accuracy after every epoch), ``iou`` (IoU of the mask after every epoch, and at the start, with the final
    mask), ``explored`` (fraction of the weights ever active, after every epoch), ``density`` (final per-layer
    density), ``updates`` (the method's update records) and ``cost`` (training cost relative to dense training:
    a step costs three products per weight, forward and two backward, :math:`3 f_S`; RigL adds a dense weight
    gradient on update steps, SNFS one on every step, Top-KAST the backward set's; GMP pays for its density at
    every step).
    """
    from .compare import iou
    from .train import fit, make_optimizer

    sizes = {n: w.numel() for n, w in prunable(model).items()}
    steps = epochs * task.num_batches(batch_size)
    end = max(1, int(end_fraction * steps))
    opt = make_optimizer(model, optimizer, lr=lr)
    if method == "gmp":
        budget = (dict(_budgets.BUDGETS[distribution](model, sparsity)) if isinstance(distribution, str)
                  else dict(distribution))
        pruner = _schedules.GradualPruner(model, sparsity, begin=0, end=end, frequency=update_every,
                                          method="magnitude", scope=budget)
        recorder = _Recorder("gmp", sizes)
        callbacks = [pruner, recorder]
        dst = None
    else:
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS) + ['gmp']}, got {method!r}")
        dst = METHODS[method](model, opt, sparsity, distribution=distribution, update_every=update_every,
                              end=end, alpha=alpha, seed=seed, **method_options)
        recorder = _Recorder(method, sizes, dst)
        callbacks = [dst, recorder]
    history = fit(model, task, epochs=epochs, optimizer=opt, batch_size=batch_size, seed=seed,
                  callbacks=callbacks, progress=False)
    final = recorder.snapshots[-1]
    return {"method": method, "sparsity": sparsity, "seed": seed, "distribution":
            distribution if isinstance(distribution, str) else "custom",
            "accuracy": history[-1]["test_acc"], "curve": [h["test_acc"] for h in history],
            "iou": [iou(s, final) for s in recorder.snapshots], "explored": recorder.explored,
            "density": {n: float(m.float().mean()) for n, m in final.items()},
            "updates": list(dst.history) if dst else [], "cost": recorder.cost / steps, "steps": steps, "end": end}


def compare(task, model_fn: Callable[[int], nn.Module], methods: Sequence[str], sparsities: Sequence[float],
            distributions: Sequence = ("uniform",), seeds: Sequence[int] = (0,), **options) -> List[dict]:
    """:func:`train_sparse` for every method x sparsity x distribution x seed, all from ``model_fn(seed)`` (the
    same initial weights and, for the random-mask methods, the same initial mask for one seed); returns the list
    of records (the chapter's precomputed grid). ``options`` go to :func:`train_sparse`."""
    records = []
    for seed in seeds:
        for distribution in distributions:
            for s in sparsities:
                for method in methods:
                    start = time.perf_counter()
                    record = train_sparse(method, task, model_fn(seed), s, distribution=distribution, seed=seed,
                                          **options)
                    record["seconds"] = time.perf_counter() - start
                    records.append(record)
    return records


__all__ = ["train_sparse", "compare"]
