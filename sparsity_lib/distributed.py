"""Pruning in data-parallel training: one mask for all ranks of a ``torch.distributed`` process group.

Data-parallel training (``DistributedDataParallel``, DDP) keeps one replica of the model per process and averages
gradients, so the replicas stay identical only if every rank applies the *same* mask. Two things break that
silently: pruning on each rank with rank-dependent data or seeds (each rank scores its own batches and selects a
different mask), and attaching masks after wrapping (the parametrization re-registers the weight under a new name
that DDP never saw; PyTorch's DDP documentation forbids changing parameters after wrapping).

The one documented way (used by :func:`sparsity_lib.prune`):

1. attach masks before wrapping: ``sl.prune(model, s0, ...)`` or all-True masks with
   ``sl.apply_masks(model, sl.get_masks(model))``; then ``ddp = DistributedDataParallel(model)``;
2. prune whenever you like with ``sl.prune(ddp, s, ...)`` (or on ``ddp.module``), called by *every* rank: it only
   rewrites mask buffers in place, and inside the process group rank 0's masks (and updated weights, for OBS-like
   methods) are broadcast (``sync="broadcast"``, the default), or the scores of all ranks are averaged before one
   selection (``sync="scores"``);
3. ranks whose masks already differ when ``sl.prune`` starts are refused with the layers named;
   :func:`broadcast_masks` makes them agree (rank 0 wins) and :func:`masks_agree` checks at any time.

A failure on one rank (bad data there) is reported on every rank instead of leaving the others waiting in a
collective. The process group may use any backend (gloo on CPU, NCCL with CUDA tensors). Survey §7 (distributed
training of sparse networks) motivates why masks and replicas must stay in lockstep.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .masks import _attr, _original, _prunable_modules, apply_masks, get_masks

try:  # torch.distributed is optional in some builds
    import torch.distributed as dist
except ImportError:  # pragma: no cover
    dist = None


def in_process_group() -> bool:
    """Whether a ``torch.distributed`` process group of more than one rank is initialized."""
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def active(sync) -> Optional[str]:
    """The synchronisation ``sl.prune`` performs: ``None`` outside a multi-rank process group or with ``sync=None``."""
    return sync if sync is not None and in_process_group() else None


def _is_ddp(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> Tuple[nn.Module, str]:
    """``(module, prefix)``: the module inside a DDP wrapper and the prefix of its names there (``"module."``),
    or ``(model, "")``."""
    if _is_ddp(model):
        return model.module, "module."
    return model, ""


def _has_mask(module: nn.Module, name: str = "weight") -> bool:
    attr = _attr(name)
    if not parametrize.is_parametrized(module, attr):
        return False
    return any(hasattr(p, "hard_mask") or type(p).__name__ == "Mask" for p in module.parametrizations[attr])


def check_masks_attached(model: nn.Module, names: List[str], prefix: str = "module.") -> None:
    """Refuse to prune layers of a DDP-wrapped model that carry no mask yet (attaching one would re-register the
    weight under DDP); the message gives the documented way."""
    modules = _prunable_modules(model)
    missing = [prefix + n for n in names if not _has_mask(modules[n], n)]
    if missing:
        raise ValueError(
            f"model is wrapped in DistributedDataParallel and layers {missing} have no mask yet: attaching one now "
            f"would change the parameters DDP registered. Attach masks before wrapping, e.g. "
            f"sl.apply_masks(model, sl.get_masks(model)) (all kept) or sl.prune(model, ...), then "
            f"DistributedDataParallel(model); sl.prune(ddp_model, ...) then updates them in place on every rank. "
            f"Nothing was changed."
        )


def _device(model: nn.Module) -> torch.device:
    if dist is not None and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_failed(error: Optional[BaseException], device) -> None:
    """Collective: if any rank failed, raise on every rank (the failing one re-raises its own error)."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RuntimeError("sl.prune failed on another rank (see its error); nothing was changed on any rank")


def _broadcast_bool(t: torch.Tensor, src: int, device) -> torch.Tensor:
    buf = t.to(device=device, dtype=torch.uint8).contiguous()
    dist.broadcast(buf, src)
    return buf.to(torch.bool)


