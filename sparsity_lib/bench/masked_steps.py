"""Timing of masked training steps and of the chapters (tables, never a test): ``python -m sparsity_lib.bench.masked_steps``
(also part of ``python -m sparsity_lib.bench``, which prints every table of the package).

1. **Cost of a mask during training.** The median time of one training step (forward, backward, SGD step with
   momentum; batch 64) of the chapters' models, for three variants of the same network:

   * ``dense``: no mask;
   * ``masked``: 90% global magnitude pruning with :func:`sparsity_lib.prune`, i.e. a
     :mod:`torch.nn.utils.parametrize` parametrization ``weight = original * mask``;
   * ``hooks``: 90% with ``torch.nn.utils.prune.global_unstructured`` (forward pre-hooks that recompute
     ``weight = weight_orig * weight_mask`` before every forward).

   Masks here only *simulate* sparsity (survey §7: the dense kernels still run), so both masked variants can
   only be slower than dense; the ratios say how much slower. The steps of the three variants are interleaved,
   so that a change of load on a shared machine affects them alike.

2. **Chapter run times** (on by default; ``--no-chapters`` skips them): every ``chapters/*.ipynb`` executed from scratch with nbclient
   (kernel ``python3``, timeout 600 s per cell), wall time and status.

Options: ``--steps`` (timed steps per variant), ``--warmup``, ``--threads`` (e.g. ``1,2``), ``--no-chapters``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.nn import functional as F

from .. import data, models
from ..masks import count_params, sparsity
from ..pruning import prune

SPARSITY = 0.9
BATCH_SIZE = 64


# --------------------------------------------------------------------------------------------- step timing
def _benchmarks() -> List[Tuple[str, Callable[[], nn.Module], Callable[[], data.Task]]]:
    """(name, model factory, task) of the chapters' models."""
    return [
        ("lenet_300_100 (digits)", lambda: models.lenet_300_100(seed=0), lambda: data.digits(seed=0)),
        ("DigitsCNN (digits)", lambda: models.digits_cnn(seed=0), lambda: data.digits(seed=0)),
        ("MNIST1DCNN (mnist1d)", lambda: models.mnist1d_cnn(seed=0), lambda: data.mnist1d(seed=0)),
    ]


def _variant(factory: Callable[[], nn.Module], kind: str) -> nn.Module:
    model = factory()
    if kind == "masked":
        prune(model, SPARSITY, method="magnitude", scope="global")
    elif kind == "hooks":
        modules = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        torch_prune.global_unstructured(modules, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY)
    elif kind != "dense":
        raise ValueError(f"kind must be 'dense', 'masked' or 'hooks', got {kind!r}")
    return model


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()


def time_steps(factory: Callable[[], nn.Module], task: data.Task, kinds: Sequence[str], steps: int,
               warmup: int) -> Dict[str, float]:
    """Median seconds per training step of each variant in ``kinds``, the variants' steps interleaved."""
    nets = {kind: _variant(factory, kind) for kind in kinds}
    for kind, net in nets.items():
        if kind != "dense":
            assert abs(sparsity(net) - SPARSITY) < 1e-3, (kind, sparsity(net))
    optimizers = {kind: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) for kind, net in nets.items()}
    batches = task.batches(BATCH_SIZE, seed=0, drop_last=True)
    times = {kind: [] for kind in kinds}
    for i in range(warmup + steps):
        inputs, targets = batches[i % len(batches)]
        for kind in kinds:
            start = time.perf_counter()
            _step(nets[kind], optimizers[kind], inputs, targets)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[kind].append(elapsed)
    return {kind: statistics.median(t) for kind, t in times.items()}


def step_table(steps: int, warmup: int, threads: Sequence[int]) -> str:
    kinds = ("dense", "masked", "hooks")
    lines = [
        f"Training step (forward + backward + SGD-momentum step, batch {BATCH_SIZE}), median of {steps} steps "
        f"after {warmup} warm-up steps; masked and hooks at {SPARSITY:.0%} global magnitude sparsity.",
        "",
        "| model | weights | threads | dense (ms) | masked (ms) | hooks (ms) | masked / dense | hooks / dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous = torch.get_num_threads()
    try:
        for name, factory, make_task in _benchmarks():
            task = make_task()
            n_weights = count_params(factory())
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                t = time_steps(factory, task, kinds, steps, warmup)
                lines.append(
                    f"| {name} | {n_weights:,} | {n_threads} | {1e3 * t['dense']:.3f} | {1e3 * t['masked']:.3f} | "
                    f"{1e3 * t['hooks']:.3f} | {t['masked'] / t['dense']:.2f} | {t['hooks'] / t['dense']:.2f} |")
                print(lines[-1], file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(previous)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ chapter timing
def chapter_table(folder: pathlib.Path, timeout: int = 600) -> str:
    """Every chapter of ``folder`` executed from scratch with :func:`sparsity_lib.bench.chapters.run_one`."""
    from .chapters import run_one, select

    notebooks = select(folder, [])
    if not notebooks:
        return f"No notebooks in {folder}/ yet."
    lines = ["Chapters executed from scratch (nbclient, kernel python3).", "",
             "| notebook | wall time (s) | status |", "|---|---:|---|"]
    for path in notebooks:
        outcome, elapsed = run_one(path, timeout=timeout)
        lines.append(f"| {path.name} | {elapsed:.1f} | {outcome} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def _threads(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--threads must be a comma-separated list of positive integers, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsity_lib.bench.masked_steps",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    print(header())
    print_tables(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of these tables (shared with ``python -m sparsity_lib.bench``)."""
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per variant (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed warm-up steps (default 20)")
    parser.add_argument("--threads", type=_threads, default=[1, 2], help="torch thread counts, e.g. 1,2")
    parser.add_argument("--chapters", action=argparse.BooleanOptionalAction, default=True,
                        help="execute chapters/*.ipynb and time each one (default; --no-chapters skips them)")
    parser.add_argument("--chapters-dir", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent.parent.parent / "chapters")


def header() -> str:
    """The machine line printed above the tables."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"# sparsity_lib timings\n\ntorch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {load[0]:.2f} "
            f"(timings on a shared machine are noisy: compare the ratios)\n")


def print_tables(args) -> None:
    print(step_table(args.steps, args.warmup, args.threads))
    if args.chapters:
        print()
        print(chapter_table(args.chapters_dir))


if __name__ == "__main__":
    main()
