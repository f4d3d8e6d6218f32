"""Run-time settings shared by every chapter: seeds, threads and the FAST / FULL scale.

The book runs at two scales with the *same code path*:

* ``fast`` (the default, and what CI runs): every chapter finishes in at most 60 s on two CPU cores;
* ``full``: bigger models, more epochs and more seeds, for readers with more time or a GPU.

The scale is read once from the environment variable ``SPARSITY_SCALE`` (``fast`` or ``full``)::

    SPARSITY_SCALE=full make book

A chapter asks for a size with :func:`pick`, e.g. ``epochs = sl.config.pick(fast=10, full=60)``.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

ENV_VAR = "SPARSITY_SCALE"
SCALES = ("fast", "full")


def _read_scale() -> str:
    value = os.environ.get(ENV_VAR, "fast").strip().lower() or "fast"
    if value not in SCALES:
        raise ValueError(f"{ENV_VAR} must be one of {SCALES}, got {value!r}")
    return value


SCALE: str = _read_scale()
FAST: bool = SCALE == "fast"
FULL: bool = not FAST
DEVICE: torch.device = torch.device("cuda" if (FULL and torch.cuda.is_available()) else "cpu")


def pick(fast, full):
    """Return ``fast`` at FAST scale and ``full`` at FULL scale (any type: epochs, seed lists, widths)."""
    return fast if FAST else full


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated exactly (on one machine)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(seed: int = 0, threads: int | None = None, quiet: bool = False) -> str:
    """The first call of every chapter: seeds, thread count, deterministic kernels; returns a one-line summary.

    ``threads`` defaults to :func:`default_threads`: one at FAST scale, all cores at FULL scale.
    """
    seed_everything(seed)
    if threads is None:
        threads = default_threads()
    torch.set_num_threads(threads)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover - older torch
        pass
    summary = f"sparsity_lib: scale={SCALE}, device={DEVICE.type}, threads={threads}, seed={seed}, torch {torch.__version__}"
    if not quiet:
        print(summary)
    return summary


def default_threads() -> int:
    """Threads for torch: one at FAST scale; at FULL scale the cores, shared among concurrent pytest-xdist workers.

    The FAST models are so small that a second thread costs more in synchronization than it gains. Measured on
    the 2-core CI machine, 5 epochs of LeNet-300-100 on digits: 0.10 s with one thread, 0.09 s with two spinning
    OpenMP threads on an idle machine, 0.34 s with two passive ones, and tens of times slower with spinning
    threads when other processes share the cores (as when ``make test`` runs two notebooks at once).
    """
    cores = os.cpu_count() or 1
    if FAST:
        return 1
    threads = cores
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and workers.isdigit() and int(workers) > 1:
        threads = max(1, cores // int(workers))
    return threads


def progress_enabled() -> bool:
    """Progress bars are shown to a learner at a terminal or notebook, never under CI or in the book build."""
    return os.environ.get("CI", "").lower() not in ("1", "true", "yes") and os.environ.get("SPARSITY_QUIET", "") == ""
