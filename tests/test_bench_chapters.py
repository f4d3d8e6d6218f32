"""sparsity_lib.bench.chapters (``make full``, and the chapter table of ``make bench``): outcome lines on two tiny
notebooks, one that passes and one whose claim cell fails, and the choice of chapters by number."""

import nbformat
import pytest

from sparsity_lib.bench import chapters


def notebook(path, source):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)
    return path


def test_run_one_reports_passed_and_the_first_failing_cell(tmp_path):
    ok = notebook(tmp_path / "01_ok.ipynb", "import sparsity_lib\nx = 1")
    bad = notebook(tmp_path / "02_bad.ipynb", "assert False, 'claim 2'")
    outcome, seconds = chapters.run_one(ok, tmp_path / "out")
    assert outcome == "passed" and seconds > 0
    assert (tmp_path / "out" / "01_ok.ipynb").exists()          # the executed notebook is kept
    outcome, _ = chapters.run_one(bad)
    assert outcome == "FAILED cell 0: AssertionError: claim 2"


def test_select_by_number_and_refuses_an_unknown_chapter(tmp_path):
    for name in ("01_a", "10_b"):
        notebook(tmp_path / f"{name}.ipynb", "")
    assert [p.name for p in chapters.select(tmp_path, ["10"])] == ["10_b.ipynb"]
    assert len(chapters.select(tmp_path, [])) == 2
    with pytest.raises(SystemExit, match="no chapter '7'"):
        chapters.select(tmp_path, ["7"])
