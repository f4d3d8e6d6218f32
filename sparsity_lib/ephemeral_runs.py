"""The experiments of Chapter 11 as library functions that return records (one dict per run).

:func:`run` trains one MLP with one kind of ephemeral sparsity switched on (compressed gradients, an activation
penalty, meProp, DropConnect or targeted dropout) and measures what the chapter needs; :func:`grid` runs a list
of settings over seeds. :func:`moe_runs` trains mixtures of experts. The chapter only plots and checks claims.

A *setting* is a dict with any of these keys (all optional; ``{}`` is plain SGD):

* ``"gradient": (method, ratio, error_feedback)`` with method ``"topk"`` or ``"randomk"``
  (:class:`~sparsity_lib.ephemeral.GradientCompression`);
* ``"activation": (kind, strength)`` with kind ``"l1"`` or ``"hoyer"`` (:func:`~sparsity_lib.ephemeral.activation_l1`);
* ``"meprop": k`` (:func:`~sparsity_lib.ephemeral.meprop`);
* ``"dropout": ("dropconnect", p)`` or ``("targeted", alpha, gamma)`` (weight dropout on every Linear layer).

Defined in Chapter 11.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from . import config, ephemeral, models, moe
from .pruning import prune
from .train import evaluate, fit

SETTING_KEYS = ("gradient", "activation", "meprop", "dropout")


def label(setting: Mapping) -> str:
    """A short name of a setting, e.g. ``"topk 1% EF"``, ``"l1 0.001"``, ``"dense"``."""
    parts = []
    if "gradient" in setting:
        method, ratio, ef = setting["gradient"]
        parts.append(f"{method} {100 * ratio:g}%{' EF' if ef else ''}")
    if "activation" in setting:
        parts.append(f"{setting['activation'][0]} {setting['activation'][1]:g}")
    if "meprop" in setting:
        parts.append(f"meprop k={setting['meprop']}")
    if "dropout" in setting:
        parts.append(" ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in setting["dropout"]))
    return ", ".join(parts) or "dense"


def _check_setting(setting: Mapping) -> None:
    unknown = set(setting) - set(SETTING_KEYS)
    if unknown:
        raise ValueError(f"unknown setting keys {sorted(unknown)}; the keys are {SETTING_KEYS}")
    if "gradient" in setting and setting["gradient"][0] not in ("topk", "randomk"):
        raise ValueError(f"gradient method must be 'topk' or 'randomk', got {setting['gradient'][0]!r}")
    if "activation" in setting and setting["activation"][0] not in ("l1", "hoyer"):
        raise ValueError(f"activation penalty must be 'l1' or 'hoyer', got {setting['activation'][0]!r}")
    if "dropout" in setting and setting["dropout"][0] not in ("dropconnect", "targeted"):
        raise ValueError(f"dropout must be 'dropconnect' or 'targeted', got {setting['dropout'][0]!r}")


def run(task, setting: Mapping, seed: int, *, hidden: Sequence[int] = (128,), epochs: int = 20, lr: float = 0.1,
        momentum: float = 0.0, batch_size: int = 64, prune_sparsities: Sequence[float] = (),
        formats: Sequence[str] = ephemeral.COMMUNICATION_FORMATS) -> Dict:
    """Train ``sl.models.mlp(task.in_features, hidden, task.num_classes, seed=seed)`` with SGD (``lr``,
    ``momentum``, cosine decay; batch order and dropout draws from ``seed``) under ``setting``; return a record:

    ``setting``, ``label``, ``seed``, ``epoch`` and ``test_acc`` (the curve, one point per epoch), ``steps``,
    ``accuracy`` (final), ``activation_init`` / ``activation_trained`` (:func:`activation_sparsity` per layer of
    the fresh and trained network, on the test split) and ``activation_init_all`` / ``activation_trained_all``
    (over all hidden activations); with a gradient compressor also ``values_sent`` and ``values_dense`` per step
    and ``bits`` (``{format: bits of the last step's update}``); with ``prune_sparsities`` also ``pruned``
    (``{sparsity: test accuracy after one-shot layer-wise magnitude pruning of the trained weights}``, weight
    dropout removed first, no fine-tuning).
    """
    _check_setting(setting)
    config.seed_everything(seed)
    model = models.mlp(task.in_features, tuple(hidden), task.num_classes, seed=seed)
    record = {"setting": dict(setting), "label": label(setting), "seed": seed,
              "activation_init": ephemeral.activation_sparsity(model, task),
              "activation_init_all": ephemeral.activation_sparsity(model, task, per_layer=False)}
    callbacks, penalty, handles = [], None, []
    if "gradient" in setting:
        method, ratio, ef = setting["gradient"]
        compressor = ephemeral.TopK(ratio, ef) if method == "topk" else ephemeral.RandomK(ratio, ef, seed=seed)
        callbacks.append(ephemeral.GradientCompression(compressor))
    if "activation" in setting:
        kind, strength = setting["activation"]
        penalty = (ephemeral.activation_l1 if kind == "l1" else ephemeral.activation_hoyer)(model, strength)
        handles.append(penalty)
    if "meprop" in setting:
        handles.append(ephemeral.meprop(model, setting["meprop"]))
    if "dropout" in setting:
        if setting["dropout"][0] == "dropconnect":
            ephemeral.add_drop_connect(model, setting["dropout"][1])
        else:
            ephemeral.add_targeted_dropout(model, *setting["dropout"][1:])
    try:
        history = fit(model, task, epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size,
                      callbacks=callbacks, penalty=penalty, seed=seed, progress=False)
    finally:
        for h in handles:
            h.remove()
    ephemeral.remove_weight_dropout(model)
    record.update(epoch=[h["epoch"] for h in history], test_acc=[h["test_acc"] for h in history],
                  steps=history[-1]["step"], accuracy=history[-1]["test_acc"],
                  activation_trained=ephemeral.activation_sparsity(model, task),
                  activation_trained_all=ephemeral.activation_sparsity(model, task, per_layer=False))
    if callbacks:
        cb = callbacks[0]
        record.update(values_sent=cb.values_sent / cb.steps, values_dense=cb.values_dense / cb.steps,
                      bits={fmt: ephemeral.update_bits(cb.last_updates, fmt) for fmt in formats})
    if prune_sparsities:
        pruned = {}
        for s in prune_sparsities:
            copy_ = copy.deepcopy(model)
            if s > 0:
                prune(copy_, s, method="magnitude", scope="layerwise")
            pruned[float(s)] = evaluate(copy_, task)["accuracy"]
        record["pruned"] = pruned
    return record


def grid(task, settings: Iterable[Mapping], seeds: Iterable[int], **options) -> List[Dict]:
    """:func:`run` for every setting and seed (settings outer, seeds inner); ``options`` go to :func:`run`."""
    settings, seeds = list(settings), list(seeds)
    for s in settings:
        _check_setting(s)
    return [run(task, s, seed, **options) for s in settings for seed in seeds]


def select(records: Sequence[Dict], **where) -> List[Dict]:
    """The records whose ``label`` (or other top-level field) equals every given value, in seed order."""
    out = [r for r in records if all(r.get(k) == v for k, v in where.items())]
    if not out:
        raise KeyError(f"no record with {where}")
    return sorted(out, key=lambda r: r["seed"])


def moe_runs(task, settings: Iterable[Mapping], seeds: Iterable[int], *, epochs: int = 20, lr: float = 0.05,
             momentum: float = 0.9, batch_size: int = 64, dim: int = 32, hidden: int = 32) -> List[Dict]:
    """Train :class:`~sparsity_lib.moe.MoEClassifier` networks; ``settings`` are dicts with ``num_experts``,
    ``k`` and ``balance`` (the coefficient of :func:`~sparsity_lib.moe.balance_penalty`, 0 for none), and
    optionally ``hidden`` (expert width, default ``hidden``). Returns one record per setting and seed with
    the setting, ``seed``, ``accuracy``, ``load`` (test examples per expert, eval mode), ``imbalance``
    (:func:`~sparsity_lib.moe.load_imbalance`), ``experts_used`` (experts with any test example) and the layer's
    :meth:`~sparsity_lib.moe.TopKMoE.cost`."""
    records = []
    for setting in settings:
        for seed in seeds:
            config.seed_everything(seed)
            width = setting.get("hidden", hidden)
            model = moe.MoEClassifier(task.in_features, task.num_classes, dim=dim, num_experts=setting["num_experts"],
                                      k=setting["k"], hidden=width)
            penalty = moe.balance_penalty(setting["balance"]) if setting["balance"] > 0 else None
            history = fit(model, task, epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size,
                          penalty=penalty, seed=seed, eval_every=epochs, progress=False)
            load = moe.expert_load(model, task.x_test)
            records.append({**setting, "seed": seed, "accuracy": history[-1]["test_acc"], "load": load.tolist(),
                            "imbalance": moe.load_imbalance(load), "experts_used": int((load > 0).sum()),
                            **model.moe.cost()})
    return records


__all__ = ["run", "grid", "select", "label", "moe_runs", "SETTING_KEYS"]
