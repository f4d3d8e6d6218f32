"""Timing of a dynamic-sparse-training step (a table, never a test): ``python -m sparsity_lib.bench.growth``
(also part of ``python -m sparsity_lib.bench``).

A DST method (chapter 09, :mod:`sparsity_lib.growth`) pays for its mask updates on top of a static masked step:
SET and RigL drop and grow on update steps (RigL also records the dense gradient there), SNFS needs the dense
gradient on every step. The rows give the median step time of each against a static mask on LeNet-300-100.
"""

from __future__ import annotations

import statistics
import time
from typing import List

import torch
from torch.nn import functional as F

from .. import data, models
from ..growth import RigL, SET, SNFS, Static


def dst_step_benchmark(steps: int = 50, warmup: int = 5, sparsity: float = 0.9, batch_size: int = 64,
                       update_every: int = 100) -> List[dict]:
    """Median seconds of a training step of LeNet-300-100 on digits (forward, backward, ``step()``, SGD step)
    for a static mask, SET, RigL and SNFS at ``sparsity``; rows for ``make bench``: a DST step vs a static masked
    step. RigL is timed twice: on an update step (``update_every=1``: dense gradient, drop and grow every step)
    and amortized over ``update_every`` steps (the dense-gradient recording happens only on update steps).
    Returns ``[{"method", "ms", "vs static"}, ...]``."""
    task = data.digits(seed=0)
    batches = task.batches(batch_size, seed=0, drop_last=True)
    variants = {"static mask": (Static, {}), "SET (update every step)": (SET, dict(update_every=1)),
                "RigL (update every step)": (RigL, dict(update_every=1)),
                f"RigL (update every {update_every})": (RigL, dict(update_every=update_every)),
                "SNFS (dense gradient every step)": (SNFS, dict(update_every=update_every))}
    nets = {}
    for label, (cls, options) in variants.items():
        model = models.lenet_300_100(seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        nets[label] = (model, opt, cls(model, opt, sparsity, end=10 ** 9, alpha=0.1, schedule="constant",
                                       **options))
    times = {label: [] for label in variants}
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        for label, (model, opt, dst) in nets.items():
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            dst.step()
            opt.step()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    base = statistics.median(times["static mask"])
    return [{"method": label, "ms": 1e3 * statistics.median(t), "vs static": statistics.median(t) / base}
            for label, t in times.items()]


def table(steps: int = 50, warmup: int = 5) -> str:
    """The rows of :func:`dst_step_benchmark` as a markdown table."""
    rows = dst_step_benchmark(steps=steps, warmup=warmup)
    lines = [f"Dynamic sparse training step vs a static masked step (LeNet-300-100, digits, 90%, batch 64, "
             f"median of {steps} interleaved steps, torch {torch.__version__}, {torch.get_num_threads()} thread(s))",
             "", "| method | ms per step | vs static mask |", "|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['ms']:.2f} | {r['vs static']:.2f}x |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
