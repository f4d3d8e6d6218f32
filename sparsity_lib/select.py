"""Selection: from scores (higher = keep) to boolean masks, for every scope and structure of the book.

This is step 2 of the pipeline *score -> select -> mask* (DESIGN.md). Everything here is a pure function of
tensors: no model is touched.

Structures (survey §3.1 "structured vs unstructured", §8.4 and Mishra et al. {cite}`mishra2021accelerating`
for N:M):

* ``None``: unstructured, every weight is its own group;
* ``"neuron"``: a group is an output row of a Linear layer, or an output channel of a convolution;
* ``("block", r, c)``: a group is an ``r x c`` tile of the weight viewed as ``(out, fan_in)``;
* ``(n, m)``: N:M, at most ``n`` nonzeros in every run of ``m`` consecutive weights along the flattened input
  dimension (the pattern of sparse tensor cores).

A group's score is the mean score of its surviving weights, which keeps scores comparable between layers of
different fan-in under global selection.

Selection is cumulative: weights already masked stay masked and count towards the target, so
``prune(model, 0.9)`` after ``prune(model, 0.5)`` ends at 90% sparsity, never below.

Guards against silent wrong results:

* scores must be finite: NaN or inf in any layer raises ``ValueError`` naming the layer (N:M included);
* scores that are all equal carry no ranking: when a selection would have to choose *some but not all* of a set of
  candidates whose scores are all equal (all layers together under global scope, one layer under layer-wise scope
  or N:M), the choice would silently follow storage order, so it raises ``ValueError`` instead (typical cause: a
  data-driven score whose loss does not depend on the outputs, e.g. cross-entropy on a regression head);
* a structured selection (neurons/channels, blocks) never empties a layer that still has a group alive, unless
  ``allow_empty_layers=True``: the best group of each layer is kept. When that stops the target from being
  reached, a ``UserWarning`` gives the sparsity actually reached (``sl.sparsity`` reports it too).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch

Structure = Union[None, str, Tuple[int, int], Tuple[str, int, int]]


# ----------------------------------------------------------------------------------------------- validation
def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float after checking it lies in [0, 1) (NaN and booleans are rejected).

    Any real number is accepted, numpy scalars (``np.float32(0.5)``, ``np.linspace(...)[i]``) and one-element
    tensors included."""
    if not isinstance(sparsity, numbers.Number) and hasattr(sparsity, "item") and hasattr(sparsity, "dtype"):
        size = sparsity.numel() if callable(getattr(sparsity, "numel", None)) else getattr(sparsity, "size", None)
        if size == 1 and "bool" not in str(sparsity.dtype):
            sparsity = sparsity.item()  # a one-element tensor or numpy array
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or type(sparsity).__name__ == "bool_":
        raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    sparsity = float(sparsity)
    if math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of weights removed), got {sparsity!r}")
    return sparsity


def check_budget(budget: Mapping[str, float], names, arg: str = "scope", check=check_sparsity) -> Dict[str, float]:
    """Validate a ``{layer name: value}`` dict against the prunable ``names``; each value goes through ``check``
    (by default :func:`check_sparsity`), whose errors name the entry, e.g. ``scope['fc1.weight']``."""
    names = list(names)
    out = {}
    for name, value in budget.items():
        if name not in names:
            raise ValueError(f"{arg}: unknown layer name {name!r}; prunable weights are {names}")
        out[name] = check(value, f"{arg}[{name!r}]")
    return out


def check_structure(structure) -> Structure:
    """Validate a ``structure`` argument and return it in canonical form."""
    allowed = "None, 'neuron', (n, m) with 0 < n < m for N:M, or ('block', rows, cols)"
    if structure is None or structure == "unstructured":
        return None
    if isinstance(structure, str):
        if structure in ("neuron", "channel"):
            return "neuron"
        raise ValueError(f"structure must be one of {allowed}; got {structure!r}")
    if isinstance(structure, (tuple, list)):
        if len(structure) == 3 and structure[0] == "block":
            r, c = structure[1], structure[2]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (r, c)):
                raise ValueError(f"structure ('block', rows, cols) needs positive integers, got {structure!r}")
            return ("block", int(r), int(c))
        if len(structure) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in structure):
            n, m = structure
            if not (0 < n < m):
                raise ValueError(f"structure (n, m) for N:M needs 0 < n < m, got n={n}, m={m}")
            return (int(n), int(m))
    raise ValueError(f"structure must be one of {allowed}; got {structure!r}")


