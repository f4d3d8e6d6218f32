"""The Optimal Brain Surgeon family: OBD, OBS, the greedy OBS kernel, and model-level OBD/OBS/WoodFisher
(survey §3.5.1-§3.5.5).

All these methods start from the quadratic model of the loss around trained weights ``w`` (survey §3.5.1)::

    dL(dw) ~ g^T dw + 1/2 dw^T H dw,      g ~ 0 at a minimum,

and ask which weight ``q`` to remove (``dw_q = -w_q``) so that the loss grows least. They differ in *which*
``H`` they use (computed in :mod:`sparsity_lib.curvature`) and *how* they get at its inverse:

================  =================================================  ==========================================
method            curvature ``H``                                     removal
================  =================================================  ==========================================
``"obd"``         diagonal of the exact loss Hessian                  score ``1/2 H_qq w_q^2``, no weight update
``"obs"``         exact loss Hessian over all prunable weights        greedy, OBS update, exact inverse downdates
``"woodfisher"``  empirical Fisher ``1/N sum g g^T``, block-diagonal  greedy across blocks, OBS update per block
================  =================================================  ==========================================

The layer-wise members of the family (OBC, SparseGPT, with Wanda beside them) are in :mod:`sparsity_lib.layerwise`.

The functional core works on a flat weight vector ``w`` (length ``d``) and a ``d x d`` matrix ``H``:
:func:`obd_saliency`, :func:`obs_saliency`, :func:`obs_prune`, :func:`constrained_minimizer`. The greedy OBS
kernel exists twice: :func:`greedy_obs_plain`, the textbook loop next to its equations, and ``_greedy_obs``, the
same sequence of removals batched over rows with lazy downdates (tested equal). The model-level methods are
registered with :func:`sparsity_lib.prune` (``sl.prune(model, 0.5, method="obs", data=..., loss_fn=...)``).

:func:`obs_prune` checks the smallest eigenvalue of the damped matrix and refuses to run (``ValueError``) when it
is not positive definite, because then the quadratic model has no minimum and the OBS update points to a saddle.
The exact loss Hessian of a trained network is usually indefinite; the model-level ``"obs"`` then says so and,
unless told otherwise, uses ``|H|`` (see :func:`obs_pruner`).

Defined for Chapter 06 (survey §3.5, Hoefler et al. {cite}`hoefler2021sparsity`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .curvature import (DEFAULT_DAMP, HESSIAN_MAX_PARAMS, NEGATIVE_CURVATURE, _check_damp, _check_pd_eigenvalues,
                        _check_square, _default_loss, _Functional, _hvp_rows, _inverse_pd, _items, _mean_abs_or_one,
                        _unit_rows, check_positive_definite, damping, hessian_diagonal, loss_hessian,
                        per_sample_gradients, positive_curvature, woodbury_fisher_inverse)
from .masks import _original, _prunable_modules, prunable
from .plumbing import batch_size, check_finite, check_positive_int, eval_mode, flatten, unflatten

#: Exact OBS stores and inverts a d x d matrix: above this many prunable weights "obs" refuses to run.
OBS_MAX_PARAMS = HESSIAN_MAX_PARAMS
#: OBD takes one Hessian-vector product per weight (d of them, each a double backward pass over the data): above
#: this many prunable weights the registered "obd" refuses to run, quoting the cost.
OBD_MAX_PARAMS = 20000


# =========================================================================================== validation
def _check_vector(w, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (a flat weight vector), got {type(w).__name__}")
    if w.dim() != 1:
        raise ValueError(f"{name} must be a flat vector of length d, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    return w


def _diagonal_of(H, d: int, name: str) -> torch.Tensor:
    """``diag(H)`` for a ``(d, d)`` matrix, or ``H`` itself when it is already given as its diagonal ``(d,)``."""
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({d}, {d}) or ({d},), got {type(H).__name__}")
    if tuple(H.shape) == (d,):
        return H
    if tuple(H.shape) == (d, d):
        return H.diagonal()
    raise ValueError(f"{name} must have shape ({d}, {d}) (a matrix) or ({d},) (its diagonal), got {tuple(H.shape)}")


# =========================================================================================== functional core
def obd_saliency(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Damage saliency ``rho_q = 1/2 H_qq w_q^2`` of every weight (higher = keep).

    The loss increase of removing weight ``q`` alone under the quadratic model with a *diagonal* Hessian and a
    zero gradient (LeCun et al. {cite}`lecun1990optimal`; survey §3.5.1, §3.5.3 item 5). ``H`` is the ``(d, d)``
    Hessian or just its diagonal ``(d,)``. Negative curvature gives a negative saliency: the quadratic model
    then predicts that removing the weight *lowers* the loss, so it is removed first.

    Example::

        >>> obd_saliency(torch.tensor([0.1, -0.3]), torch.diag(torch.tensor([4.0, 1.0])))   # survey §3.5.4
        tensor([0.0200, 0.0450])
    """
    w = _check_vector(w)
    diag = _diagonal_of(H, w.numel(), "H")
    return 0.5 * diag.to(w.dtype) * w * w


