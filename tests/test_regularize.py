"""sparsity_lib.regularize: penalties and proximal steps, hard-concrete L0 gates, sparse variational dropout.

Checked against their definitions and independent computations: hand loops, the empirical frequency of nonzero
gates, a quadrature of the true KL, the closed-form mean and variance of the local reparameterization trick.
"""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sparsity_lib as sl
from sparsity_lib import regularize as rg


def small_mlp(seed=0):
    return sl.models.mlp(6, (5,), 3, seed=seed)


# ------------------------------------------------------------------------------------------- penalties
def test_l1_and_hoyer_against_hand_sums():
    model = small_mlp()
    weights = [model.fc1.weight.detach(), model.fc2.weight.detach()]
    assert torch.isclose(rg.l1(model, 0.5), 0.5 * sum(float(w.abs().sum()) for w in weights) * torch.ones(()))
    hoyer = sum(float(w.abs().sum()) ** 2 / float((w ** 2).sum()) for w in weights)
    assert math.isclose(float(rg.hoyer_square(model).detach()), hoyer, rel_tol=1e-5)
    one_hot = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        one_hot.weight.copy_(torch.tensor([[0.0, 3.0, 0.0, 0.0]]))
    assert math.isclose(float(rg.hoyer_square(one_hot)), 1.0, rel_tol=1e-6)   # one nonzero
    with torch.no_grad():
        one_hot.weight.fill_(-2.0)
    assert math.isclose(float(rg.hoyer_square(one_hot)), 4.0, rel_tol=1e-6)   # all equal: n


@pytest.mark.parametrize("structure", ["neuron", "input"])
def test_group_lasso_against_hand_loop(structure):
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Conv2d(2, 3, 3))
    expected = 0.0
    for w in (model[0].weight.detach(), model[2].weight.detach()):
        groups = range(w.shape[0] if structure == "neuron" else w.shape[1])
        for g in groups:
            block = w[g] if structure == "neuron" else w[:, g]
            expected += math.sqrt(block.numel()) * float(torch.sqrt((block ** 2).sum()))
    assert math.isclose(float(rg.group_lasso(model, 2.0, structure)), 2 * expected, rel_tol=1e-5)


def test_soft_threshold_is_its_definition():
    w = torch.randn(200)
    for delta in (0.0, 0.3, 1.0):
        expected = torch.tensor([math.copysign(max(abs(x) - delta, 0.0), x) if abs(x) > delta else 0.0
                                 for x in w.tolist()])
        assert torch.allclose(rg.soft_threshold(w, delta), expected, atol=1e-7)
    assert (rg.soft_threshold(w, 0.5)[w.abs() <= 0.5] == 0).all()


@pytest.mark.parametrize("structure", ["neuron", "input"])
def test_group_soft_threshold_is_the_group_prox(structure):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    w[1] *= 0.01          # a weak output channel
    w[:, 2] *= 0.01       # a weak input channel
    delta = 0.2
    out = rg.group_soft_threshold(w, delta, structure)
    for g in range(w.shape[0] if structure == "neuron" else w.shape[1]):
        block = w[g] if structure == "neuron" else w[:, g]
        got = out[g] if structure == "neuron" else out[:, g]
        norm = float(block.norm())
        scale = max(0.0, 1 - delta * math.sqrt(block.numel()) / norm)
        assert torch.allclose(got, block * scale, atol=1e-6)
    weak = out[1] if structure == "neuron" else out[:, 2]
    assert (weak == 0).all()


def test_proximal_callback_zeroes_exactly_and_keeps_masks():
    task = sl.data.teacher_student(n_train=128, n_test=64, in_features=6, hidden=5, num_classes=3, seed=0)
    model = sl.models.mlp(6, (16,), 3, seed=0)
    masks = sl.prune(model, 0.5, "random", seed=0)
    sl.train.fit(model, task, epochs=5, optimizer="sgd", lr=0.1, callbacks=[rg.Proximal(0.5)], progress=False)
    for name, w in sl.prunable(model).items():
        assert (w.detach()[~masks[name]] == 0).all()
    assert sl.sparsity(model) > 0.5    # the proximal step put further weights exactly on zero


