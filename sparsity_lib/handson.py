"""Hands-on cells: compare a learner's function with the library's on small inputs, at once.

Every chapter has a few "your turn" cells (the learner writes the core of a method in a few lines), each followed
at once by a check cell::

    sl.handson.check(magnitude_mask, reference, cases)

``check`` calls the learner's function and the reference on every case, compares the two results (tensors
element by element, numbers to a tolerance, tuples/lists/dicts entry by entry) and prints one line per check:
``PASS`` with the number of cases, or ``FAIL`` with the first case that differed and *what* differed (the shape,
the dtype, how many entries and the first position, or the exception the learner's code raised). With
``picture=True`` it also draws a tiny before/after picture of the first case: the input, the expected output and
the learner's.

The check never raises for a wrong answer (a student edition runs from top to bottom, stubs included); it returns
a :class:`CheckResult` that is truthy only when every case passed, and records it in :data:`RESULTS`, which
``tests/test_student.py`` reads to require that the book's solutions pass and the student edition's stubs fail.

The check leaves the global random state alone: cases given as a function are built, and both functions run,
inside a forked torch / NumPy / ``random`` state, so a hands-on cell changes no number printed later in a
chapter. One source for book and student edition: see :mod:`sparsity_lib.student`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random as _random
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["check", "CheckResult", "RESULTS", "compare", "reset"]

RESULTS: List["CheckResult"] = []
"""Every :func:`check` since the last :func:`reset`, in order."""


@dataclass
class CheckResult:
    name: str
    passed: bool
    cases: int
    message: str
    not_implemented: bool = False
    failures: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:  # the cell's last value: keep the notebook output to the printed line
        return f"CheckResult({self.name!r}, passed={self.passed})"


def reset() -> None:
    """Forget the recorded results (:data:`RESULTS`)."""
    RESULTS.clear()


@contextlib.contextmanager
def _private_random_state():
    """Run a block without consuming the global torch / NumPy / ``random`` streams."""
    np_state, py_state = np.random.get_state(), _random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            _random.setstate(py_state)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape}, dtype {x.dtype}"
    return type(x).__name__


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v)


def compare(got, expected, atol: float = 1e-6, rtol: float = 1e-5, where: str = "output") -> Optional[str]:
    """``None`` when ``got`` matches ``expected``, else one sentence saying what differs and where.

    Tensors and arrays: same shape, booleans exactly equal, numbers within ``atol + rtol * |expected|``.
    Numbers: the same tolerance. Tuples/lists: same length, entry by entry. Dicts: same keys, value by value.
    Anything else: ``==``.
    """
    if isinstance(expected, np.ndarray):
        expected = torch.as_tensor(expected)
    if isinstance(got, np.ndarray):
        got = torch.as_tensor(got)
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where} should be a {_describe(expected)}, got {_describe(got)}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"{where} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if expected.dtype == torch.bool:
            if got.dtype != torch.bool:
                return f"{where} should be a bool tensor (a mask), got dtype {got.dtype}"
            wrong = got != expected
        else:
            if got.dtype == torch.bool or got.is_complex():
                return f"{where} should hold real numbers, got dtype {got.dtype}"
            g, e = got.detach().double().cpu(), expected.detach().double().cpu()
            wrong = ~torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
        count = int(wrong.sum())
        if not count:
            return None
        first = tuple(int(i) for i in torch.nonzero(wrong)[0]) if wrong.dim() else ()
        gv, ev = got.detach()[first].item(), expected.detach()[first].item()
        return (f"{where} differs at {count} of {wrong.numel()} entries; first at index {first}: "
                f"got {_fmt(gv)}, expected {_fmt(ev)}")
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{where} should be a dict with keys {sorted(expected)}, got {_describe(got)}"
        if set(got) != set(expected):
            return f"{where} has keys {sorted(got)}, expected {sorted(expected)}"
        for k in expected:
            msg = compare(got[k], expected[k], atol, rtol, f"{where}[{k!r}]")
            if msg:
                return msg
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{where} should be a sequence of {len(expected)} items, got {_describe(got)}" + (
                f" of {len(got)}" if isinstance(got, (tuple, list)) else "")
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = compare(g, e, atol, rtol, f"{where}[{i}]")
            if msg:
                return msg
        return None
    if isinstance(expected, (bool, np.bool_)):
        return None if got == expected else f"{where} is {got!r}, expected {expected!r}"
    if isinstance(expected, (int, float, np.number)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float, np.number)) or isinstance(got, bool):
            return f"{where} should be a number, got {_describe(got)}"
        if math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol):
            return None
        return f"{where} is {_fmt(float(got))}, expected {_fmt(float(expected))}"
    return None if got == expected else f"{where} is {got!r}, expected {expected!r}"


def _call(fn, case):
    case = copy.deepcopy(case)  # a function that changes its inputs in place must not change the other's
    if isinstance(case, dict):
        return fn(**case)
    if isinstance(case, tuple):
        return fn(*case)
    return fn(case)


def _show_case(case_text: str) -> str:
    return case_text if len(case_text) <= 160 else case_text[:157] + "..."


def _picture(name, before, expected, got):
    import matplotlib.pyplot as plt

    panels = [("before", before), ("expected", expected)] + ([("yours", got)] if got is not None else [])
    panels = [(t, torch.as_tensor(v).detach().double().cpu()) for t, v in panels
              if isinstance(v, (torch.Tensor, np.ndarray)) and np.ndim(v) == 2]
    if len(panels) < 2:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 1.9))
    for ax, (title, v) in zip(np.atleast_1d(axes), panels):
        if title == "before" and v.dtype != torch.bool:
            ax.imshow(v.abs().numpy(), cmap="Greys")
        else:
            ax.imshow((v != 0).double().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(name, fontsize=9)
    if fig.get_layout_engine() is None:   # sl.viz.style() already gives every figure a constrained layout
        fig.tight_layout()
    plt.show()
    plt.close(fig)


def check(fn: Callable, reference: Callable, cases: Union[Sequence[Any], Callable[[], Sequence[Any]]], *,
          name: Optional[str] = None, atol: float = 1e-6, rtol: float = 1e-5, picture: bool = False) -> CheckResult:
    """Compare ``fn`` with ``reference`` on every case; print PASS or FAIL with what differed.

    ``cases``: a list of cases, or a function without arguments returning one (called inside a private random
    state, so it may draw random tensors freely). A case is a tuple of positional arguments, a dict of keyword
    arguments, or a single argument. Both functions get their own deep copy of each case. ``picture=True`` draws
    the first case's first argument, the expected and the learner's output (when they are 2-D: masks, matrices).

    Returns a :class:`CheckResult` (truthy when every case passed) and appends it to :data:`RESULTS`.
    A ``NotImplementedError`` from ``fn`` (the student edition's stub) is reported as "not implemented yet".
    """
    if not callable(fn) or not callable(reference):
        raise TypeError("check(fn, reference, cases): fn and reference must be callables")
    name = name or getattr(fn, "__name__", "your function")
    failures: List[str] = []
    not_implemented = False
    first = None
    with _private_random_state():
        case_list = list(cases() if callable(cases) else cases)
        if not case_list:
            raise ValueError("check: cases is empty; give at least one case")
        for i, case in enumerate(case_list, 1):
            expected = _call(reference, case)
            try:
                got = _call(fn, case)
            except NotImplementedError as e:
                not_implemented = True
                failures.append(f"not implemented yet ({e})")
                first = first or (case, expected, None)
                break
            except Exception as e:  # the learner's error, reported with the case that caused it
                failures.append(f"case {i} raised {type(e).__name__}: {e}")
                first = first or (case, expected, None)
                continue
            msg = compare(got, expected, atol, rtol)
            if msg:
                failures.append(f"case {i}: {msg}")
                first = first or (case, expected, got)
        if first is None:
            first = (case_list[0], _call(reference, case_list[0]), _call(fn, case_list[0]))
    n = len(case_list)
    if failures:
        extra = f" (and {len(failures) - 1} more failing case{'s' * (len(failures) > 2)})" if len(failures) > 1 else ""
        message = f"FAIL {name}: {failures[0]}{extra}"
    else:
        message = f"PASS {name}: matches the library on all {n} cases"
    print(message)
    if failures and not not_implemented:
        case = first[0]
        print(f"     the first failing case was called with: {_show_case(repr(case))}")
    if picture:
        case, expected, got = first
        before = case[0] if isinstance(case, tuple) else (next(iter(case.values())) if isinstance(case, dict) else case)
        _picture(name, before, expected, got)
    result = CheckResult(name, not failures, n, message, not_implemented, failures)
    RESULTS.append(result)
    return result
