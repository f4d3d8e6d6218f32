"""Layer-wise reconstruction: per-layer OBS (OBC), SparseGPT and Wanda (survey §3.5.5, §3.3-3.4).

Instead of the loss, each layer asks a smaller, exactly quadratic question: keep its outputs on calibration inputs
``X`` as they were, ``min_{W_hat} ||W X - W_hat X||^2`` with ``W_hat`` sparse. The objective separates over output
rows and every row has the same Hessian ``H = 2 X X^T`` (:func:`layer_hessian`, :func:`layer_hessians`), of the
size of the layer's fan-in:

=============  ===========================================================  ===================================
method         removal                                                      weight update
=============  ===========================================================  ===================================
``"obc"``      exact greedy OBS per row; removals allocated across rows by  OBS update after every removal
               the recorded losses (global greedy over the layer, default)
``"sparsegpt"``  column-wise, mask per block of columns, Cholesky of H^-1   lazy OBS update of later columns
``"wanda"``    ``|W_ij| ||X_j||``, i.e. ``sqrt(H_jj / 2)`` times magnitude,   none
               compared within each row
=============  ===========================================================  ===================================

The layer-level solvers :func:`obc_layer` and :func:`sparsegpt_layer` take a weight matrix and its layer Hessian
directly; the registered pruners collect the inputs with forward pre-hooks
(:func:`sparsity_lib.plumbing.capture_inputs`) and, by default, prune layer after layer on inputs that went
through the already pruned layers. The greedy OBS kernel they share is in :mod:`sparsity_lib.obs`; damping is
relative, ``lambda = damp * mean |H_ii|`` (:func:`sparsity_lib.curvature.damping`, default 0.01, the reference
"percdamp").

Defined for Chapters 05 (Wanda) and 06 (survey §3.5.5, Hoefler et al. {cite}`hoefler2021sparsity`).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .curvature import DEFAULT_DAMP, _check_damp, _check_square, _inverse_pd, damping
from .masks import _check_has_prunable, _original, _prunable_modules, _weight, prunable
from .obs import _check_unstructured, _greedy_obs
from .plumbing import (INPUT_LAYERS, batches, capture_inputs, check_bool, check_finite, check_input_layers,
                       check_positive_int, layer_rows, unfold_conv_input, weight_matrix)
from .select import check_structure, is_n_m

ROW_ALLOCATIONS = ("adaptive", "uniform")
DEAD_INPUTS = ("prune", "keep")


# ============================================================================ layer-wise: inputs and Hessians
def layer_hessian(X: torch.Tensor) -> torch.Tensor:
    """``H = 2 X X^T`` of the layer-wise objective ``||W X - W_hat X||^2`` for calibration inputs ``X`` given as
    rows ``(N, d_in)`` (so ``H = 2 X_rows^T X_rows``): the Hessian of the squared reconstruction error of each
    output row with respect to that row's weights (L-OBS {cite}`dong2017learning`, OBC {cite}`frantar2022optimal`;
    survey §3.5.5)."""
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError("X must be a matrix of calibration inputs, one per row (N, d_in), got "
                         f"{getattr(X, 'shape', X)}")
    return 2 * X.T @ X


def layer_hessians(model: nn.Module, data, names: Optional[Sequence[str]] = None, *,
                   stop_early: bool = False) -> Dict[str, torch.Tensor]:
    """``{name: H = 2 sum_x x x^T}`` for the named prunable layers (default all), ``x`` running over every input row
    the layer sees on ``data`` (a Linear layer's input vectors; a convolution's unfolded input patches, weight
    viewed as ``(out, in * prod(kernel))``). Collected with forward pre-hooks, model in eval mode, nothing changed
    (:func:`sparsity_lib.plumbing.capture_inputs`).

    ``stop_early`` aborts each forward pass once the last requested layer has been seen (the trick of the
    SparseGPT code {cite}`frantar2023sparsegpt`; valid when the model calls its layers in module order).
    Survey §3.5.5."""
    modules = _prunable_modules(model)
    names = list(modules) if names is None else list(names)
    for name in names:
        if name not in modules:
            raise ValueError(f"names: unknown layer name {name!r}; prunable weights are {list(modules)}")
    wanted = {n: modules[n] for n in names}
    check_input_layers(wanted, "layer-wise pruning")      # validate layer types before running anything
    items = data if _parsed(data) else batches(data, model)
    sums: Dict[str, torch.Tensor] = {}

    def record(name, module, x):
        rows = layer_rows(module, x)
        H = 2 * rows.T @ rows
        sums[name] = H if name not in sums else sums[name] + H

    capture_inputs(model, wanted, items, record, stop_early=stop_early)
    return sums


class _Parsed(list):
    """Batches already parsed by :func:`sparsity_lib.plumbing.batches` (not parsed again per layer)."""


def _parsed(data) -> bool:
    return isinstance(data, _Parsed)


# ================================================================================= layer-wise solvers
def _check_choice(value, name: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _as_matrix(W, name="W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{name} must be a floating-point matrix (rows, d_in), got {getattr(W, 'shape', W)}")
    return check_finite(W, name)


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
              mask: Optional[torch.Tensor] = None, damp: float = DEFAULT_DAMP, row_allocation: str = "adaptive",
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
        row_allocation: ``"adaptive"`` (default, as in OBC's code {cite}`frantar2022optimal`): every row is first
            pruned to the end recording the loss ``w_q^2 / (2 [H^-1]_qq)`` of each removal, the layer's removals go
            to the smallest recorded losses over all rows (a global greedy over the layer, so rows that can lose
            weights cheaply lose more), and the rows are pruned again to their counts (about 3x the work of
            "uniform", never a higher layer error in our tests). ``"uniform"``: every row reaches (nearly) the
            same number of zeros, one pass.
        dtype: arithmetic precision (float32 is ample with the default damping; float64 for reference checks).
    """
    W = _as_matrix(W)
    rows, d = W.shape
    H = _check_square(H, d)
    mask = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if tuple(mask.shape) != tuple(W.shape):
        raise ValueError(f"mask must have shape {tuple(W.shape)}, got {tuple(mask.shape)}")
    _check_choice(row_allocation, "row_allocation", ROW_ALLOCATIONS)
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
                    damp: float = DEFAULT_DAMP, blocksize: int = 128, dead_inputs: str = "prune"):
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
        dead_inputs: ``"prune"`` (default, as the SparseGPT code does): weights whose input is always zero on the
            calibration data (``H_jj = 0``) cost nothing by the layer objective, so they are pruned first, before
            any other weight (up to the target; among them the smallest ``|w|`` first); ``"keep"``: treat them like
            any other weight (their saliency ``w^2 / U_jj^2`` is then only limited by the damping).
    """
    W = _as_matrix(W)
    rows, d = W.shape
    H = _check_square(H, d)
    structure = check_structure(structure)
    _check_choice(dead_inputs, "dead_inputs", DEAD_INPUTS)
    blocksize = check_positive_int(blocksize, "blocksize")
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
    dead_in = (H.diagonal() == 0) if dead_inputs == "prune" else torch.zeros(d, dtype=torch.bool, device=W.device)
    if new_total is not None and bool(dead_in.any()):
        free = mask & dead_in.unsqueeze(0)            # alive weights on inputs that are always zero: free to prune
        n_free = int(free.sum())
        if n_free > new_total:                        # more than the target: the smallest |w| among them
            scores = torch.where(free, W.detach().abs(), torch.full_like(W, math.inf)).reshape(-1)
            free = torch.zeros_like(free).reshape(-1)
            free[torch.topk(scores, new_total, largest=False).indices] = True
            free = free.reshape(W.shape)
            n_free = new_total
        mask = mask & ~free
        new_total -= n_free
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
                    score = score.masked_fill(dead_in[i1 + i:i1 + i + m].unsqueeze(0), -1.0)   # dead inputs next
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
    check_input_layers(modules, "layer-wise pruning", "use method='woodfisher' or 'obs'")
    if is_n_m(plan.structure):
        targets = {n: None for n in names if n not in plan.exclude}
    else:
        zeros = _layer_budget_zeros(plan, names, params)
        targets = {n: z for n, z in zeros.items() if n not in plan.exclude and z > int((~plan.current[n]).sum())}
    masks = {n: plan.current[n].clone() for n in names}
    weights = {}
    if not targets:
        return masks, None
    items = _Parsed(batches(data, model))
    work = copy.deepcopy(model) if sequential else model
    hessians = None if sequential else layer_hessians(model, items, list(targets))
    work_modules = _prunable_modules(work)
    for name in names:
        if name not in targets:
            continue
        H = layer_hessians(work, items, [name], stop_early=True)[name] if sequential else hessians[name]
        weight = _original(modules[name], name).detach()
        W2 = weight_matrix(weight)
        W_hat, keep = solve(W2, H, targets[name], plan.current[name].reshape(W2.shape))
        masks[name] = keep.reshape(weight.shape)
        weights[name] = W_hat.reshape(weight.shape).to(weight.dtype)
        if sequential:  # later layers see the outputs of this pruned layer
            with torch.no_grad():
                _original(work_modules[name], name).copy_(weights[name] * masks[name])
    return masks, weights


def obc_pruner(model, plan, *, data=None, loss_fn=None, damp: float = DEFAULT_DAMP, sequential: bool = True,
               row_allocation: str = "adaptive", block: int = 64, memory_mb: float = 256):
    """OBC / layer-wise OBS for every prunable layer (Frantar and Alistarh {cite}`frantar2022optimal`, Dong et al.
    {cite}`dong2017learning`; survey §3.5.5): each layer minimizes ``||W X - W_hat X||^2`` on its own calibration
    inputs ``X`` (collected with forward hooks over ``data``; ``loss_fn`` is not used) by :func:`obc_layer`.

    Budgets: a layer-wise scope or budget is used as given; under ``scope="global"`` each layer gets the number
    of zeros that *global magnitude pruning* would give it at the same sparsity (a global allocation; the
    reconstruction itself is always per layer). Unstructured only. Layers in ``exclude`` are left untouched.
    ``row_allocation`` (default ``"adaptive"``, as in the OBC code): how a layer's removals are spread over its
    rows (see :func:`obc_layer`).

    ``sequential=True`` (default, as in SparseGPT) prunes the layers in module order and collects each layer's
    inputs from the model whose earlier layers are already pruned, so every layer corrects for the errors that
    reach it; ``False`` collects all inputs from the dense model in one pass. Linear, Conv1d, Conv2d layers.
    """
    _check_unstructured(plan, "obc")
    damp = _check_damp(damp)
    _check_choice(row_allocation, "row_allocation", ROW_ALLOCATIONS)
    sequential = check_bool(sequential, "sequential")

    def solve(W, H, zeros, mask):
        return obc_layer(W, H, zeros=zeros, mask=mask, damp=damp, row_allocation=row_allocation, block=block,
                         memory_mb=memory_mb, dtype=torch.float32)

    return _layerwise(model, plan, data, solve, sequential)


def sparsegpt_pruner(model, plan, *, data=None, loss_fn=None, damp: float = DEFAULT_DAMP, sequential: bool = True,
                     blocksize: int = 128, dead_inputs: str = "prune"):
    """SparseGPT for every prunable layer (Frantar and Alistarh {cite}`frantar2023sparsegpt`; survey §3.5.5), by
    :func:`sparsegpt_layer` on each layer's calibration inputs (forward hooks over ``data``; ``loss_fn`` unused).

    Structures: unstructured or N:M (``structure=(n, m)``). Budgets as for "obc": layer-wise as given, global
    scope by the per-layer counts of global magnitude pruning. ``sequential=True`` (default, as in the paper)
    prunes layer after layer on inputs that went through the already pruned layers. ``dead_inputs`` (default
    ``"prune"``, as the SparseGPT code): weights whose input is always zero are pruned first (see
    :func:`sparsegpt_layer`).
    """
    if plan.structure is not None and not is_n_m(plan.structure):
        raise ValueError(f"method 'sparsegpt' supports structure None (unstructured) or (n, m) for N:M, got "
                         f"{plan.structure!r}")
    damp = _check_damp(damp)
    _check_choice(dead_inputs, "dead_inputs", DEAD_INPUTS)
    sequential = check_bool(sequential, "sequential")
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
            return sparsegpt_layer(W, H, structure=structure, mask=mask, damp=damp, blocksize=blocksize,
                                   dead_inputs=dead_inputs)
        return sparsegpt_layer(W, H, zeros=zeros, mask=mask, damp=damp, blocksize=blocksize, dead_inputs=dead_inputs)

    return _layerwise(model, plan, data, solve, sequential)


# ====================================================================================== Wanda (Chapter 05)
def wanda_input_norms(model: nn.Module, data, num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``||X_j||_2`` for every input feature j of every prunable layer, over all calibration samples:
    ``{name: (fan_in,)}`` (for a convolution: ``(groups, in/groups * k1 * k2)``, the unfolded im2col columns).

    The input statistic of Wanda {cite}`sun2023simple` (survey §3.3), ``sqrt(H_jj / 2)`` of the layer Hessian
    ``H = 2 X X^T``. Collected with forward pre-hooks on the layers (:func:`sparsity_lib.plumbing.capture_inputs`);
    every example, token and output position is a sample. Linear, Conv1d and Conv2d layers; Conv3d raises
    ValueError.
    """
    items = batches(data, model, num_batches)
    modules = _check_has_prunable(model)
    check_input_layers(modules, "wanda")
    sq: Dict[str, torch.Tensor] = {}

    def record(name, module, x):
        if isinstance(module, (nn.Linear, nn.MultiheadAttention)):
            s = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        else:
            s = unfold_conv_input(module, x).double().pow(2).sum(1)        # (groups, in/groups * k)
        sq[name] = sq.get(name, 0) + s

    capture_inputs(model, modules, items, record)
    return {n: sq[n].sqrt().float() for n in modules}