def test_penalty_plugs_into_fit():
    task = sl.data.teacher_student(n_train=128, n_test=64, in_features=6, hidden=5, num_classes=3, seed=0)
    plain, penalized = sl.models.mlp(6, (16,), 3, seed=0), sl.models.mlp(6, (16,), 3, seed=0)
    sl.train.fit(plain, task, epochs=4, progress=False)
    sl.train.fit(penalized, task, epochs=4, penalty=lambda m: rg.l1(m, 0.05), progress=False)
    assert float(rg.l1(penalized)) < 0.8 * float(rg.l1(plain))


@pytest.mark.parametrize("call", [
    lambda m: rg.l1(m, -1.0), lambda m: rg.l1(m, float("nan")), lambda m: rg.group_lasso(m, 1.0, "rows"),
    lambda m: rg.hoyer_square(m, float("nan")), lambda m: rg.soft_threshold(torch.ones(3), -0.1),
    lambda m: rg.soft_threshold(torch.ones(3), float("nan")),
    lambda m: rg.group_soft_threshold(torch.ones(2, 2), 1, "x"),
    lambda m: rg.Proximal(-1.0),
])
def test_bad_penalty_arguments(call):
    with pytest.raises(ValueError, match="strength|threshold|structure"):
        call(small_mlp())


# ------------------------------------------------------------------------------------ hard-concrete gates
def test_hard_concrete_formulas():
    log_alpha = torch.linspace(-4, 4, 9)
    u = torch.full_like(log_alpha, 0.3)
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    s = torch.sigmoid((math.log(0.3) - math.log(0.7) + log_alpha) / beta)
    assert torch.allclose(rg.hard_concrete(log_alpha, u), (s * (zeta - gamma) + gamma).clamp(0, 1))
    assert torch.allclose(rg.hard_concrete(log_alpha), (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1))
    assert float(rg.hard_concrete(torch.tensor(-3.0))) == 0.0 and float(rg.hard_concrete(torch.tensor(3.0))) == 1.0
    with pytest.raises(ValueError, match="u must"):
        rg.hard_concrete(log_alpha, torch.zeros(9))
    with pytest.raises(ValueError, match="u must"):
        rg.hard_concrete(log_alpha, torch.full((4,), 0.5))


def test_l0_expectation_matches_sampled_frequency():
    torch.manual_seed(0)
    log_alpha = torch.linspace(-3, 3, 13)
    n = 200_000
    u = torch.rand(n, 13).clamp(1e-7, 1 - 1e-7)
    for beta, gamma, zeta in [(2 / 3, -0.1, 1.1), (0.5, -0.3, 1.2)]:
        z = rg.hard_concrete(log_alpha.expand(n, 13), u, beta, gamma, zeta)
        freq = (z > 0).float().mean(0)
        p = rg.l0_expected(log_alpha, beta, gamma, zeta)
        assert torch.allclose(freq, p, atol=4 * math.sqrt(0.25 / n)), (freq, p)


@pytest.mark.parametrize("kwargs", [dict(beta=0.0), dict(beta=-1.0), dict(gamma=0.0), dict(gamma=0.1),
                                    dict(zeta=1.0), dict(zeta=0.5), dict(beta=float("nan"))])
