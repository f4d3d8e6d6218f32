"""Timing of the layer-wise second-order solvers (survey §3.5.5): ``python -m sparsity_lib.bench.layerwise``
(also part of ``python -m sparsity_lib.bench``, which prints every table of the package).

One linear layer ``W`` (``rows x cols``) with ``samples`` calibration inputs ``X``, pruned to ``sparsity`` by

* magnitude (per layer, the baseline),
* ``obc_layer``: exact greedy OBS per row (OBC, Frantar and Alistarh {cite}`frantar2022optimal`), rank-1 inverse
  downdates batched over rows and applied lazily as batched matrix products, with removals allocated across rows
  adaptively (the default, as in the OBC code: about 3x the work) and uniformly (every row the same count),
* ``sparsegpt_layer``: SparseGPT's column-wise solver (Frantar and Alistarh {cite}`frantar2023sparsegpt`),
  unstructured and 2:4,
* optionally (``--naive``) a plain per-row loop of exact OBS with one rank-1 update per removal
  (:func:`sparsity_lib.obs.greedy_obs_plain`, the textbook implementation, the reference point of the speed-up),

and printed as a markdown table: seconds (wall clock and CPU time of this process: on a shared machine the CPU
time is the steadier number), the reconstruction error ``||W X - W_hat X||^2`` relative to magnitude pruning's,
and the sparsity reached. The arithmetic floor of exact greedy OBS is the rank-1 downdates: ``removals x rows x
cols^2`` multiply-adds (``2 x 512 x 256 x 1024^2 = 2.7e11`` flops at the default size).

The inputs are correlated (a random mixing matrix and per-feature scales), as activations are; nothing is timed in
the tests. Example::

    python -m sparsity_lib.bench.layerwise --threads 2            # 256 x 1024 layer, 2,048 inputs, 50%
    python -m sparsity_lib.bench.layerwise --rows 64 --naive      # smaller, with the plain loop
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ..curvature import DEFAULT_DAMP, damping
from ..layerwise import layer_hessian, obc_layer, sparsegpt_layer
from ..obs import greedy_obs_plain


def correlated_layer(rows: int, cols: int, samples: int, seed: int = 0):
    """A random layer ``W`` (``rows x cols``, scaled like a default init) and correlated inputs ``X``
    (``samples x cols``): Gaussian inputs mixed by ``I + 0.5 G / sqrt(cols)`` and scaled per feature, so that the
    layer Hessian ``2 X^T X`` is far from diagonal (survey §3.5.5)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    X = (torch.randn(samples, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) + 0.2)
    W = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    return W, X