def is_n_m(structure: Structure) -> bool:
    return isinstance(structure, tuple) and len(structure) == 2


# ------------------------------------------------------------------------------------------------- groups
def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View a weight as (out, fan_in): Linear is already 2-D, a convolution flattens (in, k1, k2, ...)."""
    return t.reshape(t.shape[0], -1)


def group_view(scores: torch.Tensor, alive: torch.Tensor, structure: Structure, name: str = "weight"):
    """Group scores and alive counts of one layer, and a function that maps kept groups back to a mask.

    Returns ``(group_scores, group_alive, expand)``: ``group_scores[g]`` is the mean score over the surviving
    weights of group g (``-inf`` if none survive), ``group_alive[g]`` their number, and ``expand(keep_groups)``
    turns a boolean vector over groups into an element mask shaped like the weight.
    """
    shape = scores.shape
    s = scores.detach().float()
    a = alive
    if structure is None:
        flat_s, flat_a = s.reshape(-1), a.reshape(-1)
        group_scores = torch.where(flat_a, flat_s, torch.full_like(flat_s, -math.inf))
        return group_scores, flat_a.long(), lambda keep: keep.reshape(shape)
    if structure == "neuron":
        rows_s, rows_a = _as_rows(s), _as_rows(a)
        group_alive = rows_a.sum(1)
        sums = torch.where(rows_a, rows_s, torch.zeros_like(rows_s)).sum(1)
        group_scores = torch.where(group_alive > 0, sums / group_alive.clamp(min=1), torch.full_like(sums, -math.inf))
        cols = rows_s.shape[1]
        return group_scores, group_alive, lambda keep: keep[:, None].expand(-1, cols).reshape(shape)
    if isinstance(structure, tuple) and structure[0] == "block":
        _, r, c = structure
        rows_s, rows_a = _as_rows(s), _as_rows(a)
        out, fan_in = rows_s.shape
        if out % r or fan_in % c:
            raise ValueError(
                f"structure ('block', {r}, {c}) does not tile {name} viewed as ({out}, {fan_in}): "
                f"the rows must be a multiple of {r} and the columns of {c}"
            )
        tiles_s = rows_s.reshape(out // r, r, fan_in // c, c).permute(0, 2, 1, 3).reshape(out // r, fan_in // c, r * c)
        tiles_a = rows_a.reshape(out // r, r, fan_in // c, c).permute(0, 2, 1, 3).reshape(out // r, fan_in // c, r * c)
        group_alive = tiles_a.sum(-1).reshape(-1)
        sums = torch.where(tiles_a, tiles_s, torch.zeros_like(tiles_s)).sum(-1).reshape(-1)
        group_scores = torch.where(group_alive > 0, sums / group_alive.clamp(min=1), torch.full_like(sums, -math.inf))

        def expand(keep):
            k = keep.reshape(out // r, 1, fan_in // c, 1).expand(-1, r, -1, c)
            return k.reshape(out, fan_in).reshape(shape)

        return group_scores, group_alive, expand
    raise ValueError(f"group_view does not handle structure {structure!r}")


def _choose_removed(group_scores: torch.Tensor, group_alive: torch.Tensor, to_remove: int,
                    protected=None) -> torch.Tensor:
    """Boolean vector of groups to remove: the lowest-scoring surviving groups whose sizes add up closest to
    ``to_remove`` (exactly ``to_remove`` when every group is one weight). Groups in ``protected`` (a boolean
    vector, or ``None``) are never removed."""
    removed = torch.zeros_like(group_alive, dtype=torch.bool)
    if to_remove <= 0:
        return removed
    eligible = group_alive > 0
    if protected is not None:
        eligible &= ~protected
    candidates = torch.nonzero(eligible).reshape(-1)
    order = candidates[torch.sort(group_scores[candidates], stable=True).indices]
    sizes = torch.cumsum(group_alive[order], 0)
    idx = int(torch.searchsorted(sizes, torch.tensor([to_remove], dtype=sizes.dtype))[0])
    if idx >= len(order):
        take = len(order)
    else:
        over = int(sizes[idx]) - to_remove            # removing idx+1 groups overshoots by this much
        under = to_remove - (int(sizes[idx - 1]) if idx > 0 else 0)  # removing idx groups falls short by this
        take = idx + 1 if over <= under else idx
    removed[order[:take]] = True
    return removed


def _best_group(group_scores: torch.Tensor, group_alive: torch.Tensor) -> torch.Tensor:
    """Boolean vector marking the one surviving group a layer keeps when it may not be emptied: the group the
    stable ascending order would remove last (highest score, the later one among ties), so that protecting it
    changes nothing unless the layer would otherwise be emptied."""
    out = torch.zeros_like(group_alive, dtype=torch.bool)
    alive = torch.nonzero(group_alive > 0).reshape(-1)
    if len(alive):
        order = alive[torch.sort(group_scores[alive], stable=True).indices]
        out[order[-1]] = True
    return out


# ---------------------------------------------------------------------------------------------- selection
def _check_scores(scores: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], skip=()):
    """Names, types, shapes and finiteness of ``scores``; layers in ``skip`` (excluded, never read) are not
    checked for finiteness."""
    for name, s in scores.items():
        if name not in current:
            raise ValueError(f"scores: unknown layer name {name!r}; prunable weights are {list(current)}")
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"scores[{name!r}] must be a torch.Tensor, got {type(s).__name__}")
        if tuple(s.shape) != tuple(current[name].shape):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}, the weight has {tuple(current[name].shape)}")
        if name in skip:
            continue
        finite = torch.isfinite(s.detach())
        if not bool(finite.all()):
            bad = s.detach()[~finite]
            kind = "NaN" if bool(torch.isnan(bad).any()) else "inf"
            raise ValueError(
                f"scores[{name!r}] contains {int((~finite).sum())} non-finite values ({kind}): the scoring method "
                f"failed on this layer (check the data, loss_fn and the weights for NaN/inf); nothing was changed"
            )


def _refuse_ties(group_scores: torch.Tensor, group_alive: torch.Tensor, to_remove: int, where: str,
                 protected=None):
    """Raise if removing ``to_remove`` weights must pick some, but not all, of candidates whose scores are all
    equal: the choice would silently follow storage order."""
    eligible = group_alive > 0
    if protected is not None:
        eligible &= ~protected
    values = group_scores[eligible]
    if to_remove <= 0 or values.numel() < 2 or to_remove >= int(group_alive[eligible].sum()):
        return
    if bool((values == values[0]).all()):
        raise ValueError(
            f"the scores of {where} are all equal ({float(values[0]):g}): they do not rank the weights, and the "
            f"selection would silently follow storage order. Typical cause: a data-driven score whose loss does not "
            f"depend on these weights (pass a loss_fn that fits the outputs, e.g. torch.nn.functional.mse_loss for a "
            f"regression head). For a deliberately arbitrary choice use method='random'; to leave a layer as it "
            f"is, exclude it. Nothing was changed."
        )


def _warn_short(structure, short: Dict[str, Tuple[float, float]]):
    if short:
        detail = ", ".join(f"{n}: {reached:.4f} instead of {target:.4f}" for n, (reached, target) in short.items())
        warnings.warn(
            f"structure={structure!r}: every layer keeps at least one group (allow_empty_layers=False), so the "
            f"target was not reached ({detail}); pass allow_empty_layers=True to allow emptying layers",
            UserWarning, stacklevel=3,
        )


def n_m_masks(scores: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], n: int, m: int):
    """N:M masks: in every run of ``m`` consecutive weights along the flattened input dimension keep the ``n``
    with the highest score (weights already masked are removed first). Non-finite scores, and a layer whose
    surviving weights all have the same score, raise ``ValueError``."""
    _check_scores(scores, current)
    masks = {}
    for name, s in scores.items():
        alive = current[name]
        rows_s, rows_a = _as_rows(s.detach().float()), _as_rows(alive)
        out, fan_in = rows_s.shape
        if fan_in % m:
            raise ValueError(f"structure ({n}, {m}): the input dimension of {name} ({fan_in}) is not a multiple of m={m}")
        flat_a = alive.reshape(-1)
        # weights to remove beyond the dead ones: alive minus the at most n kept per run of m
        runs_alive = rows_a.reshape(out, fan_in // m, m).sum(-1)
        extra = int((runs_alive - runs_alive.clamp(max=n)).sum())
        _refuse_ties(s.detach().float().reshape(-1), flat_a.long(), extra, f"layer {name!r}")
        g = torch.where(rows_a, rows_s, torch.full_like(rows_s, -math.inf)).reshape(out, fan_in // m, m)
        top = torch.topk(g, n, dim=-1).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
        masks[name] = (keep.reshape(out, fan_in) & rows_a).reshape(s.shape)
    return masks


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def layerwise_masks(scores: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor],
                    sparsities: Mapping[str, float], structure: Structure = None,
                    allow_empty_layers: bool = False) -> Dict[str, torch.Tensor]:
    """Each layer keeps its highest-scoring weights (or groups) so that its sparsity becomes ``sparsities[name]``.

    ``current`` holds the masks already on the model (all-True for none); layers missing from ``sparsities``
    keep their current mask. The number removed in a layer of ``p`` weights is ``round(s * p)``, as in
    ``torch.nn.utils.prune``. With a structure (neurons, blocks) a layer keeps at least its best group unless
    ``allow_empty_layers`` (then a ``UserWarning`` reports the sparsity reached when it falls short).
    """
    structure = check_structure(structure)
    _check_flag(allow_empty_layers, "allow_empty_layers")
    _check_scores(scores, current)
    masks, short = {}, {}
    for name, s in scores.items():
        if name not in sparsities:
            masks[name] = current[name].clone()
            continue
        alive = current[name]
        target_removed = round(sparsities[name] * alive.numel())
        to_remove = target_removed - int((~alive).sum())
        gs, ga, expand = group_view(s, alive, structure, name)
        protected = None if structure is None or allow_empty_layers else _best_group(gs, ga)
        _refuse_ties(gs, ga, to_remove, f"layer {name!r}")
        removed = _choose_removed(gs, ga, to_remove, protected)
        masks[name] = expand(~removed) & alive
        if protected is not None and bool(protected.any()) and to_remove > 0:
            reached = 1 - int(masks[name].sum()) / alive.numel()
            wanted = target_removed / alive.numel()
            unprotected = _choose_removed(gs, ga, to_remove)
            if bool(unprotected[protected].any()):   # the protection changed the outcome
                short[name] = (reached, wanted)
    _warn_short(structure, short)
    return masks


def global_masks(scores: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], sparsity: float,
                 structure: Structure = None, exclude: Sequence[str] = (),
                 allow_empty_layers: bool = False) -> Dict[str, torch.Tensor]:
    """Rank the weights (or groups) of all layers together and remove the lowest-scoring ones until
    ``round(sparsity * total)`` of all prunable weights are zero.

    Layers in ``exclude`` keep their current masks but still count in the total, so ``sparsity`` is always the
    fraction of *all* prunable weights removed. With a structure (neurons, blocks) every layer keeps at least its
    best group unless ``allow_empty_layers``; if the target then cannot be reached, as much as possible is removed
    and a ``UserWarning`` reports the sparsity reached.
    """
    structure = check_structure(structure)
    _check_flag(allow_empty_layers, "allow_empty_layers")
    _check_scores(scores, current, skip=set(exclude))
    names = [n for n in scores if n not in set(exclude)]
    total = sum(current[n].numel() for n in current)
    already = sum(int((~current[n]).sum()) for n in current)
    to_remove = round(sparsity * total) - already
    available = sum(int(current[n].sum()) for n in names)
    if to_remove > available:
        raise ValueError(
            f"sparsity={sparsity} cannot be reached: with the layers in exclude kept as they are, at most "
            f"{(already + available) / total:.4f} of the prunable weights can be removed"
        )
    views = {n: group_view(scores[n], current[n], structure, n) for n in names}
    if not names:
        return {n: current[n].clone() for n in current}
    all_scores = torch.cat([views[n][0] for n in names])
    all_alive = torch.cat([views[n][1] for n in names])
    protected = None
    if structure is not None and not allow_empty_layers:
        protected = torch.cat([_best_group(views[n][0], views[n][1]) for n in names])
    _refuse_ties(all_scores, all_alive, to_remove, "all layers (global scope)")
    removed = _choose_removed(all_scores, all_alive, to_remove, protected)
    masks, offset = {}, 0
    for n in current:
        if n not in views:
            masks[n] = current[n].clone()
            continue
        gs, _, expand = views[n]
        masks[n] = expand(~removed[offset:offset + len(gs)]) & current[n]
        offset += len(gs)
    changed = protected is not None and to_remove > 0 and bool(
        _choose_removed(all_scores, all_alive, to_remove)[protected].any())
    if changed:
        reached = 1 - sum(int(m.sum()) for m in masks.values()) / total
        if round(reached * total) < round(sparsity * total) - (int(all_alive.max()) if len(all_alive) else 0):
            _warn_short(structure, {"all layers": (reached, sparsity)})
    return masks


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` highest entries of one tensor (a convenience for chapters and tests)."""
    if not 0 <= keep <= scores.numel():
        raise ValueError(f"keep must be in [0, {scores.numel()}], got {keep}")
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep:
        out[torch.topk(scores.reshape(-1), keep).indices] = True
    return out.reshape(scores.shape)


