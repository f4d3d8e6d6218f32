"""Shared helpers of the second-order tests (test_curvature, test_obs, test_layerwise): random positive-definite
matrices, the KKT oracle of the constrained minimizer, tiny trained models, correlated layer inputs and a
line-by-line port of the SparseGPT reference code. Not a test module (no ``test_`` prefix)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl

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


def correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / math.sqrt(d)
    return (torch.randn(n, d, generator=g) @ mix) * (torch.rand(d, generator=g) + 0.2)


def recon_error(W, W_hat, X):
    return float(((X @ (W - W_hat).T) ** 2).sum())


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


def snapshot(model):
    """Everything a refusal must leave as it was: tensors (state_dict), parametrizations, hooks, training flags."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(p).__name__) for n, m in model.named_modules()
             for p in getattr(getattr(m, "parametrizations", None), "weight", [])],
            [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
            [m.training for m in model.modules()])


def assert_unchanged(model, before):
    after = snapshot(model)
    assert before[0].keys() == after[0].keys()
    for k in before[0]:            # bitwise equal, NaN where there was NaN
        a, b = before[0][k], after[0][k]
        assert a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all()), k
    assert before[1:] == after[1:]


def nan_data_and_masked_model(seed=0):
    """A masked MLP and calibration data with one NaN input value (WoodFisher used to write NaN into all weights,
    masked ones included)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    sl.prune(model, 0.3, method="magnitude")
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    x[7, 2] = float("nan")
    return model, [(x[:20], y[:20]), (x[20:], y[20:])]
