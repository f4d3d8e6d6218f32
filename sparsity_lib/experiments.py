"""Experiments: recipes x methods x sparsities x seeds -> records, the runner of every chapter and the benchmark.

Two entry points:

* :func:`run` (any recipe): ``run(recipe, model, task, sparsities, seeds, methods, **options)`` builds one model
  per point (a copy of a given ``nn.Module``, or ``model(seed)`` from a factory), applies the *recipe* (how the
  sparse model is made, see :data:`RECIPES`), evaluates it and returns one flat record per point::

      {"recipe", "method", "target", "sparsity", "seed", "accuracy", "loss", "seconds", "skipped", ...}

  (``target``: the sparsity asked for; ``sparsity``: the one reached, :func:`sparsity_lib.sparsity`; ``seconds``:
  wall time of the point; ``skipped``: ``None``, or why the library refused the combination; recipes add their
  own fields, e.g. IMP's ``rounds``; ``keep_masks=True`` adds ``masks`` and ``densities``). :func:`curves`
  turns records into the input of :func:`sparsity_lib.viz.accuracy_vs_sparsity`, :func:`select` looks one
  up for a widget (:class:`sparsity_lib.widgets.Explorer`), :func:`frame` makes a pandas table.
* :func:`sweep` (one-shot pruning, with optional fine-tuning): method x scope x structure x sparsity of *one*
  trained model, keyed by ``(method, scope, structure, sparsity)``; the precomputation behind
  :func:`sparsity_lib.widgets.pruning_explorer` (moved here from ``widgets``).

The recipes (:data:`RECIPES`; survey §2.4 "when to sparsify"):

============== ========================================================================================
recipe         what one point does (``method`` is a ``sl.prune`` method unless said otherwise)
============== ========================================================================================
one_shot       prune the trained model once, then fine-tune ``finetune_epochs`` (§2.4.1)
gradual        train from ``model(seed)`` with Zhu & Gupta's gradual pruning to the target (§2.4.2)
imp            iterative magnitude pruning, ``rounds`` rounds, rewinding to θ0 (``rewind="theta0"``), to θk
               (``rewind=k`` steps) or not at all (``rewind=None``), then a last training (§8.3)
at_init        prune ``model(seed)`` before training (SNIP, GraSP, SynFlow, random...), then train (§2.4.3)
edge_popup     learn a supermask over frozen weights (Ramanujan et al.; ``method`` is "edge_popup") (§8.3.1)
growth         dynamic sparse training with a growth rule of the catalogue (``method`` = "rigl", "set"...)
regularized    train with ``penalty(model)`` added to the loss, prune to the target, fine-tune (§3.6)
============== ========================================================================================

**Adding a recipe** (the slot for a module such as ``regularize`` or ``growth`` that brings its own training):
``register_recipe(name, fn, method_kind=..., default_method=...)`` with ``fn(model, task, sparsity, *, method,
seed, **options) -> dict or None`` that makes ``model`` sparse *in place* (the runner has already copied or
built it, seeded torch with ``seed``, and evaluates it afterwards); a returned dict is merged into the record.

Example::

    >>> records = sl.experiments.run("one_shot", trained, task, [0.5, 0.9], seeds=[0], methods=["magnitude", "random"],
    ...                              finetune_epochs=2)
    >>> sl.viz.accuracy_vs_sparsity(sl.experiments.curves(records), logit_x=True);
    >>> sl.experiments.frame(records)          # a pandas DataFrame, one row per point
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import numbers
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .masks import get_masks
from .pruning import prune
from .scores import get_method
from .select import check_sparsity


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """A way of making a sparse model: ``fn(model, task, sparsity, *, method, seed, **options) -> dict or None``.

    ``method_kind``: what ``method`` names: ``"prune"`` (a ``sl.prune`` method), ``"growth"`` (a growth rule of
    the catalogue), or ``"own"`` (only ``default_method``); ``fresh``: the recipe trains from an untrained model
    (``model`` is then best a factory ``model(seed)``)."""

    name: str
    fn: Callable
    method_kind: str = "prune"
    default_method: Optional[str] = "magnitude"
    fresh: bool = False
    description: str = ""
    check: Optional[Callable] = None

    def options(self) -> Dict[str, Any]:
        from .catalogue import signature_options

        return {k: v for k, v in signature_options(self.fn).items() if k not in ("method", "seed")}


#: ``{name: Recipe}``: the recipes :func:`run` knows (add one with :func:`register_recipe`)
RECIPES: Dict[str, Recipe] = {}
METHOD_KINDS = ("prune", "growth", "own")


def register_recipe(name: str, fn: Callable, *, method_kind: str = "prune", default_method: Optional[str] = "magnitude",
                    fresh: bool = False, description: str = "", check: Optional[Callable] = None,
                    replace: bool = False) -> Recipe:
    """Add a recipe to :data:`RECIPES` (see the module docstring for ``fn``'s contract). ``check(**options)``
    validates the options once, before any point runs (raise ``ValueError``; a ``ValueError`` raised by ``fn``
    itself marks only that point as skipped). ``replace`` allows replacing an existing recipe (e.g. a module's
    own version of ``"growth"``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in RECIPES and not replace:
        raise ValueError(f"recipe {name!r} exists; pass replace=True to replace it")
    if not callable(fn):
        raise TypeError(f"fn must be callable fn(model, task, sparsity, *, method, seed, **options), got {fn!r}")
    if method_kind not in METHOD_KINDS:
        raise ValueError(f"method_kind must be one of {METHOD_KINDS}, got {method_kind!r}")
    if check is not None and not callable(check):
        raise TypeError(f"check must be callable check(**options) or None, got {check!r}")
    recipe = Recipe(name, fn, method_kind, default_method, fresh,
                    description or (fn.__doc__ or "").strip().split("\n")[0], check)
    RECIPES[name] = recipe
    return recipe


def _fit(model, task, epochs, seed, fit_options, **extra):
    from .train import fit

    options = {"progress": False, **dict(fit_options or {}), **extra}
    return fit(model, task, epochs=epochs, seed=seed, **options)


def _calibration(task, method: str, data):
    if data is not None or not get_method(method).needs_data:
        return data
    if not callable(getattr(task, "calibration", None)):
        raise ValueError(f"method {method!r} needs data: pass data=... (the task has no calibration())")
    return task.calibration()


def _prune_kwargs(method, data, loss_fn):
    return {"data": data, "loss_fn": loss_fn} if get_method(method).needs_data else {}


def one_shot(model, task, sparsity, *, method, seed, scope="global", structure=None, data=None, loss_fn=None,
             finetune_epochs: int = 0, fit_options: Optional[Mapping] = None, method_options: Optional[Mapping] = None):
    """Prune the trained ``model`` once to ``sparsity`` (``sl.prune``), then fine-tune it for ``finetune_epochs``
    with ``sl.train.fit(**fit_options)`` (the masks stay). Survey §2.4.1."""
    data = _calibration(task, method, data)
    prune(model, sparsity, method=method, scope=_scope_argument(model, scope, sparsity), structure=structure,
          **_prune_kwargs(method, data, loss_fn), **dict(method_options or {}))
    if finetune_epochs:
        _fit(model, task, finetune_epochs, seed, fit_options)


def at_init(model, task, sparsity, *, method, seed, scope="global", structure=None, data=None, loss_fn=None,
            epochs: int = 10, fit_options: Optional[Mapping] = None, method_options: Optional[Mapping] = None):
    """Prune the *untrained* ``model`` (SNIP, GraSP, SynFlow, random, magnitude of θ0...), then train it sparse for
    ``epochs``. Survey §2.4.3."""
    one_shot(model, task, sparsity, method=method, seed=seed, scope=scope, structure=structure, data=data,
             loss_fn=loss_fn, method_options=method_options)
    _fit(model, task, epochs, seed, fit_options)


def _steps_per_epoch(task, fit_options) -> int:
    batch_size = int(dict(fit_options or {}).get("batch_size", 64))
    return math.ceil(len(task.x_train) / batch_size)


def _fraction(value, name) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction of training in [0, 1], got {value!r}")
    return float(value)


def gradual(model, task, sparsity, *, method, seed, epochs: int = 10, begin: float = 0.0, end: float = 0.75,
            frequency: Optional[int] = None, power: float = 3, scope="global", data=None, loss_fn=None,
            fit_options: Optional[Mapping] = None, method_options: Optional[Mapping] = None):
    """Train ``model`` for ``epochs`` while Zhu & Gupta's :class:`~sparsity_lib.schedules.GradualPruner` prunes it
    from 0 to ``sparsity`` between ``begin`` and ``end`` (fractions of training), every ``frequency`` steps
    (default: 10 cuts), cubic for ``power=3``. Survey §2.4.2."""
    from .schedules import GradualPruner

    total = epochs * _steps_per_epoch(task, fit_options)
    first, last = round(_fraction(begin, "begin") * total), round(_fraction(end, "end") * total)
    if not first < last:
        raise ValueError(f"begin={begin} must come before end={end} (fractions of {total} steps)")
    frequency = max(1, (last - first) // 10) if frequency is None else frequency
    data = _calibration(task, method, data)
    pruner = GradualPruner(model, sparsity, first, last, frequency, power=power, method=method,
                           scope=_scope_argument(model, scope, sparsity), **_prune_kwargs(method, data, loss_fn),
                           **dict(method_options or {}))
    _fit(model, task, epochs, seed, fit_options, callbacks=[pruner])


def imp(model, task, sparsity, *, method, seed, rounds: int = 3, rewind: Union[str, int, None] = "theta0",
        epochs: int = 10, scope="global", fit_options: Optional[Mapping] = None,
        method_options: Optional[Mapping] = None):
    """Iterative magnitude pruning (:func:`sparsity_lib.lottery.imp`) to ``sparsity`` in ``rounds`` rounds of
    ``epochs`` each (rate :func:`~sparsity_lib.lottery.rate_for`), then one more training of the final mask.

    ``rewind``: ``"theta0"`` rewinds to the initial weights (lottery tickets, Frankle & Carbin), an integer
    ``k`` to the weights after ``k`` optimizer steps of the first training (θk, Frankle et al. 2020), ``None``
    keeps the trained weights (every round restarts the learning-rate schedule: learning-rate rewinding, Renda
    et al.). ``scope`` as in :func:`~sparsity_lib.lottery.imp` (a ``{name: rate}`` dict of per-layer rates
    included). Adds ``rounds``: one ``{"round", "sparsity", "accuracy"}`` per round (accuracy of the round's
    training, before pruning). Survey §8.3."""
    from . import lottery
    from .train import evaluate

    if not (rewind is None or rewind == "theta0" or (isinstance(rewind, int) and not isinstance(rewind, bool)
                                                    and rewind >= 0)):
        raise ValueError(f"rewind must be 'theta0', a number of steps k >= 0 (θk) or None, got {rewind!r}")
    if sparsity == 0.0:  # nothing to prune: the dense network, trained once
        _fit(model, task, epochs, seed, fit_options)
        return {"rounds": []}
    rate = lottery.rate_for(sparsity, rounds)
    theta_0 = lottery.capture(model)

    def train_fn(net, callbacks=()):
        _fit(net, task, epochs, seed, fit_options, callbacks=list(callbacks))
        return {"accuracy": evaluate(net, task)["accuracy"]}

    options = dict(method=method, **dict(method_options or {}))
    if isinstance(rewind, int):
        checkpoints = lottery.Checkpoints(steps=[rewind])
        records = lottery.imp(model, lambda net: train_fn(net, [checkpoints]), 1, rate, None, scope, **options)
        theta_k = checkpoints[rewind]
        lottery.rewind(model, theta_k)
        if rounds > 1:
            later = lottery.imp(model, train_fn, rounds - 1, rate, theta_k, scope, **options)
            records += [{**r, "round": r["round"] + 1} for r in later]
    else:
        records = lottery.imp(model, train_fn, rounds, rate, theta_0 if rewind == "theta0" else None, scope,
                              **options)
    train_fn(model)
    return {"rounds": [{"round": r["round"], "sparsity": r["sparsity"], "accuracy": r["accuracy"]} for r in records]}


def edge_popup(model, task, sparsity, *, method, seed, epochs: int = 10, lr: float = 0.1, momentum: float = 0.9,
               weight_decay: float = 5e-4, batch_size: int = 64):
    """Learn a supermask over the frozen weights of ``model`` (:func:`sparsity_lib.lottery.edge_popup`, top-k
    per layer) and apply it; the weights never change. ``method`` must be "edge_popup". Survey §8.3.1."""
    from .lottery import edge_popup as learn
    from .masks import apply_masks

    masks = learn(model, task, sparsity, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                  batch_size=batch_size, seed=seed, progress=False)
    apply_masks(model, masks)


def growth(model, task, sparsity, *, method, seed, epochs: int = 10, end: float = 0.75, update_every: int = 100,
           lr: Optional[float] = None, momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 64,
           rule_options: Optional[Mapping] = None):
    """Dynamic sparse training from the dense ``model`` with the growth rule ``method`` of the catalogue (kind
    ``"growth"``: "set", "rigl", ...): the rule applies its initial sparse mask, then drops and regrows every
    ``update_every`` steps until ``end`` (a fraction of training), at constant ``sparsity``. Survey §4."""
    from .catalogue import entry
    from .train import make_optimizer

    rule_class = entry(method, "growth").resolve()
    optimizer = make_optimizer(model, "sgd", lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * math.ceil(len(task.x_train) / batch_size)
    rule = rule_class(model, optimizer, sparsity, end=round(_fraction(end, "end") * total),
                      update_every=update_every, seed=seed, **dict(rule_options or {}))
    _fit(model, task, epochs, seed, {"batch_size": batch_size}, optimizer=optimizer, callbacks=[rule])


def regularized(model, task, sparsity, *, method, seed, penalty: Callable = None, epochs: int = 10,
                finetune_epochs: int = 0, scope="global", structure=None, data=None, loss_fn=None,
                fit_options: Optional[Mapping] = None, method_options: Optional[Mapping] = None):
    """Train ``model`` for ``epochs`` with ``penalty(model)`` (a 0-d tensor: L1, group lasso, ...) added to the
    loss, prune it to ``sparsity`` with ``method``, fine-tune ``finetune_epochs`` without the penalty. Survey §3.6."""
    if not callable(penalty):
        raise ValueError("recipe 'regularized' needs penalty=..., a callable penalty(model) -> 0-d tensor")
    _fit(model, task, epochs, seed, fit_options, penalty=penalty)
    one_shot(model, task, sparsity, method=method, seed=seed, scope=scope, structure=structure, data=data,
             loss_fn=loss_fn, finetune_epochs=finetune_epochs, fit_options=fit_options, method_options=method_options)


def _check_epochs(**options):
    for name in ("epochs", "finetune_epochs", "rounds"):
        if name in options:
            value = options[name]
            minimum = 0 if name == "finetune_epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_gradual(begin=0.0, end=0.75, **options):
    _check_epochs(**options)
    if _fraction(begin, "begin") >= _fraction(end, "end"):
        raise ValueError(f"begin={begin} must come before end={end} (fractions of training)")


def _check_imp(rewind="theta0", **options):
    _check_epochs(**options)
    if not (rewind is None or rewind == "theta0" or (isinstance(rewind, int) and not isinstance(rewind, bool)
                                                    and rewind >= 0)):
        raise ValueError(f"rewind must be 'theta0', a number of steps k >= 0 (θk) or None, got {rewind!r}")


def _check_growth(end=0.75, **options):
    _check_epochs(**options)
    _fraction(end, "end")


def _check_regularized(penalty=None, **options):
    _check_epochs(**options)
    if not callable(penalty):
        raise ValueError("recipe 'regularized' needs penalty=..., a callable penalty(model) -> 0-d tensor")


register_recipe("one_shot", one_shot, check=_check_epochs)
register_recipe("gradual", gradual, fresh=True, check=_check_gradual)
register_recipe("imp", imp, fresh=True, check=_check_imp)
register_recipe("at_init", at_init, fresh=True, check=_check_epochs)
register_recipe("edge_popup", edge_popup, method_kind="own", default_method="edge_popup", fresh=True,
                check=_check_epochs)
register_recipe("growth", growth, method_kind="growth", default_method="rigl", fresh=True, check=_check_growth)
register_recipe("regularized", regularized, fresh=True, check=_check_regularized)


# ---------------------------------------------------------------------------------------------------- run
def _check_methods(recipe: Recipe, methods) -> List[str]:
    if methods is None:
        if recipe.default_method is None:
            raise ValueError(f"recipe {recipe.name!r} has no default method: pass methods=[...]")
        methods = [recipe.default_method]
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError("methods must name at least one method")
    for m in methods:
        if recipe.method_kind == "prune":
            get_method(m)  # ValueError listing the known methods
        elif recipe.method_kind == "growth":
            from .catalogue import entry

            entry(m, "growth")
        elif m != recipe.default_method:
            raise ValueError(f"recipe {recipe.name!r} has one method, {recipe.default_method!r}; got {m!r}")
    return methods


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seeds must be non-negative integers, got {seed!r}")
    return int(seed)


def run(recipe: Union[str, Recipe], model: Union[nn.Module, Callable[[int], nn.Module]], task,
        sparsities: Iterable[float], seeds: Iterable[int] = (0,), methods: Union[str, Sequence[str], None] = None, *,
        progress: Optional[bool] = None, keep_masks: bool = False, evaluate: Optional[Callable] = None,
        **options) -> List[Dict[str, Any]]:
    """Run ``recipe`` for every seed x method x sparsity (in that nesting order) and return one record per point.

    Arguments:
        recipe: a name of :data:`RECIPES` ("one_shot", "gradual", "imp", "at_init", "edge_popup", "growth",
            "regularized") or a :class:`Recipe`.
        model: an ``nn.Module`` (each point works on a ``copy.deepcopy``; ``model`` is never changed), or a
            factory ``model(seed) -> nn.Module`` called for each point (recipes that train from scratch).
        task: the :class:`~sparsity_lib.data.Task` to train on and evaluate on (its test split).
        sparsities: target sparsities in [0, 1).
        seeds: each point seeds torch with its seed (the caller's RNG state is restored afterwards) and passes
            it to the recipe (batch order, random scores).
        methods: the recipe's method names (default: the recipe's ``default_method``).
        progress: a tqdm bar over the points (``None``: unless ``sl.config.progress_enabled()`` is False).
        keep_masks: add ``masks`` (``{layer: bool tensor}``, on the CPU) and ``densities`` to the records.
        evaluate: ``evaluate(model, task) -> {"accuracy", "loss"}`` (default ``sl.train.evaluate``).
        options: the recipe's options (``RECIPES[name].options()``), the same for every point.

    Returns a list of dicts ``{"recipe", "method", "target", "sparsity" (reached), "seed", "accuracy", "loss",
    "seconds", "skipped", **recipe fields}``. A combination the library refuses with ``ValueError`` (e.g. N:M at a
    sparsity other than 1 - n/m) is recorded with ``skipped`` = the reason and NaN metrics, and a warning
    lists how many were skipped. Every argument (the recipe's options too, by its ``check``) is checked before the
    first point runs.
    """
    from . import config

    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        recipe = RECIPES[recipe]
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a name of {sorted(RECIPES)} or a Recipe, got {type(recipe).__name__}")
    if not (isinstance(model, nn.Module) or callable(model)):
        raise TypeError(f"model must be an nn.Module or a factory model(seed) -> nn.Module, got {type(model).__name__}")
    sparsities = [check_sparsity(s, "sparsities[...]") for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities must contain at least one sparsity in [0, 1)")
    seeds = [_check_seed(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if not seeds:
        raise ValueError("seeds must contain at least one seed")
    methods = _check_methods(recipe, methods)
    params = inspect.signature(recipe.fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        allowed = list(recipe.options())
        for key in options:
            if key not in allowed:
                raise TypeError(f"recipe {recipe.name!r} has no option {key!r}; its options are {allowed}")
    if recipe.check is not None:
        recipe.check(**options)
    if evaluate is None:
        from .train import evaluate
    points = list(itertools.product(seeds, methods, sparsities))
    show = config.progress_enabled() if progress is None else bool(progress)
    if show:
        from tqdm.auto import tqdm

        points_iter = tqdm(points, desc=recipe.name, leave=False)
    else:
        points_iter = points
    records: List[Dict[str, Any]] = []
    for seed, method, target in points_iter:
        start = time.perf_counter()
        record = {"recipe": recipe.name, "method": method, "target": target, "seed": seed}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = copy.deepcopy(model) if isinstance(model, nn.Module) else model(seed)
            if not isinstance(net, nn.Module):
                raise TypeError(f"model(seed) must return an nn.Module, got {type(net).__name__}")
            try:
                extra = recipe.fn(net, task, target, method=method, seed=seed, **options)
            except ValueError as error:
                records.append({**record, "sparsity": float("nan"), "accuracy": float("nan"), "loss": float("nan"),
                                "seconds": time.perf_counter() - start, "skipped": str(error)})
                continue
            metrics = _metrics(evaluate(net, task))
        masks = {n: m.detach().to("cpu", torch.bool).clone() for n, m in get_masks(net).items()}
        kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
        record.update(sparsity=1.0 - kept / total, **metrics)
        record.update(seconds=time.perf_counter() - start, skipped=None)
        if keep_masks:
            record.update(masks=masks, densities={n: float(m.float().mean()) for n, m in masks.items()})
        if extra:
            record.update({k: v for k, v in dict(extra).items() if k not in record})
        records.append(record)
    skipped = [r for r in records if r["skipped"] is not None]
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(records)} points were skipped (see their 'skipped' field), e.g. "
                      f"{skipped[0]['method']} at {skipped[0]['target']}: {skipped[0]['skipped']}", stacklevel=2)
    return records


# ------------------------------------------------------------------------------------- reading records
def select(records: Sequence[Mapping], **values) -> List[Mapping]:
    """The records whose fields equal ``values`` (e.g. ``select(records, method="snip", target=0.9)``), in order:
    what a widget's ``lookup`` returns. An unknown field raises ``ValueError``; no match raises ``KeyError``."""
    if not records:
        raise ValueError("records is empty")
    for name in values:
        if name not in records[0]:
            raise ValueError(f"records have no field {name!r}; fields are {list(records[0])}")
    out = [r for r in records if all(r.get(k) == v for k, v in values.items())]
    if not out:
        raise KeyError(f"no record with {values}")
    return out


def frame(records: Sequence[Mapping], drop=("masks", "densities")):
    """The records as a pandas ``DataFrame`` (one row per point), without the bulky fields ``drop``."""
    import pandas as pd

    return pd.DataFrame([{k: v for k, v in r.items() if k not in drop} for r in records])


def _record_curves(records: Sequence[Mapping], metric: str, by: Sequence[str], fixed: Mapping) -> Dict[str, tuple]:
    for name in list(by) + list(fixed):
        if name not in records[0]:
            raise ValueError(f"records have no field {name!r}; fields are {list(records[0])}")
    if metric not in records[0]:
        raise ValueError(f"metric must be a record field such as 'accuracy' or 'loss', got {metric!r}")
    chosen = [r for r in records if all(r[k] == v for k, v in fixed.items())]
    out = {}
    groups: Dict[tuple, List[Mapping]] = {}
    for r in chosen:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    for group, rows in groups.items():
        seeds = sorted({r["seed"] for r in rows})
        targets = sorted({r["target"] for r in rows})
        table = {(r["seed"], r["target"]): r for r in rows}
        valid = [t for t in targets if all((s, t) in table and table[s, t]["skipped"] is None for s in seeds)]
        if not valid:
            continue
        values = np.array([[float(table[s, t][metric]) for t in valid] for s in seeds])
        label = ", ".join(str(v) for v in group) or metric
        out[label] = (valid, values if len(seeds) > 1 else values[0])
    return out


# --------------------------------------------------------------------------------------- sweep (one-shot)
SWEEP_SCOPES = ("global", "layerwise")


def _structure_key(structure):
    return tuple(structure) if isinstance(structure, list) else structure


def structure_label(structure) -> str:
    """A short label for a ``structure`` argument: None -> "unstructured", (2, 4) -> "2:4", ("block", 4, 4) ->
    "block 4x4", "neuron" -> "neuron"."""
    if structure is None:
        return "unstructured"
    if isinstance(structure, (tuple, list)):
        if len(structure) == 2:
            return f"{structure[0]}:{structure[1]}"
        if len(structure) == 3 and structure[0] == "block":
            return f"block {structure[1]}x{structure[2]}"
    return str(structure)


def _metrics(result) -> Dict[str, float]:
    """``{"accuracy", "loss"}`` from what an evaluation function returned (a dict, an object or a number)."""
    if isinstance(result, Mapping):
        accuracy = result.get("accuracy", result.get("acc"))
        loss = result.get("loss")
    elif _is_number(result):
        accuracy, loss = result, None
    else:
        accuracy, loss = getattr(result, "accuracy", None), getattr(result, "loss", None)
    if accuracy is None:
        raise TypeError(
            "the evaluation must return a dict with 'accuracy' (and 'loss'), an object with those attributes, or "
            f"the accuracy as a number; got {type(result).__name__}"
        )
    as_float = lambda v: float(v.item() if hasattr(v, "item") else v)  # noqa: E731
    return {"accuracy": as_float(accuracy), "loss": float("nan") if loss is None else as_float(loss)}


def _scope_argument(model: nn.Module, scope: str, sparsity: float):
    """What ``sl.prune`` gets as ``scope``: "global"/"layerwise" as they are, a budget name as its budget."""
    from .budgets import BUDGETS

    if scope in SWEEP_SCOPES:
        return scope
    return BUDGETS[scope](model, sparsity)


def sweep(model: nn.Module, task, sparsities: Iterable[float], methods: Sequence[str] = ("magnitude", "random"),
          scopes: Sequence[str] = SWEEP_SCOPES, structures: Sequence = (None,),
          finetune: Optional[Callable[[nn.Module], Any]] = None, data: Optional[Iterable] = None,
          loss_fn: Optional[Callable] = None, seed: int = 0, *,
          evaluate: Optional[Callable] = None,
          exclude: Union[Sequence[str], Callable[[Any], Sequence[str]]] = ()) -> Dict[tuple, dict]:
    """Prune copies of a trained ``model`` with every combination of method, scope, structure and sparsity and
    evaluate each: the precomputation behind :func:`sparsity_lib.widgets.pruning_explorer` (and behind the accuracy-vs-sparsity figures
    of one-shot pruning, survey §2.4.1 and Gale et al. {cite}`gale2019state`).

    For each combination: ``m = copy.deepcopy(model)``; ``sl.prune(m, sparsity, method, scope, structure, data,
    loss_fn)``; ``finetune(m)`` if given; ``sl.train.evaluate(m, task)``. ``model`` itself is never changed.

    Arguments:
        model: the trained model (it may already carry masks: pruning is cumulative).
        task: what the evaluation takes (a :class:`sparsity_lib.data.Task`).
        sparsities: target sparsities, each in [0, 1).
        methods: registered method names (``sl.scores.known_methods()``).
        scopes: ``"global"``, ``"layerwise"``, or a budget of :mod:`sparsity_lib.budgets` by name (``"uniform"``,
            ``"er"``, ``"erk"``), computed for each sparsity.
        structures: ``None``, ``"neuron"``, ``(n, m)``, ``("block", r, c)``.
        finetune: ``finetune(model)`` trains the pruned copy in place (masks stay); ``None`` = one-shot.
        data, loss_fn: calibration batches and loss for data-driven methods (default ``task.calibration()``
            when the task has one).
        seed: seeds torch before each point and is passed to methods that take a ``seed`` (``"random"``).
        evaluate: ``evaluate(model, task)`` returning ``{"accuracy", "loss"}`` (default ``sl.train.evaluate``).
        exclude: layer names that keep their current mask (``sl.prune``'s ``exclude``), or a function
            ``exclude(structure) -> names`` (e.g. the output layer under neuron pruning only).

    Returns ``{(method, scope, structure, sparsity): record}`` with ``record`` = ``{"accuracy", "loss", "masks"
    ({layer: bool tensor on the CPU}), "densities" ({layer: kept fraction}), "sparsity" (achieved: the fraction of
    prunable weights masked), "skipped": None, "notes": [...]}``; ``notes`` holds the warnings ``sl.prune`` gave
    for that point (e.g. a structured target that keeping one group per layer did not let it reach: ``sparsity`` is
    then the one reached), recorded instead of printed. A combination that ``sl.prune`` rejects (e.g. N:M with a
    sparsity other than ``1 - n/m``, a layer that N:M or blocks do not tile) is not raised but recorded with
    ``"skipped"`` = the reason and NaN accuracy and loss.

    Example::

        >>> results = sweep(model, task, [0.5, 0.9], structures=(None, (2, 4)))
        >>> results[("magnitude", "global", None, 0.9)]["accuracy"]
        0.93...
        >>> results[("magnitude", "global", (2, 4), 0.9)]["skipped"]
        'structure (2, 4) means sparsity 1 - n/m = 0.5; got sparsity=0.9'
    """
    from .budgets import BUDGETS

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsities = [check_sparsity(s, "sparsities[...]") for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities must contain at least one sparsity in [0, 1)")
    methods = list(methods)
    specs = {m: get_method(m) for m in methods}  # raises ValueError listing the known methods
    scopes = list(scopes)
    for scope in scopes:
        if not isinstance(scope, str) or (scope not in SWEEP_SCOPES and scope not in BUDGETS):
            raise ValueError(f"scopes must be names among {list(SWEEP_SCOPES) + list(BUDGETS)}, got {scope!r}")
    structures = [_structure_key(s) for s in structures]
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable finetune(model) or None, got {type(finetune).__name__}")
    if evaluate is None:
        from . import train

        evaluate = train.evaluate
    if data is None and any(spec.needs_data for spec in specs.values()) and callable(getattr(task, "calibration", None)):
        data = task.calibration()

    results: Dict[tuple, dict] = {}
    for method, scope, structure, sparsity in itertools.product(methods, scopes, structures, sparsities):
        spec = specs[method]
        options = {"seed": seed} if "seed" in inspect.signature(spec.score or spec.pruner).parameters else {}
        with torch.random.fork_rng(devices=[]):  # seeded per point, and the caller's RNG state is left alone
            torch.manual_seed(seed)
            pruned = copy.deepcopy(model)
            try:
                with warnings.catch_warnings(record=True) as caught:  # e.g. a structured target not reached
                    warnings.simplefilter("always", UserWarning)
                    masks = prune(pruned, sparsity, method=method, scope=_scope_argument(pruned, scope, sparsity),
                                  structure=structure, data=data if spec.needs_data else None,
                                  loss_fn=loss_fn if spec.needs_data else None,
                                  exclude=exclude(structure) if callable(exclude) else exclude, **options)
            except ValueError as error:  # an invalid combination (the library's validation): record why
                results[(method, scope, structure, sparsity)] = {
                    "accuracy": float("nan"), "loss": float("nan"), "masks": None, "densities": None,
                    "sparsity": float("nan"), "skipped": str(error), "notes": [],
                }
                continue
            if finetune is not None:
                finetune(pruned)
                masks = get_masks(pruned)
            metrics = _metrics(evaluate(pruned, task))
        masks = {name: mask.detach().to("cpu", torch.bool).clone() for name, mask in masks.items()}
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        results[(method, scope, structure, sparsity)] = {
            **metrics,
            "masks": masks,
            "densities": {name: float(m.float().mean()) for name, m in masks.items()},
            "sparsity": 1.0 - kept / total,
            "skipped": None,
            "notes": [str(w.message) for w in caught],
        }
    return results


KEY_FIELDS = ("method", "scope", "structure")


def curves(sweep_results, metric: str = "accuracy", by: Optional[Sequence[str]] = None, **fixed) -> Dict[str, tuple]:
    """Turn :func:`run` records or :func:`sweep` results into the ``{label: (sparsities, values)}`` of
    :func:`sparsity_lib.viz.accuracy_vs_sparsity`: the static figure of a whole sweep, next to its explorer.

    ``fixed`` picks one value of some key fields (``method=``, ``scope=``, ``structure=``); there is one curve per
    combination of the other fields, labelled by their values (e.g. ``"magnitude, global"``). ``metric`` is a
    record field (``"accuracy"``, ``"loss"``, ``"sparsity"``). Skipped points are left out. ``sweep_results`` may
    also be a list of sweeps of the same grid, one per seed: then ``values`` has shape ``(seeds, S)`` (over the
    sparsities valid in every seed) and the figure shows the spread over seeds.

    For :func:`run` records (a list of dicts with a ``recipe`` field): one curve per value of the fields ``by``
    (default ``("recipe", "method")`` without those fixed), x = ``target``, over the seeds of the records
    (``values`` of shape ``(seeds, S)`` with several seeds); ``fixed`` picks record fields (``recipe=``, ...).

    Example::

        >>> runs = [sweep(model, task, [0.0, 0.5, 0.9], seed=s) for s in range(3)]
        >>> sl.viz.accuracy_vs_sparsity(curves(runs, scope="global", structure=None), logit_x=True);
    """
    if isinstance(sweep_results, Sequence) and sweep_results and isinstance(sweep_results[0], Mapping) \
            and "recipe" in sweep_results[0]:  # records of run()
        by = [k for k in ("recipe", "method") if k not in fixed] if by is None else list(by)
        return _record_curves(sweep_results, metric, by, fixed)
    if by is not None:
        raise ValueError("by= is for the records of run(); sweep results are grouped by method, scope, structure")
    runs = [sweep_results] if isinstance(sweep_results, Mapping) else list(sweep_results)
    if not runs or not all(isinstance(r, Mapping) for r in runs):
        raise TypeError("sweep_results must be the dict returned by sweep, or a list of them (one per seed)")
    for name in fixed:
        if name not in KEY_FIELDS:
            raise ValueError(f"fixed fields must be among {KEY_FIELDS}, got {name!r}")
    fixed = {name: _structure_key(value) if name == "structure" else value for name, value in fixed.items()}
    free = [i for i, name in enumerate(KEY_FIELDS) if name not in fixed]
    groups: Dict[tuple, list] = {}
    for key in runs[0]:
        if all(key[KEY_FIELDS.index(name)] == value for name, value in fixed.items()):
            groups.setdefault(tuple(key[i] for i in free), []).append(key[3])
    out = {}
    for group, sparsities in groups.items():
        points = []
        for sparsity in sorted(sparsities):
            key = list(fixed.get(name) for name in KEY_FIELDS)
            for i, value in zip(free, group):
                key[i] = value
            key = (*key, sparsity)
            records = [run.get(key) for run in runs]
            if all(r is not None and r.get("skipped") is None for r in records):
                if metric not in records[0]:
                    raise ValueError(f"metric must be a record field such as 'accuracy' or 'loss', got {metric!r}")
                points.append((sparsity, [float(r[metric]) for r in records]))
        if points:
            label = ", ".join(structure_label(v) if KEY_FIELDS[i] == "structure" else str(v)
                              for i, v in zip(free, group)) or str(metric)
            values = np.array([p[1] for p in points]).T  # (seeds, S)
            out[label] = ([p[0] for p in points], values if len(runs) > 1 else values[0])
    return out


__all__ = ["Recipe", "RECIPES", "register_recipe", "run", "select", "frame", "curves", "sweep", "structure_label",
           "one_shot", "gradual", "imp", "at_init", "edge_popup", "growth", "regularized", "SWEEP_SCOPES"]