def diverging_layers(model: nn.Module, src: int = 0) -> List[str]:
    """Collective: the names of prunable layers whose mask differs from rank ``src``'s on some rank."""
    model, _ = unwrap(model)
    device = _device(model)
    masks = get_masks(model)
    names = list(masks)
    local = torch.tensor([int(not torch.equal(_broadcast_bool(masks[n], src, device).cpu(), masks[n].cpu()))
                          for n in names], dtype=torch.int32, device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return [n for n, bad in zip(names, local.tolist()) if bad]


def masks_agree(model: nn.Module) -> bool:
    """Collective: whether every rank holds the same masks (call it on every rank)."""
    return not diverging_layers(model)


def broadcast_masks(model: nn.Module, src: int = 0) -> Dict[str, torch.Tensor]:
    """Collective: give every rank the masks of rank ``src`` (weights of pruned positions become zero) and return
    them. Repairs ranks that pruned on their own (``sync=None``)."""
    model, _ = unwrap(model)
    device = _device(model)
    masks = {n: _broadcast_bool(m, src, device).cpu() for n, m in get_masks(model).items()}
    apply_masks(model, masks)
    return get_masks(model)


def _broadcast_result(model, masks, weights, src: int, device):
    """Rank ``src``'s masks (every prunable layer) and new weights reach all ranks."""
    current = get_masks(model)
    full = {n: (masks[n] if masks is not None and n in masks else current[n]) for n in current}
    masks = {n: _broadcast_bool(m, src, device).cpu() for n, m in full.items()}
    names = [sorted(weights) if weights else []] if dist.get_rank() == src else [None]
    dist.broadcast_object_list(names, src)
    new_weights = None
    if names[0]:
        originals = {n: m for n, m in _originals(model).items() if n in names[0]}
        new_weights = {}
        for n in names[0]:
            ref = originals[n]
            buf = (weights[n].detach() if dist.get_rank() == src else torch.empty_like(ref))
            buf = buf.to(device=device, dtype=ref.dtype).contiguous()
            dist.broadcast(buf, src)
            new_weights[n] = buf.to(ref.device)
    return masks, new_weights


def _originals(model):
    out = {}
    for n, module in _prunable_modules(model).items():
        out[n] = _original(module, n)
    return out


def agreed_prune(model: nn.Module, prefix: str, sync: str, prepare: Callable, compute: Callable,
                 finish: Callable):
    """Run ``sl.prune`` inside a process group so that all ranks end with one mask (see the module docstring).

    Every step that can fail locally is followed by a collective status check, so an error on one rank is raised
    on all ranks and nobody is left waiting."""
    device = _device(model)
    job, error = None, None
    try:
        job = prepare()
    except Exception as e:  # noqa: BLE001  (re-raised on this rank by _any_failed)
        error = e
    _any_failed(error, device)
    bad = diverging_layers(model)
    if bad:
        raise ValueError(
            f"the masks of layers {[prefix + n for n in bad]} differ between ranks before pruning (ranks pruned on "
            f"their own, e.g. sync=None or apply_masks with rank-dependent masks): the replicas are no longer one model. Call "
            f"sl.distributed.broadcast_masks(model) on every rank to adopt rank 0's masks. Nothing was changed."
        )
    masks = weights = None
    if sync == "scores":
        scores = None
        try:
            if job["spec"].pruner is not None:
                raise ValueError(f"sync='scores' averages scores across ranks, but method {job['spec'].name!r} "
                                 f"selects its own masks (and may update weights): use sync='broadcast'")
            from .pruning import _scores_of
            scores = _scores_of(job)
        except Exception as e:  # noqa: BLE001
            error = e
        _any_failed(error, device)
        averaged = {}
        for n in sorted(scores):
            buf = scores[n].to(device=device, dtype=torch.float64).contiguous()
            dist.all_reduce(buf)
            averaged[n] = (buf / dist.get_world_size()).to(scores[n].dtype).cpu()
        try:  # the same scores on every rank: the same selection (or the same error) everywhere
            masks, weights = compute(job, scores={n: averaged[n] for n in scores})
        except Exception as e:  # noqa: BLE001
            error = e
        _any_failed(error, device)
    else:
        if dist.get_rank() == 0:
            try:
                masks, weights = compute(job)
            except Exception as e:  # noqa: BLE001
                error = e
        _any_failed(error, device)
        masks, weights = _broadcast_result(model, masks, weights, 0, device)
    return finish(job, masks, weights)


__all__ = ["in_process_group", "unwrap", "check_masks_attached", "diverging_layers", "masks_agree",
           "broadcast_masks", "agreed_prune"]
