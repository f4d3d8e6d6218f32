"""One benchmark of every method: same task, same model, same training budget, several seeds (survey §8).

The book's methods live in their own chapters; this module runs them side by side, in the way Blalock et al.
{cite}`blalock2020state` (ShrinkBench) ask of every pruning paper: the same data, model and training recipe for
all, several seeds, whole accuracy-sparsity curves, and the magnitude baselines every row is read against.

* :data:`METHODS`: the methods of the benchmark (:class:`Method`: name, survey family, how it is run), each one
  a call into the library (``sl.experiments`` recipes, ``sl.growth_runs.train_sparse``); none is re-implemented.
  :data:`FAST_METHODS` is the subset the chapter runs live.
* :func:`run`: every method x sparsity x seed, plus the dense reference per seed; rows appended to a CSV as they
  finish (a header with the library version, the scale, the command and the settings), **resumable**: a cell
  already in the file is not recomputed (a file written with other settings is refused).
* Metrics of §8.7 on the rows: :func:`summary`, :func:`ranking`, :func:`parameter_slack`,
  :func:`accuracy_density`, :func:`sota_normalized_efficiency`; per-class effects of §8.8 (Hooker et al.
  {cite}`hooker2019compressed`): :func:`per_class_accuracy`, :func:`class_drops`, :func:`modal_prediction`, :func:`exemplars`.

Training cost (``cost``) is training FLOPs relative to dense training, counted as in
:mod:`sparsity_lib.growth_runs` (a step costs :math:`3 f_S` products per weight at density :math:`f_S`): a
masked step is charged its density, as sparse kernels would; :func:`training_cost` gives the closed forms.

Command line (``make benchmark``)::

    python -m sparsity_lib.benchmark [--out results.csv] [--methods a,b] [--seeds 0,1,2] [--sparsities 0.9,0.95]

with ``SPARSITY_SCALE=full`` for every method, more seeds and longer training.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import config

# ------------------------------------------------------------------------------------------ the methods
FAMILIES = {
    "baseline": "random pruning after training, then fine-tuning: what every method must beat",
    "magnitude": "data-free magnitude pruning after training, then fine-tuning (§3.2)",
    "data-driven": "first- or second-order scores from data after training, then fine-tuning (§3.3-3.5)",
    "gradual": "pruned while training, dense to sparse on a schedule (§2.4.2)",
    "iterative": "train-prune-rewind cycles: IMP and rewinding (§8.3)",
    "at init": "mask chosen before training, then fixed (§2.4.3)",
    "dynamic": "sparse from the start, the mask moves: dynamic sparse training (§4)",
}


KINDS = ("one_shot", "gradual", "at_init", "imp", "sparse")


@dataclass(frozen=True)
class Method:
    """One method of the benchmark: ``kind`` is how it is run (``"one_shot"``, ``"gradual"``, ``"at_init"``,
    ``"imp"``: recipes of :mod:`sparsity_lib.experiments`; ``"sparse"``: dynamic sparse training with
    :func:`sparsity_lib.growth_runs.train_sparse`), ``method`` the library's method name, ``options`` the
    recipe's options."""

    name: str
    family: str
    kind: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    chapter: int = 0
    description: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


_M = Method
METHODS: Dict[str, Method] = {m.name: m for m in (
    _M("random", "baseline", "one_shot", "random", {"scope": "global"}, 3, "random mask after training"),
    _M("global magnitude", "magnitude", "one_shot", "magnitude", {"scope": "global"}, 3,
       "smallest |w| over the whole network"),
    _M("layer-wise magnitude", "magnitude", "one_shot", "magnitude", {"scope": "layerwise"}, 3,
       "smallest |w| of each layer, every layer at the same sparsity"),
    _M("taylor", "data-driven", "one_shot", "taylor", {"scope": "global"}, 5, "(g w)^2 on calibration batches"),
    _M("wanda", "data-driven", "one_shot", "wanda", {"scope": "layerwise"}, 5, "|W| ||X_j|| per output row"),
    _M("gradual magnitude", "gradual", "gradual", "magnitude", {"scope": "global"}, 2,
       "Zhu & Gupta's cubic schedule from dense to the target (global magnitude, 10 cuts, ends at 75%)"),
    _M("imp (lr rewind)", "iterative", "imp", "magnitude", {"rewind": None}, 10,
       "iterative magnitude pruning, trained weights kept, learning rate restarted"),
    _M("imp (theta0)", "iterative", "imp", "magnitude", {"rewind": "theta0"}, 10,
       "lottery tickets: rewind to the initial weights"),
    _M("snip", "at init", "at_init", "snip", {"scope": "global"}, 8, "|g w| at initialization"),
    _M("grasp", "at init", "at_init", "grasp", {"scope": "global"}, 8, "gradient signal preservation"),
    _M("synflow", "at init", "at_init", "synflow", {"scope": "global", "method_options": {"input_shape": (64,)}}, 8,
       "iterative synaptic flow (100 rounds), data-free"),
    _M("static", "dynamic", "sparse", "static", {}, 9, "random sparse mask, never updated"),
    _M("set", "dynamic", "sparse", "set", {}, 9, "drop small |w|, grow at random"),
    _M("rigl", "dynamic", "sparse", "rigl", {}, 9, "drop small |w|, grow by the dense gradient"),
)}
del _M
#: the subset that runs live in the chapter at FAST scale
FAST_METHODS = ("random", "global magnitude", "layer-wise magnitude", "gradual magnitude", "imp (lr rewind)",
                "imp (theta0)", "snip", "synflow", "static", "rigl")
