"""Comparing masks: how similar are two sparsity patterns? (survey §2.4.2, "early structure adaptation").

Two measures of the similarity of masks ``a`` and ``b`` (``True`` = kept weight), pooled over all layers when
they are dicts ``{name: bool tensor}``:

* :func:`iou`, the intersection over union of the *kept* weights (the Jaccard index),
  :math:`\\mathrm{IoU}(a, b) = |a \\cap b| / |a \\cup b|`: 1 for the same kept set, 0 for disjoint ones. At
  high sparsity it is the meaningful measure, because two random masks that keep 2% of the weights each
  share almost nothing (expected IoU about :math:`d / (2 - d)` at density :math:`d`);
* :func:`agreement`, one minus the normalized Hamming distance, the fraction of positions where the two
  masks say the same thing: :math:`1 - \\frac1n \\sum_i [a_i \\ne b_i]`. At high sparsity it is dominated by
  the weights both masks remove (two random 98%-sparse masks agree on about 96% of the positions).

:class:`MaskRecorder` is a training callback that keeps a snapshot of the masks at the start and after every
epoch: the model's own masks, or (given ``sparsity``) the masks that a pruning method *would* choose at that
sparsity if it were applied now (:func:`would_prune`). That is how the early structure of a dense run is
measured: the top-k of :math:`|w|` after every epoch, compared with the top-k at the end (as in the studies of
early structure that the survey cites, e.g. You et al.'s "early-bird" masks). Defined in Chapter 02.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .masks import get_masks

MaskLike = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def _pairs(mask_a: MaskLike, mask_b: MaskLike):
    """Check two masks (or dicts of masks) against each other and return them as two flat bool tensors."""
    if isinstance(mask_a, torch.Tensor) and isinstance(mask_b, torch.Tensor):
        pairs = [("mask", mask_a, mask_b)]
    elif isinstance(mask_a, Mapping) and isinstance(mask_b, Mapping):
        if set(mask_a) != set(mask_b):
            raise ValueError(f"mask_a and mask_b must name the same layers; only in mask_a: "
                             f"{sorted(set(mask_a) - set(mask_b))}, only in mask_b: {sorted(set(mask_b) - set(mask_a))}")
        if not mask_a:
            raise ValueError("mask_a and mask_b are empty dicts: there is nothing to compare")
        pairs = [(name, mask_a[name], mask_b[name]) for name in mask_a]
    else:
        raise TypeError(f"mask_a and mask_b must both be bool tensors or both dicts {{name: bool tensor}}, got "
                        f"{type(mask_a).__name__} and {type(mask_b).__name__}")
    flat_a, flat_b = [], []
    for name, a, b in pairs:
        for label, m in (("mask_a", a), ("mask_b", b)):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"{label}[{name!r}] must be a torch.bool tensor, got "
                                f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if a.shape != b.shape:
            raise ValueError(f"mask_a[{name!r}] has shape {tuple(a.shape)} but mask_b[{name!r}] has {tuple(b.shape)}")
        flat_a.append(a.reshape(-1).cpu())
        flat_b.append(b.reshape(-1).cpu())
    return torch.cat(flat_a), torch.cat(flat_b)


def iou(mask_a: MaskLike, mask_b: MaskLike, per_layer: bool = False):
    """Intersection over union of the kept weights, :math:`|a \\cap b| / |a \\cup b|` (1.0 when both keep nothing).

    ``mask_a`` and ``mask_b`` are two bool tensors of the same shape, or two dicts ``{name: bool tensor}`` over
    the same layers (the counts are pooled over all layers; ``per_layer=True`` returns ``{name: IoU}``
    instead). Used to measure early structure adaptation (survey §2.4.2). Defined in Chapter 02.
    """
    if per_layer:
        if not isinstance(mask_a, Mapping):
            raise TypeError("per_layer=True needs dicts {name: bool tensor}")
        _pairs(mask_a, mask_b)
        return {name: iou(mask_a[name], mask_b[name]) for name in mask_a}
    a, b = _pairs(mask_a, mask_b)
    union = int((a | b).sum())
    if union == 0:
        return 1.0
    return int((a & b).sum()) / union


def agreement(mask_a: MaskLike, mask_b: MaskLike, per_layer: bool = False):
    """Fraction of positions where the two masks agree, :math:`1 - \\mathrm{Hamming}(a, b) / n`.

    Same arguments as :func:`iou`. Note that it counts the weights both masks remove as agreement, so at high
    sparsity it is close to 1 even for unrelated masks: read it next to :func:`iou`. Defined in Chapter 02.
    """
    if per_layer:
        if not isinstance(mask_a, Mapping):
            raise TypeError("per_layer=True needs dicts {name: bool tensor}")
        _pairs(mask_a, mask_b)
        return {name: agreement(mask_a[name], mask_b[name]) for name in mask_a}
    a, b = _pairs(mask_a, mask_b)
    return int((a == b).sum()) / a.numel()


def random_iou(density_a: float, density_b: Optional[float] = None) -> float:
    """Expected IoU of two independent random masks of densities ``d_a`` and ``d_b`` (large-layer limit):
    :math:`d_a d_b / (d_a + d_b - d_a d_b)`, which is :math:`d / (2 - d)` for equal densities. The chance
    level against which a measured IoU should be read."""
    density_b = density_a if density_b is None else density_b
    for name, d in (("density_a", density_a), ("density_b", density_b)):
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {d!r}")
    both = density_a * density_b
    return both / (density_a + density_b - both)


def would_prune(model: nn.Module, sparsity: float, method: str = "magnitude", scope="global",
                **prune_options) -> Dict[str, torch.Tensor]:
    """The masks ``sl.prune(model, sparsity, method, scope, **prune_options)`` would produce now, without
    changing ``model`` (it prunes a deep copy). For a dense model and ``"magnitude"`` this is the top-k of
    :math:`|w|`; on a masked model, pruning is cumulative as always. Defined in Chapter 02.
    """
    from .pruning import prune
    return prune(copy.deepcopy(model), sparsity, method=method, scope=scope, **prune_options)


class MaskRecorder:
    """Training callback: a snapshot of the masks before training and after every epoch.

    Arguments:
        model: the model being trained.
        sparsity: ``None`` records the model's own masks (:func:`sparsity_lib.get_masks`); a number in [0, 1)
            records the masks that ``method`` *would* choose at that sparsity now (:func:`would_prune`), which
            is how the structure a dense run is heading for is measured.
        method, scope, prune_options: passed to :func:`would_prune`.

    Attributes:
        records: ``[{"epoch": e, "step": t, "masks": {name: bool tensor}}, ...]``; epoch 0 is before training
            (recorded at ``on_train_begin``, or by calling :meth:`record` yourself).

    After training, :meth:`iou_with_final`, :meth:`agreement_with_final` and :meth:`consecutive_iou` give the
    curves of Chapter 02. Defined in Chapter 02.
    """

    def __init__(self, model: nn.Module, sparsity: Optional[float] = None, method: str = "magnitude",
                 scope="global", **prune_options):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if sparsity is not None:
            from .pruning import _check_scope
            from .scores import get_method
            from .select import check_sparsity
            sparsity = check_sparsity(sparsity)
            get_method(method)
            _check_scope(scope, list(get_masks(model)), sparsity)
        else:
            get_masks(model)  # raises for a model without prunable weights
        self.model = model
        self.sparsity = sparsity
        self.method = method
        self.scope = scope
        self.prune_options = prune_options
        self.records: List[Dict] = []

    def snapshot(self) -> Dict[str, torch.Tensor]:
        """The masks this recorder would record now."""
        if self.sparsity is None:
            return get_masks(self.model)
        return would_prune(self.model, self.sparsity, method=self.method, scope=self.scope, **self.prune_options)

    def record(self, epoch: int, step: int = 0) -> None:
        """Append a snapshot labelled ``epoch`` and ``step``."""
        self.records.append({"epoch": int(epoch), "step": int(step), "masks": self.snapshot()})

    # ------------------------------------------------------------------------------------------ callbacks
    def on_train_begin(self, state) -> None:
        if not self.records:
            self.record(0, state.step)

    def on_epoch_end(self, state) -> None:
        self.record(state.epoch + 1, state.step)

    # ------------------------------------------------------------------------------------------- analysis
    @property
    def epochs(self) -> List[int]:
        return [r["epoch"] for r in self.records]

    def _check(self):
        if not self.records:
            raise ValueError("no masks recorded yet: train with this recorder as a callback, or call record()")

    def iou_with_final(self) -> List[float]:
        """IoU of every snapshot with the last one (the last value is 1)."""
        self._check()
        final = self.records[-1]["masks"]
        return [iou(r["masks"], final) for r in self.records]

    def agreement_with_final(self) -> List[float]:
        """Agreement (1 - normalized Hamming distance) of every snapshot with the last one."""
        self._check()
        final = self.records[-1]["masks"]
        return [agreement(r["masks"], final) for r in self.records]

    def consecutive_iou(self) -> List[float]:
        """IoU of each snapshot with the previous one (one value fewer than the snapshots): mask stability."""
        self._check()
        return [iou(a["masks"], b["masks"]) for a, b in zip(self.records[:-1], self.records[1:])]

    def __repr__(self) -> str:
        what = "model masks" if self.sparsity is None else f"{self.method} masks at sparsity {self.sparsity}"
        return f"MaskRecorder({what}, {len(self.records)} snapshots)"


__all__ = ["iou", "agreement", "random_iou", "would_prune", "MaskRecorder"]
