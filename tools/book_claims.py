"""Sphinx extension of the book (``_config.yml``: ``sphinx.local_extensions``): the page "What held at toy scale"
(``book/claims.md``) is generated from the chapters' claim cells during the build, never written by hand.

* ``builder-inited``: a fresh folder ``<build>/claims/`` is named in ``SPARSITY_CLAIMS_DIR``; every executing
  notebook kernel inherits the environment, and each :func:`sparsity_lib.claims.check` appends one JSON line there.
* ``env-get-outdated``: the claims page is re-read on every build (its content comes from the chapters).
* ``doctree-resolved``: after every chapter was read (and executed), the ``{claims-table}`` directive of the page
  is replaced by a summary count and one table: chapter (linked), the literature's statement and source, our
  measured numbers, verdict.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive

ENV_VAR = "SPARSITY_CLAIMS_DIR"   # the same name as sparsity_lib.claims.ENV_VAR (tools/ does not import the library)
VERDICTS = ("held", "held weakly", "did not hold")
PAGE = "book/claims"


class claims_table(nodes.General, nodes.Element):
    """Placeholder that ``doctree-resolved`` replaces by the table."""


class ClaimsTableDirective(Directive):
    has_content = False

    def run(self):
        return [claims_table("")]


def read_records(folder) -> list[dict]:
    """Every claim recorded under ``folder`` (one ``<chapter>.jsonl`` per chapter), in chapter order."""
    records = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def _para(*children) -> nodes.paragraph:
    return nodes.paragraph("", "", *children)


def build_table(records: list[dict], chapter_link=None, chapter_title=None) -> list[nodes.Node]:
    """A summary paragraph and a table of ``records``. ``chapter_link(stem)`` gives the URI of a chapter (None: no
    link), ``chapter_title(stem)`` its title (None: the stem)."""
    counts = Counter(r["verdict"] for r in records)
    summary = _para(nodes.Text(f"{len(records)} claims: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)
                               + "."))
    table = nodes.table(classes=["sl-claims"])
    group = nodes.tgroup(cols=4)
    table += group
    for width in (14, 40, 30, 10):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    row = nodes.row()
    for text in ("chapter", "the literature says (source)", "measured here", "verdict"):
        row += nodes.entry("", _para(nodes.Text(text)))
    head += row
    group += head
    body = nodes.tbody()
    for r in records:
        stem = r["chapter"]
        title = (chapter_title(stem) if chapter_title else None) or stem
        uri = chapter_link(stem) if chapter_link else None
        chapter = nodes.reference("", title, refuri=uri, internal=True) if uri else nodes.Text(title)
        statement = _para(nodes.strong("", r["key"]), nodes.Text(": " + r["literature"] + " "),
                          nodes.emphasis("", "(" + r["source"] + ")"))
        measured = nodes.bullet_list()
        for name, value in r["measured"].items():
            measured += nodes.list_item("", _para(nodes.Text(f"{name}: "), nodes.literal("", value)))
        cell = [measured]
        if r.get("note"):
            cell.append(_para(nodes.Text(r["note"])))
        row = nodes.row()
        row += nodes.entry("", _para(chapter))
        row += nodes.entry("", statement)
        row += nodes.entry("", *cell)
        row += nodes.entry("", _para(nodes.Text(r["verdict"] + ("" if r.get("asserted") else " (not asserted)"))))
        body += row
    group += body
    if not records:
        return [summary, _para(nodes.Text("No claim was recorded in this build."))]
    return [summary, table]


def _builder_inited(app) -> None:
    folder = Path(app.outdir).parent / "claims"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.environ[ENV_VAR] = str(folder)
    app.config._sl_claims_dir = str(folder)   # noqa: SLF001 (read back at doctree-resolved)


def _outdated(app, env, added, changed, removed):
    return [PAGE] if PAGE in env.found_docs else []


def _doctree_resolved(app, doctree, docname) -> None:
    placeholders = list(doctree.findall(claims_table))
    if not placeholders:
        return
    records = read_records(os.environ.get(ENV_VAR, ""))

    def link(stem):
        target = f"chapters/{stem}"
        if target not in app.env.found_docs:
            return None
        return app.builder.get_relative_uri(docname, target)

    def title(stem):
        t = app.env.titles.get(f"chapters/{stem}")
        return t.astext().split(":")[0] if t is not None else None   # "01. Foundations", not the subtitle

    for node in placeholders:
        node.replace_self(build_table(records, link, title))


def setup(app):
    app.add_node(claims_table)
    app.add_directive("claims-table", ClaimsTableDirective)
    app.connect("builder-inited", _builder_inited)
    app.connect("env-get-outdated", _outdated)
    app.connect("doctree-resolved", _doctree_resolved)
    # parallel reading is safe: worker processes inherit the environment, and each chapter appends to its own file
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
