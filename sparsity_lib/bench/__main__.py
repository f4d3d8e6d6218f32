"""``python -m sparsity_lib.bench``: print every timing table of the package in one run (``make bench``).

Options are those of :mod:`sparsity_lib.bench.masked_steps` (``--steps``, ``--warmup``, ``--threads``,
``--no-chapters``) and of :mod:`sparsity_lib.bench.layerwise` prefixed with ``layer-`` (``--layer-rows``,
``--layer-naive``, ...); ``--no-layerwise`` skips the layer-wise table and ``--no-sparse-kernels`` the sparse-product table of
:mod:`sparsity_lib.speed` (chapter 13).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from . import growth, layerwise, masked_steps
from .. import speed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsity_lib.bench", description=__doc__.split("\n")[0])
    masked_steps.add_arguments(parser)
    layerwise.add_arguments(parser, prefix="layer-")
    parser.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True,
                        help="time the layer-wise solvers (default; --no-layerwise skips them)")
    parser.add_argument("--sparse-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="time dense vs CSR/BSR/compacted layer products (chapter 13; default; "
                             "--no-sparse-kernels skips them)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    print(masked_steps.header())
    masked_steps.print_tables(args)
    if args.layerwise:
        print()
        layerwise.print_table(args, prefix="layer-")
    print()
    print(growth.table(steps=max(args.steps, 10), warmup=args.warmup))
    if args.sparse_kernels:
        print()
        print(speed.bench_table(threads=1))


if __name__ == "__main__":
    main()