def naive_obs_rows(W: torch.Tensor, H: torch.Tensor, sparsity: float, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Exact greedy OBS row by row with a plain loop (:func:`sparsity_lib.obs.greedy_obs_plain`): one rank-1
    downdate of the row's ``d x d`` inverse per removal, no batching over rows, no lazy updates, survey eqs. (3)-(4)
    (Hassibi and Stork {cite}`hassibi1993second`; survey §3.5.1). The reference implementation the batched solver
    replaces (uniform allocation: every row loses ``round(sparsity * d)`` weights)."""
    rows, d = W.shape
    Hd = H + damping(H, damp) * torch.eye(d, dtype=H.dtype)
    Hinv0 = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    k = round(sparsity * d)
    return torch.stack([greedy_obs_plain(W[r], Hinv0, k)[0] for r in range(rows)])


def run(rows: int = 256, cols: int = 1024, samples: int = 2048, sparsity: float = 0.5, threads: int = 2,
        seed: int = 0, naive: bool = False, block: int = 64, memory_mb: float = 256):
    """Run the benchmark and return its rows (dicts); see the module docstring."""
    torch.set_num_threads(threads)
    W, X = correlated_layer(rows, cols, samples, seed)
    results = []

    def error(W_hat):
        return float(((X @ (W - W_hat).T) ** 2).sum())

    def timed(name, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        W_hat = fn()
        results.append({"method": name, "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
                        "error": error(W_hat), "sparsity": float((W_hat == 0).float().mean())})

    H_box = {}
    timed("H = 2 X^T X (shared by all)", lambda: (H_box.setdefault("H", layer_hessian(X)), W)[1])
    H = H_box["H"]
    k = round(sparsity * W.numel())
    keep = torch.zeros(W.numel(), dtype=torch.bool)
    keep[torch.topk(W.abs().reshape(-1), W.numel() - k).indices] = True
    timed("magnitude", lambda: W * keep.reshape(W.shape))
    if cols % 4 == 0:
        top2 = torch.topk(W.abs().reshape(rows, cols // 4, 4), 2, dim=-1).indices
        keep_24 = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, top2, True).reshape(rows, cols)
        timed("magnitude (2:4)", lambda: W * keep_24)
    timed("sparsegpt (unstructured)", lambda: sparsegpt_layer(W, H, sparsity)[0])
    if cols % 4 == 0:
        timed("sparsegpt (2:4)", lambda: sparsegpt_layer(W, H, structure=(2, 4))[0])
    timed("obc (exact greedy, batched rows, uniform rows)",
          lambda: obc_layer(W, H, sparsity, block=block, memory_mb=memory_mb, row_allocation="uniform")[0])
    timed("obc (adaptive rows, the default, as in the paper)",
          lambda: obc_layer(W, H, sparsity, block=block, memory_mb=memory_mb, row_allocation="adaptive")[0])
    if naive:
        timed("obs plain loop (one row at a time)", lambda: naive_obs_rows(W, H, sparsity))
    magnitude_error = next(r["error"] for r in results if r["method"] == "magnitude")
    for r in results:
        r["relative_error"] = r["error"] / magnitude_error
    return results


def table(results) -> str:
    """The results as a markdown table."""
    lines = ["| method | seconds | CPU seconds | error / magnitude's | sparsity |", "|---|---:|---:|---:|---:|"]
    for r in results:
        rel = "" if r["method"].startswith("H =") else f"{r['relative_error']:.3f}"
        sp = "" if r["method"].startswith("H =") else f"{r['sparsity']:.3f}"
        lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {rel} | {sp} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The options of this table; ``prefix`` (e.g. ``"layer-"``) keeps them apart in ``python -m sparsity_lib.bench``."""
    parser.add_argument(f"--{prefix}rows", type=int, default=256)
    parser.add_argument(f"--{prefix}cols", type=int, default=1024)
    parser.add_argument(f"--{prefix}samples", type=int, default=2048)
    parser.add_argument(f"--{prefix}sparsity", type=float, default=0.5)
    parser.add_argument(f"--{prefix}threads", type=int, default=2)
    parser.add_argument(f"--{prefix}seed", type=int, default=0)
    parser.add_argument(f"--{prefix}block", type=int, default=64, help="lazy downdates per flush in obc")
    parser.add_argument(f"--{prefix}memory-mb", type=float, default=256, help="memory for a chunk of row inverses in obc")
    parser.add_argument(f"--{prefix}naive", action="store_true", help="also time the plain per-row loop (slow)")


def print_table(args, prefix: str = "") -> None:
    get = lambda name: getattr(args, prefix.replace("-", "_") + name)   # noqa: E731
    results = run(get("rows"), get("cols"), get("samples"), get("sparsity"), get("threads"), get("seed"),
                  get("naive"), get("block"), get("memory_mb"))
    print(f"Layer {get('rows')} x {get('cols')}, {get('samples')} calibration inputs, sparsity {get('sparsity')}, "
          f"{get('threads')} threads, torch {torch.__version__}\n")
    print(table(results))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparsity_lib.bench.layerwise", description=__doc__.split("\n")[0])
    add_arguments(parser)
    print_table(parser.parse_args(argv))


if __name__ == "__main__":
    main()
