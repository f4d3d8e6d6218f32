"""Tests of sparsity_lib.hessian (survey §3.5): OBD, OBS, WoodFisher, OBC, SparseGPT.

Oracles: closed forms on quadratics (KKT solve of the constrained minimizer), finite differences of autograd
gradients, per-sample gradients by a plain autograd loop, direct matrix inversion, the OBS core applied row by
row, and a line-by-line port of the SparseGPT reference code.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib import hessian as hs

D64 = torch.float64


def random_pd(d, seed=0, cond=50.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    eig = torch.logspace(0, math.log10(cond), d, dtype=D64)
    return (Q * eig) @ Q.T


def kkt_minimizer(w_star, H, removed):
    """argmin 1/2 (w - w*)^T H (w - w*) s.t. w_Q = 0, by solving the KKT system [[H, E], [E^T, 0]]."""
    d = len(w_star)
    Q = torch.nonzero(removed).reshape(-1)
    E = torch.zeros(d, len(Q), dtype=D64)
    E[Q, torch.arange(len(Q))] = 1
    K = torch.zeros(d + len(Q), d + len(Q), dtype=D64)
    K[:d, :d], K[:d, d:], K[d:, :d] = H, E, E.T
    rhs = torch.cat([H @ w_star, torch.zeros(len(Q), dtype=D64)])
    return torch.linalg.solve(K, rhs)[:d]


def quad_loss(w, w_star, H):
    return float(0.5 * (w - w_star) @ H @ (w - w_star))


# ------------------------------------------------------------------------------------------- saliencies
def test_saliency_formulas():
    w = torch.tensor([0.1, -0.3, 2.0])
    h = torch.tensor([4.0, 1.0, 0.5])
    expected_obd = 0.5 * h * w ** 2
    assert torch.allclose(hs.obd_saliency(w, torch.diag(h)), expected_obd)
    assert torch.allclose(hs.obd_saliency(w, h), expected_obd)          # H given as its diagonal
    Hinv = torch.tensor([[0.25, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert torch.allclose(hs.obs_saliency(w, Hinv), w ** 2 / (2 * torch.tensor([0.25, 1.0, 2.0])))
    assert hs.obs_saliency(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))[0] == math.inf
    with pytest.raises(ValueError, match="shape"):
        hs.obd_saliency(w, torch.ones(2, 2))
    with pytest.raises(TypeError):
        hs.obs_saliency([1.0, 2.0], Hinv)


def test_obd_equals_obs_for_diagonal_hessian():
    torch.manual_seed(1)
    d = 40
    h = torch.rand(d, dtype=D64) * 3 + 0.1
    w = torch.randn(d, dtype=D64)
    H = torch.diag(h)
    obd = hs.obd_saliency(w, H)
    obs = hs.obs_saliency(w, torch.diag(1 / h))
    assert torch.allclose(obd, obs)
    k = 15
    w_new, trace = hs.obs_prune(w, H, k, return_trace=True)
    # the OBS update does nothing for a diagonal H: the k lowest OBD saliencies go, the rest stay put
    order = torch.argsort(obd)[:k]
    assert set(trace.order.tolist()) == set(order.tolist())
    expected = w.clone()
    expected[order] = 0
    assert torch.equal(w_new, expected)
    assert torch.allclose(trace.saliencies.sum(), obd[order].sum())


# ------------------------------------------------------------------------------------------- obs_prune
@pytest.mark.parametrize("k", [1, 7, 20, 29])
def test_obs_prune_reaches_constrained_minimizer(k):
    d = 30
    H = random_pd(d, seed=k)
    w_star = torch.randn(d, dtype=D64, generator=torch.Generator().manual_seed(100 + k))
    w_new, trace = hs.obs_prune(w_star, H, k, return_trace=True, block=4)
    removed = w_new == 0
    assert int(removed.sum()) == k
    assert torch.equal(removed.nonzero().reshape(-1).sort().values, trace.order.sort().values)
    oracle = kkt_minimizer(w_star, H, removed)
    assert torch.allclose(w_new, oracle, atol=1e-10)
    # the loss increase equals the sum of the saliencies along the way
    assert quad_loss(w_new, w_star, H) == pytest.approx(float(trace.saliencies.sum()), rel=1e-9)
    # the first removal is the weight of least OBS saliency
    first = torch.argmin(hs.obs_saliency(w_star, torch.linalg.inv(H)))
    assert int(trace.order[0]) == int(first)
    assert trace.min_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), rel=1e-9)


def test_obs_prune_block_size_does_not_change_result():
    d = 50
    H = random_pd(d, seed=3, cond=1e3)
    w = torch.randn(d, dtype=D64, generator=torch.Generator().manual_seed(3))
    a = hs.obs_prune(w, H, 37, block=1)            # plain rank-1 downdates, one per step
    b = hs.obs_prune(w, H, 37, block=64)           # lazy downdates folded in batches
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
    w_new = hs.obs_prune(w0, H, 6)
    removed = w_new == 0
    assert bool(removed[already].all())
    assert int(removed.sum()) == 4 + 6
    assert torch.allclose(w_new, kkt_minimizer(w_star, H, removed), atol=1e-10)
    assert torch.allclose(hs.constrained_minimizer(w_star, H, removed), w_new, atol=1e-10)


def test_obs_prune_float32_input_and_damping():
    H = random_pd(16, seed=7).float()
    w = torch.randn(16)
    out = hs.obs_prune(w, H, 8, damp=0.1)
    assert out.dtype == torch.float32 and int((out == 0).sum()) == 8
    # damping is relative: lambda = damp * mean |diag H|
    _, trace = hs.obs_prune(w, H, 1, damp=0.1, return_trace=True)
    assert trace.damping == pytest.approx(0.1 * float(H.diagonal().abs().mean()), rel=1e-6)


def test_obs_prune_rejects_indefinite_and_bad_input():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5, 0.0], dtype=D64))
    w = torch.ones(4, dtype=D64)
    with pytest.raises(ValueError, match="not positive definite.*damp"):
        hs.obs_prune(w, H, 1)
    with pytest.raises(ValueError, match="not positive definite"):
        hs.obs_prune(w, torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D64)), 1)   # singular
    out = hs.obs_prune(w, torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D64)), 1, damp=0.01)
    assert out[3] == 0                                                # no curvature: cheapest to remove
    with pytest.raises(ValueError, match="k must be"):
        hs.obs_prune(w, torch.eye(4, dtype=D64), 5)
    with pytest.raises(ValueError, match="shape"):
        hs.obs_prune(w, torch.eye(3, dtype=D64), 1)
    with pytest.raises(ValueError, match="damp"):
        hs.obs_prune(w, torch.eye(4, dtype=D64), 1, damp=-1)
    assert hs.min_eigenvalue(torch.diag(torch.tensor([3.0, -2.0]))) == pytest.approx(-2.0)
    assert torch.allclose(hs.positive_curvature(torch.diag(torch.tensor([3.0, -2.0])), "abs"),
                          torch.diag(torch.tensor([3.0, 2.0])))


# ------------------------------------------------------------------------------------------- Woodbury
@pytest.mark.parametrize("chunk", [1, 7])
def test_woodbury_inverse_equals_direct_inverse(chunk):
    g = torch.Generator().manual_seed(0)
    N, d, lam = 20, 12, 0.05
    G = torch.randn(N, d, generator=g, dtype=D64)
    direct = torch.linalg.inv(lam * torch.eye(d, dtype=D64) + G.T @ G / N)
    assert torch.allclose(hs.woodbury_fisher_inverse(G, lam, chunk_size=chunk), direct, atol=1e-9)
    batched = hs.woodbury_fisher_inverse(torch.stack([G, 2 * G]), lam, chunk_size=chunk)
    assert torch.allclose(batched[1], torch.linalg.inv(lam * torch.eye(d, dtype=D64) + 4 * G.T @ G / N), atol=1e-9)


# ------------------------------------------------------------------------------------------- models
def tiny_data(n=120, d_in=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.8).long()
    return X, y.clamp(max=classes - 1)


def trained_mlp(act=nn.ReLU, hidden=8, steps=150, dtype=torch.float32):
    torch.manual_seed(0)
    X, y = tiny_data()
    model = nn.Sequential(nn.Linear(6, hidden), act(), nn.Linear(hidden, 3)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X.to(dtype)), y).backward()
        opt.step()
    data = [(X[:60].to(dtype), y[:60]), (X[60:].to(dtype), y[60:])]
    return model, data


def data_loss(model, data):
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in data).item() / sum(len(y) for _, y in data)


def flat(model):
    return torch.cat([w.detach().reshape(-1) for w in sl.prunable(model).values()])


def test_loss_hessian_matches_finite_differences():
    model, data = trained_mlp(act=nn.Tanh, hidden=4, steps=30, dtype=D64)
    H = hs.loss_hessian(model, data, F.cross_entropy, chunk_size=7)
    w0 = flat(model)
    params = list(sl.prunable(model).values())

    def grad_at(v):
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(v[off:off + p.numel()].reshape(p.shape))
                off += p.numel()
        model.zero_grad()
        loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in data) / sum(len(y) for _, y in data)
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).clone()

    eps = 1e-5
    basis = torch.eye(len(w0), dtype=D64)
    H_fd = torch.stack([(grad_at(w0 + eps * e) - grad_at(w0 - eps * e)) / (2 * eps) for e in basis])
    grad_at(w0)
    assert torch.allclose(H, (H_fd + H_fd.T) / 2, atol=1e-7)
    v = torch.randn(3, len(w0), dtype=D64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hs.hessian_vector_product(model, data, F.cross_entropy, vectors=v), v @ H, atol=1e-12)
    diag = hs.hessian_diagonal(model, data, F.cross_entropy, chunk_size=5)
    assert torch.allclose(torch.cat([v.reshape(-1) for v in diag.values()]), H.diagonal(), atol=1e-12)


def test_empirical_fisher_is_psd_and_matches_autograd_loop():
    model, data = trained_mlp(dtype=D64, steps=20)
    fisher = hs.empirical_fisher(model, data, F.cross_entropy)
    grads = []
    for x, y in data:
        for i in range(len(y)):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            grads.append(torch.cat([w.grad.reshape(-1) for w in (model[0].weight, model[2].weight)]))
    G = torch.stack(grads)
    assert torch.allclose(fisher, G.T @ G / len(G), atol=1e-12)
    assert hs.min_eigenvalue(fisher) > -1e-12


def test_obd_score_is_half_diag_times_w2():
    model, data = trained_mlp()
    scores = sl.scores.get_method("obd").score(model, data=data, loss_fn=F.cross_entropy)
    diag = hs.hessian_diagonal(model, data, F.cross_entropy)
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
    H = hs.loss_hessian(dense, data, F.cross_entropy).to(D64)
    w = flat(dense).to(D64)
    expected = hs.obs_prune(w, hs.positive_curvature(H, "abs"), round(0.5 * len(w)), damp=hs.DEFAULT_DAMP)
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

    fisher = hs.empirical_fisher(single, data, loss_fn).to(D64)
    w = flat(single).to(D64)
    expected = hs.obs_prune(w, fisher, 30, damp=hs.DEFAULT_DAMP)
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


# ------------------------------------------------------------------------------------------- layer-wise
def correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / math.sqrt(d)
    return (torch.randn(n, d, generator=g) @ mix) * (torch.rand(d, generator=g) + 0.2)


def recon_error(W, W_hat, X):
    return float(((X @ (W - W_hat).T) ** 2).sum())


def test_obc_layer_equals_obs_prune_row_by_row():
    X = correlated_inputs(200, 20).double()
    W = torch.randn(7, 20, dtype=D64)
    H = hs.layer_hessian(X)
    assert torch.allclose(H, 2 * X.T @ X)
    threads = torch.get_num_threads()
    W_hat, mask = hs.obc_layer(W, H, 0.5, dtype=D64, block=3)
    assert torch.get_num_threads() == threads                   # the solver's thread switching is undone
    assert int((~mask).sum()) == 70 and torch.equal(mask, W_hat != 0)
    for r in range(7):
        expected = hs.obs_prune(W[r], H, 10, damp=hs.DEFAULT_DAMP)
        assert torch.allclose(W_hat[r], expected, atol=1e-9)
    # float32 arithmetic (the default) agrees with float64
    W32, mask32 = hs.obc_layer(W.float(), H.float(), 0.5)
    assert (mask32 == mask).float().mean() > 0.97
    assert recon_error(W.float(), W32, X.float()) == pytest.approx(recon_error(W, W_hat, X), rel=1e-3)


def test_obc_layer_existing_mask_and_uneven_rows():
    X = correlated_inputs(150, 12, seed=1).double()
    H = hs.layer_hessian(X)
    W = torch.randn(5, 12, dtype=D64)
    mask = torch.rand(5, 12, generator=torch.Generator().manual_seed(2)) > 0.3
    W0 = W * mask
    W_hat, new = hs.obc_layer(W0, H, zeros=33, mask=mask, dtype=D64)
    assert int((~new).sum()) == 33 and bool((new <= mask).all())
    counts = (~new).sum(1) - (~mask).sum(1)
    # the layer's damping is relative to the whole diagonal of H, not to each row's surviving block
    H_damped = H + hs.damping(H, hs.DEFAULT_DAMP) * torch.eye(12, dtype=D64)
    for r in range(5):
        expected = hs.obs_prune(W0[r], H_damped, int(counts[r]), alive=mask[r])
        assert torch.allclose(W_hat[r], expected, atol=1e-9)
    # OBC's own allocation across rows: same total, each row still exact greedy OBS for its count
    W_ad, ad = hs.obc_layer(W0, H, zeros=33, mask=mask, dtype=D64, row_allocation="adaptive")
    assert int((~ad).sum()) == 33 and bool((ad <= mask).all())
    for r in range(5):
        k = int((~ad[r]).sum() - (~mask[r]).sum())
        assert torch.allclose(W_ad[r], hs.obs_prune(W0[r], H_damped, k, alive=mask[r]), atol=1e-9)


def sparsegpt_reference(W, H, sparsity, blocksize, percdamp, prunen=0, prunem=0):
    """Port of fasterprune() of the SparseGPT reference code (IST-DASLab/sparsegpt), with the block's mask chosen
    by an exact count (topk) instead of a threshold, so that the count is deterministic."""
    W = W.clone()
    H = H.clone()
    rows, columns = W.shape
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = torch.zeros_like(W1, dtype=torch.bool).reshape(-1)
            mask1[torch.topk(tmp.reshape(-1), int(tmp.numel() * sparsity), largest=False).indices] = True
            mask1 = mask1.reshape(W1.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w, d = W1[:, i], Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_layer_matches_reference_and_beats_magnitude():
    X = correlated_inputs(300, 64, seed=3).double()
    H = hs.layer_hessian(X)
    W = torch.randn(16, 64, dtype=D64)
    W_hat, mask = hs.sparsegpt_layer(W, H, 0.5, blocksize=16)
    assert int((~mask).sum()) == 512 and torch.equal(W_hat != 0, mask)
    assert torch.allclose(W_hat, sparsegpt_reference(W, H, 0.5, 16, hs.DEFAULT_DAMP), atol=1e-9)
    keep = sl.select.topk_mask(W.abs(), 512)
    magnitude_error = recon_error(W, W * keep, X)
    assert recon_error(W, W_hat, X) < 0.5 * magnitude_error
    W_obc, _ = hs.obc_layer(W, H, 0.5, dtype=D64)
    assert recon_error(W, W_obc, X) <= recon_error(W, W_hat, X) * 1.05   # exact greedy is at least as good
    # N:M (2:4 = at most 2 nonzeros in every 4 consecutive inputs)
    W_nm, mask_nm = hs.sparsegpt_layer(W, H, structure=(2, 4), blocksize=16)
    assert bool((mask_nm.reshape(16, 16, 4).sum(-1) == 2).all())
    assert torch.allclose(W_nm, sparsegpt_reference(W, H, 0, 16, hs.DEFAULT_DAMP, prunen=2, prunem=4), atol=1e-9)
    magnitude_24 = sl.select.n_m_masks({"w": W.abs()}, {"w": torch.ones_like(mask)}, 2, 4)["w"]
    assert recon_error(W, W_nm, X) < recon_error(W, W * magnitude_24, X)
    with pytest.raises(ValueError, match="multiple of m"):
        hs.sparsegpt_layer(W[:, :62], H[:62, :62], structure=(2, 4))


def test_sparsegpt_layer_exact_count_with_existing_mask():
    X = correlated_inputs(100, 40, seed=4)
    H = hs.layer_hessian(X)
    W = torch.randn(9, 40)
    mask = torch.rand(9, 40, generator=torch.Generator().manual_seed(4)) > 0.2
    W_hat, new = hs.sparsegpt_layer(W * mask, H, 0.7, mask=mask, blocksize=16)
    assert int((~new).sum()) == round(0.7 * 360) and bool((new <= mask).all())
    assert bool((W_hat[~new] == 0).all())


def test_layer_hessians_linear_and_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    x = torch.randn(5, 2, 6, 6)
    Hs = hs.layer_hessians(model, [(x, torch.zeros(5))])
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    # the patches are what the convolution multiplies its weight with
    out = (patches @ conv.weight.detach().reshape(3, -1).T).reshape(5, 9, 3).permute(0, 2, 1).reshape(5, 3, 3, 3)
    assert torch.allclose(out + conv.bias.detach().reshape(1, 3, 1, 1), conv(x), atol=1e-5)
    assert torch.allclose(Hs["0.weight"], 2 * patches.T @ patches, atol=1e-4)
    hidden = model[2](model[1](conv(x))).detach()
    assert torch.allclose(Hs["3.weight"], 2 * hidden.T @ hidden, atol=1e-4)


def test_obc_and_sparsegpt_through_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    X = correlated_inputs(256, 16, seed=5)
    data = [(X[:128], torch.zeros(128)), (X[128:], torch.zeros(128))]
    dense = copy.deepcopy(model)
    # all inputs from the dense model: each layer is obc_layer on its own Hessian
    sl.prune(model, 0.5, method="obc", scope="layerwise", data=data, sequential=False)
    Hs = hs.layer_hessians(dense, data)
    for name in ("0.weight", "2.weight"):
        W = sl.prunable(dense)[name].detach()
        expected, _ = hs.obc_layer(W, Hs[name], 0.5)
        assert torch.allclose(sl.prunable(model)[name].detach(), expected, atol=1e-6)
    # global scope: per-layer counts of global magnitude pruning
    m2 = copy.deepcopy(dense)
    magnitude = sl.select.global_masks({n: w.detach().abs() for n, w in sl.prunable(dense).items()},
                                       sl.get_masks(dense), 0.6)
    masks = sl.prune(m2, 0.6, method="sparsegpt", data=data)
    for name in masks:
        assert int((~masks[name]).sum()) == int((~magnitude[name]).sum())
    # sequential (default): the second layer sees the pruned first layer's outputs; output error beats magnitude
    m3, m4 = copy.deepcopy(dense), copy.deepcopy(dense)
    sl.prune(m3, 0.5, method="obc", scope="layerwise", data=data)
    sl.prune(m4, 0.5, method="magnitude", scope="layerwise")
    with torch.no_grad():
        ref = dense(X)
        assert ((m3(X) - ref) ** 2).sum() < ((m4(X) - ref) ** 2).sum()
    m5 = copy.deepcopy(dense)
    masks = sl.prune(m5, 0.5, method="sparsegpt", structure=(2, 4), data=data)
    assert all(bool((m.reshape(m.shape[0], -1, 4).sum(-1) <= 2).all()) for m in masks.values())
    before = copy.deepcopy(m5.state_dict())
    with pytest.raises(ValueError, match="structure"):
        sl.prune(m5, 0.75, method="sparsegpt", structure="neuron", data=data)
    with pytest.raises(ValueError, match="structure must be None"):
        sl.prune(m5, 0.75, method="obc", structure=(1, 4), data=data)
    assert all(torch.equal(before[k], v) for k, v in m5.state_dict().items())


def test_layerwise_methods_reject_unsupported_layers():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    before = copy.deepcopy(model.state_dict())
    data = [(torch.randn(2, 1, 3, 3, 3), torch.zeros(2))]
    with pytest.raises(ValueError, match="Conv3d"):
        sl.prune(model, 0.5, method="obc", data=data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparsegpt_n_m_checks_every_layer_before_pruning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))      # fan-in 6 is not a multiple of 4
    data = [(torch.randn(32, 8), torch.zeros(32))]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2\.weight \(6\) is not a multiple of m=4.*exclude"):
        sl.prune(model, 0.5, method="sparsegpt", structure=(2, 4), data=data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    nm = sl.prune(model, 0.5, method="sparsegpt", structure=(2, 4), data=data, scope="layerwise",
                  exclude=["2.weight"])
    assert bool((nm["0.weight"].reshape(6, 2, 4).sum(-1) == 2).all()) and bool(nm["2.weight"].all())



def test_obs_with_precomputed_hessian_and_weight_decay():
    """hessian= reuses a Hessian across calls; weight_decay adds the L2 term's mu*I to it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    data = [(torch.randn(32, 6), torch.randint(0, 3, (32,)))]
    H = hs.loss_hessian(model, data)
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
