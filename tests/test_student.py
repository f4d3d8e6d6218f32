"""The student edition (``make student``, sparsity_lib/student.py) and the hands-on checks (sparsity_lib/handson.py).

For every chapter with hands-on cells, the book's solutions must pass their checks and the student edition's stubs
must fail them. Only the chapter's first code cell (imports, sl.config) and its hands-on cells (tagged ``solution``
and ``check``) are executed, in one namespace, so this stays fast.
"""
import json
from pathlib import Path

import pytest
import torch

import sparsity_lib as sl
from sparsity_lib import handson, student

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def _cells(nb):
    return [c for c in nb["cells"]]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def _hands_on(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code" and {"solution", "check"} & set(_tags(c))]


def _run_hands_on(nb, monkeypatch, tmp_path):
    """Execute the first code cell and the hands-on cells; return the check results, in order."""
    import matplotlib
    import matplotlib.pyplot
    matplotlib.use("Agg")
    monkeypatch.chdir(ROOT / "chapters")
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    ns = {"__name__": "__main__"}
    handson.reset()
    threads = torch.get_num_threads()
    # the chapter's first cell sets seeds, threads and the figure style: keep them from leaking into other tests
    with matplotlib.rc_context(), torch.random.fork_rng(devices=[]):
        try:
            for cell in [first] + _hands_on(nb):
                code = "\n".join(line for line in _src(cell).split("\n") if not line.lstrip().startswith(("%", "!")))
                exec(compile(code, "<cell>", "exec"), ns)
        finally:
            torch.set_num_threads(threads)
            matplotlib.pyplot.close("all")
    return list(handson.RESULTS)


WITH_HANDS_ON = [p for p in CHAPTERS if any("solution" in _tags(c) for c in json.loads(p.read_text())["cells"])]


# Hands-on cells each chapter must have (issue 17: two to four "your turn" cells per chapter).
MIN_HANDS_ON = 2


def test_every_chapter_has_hands_on_cells():
    assert len(CHAPTERS) >= 14, [p.name for p in CHAPTERS]
    short = {}
    for path in CHAPTERS:
        solutions = [c for c in json.loads(path.read_text())["cells"] if "solution" in _tags(c)]
        want = MIN_HANDS_ON
        if len(solutions) < want:
            short[path.name] = f"{len(solutions)} hands-on cells, want >= {want}"
    assert not short, short


@pytest.mark.parametrize("path", WITH_HANDS_ON, ids=lambda p: p.stem)
def test_book_solutions_pass_and_student_stubs_fail(path, monkeypatch, tmp_path):
    nb = json.loads(path.read_text())
    solutions = [c for c in nb["cells"] if "solution" in _tags(c)]
    checks = [c for c in nb["cells"] if "check" in _tags(c)]
    assert len(checks) >= len(solutions) >= 1
    # every solution cell is followed at once by its check
    cells = nb["cells"]
    for c in solutions:
        i = cells.index(c)
        assert "check" in _tags(cells[i + 1]) or "solution" in _tags(cells[i + 1]), f"{path.name}: no check after a solution"

    book = _run_hands_on(nb, monkeypatch, tmp_path)
    assert len(book) == len(checks)
    assert all(r.passed for r in book), [r.message for r in book if not r.passed]

    stud = student.student_notebook(nb, path.name)
    text = json.dumps(stud)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    assert "{solution}" not in text, "a prose exercise's solution survived"
    assert text.count("your turn: ") >= len(solutions)
    results = _run_hands_on(stud, monkeypatch, tmp_path)
    assert len(results) == len(checks)
    assert not any(r.passed for r in results), [r.message for r in results if r.passed]
    assert all(r.not_implemented for r in results)
    # the exercises stay, only their solutions go
    assert text.count("{exercise}") == json.dumps(nb).count("{exercise}")


def test_make_student_writes_every_chapter(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    written = student.make_student(out=str(tmp_path / "student"))
    assert sorted(p.name for p in written) == sorted(p.name for p in CHAPTERS)
    for p in written:
        nb = json.loads(p.read_text())
        assert nb["cells"][0]["metadata"]["tags"] == ["student-note"]
        assert all(c.get("outputs", []) == [] for c in nb["cells"] if c["cell_type"] == "code")


def test_stub_source_replaces_the_marked_region_and_keeps_the_rest():
    src = ("def f(x):\n    '''doc'''\n    # BEGIN SOLUTION double it\n    y = 2 * x\n    return y\n"
           "    # END SOLUTION\n\nprint('kept')")
    out = student.stub_source(src)
    assert out == ("def f(x):\n    '''doc'''\n    raise NotImplementedError(\"your turn: double it\")\n\nprint('kept')")
    assert "write the body of g()" in student.stub_source("def g():\n    # BEGIN SOLUTION\n    pass\n    # END SOLUTION")


@pytest.mark.parametrize("bad, words", [
    ("def f():\n    return 1", "must mark"),
    ("def f():\n    # BEGIN SOLUTION\n    return 1", "no '# END SOLUTION'"),
    ("def f():\n    # END SOLUTION", "without a '# BEGIN SOLUTION'"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION", "inside another"),
])
def test_stub_source_refuses_bad_markers(bad, words):
    with pytest.raises(ValueError, match=words):
        student.stub_source(bad)


def test_markers_outside_a_solution_cell_are_refused():
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": "# BEGIN SOLUTION\nx = 1\n# END SOLUTION",
                     "outputs": [], "execution_count": None}], "metadata": {}}
    with pytest.raises(ValueError, match="not tagged 'solution'"):
        student.student_notebook(nb)


