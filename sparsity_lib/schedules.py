"""Sparsity schedules: how much to prune at each step of training (survey §2.4, Chapter 02).

The gradual schedule of Zhu & Gupta {cite}`zhu2017prune` raises the sparsity from ``initial`` to ``final``
between steps ``begin`` and ``end`` along a cubic (in general polynomial) curve, pruning fast while many
redundant weights remain and slowly near the end:

.. math::  s_t = s_f + (s_i - s_f) \\left(1 - \\frac{t - t_0}{t_1 - t_0}\\right)^{p}, \\qquad t_0 \\le t \\le t_1,

with ``s_t = s_i`` before ``t_0`` and ``s_t = s_f`` after ``t_1``. With ``p = 3`` it equals the sparsity levels
of ``torch.ao.pruning``'s ``CubicSL`` (``t_1 = t_0 + n * dt``), which the tests check.
"""

from __future__ import annotations

import math

from .select import check_sparsity


def polynomial(step: float, initial: float, final: float, begin: float, end: float, power: float = 3) -> float:
    """Target sparsity at ``step`` under the Zhu & Gupta polynomial schedule (see the module docstring)."""
    initial = check_sparsity(initial, "initial")
    final = check_sparsity(final, "final")
    if initial > final:
        raise ValueError(f"initial ({initial}) must be at most final ({final})")
    if not end > begin:
        raise ValueError(f"end ({end}) must be greater than begin ({begin})")
    if not (isinstance(power, (int, float)) and power > 0 and math.isfinite(power)):
        raise ValueError(f"power must be a positive number, got {power!r}")
    if step <= begin:
        return initial
    if step >= end:
        return final
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** power
