"""sparsity_lib.benchmark: resumable CSV, header, metrics against hand computations."""

import math

import numpy as np
import pytest

import sparsity_lib as sl
from sparsity_lib import benchmark as B


def _rows(table):
    """rows from {(method, target): [acc per seed]}"""
    out = []
    for (m, t), accs in table.items():
        for seed, a in enumerate(accs):
            out.append({"method": m, "family": "dense" if m == "dense" else "x", "target": t, "seed": seed,
                        "accuracy": a, "sparsity": t, "nonzeros": 100, "cost": 1.0, "seconds": 0.0})
    return out


# ------------------------------------------------------------------------------------------- the CSV
def test_resume_does_not_recompute_finished_cells(tmp_path, monkeypatch):
    path = str(tmp_path / "r.csv")
    first = B.run(path, methods=["random"], sparsities=[0.9], seeds=[0], progress=False)
    assert [(r["method"], r["target"], r["seed"]) for r in first["rows"]] == [("dense", 0.0, 0), ("random", 0.9, 0)]
    calls = []
    real_cell, real_dense = B.run_cell, B.train_dense
    monkeypatch.setattr(B, "run_cell", lambda method, *a, **k: calls.append(("cell", method.name, a[1], a[2]))
                        or real_cell(method, *a, **k))
    monkeypatch.setattr(B, "train_dense", lambda task, seed, s: calls.append(("dense", seed)) or real_dense(task, seed, s))
    again = B.run(path, methods=["random"], sparsities=[0.9], seeds=[0], progress=False)
    assert calls == []                                          # nothing recomputed
    assert [r["method"] for r in again["rows"]] == ["dense", "random"]
    assert again["rows"][1]["accuracy"] == pytest.approx(first["rows"][1]["accuracy"], abs=1e-6)
    more = B.run(path, methods=["random"], sparsities=[0.9, 0.95], seeds=[0], progress=False)
    # only the new cell ran; its one-shot method needed the dense model of seed 0, retrained (not stored)
    assert [c for c in calls if c[0] == "cell"] == [("cell", "random", 0.95, 0)]
    assert len(more["rows"]) == 3 and len(B.read_results(path)[1]) == 3


def test_csv_header_and_refusal_of_other_settings(tmp_path):
    path = str(tmp_path / "r.csv")
    B.run(path, methods=["global magnitude"], sparsities=[0.9], seeds=[1], progress=False, command="make benchmark")
    header, rows = B.read_results(path)
    assert header["scale"] == sl.config.SCALE and header["command"] == "make benchmark"
    assert f"sparsity_lib {sl.__version__}" in header["title"]
    assert "epochs=" in header["settings"] and "optimizer=adam" in header["settings"]
    assert {r["method"] for r in rows} == {"dense", "global magnitude"}
    row = [r for r in rows if r["method"] == "global magnitude"][0]
    assert row["sparsity"] == pytest.approx(0.9, abs=1e-3) and 0.0 <= row["accuracy"] <= 1.0
    other = "full" if sl.config.SCALE == "fast" else "fast"
    with pytest.raises(ValueError, match="scale"):
        B.run(path, methods=["global magnitude"], sparsities=[0.9], seeds=[1], scale=other, progress=False)
    assert len(B.read_results(path)[1]) == 2                   # the refused run wrote nothing


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="methods"):
        B.run(None, methods=["magic"], progress=False)
    with pytest.raises(ValueError, match="sparsities"):
        B.run(None, methods=["random"], sparsities=[1.0], progress=False)
    with pytest.raises(ValueError, match="family"):
        B.Method("x", "alchemy", "one_shot", "magnitude")


def test_every_method_is_a_library_method():
    for m in B.METHODS.values():
        if m.kind == "sparse":
            assert m.method in sl.growth.METHODS
        else:
            sl.scores.get_method(m.method)
    assert set(B.FAST_METHODS) <= set(B.METHODS) and set(B.BASELINES) <= set(B.FAST_METHODS)