#: the baselines every row is read against (ShrinkBench's practice)
BASELINES = ("global magnitude", "layer-wise magnitude")


def settings(scale: Optional[str] = None) -> Dict[str, Any]:
    """The benchmark's fixed settings at ``scale`` (default ``sl.config.SCALE``): the same for every method."""
    fast = (scale or config.SCALE) == "fast"
    return {
        "task": "digits", "model": "lenet_300_100",
        "epochs": 10 if fast else 30,           # every training, dense or sparse, runs this long
        "finetune_epochs": 4 if fast else 10,   # after one-shot pruning of the trained dense network
        "rounds": 2 if fast else 4,             # IMP rounds (each `epochs` long) before the final training
        "optimizer": "adam", "lr": 0.01, "batch_size": 128,
        "calibration": 256,                     # examples for data-driven scores (task.calibration())
        "methods": list(FAST_METHODS if fast else METHODS),
        "sparsities": [0.9, 0.95, 0.98] if fast else [0.5, 0.8, 0.9, 0.95, 0.98, 0.99],
        "seeds": [0, 1, 2] if fast else [0, 1, 2, 3, 4],
    }


# ------------------------------------------------------------------------------------ training cost
def training_cost(kind: str, density: float, *, epochs: int, finetune_epochs: int = 0, rounds: int = 1) -> float:
    """Training FLOPs relative to dense training of ``epochs`` epochs, with a masked step charged its density
    (closed forms; ``"sparse"`` methods report their own, measured step by step in ``sl.growth_runs``).

    * one_shot: dense training, then ``finetune_epochs`` at density d: :math:`1 + (F/E)\\,d`;
    * at_init: the whole training at density d: :math:`d`;
    * gradual (cubic schedule from 0 at the start to :math:`s = 1 - d` at 3/4 of training, as a continuous
      curve; the library cuts in 10 steps): :math:`\tfrac34 (1 - \tfrac34 s) + \tfrac14 d`;
    * imp: ``rounds`` trainings at densities :math:`q^k` (:math:`k = 0..R-1`, :math:`q = d^{1/R}`), then one
      at d: :math:`\\sum_{k<R} q^k + d`.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if kind == "one_shot":
        return 1.0 + finetune_epochs / epochs * density
    if kind == "at_init":
        return density
    if kind == "gradual":
        return 0.75 * (1.0 - 0.75 * (1.0 - density)) + 0.25 * density
    if kind == "imp":
        q = density ** (1.0 / rounds)
        return sum(q ** k for k in range(rounds)) + density
    raise ValueError(f"kind must be one_shot, at_init or imp (sparse methods measure their cost), got {kind!r}")


# ------------------------------------------------------------------------------------------ one cell
def _predictions(model, task) -> np.ndarray:
    from .plumbing import eval_mode

    with torch.no_grad(), eval_mode(model):
        return model(task.x_test).argmax(dim=1).cpu().numpy()


def _fit_options(s: Mapping) -> Dict[str, Any]:
    return {"optimizer": s["optimizer"], "lr": s["lr"], "batch_size": s["batch_size"], "eval_every": s["epochs"]}


def train_dense(task, seed: int, s: Mapping):
    """The dense reference of ``seed``: ``lenet_300_100(seed)`` trained with the benchmark's recipe."""
    from .models import lenet_300_100
    from .train import fit

    model = lenet_300_100(in_features=task.input_shape[0], out_features=task.num_classes, seed=seed)
    fit(model, task, epochs=s["epochs"], seed=seed, progress=False, **_fit_options(s))
    return model


