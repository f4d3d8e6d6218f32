"""Numbered equations and captioned figures (issue 17, DESIGN.md "Notebook conventions"), checked in the sources.

Every chapter numbers its key equations (``$$ ... $$ (eq-chNN-name)``) and captions its figures (code-cell
metadata ``mystnb.figure.name`` = ``fig-chNN-name`` and ``.caption``), and refers to each by number
(``{eq}`eq-chNN-name``` and ``{numref}`fig-chNN-name```). A label nobody refers to, a reference to a label that
does not exist (Sphinx would print "??" in the page), or a label named after another chapter is a defect.
tools/book_numbers.py then numbers them per chapter, (6.3) and Fig. 6.1; its renumbering is tested here too.
"""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
MIN_EQUATIONS = 2
MIN_FIGURES = 2

EQ_LABEL = re.compile(r"\$\$\s*\((eq-[A-Za-z0-9_-]+)\)")
EQ_REF = re.compile(r"\{eq\}`(?:[^`<]*<)?(eq-[A-Za-z0-9_-]+)>?`")
NUMREF = re.compile(r"\{numref\}`(?:[^`<]*<)?(fig-[A-Za-z0-9_-]+)>?`")


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _parts(path):
    nb = json.loads(path.read_text())
    markdown = "\n".join(_src(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    figures = [c["metadata"]["mystnb"]["figure"] for c in nb["cells"]
               if c["cell_type"] == "code" and "figure" in c.get("metadata", {}).get("mystnb", {})]
    return markdown, figures


ALL = {p.stem: _parts(p) for p in CHAPTERS}
EVERY_EQ = {lab for md, _ in ALL.values() for lab in EQ_LABEL.findall(md)}
EVERY_FIG = {f.get("name") for _, figs in ALL.values() for f in figs}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_equations_are_numbered_and_referred_to(path):
    markdown, _ = ALL[path.stem]
    prefix = f"eq-ch{path.stem[:2]}-"
    labels = EQ_LABEL.findall(markdown)
    assert len(labels) >= MIN_EQUATIONS, f"{path.name}: {len(labels)} numbered equations, want >= {MIN_EQUATIONS}"
    assert len(labels) == len(set(labels)), f"{path.name}: a label twice: {labels}"
    assert all(lab.startswith(prefix) for lab in labels), f"{path.name}: labels must start with {prefix}: {labels}"
    refs = set(EQ_REF.findall(markdown))
    assert not set(labels) - refs, f"{path.name}: equations never referred to: {sorted(set(labels) - refs)}"
    assert not refs - EVERY_EQ, f"{path.name}: references to no equation: {sorted(refs - EVERY_EQ)}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_figures_are_captioned_and_referred_to(path):
    markdown, figures = ALL[path.stem]
    prefix = f"fig-ch{path.stem[:2]}-"
    names = [f.get("name", "") for f in figures]
    assert len(names) >= MIN_FIGURES, f"{path.name}: {len(names)} captioned figures, want >= {MIN_FIGURES}"
    assert len(names) == len(set(names)), f"{path.name}: a figure name twice: {names}"
    assert all(n.startswith(prefix) for n in names), f"{path.name}: figure names must start with {prefix}: {names}"
    short = [n for f, n in zip(figures, names) if len(str(f.get("caption", "")).split()) < 5]
    assert not short, f"{path.name}: figures without a real caption (5 words at least): {short}"
    refs = set(NUMREF.findall(markdown))
    assert not set(names) - refs, f"{path.name}: figures never referred to: {sorted(set(names) - refs)}"
    assert not refs - EVERY_FIG, f"{path.name}: references to no figure: {sorted(refs - EVERY_FIG)}"


def test_per_chapter_numbers():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import book_numbers
    finally:
        sys.path.pop(0)
    table = {
        "chapters/06_second_order": {"displaymath": {"equation-b": (5,), "equation-a": (4,)}, "figure": {"f": (2,)}},
        "chapters/10_lottery_tickets": {"displaymath": {"equation-c": (7,)}},
        "book/notation": {"displaymath": {"equation-n": (1,)}},
    }
    changed = book_numbers.renumber(table)
    assert table["chapters/06_second_order"] == {"displaymath": {"equation-a": (6, 1), "equation-b": (6, 2)},
                                                 "figure": {"f": (6, 1)}}
    assert table["chapters/10_lottery_tickets"]["displaymath"] == {"equation-c": (10, 1)}
    assert table["book/notation"]["displaymath"] == {"equation-n": (1,)}
    assert sorted(changed) == ["chapters/06_second_order", "chapters/10_lottery_tickets"]
    assert book_numbers.renumber(table) == []   # already per chapter: nothing changes
