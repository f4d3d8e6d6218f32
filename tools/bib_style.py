"""The bibliography style of the book: the references page labels and sorts its entries the way the chapters cite
them (author-year, ``bibtex_reference_style: author_year``), e.g. ``[Hoefler et al., 2021]``, sorted as the
labels read (first author's last name, year), then by title, instead of numbering them [1]-[N].

``bibtex_default_style: authoryear`` in ``_config.yml`` selects it; :func:`register` (called by the book's local
extension ``tools/book_static.py``) makes it known to pybtex, the engine of sphinxcontrib-bibtex 2.x. The entries
themselves are formatted as pybtex's ``plain`` style formats them.
"""
from __future__ import annotations

from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting import BaseSortingStyle

NAME = "authoryear"


def _last_name(person) -> str:
    return " ".join(Text.from_latex(part).render_as("text") for part in person.prelast_names + person.last_names)


class AuthorYearLabelStyle(BaseLabelStyle):
    """"Hoefler et al., 2021", "Frankle and Carbin, 2019", "LeCun, 1989"; "a", "b" after the year tell apart
    two works of the same authors and year (as the in-text citations of those works read the same)."""

    def format_label(self, entry) -> str:
        persons = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_last_name(p) for p in persons]
        if not names:
            who = entry.fields.get("organization") or entry.fields.get("title", entry.key).split(":")[0]
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        year = entry.fields.get("year", "n.d.")
        return f"{who}, {year}"

    def format_labels(self, sorted_entries):
        labels = [self.format_label(entry) for entry in sorted_entries]
        count, seen = Counter(labels), Counter()
        for label in labels:
            if count[label] == 1:
                yield label
            else:
                yield label + chr(ord("a") + seen[label])
                seen[label] += 1


class AuthorYearSortingStyle(BaseSortingStyle):
    """Sorted as the labels read (first author, "and" / "et al.", year), then by title: two works labelled
    "Molchanov et al., 2017" sit together as 2017a and 2017b, before "Molchanov et al., 2019"."""

    def sorting_key(self, entry):
        return (AuthorYearLabelStyle().format_label(entry).lower(), entry.fields.get("title", "").lower())


class AuthorYearStyle(PlainStyle):
    """pybtex's ``plain`` entries, labelled author-year and sorted by label, then title."""

    default_label_style = AuthorYearLabelStyle
    default_sorting_style = AuthorYearSortingStyle


def register() -> None:
    """Make ``bibtex_default_style: authoryear`` known to pybtex (idempotent)."""
    try:
        register_plugin("pybtex.style.formatting", NAME, AuthorYearStyle)
    except Exception:   # noqa: BLE001  already registered (a second build in the same process)
        pass