def test_strip_solutions_both_fences_and_nested_code():
    md = ("## Exercises\n\n:::{exercise}\n:label: a\nDo it.\n:::\n\n:::{solution} a\n:class: dropdown\n"
          "```python\nprint(1)\n```\n:::\n\n```{solution} b\nsecret\n```\nafter")
    out = student.strip_solutions(md)
    assert "secret" not in out and "print(1)" not in out and "{solution}" not in out
    assert ":::{exercise}" in out and "Do it." in out and out.endswith("after")
    with pytest.raises(ValueError, match="never closed"):
        student.strip_solutions(":::{solution} a\nopen")


def test_check_reports_what_differed(capsys):
    ref = lambda W: W.abs() > 1  # noqa: E731
    ok = handson.check(lambda W: W.abs() > 1, ref, [(torch.tensor([[0.5, 2.0], [-3.0, 0.1]]),)], name="ok")
    assert ok and "PASS ok" in capsys.readouterr().out
    bad = handson.check(lambda W: W > 1, ref, [(torch.tensor([[0.5, 2.0], [-3.0, 0.1]]),)], name="bad")
    out = capsys.readouterr().out
    assert not bad and "FAIL bad" in out and "1 of 4 entries" in out and "(1, 0)" in out
    shape = handson.check(lambda W: W[0] > 1, ref, [(torch.ones(2, 2),)], name="shape")
    assert not shape and "shape (2,), expected (2, 2)" in capsys.readouterr().out
    boom = handson.check(lambda W: 1 / 0, ref, [(torch.ones(2, 2),)], name="boom")
    assert not boom and "ZeroDivisionError" in capsys.readouterr().out

    def stub(W):
        raise NotImplementedError("your turn: x")
    todo = handson.check(stub, ref, [(torch.ones(2, 2),)])
    assert not todo and todo.not_implemented and "not implemented yet" in capsys.readouterr().out
    num = handson.check(lambda a: a + 1e-3, lambda a: a, [1.0], name="num")
    assert not num and "expected 1" in capsys.readouterr().out
    assert handson.compare({"a": (1, torch.zeros(2))}, {"a": (1, torch.zeros(2))}) is None
    assert "keys" in handson.compare({"b": 1}, {"a": 1})


def test_check_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    handson.check(lambda x: x, lambda x: x, lambda: [(torch.randn(5),), (torch.randn(5),)])
    assert torch.equal(torch.rand(3), expected)


def test_check_does_not_let_one_function_see_the_others_changes():
    def inplace(t):
        t.zero_()
        return t
    r = handson.check(lambda t: t.clone(), inplace, [(torch.ones(3),)])
    assert not r  # the reference zeroed its own copy only; the learner's copy is still ones


def test_picture_draws_before_expected_yours(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(len(plt.gcf().axes)))
    handson.check(lambda W: W.abs() > 0.5, lambda W: W.abs() > 0.5, [(torch.randn(4, 4),)], picture=True)
    assert shown == [3]
