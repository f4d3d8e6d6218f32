"""Sphinx extension of the book (``_config.yml``: ``sphinx.local_extensions``): the API page (``book/api.md``) reads
the library's Google-style docstrings through ``sphinx.ext.napoleon``, except for module-level data, class
attributes and properties.

napoleon turns "Arguments:" / "Returns:" sections into field lists, which is what function and class docstrings
need. On the ``#:`` comment of a constant it reads a first line "text: more text" as "type: description", and the
library's constants are documented in prose ("Exact OBS stores and inverts a d x d matrix: above this many ...").
So the docstring lines of data and attributes are saved before napoleon runs (priority 400) and put back after
it (priority 600).
"""
from __future__ import annotations

_SAVED = {}
_VERBATIM = ("data", "attribute", "property")


def _save(app, what, name, obj, options, lines):
    if what in _VERBATIM:
        _SAVED[name] = list(lines)


def _restore(app, what, name, obj, options, lines):
    if what in _VERBATIM and name in _SAVED:
        lines[:] = _SAVED.pop(name)


def setup(app):
    app.connect("autodoc-process-docstring", _save, priority=400)     # napoleon runs at the default 500
    app.connect("autodoc-process-docstring", _restore, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
