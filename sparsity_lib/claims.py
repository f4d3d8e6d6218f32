"""Claim cells: check a literature claim against the chapter's measurements, print the numbers the prose quotes as
a short table, and record the claim for the book's page "What held at toy scale" (``book/claims.md``).

One call per claim::

    sl.claims.check(
        chapter="04_layer_budgets", key="global beats uniform at 98%",
        literature="Global magnitude pruning beats uniform layer-wise pruning at high sparsity",
        source="Hoefler et al. (2021) §3.9; Gale et al. (2019)",
        measured={"gap at 98% (global - uniform)": gap98},      # numbers, or one number per seed
        holds=bool((gap98 > 0.03).all()),                        # the condition the chapter asserts, margin included
    )

* ``verdict`` is one of :data:`VERDICTS`: "held" (the default), "held weakly" or "did not hold".
* ``holds`` is the asserted condition. For "held" and "held weakly" it must be a bool and an ``AssertionError``
  is raised when it is False, so a claim cell fails exactly as a plain ``assert`` would. A claim that "did not
  hold" at toy scale is shown and recorded, not asserted: ``holds`` may then be None, or a bool the chapter does
  assert about what it measured instead (e.g. "the ticket is no better than random re-initialization").
* Numbers are printed rounded to 4 significant digits (never ``0.020000000000000004``); a per-seed array is
  summarised as ``mean ± sd  [min, max]  (n seeds)`` (3 significant digits, 2 for the sd), never dumped.
* When the environment variable :data:`ENV_VAR` (``SPARSITY_CLAIMS_DIR``) names a folder, the claim is appended
  as one JSON line to ``<folder>/<chapter>.jsonl``; the book's Sphinx extension ``tools/book_claims.py`` sets it
  for the executing kernels and builds the claims page from those lines. Unset, nothing is written.
"""
from __future__ import annotations

import json
import math
import os
import re
from numbers import Number
from pathlib import Path

import numpy as np

ENV_VAR = "SPARSITY_CLAIMS_DIR"
VERDICTS = ("held", "held weakly", "did not hold")
_CHAPTER = re.compile(r"^\d\d_[a-z0-9_]+$")

__all__ = ["ENV_VAR", "VERDICTS", "check", "fmt", "summarize"]


def fmt(x, digits: int = 4) -> str:
    """One number, rounded for reading: integers as they are, floats to ``digits`` significant digits."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}" if abs(int(x)) >= 10_000 else str(int(x))
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e4 <= abs(x) < 1e9:
        return f"{x:,.0f}"
    if abs(x) < 1e-3 or abs(x) >= 1e9:
        return f"{x:.{min(digits, 3)}g}"
    return f"{x:.{digits}g}"


def _values(value, name: str) -> np.ndarray | None:
    """A scalar or per-seed sequence as a flat float array; None for a string."""
    if isinstance(value, str):
        return None
    if hasattr(value, "detach"):   # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):
        raise TypeError(f"measured[{name!r}] must be a number, a sequence of numbers (one per seed) or a string, "
                        f"got {type(value).__name__}") from None
    if arr.size == 0:
        raise ValueError(f"measured[{name!r}] is empty: give a number or one number per seed")
    return arr


def summarize(value) -> str:
    """A number as :func:`fmt`; a per-seed sequence as ``mean ± sd  [min, max]  (n seeds)``; a string unchanged."""
    if isinstance(value, str):
        return value
    arr = _values(value, "value")
    if arr.size == 1 and np.ndim(value) == 0:
        return fmt(value if isinstance(value, (int, np.integer, bool, np.bool_)) else arr[0])
    if arr.size == 1:
        return f"{fmt(arr[0])}  (1 seed)"
    mean, sd = float(arr.mean()), float(arr.std(ddof=1))
    what = "seeds" if np.ndim(value) <= 1 else "values"   # a (seeds, x) array: every value counts once
    # three significant digits for the mean and the range, two for the spread: what seed-to-seed noise allows
    return f"{fmt(mean, 3)} ± {fmt(sd, 2)}  [{fmt(arr.min(), 3)}, {fmt(arr.max(), 3)}]  ({arr.size} {what})"


def check(chapter: str, key: str, literature: str, source: str, measured: dict, holds: bool | None = None,
          verdict: str = "held", note: str = "") -> dict:
    """Check one claim of a chapter: print its numbers, record it (see the module docstring), assert it.

    ``chapter`` is the notebook's stem ("04_layer_budgets"), ``key`` a short unique name of the claim within the
    chapter, ``literature`` the statement as the literature makes it, ``source`` where (paper and survey section),
    ``measured`` ``{name: number | per-seed sequence | string}`` (the numbers the prose quotes), ``holds`` the
    asserted condition, ``verdict`` one of :data:`VERDICTS`, ``note`` an optional sentence on the toy-scale result.
    Returns the record (a dict). Raises ``AssertionError`` when an asserted claim does not hold.
    """
    if not isinstance(chapter, str) or not _CHAPTER.match(chapter):
        raise ValueError(f"chapter must be a notebook stem like '04_layer_budgets', got {chapter!r}")
    for arg, val in (("key", key), ("literature", literature), ("source", source)):
        if not isinstance(val, str) or not val.strip():
            raise ValueError(f"{arg} must be a non-empty string, got {val!r}")
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if not isinstance(measured, dict) or not measured:
        raise ValueError("measured must be a non-empty dict {name: number, per-seed sequence or string}")
    if holds is not None and not isinstance(holds, (bool, np.bool_)):
        raise TypeError(f"holds must be a bool (the asserted condition) or None, got {type(holds).__name__}; "
                        "reduce an array with .all() or .any() first")
    if holds is None and verdict != "did not hold":
        raise ValueError(f"holds is required for a claim with verdict {verdict!r}: a claim that held is asserted")
    for name, value in measured.items():
        _values(value, str(name))   # refuse what is not a number, a sequence of numbers or a string
    rows = {str(name): summarize(value) for name, value in measured.items()}

    width = max(len(n) for n in rows)
    lines = [f"claim {key!r} ({verdict})"] + [f"  {n:<{width}}  {v}" for n, v in rows.items()]
    print("\n".join(lines))

    record = {"chapter": chapter, "key": key, "literature": literature, "source": source, "measured": rows,
              "verdict": verdict, "asserted": holds is not None, "note": note}
    if holds is not None and not bool(holds):
        shown = "; ".join(f"{n} = {v}" for n, v in rows.items())
        raise AssertionError(f"claim {key!r} of chapter {chapter} does not hold: {literature} ({shown})")
    folder = os.environ.get(ENV_VAR)
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / f"{chapter}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return record