def test_bad_concrete_parameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        rg.hard_concrete(torch.zeros(3), None, **kwargs)
    with pytest.raises(ValueError, match=name):
        rg.l0_expected(torch.zeros(3), **kwargs)
    model = small_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=name):
        rg.add_l0_gates(model, **kwargs)
    assert not sl.masks.is_masked(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("structure", [None, "neuron"])
def test_l0_gates_follow_the_mask_protocol_and_finalize(structure):
    model = small_mlp()
    x = torch.randn(7, 6)
    rg.add_l0_gates(model, structure=structure)
    gates = {n: p for n, m in sl.masks._prunable_modules(model).items() for p in m.parametrizations["weight"]}
    torch.manual_seed(1)
    with torch.no_grad():
        for g in gates.values():
            g.log_alpha.copy_(torch.randn_like(g.log_alpha) * 3)
    implied = {n: (rg.hard_concrete(g.log_alpha.detach()) > 0).expand(g.weight_shape) for n, g in gates.items()}
    thetas = {n: m.parametrizations["weight"].original.detach().clone()
              for n, m in sl.masks._prunable_modules(model).items()}
    assert all(torch.equal(sl.get_masks(model)[n], implied[n]) for n in implied)
    expected_sparsity = 1 - sum(int(m.sum()) for m in implied.values()) / sum(m.numel() for m in implied.values())
    assert math.isclose(sl.sparsity(model), expected_sparsity)
    # penalty: sum over gates of group size * P(z != 0)
    expected_pen = sum(rg.l0_expected(g.log_alpha).sum() * g.group_size() for g in gates.values())
    assert torch.isclose(rg.l0_penalty(model), expected_pen)
    assert math.isclose(float(rg.l0_penalty(model, "mean")), float(expected_pen) / 45, rel_tol=1e-6)
    model.eval()
    before = model(x).detach()
    masks = rg.finalize(model)
    assert all(torch.equal(masks[n], implied[n]) for n in implied)
    for n, module in sl.masks._prunable_modules(model).items():
        gate = rg.hard_concrete(gates[n].log_alpha.detach())
        assert torch.allclose(sl.prunable(model)[n], thetas[n] * gate * implied[n])
        assert not any(isinstance(p, rg.L0Gate) for p in module.parametrizations["weight"])
    assert torch.allclose(model(x), before, atol=1e-6)
    sl.remove_masks(model)
    assert set(model.state_dict()) == set(small_mlp().state_dict())
    assert torch.allclose(model(x), before, atol=1e-6)


def test_gates_twice_and_on_masked_layers_refused():
    model = small_mlp()
    rg.add_l0_gates(model)
    state = copy.deepcopy(model.state_dict())
    for add in (rg.add_l0_gates, rg.add_variational_dropout):
        with pytest.raises(ValueError, match="model.*already"):
            add(model)
    assert set(model.state_dict()) == set(state)
    pruned = small_mlp()
    sl.prune(pruned, 0.5)
    with pytest.raises(ValueError, match="model"):
        rg.add_variational_dropout(pruned)
    with pytest.raises(ValueError, match="structure"):
        rg.add_l0_gates(small_mlp(), structure="input")
    with pytest.raises(ValueError, match="no L0 gates"):
        rg.l0_penalty(small_mlp())
    with pytest.raises(ValueError, match="finalize"):
        rg.finalize(small_mlp())


# --------------------------------------------------------------------------------- variational dropout
def _true_kl(log_alpha: float) -> float:
    """KL(N(theta, alpha theta^2) || log-uniform) up to Molchanov's constant, by quadrature (independent of Eq. 14).

    KL = -1/2 log alpha + E_xi log|1 + sqrt(alpha) xi| - E_xi log|xi|, xi ~ N(0, 1), so that KL -> 0 as
    alpha -> infinity; E log|xi| = -(Euler gamma + log 2) / 2.
    """
    from scipy import integrate, stats
    s = math.sqrt(math.exp(log_alpha))
    f = lambda x: math.log(abs(1 + s * x)) * stats.norm.pdf(x)  # noqa: E731
    c = -1 / s
    e = sum(integrate.quad(f, lo, hi, limit=200)[0] for lo, hi in [(-np.inf, c), (c, np.inf)])
    return -0.5 * log_alpha + e + (np.euler_gamma + math.log(2)) / 2


def test_vd_kl_approximation_against_quadrature():
    grid = np.linspace(-8, 8, 33)
    true = np.array([_true_kl(x) for x in grid])
    approx = rg.vd_kl(torch.tensor(grid)).numpy()
    # Molchanov et al. fit k1..k3 to this curve; measured max error 0.0094 (at log alpha = -3.5)
    assert np.abs(true - approx).max() < 0.01
    assert (np.diff(approx) < 0).all()  # more noise, less KL


def _set_log_alpha(model, seed=0):
    torch.manual_seed(seed)
    for module in sl.masks._prunable_modules(model).values():
        vd = module.parametrizations["weight"][0]
        theta = module.parametrizations["weight"].original.detach()
        with torch.no_grad():
            vd.log_sigma2.copy_(torch.empty_like(theta).uniform_(-4, 6) + torch.log(theta ** 2))


def test_vd_forward_statistics_are_the_local_reparameterization():
    torch.manual_seed(0)
    for layer, x in [(nn.Linear(5, 3), torch.randn(1, 5)),
                     (nn.Conv2d(2, 3, 3, padding=1, stride=2), torch.randn(1, 2, 5, 5))]:
        model = nn.Sequential(layer)
        rg.add_variational_dropout(model)
        _set_log_alpha(model)
        theta = layer.parametrizations["weight"].original.detach()
        alpha = torch.exp(rg.vd_log_alpha(model)["0.weight"].detach())
        if isinstance(layer, nn.Linear):
            mean = x @ theta.T + layer.bias.detach()
            var = (x ** 2) @ (alpha * theta ** 2).T
        else:
            mean = nn.functional.conv2d(x, theta, layer.bias.detach(), stride=2, padding=1)
            var = nn.functional.conv2d(x ** 2, alpha * theta ** 2, None, stride=2, padding=1)
        n = 40_000
        model.train()
        with torch.no_grad():
            out = model(x.expand(n, *x.shape[1:]))
        # every example gets its own noise: sample mean and variance match the closed form
        se_mean = torch.sqrt(var / n)
        assert ((out.mean(0) - mean[0]).abs() <= 5 * se_mean[0] + 1e-4).all()
        assert torch.allclose(out.var(0), var[0], rtol=0.05, atol=1e-4)
        # eval mode: deterministic, theta with log alpha >= 3 removed
        model.eval()
        keep = (rg.vd_log_alpha(model)["0.weight"] < 3).detach()
        with torch.no_grad():
            a, b = model(x), model(x)
        assert torch.equal(a, b)
        ref = (x @ (theta * keep).T + layer.bias.detach() if isinstance(layer, nn.Linear) else
               nn.functional.conv2d(x, theta * keep, layer.bias.detach(), stride=2, padding=1))
        assert torch.allclose(a, ref, atol=1e-5)


def test_vd_mask_protocol_finalize_and_deepcopy():
    model = small_mlp()
    x = torch.randn(4, 6)
    rg.add_variational_dropout(model)
    _set_log_alpha(model)
    log_alpha = {n: v.detach().clone() for n, v in rg.vd_log_alpha(model).items()}
    masks = sl.get_masks(model)
    assert all(torch.equal(masks[n], log_alpha[n] < 3) for n in masks)
    assert math.isclose(float(rg.vd_penalty(model)),
                        float(sum(rg.vd_kl(v).sum() for v in log_alpha.values())), rel_tol=1e-6)
    twin = copy.deepcopy(model)   # its own parameters and noise; changing it leaves the original alone
    with torch.no_grad():
        twin.fc1.parametrizations["weight"][0].log_sigma2.fill_(20.0)
        twin.fc1.parametrizations["weight"].original.mul_(2)
    assert not sl.get_masks(twin)["fc1.weight"].any()
    assert torch.equal(sl.get_masks(model)["fc1.weight"], masks["fc1.weight"])
    model.eval()
    before = model(x).detach()
    final = rg.finalize(model)
    assert all(torch.equal(final[n], masks[n]) for n in masks)
    assert not model.fc1._forward_hooks
    model.train()
    assert torch.equal(model(x), before)   # no noise any more, the same weights
    assert math.isclose(sl.sparsity(model), 1 - sum(int(m.sum()) for m in masks.values()) / 45)
    # a stricter threshold keeps fewer weights
    other = small_mlp()
    rg.add_variational_dropout(other)
    _set_log_alpha(other)
    strict = rg.finalize(other, threshold=0.0)
    assert all(torch.equal(strict[n], log_alpha[n] < 0) for n in strict)


def test_remove_masks_on_vd_model_leaves_a_plain_network():
    model = small_mlp()
    rg.add_variational_dropout(model)
    _set_log_alpha(model)
    masks = sl.get_masks(model)
    sl.remove_masks(model)
    x = torch.randn(3, 6)
    model.train()
    assert torch.equal(model(x), model(x))   # the hook finds no VD parametrization: no noise
    assert all(torch.equal(w != 0, masks[n]) for n, w in sl.prunable(model).items())


def test_vd_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        rg.add_variational_dropout(small_mlp(), threshold=float("nan"))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ValueError, match="padding_mode"):
        rg.add_variational_dropout(conv)
    assert not sl.masks.is_masked(conv)
    with pytest.raises(ValueError, match="variational dropout"):
        rg.vd_log_alpha(small_mlp())


