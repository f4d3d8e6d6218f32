"""Second-order pruning: OBD, OBS, WoodFisher, layer-wise OBS (OBC) and SparseGPT (survey §3.5).

All these methods start from the same quadratic model of the loss around trained weights ``w`` (survey §3.5.1)::

    dL(dw) ~ g^T dw + 1/2 dw^T H dw,      g ~ 0 at a minimum,

and ask which weight ``q`` to remove (``dw_q = -w_q``) so that the loss grows least. They differ in *which*
``H`` they use and *how* they get at its inverse:

============  =====================================================  ==========================================
method        curvature ``H``                                         removal
============  =====================================================  ==========================================
``"obd"``     diagonal of the exact loss Hessian                      score ``1/2 H_qq w_q^2``, no weight update
``"obs"``     exact loss Hessian over all prunable weights, damped    greedy, OBS update, exact inverse downdates
``"woodfisher"``  empirical Fisher ``1/N sum g g^T``, block-diagonal  greedy across blocks, OBS update per block
``"obc"``     per layer ``H = 2 X X^T`` of the layer's inputs          exact greedy OBS per output row
``"sparsegpt"``   per layer ``H = 2 X X^T``                            column-wise, Cholesky of ``H^-1``, lazy
============  =====================================================  ==========================================

The functional core works on a flat weight vector ``w`` (length ``d``) and a ``d x d`` matrix ``H``:
:func:`obd_saliency`, :func:`obs_saliency`, :func:`obs_prune`. The model-level methods are registered with
:func:`sparsity_lib.prune` (``sl.prune(model, 0.5, method="obs", data=..., loss_fn=...)``); the layer-level
solvers :func:`obc_layer` and :func:`sparsegpt_layer` take a weight matrix and its layer Hessian directly.

Damping. Hessians of real networks are singular or indefinite (the softmax is invariant to adding a constant to
all logits, dead ReLUs and always-zero inputs have zero curvature, and a network is never exactly at a minimum),
so every method works with ``H + lambda I`` where ``lambda = damp * mean |H_ii|`` is relative to the Hessian's own
scale, as in the reference implementations of OBC and SparseGPT ("percdamp", default 0.01)
{cite}`frantar2022optimal` {cite}`frantar2023sparsegpt`. :func:`obs_prune` checks the smallest eigenvalue of the
damped matrix and refuses to run (``ValueError``) when it is not positive definite, because then the quadratic
model has no minimum and the OBS update points to a saddle. The exact loss Hessian of a trained network is
usually indefinite; the model-level ``"obs"`` then says so and, unless told otherwise, uses ``|H|`` (see
:func:`obs_pruner`). The layer-wise ``2 X X^T`` and the Fisher are positive semi-definite by construction.

Defined for Chapter 06 (survey §3.5, Hoefler et al. {cite}`hoefler2021sparsity`).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .masks import _original, _prunable_modules, prunable
from .scores import register, register_pruner
from .select import check_structure, is_n_m

#: Default relative damping of every method here: lambda = 0.01 * mean |diag H|, the ``percdamp`` of the OBC and
#: SparseGPT reference code. On a trained digits MLP it was close to the best of 1e-4 ... 1 for "obs" (on |H|)
#: and "woodfisher" at 50-90% sparsity.
DEFAULT_DAMP = 0.01
#: Exact OBS stores and inverts a d x d matrix: above this many prunable weights "obs" refuses to run.
OBS_MAX_PARAMS = 6000


# =========================================================================================== validation
def _check_vector(w, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (a flat weight vector), got {type(w).__name__}")
    if w.dim() != 1:
        raise ValueError(f"{name} must be a flat vector of length d, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    return w


def _check_square(H, d: int, name: str = "H") -> torch.Tensor:
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({d}, {d}), got {type(H).__name__}")
    if tuple(H.shape) != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}) to match w, got {tuple(H.shape)}")
    if torch.isnan(H).any() or torch.isinf(H).any():
        raise ValueError(f"{name} contains NaN or inf")
    return H


def _diagonal_of(H, d: int, name: str) -> torch.Tensor:
    """``diag(H)`` for a ``(d, d)`` matrix, or ``H`` itself when it is already given as its diagonal ``(d,)``."""
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({d}, {d}) or ({d},), got {type(H).__name__}")
    if tuple(H.shape) == (d,):
        return H
    if tuple(H.shape) == (d, d):
        return H.diagonal()
    raise ValueError(f"{name} must have shape ({d}, {d}) (a matrix) or ({d},) (its diagonal), got {tuple(H.shape)}")


def _check_damp(damp, name: str = "damp") -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or math.isnan(damp) or damp < 0:
        raise ValueError(f"{name} must be a number >= 0 (damping relative to mean |diag H|), got {damp!r}")
    return float(damp)


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
    eig = torch.linalg.eigvalsh((Hd + Hd.T) / 2)
    lo, hi = float(eig[0]), float(eig[-1])
    tol = H.shape[0] * torch.finfo(torch.float64).eps * max(abs(hi), torch.finfo(torch.float64).tiny)
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


@dataclass
class OBSTrace:
    """What :func:`obs_prune` did: the removed indices in order, the saliency of each removal (the increase of
    the damped quadratic loss it caused), the absolute damping ``lambda`` and the smallest eigenvalue of the
    damped Hessian restricted to the surviving weights (``None`` when ``check=False``)."""

    order: torch.Tensor
    saliencies: torch.Tensor
    damping: float
    min_eigenvalue: Optional[float]


def _greedy_obs(W: torch.Tensor, Hinv0: torch.Tensor, counts: torch.Tensor, *, forced: Optional[torch.Tensor] = None,
                groups: Optional[torch.Tensor] = None, quota: Optional[torch.Tensor] = None, block: int = 64,
                record: bool = False, workspace: Optional[dict] = None):
    """Greedy OBS on ``R`` rows at once, all starting from the same inverse ``Hinv0`` (``d x d``).

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


