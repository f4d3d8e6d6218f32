"""Tests of sparsity_lib.obs (survey §3.5.1-§3.5.5): OBD and OBS saliencies, greedy OBS (plain and fast), the
model-level "obd", "obs" and "woodfisher". Oracles: closed forms on quadratics (KKT solve of the constrained
minimizer), the textbook greedy loop, and exact OBS on the Fisher for WoodFisher with one block."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl
from second_order_helpers import D64, data_loss, flat, kkt_minimizer, quad_loss, random_pd, trained_mlp


def test_saliency_formulas():
    w = torch.tensor([0.1, -0.3, 2.0])
    h = torch.tensor([4.0, 1.0, 0.5])
    expected_obd = 0.5 * h * w ** 2
    assert torch.allclose(sl.obs.obd_saliency(w, torch.diag(h)), expected_obd)
    assert torch.allclose(sl.obs.obd_saliency(w, h), expected_obd)          # H given as its diagonal
    Hinv = torch.tensor([[0.25, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert torch.allclose(sl.obs.obs_saliency(w, Hinv), w ** 2 / (2 * torch.tensor([0.25, 1.0, 2.0])))
    assert sl.obs.obs_saliency(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))[0] == math.inf
    with pytest.raises(ValueError, match="shape"):
        sl.obs.obd_saliency(w, torch.ones(2, 2))
    with pytest.raises(TypeError):
        sl.obs.obs_saliency([1.0, 2.0], Hinv)


def test_obd_equals_obs_for_diagonal_hessian():
    torch.manual_seed(1)
    d = 40
    h = torch.rand(d, dtype=D64) * 3 + 0.1
    w = torch.randn(d, dtype=D64)
    H = torch.diag(h)
    obd = sl.obs.obd_saliency(w, H)
    obs = sl.obs.obs_saliency(w, torch.diag(1 / h))
    assert torch.allclose(obd, obs)
    k = 15
    w_new, trace = sl.obs.obs_prune(w, H, k, return_trace=True)
    # the OBS update does nothing for a diagonal H: the k lowest OBD saliencies go, the rest stay put
    order = torch.argsort(obd)[:k]
    assert set(trace.order.tolist()) == set(order.tolist())
    expected = w.clone()
    expected[order] = 0
    assert torch.equal(w_new, expected)
    assert torch.allclose(trace.saliencies.sum(), obd[order].sum())


@pytest.mark.parametrize("k", [1, 7, 20, 29])
def test_obs_prune_reaches_constrained_minimizer(k):
    d = 30
    H = random_pd(d, seed=k)
    w_star = torch.randn(d, dtype=D64, generator=torch.Generator().manual_seed(100 + k))
    w_new, trace = sl.obs.obs_prune(w_star, H, k, return_trace=True, block=4)
    removed = w_new == 0
    assert int(removed.sum()) == k
    assert torch.equal(removed.nonzero().reshape(-1).sort().values, trace.order.sort().values)
    oracle = kkt_minimizer(w_star, H, removed)
    assert torch.allclose(w_new, oracle, atol=1e-10)
    # the loss increase equals the sum of the saliencies along the way
    assert quad_loss(w_new, w_star, H) == pytest.approx(float(trace.saliencies.sum()), rel=1e-9)
    # the first removal is the weight of least OBS saliency
    first = torch.argmin(sl.obs.obs_saliency(w_star, torch.linalg.inv(H)))
    assert int(trace.order[0]) == int(first)
    assert trace.min_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), rel=1e-9)


def test_obs_prune_block_size_does_not_change_result():
    d = 50
    H = random_pd(d, seed=3, cond=1e3)
    w = torch.randn(d, dtype=D64, generator=torch.Generator().manual_seed(3))
    a = sl.obs.obs_prune(w, H, 37, block=1)            # plain rank-1 downdates, one per step
    b = sl.obs.obs_prune(w, H, 37, block=64)           # lazy downdates folded in batches
    assert torch.equal(a == 0, b == 0)
    assert torch.allclose(a, b, atol=1e-10)


def test_obs_prune_keeps_zeros_and_stays_optimal():
    d = 24
    H = random_pd(d, seed=5)
    w_star = torch.randn(d, dtype=D64, generator=torch.Generator().manual_seed(5))
    already = torch.zeros(d, dtype=torch.bool)
    already[[2, 3, 11, 17]] = True
    w0 = kkt_minimizer(w_star, H, already)                     # already pruned and re-optimized
    w0[already] = 0.0                                          # (the solver leaves ~1e-17 there)
    w_new = sl.obs.obs_prune(w0, H, 6)
    removed = w_new == 0
    assert bool(removed[already].all())
    assert int(removed.sum()) == 4 + 6
    assert torch.allclose(w_new, kkt_minimizer(w_star, H, removed), atol=1e-10)
    assert torch.allclose(sl.obs.constrained_minimizer(w_star, H, removed), w_new, atol=1e-10)


def test_obs_prune_float32_input_and_damping():
    H = random_pd(16, seed=7).float()
    w = torch.randn(16)
    out = sl.obs.obs_prune(w, H, 8, damp=0.1)
    assert out.dtype == torch.float32 and int((out == 0).sum()) == 8
    # damping is relative: lambda = damp * mean |diag H|
    _, trace = sl.obs.obs_prune(w, H, 1, damp=0.1, return_trace=True)
    assert trace.damping == pytest.approx(0.1 * float(H.diagonal().abs().mean()), rel=1e-6)


def test_obs_prune_rejects_indefinite_and_bad_input():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5, 0.0], dtype=D64))
    w = torch.ones(4, dtype=D64)
    with pytest.raises(ValueError, match="not positive definite.*damp"):
        sl.obs.obs_prune(w, H, 1)
    with pytest.raises(ValueError, match="not positive definite"):
        sl.obs.obs_prune(w, torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D64)), 1)   # singular
    out = sl.obs.obs_prune(w, torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D64)), 1, damp=0.01)
    assert out[3] == 0                                                # no curvature: cheapest to remove
    with pytest.raises(ValueError, match="k must be"):
        sl.obs.obs_prune(w, torch.eye(4, dtype=D64), 5)
    with pytest.raises(ValueError, match="shape"):
        sl.obs.obs_prune(w, torch.eye(3, dtype=D64), 1)
    with pytest.raises(ValueError, match="damp"):
        sl.obs.obs_prune(w, torch.eye(4, dtype=D64), 1, damp=-1)
    assert sl.curvature.min_eigenvalue(torch.diag(torch.tensor([3.0, -2.0]))) == pytest.approx(-2.0)
    assert torch.allclose(sl.curvature.positive_curvature(torch.diag(torch.tensor([3.0, -2.0])), "abs"),
                          torch.diag(torch.tensor([3.0, 2.0])))


def test_obd_score_is_half_diag_times_w2():
    model, data = trained_mlp()
    scores = sl.scores.get_method("obd").score(model, data=data, loss_fn=F.cross_entropy)
    diag = sl.curvature.hessian_diagonal(model, data, F.cross_entropy)
    for name, w in sl.prunable(model).items():
        assert torch.allclose(scores[name], 0.5 * diag[name] * w.detach() ** 2)
    masks = sl.prune(model, 0.5, method="obd", data=data, scope="layerwise", structure="neuron")
    assert all(((~m).all(1) | m.all(1)).all() for m in masks.values())


def test_obs_on_tiny_mlp_beats_magnitude_and_matches_core():
    model, data = trained_mlp()
    base = data_loss(model, data)
    dense = copy.deepcopy(model)
    magnitude = copy.deepcopy(model)
    sl.prune(magnitude, 0.5, method="magnitude")
    with pytest.warns(UserWarning, match="indefinite"):
        sl.prune(model, 0.5, method="obs", data=data, loss_fn=F.cross_entropy)
    assert sl.sparsity(model) == pytest.approx(0.5, abs=1 / 72)
    assert data_loss(model, data) - base < 0.5 * (data_loss(magnitude, data) - base)
    # oracle: the functional core on |H| with the same damping
    H = sl.curvature.loss_hessian(dense, data, F.cross_entropy).to(D64)
    w = flat(dense).to(D64)
    expected = sl.obs.obs_prune(w, sl.curvature.positive_curvature(H, "abs"), round(0.5 * len(w)), damp=sl.curvature.DEFAULT_DAMP)
    assert torch.equal(flat(model) == 0, expected == 0)
    assert torch.allclose(flat(model).to(D64), expected, atol=1e-5)


def test_obs_layerwise_budget_and_errors_leave_model_unchanged():
    model, data = trained_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="woodfisher.*obc.*sparsegpt"):
        sl.prune(model, 0.5, method="obs", data=data, max_params=50)
    with pytest.raises(ValueError, match="structure must be None"):
        sl.prune(model, 0.5, method="obs", data=data, structure="neuron")
    with pytest.raises(ValueError, match="not positive definite.*woodfisher"):
        sl.prune(model, 0.5, method="obs", data=data, negative_curvature="raise", damp=1e-6)
    with pytest.raises(ValueError, match="negative_curvature"):
        sl.prune(model, 0.5, method="obs", data=data, negative_curvature="shift")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    masks = sl.prune(model, 0.4, scope={"0.weight": 0.5, "2.weight": 0.25}, method="obs", data=data,
                     negative_curvature="clip")
    assert int((~masks["0.weight"]).sum()) == 24 and int((~masks["2.weight"]).sum()) == 6
    # cumulative: a second call keeps the zeros and reaches the new target
    masks2 = sl.prune(model, 0.75, method="obs", data=data, negative_curvature="abs")
    assert all(bool((~masks[n] <= ~masks2[n]).all()) for n in masks)
    assert sl.sparsity(model) == pytest.approx(54 / 72)


def test_woodfisher_single_block_equals_obs_on_fisher():
    model, data = trained_mlp()
    single = nn.Sequential(model[0])            # one layer of 48 weights: one block when block_size >= 48

    def loss_fn(out, y):
        return F.cross_entropy(out[:, :3], y)

    fisher = sl.curvature.empirical_fisher(single, data, loss_fn).to(D64)
    w = flat(single).to(D64)
    expected = sl.obs.obs_prune(w, fisher, 30, damp=sl.curvature.DEFAULT_DAMP)
    sl.prune(single, 30 / 48, method="woodfisher", data=data, loss_fn=loss_fn, block_size=64)
    assert torch.equal(flat(single) == 0, expected == 0)
    assert torch.allclose(flat(single).to(D64), expected, atol=1e-5)


def test_woodfisher_budgets_and_blocks():
    model, data = trained_mlp()
    base = data_loss(model, data)
    magnitude = copy.deepcopy(model)
    sl.prune(magnitude, 0.6, method="magnitude")
    masks = sl.prune(model, 0.6, method="woodfisher", data=data, block_size=16)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * 72)
    assert data_loss(model, data) - base < data_loss(magnitude, data) - base
    m2, _ = trained_mlp()
    masks = sl.prune(m2, 0.5, scope="layerwise", method="woodfisher", data=data, block_size=10)
    assert int((~masks["0.weight"]).sum()) == 24 and int((~masks["2.weight"]).sum()) == 12
    with pytest.raises(ValueError, match="structure must be None"):
        sl.prune(m2, 0.5, method="woodfisher", data=data, structure=(2, 4))


def test_obs_with_precomputed_hessian_and_weight_decay():
    """hessian= reuses a Hessian across calls; weight_decay adds the L2 term's mu*I to it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    data = [(torch.randn(32, 6), torch.randint(0, 3, (32,)))]
    H = sl.curvature.loss_hessian(model, data)
    variants = {"computed": {}, "given": {"hessian": H}, "decay": {"weight_decay": 0.5},
                "given+decay": {"hessian": H + 0.5 * torch.eye(len(H))}}
    runs = {}
    for label, options in variants.items():
        net = copy.deepcopy(model)
        sl.prune(net, 0.5, method="obs", data=data, negative_curvature="abs", **options)
        runs[label] = torch.cat([w.detach().reshape(-1) for w in sl.prunable(net).values()])
    assert torch.equal(runs["computed"], runs["given"])
    assert torch.allclose(runs["decay"], runs["given+decay"], atol=1e-6)
    assert not torch.allclose(runs["computed"], runs["decay"])
    with pytest.raises(ValueError, match="hessian must have shape"):
        sl.prune(copy.deepcopy(model), 0.5, method="obs", data=data, hessian=torch.eye(3))
    with pytest.raises(ValueError, match="weight_decay must be"):
        sl.prune(copy.deepcopy(model), 0.5, method="obs", data=data, weight_decay=-1.0)


