"""Layer budgets follow their formulas; the Zhu & Gupta schedule equals torch.ao.pruning's CubicSL."""

import math

import pytest
import torch
from torch import nn

import sparsity_lib as sl


def params(model):
    return {n: w.numel() for n, w in sl.prunable(model).items()}


@pytest.mark.parametrize("fn", [sl.budgets.uniform, sl.budgets.erdos_renyi, sl.budgets.erk])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_budgets_average_to_target(mlp, cnn, fn, target):
    for model in (mlp, cnn):
        budget = fn(model, target)
        assert sl.budgets.overall_sparsity(model, budget) == pytest.approx(target, abs=1e-9)
        assert all(0.0 <= s < 1.0 for s in budget.values())


def test_erk_follows_its_formula(cnn):
    budget = sl.budgets.erk(cnn, 0.9)
    shapes = {n: tuple(w.shape) for n, w in sl.prunable(cnn).items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    free = [n for n in shapes if budget[n] > 0]
    eps = {n: (1 - budget[n]) / raw[n] for n in free}
    assert max(eps.values()) == pytest.approx(min(eps.values()), rel=1e-9), "one epsilon for every non-dense layer"


def test_erk_caps_density_at_one_and_redistributes():
    # thin input and output layers: the formula would make them denser than dense (density 1.19 at 80%)
    model = nn.Sequential(nn.Linear(3, 64), nn.Linear(64, 64), nn.Linear(64, 3))
    budget = sl.budgets.erk(model, 0.8)
    assert budget["0.weight"] == 0.0 and budget["2.weight"] == 0.0
    # the middle layer takes the rest: (0.2 * 4480 - 2 * 192) / 4096 = 0.125 density
    assert budget["1.weight"] == pytest.approx(1 - 0.125)


def test_er_ignores_kernel_dims(cnn):
    budget = sl.budgets.erdos_renyi(cnn, 0.5)
    shapes = {n: tuple(w.shape) for n, w in sl.prunable(cnn).items()}
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    ratio = [(1 - budget[n]) / raw[n] for n in shapes if budget[n] > 0]
    assert max(ratio) == pytest.approx(min(ratio), rel=1e-9)


def test_erk_equals_er_for_linear_layers(mlp):
    assert sl.budgets.erk(mlp, 0.8) == pytest.approx(sl.budgets.erdos_renyi(mlp, 0.8))


def test_dense_layers_are_kept_dense(mlp):
    budget = sl.budgets.uniform(mlp, 0.5, dense=["0.weight"])
    assert budget["0.weight"] == 0.0
    assert budget["2.weight"] == pytest.approx(budget["4.weight"])
    assert sl.budgets.overall_sparsity(mlp, budget) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dense: unknown layer"):
        sl.budgets.erk(mlp, 0.8, dense=["fc7.weight"])
    with pytest.raises(ValueError, match="cannot be reached"):
        sl.budgets.uniform(mlp, 0.99, dense=["0.weight", "2.weight"])


def test_budget_prunes_to_its_layer_sparsities(mlp):
    budget = sl.budgets.erk(mlp, 0.9)
    sl.prune(mlp, 0.9, scope=budget)
    for name, w in sl.prunable(mlp).items():
        assert float((w == 0).double().mean()) == pytest.approx(budget[name], abs=1 / w.numel())
    assert sl.sparsity(mlp) == pytest.approx(0.9, abs=2e-3)


def test_polynomial_endpoints_and_shape():
    p = sl.schedules.polynomial
    assert p(0, 0.0, 0.9, 10, 110) == 0.0
    assert p(10, 0.0, 0.9, 10, 110) == 0.0
    assert p(110, 0.0, 0.9, 10, 110) == pytest.approx(0.9)
    assert p(500, 0.0, 0.9, 10, 110) == pytest.approx(0.9)
    assert p(60, 0.0, 0.9, 10, 110) == pytest.approx(0.9 * (1 - 0.5**3))
    assert p(60, 0.0, 0.9, 10, 110, power=1) == pytest.approx(0.45)


def test_polynomial_equals_torch_cubic_sl():
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

    s0, sf, t0, dt, n = 0.1, 0.95, 3, 2, 10
    for t in range(0, 40):
        expected = CubicSL.sparsity_compute_fn(s0, sf, t, t0, dt, n)
        assert sl.schedules.polynomial(t, s0, sf, t0, t0 + n * dt) == pytest.approx(expected, abs=1e-12)


def test_polynomial_equals_cubic_sl_driving_a_sparsifier():
    """Step a real torch.ao sparsifier with CubicSL and compare its sparsity levels with ours, step by step."""
    from torch.ao.pruning import WeightNormSparsifier
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

    model = nn.Sequential(nn.Linear(8, 8))
    sparsifier = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=2, delta_t=3, total_t=5)
    levels = []
    for _ in range(30):
        levels.append(sparsifier.groups[0]["sparsity_level"])
        sparsifier.step()
        scheduler.step()
    ours = [sl.schedules.polynomial(t, 0.0, 0.9, 2, 2 + 3 * 5) for t in range(30)]
    assert levels == pytest.approx(ours, abs=1e-9)


@pytest.mark.parametrize("kwargs, text", [
    (dict(initial=0.5, final=0.2), "at most final"),
    (dict(begin=10, end=10), "greater than begin"),
    (dict(final=1.0), r"final must be in \[0, 1\)"),
    (dict(power=0), "power must be a positive"),
])
def test_polynomial_bad_arguments(kwargs, text):
    args = dict(step=5, initial=0.0, final=0.9, begin=0, end=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=text):
        sl.schedules.polynomial(**args)
