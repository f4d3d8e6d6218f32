"""Sphinx extension of the book (``_config.yml``: ``sphinx.local_extensions``): equations and figures of a chapter
are numbered *within the chapter*, d2l-style: the third numbered equation of chapter 06 is (6.3) and its first
captioned figure is "Fig. 6.1", in the page and in every ``{eq}`` / ``{numref}`` that points at them.

Sphinx numbers them through the whole book when the table of contents is not numbered (it is not: chapters carry
their numbers in their file names and titles, see ``_toc.yml``), so chapter 10's first equation would read (43).
Sphinx keeps every number in ``env.toc_fignumbers[docname][figtype][node_id]`` (a tuple, joined with dots when
written); after its own ``TocTreeCollector`` filled that table on ``env-get-updated``, this extension replaces the
numbers of every ``chapters/NN_*`` page by ``(NN, k)``, k counting each figure type (``displaymath``, ``figure``,
``table``, ``code-block``) from 1 in page order. Pages outside ``chapters/`` keep Sphinx's numbers.
"""
from __future__ import annotations

import re

CHAPTER = re.compile(r"^chapters/(\d+)_")


def chapter_number(docname: str) -> int | None:
    """The chapter number of a page (``chapters/06_second_order`` -> 6), None for other pages."""
    match = CHAPTER.match(docname)
    return int(match.group(1)) if match else None


def renumber(toc_fignumbers: dict) -> list[str]:
    """Rewrite ``toc_fignumbers`` in place to per-chapter numbers; return the pages whose numbers changed."""
    changed = []
    for docname, by_type in toc_fignumbers.items():
        chapter = chapter_number(docname)
        if chapter is None:
            continue
        before = {figtype: dict(numbers) for figtype, numbers in by_type.items()}
        for figtype, numbers in by_type.items():
            # Sphinx assigned increasing numbers in page order, so sorting by them keeps the page order
            in_order = sorted(numbers, key=lambda node_id: numbers[node_id])
            for k, node_id in enumerate(in_order, start=1):
                numbers[node_id] = (chapter, k)
        if by_type != before:
            changed.append(docname)
    return changed


def _on_env_get_updated(app, env):
    return renumber(env.toc_fignumbers)


def setup(app):
    # priority 900: after Sphinx's own TocTreeCollector (500), which rebuilds toc_fignumbers from scratch
    app.connect("env-get-updated", _on_env_get_updated, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