def wanda(model: nn.Module, data, loss_fn=None, num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Wanda score (Sun et al. {cite}`sun2023simple`, eq. 1; survey §3.3-3.4)::

        S_ij = |W_ij| * ||X_j||_2

    ``X_j`` is input feature j of the layer over all calibration samples (``data``: inputs, targets are not
    needed; ``loss_fn`` is ignored). For a convolution the weight is viewed as ``(out, in/groups * k1 * k2)`` and
    ``X_j`` is column j of the unfolded (im2col) input. Returns ``{name: tensor}`` shaped like the weights. The
    scores are meant to be compared *within each output row* (the registered method "wanda" does so).
    Defined in Chapter 05.
    """
    norms = wanda_input_norms(model, data, num_batches)
    modules = _check_has_prunable(model)
    out = {}
    for n, m in modules.items():
        w = _weight(m, n).detach()
        rows = w.abs().reshape(w.shape[0], -1)
        if isinstance(m, (nn.Linear, nn.MultiheadAttention)):
            s = rows * norms[n].to(rows)[None, :]
        else:
            group_of_row = torch.arange(w.shape[0], device=w.device) // (w.shape[0] // m.groups)
            s = rows * norms[n].to(rows)[group_of_row]
        out[n] = s.reshape(w.shape)
    return out


def per_row_masks(scores: Dict[str, torch.Tensor], current: Dict[str, torch.Tensor],
                  sparsities: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """Wanda's comparison group {cite}`sun2023simple`: in every output row i of layer l keep the weights with the
    highest ``scores[l][i, :]`` so that ``round(s_l * fan_in)`` of the row are removed (weights already masked
    count as removed)::

        mask_ij = [ rank of S_ij within row i  >=  round(s_l * fan_in) ]   (rank 0 = lowest)

    Layers missing from ``sparsities`` keep their mask. Survey §3.1 (structure of the selection)."""
    masks = {}
    for n, alive in current.items():
        if n not in sparsities:
            masks[n] = alive.clone()
            continue
        rows_a = alive.reshape(alive.shape[0], -1)
        rows_s = scores[n].detach().double().reshape(rows_a.shape)
        if torch.isnan(rows_s).any():
            raise ValueError(f"scores[{n!r}] contains NaN")
        remove = round(sparsities[n] * rows_a.shape[1])
        ranked = torch.where(rows_a, rows_s, torch.full_like(rows_s, -float("inf")))
        order = torch.sort(ranked, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(rows_a.shape[1]).expand_as(order).contiguous())
        masks[n] = ((rank >= remove) & rows_a).reshape(alive.shape)
    return masks


def wanda_pruner(model: nn.Module, plan, data=None, loss_fn=None, per_row: bool = True,
                 num_batches: Optional[int] = None):
    """Wanda pruning (Sun et al. {cite}`sun2023simple`): score ``|W_ij| * ||X_j||_2`` (:func:`wanda`), then in
    *every output row* remove the same fraction ``s_l`` of weights, the lowest-scoring ones. No weight update.

    Layer sparsities ``s_l``: the budget of ``scope`` (``"layerwise"`` or a dict); under ``scope="global"`` every
    layer gets the same sparsity (Wanda compares within rows, never across layers), chosen so that the overall
    target is met when ``exclude`` holds layers back. Each row removes ``round(s_l * fan_in)`` weights, so the
    overall sparsity can differ from the target by rounding. With ``per_row=False``, or a ``structure``
    (N:M, as in the paper's 2:4 results, neurons or blocks), the Wanda scores go through the standard selection of
    ``scope``/``structure`` instead. Returns ``(masks, None)``; the model is not changed.
    """
    if not isinstance(per_row, bool):
        raise TypeError(f"per_row must be True or False, got {per_row!r}")
    scores = wanda(model, data, num_batches=num_batches)
    if not per_row or plan.structure is not None:  # N:M, neurons, blocks: the standard selection
        return plan.select(scores), None
    if plan.budget is not None:
        sparsities = dict(plan.budget)
    else:
        names = [n for n in plan.current if n not in plan.exclude]
        total = sum(m.numel() for m in plan.current.values())
        held = sum(int((~plan.current[n]).sum()) for n in plan.exclude)
        free = sum(plan.current[n].numel() for n in names)
        uniform = (plan.sparsity * total - held) / free if free else 0.0
        if uniform > 1.0 + 1e-12:
            raise ValueError(f"sparsity={plan.sparsity} cannot be reached with the layers in exclude kept as they are")
        sparsities = {n: min(max(uniform, 0.0), 1.0) for n in names}
    return per_row_masks(scores, plan.current, sparsities), None


__all__ = [
    "layer_hessian", "layer_hessians", "obc_layer", "sparsegpt_layer", "obc_pruner", "sparsegpt_pruner",
    "wanda", "wanda_input_norms", "per_row_masks", "wanda_pruner", "ROW_ALLOCATIONS", "DEAD_INPUTS",
]