def obs_saliency(w: torch.Tensor, H_inv: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Surgeon saliency ``rho_q = w_q^2 / (2 [H^-1]_qq)`` of every weight (higher = keep).

    The smallest loss increase reachable by removing weight ``q`` while letting all other weights move,
    survey eq. (3) (Hassibi and Stork {cite}`hassibi1993second`; survey §3.5.1). ``H_inv`` is the ``(d, d)``
    inverse Hessian or its diagonal. Entries with ``[H^-1]_qq == 0`` (coordinates already eliminated from the
    inverse, see :func:`obs_prune`) get ``+inf``: they are not candidates.

    Example::

        >>> obs_saliency(torch.tensor([0.1, -0.3]), torch.diag(torch.tensor([0.25, 1.0])))
        tensor([0.0200, 0.0450])
    """
    w = _check_vector(w)
    diag = _diagonal_of(H_inv, w.numel(), "H_inv").to(w.dtype)
    out = w * w / (2 * diag)
    return torch.where(diag == 0, torch.full_like(out, math.inf), out)


@dataclass
class OBSTrace:
    """What :func:`obs_prune` did: the removed indices in order, the saliency of each removal (the increase of
    the damped quadratic loss it caused), the absolute damping ``lambda`` and the smallest eigenvalue of the
    damped Hessian restricted to the surviving weights (``None`` when ``check=False``)."""

    order: torch.Tensor
    saliencies: torch.Tensor
    damping: float
    min_eigenvalue: Optional[float]


def greedy_obs_plain(w: torch.Tensor, H_inv: torch.Tensor, k: int, *, forced: Optional[torch.Tensor] = None):
    """Greedy OBS on one weight vector, the textbook loop: ``k`` removals, one rank-1 downdate each.

    Every step removes the surviving weight of least saliency (survey eq. 3), moves the others by the OBS update
    (survey eq. 4) and downdates the inverse to the survivors (Hassibi and Stork {cite}`hassibi1993second`;
    survey §3.5.1)::

        q = argmin_q  w_q^2 / [H^-1]_qq
        w <- w - w_q / [H^-1]_qq * H^-1 e_q                       (w_q becomes 0)
        H^-1 <- H^-1 - H^-1 e_q e_q^T H^-1 / [H^-1]_qq

    ``forced`` (boolean, default none) marks coordinates removed first, in index order (weights already at zero:
    their steps only condition the inverse). Returns ``(w, order, saliencies)``: the pruned vector, the removed
    indices in order and the saliency ``w_q^2 / (2 [H^-1]_qq)`` of each removal (0 for forced ones). The reference
    for ``_greedy_obs``, which performs the same sequence of removals on many rows at once (tests check they agree).
    """
    w, H_inv = w.clone(), H_inv.clone()
    d = w.numel()
    alive = torch.ones(d, dtype=torch.bool, device=w.device)
    forced_q = [] if forced is None else torch.nonzero(forced).reshape(-1).tolist()
    order, saliencies = [], []
    for t in range(k):
        if t < len(forced_q):
            q = forced_q[t]
        else:
            scores = torch.where(alive, w * w / H_inv.diagonal(), torch.full_like(w, math.inf))
            q = int(scores.argmin())
        col = H_inv[:, q].clone()
        order.append(q)
        saliencies.append(0.0 if t < len(forced_q) else float(w[q] ** 2 / (2 * col[q])))
        w -= w[q] / col[q] * col
        H_inv -= torch.outer(col, col) / col[q]
        alive[q] = False
        w[q] = 0.0
    return w * alive, torch.tensor(order, dtype=torch.long), torch.tensor(saliencies, dtype=torch.float64)


def _greedy_obs(W: torch.Tensor, Hinv0: torch.Tensor, counts: torch.Tensor, *, forced: Optional[torch.Tensor] = None,
                groups: Optional[torch.Tensor] = None, quota: Optional[torch.Tensor] = None, block: int = 64,
                record: bool = False, workspace: Optional[dict] = None):
    """Greedy OBS on ``R`` rows at once, all starting from the same inverse ``Hinv0`` (``d x d``): the fast
    version of :func:`greedy_obs_plain` (same removals and updates, tested equal).

    Row ``r`` removes ``counts[r]`` weights one at a time: first its ``forced`` coordinates (weights that are
    already zero: eliminating them only conditions the inverse on ``w_q = 0``), then always the weight of least
    saliency ``w_q^2 / (2 [H^-1]_qq)``, applying ``dw = -w_q / [H^-1]_qq H^-1 e_q`` and the downdate
    ``H^-1 <- H^-1 - H^-1 e_q e_q^T H^-1 / [H^-1]_qq``.

    The downdates are *lazy*: the vectors ``u_s = H_s^-1 e_q / sqrt([H_s^-1]_qq)`` of the last ``block`` steps are
    kept in ``U`` and folded into the stored inverses by one batched matrix product (``baddbmm``) every ``block``
    steps. Between two flushes the current row ``H^-1 e_q`` is the stored row minus ``U^T U e_q`` and the current
    diagonal is kept up to date by subtracting ``u_s^2``. In exact arithmetic this is the same sequence of rank-1
    updates; in practice it turns a memory-bound loop of rank-1 updates into compute-bound matrix products.

    With ``groups`` (``(d,)`` group ids) and ``quota`` (removals allowed per group), a coordinate is a candidate
    only while its group has quota left (one row only): this is how per-layer budgets work under one joint Hessian.

    Threads: the per-step vector operations run on one thread (they are small and memory-bound, and on a busy
    machine every parallel region waits for its slowest thread); the flushes use ``torch.get_num_threads()``,
    which is restored on return.

    ``workspace`` (a dict) keeps the ``(R, d, d)`` buffer of the inverses between calls, so that processing rows in
    chunks does not allocate (and page-fault) a fresh buffer every time.

    Returns ``(W, removed, order, losses)``; ``order[r, t]`` and ``losses[r, t]`` (when ``record``) give the index and
    saliency of the ``t``-th removal of row ``r`` (saliency 0 for forced steps, ``-1`` index past ``counts[r]``).
    """
    R, d = W.shape
    W = W.clone()
    dtype = W.dtype
    Hinv0 = Hinv0.to(dtype)
    Hinv = None                       # (R, d, d) once the first flush happens; until then all rows share Hinv0
    diag = Hinv0.diagonal().expand(R, d).clone()
    removed = torch.zeros(R, d, dtype=torch.bool, device=W.device)
    # penalty: +inf on removed coordinates (never chosen again), -inf on forced ones (chosen first), else 0
    penalty = torch.zeros(R, d, dtype=dtype, device=W.device)
    if forced is not None and bool(forced.any()):
        penalty.masked_fill_(forced, -math.inf)
    steps = int(counts.max()) if R else 0
    block = max(1, min(int(block), max(steps, 1)))
    ar = torch.arange(R, device=W.device)
    U = W.new_zeros(R, block, d)
    order = torch.full((R, steps), -1, dtype=torch.long, device=W.device) if record else None
    losses = W.new_zeros(R, steps) if record else None
    remaining = quota.clone() if quota is not None else None
    zero, inf = W.new_zeros(()), W.new_full((), math.inf)
    scores = torch.empty_like(W)
    j = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the per-step vector operations are small and memory-bound: one thread
    try:
        for t in range(steps):
            active = counts > t
            torch.mul(W, W, out=scores)
            scores.div_(diag).add_(penalty)
            if remaining is not None:
                scores.masked_fill_((remaining <= 0)[groups].unsqueeze(0), math.inf)
            q = scores.argmin(1)
            if Hinv is None:
                row = Hinv0.index_select(0, q)                                   # (R, d)
            else:
                row = Hinv.view(R * d, d).index_select(0, ar * d + q)
            if j:
                Uq = U[:, :j].gather(2, q.view(R, 1, 1).expand(R, j, 1)).transpose(1, 2)   # (R, 1, j)
                row = torch.baddbmm(row.unsqueeze(1), Uq, U[:, :j], alpha=-1.0).squeeze(1)
            dq = row.gather(1, q.unsqueeze(1)).squeeze(1)
            if bool(((dq <= 0) & active).any()):
                raise ValueError(
                    "the inverse Hessian lost positive definiteness during the OBS downdates (round-off in "
                    f"{dtype}): increase damp, or compute in torch.float64"
                )
            dq = torch.where(active, dq, torch.ones_like(dq))
            wq = W.gather(1, q.unsqueeze(1)).squeeze(1)
            coef = torch.where(active, wq / dq, zero)
            if record:
                order[:, t] = torch.where(active, q, torch.full_like(q, -1))
                losses[:, t] = torch.where(active, wq * wq / (2 * dq), zero)
            W.addcmul_(coef.unsqueeze(1), row, value=-1.0)
            torch.mul(row, torch.where(active, dq.rsqrt(), zero).unsqueeze(1), out=U[:, j])
            diag.addcmul_(U[:, j], U[:, j], value=-1.0)
            removed[ar, q] |= active
            penalty[ar, q] = torch.where(active, inf, penalty[ar, q])
            diag[ar, q] = torch.where(active, inf, diag[ar, q])        # score 0 + inf, never 0 / 0
            W[ar, q] = torch.where(active, zero, W[ar, q])
            if remaining is not None and bool(active[0]):
                remaining[groups[q[0]]] -= 1
            j += 1
            if j == block and t + 1 < steps:
                torch.set_num_threads(threads)       # the flush is a batched matrix product: all threads
                if Hinv is None:
                    buffer = workspace.get("Hinv") if workspace is not None else None
                    if buffer is None or buffer.shape[0] < R or buffer.shape[1:] != (d, d) or buffer.dtype != dtype:
                        buffer = torch.empty(R, d, d, dtype=dtype, device=W.device)
                        if workspace is not None:
                            workspace["Hinv"] = buffer
                    Hinv = buffer[:R]
                    Hinv.copy_(Hinv0)
                Hinv.baddbmm_(U.transpose(1, 2), U, alpha=-1.0)
                diag = Hinv.diagonal(dim1=1, dim2=2).clone().masked_fill_(removed, math.inf)
                U.zero_()
                j = 0
                torch.set_num_threads(1)
    finally:
        torch.set_num_threads(threads)
    W.masked_fill_(removed, 0.0)   # exact zeros where round-off of later updates touched removed weights
    return W, removed, order, losses


def obs_prune(w: torch.Tensor, H: torch.Tensor, k: int, damp: float = 0.0, *, alive: Optional[torch.Tensor] = None,
              check: bool = True, return_trace: bool = False, block: int = 64):
    """Optimal Brain Surgeon: remove ``k`` more weights of ``w`` greedily, one at a time, updating the others.

    Each step removes the surviving weight of least saliency ``rho_q = w_q^2 / (2 [H^-1]_qq)`` (survey eq. 3),
    moves the surviving weights by the OBS update (survey eq. 4)::

        dw = - w_q / [H^-1]_qq * H^-1 e_q

    and updates the inverse without re-inverting (the inverse of ``H`` restricted to the survivors)::

        H^-1 <- H^-1 - H^-1 e_q e_q^T H^-1 / [H^-1]_qq

    (Hassibi and Stork {cite}`hassibi1993second`; survey §3.5.1 and §3.5.3 item 3: re-deriving the step after every
    single removal is what makes greedy OBS exact for a quadratic loss). On ``L(w) = 1/2 (w - w*)^T H (w - w*)``
    with ``w = w*``, the result is the constrained minimizer of ``L`` with the removed weights fixed at zero, and
    the loss increase is the sum of the saliencies along the way.

    Arguments:
        w: flat weight vector (length ``d``). Entries that are already zero (or ``False`` in ``alive``) stay zero
            and are not counted in ``k``: they are eliminated from the inverse first (no weight moves then).
        H: ``(d, d)`` symmetric Hessian (only its surviving block is used).
        k: number of additional weights to remove, ``0 <= k <=`` number of survivors.
        damp: relative damping, ``H + damp * mean|diag H| * I`` (0 = exact OBS of the given ``H``).
        alive: optional boolean vector of the weights that may be kept (default ``w != 0``).
        check: verify that the damped Hessian is positive definite (smallest eigenvalue, float64) and raise
            ``ValueError`` otherwise.
        return_trace: also return an :class:`OBSTrace` (order of removal, saliencies, damping, eigenvalue).
        block: number of downdates accumulated before they are folded into the inverse (a speed knob only).

    Returns the new ``w`` (same dtype, exactly ``k`` more zeros), or ``(w, trace)`` with ``return_trace=True``.
    The computation runs in float64.

    Examples: with the diagonal Hessian of the survey's §3.5.4 function ``2 x1^2 + 0.5 x2^2`` at ``(0.1, -0.3)``,
    the saliencies are 0.02 and 0.045, so ``x1`` goes and nothing else moves; with a correlated Hessian the
    survivor moves to compensate::

        >>> obs_prune(torch.tensor([0.1, -0.3]), torch.diag(torch.tensor([4.0, 1.0])), 1)
        tensor([ 0.0000, -0.3000])
        >>> obs_prune(torch.tensor([1.0, 1.0]), torch.tensor([[2.0, 1.0], [1.0, 1.0]]), 1)
        tensor([1.5000, 0.0000])
    """
    w = _check_vector(w)
    d = w.numel()
    H = _check_square(H, d)
    if alive is None:
        alive = w != 0
    elif not isinstance(alive, torch.Tensor) or alive.dtype != torch.bool or tuple(alive.shape) != (d,):
        raise ValueError(f"alive must be a boolean tensor of shape ({d},)")
    n_alive = int(alive.sum())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_alive:
        raise ValueError(f"k must be an integer in [0, {n_alive}] (the number of surviving weights), got {k!r}")
    damp = _check_damp(damp)
    idx = torch.nonzero(alive).reshape(-1)
    w_new = torch.where(alive, w, torch.zeros_like(w))
    trace = OBSTrace(order=torch.zeros(0, dtype=torch.long), saliencies=torch.zeros(0, dtype=torch.float64),
                     damping=0.0, min_eigenvalue=None)
    if k > 0:
        HA = H.detach().to(torch.float64)[idx][:, idx]
        HA = (HA + HA.T) / 2
        lam = damping(HA, damp)
        HA = HA + lam * torch.eye(len(idx), dtype=torch.float64, device=HA.device)
        advice = ("Increase damp (now {:g}, i.e. lambda = {:.3g}).".format(damp, lam))
        lo = check_positive_definite(HA, what="the damped Hessian H + lambda I", advice=advice)[0] if check else None
        Hinv = _inverse_pd(HA, "the damped Hessian H + lambda I", advice)
        wa = w_new.detach().to(torch.float64)[idx].unsqueeze(0)
        wa, _, order, losses = _greedy_obs(wa, Hinv, torch.tensor([k], device=wa.device), block=block, record=True)
        w_new = w_new.detach().clone()
        w_new[idx] = wa[0].to(w.dtype)
        trace = OBSTrace(order=idx[order[0]], saliencies=losses[0], damping=lam, min_eigenvalue=lo)
    return (w_new, trace) if return_trace else w_new


def constrained_minimizer(w_star: torch.Tensor, H: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Closed form of ``argmin_w 1/2 (w - w*)^T H (w - w*)`` subject to ``w_Q = 0`` for the ``removed`` set ``Q``::

        w_F = w*_F + H_FF^-1 H_FQ w*_Q,   w_Q = 0     (F = the kept coordinates)

    the point greedy OBS reaches on a quadratic (Hassibi and Stork {cite}`hassibi1993second`; survey §3.5.1).
    ``removed`` is a boolean vector."""
    w_star = _check_vector(w_star, "w_star")
    d = w_star.numel()
    H = _check_square(H, d)
    keep = ~removed
    Hd, wd = H.to(torch.float64), w_star.to(torch.float64)
    out = torch.zeros_like(wd)
    if keep.any():
        out[keep] = wd[keep] + torch.linalg.solve(Hd[keep][:, keep], Hd[keep][:, removed] @ wd[removed])
    return out.to(w_star.dtype)


# ============================================================================================ OBD (a score)
def obd(model, *, data=None, loss_fn=None, chunk_size: int = 64, max_params: int = OBD_MAX_PARAMS):
    """OBD score ``1/2 H_qq w_q^2`` with the exact diagonal of the loss Hessian (:func:`hessian_diagonal`),
    higher = keep (LeCun et al. {cite}`lecun1990optimal`; survey §3.5.1). No weight update: it is a plain score,
    so every scope and structure of :func:`sparsity_lib.prune` applies.

    Cost: one Hessian-vector product per weight, ``d`` of them, each about a double backward pass over all the
    calibration data. Above ``max_params`` prunable weights (default 20,000) this raises ``ValueError`` before
    pruning anything, quoting the time it would take, extrapolated from a few timed products (about 9-16 hours
    for a 784-300-100-10 MLP on 1,000 samples, one CPU thread); raise ``max_params`` to run it anyway."""
    params = prunable(model)
    d = sum(w.numel() for w in params.values())
    max_params = check_positive_int(max_params, "max_params")
    if d > max_params:
        raise ValueError(_obd_too_large(model, data, loss_fn, d, chunk_size, max_params))
    diag = hessian_diagonal(model, data, loss_fn, chunk_size=chunk_size)
    scores = {name: 0.5 * diag[name].detach() * w.detach() ** 2 for name, w in params.items()}
    for name, score in scores.items():
        check_finite(score, f"obd: the scores of {name}", "The weights, the data or the loss produced NaN or inf "
                     "curvature: nothing was pruned.")
    return scores


def _obd_too_large(model, data, loss_fn, d: int, chunk_size: int, max_params: int) -> str:
    """The refusal message of "obd" above ``max_params``: the number of products and their measured cost."""
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    items = _items(model, data)
    n = sum(batch_size(y) for _, y in items)
    probe = min(8, chunk_size, d)             # a few products, timed after one untimed warm-up product
    with eval_mode(model):
        fun = _Functional(model, _default_loss(loss_fn))
        _hvp_rows(fun, items, _unit_rows(0, 1, d, fun.w0), 1)
        start = time.perf_counter()
        _hvp_rows(fun, items, _unit_rows(0, probe, d, fun.w0), probe)
        seconds = (time.perf_counter() - start) * d / probe
    return (f"method 'obd' computes the exact Hessian diagonal with one Hessian-vector product per weight: this "
            f"model has d = {d:,} prunable weights (max_params = {max_params:,}), so {d:,} products over "
            f"{n:,} calibration samples, about {seconds / 60:.1f} minutes on this machine (timed on {probe} of them). "
            f"Pass max_params={d} to run it anyway, use fewer calibration samples, or a cheaper criterion: "
            "'magnitude', 'taylor', 'snip', or the layer-wise 'obc' / 'sparsegpt'.")


# ================================================================================ budgets for the pruners
def _check_unstructured(plan, method: str):
    if plan.structure is not None:
        raise ValueError(f"method {method!r} prunes single weights only: structure must be None (unstructured), "
                         f"got {plan.structure!r}")


def _removal_quota(plan, names: Sequence[str], numels: Sequence[int]) -> Dict[str, int]:
    """How many *more* weights each layer may lose. Global scope: one shared count (key ``None``)."""
    dead = {n: int((~plan.current[n]).sum()) for n in names}
    if plan.budget is None:
        total = sum(numels)
        to_remove = round(plan.sparsity * total) - sum(dead.values())
        available = sum(int(plan.current[n].sum()) for n in names if n not in plan.exclude)
        if to_remove > available:
            raise ValueError(f"sparsity={plan.sparsity} cannot be reached: with the layers in exclude kept as they "
                             f"are, at most {(sum(dead.values()) + available) / total:.4f} can be removed")
        return {None: max(0, to_remove)}
    return {n: max(0, round(plan.budget[n] * numel) - dead[n]) if n in plan.budget else 0
            for n, numel in zip(names, numels)}


def _split_by_layer(alive: torch.Tensor, w: torch.Tensor, params):
    """Cut flat vectors over all prunable weights (in ``sl.prunable`` order) back into per-layer masks and weights."""
    return unflatten(alive, params), unflatten(w, params)



def obs_memory_bytes(d: int) -> int:
    """Peak memory of the model-level "obs" on ``d`` prunable weights, in bytes: ``34 d^2``.

    The peak is the float64 eigendecomposition: the symmetrized Hessian (``8 d^2``), the eigenvectors (``8 d^2``)
    and LAPACK's ``syevd`` workspace (``2d^2 + 6d + 1`` doubles) at once; building ``H`` and the greedy downdates
    stay below it. Measured peak RSS (Linux, glibc): ``32.8-33.4 d^2`` for ``d`` = 2,700-4,200, up to ``43 d^2``
    below ``d ~ 2,000`` (heap fragmentation, under 150 MB); before the split ``37-38 d^2``, when the refusal
    quoted ``8 d^2``. A Hessian passed by the caller comes on top."""
    return 34 * int(d) ** 2


def _available_memory() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), else ``None`` (not checked)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def obs_pruner(model, plan, *, data=None, loss_fn=None, damp: float = DEFAULT_DAMP,
               negative_curvature: Optional[str] = None, max_params: int = OBS_MAX_PARAMS, chunk_size: int = 64,
               block: int = 64, hessian: Optional[torch.Tensor] = None, weight_decay: float = 0.0):
    """Exact OBS on the loss Hessian of all prunable weights together (Hassibi and Stork {cite}`hassibi1993second`;
    survey §3.5.1).

    ``H`` is the exact ``d x d`` Hessian of the data loss (:func:`loss_hessian`), restricted to the surviving
    weights. Weights are removed greedily, one at a time, each removal moving all surviving weights of *all*
    layers by the OBS update and downdating the inverse (the algorithm of :func:`obs_prune`).

    Curvature. A trained network is never exactly at a minimum, and its Hessian is indefinite (on a digits MLP the
    smallest eigenvalue was about -0.4 times the mean diagonal) as well as nearly singular (softmax shift
    invariance, dead ReLUs, inputs that are always zero). The quadratic model then has no minimum and exact OBS
    cannot be trusted. ``negative_curvature`` says what to do, after the eigendecomposition ``H = V diag(l) V^T``:

    * ``"abs"`` (what the default ``None`` does, with a ``UserWarning`` when ``H`` has negative eigenvalues): use
      ``V diag(|l|) V^T`` (:func:`positive_curvature`); equal to ``H`` when ``H`` is positive semi-definite;
    * ``"clip"``: use ``V diag(max(l, 0)) V^T``, leaving those directions to the damping alone;
    * ``"raise"``: use ``H`` itself and raise ``ValueError`` unless ``H + lambda I`` is positive definite.

    On the digits MLP, "abs" lost far less than "clip" at 80-90% sparsity (and than the damping that would make
    the raw ``H`` positive definite, ``damp ~ 0.4``); "clip" with little damping shows what too little damping does:
    OBS updates along near-null directions are huge and leave the region where the quadratic model holds.

    Damping: ``H + lambda I`` with ``lambda = damp * mean|H_ii|`` (default 0.01, as in the OBC/SparseGPT code).
    The inverse comes from the same eigendecomposition, ``V diag(1 / (l' + lambda)) V^T``.

    Scope: ``"global"`` removes the weight of least saliency among all layers at every step; ``"layerwise"`` or a
    budget lets a weight be chosen only while its layer has removals left (the updates still act on every layer).
    Layers in ``exclude`` lose no weights but their surviving weights do take updates. Unstructured only.

    The Hessian has ``d^2`` entries: for ``d > max_params`` this raises ``ValueError`` before computing anything,
    pointing to "woodfisher" (block-diagonal Fisher), "obc" and "sparsegpt" (layer-wise).

    ``hessian``: a precomputed ``d x d`` Hessian (e.g. from :func:`loss_hessian`, in ``sl.prunable`` order) to use
    instead of computing it from ``data``, so a sweep over sparsities pays for it once. ``weight_decay``: the
    coefficient ``mu`` of an L2 term ``mu/2 * ||w||^2`` that belongs to the training objective (``loss_fn`` sees
    only outputs and targets); its Hessian ``mu I`` is added to ``H``, which can make a trained network's Hessian
    positive definite at its minimum (Chapter 06).
    """
    _check_unstructured(plan, "obs")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    damp = _check_damp(damp)
    warn = negative_curvature is None
    mode = "abs" if negative_curvature is None else negative_curvature
    if mode not in NEGATIVE_CURVATURE:
        raise ValueError(f"negative_curvature must be one of {NEGATIVE_CURVATURE} (or None for 'abs' with a "
                         f"warning), got {negative_curvature!r}")
    params = prunable(model)
    names, numels = list(params), [w.numel() for w in params.values()]
    d = sum(numels)
    given = 0 if hessian is None else hessian.numel() * hessian.element_size()
    need = obs_memory_bytes(d) + given
    available = _available_memory()
    if d > max_params or (available is not None and need > available):
        why = (f"max_params = {max_params}" if d > max_params else
               f"only {available / 2**30:.2f} GiB of memory is available")
        raise ValueError(
            f"method 'obs' needs the exact d x d loss Hessian and its float64 eigendecomposition, and this model has "
            f"d = {d:,} prunable weights: about {need / 2**30:.2f} GiB at the peak ({why}). Use "
            "method='woodfisher' (block-diagonal empirical Fisher), 'obc' (exact layer-wise OBS) or 'sparsegpt' "
            "(fast layer-wise solver), or raise max_params."
        )
    quota = _removal_quota(plan, names, numels)
    if sum(quota.values()) == 0:
        return {n: plan.current[n].clone() for n in names}, None
    with torch.no_grad():
        flat_w = flatten({n: _original(m, n).detach() for n, m in _prunable_modules(model).items()})
    check_finite(flat_w, "obs: the prunable weights")
    if hessian is not None:
        H = _check_square(hessian, d, "hessian").detach()
    else:
        H = loss_hessian(model, data, loss_fn, max_params=max_params, chunk_size=chunk_size)
        check_finite(H, "obs: the loss Hessian", "The data, the loss or the weights produced NaN or inf curvature: "
                     "nothing was pruned.")
    if weight_decay:
        H = H + float(weight_decay) * torch.eye(d, dtype=H.dtype)
    alive = flatten(plan.current, names)
    layer_id = torch.cat([torch.full((numel,), i, dtype=torch.long) for i, numel in enumerate(numels)])
    idx = torch.nonzero(alive).reshape(-1)
    if plan.budget is None:
        group_quota = torch.tensor([quota[None], 0])
        groups = torch.tensor([1 if n in plan.exclude else 0 for n in names])[layer_id]
    else:
        group_quota = torch.tensor([quota[n] for n in names])
        groups = layer_id
    # memory (units of d^2 bytes, see obs_memory_bytes): every big temporary is freed as soon as it is used
    eps = torch.finfo(H.dtype).eps
    HA = H.detach()[idx][:, idx].to(torch.float64)
    del H
    HA = HA + HA.T
    HA.mul_(0.5)
    mean_abs_diag = damping(HA, 1.0)
    values, vectors = torch.linalg.eigh(HA)          # the peak: HA, eigenvectors and LAPACK's workspace
    del HA
    smallest = float(values[0])
    negative = int((values < -100 * eps * float(values.abs().max())).sum())
    if mode != "raise":
        values = values.abs() if mode == "abs" else values.clamp(min=0)
    lam = damp * _mean_abs_or_one((vectors * vectors) @ values)     # relative to diag of the curvature used
    if mode == "raise":
        _check_pd_eigenvalues(values + lam, what="the damped loss Hessian H + lambda I",
                              advice=f"Increase damp (now {damp:g}, lambda = {lam:.3g}), pass "
                                     "negative_curvature='abs' or 'clip', or use method='woodfisher' (the "
                                     "empirical Fisher is positive semi-definite by construction).")
    else:
        if warn and negative:
            warnings.warn(
                f"the loss Hessian is indefinite ({negative} negative eigenvalues, the smallest {smallest:.3g} = "
                f"{smallest / mean_abs_diag:.3g} x mean|H_ii|): exact OBS cannot be trusted, so 'obs' uses |H| "
                "(negative_curvature='abs'). Pass negative_curvature='abs', 'clip' or 'raise' to choose (and "
                "silence this warning).", UserWarning, stacklevel=3)
    shifted = values + lam
    tol = len(idx) * torch.finfo(torch.float64).eps * float(shifted.abs().max())
    if not float(shifted.min()) > tol:
        raise ValueError(f"the damped curvature is singular (smallest eigenvalue {float(shifted.min()):.3g}): "
                         f"increase damp (now {damp:g})")
    Hinv = (vectors / shifted) @ vectors.T
    del vectors
    count = int(group_quota.sum())
    wa = flat_w.to(torch.float64)[idx].unsqueeze(0)
    wa, removed, _, _ = _greedy_obs(wa, Hinv, torch.tensor([count]), groups=groups[idx], quota=group_quota,
                                    block=block)
    new_w = torch.zeros(d, dtype=torch.float64)
    new_w[idx] = wa[0]
    new_alive = alive.clone()
    new_alive[idx] = ~removed[0]
    return _split_by_layer(new_alive, new_w, params)