def run_cell(method: Method, task, sparsity: float, seed: int, s: Mapping, dense=None) -> Tuple[Dict, Any]:
    """Run one method at one sparsity and seed; return ``(row, model)``. ``dense``: the trained dense model of
    ``seed`` (needed by one-shot methods; trained here if not given)."""
    from . import experiments, growth_runs
    from .masks import sparsity as achieved
    from .models import lenet_300_100

    start = time.perf_counter()
    factory = lambda sd: lenet_300_100(in_features=task.input_shape[0], out_features=task.num_classes, seed=sd)
    fit_options = {k: v for k, v in _fit_options(s).items() if k != "eval_every"}
    kept = {}

    def evaluate(net, t):
        from .train import evaluate as ev

        kept["model"] = net
        return ev(net, t)

    if method.kind == "sparse":
        net = factory(seed)
        record = growth_runs.train_sparse(method.method, task, net, sparsity, seed=seed, epochs=s["epochs"],
                                          optimizer=s["optimizer"], lr=s["lr"], batch_size=s["batch_size"],
                                          **dict(method.options))
        cost, kept["model"] = record["cost"], net
    else:
        # data-driven scores read the task's default calibration batches (task.calibration(): 256 examples)
        common = dict(fit_options=fit_options, progress=False, evaluate=evaluate, **dict(method.options))
        if method.kind == "one_shot":
            dense = train_dense(task, seed, s) if dense is None else dense
            records = experiments.run("one_shot", dense, task, [sparsity], [seed], [method.method],
                            finetune_epochs=s["finetune_epochs"], **common)
        elif method.kind in ("at_init", "gradual"):
            records = experiments.run(method.kind, factory, task, [sparsity], [seed], [method.method], epochs=s["epochs"],
                            **common)
        else:
            records = experiments.run("imp", factory, task, [sparsity], [seed], [method.method], epochs=s["epochs"],
                            rounds=s["rounds"], **common)
        if records[0]["skipped"] is not None:
            raise ValueError(f"{method.name} at sparsity {sparsity}: the library refused it: {records[0]['skipped']}")
        d = 1.0 - achieved(kept["model"])
        cost = training_cost(method.kind, d, epochs=s["epochs"], finetune_epochs=s["finetune_epochs"],
                             rounds=s["rounds"])
    model = kept["model"]
    pred = _predictions(model, task)
    row = {"method": method.name, "family": method.family, "target": float(sparsity), "seed": int(seed),
           "accuracy": float((pred == task.y_test.cpu().numpy()).mean()), "sparsity": float(achieved(model)),
           "nonzeros": _nonzeros(model), "cost": float(cost), "seconds": time.perf_counter() - start}
    return row, model


def _nonzeros(model) -> int:
    """Non-zero weights of the prunable layers plus all biases (the parameters a sparse model stores)."""
    from .masks import get_masks, prunable

    masks = get_masks(model)
    count = 0
    for name, w in prunable(model).items():
        count += int(masks[name].sum()) if name in masks else int((w != 0).sum())
    count += sum(int(p.numel()) for n, p in model.named_parameters() if n.endswith("bias"))
    return count


# ------------------------------------------------------------------------------------ the CSV file
COLUMNS = ("method", "family", "target", "seed", "accuracy", "sparsity", "nonzeros", "cost", "seconds")
_SETTING_KEYS = ("task", "model", "epochs", "finetune_epochs", "rounds", "optimizer", "lr", "batch_size",
                 "calibration")


def _header(s: Mapping, scale: str, command: str) -> List[str]:
    from . import __version__

    fixed = ", ".join(f"{k}={s[k]}" for k in _SETTING_KEYS)
    return [f"# sparsity_lib.benchmark results, sparsity_lib {__version__}, torch {torch.__version__}",
            f"# scale: {scale}", f"# command: {command}", f"# settings: {fixed}",
            "# cost: training FLOPs relative to dense training; seconds: wall time of the cell"]