# ======================================================================================= model plumbing
def _batches(data) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Materialize ``data`` (an iterable of ``(inputs, targets)`` batches, or one ``(inputs, targets)`` pair)."""
    if data is None:
        raise ValueError("data must be an iterable of (inputs, targets) batches, got None")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [(data[0], data[1])]
    batches = []
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("data must yield (inputs, targets) pairs, got an item of type "
                             f"{type(batch).__name__}")
        batches.append((batch[0], batch[1]))
    if not batches:
        raise ValueError("data is empty: second-order methods need at least one (inputs, targets) batch")
    return batches


def _batch_size(targets) -> int:
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) and targets.dim() > 0 else 1


class _EvalMode:
    """Put the model in eval mode (deterministic: no dropout, batch-norm running statistics) and restore."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for m, t in self.modes.items():
            m.train(t)
        return False


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
            param = _original(module)
            if id(param) not in param_ids:
                raise ValueError(f"the weight of {name} is not a parameter of the model")
            self.keys.append(param_ids[id(param)])
            self.shapes.append(tuple(param.shape))
        self.sizes = [math.prod(s) for s in self.shapes]
        self.d = sum(self.sizes)
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if n not in set(self.keys)}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.w0 = torch.cat([_original(modules[n]).detach().reshape(-1) for n in self.names])

    def split(self, flat):
        params = dict(self.fixed)
        for key, chunk, shape in zip(self.keys, torch.split(flat, self.sizes), self.shapes):
            params[key] = chunk.reshape(shape)
        return params

    def loss(self, flat, inputs, targets):
        out = torch.func.functional_call(self.model, (self.split(flat), self.buffers), (inputs,))
        return self.loss_fn(out, targets)

    def sample_loss(self, flat, x, y):
        return self.loss(flat, x.unsqueeze(0), y.unsqueeze(0))


def _default_loss(loss_fn):
    return F.cross_entropy if loss_fn is None else loss_fn


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
    batches = _batches(data)
    with _EvalMode(model):
        fun = _Functional(model, loss_fn)
        if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.shape[-1] != fun.d:
            raise ValueError(f"vectors must be a tensor of shape (d,) or (m, d) with d = {fun.d} (the number of "
                             f"prunable weights), got {getattr(vectors, 'shape', type(vectors).__name__)}")
        V = vectors.reshape(-1, fun.d).to(fun.w0)
        total = sum(_batch_size(y) for _, y in batches)
        out = torch.zeros_like(V)
        for x, y in batches:
            _, hvp = torch.func.vjp(torch.func.grad(lambda flat: fun.loss(flat, x, y)), fun.w0)
            weight = _batch_size(y) / total
            for start in range(0, V.shape[0], chunk_size):
                out[start:start + chunk_size] += weight * torch.func.vmap(hvp)(V[start:start + chunk_size])[0]
    return out.reshape(vectors.shape)