# ============================================================================================ WoodFisher
def woodfisher_pruner(model, plan, *, data=None, loss_fn=None, damp: float = DEFAULT_DAMP, block_size: int = 128,
                      chunk_size: int = 16):
    """WoodFisher (Singh and Alistarh {cite}`singh2020woodfisher`; survey §3.5.5): OBS with the empirical Fisher
    ``F = 1/N sum_j g_j g_j^T`` of per-sample gradients (:func:`per_sample_gradients`) in place of the Hessian.

    * Block-diagonal: each layer's flattened weights are cut into blocks of ``block_size`` consecutive weights;
      ``F`` is kept only within blocks (``d * block_size`` numbers instead of ``d^2``).
    * The inverse of each damped block ``lambda I + F_b`` is built from the gradients by Woodbury/Sherman-Morrison
      updates (:func:`woodbury_fisher_inverse`, survey eq. 5), never by inverting a matrix of the block's size.
      ``lambda = damp * mean_q F_qq`` (mean squared gradient, over surviving weights).
    * Removal: greedy, one weight at a time: at every step the weight of least saliency ``w_q^2 / (2 [F^-1]_qq)``
      *across all blocks* (or, under a layer budget, across the blocks of layers with removals left) is removed,
      and only its block takes the OBS update and the inverse downdate. Since blocks do not interact, this is the
      exact greedy OBS of the block-diagonal model; it is finer than WoodFisher's own "one-shot with k removals"
      (select all k by the initial saliencies, one joint update), at the cost of one step per removed weight.

    The Fisher is positive semi-definite by construction, so ``lambda > 0`` makes every block positive definite.
    Default damping ``damp = 0.01`` (relative, as for the other methods): with ``N`` samples a block has rank at
    most ``N``, and in the directions the gradients never saw the curvature is ``lambda`` alone, which is then all
    that limits how far the OBS update moves the weights. Unstructured only. Per-sample gradients of all ``N``
    samples are held in memory (``N x d``).
    """
    _check_unstructured(plan, "woodfisher")
    damp = _check_damp(damp)
    if damp <= 0:
        raise ValueError("damp must be > 0 for 'woodfisher': the Fisher of N samples has rank <= N")
    block_size = check_positive_int(block_size, "block_size")
    params = prunable(model)
    names, numels = list(params), [w.numel() for w in params.values()]
    quota = _removal_quota(plan, names, numels)
    if sum(quota.values()) == 0:
        return {n: plan.current[n].clone() for n in names}, None
    with torch.no_grad():
        flat_w = flatten({n: _original(m, n).detach() for n, m in _prunable_modules(model).items()})
    check_finite(flat_w, "woodfisher: the prunable weights")
    G = per_sample_gradients(model, data, loss_fn).to(torch.float64)
    check_finite(G, "woodfisher: the per-sample gradients", "The data, the loss or the weights produced NaN or inf "
                 "gradients: nothing was pruned.")
    N = G.shape[0]
    alive = flatten(plan.current, names)
    G = G * alive                                           # condition on the pruned weights staying at zero
    fisher_diag = (G * G).mean(0)
    lam = damping(fisher_diag[alive], damp)
    # cut every layer into blocks of block_size, padding the last one with dead coordinates
    blocks_index, block_layer = [], []
    offset = 0
    for i, numel in enumerate(numels):
        for start in range(0, numel, block_size):
            ids = torch.full((block_size,), -1, dtype=torch.long)
            stop = min(numel, start + block_size)
            ids[:stop - start] = torch.arange(offset + start, offset + stop)
            blocks_index.append(ids)
            block_layer.append(i)
        offset += numel
    index = torch.stack(blocks_index)                       # (B, b), -1 = padding
    valid = index >= 0
    safe = index.clamp(min=0)
    block_alive = valid & alive[safe]
    Wb = torch.where(block_alive, flat_w.to(torch.float64)[safe], torch.zeros((), dtype=torch.float64))
    Gb = torch.where(block_alive.unsqueeze(1), G[:, safe].permute(1, 0, 2), torch.zeros((), dtype=torch.float64))
    Finv = woodbury_fisher_inverse(Gb, lam, chunk_size=chunk_size)   # (B, b, b)
    block_layer = torch.tensor(block_layer)
    if plan.budget is None:
        group_of_block = torch.tensor([1 if names[i] in plan.exclude else 0 for i in block_layer.tolist()])
        remaining = [quota[None], 0]
    else:
        group_of_block = block_layer
        remaining = [quota[n] for n in names]
    blocked = torch.tensor([remaining[g] <= 0 for g in group_of_block.tolist()])

    def block_minimum(b):
        diag = Finv[b].diagonal()
        sal = Wb[b] ** 2 / (2 * diag)
        sal = sal.masked_fill(~block_alive[b], math.inf)
        value, arg = sal.min(0)
        return (math.inf if bool(blocked[b]) else float(value)), int(arg)

    best = torch.empty(len(index), dtype=torch.float64)
    best_arg = torch.empty(len(index), dtype=torch.long)
    for b in range(len(index)):
        best[b], best_arg[b] = block_minimum(b)
    for _ in range(sum(remaining)):
        b = int(best.argmin())
        q = int(best_arg[b])
        col = Finv[b, :, q].clone()
        dq = col[q]
        Wb[b] -= Wb[b, q] / dq * col
        Wb[b, q] = 0.0
        Finv[b] -= torch.outer(col, col) / dq
        block_alive[b, q] = False
        Wb[b] = Wb[b] * block_alive[b]
        g = int(group_of_block[b])
        remaining[g] -= 1
        if remaining[g] <= 0:
            blocked |= group_of_block == g
            best[blocked] = math.inf
        best[b], best_arg[b] = block_minimum(b)
    new_w = torch.zeros(sum(numels), dtype=torch.float64)
    new_alive = torch.zeros(sum(numels), dtype=torch.bool)
    new_w[index[valid]] = Wb[valid]
    new_alive[index[valid]] = block_alive[valid]
    return _split_by_layer(new_alive, new_w, params)


