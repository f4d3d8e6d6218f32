"""The experiment runner: recipes x methods x sparsities x seeds -> records, and the one-shot sweep.

Oracles: sweep masks against an independent NumPy top-k of |w| and its accuracies against re-applying the stored
masks; run's one-shot records against sl.prune + sl.train.fit written out by hand with the same seeds; IMP's
per-round sparsities against the closed form 1 - (1 - rate)^r; gradual's final sparsity against the target;
the caller's RNG state left alone; growth and regularized recipes through a registered stand-in.
"""

import copy
import math
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import sparsity_lib as sl  # noqa: E402
from sparsity_lib import experiments, viz  # noqa: E402


# --------------------------------------------------------------------------------------- sweep (one-shot)
SPARSITIES = [0.0, 0.5, 0.9]


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained (full-batch gradient descent) on a teacher-student task, and the task."""
    task = sl.data.teacher_student(n_train=512, n_test=256, in_features=16, hidden=16, num_classes=4, seed=0)
    model = sl.models.mlp(16, (32, 16), 4, seed=0)
    for _ in range(150):
        model.zero_grad()
        F.cross_entropy(model(task.x_train), task.y_train).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    model.zero_grad()
    assert sl.train.evaluate(model, task)["accuracy"] > 0.7
    return model, task


@pytest.fixture(scope="module")
def results(trained):
    model, task = trained
    return experiments.sweep(model, task, SPARSITIES, structures=(None, (2, 4)))


def test_sweep_records_match_the_request(trained, results):
    model, task = trained
    total = sum(w.numel() for w in sl.prunable(model).values())
    assert len(results) == 2 * 2 * 2 * len(SPARSITIES)
    valid = {k: r for k, r in results.items() if r["skipped"] is None}
    assert {k[3] for k in valid if k[2] == (2, 4)} == {0.5}
    for (method, scope, structure, sparsity), record in valid.items():
        assert abs(record["sparsity"] - sparsity) <= 1 / total
        assert set(record["masks"]) == set(sl.prunable(model))
        for name, mask in record["masks"].items():
            assert mask.dtype == torch.bool and mask.device.type == "cpu"
            assert record["densities"][name] == pytest.approx(mask.float().mean().item())
        if scope == "layerwise" and structure is None:
            for name, mask in record["masks"].items():
                assert abs(record["densities"][name] - (1 - sparsity)) <= 1 / mask.numel()
        # Independent check of the stored accuracy: the stored masks on a fresh copy give the same numbers.
        copy_ = sl.apply_masks(copy.deepcopy(model), record["masks"])
        again = sl.train.evaluate(copy_, task)
        assert record["accuracy"] == pytest.approx(again["accuracy"])
        assert record["loss"] == pytest.approx(again["loss"])
    dense = sl.train.evaluate(model, task)["accuracy"]
    assert results[("magnitude", "global", None, 0.0)]["accuracy"] == pytest.approx(dense)
    assert not any(parametrize.is_parametrized(m) for m in model.modules()), "the trained model is untouched"


def test_sweep_global_magnitude_masks_match_numpy_topk(trained, results):
    model, _ = trained
    weights = {n: w.detach().numpy() for n, w in sl.prunable(model).items()}
    flat = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    keep = round(0.1 * flat.size)
    threshold = np.sort(flat)[-keep]
    masks = results[("magnitude", "global", None, 0.9)]["masks"]
    for name, w in weights.items():
        np.testing.assert_array_equal(masks[name].numpy(), np.abs(w) >= threshold)


def test_curves_feed_accuracy_vs_sparsity(trained, results):
    model, task = trained
    by_method = experiments.curves(results, scope="global", structure=None)
    assert list(by_method) == ["magnitude", "random"]
    xs, values = by_method["random"]
    assert xs == SPARSITIES
    assert list(values) == [results[("random", "global", None, s)]["accuracy"] for s in SPARSITIES]
    nm = experiments.curves(results, method="magnitude", structure=(2, 4))
    assert nm == {"global": ([0.5], [results[("magnitude", "global", (2, 4), 0.5)]["accuracy"]]),
                  "layerwise": ([0.5], [results[("magnitude", "layerwise", (2, 4), 0.5)]["accuracy"]])}
    assert set(experiments.curves(results, method="random")) == {"global, unstructured", "global, 2:4",
                                                              "layerwise, unstructured", "layerwise, 2:4"}
    # Several seeds: values (seeds, S), and the figure's band spans them.
    state = torch.get_rng_state()
    runs = [experiments.sweep(model, task, [0.5, 0.9], methods=("random",), scopes=("global",), seed=s) for s in (0, 1)]
    assert torch.equal(torch.get_rng_state(), state), "sweep leaves the caller's RNG alone"
    per_seed = experiments.curves(runs, metric="loss")
    xs, values = per_seed["random, global, unstructured"]
    assert xs == [0.5, 0.9] and values.shape == (2, 2)
    assert values[1, 1] == runs[1][("random", "global", None, 0.9)]["loss"]
    ax = viz.accuracy_vs_sparsity(per_seed)
    assert len(ax.lines) == 1 and len(ax.collections) == 1
    with pytest.raises(ValueError, match="fixed fields"):
        experiments.curves(results, seed=0)


def test_sweep_records_invalid_combinations_instead_of_raising(results):
    record = results[("magnitude", "global", (2, 4), 0.9)]
    assert "1 - n/m" in record["skipped"]
    assert record["masks"] is None and np.isnan(record["accuracy"])


def test_sweep_budget_scopes_finetune_and_validation(trained):
    model, task = trained
    calls = []

    def finetune(m):  # sets every stored weight to 1: the masks must still hold
        calls.append(1)
        sl.set_weights(m, {n: torch.ones_like(v) for n, v in sl.prunable(m).items()})

    out = experiments.sweep(model, task, [0.8], methods=("magnitude",), scopes=("erk",), finetune=finetune)
    record = out[("magnitude", "erk", None, 0.8)]
    assert len(calls) == 1
    erk = sl.budgets.erk(model, 0.8)
    for name, mask in record["masks"].items():
        assert abs(record["densities"][name] - (1 - erk[name])) <= 1 / mask.numel()
    with pytest.raises(ValueError, match="method"):
        experiments.sweep(model, task, [0.5], methods=("magnitudes",))
    with pytest.raises(ValueError, match="scopes"):
        experiments.sweep(model, task, [0.5], scopes=("local",))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        experiments.sweep(model, task, [1.0])
    with pytest.raises(TypeError, match="finetune"):
        experiments.sweep(model, task, [0.5], finetune="yes")


# ------------------------------------------------------------------------------------------------------ run
def small_task():
    return sl.data.teacher_student(n_train=256, n_test=128, in_features=12, hidden=12, num_classes=3, seed=1)


def fresh(seed):
    return sl.models.mlp(12, (24,), 3, seed=seed)


def test_one_shot_records_equal_the_hand_written_loop(trained):
    model, task = trained
    state = torch.get_rng_state()
    records = experiments.run("one_shot", model, task, [0.5, 0.9], seeds=[0, 1], methods=["magnitude", "random"],
                              finetune_epochs=1, fit_options={"lr": 0.05}, method_options=None, progress=False)
    assert torch.equal(torch.get_rng_state(), state), "run leaves the caller's RNG alone"
    assert not any(parametrize.is_parametrized(m) for m in model.modules()), "the given model is untouched"
    assert [(r["seed"], r["method"], r["target"]) for r in records] == [
        (s, m, t) for s in (0, 1) for m in ("magnitude", "random") for t in (0.5, 0.9)]
    fields = {"recipe", "method", "target", "sparsity", "seed", "accuracy", "loss", "seconds", "skipped"}
    assert all(set(r) == fields for r in records)
    for r in records:  # the same point written out by hand
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r["seed"])
            net = copy.deepcopy(model)
            sl.prune(net, r["target"], method=r["method"], **({"seed": None} if r["method"] == "random" else {}))
            sl.train.fit(net, task, epochs=1, lr=0.05, seed=r["seed"], progress=False)
            expected = sl.train.evaluate(net, task)
        assert r["accuracy"] == pytest.approx(expected["accuracy"]) and r["loss"] == pytest.approx(expected["loss"])
        assert r["sparsity"] == pytest.approx(sl.sparsity(net)) and abs(r["sparsity"] - r["target"]) < 0.01
        assert r["recipe"] == "one_shot" and r["skipped"] is None and r["seconds"] > 0
    curves = experiments.curves(records)
    assert list(curves) == ["one_shot, magnitude", "one_shot, random"]
    xs, values = curves["one_shot, random"]
    assert xs == [0.5, 0.9] and values.shape == (2, 2)
    assert values[1, 0] == experiments.select(records, method="random", seed=1, target=0.5)[0]["accuracy"]
    ax = viz.accuracy_vs_sparsity(curves)
    assert len(ax.lines) == 2
    frame = experiments.frame(records)
    assert len(frame) == 8 and {"recipe", "method", "target", "accuracy"} <= set(frame.columns)


def test_run_records_invalid_points_keeps_masks_and_validates(trained):
    model, task = trained
    with pytest.warns(UserWarning, match="1 of 2 points were skipped"):
        records = experiments.run("one_shot", model, task, [0.5, 0.9], structure=(2, 4), keep_masks=True,
                                  progress=False)
    ok, bad = records
    assert ok["skipped"] is None and ok["sparsity"] == pytest.approx(0.5)
    assert set(ok["masks"]) == set(sl.prunable(model)) and ok["densities"]["fc1.weight"] == pytest.approx(0.5)
    assert "1 - n/m" in bad["skipped"] and math.isnan(bad["accuracy"])
    with pytest.raises(ValueError, match="recipe must be one of"):
        experiments.run("two_shot", model, task, [0.5])
    with pytest.raises(ValueError, match="method must be one of"):
        experiments.run("one_shot", model, task, [0.5], methods=["magnitudes"])
    with pytest.raises(TypeError, match="no option 'epochs'"):
        experiments.run("one_shot", model, task, [0.5], epochs=3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        experiments.run("one_shot", model, task, [1.0])
    with pytest.raises(ValueError, match="seeds"):
        experiments.run("one_shot", model, task, [0.5], seeds=["abc"])
    with pytest.raises(ValueError, match="edge_popup"):
        experiments.run("edge_popup", model, task, [0.5], methods=["magnitude"])
    with pytest.raises(ValueError, match="one of"):
        experiments.run("growth", model, task, [0.5], methods=["rigl2"])


def test_imp_recipe_rounds_follow_the_closed_form_and_rewind_options():
    task = small_task()
    records = experiments.run("imp", fresh, task, [0.875], seeds=[0], rounds=3, epochs=1, progress=False)
    (r,) = records
    rate = sl.lottery.rate_for(0.875, 3)
    assert rate == pytest.approx(0.5)
    assert [x["round"] for x in r["rounds"]] == [1, 2, 3]
    for x in r["rounds"]:
        assert x["sparsity"] == pytest.approx(1 - (1 - rate) ** x["round"], abs=0.01)
    assert r["sparsity"] == pytest.approx(0.875, abs=0.01)
    # the recipe equals lottery.imp written out by hand (θ0 tickets, one more training at the end)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = fresh(0)
        theta_0 = sl.lottery.capture(net)
        train = lambda m: {"accuracy": sl.train.fit(m, task, epochs=1, seed=0, progress=False)[-1]["test_acc"]}  # noqa: E731
        sl.lottery.imp(net, train, 3, rate, rewind_state=theta_0)
        train(net)
        assert r["accuracy"] == pytest.approx(sl.train.evaluate(net, task)["accuracy"])
    k = experiments.run("imp", fresh, task, [0.75], rounds=2, rewind=3, epochs=1, progress=False)[0]
    none = experiments.run("imp", fresh, task, [0.75], rounds=2, rewind=None, epochs=1, progress=False)[0]
    for x in (k, none):
        assert [y["round"] for y in x["rounds"]] == [1, 2] and x["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert k["accuracy"] != none["accuracy"] or k["loss"] != none["loss"]
    dense = experiments.run("imp", fresh, task, [0.0], epochs=1, progress=False)[0]
    assert dense["sparsity"] == 0.0 and dense["rounds"] == []
    with pytest.raises(ValueError, match="rewind"):
        experiments.run("imp", fresh, task, [0.5], rewind="theta_k", progress=False)


def test_gradual_at_init_and_edge_popup_reach_their_targets():
    task = small_task()
    gradual = experiments.run("gradual", fresh, task, [0.8], methods=["magnitude"], epochs=2, progress=False)[0]
    assert gradual["sparsity"] == pytest.approx(0.8, abs=0.01) and gradual["skipped"] is None
    at_init = experiments.run("at_init", fresh, task, [0.7], methods=["snip", "random"], epochs=1,
                              progress=False)
    for r in at_init:
        assert r["sparsity"] == pytest.approx(0.7, abs=0.01)
    popup = experiments.run("edge_popup", fresh, task, [0.5], epochs=1, keep_masks=True, progress=False)[0]
    assert popup["method"] == "edge_popup" and popup["sparsity"] == pytest.approx(0.5, abs=0.01)
    net = fresh(0)  # edge-popup never changes a weight: the kept weights are those of the initialization
    masks = sl.lottery.edge_popup(net, task, 0.5, epochs=1, seed=0, progress=False)
    assert all(torch.equal(masks[n], popup["masks"][n]) for n in masks)


def test_regularized_recipe_and_recipe_slot():
    task = small_task()
    l1 = lambda model: 1e-3 * sum(w.abs().sum() for w in sl.prunable(model).values())  # noqa: E731
    r = experiments.run("regularized", fresh, task, [0.6], penalty=l1, epochs=1, progress=False)[0]
    assert r["sparsity"] == pytest.approx(0.6, abs=0.01)
    with pytest.raises(ValueError, match="penalty"):
        experiments.run("regularized", fresh, task, [0.6], epochs=1, progress=False)
    calls = []

    def halve(model, task, sparsity, *, method, seed, factor: float = 1.0):
        calls.append((method, seed, factor))
        sl.prune(model, sparsity * factor, method=method)
        return {"factor": factor}

    experiments.register_recipe("halve", halve, description="test recipe")
    try:
        out = experiments.run("halve", fresh, task, [0.8], seeds=[3], factor=0.5, progress=False)
        assert calls == [("magnitude", 3, 0.5)] and out[0]["factor"] == 0.5
        assert out[0]["sparsity"] == pytest.approx(0.4, abs=0.01)
        with pytest.raises(ValueError, match="exists"):
            experiments.register_recipe("halve", halve)
    finally:
        experiments.RECIPES.pop("halve")


def test_growth_recipe_uses_the_catalogue_rule():
    growth = pytest.importorskip("sparsity_lib.growth")
    task = small_task()
    records = experiments.run("growth", fresh, task, [0.8], methods=["set", "rigl"], epochs=1, update_every=4,
                              progress=False)
    for r in records:
        assert r["skipped"] is None and r["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert growth is not None


def test_sweep_exclude_keeps_a_layer_per_structure(trained):
    model, task = trained
    out = experiments.sweep(model, task, [0.5], methods=("magnitude",), scopes=("global",),
                            structures=(None, "neuron"), exclude=lambda st: ["fc3.weight"] if st == "neuron" else [])
    assert out[("magnitude", "global", "neuron", 0.5)]["densities"]["fc3.weight"] == 1.0
    assert out[("magnitude", "global", None, 0.5)]["densities"]["fc3.weight"] < 1.0
    fixed = experiments.sweep(model, task, [0.5], methods=("magnitude",), scopes=("global",), exclude=["fc1.weight"])
    assert fixed[("magnitude", "global", None, 0.5)]["densities"]["fc1.weight"] == 1.0


def test_records_drive_an_explorer_directly(trained):
    model, task = trained
    records = experiments.run("one_shot", model, task, [0.5, 0.8], seeds=[0, 1], methods=["magnitude", "random"],
                              progress=False)

    def lookup(sparsity, method):
        return experiments.select(records, target=sparsity, method=method)   # one record per seed

    def render(rows, fig, sparsity, method):
        viz.accuracy_vs_sparsity(experiments.curves(records, method=method), ax=fig.subplots())

    explorer = sl.widgets.Explorer({"sparsity": [0.5, 0.8], "method": ["magnitude", "random"]}, lookup, render,
                                   figsize=(3, 2))
    out = explorer.self_test(check=lambda rows, sparsity, method: [r["seed"] for r in rows] == [0, 1] and all(
        r["target"] == sparsity and r["method"] == method for r in rows), quiet=True)
    assert out["moves"] == 4 and explorer.values == {"sparsity": 0.5, "method": "magnitude"}
    with pytest.raises(KeyError):
        experiments.select(records, target=0.9)


def test_sweep_records_an_unreached_structured_target_as_a_note_not_a_printed_warning(trained):
    """Global neuron pruning at 98% on a 16-32-16-4 MLP cannot empty a layer (allow_empty_layers=False): the point
    records the sparsity reached and sl.prune's warning as a note, and no warning reaches the notebook."""
    model, task = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # any escaping warning fails the test
        records = experiments.sweep(model, task, [0.98], methods=["magnitude"], structures=("neuron",))
    record = records[("magnitude", "global", "neuron", 0.98)]
    assert record["skipped"] is None
    assert any("target was not reached" in note for note in record["notes"])
    kept_rows = {n: int(m.any(dim=1).sum()) for n, m in record["masks"].items()}
    assert all(k >= 1 for k in kept_rows.values()), kept_rows
    assert record["sparsity"] < 0.98
