"""Curvature by automatic differentiation: loss Hessians, their diagonals and products, per-sample gradients and
the empirical Fisher, damping and positive-definiteness checks (survey §3.5.1, §3.5.5).

Every second-order method starts from the quadratic model of the loss around trained weights ``w``::

    dL(dw) ~ g^T dw + 1/2 dw^T H dw,      g ~ 0 at a minimum,

and this module computes the ``H`` (or its stand-ins) that :mod:`sparsity_lib.obs` and
:mod:`sparsity_lib.layerwise` use:

* the exact loss Hessian over all prunable weights, never formed unless asked: :func:`hessian_vector_product`
  (reverse over reverse with ``torch.func``), :func:`loss_hessian` (column by column), :func:`hessian_diagonal`
  (OBD's ``H_qq``);
* the empirical Fisher ``F = 1/N sum_j g_j g_j^T`` from :func:`per_sample_gradients` (``vmap`` over ``grad``):
  :func:`empirical_fisher`, and its damped inverse by Woodbury/Sherman-Morrison updates
  (:func:`woodbury_fisher_inverse`, survey eq. 5);
* damping and definiteness: :func:`damping`, :func:`min_eigenvalue`, :func:`check_positive_definite`,
  :func:`positive_curvature`.

All weights are flattened in ``sl.prunable`` order (layer after layer, each row-major). A masked layer is called
through its parametrization (``original * mask``), so rows and columns of masked weights are exactly zero.

Damping. Hessians of real networks are singular or indefinite (the softmax is invariant to adding a constant to
all logits, dead ReLUs and always-zero inputs have zero curvature, and a network is never exactly at a minimum),
so every method works with ``H + lambda I`` where ``lambda = damp * mean |H_ii|`` is relative to the Hessian's own
scale, as in the reference implementations of OBC and SparseGPT ("percdamp", default 0.01)
{cite}`frantar2022optimal` {cite}`frantar2023sparsegpt`.

Defined for Chapter 06 (survey §3.5, Hoefler et al. {cite}`hoefler2021sparsity`).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from .masks import _original, _prunable_modules, prunable
from .plumbing import (attention_math, batch_size, batches, check_finite, check_loss_fn, check_number,
                       check_positive_int, eval_mode, flatten, unflatten)

#: Default relative damping of every second-order method: ``lambda = 0.01 * mean(|diag H|)``, the ``percdamp`` of
#: the OBC and SparseGPT reference code. On a trained digits MLP it was close to the best of 1e-4 ... 1 for "obs"
#: (on ``|H|``) and "woodfisher" at 50-90% sparsity.
DEFAULT_DAMP = 0.01
#: The exact d x d loss Hessian (and with it exact OBS) is refused above this many prunable weights.
HESSIAN_MAX_PARAMS = 6000


# =========================================================================================== validation
def _check_square(H, d: int, name: str = "H") -> torch.Tensor:
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({d}, {d}), got {type(H).__name__}")
    if tuple(H.shape) != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}) to match w, got {tuple(H.shape)}")
    if torch.isnan(H).any() or torch.isinf(H).any():
        raise ValueError(f"{name} contains NaN or inf")
    return H


def _check_damp(damp, name: str = "damp") -> float:
    return check_number(damp, name, minimum=0.0, meaning="damping relative to mean |diag H|")


# =========================================================================================== damping
def damping(H: torch.Tensor, damp: float) -> float:
    """The absolute damping ``lambda = damp * mean_i |H_ii|`` added to the diagonal (``damp * 1`` if ``H`` has
    a zero diagonal). Relative damping makes a method independent of the scale of the loss or of the number of
    calibration samples, like ``percdamp`` in the SparseGPT code {cite}`frantar2023sparsegpt` (survey §3.5.5)."""
    damp = _check_damp(damp)
    return damp * _mean_abs_or_one(H.diagonal() if H.dim() == 2 else H)


def _mean_abs_or_one(diag: torch.Tensor) -> float:
    scale = float(diag.abs().mean()) if diag.numel() else 0.0
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def min_eigenvalue(H: torch.Tensor) -> float:
    """Smallest eigenvalue of the symmetric matrix ``(H + H^T) / 2``, computed in float64 (``eigvalsh``).

    ``H`` is positive definite iff this is > 0: the condition under which the OBS quadratic model has a unique
    minimum and its saliencies and updates mean what they claim (Hassibi and Stork {cite}`hassibi1993second`;
    survey §3.5.3, item 2).
    """
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got {getattr(H, 'shape', type(H).__name__)}")
    if H.numel() == 0:
        raise ValueError("H is empty")
    Hd = H.detach().to(torch.float64)
    return float(torch.linalg.eigvalsh((Hd + Hd.T) / 2)[0])


def check_positive_definite(H: torch.Tensor, *, what: str = "H + lambda I", advice: str = "") -> Tuple[float, float]:
    """Return ``(smallest, largest)`` eigenvalue of ``H`` and raise ``ValueError`` if ``H`` is not numerically
    positive definite (smallest eigenvalue <= ``d * eps64 * largest``): exact OBS cannot be trusted then
    (Hassibi and Stork {cite}`hassibi1993second`; survey §3.5.3, item 2). ``advice`` ends the message."""
    Hd = H.detach().to(torch.float64)
    return _check_pd_eigenvalues(torch.linalg.eigvalsh((Hd + Hd.T) / 2), what=what, advice=advice)


def _check_pd_eigenvalues(eig: torch.Tensor, *, what: str, advice: str = "") -> Tuple[float, float]:
    """:func:`check_positive_definite` from the ascending eigenvalues ``eig`` of the matrix (no second copy)."""
    lo, hi = float(eig[0]), float(eig[-1])
    tol = eig.numel() * torch.finfo(torch.float64).eps * max(abs(hi), torch.finfo(torch.float64).tiny)
    if not lo > tol:
        raise ValueError(
            f"{what} is not positive definite: its smallest eigenvalue is {lo:.3g} (largest {hi:.3g}). The "
            "quadratic model has no minimum there, so exact OBS saliencies and updates cannot be trusted. "
            + (advice or "Increase damp (relative to mean |diag H|).")
        )
    return lo, hi


def _inverse_pd(H: torch.Tensor, what: str, advice: str) -> torch.Tensor:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        lo = min_eigenvalue(H)
        raise ValueError(f"{what} is not positive definite (Cholesky failed; smallest eigenvalue {lo:.3g}). "
                         + advice)
    return torch.cholesky_inverse(L)




# ============================================================================== the loss as a function of w
class _Functional:
    """The loss as a function of the flat vector of all prunable weights (``sl.prunable`` order), everything else
    fixed: the bridge from an ``nn.Module`` to ``torch.func``.

    A masked layer is called through its parametrization (``original * mask``), so derivatives with respect to
    masked weights are exactly zero: their rows and columns of the Hessian or Fisher vanish.
    """

    def __init__(self, model: nn.Module, loss_fn):
        modules = _prunable_modules(model)
        self.model, self.loss_fn = model, loss_fn
        self.names = list(modules)
        param_ids = {id(p): n for n, p in model.named_parameters()}
        self.keys, self.shapes = [], []
        for name, module in modules.items():
            param = _original(module, name)
            if id(param) not in param_ids:
                raise ValueError(f"the weight of {name} is not a parameter of the model")
            self.keys.append(param_ids[id(param)])
            self.shapes.append(tuple(param.shape))
        self.sizes = [math.prod(s) for s in self.shapes]
        self.d = sum(self.sizes)
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if n not in set(self.keys)}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.w0 = flatten({n: _original(modules[n], n).detach() for n in self.names})

    def split(self, flat):
        params = dict(self.fixed)
        for key, chunk, shape in zip(self.keys, torch.split(flat, self.sizes), self.shapes):
            params[key] = chunk.reshape(shape)
        return params

    def loss(self, flat, inputs, targets):
        with attention_math(self.model):   # nn.MultiheadAttention without the fused kernel: 2nd derivatives exist
            out = torch.func.functional_call(self.model, (self.split(flat), self.buffers), (inputs,))
        return self.loss_fn(out, targets)

    def sample_loss(self, flat, x, y):
        return self.loss(flat, x.unsqueeze(0), y.unsqueeze(0))


_default_loss = check_loss_fn  # the one check of plumbing


def _items(model: nn.Module, data):
    """The calibration batches, parsed once (:func:`sparsity_lib.plumbing.batches`: targets required, non-finite
    values refused)."""
    return batches(data, model, need_targets=True)


def _hvp_rows(fun: "_Functional", items, V: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``H V^T`` rows for the prepared functional and batches (model already in eval mode)."""
    total = sum(batch_size(y) for _, y in items)
    out = torch.zeros_like(V)
    for x, y in items:
        _, hvp = torch.func.vjp(torch.func.grad(lambda flat: fun.loss(flat, x, y)), fun.w0)
        weight = batch_size(y) / total
        for start in range(0, V.shape[0], chunk_size):
            out[start:start + chunk_size] += weight * torch.func.vmap(hvp)(V[start:start + chunk_size])[0]
    return out