# ----------------------------------------------------------------------------------------- experiment
def test_training_memory_counts_parameters_exactly():
    model = small_mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    dense = rg.training_memory(model, x, y)
    n_params = sum(p.numel() for p in model.parameters())
    assert dense["parameters"] == dense["gradients"] == 4 * n_params and dense["optimizer"] == 8 * n_params
    assert dense["activations"] > 0
    rg.add_variational_dropout(model)
    vd = rg.training_memory(model, x, y, penalty=rg.vd_penalty)
    assert vd["parameters"] == dense["parameters"] + 4 * (30 + 15)   # one log sigma^2 per weight
    assert vd["activations"] > dense["activations"]


def test_compare_methods_records():
    task = sl.data.teacher_student(n_train=256, n_test=64, in_features=6, hidden=5, num_classes=3, seed=0)
    records = rg.compare_methods(task, [0, 1], sparsities=(0.5,), l0_strengths=(1.0,), vd_strengths=(0.1,),
                                 hidden=(16,), epochs=2, batch_size=64, match=("l0", "vd"))
    order = ["l0", "vd", "gmp", "gmp", "gmp", "random"]   # learned first, then GMP at 0.5 and at the two matches
    assert [(r["method"], r["seed"]) for r in records] == [(m, s) for s in (0, 1) for m in order]
    for seed in (0, 1):
        learned = {(r["method"], r["strength"]): r["sparsity"] for r in records if r["seed"] == seed and
                   r["method"] in ("l0", "vd")}
        twins = [r for r in records if r["seed"] == seed and "match" in r]
        assert [t["match"] for t in twins] == list(learned)
        for t in twins:   # GMP reached the learned sparsity (to one weight's rounding)
            assert abs(t["sparsity"] - min(learned[t["match"]], 0.999)) < 1 / 100
    for r in records:
        assert 0 <= r["sparsity"] <= 1 and 0 <= r["accuracy"] <= 1 and r["steps"] == 8
        assert r["seconds_per_step"] > 0 and set(r["densities"]) == {"fc1.weight", "fc2.weight"}
        assert ("masks" in r) == (r["seed"] == 0)
        if r["method"] in ("gmp", "random") and "match" not in r:
            assert math.isclose(r["sparsity"], 0.5, abs_tol=0.02)
    vd = [r for r in records if r["method"] == "vd"][0]
    assert vd["log_alpha"].shape == (6 * 16 + 16 * 3,) and 0 <= vd["magnitude_iou"] <= 1
    with pytest.raises(ValueError, match="methods"):
        rg.compare_methods(task, [0], methods=("obs",))
    with pytest.raises(ValueError, match="match"):
        rg.compare_methods(task, [0], match=("gmp",))


def test_neuron_gates_on_a_conv_remove_whole_channels():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    rg.add_l0_gates(model, structure="neuron", layers=["0.weight"])
    gate = model[0].parametrizations["weight"][0]
    assert gate.log_alpha.shape == (4, 1, 1, 1) and gate.group_size() == 18
    assert not parametrize_is(model[3])
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]).view(4, 1, 1, 1))
    masks = rg.finalize(model)
    assert list(masks) == ["0.weight"]
    kept = masks["0.weight"].reshape(4, -1)
    assert kept[[0, 2]].all() and not kept[[1, 3]].any()
    assert torch.isclose(torch.tensor(sl.sparsity(model)), torch.tensor(36 / (72 + 108)))


def parametrize_is(module):
    from torch.nn.utils import parametrize
    return parametrize.is_parametrized(module)
