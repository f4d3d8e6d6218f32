"""Execute chapter notebooks one at a time and print each one's runtime and outcome (``make full``; the chapter
table of ``make bench`` uses :func:`run_one` too).

    SPARSITY_SCALE=full python -m sparsity_lib.bench.chapters --out _build/full            # every chapter
    SPARSITY_SCALE=full python -m sparsity_lib.bench.chapters --out _build/full 10 12      # chapters 10 and 12

The scale is whatever ``SPARSITY_SCALE`` says (``make full`` sets ``full``); the executed notebooks, outputs
included, are written to ``--out`` (also when a cell fails: the notebook then stops at the failing cell). A
chapter *passes* when every cell runs, its claim cells' asserts included; otherwise the line names the first
failing cell and its error (e.g. ``AssertionError: claim 2``). ``--timeout`` bounds one chapter's wall time.
The exit status is 0 only when every chapter passed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent.parent   # the repository (chapters/, sparsity_lib/)


def select(chapters_dir: Path, wanted: list[str]) -> list[Path]:
    """The chapter notebooks ``NN_*.ipynb``, all of them or those whose number is in ``wanted`` (``10`` or ``9``)."""
    notebooks = sorted(chapters_dir.glob("[0-9][0-9]_*.ipynb"))
    if not wanted:
        return notebooks
    by_number = {nb.name[:2]: nb for nb in notebooks}
    chosen = []
    for item in wanted:
        key = item.zfill(2) if item.isdigit() else item
        if key not in by_number:
            raise SystemExit(f"CHAPTERS: no chapter {item!r}; allowed: {' '.join(sorted(by_number))}")
        chosen.append(by_number[key])
    return chosen


def first_error(nb) -> str:
    """'cell N: Ename: value' of the first code cell whose outputs hold an error, or ''."""
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                value = str(out.get("evalue", "")).strip().splitlines()
                return f"cell {index}: {out.get('ename')}: {value[0] if value else ''}"[:160]
    return ""


def run_one(path: Path, out_dir: Path | None = None, timeout: float = 4 * 3600) -> tuple[str, float]:
    """Execute one notebook in a fresh kernel (working directory: its folder); return (outcome, seconds).

    ``outcome`` is ``"passed"``, ``"FAILED cell N: Ename: value"`` or ``"TIMEOUT after T s"``. The kernel imports
    this checkout's ``sparsity_lib`` (put first on ``PYTHONPATH``). With ``out_dir``, the executed notebook, outputs
    included, is written there (also when a cell failed).
    """
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=None, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        asyncio.run(asyncio.wait_for(client.async_execute(), timeout=timeout))
        outcome = "passed"
    except CellExecutionError:
        outcome = "FAILED " + (first_error(nb) or "a cell raised")
    except (asyncio.TimeoutError, TimeoutError, DeadKernelError):
        # past the deadline wait_for cancels the execution and the kernel is shut down; nbclient may then report
        # the kernel's death instead of the timeout
        late = time.perf_counter() - start >= timeout
        outcome = f"TIMEOUT after {timeout:.0f} s" if late else "FAILED the kernel died"
    seconds = time.perf_counter() - start
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    return outcome, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="chapter numbers (default: every chapter)")
    parser.add_argument("--out", default="_build/full", help="folder for the executed notebooks")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="wall-time limit of one chapter, seconds")
    args = parser.parse_args(argv)
    notebooks = select(ROOT / "chapters", args.chapters)
    out_dir = (ROOT / args.out) if not os.path.isabs(args.out) else Path(args.out)
    scale = os.environ.get("SPARSITY_SCALE", "fast") or "fast"
    print(f"SPARSITY_SCALE={scale}: {len(notebooks)} chapter(s), executed notebooks in {out_dir}", flush=True)
    results = []
    for path in notebooks:
        print(f"  {path.name} ...", end=" ", flush=True)
        outcome, seconds = run_one(path, out_dir, args.timeout)
        results.append((path.name, seconds, outcome))
        print(f"{seconds:7.0f} s  {outcome}", flush=True)
    width = max(len(name) for name, _, _ in results)
    print(f"\n{'chapter':{width}s}  {'runtime':>9s}  outcome")
    for name, seconds, outcome in results:
        print(f"{name:{width}s}  {seconds:7.0f} s  {outcome}")
    failed = sum(outcome != "passed" for _, _, outcome in results)
    print(f"\n{len(results) - failed} passed, {failed} failed (scale {scale})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