# --------------------------------------------------------------------------------------------- metrics
def test_training_cost_closed_forms():
    assert B.training_cost("one_shot", 0.1, epochs=10, finetune_epochs=4) == pytest.approx(1.04)
    assert B.training_cost("at_init", 0.05, epochs=10) == pytest.approx(0.05)
    assert B.training_cost("imp", 0.01, epochs=10, rounds=2) == pytest.approx(1 + 0.1 + 0.01)
    # cubic schedule s_t = s (1 - (1 - t/T)^3) on [0, 3/4], mean density by quadrature
    s = 0.9
    t = np.linspace(0, 1, 200001)
    density = np.where(t < 0.75, 1 - s * (1 - (1 - t / 0.75) ** 3), 1 - s)
    assert B.training_cost("gradual", 1 - s, epochs=10) == pytest.approx(np.trapezoid(density, t), abs=1e-4)
    with pytest.raises(ValueError, match="kind"):
        B.training_cost("sparse", 0.1, epochs=10)
    with pytest.raises(ValueError, match="density"):
        B.training_cost("at_init", 0.0, epochs=10)


def test_parameter_slack_by_hand():
    rows = _rows({("dense", 0.0): [0.90, 1.00],                  # dense mean 0.95
                  ("m", 0.5): [0.96, 0.96], ("m", 0.8): [0.95, 0.93], ("m", 0.9): [0.90, 0.90]})
    # thresholds: 0% -> 0.95, 1% -> 0.9405, 5% -> 0.9025; means 0.96, 0.94, 0.90
    assert B.parameter_slack(rows, "m") == {0.0: 0.5, 0.01: 0.5, 0.05: 0.8}
    assert B.parameter_slack(rows, "m", drops=(0.011, 0.06)) == {0.011: 0.8, 0.06: 0.9}
    worse = _rows({("dense", 0.0): [1.0], ("w", 0.9): [0.5]})
    assert B.parameter_slack(worse, "w") == {0.0: 0.0, 0.01: 0.0, 0.05: 0.0}
    with pytest.raises(ValueError, match="dense"):
        B.parameter_slack(_rows({("m", 0.5): [1.0]}), "m")


def test_ranking_counts_seed_wins():
    rows = _rows({("a", 0.9): [0.9, 0.8, 0.95], ("b", 0.9): [0.85, 0.85, 0.85], ("c", 0.9): [0.1, 0.9, 0.2],
                  ("dense", 0.0): [1, 1, 1]})
    r = B.ranking(rows, 0.9)
    assert [e["method"] for e in r] == ["a", "b", "c"]
    assert r[0]["mean"] == pytest.approx(0.8833333) and r[0]["std"] == pytest.approx(np.std([0.9, 0.8, 0.95], ddof=1))
    assert (r[0]["wins_over_next"], r[0]["n_common"]) == (2, 3)   # a > b in seeds 0 and 2
    assert (r[1]["wins_over_next"], r[1]["n_common"]) == (2, 3)   # b > c in seeds 0 and 2
    assert "next" not in r[2]


def test_efficiency_metrics_by_hand():
    assert B.accuracy_density(0.76, 25.6e6) == pytest.approx(76 / 25.6)
    # the survey's inverse of f(t) = 6142.09 ln t + 30575: 42,000 correct predictions
    assert B.sota_normalized_efficiency(42000, 2e6) == pytest.approx(math.exp((42000 - 30575) / 6142.09) / 2)
    with pytest.raises(ValueError, match="parameters"):
        B.accuracy_density(0.5, 0)


def test_per_class_and_exemplars_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    dense = [np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 0])]
    pruned = [np.array([0, 1, 1, 1, 0, 0]), np.array([0, 1, 1, 1, 2, 0])]
    acc = B.per_class_accuracy(pruned[0], y, 4)
    assert np.allclose(acc[:3], [0.5, 1.0, 0.0]) and np.isnan(acc[3])
    d = B.class_drops(dense, pruned, y, 3)
    assert np.allclose(d["dense"], [1.0, 1.0, 0.75]) and np.allclose(d["pruned"], [0.5, 1.0, 0.25])
    assert np.allclose(d["drop"], [0.5, 0.0, 0.5])
    assert d["overall"] == pytest.approx((11 / 12) - (7 / 12))
    # modal labels: dense [0,0,1,1,2,0] (example 5: tie 2 vs 0 -> 0), pruned [0,1,1,1,0,0] (ex 4: tie -> 0)
    assert B.exemplars(dense, pruned).tolist() == [1, 4]
    with pytest.raises(ValueError, match="shape"):
        B.per_class_accuracy(np.zeros(3), np.zeros(4), 2)


def test_modal_prediction_breaks_ties_to_the_smallest_label():
    preds = [np.array([3, 1, 2]), np.array([3, 2, 1]), np.array([0, 2, 0])]
    assert B.modal_prediction(preds).tolist() == [3, 2, 0]