def hessian_vector_product(model: nn.Module, data, loss_fn=None, *, vectors: torch.Tensor,
                           chunk_size: int = 64) -> torch.Tensor:
    """``H v`` for every row ``v`` of ``vectors`` (``(m, d)`` or ``(d,)``), ``H`` the Hessian of the data loss with
    respect to all prunable weights (flattened in ``sl.prunable`` order), without forming ``H``: reverse over
    reverse differentiation, ``H v = v^T H`` = the vector-Jacobian product of ``torch.func.grad`` (``H`` is
    symmetric), one ``torch.func.vjp`` per batch, vectorized over ``chunk_size`` vectors at a time with ``vmap``.

    The data loss is the sample-weighted mean of ``loss_fn`` over the batches (``loss_fn`` with mean
    reduction, default cross-entropy); the model is evaluated in eval mode. The curvature of OBD/OBS
    ({cite}`lecun1990optimal`, {cite}`hassibi1993second`; survey §3.5.1), computed with PyTorch's ``torch.func``
    {cite}`pytorch2019`."""
    loss_fn = _default_loss(loss_fn)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    items = _items(model, data)
    with eval_mode(model):
        fun = _Functional(model, loss_fn)
        if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.shape[-1] != fun.d:
            raise ValueError(f"vectors must be a tensor of shape (d,) or (m, d) with d = {fun.d} (the number of "
                             f"prunable weights), got {getattr(vectors, 'shape', type(vectors).__name__)}")
        out = _hvp_rows(fun, items, vectors.reshape(-1, fun.d).to(fun.w0), chunk_size)
    return out.reshape(vectors.shape)