# ------------------------------------------------------------------------------------------- plain vs fast greedy OBS
@pytest.mark.parametrize("block", [1, 3, 64])
def test_greedy_obs_plain_and_fast_agree(block):
    """The batched, lazily downdated kernel makes the same removals, in the same order, with the same saliencies and
    weights as the textbook loop next to the equations, row by row (forced coordinates included)."""
    d, R = 24, 5
    Hinv = torch.linalg.inv(random_pd(d, seed=3, cond=30.0))
    W = torch.randn(R, d, dtype=D64, generator=torch.Generator().manual_seed(4))
    forced = torch.rand(R, d, generator=torch.Generator().manual_seed(5)) < 0.15
    W = W.masked_fill(forced, 0.0)
    counts = forced.sum(1) + torch.tensor([0, 3, 9, 14, 24 - int(forced[4].sum())])
    fast, removed, order, losses = sl.obs._greedy_obs(W, Hinv, counts, forced=forced, block=block, record=True)
    for r in range(R):
        k = int(counts[r])
        plain, plain_order, plain_sal = sl.obs.greedy_obs_plain(W[r], Hinv, k, forced=forced[r])
        forced_n = int(forced[r].sum())
        assert torch.equal(order[r, :k], plain_order)   # forced ones first (any order there), then the same greedy
        torch.testing.assert_close(losses[r, :k], plain_sal, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fast[r], plain, rtol=1e-9, atol=1e-10)
        assert int(removed[r].sum()) == k and bool((fast[r][removed[r]] == 0).all())
        assert k == forced_n or float(plain_sal[forced_n:].min()) >= 0


