"""Sphinx extension of the book (``_config.yml``: ``sphinx.local_extensions``): every script the pages need is
served from the book's own ``_static/``, so a reader with no network (a page opened from disk, a classroom behind a
firewall) sees typeset equations and working kernel-free explorers, and no page loads anything from a CDN.

* MathJax 3 comes from the PyPI package ``django-static-mathjax`` (MathJax's own ``es5`` build, Apache-2.0) and is
  copied into ``_static/vendor/mathjax/``; ``mathjax_path`` points there.
* plotly.js comes from the ``plotly`` package (MIT) and is copied to ``_static/vendor/plotly.min.js`` once; only the
  pages that contain a :func:`sparsity_lib.widgets.static_explorer` figure load it.
* ``tools/book.css``, the book's own style (code, outputs, tables and equations that fit the text column), is
  copied to ``_static/book.css`` and loaded by every page.
* The references page is labelled and sorted author-year like the chapters' citations (``tools/bib_style.py``,
  ``bibtex_default_style: authoryear``).
* Two console errors of every page are removed at the source: sphinx-thebe's script (Thebe is off in this book,
  yet its loader is still added and points to a CDN) and the theme's empty default colour mode.

The copies are generated at build time from the installed packages: nothing vendored is committed.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

MATHJAX_DIR = "vendor/mathjax"
MATHJAX_ENTRY = f"{MATHJAX_DIR}/tex-chtml.js"
PLOTLY_JS = "vendor/plotly.min.js"
BOOK_CSS = "book.css"
# MathJax's es5 folder also holds a dozen alternative all-in-one bundles (SVG output, MathML input, ...): only the
# one the book loads is copied, with the components it may load on demand (extensions, fonts, menu, speech).
MATHJAX_PARTS = ["tex-chtml.js", "input", "output", "ui", "a11y", "adaptors", "sre"]


def _mathjax_source() -> Path:
    import mathjax  # the django-static-mathjax package

    source = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (source / "tex-chtml.js").is_file():
        raise FileNotFoundError(f"MathJax's es5 build not found under {source}: pip install django-static-mathjax")
    return source


def _plotly_source() -> Path:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not source.is_file():
        raise FileNotFoundError(f"plotly.min.js not found at {source}: pip install plotly")
    return source


def copy_vendor(static_dir: Path) -> None:
    """Copy MathJax and plotly.js into ``static_dir`` (a build's ``_static``), replacing older copies."""
    static_dir = Path(static_dir)
    target = static_dir / MATHJAX_DIR
    if target.exists():
        shutil.rmtree(target)
    source = _mathjax_source()
    target.mkdir(parents=True)
    for part in MATHJAX_PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part)
        else:
            shutil.copy2(source / part, target / part)
    shutil.copy2(source.parent / "LICENSE", target / "LICENSE")
    shutil.copy2(_plotly_source(), static_dir / PLOTLY_JS)
    shutil.copy2(Path(__file__).with_name(BOOK_CSS), static_dir / BOOK_CSS)


def _config_inited(app, config) -> None:
    config.mathjax_path = MATHJAX_ENTRY


def _builder_inited(app) -> None:
    if app.builder.format == "html":
        copy_vendor(Path(app.outdir) / "_static")


def _page_context(app, pagename, templatename, context, doctree) -> None:
    if app.builder.format != "html":
        return
    if "sl-static-explorer" in (context.get("body") or ""):
        app.add_js_file(PLOTLY_JS, priority=400)   # before the page's own scripts; relative to _static/
    # sphinx-thebe adds its loader to every page even with Thebe off (twice: "THEBE_JS_URL has already been
    # declared"), and that loader would fetch Thebe from a CDN
    script_files = context.get("script_files")
    if script_files:   # in place: the builder restores its own list after every page

        def is_thebe(script) -> bool:
            body = str(getattr(script, "attributes", {}).get("body", ""))
            return "thebe" in str(getattr(script, "filename", None) or "").lower() or "THEBE_JS_URL" in body

        script_files[:] = [s for s in script_files if not is_thebe(s)]
    # sphinx-book-theme has no default_mode option, so pydata's template writes an empty mode into every page and
    # its script logs "Got invalid theme mode" as an error
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


_ABS = re.compile(r"(?<![\\`|])\|([^|\s`](?:[^|`\n]*[^|\s`])?)\|(?![`|])")


def _docstring(app, what, name, obj, options, lines) -> None:
    """Plain-text docstrings meet reStructuredText: absolute values ``|w|`` read as substitutions, and an inline
    literal wrapped over two lines is unterminated (each an error and a broken link in the API reference)."""
    out = []
    for line in lines:
        # an inline literal ``...`` that a docstring wraps over two lines is an error in reStructuredText: join them
        if out and out[-1].count("``") % 2 == 1:
            out[-1] = out[-1] + " " + line.strip()
        else:
            out.append(line)
    lines[:] = [_ABS.sub(r"\\|\1\\|", line) for line in out]


def setup(app):
    import bib_style   # tools/ is on sys.path: sphinx.local_extensions

    bib_style.register()
    app.add_css_file(BOOK_CSS, priority=900)   # after the theme's own style sheets
    app.connect("autodoc-process-docstring", _docstring)
    app.connect("config-inited", _config_inited)
    app.connect("builder-inited", _builder_inited)
    app.connect("html-page-context", _page_context, priority=900)   # after the extensions that add scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