def _unit_rows(start: int, stop: int, d: int, like: torch.Tensor) -> torch.Tensor:
    E = torch.zeros(stop - start, d, dtype=like.dtype, device=like.device)
    E[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return E


def loss_hessian(model: nn.Module, data, loss_fn=None, *, max_params: int = HESSIAN_MAX_PARAMS,
                 chunk_size: int = 64) -> torch.Tensor:
    """The exact Hessian ``H = d^2 L / dw^2`` (``d x d``) of the data loss with respect to *all* prunable weights,
    flattened in ``sl.prunable`` order (layer after layer, each row-major).

    Built column by column from Hessian-vector products (:func:`hessian_vector_product` on the unit vectors,
    ``chunk_size`` at a time) and symmetrized. ``L`` is the sample-weighted mean of ``loss_fn`` (mean reduction,
    default cross-entropy) over the batches of ``data``, the model in eval mode. Rows and columns of masked
    weights are zero. ``d`` above ``max_params`` raises ``ValueError`` (memory grows as ``d^2``). The ``H`` of
    exact OBS (Hassibi and Stork {cite}`hassibi1993second`; survey §3.5.1).
    """
    d = sum(w.numel() for w in prunable(model).values())
    if d > max_params:
        raise ValueError(f"the model has d = {d} prunable weights; the exact Hessian (d x d, "
                         f"{4 * d * d / 2**30:.2f} GiB in float32) is limited to max_params = {max_params}")
    loss_fn = _default_loss(loss_fn)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    items = _items(model, data)
    with eval_mode(model):
        fun = _Functional(model, loss_fn)
        H = torch.empty(d, d, dtype=fun.w0.dtype, device=fun.w0.device)
        for start in range(0, d, chunk_size):
            stop = min(d, start + chunk_size)
            H[start:stop] = _hvp_rows(fun, items, _unit_rows(start, stop, d, fun.w0), chunk_size)
    H += H.T.clone()
    return H.mul_(0.5)


def hessian_diagonal(model: nn.Module, data, loss_fn=None, *, chunk_size: int = 64) -> Dict[str, torch.Tensor]:
    """The exact diagonal ``H_qq`` of the loss Hessian for every prunable weight, ``{name: tensor}`` shaped like
    the weights: ``e_q^T H e_q`` from one Hessian-vector product per weight (vectorized, ``chunk_size`` at a time),
    without storing ``H``. Cost: ``d`` Hessian-vector products. Used by OBD {cite}`lecun1990optimal` (§3.5.1)."""
    params = prunable(model)
    d = sum(w.numel() for w in params.values())
    loss_fn = _default_loss(loss_fn)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    items = _items(model, data)              # parsed once: a one-shot generator works
    with eval_mode(model):
        fun = _Functional(model, loss_fn)
        diag = torch.empty(d, dtype=fun.w0.dtype, device=fun.w0.device)
        for start in range(0, d, chunk_size):
            stop = min(d, start + chunk_size)
            HE = _hvp_rows(fun, items, _unit_rows(start, stop, d, fun.w0), chunk_size)
            diag[start:stop] = HE[torch.arange(stop - start), torch.arange(start, stop)]
    return unflatten(diag, {n: w.detach() for n, w in params.items()})


def per_sample_gradients(model: nn.Module, data, loss_fn=None) -> torch.Tensor:
    """Gradients ``g_j = d loss(x_j, y_j) / dw`` of every single sample with respect to all prunable weights,
    as an ``(N, d)`` tensor (``sl.prunable`` order), by ``torch.func.vmap`` over ``torch.func.grad`` of the
    one-sample loss (model in eval mode). Entries of masked weights are zero. The ingredients of the empirical
    Fisher (Singh and Alistarh {cite}`singh2020woodfisher`; survey §3.5.5)."""
    loss_fn = _default_loss(loss_fn)
    items = _items(model, data)
    with eval_mode(model):
        fun = _Functional(model, loss_fn)
        per_sample = torch.func.vmap(torch.func.grad(fun.sample_loss), in_dims=(None, 0, 0))
        return torch.cat([per_sample(fun.w0, x, y).detach() for x, y in items])


def empirical_fisher(model: nn.Module, data, loss_fn=None, *, max_params: int = 20000) -> torch.Tensor:
    """The empirical Fisher ``F = 1/N sum_j g_j g_j^T`` (``d x d``) over all prunable weights, from the per-sample
    gradients of :func:`per_sample_gradients`: the survey's approximation of the Hessian for a well-trained
    classifier (§3.5.5; Hassibi and Stork {cite}`hassibi1993second`, Singh and Alistarh {cite}`singh2020woodfisher`).
    Positive semi-definite by construction (a sum of outer products)."""
    d = sum(w.numel() for w in prunable(model).values())
    if d > max_params:
        raise ValueError(f"the model has d = {d} prunable weights; the dense empirical Fisher is limited to "
                         f"max_params = {max_params} (use method='woodfisher', which keeps it block-diagonal)")
    G = per_sample_gradients(model, data, loss_fn)
    return G.T @ G / G.shape[0]


def woodbury_fisher_inverse(grads: torch.Tensor, lam: float, *, chunk_size: int = 16) -> torch.Tensor:
    """``(lambda I + 1/N sum_j g_j g_j^T)^-1`` from the ``N`` gradients without ever inverting a ``d x d`` matrix.

    Starting from ``(lambda I)^-1``, the gradients are folded in ``chunk_size`` at a time by the Woodbury
    identity; with ``chunk_size=1`` this is exactly the Sherman-Morrison recursion of survey eq. (5)
    (Hassibi and Stork {cite}`hassibi1993second`; WoodFisher, Singh and Alistarh {cite}`singh2020woodfisher`)::

        F^-1 <- F^-1 - F^-1 G^T (N I + G F^-1 G^T)^-1 G F^-1,    G = the chunk of gradients (m x d)

    ``grads`` is ``(N, d)`` or batched over blocks ``(B, N, d)`` (then the ``B`` inverses are built at once).
    """
    lam = check_number(lam, "lam", minimum=0.0, strict=True,
                       meaning="the Fisher of N < d samples is singular without damping")
    check_finite(grads, "the per-sample gradients", "A NaN or inf in the data, the loss or the weights reached "
                 "the gradients: nothing was changed.")
    G = grads.unsqueeze(0) if grads.dim() == 2 else grads
    B, N, d = G.shape
    Finv = torch.eye(d, dtype=G.dtype, device=G.device).expand(B, d, d) / lam
    Finv = Finv.clone()
    for start in range(0, N, chunk_size):
        Gc = G[:, start:start + chunk_size]                      # (B, m, d)
        FG = Finv @ Gc.transpose(1, 2)                            # (B, d, m)
        M = N * torch.eye(Gc.shape[1], dtype=G.dtype, device=G.device) + Gc @ FG
        Finv = Finv - FG @ torch.linalg.solve(M, FG.transpose(1, 2))
        Finv = (Finv + Finv.transpose(1, 2)) / 2
    return Finv[0] if grads.dim() == 2 else Finv


# ===================================================================================== indefinite curvature
NEGATIVE_CURVATURE = ("abs", "clip", "raise")


def positive_curvature(H: torch.Tensor, mode: str = "abs") -> torch.Tensor:
    """A positive semi-definite stand-in for a symmetric, possibly indefinite ``H = V diag(l) V^T``.

    * ``"abs"``: ``V diag(|l|) V^T``: negative curvature counted as positive curvature of the same size (the
      "saddle-free" curvature of {cite}`dauphin2014identifying`): the quadratic model then never predicts that a step
      *lowers* the loss, and steps along those directions are penalized as much as the Hessian says they matter;
    * ``"clip"``: ``V diag(max(l, 0)) V^T``: the nearest positive semi-definite matrix (Frobenius norm), which
      leaves the negative directions with zero curvature, to be filled in by damping only.

    Exact OBS assumes ``H`` positive definite (survey §3.5.3, item 2); the Hessian of a trained network rarely is.
    """
    if mode not in ("abs", "clip"):
        raise ValueError(f"mode must be 'abs' or 'clip', got {mode!r}")
    Hd = H.detach().to(torch.float64)
    values, vectors = torch.linalg.eigh((Hd + Hd.T) / 2)
    values = values.abs() if mode == "abs" else values.clamp(min=0)
    return ((vectors * values) @ vectors.T).to(H.dtype)


__all__ = [
    "DEFAULT_DAMP", "HESSIAN_MAX_PARAMS", "NEGATIVE_CURVATURE", "damping", "min_eigenvalue", "check_positive_definite",
    "hessian_vector_product", "loss_hessian", "hessian_diagonal", "per_sample_gradients", "empirical_fisher",
    "woodbury_fisher_inverse", "positive_curvature",
]