def _check_count_of(count, name: str, maximum: int, what: str) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= maximum:
        raise ValueError(f"{name} must be an integer in [0, {maximum}] ({what}), got {count!r}")
    return count


def drop_and_grow(mask: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor,
                  count: int) -> torch.Tensor:
    """One connectivity update of dynamic sparse training: drop ``count`` active weights, grow ``count`` others.

    .. math::  K = \\operatorname{top}_{a - c}\\{d_i : m_i\\}, \\qquad
               m' = K \\cup \\operatorname{top}_{c}\\{g_i : i \\notin K\\},

    with :math:`a` the number of active weights, :math:`c` = ``count``, :math:`d` the drop scores (higher =
    keep, e.g. :math:`|w|`) and :math:`g` the grow scores (higher = grow, e.g. :math:`|\\partial L/\\partial w|`
    for RigL, random for SET). As in RigL's reference code (Evci et al. {cite}`evci2020rigging`), growth
    chooses among all positions not kept, the ones just dropped included (a dropped weight may come straight
    back). The number of active weights is unchanged. Ties are broken deterministically by position: among
    equal scores the earlier position in row-major (flattened) order ranks higher, for keeping and for growing.

    Pure: returns a new bool tensor and changes nothing. ``mask`` is a bool tensor, the scores are real tensors
    of its shape; ``count`` an integer in ``[0, active weights]`` (there are always at least ``count`` positions
    not kept). NaN among the drop scores of active weights or among the grow scores raises ``ValueError``.
    Survey §4 (Table "dynamic sparse training"). Defined for Chapter 09.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a torch.bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    for arg, scores in (("drop_scores", drop_scores), ("grow_scores", grow_scores)):
        if not isinstance(scores, torch.Tensor) or scores.dtype == torch.bool or scores.is_complex():
            raise TypeError(f"{arg} must be a real-valued tensor of the mask's shape {tuple(mask.shape)}")
        if tuple(scores.shape) != tuple(mask.shape):
            raise ValueError(f"{arg} has shape {tuple(scores.shape)}, the mask has shape {tuple(mask.shape)}")
    active = int(mask.sum())
    count = _check_count_of(count, "count", active, f"at most the {active} active weights of mask")
    flat = mask.reshape(-1)
    d = drop_scores.detach().reshape(-1).to(device=mask.device, dtype=torch.float64)
    g = grow_scores.detach().reshape(-1).to(device=mask.device, dtype=torch.float64)
    if torch.isnan(d[flat]).any():
        raise ValueError("drop_scores contains NaN at active positions of mask")
    if torch.isnan(g).any():
        raise ValueError("grow_scores contains NaN")
    n = flat.numel()
    kept = torch.zeros(n, dtype=torch.bool, device=mask.device)
    candidates = torch.nonzero(flat).reshape(-1)  # increasing positions: a stable sort keeps earlier ones first
    order = candidates[torch.sort(d[candidates], descending=True, stable=True).indices]
    kept[order[:active - count]] = True
    if count:
        free = torch.nonzero(~kept).reshape(-1)
        order = free[torch.sort(g[free], descending=True, stable=True).indices]
        kept[order[:count]] = True
    return kept.reshape(mask.shape)
