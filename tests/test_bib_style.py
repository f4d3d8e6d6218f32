"""The references page reads like the chapters' citations: author-year labels, sorted by author, each arXiv id once,
and every entry of book/references.bib parses and formats with pybtex (the engine of sphinxcontrib-bibtex)."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pybtex = pytest.importorskip("pybtex")
sys.path.insert(0, str(ROOT / "tools"))
import bib_style  # noqa: E402

from pybtex.database import parse_file  # noqa: E402
from pybtex.plugin import find_plugin  # noqa: E402


@pytest.fixture(scope="module")
def formatted():
    bib_style.register()
    bib_style.register()   # a second build in the same process registers again: harmless
    style = find_plugin("pybtex.style.formatting", bib_style.NAME)()
    data = parse_file(str(ROOT / "book" / "references.bib"))
    return data, list(style.format_bibliography(data))


def test_labels_are_author_year_and_unique(formatted):
    data, entries = formatted
    labels = {e.key: e.label for e in entries}
    assert labels["hoefler2021sparsity"] == "Hoefler et al., 2021"
    assert labels["gale2019state"] == "Gale et al., 2019"
    assert len(set(labels.values())) == len(labels) == len(data.entries)
    assert all(re.fullmatch(r".+, (\d{4}|n\.d\.)[a-z]?", label) for label in labels.values())


def test_two_authors_and_same_author_year_are_told_apart():
    style = bib_style.AuthorYearLabelStyle()
    from pybtex.database import Entry, Person

    def entry(*authors, year="2019"):
        e = Entry("article", fields={"title": "t", "year": year})
        e.persons["author"] = [Person(a) for a in authors]
        return e

    assert style.format_label(entry("Frankle, Jonathan", "Carbin, Michael")) == "Frankle and Carbin, 2019"
    assert style.format_label(entry("M{\\\"u}ller, Anna", year="2001")) == "Müller, 2001"
    assert list(style.format_labels([entry("Han, Song", "Mao, Huizi", "Dally, William"),
                                     entry("Han, Song", "Pool, Jeff", "Dally, William")])) == \
        ["Han et al., 2019a", "Han et al., 2019b"]


def test_sorted_by_first_author(formatted):
    _, entries = formatted
    firsts = [e.label.split(",")[0].split(" ")[0].lower() for e in entries]
    assert firsts == sorted(firsts)


def test_no_raw_math_and_each_arxiv_id_once(formatted):
    _, entries = formatted
    for e in entries:
        text = e.text.render_as("text")
        assert "$" not in text, (e.key, text)
        for arxiv_id in set(re.findall(r"\d{4}\.\d{4,5}", text)):
            assert text.count(arxiv_id) == 1, (e.key, text)


def test_same_label_works_sit_together_in_year_order(formatted):
    _, entries = formatted
    labels = [e.label for e in entries]
    for label in labels:
        if label.endswith("a") and label[:-1] + "b" in labels:
            assert labels.index(label[:-1] + "b") == labels.index(label) + 1, labels
    stems = [label.rstrip("ab") for label in labels]
    assert stems == sorted(stems, key=str.lower)
