"""``python -m sparsity_lib.bench``: print every timing table of the package in one run (``make bench``).

Options are those of :mod:`sparsity_lib.bench.masked_steps` (``--steps``, ``--warmup``, ``--threads``,
``--no-chapters``) and of :mod:`sparsity_lib.bench.layerwise` prefixed with ``layer-`` (``--layer-rows``,
``--layer-naive``, ...); ``--no-layerwise`` skips the layer-wise table.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from . import layerwise, masked_steps


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsity_lib.bench", description=__doc__.split("\n")[0])
    masked_steps.add_arguments(parser)
    layerwise.add_arguments(parser, prefix="layer-")
    parser.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True,
                        help="time the layer-wise solvers (default; --no-layerwise skips them)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    print(masked_steps.header())
    masked_steps.print_tables(args)
    if args.layerwise:
        print()
        layerwise.print_table(args, prefix="layer-")


if __name__ == "__main__":
    main()