def read_results(path: str) -> Tuple[Dict[str, str], List[Dict[str, Any]]]:
    """``(header, rows)`` of a results file: ``header`` maps ``scale``, ``command``, ``settings`` (and the first
    line under ``title``) to their text; rows have numbers parsed."""
    header: Dict[str, str] = {}
    lines = []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("#"):
                text = line[1:].strip()
                key, sep, value = text.partition(": ")
                header[key if sep and key in ("scale", "command", "settings", "cost") else "title"] = (
                    value if sep and key in ("scale", "command", "settings", "cost") else text)
            elif line.strip():
                lines.append(line)
    rows = []
    for r in csv.DictReader(lines):
        rows.append({k: (r[k] if k in ("method", "family") else int(r[k]) if k in ("seed", "nonzeros")
                         else float(r[k])) for k in COLUMNS})
    return header, rows


def run(path: Optional[str] = None, *, methods: Optional[Sequence[str]] = None,
        sparsities: Optional[Sequence[float]] = None, seeds: Optional[Sequence[int]] = None, task=None,
        scale: Optional[str] = None, progress: Optional[bool] = None, command: Optional[str] = None,
        keep_predictions: bool = False) -> Dict[str, Any]:
    """Run the benchmark: the dense reference and every method x sparsity x seed (defaults from
    :func:`settings`). Returns ``{"rows", "settings", "predictions"}``; ``predictions[(method, target, seed)]`` is
    the test-set prediction of each cell computed *in this call* (``keep_predictions=True``; dense cells under
    ``("dense", 0.0, seed)``), for :func:`class_drops` and :func:`exemplars`.

    ``path``: a CSV file (created with a header; if it exists, its cells are kept and not recomputed, and its
    header must have the same scale and settings, or a ``ValueError`` says what differs).
    """
    from .data import digits

    scale = scale or config.SCALE
    if scale not in config.SCALES:
        raise ValueError(f"scale must be one of {config.SCALES}, got {scale!r}")
    s = settings(scale)
    methods = list(s["methods"] if methods is None else methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: {m!r} is not a benchmark method; known: {sorted(METHODS)}")
    sparsities = [float(x) for x in (s["sparsities"] if sparsities is None else sparsities)]
    for x in sparsities:
        if not 0.0 < x < 1.0:
            raise ValueError(f"sparsities must be in (0, 1), got {x!r}")
    seeds = [int(x) for x in (s["seeds"] if seeds is None else seeds)]
    if not methods or not sparsities or not seeds:
        raise ValueError("methods, sparsities and seeds must each name at least one value")
    task = digits(seed=0) if task is None else task
    command = command or " ".join(["python -m sparsity_lib.benchmark"] + sys.argv[1:] if __name__ == "__main__"
                                  else ["sparsity_lib.benchmark.run(...)"])
    rows: List[Dict[str, Any]] = []
    if path is not None and os.path.exists(path):
        header, rows = read_results(path)
        expected = _header(s, scale, command)
        mine = {"scale": scale, "settings": expected[3].split(": ", 1)[1]}
        for key, value in mine.items():
            if header.get(key) != value:
                raise ValueError(f"{path} was written with {key} {header.get(key)!r}, this run has {value!r}: "
                                 f"use another path or the same settings")
    elif path is not None:
        with open(path, "w", newline="") as f:
            f.write("\n".join(_header(s, scale, command)) + "\n")
            csv.writer(f).writerow(COLUMNS)
    done = {(r["method"], r["target"], r["seed"]) for r in rows}
    cells = [("dense", 0.0, seed) for seed in seeds]
    cells += [(m, x, seed) for seed in seeds for m in methods for x in sparsities]
    todo = [c for c in cells if (c[0], c[1], c[2]) not in done]
    predictions: Dict[tuple, np.ndarray] = {}
    show = config.progress_enabled() if progress is None else bool(progress)
    bar = None
    if show and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="benchmark")
    dense_models: Dict[int, Any] = {}
    for name, target, seed in todo:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if name == "dense":
                start = time.perf_counter()
                model = dense_models[seed] = train_dense(task, seed, s)
                pred = _predictions(model, task)
                row = {"method": "dense", "family": "dense", "target": 0.0, "seed": seed,
                       "accuracy": float((pred == task.y_test.cpu().numpy()).mean()), "sparsity": 0.0,
                       "nonzeros": _nonzeros(model), "cost": 1.0, "seconds": time.perf_counter() - start}
            else:
                method = METHODS[name]
                dense = None
                if method.kind == "one_shot":
                    if seed not in dense_models:
                        dense_models[seed] = train_dense(task, seed, s)
                    dense = dense_models[seed]
                row, model = run_cell(method, task, target, seed, s, dense=dense)
                pred = _predictions(model, task) if keep_predictions else None
        if keep_predictions:
            predictions[(name, target, seed)] = pred
        rows.append(row)
        if path is not None:
            with open(path, "a", newline="") as f:
                csv.writer(f).writerow([_format(row[k]) for k in COLUMNS])
        if bar is not None:
            bar.set_postfix_str(f"{name} {target:g} seed {seed}: {row['accuracy']:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    wanted = {(m, x, seed) for m, x, seed in cells}
    rows = [r for r in rows if (r["method"], r["target"], r["seed"]) in wanted]
    return {"rows": rows, "settings": {**s, "methods": methods, "sparsities": sparsities, "seeds": seeds},
            "predictions": predictions}


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


# ------------------------------------------------------------------------------------------ metrics
def summary(rows: Sequence[Mapping]) -> Dict[Tuple[str, float], Dict[str, Any]]:
    """``{(method, target): {"mean", "std", "min", "max", "n", "accuracies", "seeds", "cost", "sparsity",
    "nonzeros", "family"}}`` over seeds (accuracies in seed order)."""
    groups: Dict[Tuple[str, float], List[Mapping]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["target"])), []).append(r)
    out = {}
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        acc = np.array([r["accuracy"] for r in group], dtype=float)
        out[key] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    "min": float(acc.min()), "max": float(acc.max()), "n": len(acc), "accuracies": acc,
                    "seeds": [r["seed"] for r in group], "family": group[0]["family"],
                    "cost": float(np.mean([r["cost"] for r in group])),
                    "sparsity": float(np.mean([r["sparsity"] for r in group])),
                    "nonzeros": float(np.mean([r["nonzeros"] for r in group]))}
    return out


