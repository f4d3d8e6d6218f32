"""Tests of sparsity_lib.curvature (survey §3.5.1, §3.5.5): loss Hessians by autodiff, the empirical Fisher and its
Woodbury inverse. Oracles: finite differences of autograd gradients, per-sample gradients by a plain autograd loop,
direct matrix inversion."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl
from second_order_helpers import D64, flat, trained_mlp


@pytest.mark.parametrize("chunk", [1, 7])
def test_woodbury_inverse_equals_direct_inverse(chunk):
    g = torch.Generator().manual_seed(0)
    N, d, lam = 20, 12, 0.05
    G = torch.randn(N, d, generator=g, dtype=D64)
    direct = torch.linalg.inv(lam * torch.eye(d, dtype=D64) + G.T @ G / N)
    assert torch.allclose(sl.curvature.woodbury_fisher_inverse(G, lam, chunk_size=chunk), direct, atol=1e-9)
    batched = sl.curvature.woodbury_fisher_inverse(torch.stack([G, 2 * G]), lam, chunk_size=chunk)
    assert torch.allclose(batched[1], torch.linalg.inv(lam * torch.eye(d, dtype=D64) + 4 * G.T @ G / N), atol=1e-9)


def test_loss_hessian_matches_finite_differences():
    model, data = trained_mlp(act=nn.Tanh, hidden=4, steps=30, dtype=D64)
    H = sl.curvature.loss_hessian(model, data, F.cross_entropy, chunk_size=7)
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
    assert torch.allclose(sl.curvature.hessian_vector_product(model, data, F.cross_entropy, vectors=v), v @ H, atol=1e-12)
    diag = sl.curvature.hessian_diagonal(model, data, F.cross_entropy, chunk_size=5)
    assert torch.allclose(torch.cat([v.reshape(-1) for v in diag.values()]), H.diagonal(), atol=1e-12)


def test_empirical_fisher_is_psd_and_matches_autograd_loop():
    model, data = trained_mlp(dtype=D64, steps=20)
    fisher = sl.curvature.empirical_fisher(model, data, F.cross_entropy)
    grads = []
    for x, y in data:
        for i in range(len(y)):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            grads.append(torch.cat([w.grad.reshape(-1) for w in (model[0].weight, model[2].weight)]))
    G = torch.stack(grads)
    assert torch.allclose(fisher, G.T @ G / len(G), atol=1e-12)
    assert sl.curvature.min_eigenvalue(fisher) > -1e-12


def test_hessian_diagonal_reads_a_one_shot_generator_once():
    """The d Hessian-vector products all use the data: it is parsed once, so a generator works (it used to be
    consumed by the first chunk, and "obd" then failed with "data is empty")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    batches = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(3)]
    expected = sl.curvature.hessian_diagonal(model, batches, chunk_size=8)
    H = sl.curvature.loss_hessian(model, batches)
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in expected.values()]), H.diagonal(),
                               rtol=1e-4, atol=1e-6)
    got = sl.curvature.hessian_diagonal(model, (b for b in batches), chunk_size=8)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    scores = sl.scores.get_method("obd").score(model, data=iter(batches))
    assert all(torch.allclose(scores[n], 0.5 * expected[n] * w.detach() ** 2) for n, w in sl.prunable(model).items())