def loss_hessian(model: nn.Module, data, loss_fn=None, *, max_params: int = OBS_MAX_PARAMS,
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
        raise ValueError(f"the model has d = {d} prunable weights; the exact Hessian (d x d) is limited to "
                         f"max_params = {max_params}")
    w0 = next(iter(prunable(model).values()))
    H = torch.empty(d, d, dtype=w0.dtype, device=w0.device)
    for start in range(0, d, chunk_size):
        stop = min(d, start + chunk_size)
        E = torch.zeros(stop - start, d, dtype=w0.dtype, device=w0.device)
        E[torch.arange(stop - start), torch.arange(start, stop)] = 1
        H[start:stop] = hessian_vector_product(model, data, loss_fn, vectors=E, chunk_size=chunk_size)
    return (H + H.T) / 2


def hessian_diagonal(model: nn.Module, data, loss_fn=None, *, chunk_size: int = 64) -> Dict[str, torch.Tensor]:
    """The exact diagonal ``H_qq`` of the loss Hessian for every prunable weight, ``{name: tensor}`` shaped like
    the weights: ``e_q^T H e_q`` from one Hessian-vector product per weight (vectorized, ``chunk_size`` at a time),
    without storing ``H``. Cost: ``d`` Hessian-vector products. Used by OBD {cite}`lecun1990optimal` (§3.5.1)."""
    params = prunable(model)
    d = sum(w.numel() for w in params.values())
    w0 = next(iter(params.values()))
    diag = torch.empty(d, dtype=w0.dtype, device=w0.device)
    for start in range(0, d, chunk_size):
        stop = min(d, start + chunk_size)
        E = torch.zeros(stop - start, d, dtype=w0.dtype, device=w0.device)
        rows = torch.arange(stop - start)
        E[rows, torch.arange(start, stop)] = 1
        HE = hessian_vector_product(model, data, loss_fn, vectors=E, chunk_size=chunk_size)
        diag[start:stop] = HE[rows, torch.arange(start, stop)]
    out, offset = {}, 0
    for name, w in params.items():
        out[name] = diag[offset:offset + w.numel()].reshape(w.shape)
        offset += w.numel()
    return out


def per_sample_gradients(model: nn.Module, data, loss_fn=None) -> torch.Tensor:
    """Gradients ``g_j = d loss(x_j, y_j) / dw`` of every single sample with respect to all prunable weights,
    as an ``(N, d)`` tensor (``sl.prunable`` order), by ``torch.func.vmap`` over ``torch.func.grad`` of the
    one-sample loss (model in eval mode). Entries of masked weights are zero. The ingredients of the empirical
    Fisher (Singh and Alistarh {cite}`singh2020woodfisher`; survey §3.5.5)."""
    loss_fn = _default_loss(loss_fn)
    batches = _batches(data)
    with _EvalMode(model):
        fun = _Functional(model, loss_fn)
        per_sample = torch.func.vmap(torch.func.grad(fun.sample_loss), in_dims=(None, 0, 0))
        return torch.cat([per_sample(fun.w0, x, y).detach() for x, y in batches])


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
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (the Fisher of N < d samples is singular without damping), got {lam}")
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


# ============================================================================================ OBD (a score)
@register("obd", needs_data=True, description="Optimal Brain Damage: 1/2 H_qq w_q^2, exact Hessian diagonal (§3.5.1)")
def obd(model, *, data=None, loss_fn=None, chunk_size: int = 64):
    """OBD score ``1/2 H_qq w_q^2`` with the exact diagonal of the loss Hessian (:func:`hessian_diagonal`),
    higher = keep (LeCun et al. {cite}`lecun1990optimal`; survey §3.5.1). No weight update: it is a plain score,
    so every scope and structure of :func:`sparsity_lib.prune` applies."""
    diag = hessian_diagonal(model, data, loss_fn, chunk_size=chunk_size)
    return {name: 0.5 * diag[name].detach() * w.detach() ** 2 for name, w in prunable(model).items()}


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


# ============================================================================================ exact OBS
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


def _split_by_layer(alive: torch.Tensor, w: torch.Tensor, names, params, numels):
    """Cut flat vectors over all prunable weights (in ``sl.prunable`` order) back into per-layer masks and weights."""
    masks, weights, offset = {}, {}, 0
    for name, p, numel in zip(names, params.values(), numels):
        masks[name] = alive[offset:offset + numel].reshape(p.shape)
        weights[name] = w[offset:offset + numel].reshape(p.shape).to(p.dtype)
        offset += numel
    return masks, weights


@register_pruner("obs", needs_data=True,
                 description="Optimal Brain Surgeon: exact damped loss Hessian, greedy removal with updates (§3.5.1)")
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
    if d > max_params:
        raise ValueError(
            f"method 'obs' needs the exact d x d loss Hessian, and this model has d = {d} prunable weights "
            f"(max_params = {max_params}, about {8 * d * d / 2**30:.2f} GiB in float64). Use method='woodfisher' "
            "(block-diagonal empirical Fisher), 'obc' (exact layer-wise OBS) or 'sparsegpt' (fast layer-wise "
            "solver), or raise max_params."
        )
    quota = _removal_quota(plan, names, numels)
    if sum(quota.values()) == 0:
        return {n: plan.current[n].clone() for n in names}, None
    if hessian is not None:
        H = _check_square(hessian, d, "hessian").detach()
    else:
        H = loss_hessian(model, data, loss_fn, max_params=max_params, chunk_size=chunk_size)
    if weight_decay:
        H = H + float(weight_decay) * torch.eye(d, dtype=H.dtype)
    with torch.no_grad():
        flat_w = torch.cat([_original(m).detach().reshape(-1) for m in _prunable_modules(model).values()])
    alive = torch.cat([plan.current[n].reshape(-1) for n in names])
    layer_id = torch.cat([torch.full((numel,), i, dtype=torch.long) for i, numel in enumerate(numels)])
    idx = torch.nonzero(alive).reshape(-1)
    if plan.budget is None:
        group_quota = torch.tensor([quota[None], 0])
        groups = torch.tensor([1 if n in plan.exclude else 0 for n in names])[layer_id]
    else:
        group_quota = torch.tensor([quota[n] for n in names])
        groups = layer_id
    HA = H.detach().to(torch.float64)[idx][:, idx]
    HA = (HA + HA.T) / 2
    values, vectors = torch.linalg.eigh(HA)
    negative = int((values < -100 * torch.finfo(H.dtype).eps * float(values.abs().max())).sum())
    if mode != "raise":
        values = values.abs() if mode == "abs" else values.clamp(min=0)
    lam = damp * _mean_abs_or_one((vectors * vectors) @ values)     # relative to diag of the curvature used
    if mode == "raise":
        check_positive_definite(HA + lam * torch.eye(len(idx), dtype=torch.float64),
                                what="the damped loss Hessian H + lambda I",
                                advice=f"Increase damp (now {damp:g}, lambda = {lam:.3g}), pass "
                                       "negative_curvature='abs' or 'clip', or use method='woodfisher' (the "
                                       "empirical Fisher is positive semi-definite by construction).")
    else:
        if warn and negative:
            smallest = float(torch.linalg.eigvalsh(HA)[0])
            warnings.warn(
                f"the loss Hessian is indefinite ({negative} negative eigenvalues, the smallest {smallest:.3g} = "
                f"{smallest / damping(HA, 1.0):.3g} x mean|H_ii|): exact OBS cannot be trusted, so 'obs' uses |H| "
                "(negative_curvature='abs'). Pass negative_curvature='abs', 'clip' or 'raise' to choose (and "
                "silence this warning).", UserWarning, stacklevel=3)
    shifted = values + lam
    tol = len(idx) * torch.finfo(torch.float64).eps * float(shifted.abs().max())
    if not float(shifted.min()) > tol:
        raise ValueError(f"the damped curvature is singular (smallest eigenvalue {float(shifted.min()):.3g}): "
                         f"increase damp (now {damp:g})")
    Hinv = (vectors / shifted) @ vectors.T
    count = int(group_quota.sum())
    wa = flat_w.to(torch.float64)[idx].unsqueeze(0)
    wa, removed, _, _ = _greedy_obs(wa, Hinv, torch.tensor([count]), groups=groups[idx], quota=group_quota,
                                    block=block)
    new_w = torch.zeros(d, dtype=torch.float64)
    new_w[idx] = wa[0]
    new_alive = alive.clone()
    new_alive[idx] = ~removed[0]
    return _split_by_layer(new_alive, new_w, names, params, numels)


# ============================================================================================ WoodFisher
@register_pruner("woodfisher", needs_data=True,
                 description="WoodFisher: block-diagonal empirical Fisher, Woodbury inverse, OBS per block (§3.5.5)")
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
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    params = prunable(model)
    names, numels = list(params), [w.numel() for w in params.values()]
    quota = _removal_quota(plan, names, numels)
    if sum(quota.values()) == 0:
        return {n: plan.current[n].clone() for n in names}, None
    G = per_sample_gradients(model, data, loss_fn).to(torch.float64)
    N = G.shape[0]
    alive = torch.cat([plan.current[n].reshape(-1) for n in names])
    G = G * alive                                           # condition on the pruned weights staying at zero
    fisher_diag = (G * G).mean(0)
    lam = damping(fisher_diag[alive], damp)
    with torch.no_grad():
        flat_w = torch.cat([_original(m).detach().reshape(-1) for m in _prunable_modules(model).values()])
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
    return _split_by_layer(new_alive, new_w, names, params, numels)


# ============================================================================ layer-wise: inputs and Hessians
def _conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input patches a convolution multiplies with its weight viewed as ``(out, in * prod(kernel))``."""
    if module.groups != 1:
        raise ValueError(f"layer-wise pruning supports convolutions with groups=1 only, got groups={module.groups}")
    if module.padding_mode != "zeros":
        raise ValueError(f"layer-wise pruning supports padding_mode='zeros' only, got {module.padding_mode!r}")
    if isinstance(module, nn.Conv1d):
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        padding = module.padding if isinstance(module.padding, str) else (0, *module.padding)
        x = x.unsqueeze(-2)
    else:
        kernel, stride, dilation, padding = module.kernel_size, module.stride, module.dilation, module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): symmetric only
            totals = [dil * (k - 1) for dil, k in zip(dilation, kernel)]
            if any(t % 2 for t in totals):
                raise ValueError("padding='same' with an even kernel pads asymmetrically: not supported here")
            padding = tuple(t // 2 for t in totals)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``x`` (one per output position) such that the layer computes ``W_2d x`` (bias aside)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv_patches(module, x)
    raise ValueError(f"layer-wise pruning supports nn.Linear, nn.Conv1d and nn.Conv2d, got {type(module).__name__}")


def layer_hessian(X: torch.Tensor) -> torch.Tensor:
    """``H = 2 X X^T`` of the layer-wise objective ``||W X - W_hat X||^2`` for calibration inputs ``X`` given as
    rows ``(N, d_in)`` (so ``H = 2 X_rows^T X_rows``): the Hessian of the squared reconstruction error of each
    output row with respect to that row's weights (L-OBS {cite}`dong2017learning`, OBC {cite}`frantar2022optimal`;
    survey §3.5.5)."""
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError("X must be a matrix of calibration inputs, one per row (N, d_in), got "
                         f"{getattr(X, 'shape', X)}")
    return 2 * X.T @ X


class _StopForward(Exception):
    pass


def layer_hessians(model: nn.Module, data, names: Optional[Sequence[str]] = None, *,
                   stop_early: bool = False) -> Dict[str, torch.Tensor]:
    """``{name: H = 2 sum_x x x^T}`` for the named prunable layers (default all), ``x`` running over every input row
    the layer sees on ``data`` (a Linear layer's input vectors; a convolution's unfolded input patches, weight
    viewed as ``(out, in * prod(kernel))``). Collected with forward pre-hooks, model in eval mode, nothing changed.

    ``stop_early`` aborts each forward pass once the last requested layer has been seen (the trick of the
    SparseGPT code {cite}`frantar2023sparsegpt`; valid when the model calls its layers in module order).
    Survey §3.5.5."""
    modules = _prunable_modules(model)
    names = list(modules) if names is None else list(names)
    for name in names:
        if name not in modules:
            raise ValueError(f"names: unknown layer name {name!r}; prunable weights are {list(modules)}")
    sums: Dict[str, torch.Tensor] = {}
    seen = set()

    def make_hook(name, module):
        def hook(mod, args):
            x = args[0].detach()
            rows = _layer_rows(module, x)
            H = 2 * rows.T @ rows
            sums[name] = H if name not in sums else sums[name] + H
            seen.add(name)
            if stop_early and seen >= set(names):
                raise _StopForward
        return hook

    for name in names:  # validate layer types before running anything
        module = modules[name]
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"layer-wise pruning supports nn.Linear, nn.Conv1d and nn.Conv2d; {name} is a "
                             f"{type(module).__name__}")
    handles = [modules[n].register_forward_pre_hook(make_hook(n, modules[n])) for n in names]
    try:
        with _EvalMode(model), torch.no_grad():
            for x, _ in _batches(data):
                seen.clear()
                try:
                    model(x)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"layers {missing} were never called in a forward pass over data")
    return sums


# ================================================================================= layer-wise solvers
def _as_matrix(W, name="W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point matrix (rows, d_in), got {getattr(W, 'shape', W)}")
    return W


def _layer_target(W: torch.Tensor, mask: torch.Tensor, sparsity: Optional[float], zeros: Optional[int]) -> int:
    if (sparsity is None) == (zeros is None):
        raise ValueError("give exactly one of sparsity (fraction of the layer) or zeros (number of weights)")
    if zeros is None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        zeros = round(float(sparsity) * W.numel())
    if isinstance(zeros, bool) or not isinstance(zeros, int) or not 0 <= zeros <= W.numel():
        raise ValueError(f"zeros must be an integer in [0, {W.numel()}], got {zeros!r}")
    return max(zeros, int((~mask).sum()))


def _uniform_rows(dead: torch.Tensor, total: int, d: int) -> torch.Tensor:
    """Zeros per row, summing to ``total``, as even as possible given that row ``r`` already has ``dead[r]``
    (water-filling: rows are topped up to a common level, the remainder going to the first rows at that level)."""
    dead = dead.long()
    level = 0
    for lv in range(d + 1):
        if int(torch.maximum(dead, torch.tensor(lv)).sum()) <= total:
            level = lv
        else:
            break
    target = torch.maximum(dead, torch.tensor(level))
    extra = total - int(target.sum())
    if extra > 0:
        at_level = torch.nonzero(target == level).reshape(-1)[:extra]
        target[at_level] += 1
    return target


def _row_chunk(d: int, dtype: torch.dtype, memory_mb: float) -> int:
    per_row = d * d * torch.finfo(dtype).bits // 8
    return max(1, int(memory_mb * 2**20 // per_row))


def obc_layer(W: torch.Tensor, H: torch.Tensor, sparsity: Optional[float] = None, *, zeros: Optional[int] = None,
              mask: Optional[torch.Tensor] = None, damp: float = DEFAULT_DAMP, row_allocation: str = "uniform",
              block: int = 64, memory_mb: float = 256, dtype: torch.dtype = torch.float32):
    """Optimal Brain Compression (exact layer-wise OBS) of one layer: returns ``(W_hat, mask)``.

    The layer-wise objective ``||W X - W_hat X||^2`` separates over output rows, each a quadratic with the same
    Hessian ``H = 2 X X^T`` (:func:`layer_hessian`). Each row is pruned by *exact greedy OBS*: remove the weight of
    least ``w_q^2 / [H^-1]_qq``, update the row by ``-w_q / [H^-1]_qq H^-1 e_q``, downdate the row's own
    inverse by ``H^-1 e_q e_q^T H^-1 / [H^-1]_qq`` (Frantar and Alistarh {cite}`frantar2022optimal`, ExactOBS;
    L-OBS {cite}`dong2017learning`; survey §3.5.5). All rows of a chunk are processed together: each step is one
    batched rank-1 downdate of ``(rows, d, d)`` inverses, applied lazily ``block`` steps at a time as one
    ``baddbmm`` (see :func:`_greedy_obs`). Rows are chunked so that their inverses take ``memory_mb``.

    Arguments:
        W: ``(rows, d)`` weights (a convolution viewed as ``(out, in * prod(kernel))``); ``H``: ``(d, d)``.
        sparsity / zeros: the layer's target, as a fraction or a count of zeros (existing zeros included).
        mask: current mask (``True`` = alive; default all alive). Masked weights stay zero; they are eliminated
            from each row's inverse first.
        damp: relative damping, ``H + damp * mean(diag H) I`` (default 0.01, OBC's and SparseGPT's percdamp).
        row_allocation: ``"uniform"``: every row reaches (nearly) the same number of zeros;
            ``"adaptive"``: as in the OBC paper, every row is first pruned to the end recording the loss of each
            removal, the layer's removals go to the smallest recorded losses over all rows, and the rows are pruned
            again to their counts (about 3x the work of "uniform", lower error).
        dtype: arithmetic precision (float32 is ample with the default damping; float64 for reference checks).
    """
    W = _as_matrix(W)
    rows, d = W.shape
    H = _check_square(H, d)
    mask = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if tuple(mask.shape) != tuple(W.shape):
        raise ValueError(f"mask must have shape {tuple(W.shape)}, got {tuple(mask.shape)}")
    if row_allocation not in ("uniform", "adaptive"):
        raise ValueError(f"row_allocation must be 'uniform' or 'adaptive', got {row_allocation!r}")
    total = _layer_target(W, mask, sparsity, zeros)
    damp = _check_damp(damp)
    Hd = H.detach().to(torch.float64)
    lam = damping(Hd, damp)
    Hd = Hd + lam * torch.eye(d, dtype=torch.float64, device=H.device)
    Hinv = _inverse_pd(Hd, "the damped layer Hessian 2 X X^T + lambda I",
                       f"Increase damp (now {damp:g}).").to(dtype)
    Wd = (W.detach() * mask).to(dtype)
    dead = ~mask
    chunk = _row_chunk(d, dtype, memory_mb)
    workspace: dict = {}

    def run(counts, record):
        outs, removed, losses = [], [], []
        for r0 in range(0, rows, chunk):
            rows_ = slice(r0, r0 + chunk)
            out, gone, _, loss = _greedy_obs(Wd[rows_], Hinv, counts[rows_], forced=dead[rows_], block=block,
                                             record=record, workspace=workspace)
            outs.append(out)
            removed.append(gone)
            losses.append(loss)
        return torch.cat(outs), torch.cat(removed), losses

    n_dead = dead.sum(1)
    if row_allocation == "uniform":
        counts = _uniform_rows(n_dead, total, d)
    else:
        # OBC's allocation: prune every row to the end, recording the loss of each removal; the layer's removals
        # go to the smallest recorded losses over all rows (forced eliminations of dead weights come first)
        full = n_dead + mask.sum(1)
        _, _, losses = run(full, True)
        steps = int(full.max())
        loss = torch.cat([F.pad(l_, (0, steps - l_.shape[1]), value=math.inf) for l_ in losses]).to(torch.float64)
        step = torch.arange(steps).unsqueeze(0)
        loss = loss.masked_fill((step < n_dead.unsqueeze(1)) | (step >= full.unsqueeze(1)), math.inf)
        chosen = torch.argsort(loss.reshape(-1), stable=True)[:total - int(n_dead.sum())]
        counts = n_dead + torch.bincount(chosen // steps, minlength=rows)
    W_hat, removed, _ = run(counts, False)
    return W_hat.to(W.dtype), mask & ~removed


def sparsegpt_layer(W: torch.Tensor, H: torch.Tensor, sparsity: Optional[float] = None, *,
                    zeros: Optional[int] = None, structure=None, mask: Optional[torch.Tensor] = None,
                    damp: float = DEFAULT_DAMP, blocksize: int = 128):
    """SparseGPT on one layer: returns ``(W_hat, mask)`` (Frantar and Alistarh {cite}`frantar2023sparsegpt`,
    Algorithm 1; survey §3.5.5).

    Columns (inputs) are processed left to right; pruning column ``j`` sets its selected weights to zero and spreads
    the error over the columns not yet processed with the OBS update restricted to them,
    ``W[:, j:] -= (w_j - q_j) / U_jj * U_j,j:``, where ``U`` is the upper Cholesky factor of ``(H + lambda I)^-1``:
    its row ``j`` is ``H_F^-1 e_j / sqrt([H_F^-1]_jj)`` for the inverse Hessian ``H_F^-1`` of the columns ``F`` still
    to come, so one Cholesky factorization replaces all the inverse updates of exact OBS, shared by all rows.
    Updates are lazy: within a block of ``blocksize`` columns they are applied column by column, to the rest of the
    matrix once per block (one matrix product). The mask is chosen per block, adaptively: the weights with the
    lowest ``w^2 / U_jj^2`` over the whole block (all rows) are pruned when the block starts.

    Arguments:
        W: ``(rows, d)`` weights; ``H``: ``(d, d)`` layer Hessian (``2 X X^T``).
        sparsity / zeros: unstructured target (fraction or count, existing zeros included). Removals are spread
            over the blocks in proportion to their surviving weights, so the count is exact.
        structure: ``None`` or ``(n, m)``: N:M, at most ``n`` nonzeros in every ``m`` consecutive inputs, chosen
            when the group's first column is reached (then ``sparsity``/``zeros`` are not used).
        mask: current mask; masked weights are always among the pruned.
        damp: relative damping (default 0.01, the reference "percdamp").
    """
    W = _as_matrix(W)
    rows, d = W.shape
    H = _check_square(H, d)
    structure = check_structure(structure)
    if structure is not None and not is_n_m(structure):
        raise ValueError(f"sparsegpt supports structure None (unstructured) or (n, m) for N:M, got {structure!r}")
    mask = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if tuple(mask.shape) != tuple(W.shape):
        raise ValueError(f"mask must have shape {tuple(W.shape)}, got {tuple(mask.shape)}")
    if is_n_m(structure):
        n, m = structure
        if d % m:
            raise ValueError(f"structure ({n}, {m}): the input dimension {d} is not a multiple of m={m}")
        blocksize = max(m, (blocksize // m) * m)
        new_total = None
    else:
        total = _layer_target(W, mask, sparsity, zeros)
        new_total = total - int((~mask).sum())
    damp = _check_damp(damp)
    Hd = H.detach().to(torch.float64)
    lam = damping(Hd, damp)
    Hd = Hd + lam * torch.eye(d, dtype=torch.float64, device=H.device)
    advice = f"Increase damp (now {damp:g})."
    Hinv = _inverse_pd(Hd, "the damped layer Hessian 2 X X^T + lambda I", advice)
    U = torch.linalg.cholesky(Hinv, upper=True).to(W.dtype)
    Wk = W.detach().clone() * mask
    pruned = torch.zeros_like(mask)
    alive_left = int(mask.sum())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the column loop is many small operations: one thread (see _greedy_obs)
    try:
        for i1 in range(0, d, blocksize):
            i2 = min(i1 + blocksize, d)
            W1 = Wk[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            dead1 = ~mask[:, i1:i2]
            diag1 = U1.diagonal()
            if new_total is not None:
                alive_block = int((~dead1).sum())
                k = round(new_total * alive_block / alive_left) if alive_left else 0
                k = min(k, alive_block)
                new_total -= k
                alive_left -= alive_block
                score = (W1 ** 2 / diag1.unsqueeze(0) ** 2).masked_fill(dead1, math.inf).reshape(-1)
                mask1 = dead1.clone().reshape(-1)
                if k:
                    mask1[torch.topk(score, k, largest=False).indices] = True
                mask1 = mask1.reshape(W1.shape)
            else:
                mask1 = dead1.clone()
            for i in range(i2 - i1):
                if new_total is None and i % m == 0:
                    score = W1[:, i:i + m] ** 2 / diag1[i:i + m].unsqueeze(0) ** 2
                    score = score.masked_fill(dead1[:, i:i + m], -math.inf)     # pruned weights go first
                    drop = torch.topk(score, m - n, dim=1, largest=False).indices
                    mask1[:, i:i + m].scatter_(1, drop, True)
                w = W1[:, i]
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
                err = (w - q) / U1[i, i]
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
                W1[:, i] = q
                Err1[:, i] = err
            Wk[:, i1:i2] = W1
            pruned[:, i1:i2] = mask1
            torch.set_num_threads(threads)        # the lazy update of the remaining columns: all threads
            Wk[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
            torch.set_num_threads(1)
    finally:
        torch.set_num_threads(threads)
    return Wk.masked_fill(pruned, 0.0), ~pruned


# ============================================================================ layer-wise: model level
def _layer_budget_zeros(plan, names, params) -> Dict[str, int]:
    """Target number of zeros per layer for the layer-wise methods. Layer budgets are used as given; under global
    scope the per-layer counts are those of *global magnitude pruning* at the same sparsity (the library's own
    selection), so layer-wise reconstruction gets the allocation a global ranking would choose."""
    if plan.budget is not None:
        return {n: round(plan.budget[n] * params[n].numel()) if n in plan.budget else int((~plan.current[n]).sum())
                for n in names}
    magnitude_masks = plan.select({n: w.detach().abs() for n, w in params.items()})
    return {n: int((~magnitude_masks[n]).sum()) for n in names}


def _layerwise(model, plan, data, solve, sequential: bool):
    params = prunable(model)
    names = list(params)
    modules = _prunable_modules(model)
    for name in names:
        if not isinstance(modules[name], (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"layer-wise pruning supports nn.Linear, nn.Conv1d and nn.Conv2d; {name} is a "
                             f"{type(modules[name]).__name__} (use method='woodfisher' or 'obs')")
    if is_n_m(plan.structure):
        targets = {n: None for n in names if n not in plan.exclude}
    else:
        zeros = _layer_budget_zeros(plan, names, params)
        targets = {n: z for n, z in zeros.items() if n not in plan.exclude and z > int((~plan.current[n]).sum())}
    masks = {n: plan.current[n].clone() for n in names}
    weights = {}
    if not targets:
        return masks, None
    batches = _batches(data)
    work = copy.deepcopy(model) if sequential else model
    hessians = None if sequential else layer_hessians(model, batches, list(targets))
    work_modules = _prunable_modules(work)
    for name in names:
        if name not in targets:
            continue
        H = layer_hessians(work, batches, [name], stop_early=True)[name] if sequential else hessians[name]
        weight = _original(modules[name]).detach()
        W2 = weight.reshape(weight.shape[0], -1)
        W_hat, keep = solve(W2, H, targets[name], plan.current[name].reshape(W2.shape))
        masks[name] = keep.reshape(weight.shape)
        weights[name] = W_hat.reshape(weight.shape).to(weight.dtype)
        if sequential:  # later layers see the outputs of this pruned layer
            with torch.no_grad():
                _original(work_modules[name]).copy_(weights[name] * masks[name])
    return masks, weights


@register_pruner("obc", needs_data=True,
                 description="Optimal Brain Compression: exact greedy OBS per output row of each layer (§3.5.5)")
def obc_pruner(model, plan, *, data=None, loss_fn=None, damp: float = DEFAULT_DAMP, sequential: bool = True,
               row_allocation: str = "uniform", block: int = 64, memory_mb: float = 256):
    """OBC / layer-wise OBS for every prunable layer (Frantar and Alistarh {cite}`frantar2022optimal`, Dong et al.
    {cite}`dong2017learning`; survey §3.5.5): each layer minimizes ``||W X - W_hat X||^2`` on its own calibration
    inputs ``X`` (collected with forward hooks over ``data``; ``loss_fn`` is not used) by :func:`obc_layer`.

    Budgets: a layer-wise scope or budget is used as given; under ``scope="global"`` each layer gets the number
    of zeros that *global magnitude pruning* would give it at the same sparsity (a global allocation; the
    reconstruction itself is always per layer). Unstructured only. Layers in ``exclude`` are left untouched.

    ``sequential=True`` (default, as in SparseGPT) prunes the layers in module order and collects each layer's
    inputs from the model whose earlier layers are already pruned, so every layer corrects for the errors that
    reach it; ``False`` collects all inputs from the dense model in one pass. Linear, Conv1d, Conv2d layers.
    """
    _check_unstructured(plan, "obc")
    damp = _check_damp(damp)
    if row_allocation not in ("uniform", "adaptive"):
        raise ValueError(f"row_allocation must be 'uniform' or 'adaptive', got {row_allocation!r}")

    def solve(W, H, zeros, mask):
        return obc_layer(W, H, zeros=zeros, mask=mask, damp=damp, row_allocation=row_allocation, block=block,
                         memory_mb=memory_mb, dtype=torch.float32)

    return _layerwise(model, plan, data, solve, sequential)


@register_pruner("sparsegpt", needs_data=True,
                 description="SparseGPT: column-wise layer-wise OBS with a Cholesky factor and lazy updates (§3.5.5)")
def sparsegpt_pruner(model, plan, *, data=None, loss_fn=None, damp: float = DEFAULT_DAMP, sequential: bool = True,
                     blocksize: int = 128):
    """SparseGPT for every prunable layer (Frantar and Alistarh {cite}`frantar2023sparsegpt`; survey §3.5.5), by
    :func:`sparsegpt_layer` on each layer's calibration inputs (forward hooks over ``data``; ``loss_fn`` unused).

    Structures: unstructured or N:M (``structure=(n, m)``). Budgets as for "obc": layer-wise as given, global
    scope by the per-layer counts of global magnitude pruning. ``sequential=True`` (default, as in the paper)
    prunes layer after layer on inputs that went through the already pruned layers.
    """
    if plan.structure is not None and not is_n_m(plan.structure):
        raise ValueError(f"method 'sparsegpt' supports structure None (unstructured) or (n, m) for N:M, got "
                         f"{plan.structure!r}")
    damp = _check_damp(damp)
    structure = plan.structure
    if is_n_m(structure):
        m = structure[1]
        for name, w in prunable(model).items():
            fan_in = w[0].numel()
            if name not in plan.exclude and fan_in % m:
                raise ValueError(f"structure {structure}: the input dimension of {name} ({fan_in}) is not a multiple "
                                 f"of m={m}; leave that layer out with exclude=[{name!r}]")

    def solve(W, H, zeros, mask):
        if structure is not None:
            return sparsegpt_layer(W, H, structure=structure, mask=mask, damp=damp, blocksize=blocksize)
        return sparsegpt_layer(W, H, zeros=zeros, mask=mask, damp=damp, blocksize=blocksize)

    return _layerwise(model, plan, data, solve, sequential)


__all__ = [
    "obd_saliency", "obs_saliency", "obs_prune", "OBSTrace", "constrained_minimizer", "damping", "min_eigenvalue",
    "check_positive_definite", "hessian_vector_product", "loss_hessian", "hessian_diagonal", "per_sample_gradients",
    "empirical_fisher", "woodbury_fisher_inverse", "layer_hessian", "layer_hessians", "obc_layer", "sparsegpt_layer",
    "obd", "obs_pruner", "woodfisher_pruner", "obc_pruner", "sparsegpt_pruner", "positive_curvature",
    "DEFAULT_DAMP", "OBS_MAX_PARAMS",
]