def ranking(rows: Sequence[Mapping], target: float) -> List[Dict[str, Any]]:
    """The methods at ``target`` sparsity, best mean accuracy first; each entry also says in how many seeds it
    beat the next one down (``wins_over_next`` of ``n_common``: the seeds both ran), so an ordering supported
    by 2 of 3 seeds is not mistaken for a fact."""
    table = summary(rows)
    entries = sorted(((m, v) for (m, t), v in table.items() if t == float(target) and m != "dense"),
                     key=lambda item: -item[1]["mean"])
    if not entries:
        raise ValueError(f"no rows at target sparsity {target!r}")
    out = []
    for i, (m, v) in enumerate(entries):
        entry = {"rank": i + 1, "method": m, "family": v["family"], "mean": v["mean"], "std": v["std"], "n": v["n"]}
        if i + 1 < len(entries):
            other = entries[i + 1][1]
            mine = dict(zip(v["seeds"], v["accuracies"]))
            theirs = dict(zip(other["seeds"], other["accuracies"]))
            common = sorted(set(mine) & set(theirs))
            entry.update(next=entries[i + 1][0], wins_over_next=sum(mine[k] > theirs[k] for k in common),
                         n_common=len(common))
        out.append(entry)
    return out


def parameter_slack(rows: Sequence[Mapping], method: str, drops: Sequence[float] = (0.0, 0.01, 0.05)) -> Dict[float, float]:
    """Survey §8.7's parameter slack: for each allowed *relative* drop δ, the largest tested sparsity at which the
    method's mean accuracy over seeds is at least :math:`(1 - δ)` times the dense mean accuracy (0.0: not even
    the lowest tested sparsity qualifies; the dense network trivially does)."""
    table = summary(rows)
    if ("dense", 0.0) not in table:
        raise ValueError("rows have no dense reference (method 'dense')")
    dense = table[("dense", 0.0)]["mean"]
    points = sorted((t, v["mean"]) for (m, t), v in table.items() if m == method)
    if not points:
        raise ValueError(f"no rows of method {method!r}")
    out = {}
    for delta in drops:
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"drops must be fractions in [0, 1), got {delta!r}")
        ok = [t for t, acc in points if acc >= (1.0 - delta) * dense]
        out[float(delta)] = max(ok) if ok else 0.0
    return out


def accuracy_density(accuracy: float, parameters: float) -> float:
    """Bianco et al.'s accuracy density {cite}`bianco2018benchmark`: accuracy in percent per million parameters
    (survey §8.7). Rewards small models without limit: 10% accuracy with 10 parameters scores 10^6."""
    if parameters <= 0:
        raise ValueError(f"parameters must be positive, got {parameters!r}")
    return 100.0 * accuracy / (parameters / 1e6)