# ------------------------------------------------------------------------------------------- refusals (issue 10)
@pytest.mark.parametrize("method", ["obd", "obs", "woodfisher"])
def test_non_finite_calibration_data_is_refused_and_model_unchanged(method):
    from second_order_helpers import assert_unchanged, nan_data_and_masked_model, snapshot
    model, data = nan_data_and_masked_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="inputs of batch 0 contains? 1 non-finite"):
        sl.prune(model, 0.6, method=method, data=data)
    assert_unchanged(model, before)
    # a NaN that reaches the curvature another way (a weight, here a masked one: 0 * NaN = NaN) is refused too
    clean = [(torch.nan_to_num(x), y) for x, y in data]
    with torch.no_grad():
        original = model[0].parametrizations.weight.original
        original[~sl.get_masks(model)["0.weight"]] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite|NaN"):
        sl.prune(model, 0.6, method=method, data=clean)
    assert_unchanged(model, before)


def test_obd_refuses_large_models_with_measured_cost_and_obs_quotes_honest_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))       # d = 720
    data = [(torch.randn(32, 20), torch.randint(0, 4, (32,)))]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"d = 720 prunable weights \(max_params = 500\), so 720 products over 32 "
                                         r"calibration samples, about [0-9.]+ minutes.*max_params=720"):
        sl.prune(model, 0.5, method="obd", data=data, max_params=500)
    gib = 34 * 720 ** 2 / 2 ** 30
    with pytest.raises(ValueError, match=rf"d = 720 prunable weights: about {gib:.2f} GiB at the peak "
                                         r"\(max_params = 500\).*woodfisher"):
        sl.prune(model, 0.5, method="obs", data=data, max_params=500)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sl.obs.obs_memory_bytes(720) == 34 * 720 ** 2
    masks = sl.prune(model, 0.5, method="obd", data=data, max_params=720)    # allowed when asked for
    assert abs(sum(int((~m).sum()) for m in masks.values()) - 360) <= 1