def sota_normalized_efficiency(correct: float, parameters: float, a: float = 6142.09, b: float = 30575.0) -> float:
    """The survey's SotA-normalized parameter efficiency (§8.7): correct validation predictions mapped through the
    inverse of the fitted ImageNet progress curve :math:`f(t) = a \\ln t + b` (``t``: years since 2012), i.e.
    :math:`\\exp((c - b)/a)` "years of research", per million parameters. The constants are the survey's fit to
    ImageNet's 50,000 validation images (2012-2020): the number means nothing on another data set."""
    if parameters <= 0:
        raise ValueError(f"parameters must be positive, got {parameters!r}")
    return math.exp((correct - b) / a) / (parameters / 1e6)


# ------------------------------------------------------------------------------------ per-class effects
def per_class_accuracy(pred, labels, num_classes: int) -> np.ndarray:
    """Accuracy of ``pred`` on each class (NaN for a class absent from ``labels``)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred and labels must have the same shape, got {pred.shape} and {labels.shape}")
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            out[c] = float((pred[sel] == c).mean())
    return out


def class_drops(dense_preds: Sequence, pruned_preds: Sequence, labels, num_classes: int) -> Dict[str, np.ndarray]:
    """Hooker et al.'s per-class view (survey §8.8): mean over seeds of the per-class accuracy of the dense and the
    pruned models, their difference ``drop`` per class, and ``overall`` (the drop of the overall accuracy), so a
    class that loses more than the average stands out (``drop - overall`` > 0)."""
    if len(dense_preds) == 0 or len(pruned_preds) == 0:
        raise ValueError("dense_preds and pruned_preds need at least one prediction array each")
    labels = np.asarray(labels)
    dense = np.mean([per_class_accuracy(p, labels, num_classes) for p in dense_preds], axis=0)
    pruned = np.mean([per_class_accuracy(p, labels, num_classes) for p in pruned_preds], axis=0)
    overall = float(np.mean([(np.asarray(p) == labels).mean() for p in dense_preds])
                    - np.mean([(np.asarray(p) == labels).mean() for p in pruned_preds]))
    return {"dense": dense, "pruned": pruned, "drop": dense - pruned, "overall": overall}


def modal_prediction(preds: Sequence) -> np.ndarray:
    """The most frequent prediction of a population of models for each example (ties: the smallest label)."""
    stack = np.stack([np.asarray(p) for p in preds])          # (models, examples)
    counts = np.apply_along_axis(np.bincount, 0, stack, minlength=int(stack.max()) + 1)
    return counts.argmax(axis=0)                               # ties: the smallest label


def exemplars(dense_preds: Sequence, pruned_preds: Sequence) -> np.ndarray:
    """Pruning-identified exemplars (Hooker et al. {cite}`hooker2019compressed`): the indices of the examples on
    which the *modal* prediction of the pruned models differs from the modal prediction of the dense models (a
    population of each, e.g. one per seed; ties go to the smallest label)."""
    if len(dense_preds) == 0 or len(pruned_preds) == 0:
        raise ValueError("dense_preds and pruned_preds need at least one prediction array each")
    return np.flatnonzero(modal_prediction(dense_preds) != modal_prediction(pruned_preds))


# ------------------------------------------------------------------------------------- command line
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsity_lib.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=f"benchmark_{config.SCALE}.csv", help="results CSV (resumed if it exists)")
    parser.add_argument("--methods", help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--sparsities", help="comma-separated, e.g. 0.9,0.95")
    parser.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    args = parser.parse_args(argv)
    config.setup(seed=0)
    command = " ".join(["python -m sparsity_lib.benchmark"] + list(sys.argv[1:] if argv is None else argv))
    result = run(args.out, methods=args.methods.split(",") if args.methods else None,
                 sparsities=[float(x) for x in args.sparsities.split(",")] if args.sparsities else None,
                 seeds=[int(x) for x in args.seeds.split(",")] if args.seeds else None,
                 command=command, progress=True)
    for target in result["settings"]["sparsities"]:
        print(f"\nsparsity {target:g}:")
        for e in ranking(result["rows"], target):
            extra = f"  (beat {e['next']} in {e['wins_over_next']}/{e['n_common']} seeds)" if "next" in e else ""
            print(f"  {e['rank']:2d}. {e['method']:22s} {e['mean']:.3f} ± {e['std']:.3f}{extra}")
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
