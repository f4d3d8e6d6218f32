"""Open every page of the built book in headless Chromium, offline, and check what a reader meets.

    python tools/check_book.py [_build/html] [--chromium /usr/bin/chromium] [--only NAME ...]

Pages are opened from disk (``file://``), as a reader who downloaded the book would; every request to anything but
a local file is blocked and reported. A page fails on:

* a console error or an uncaught JavaScript exception;
* a request to a non-local address (a CDN, a font service, ...);
* math left untypeset: a Sphinx math element without MathJax output, or raw ``$...$`` / ``\\(`` / ``\\[`` in the text;
* a broken image, or an internal link to a missing file or a missing ``#anchor``;
* a Python traceback, or an ipywidgets placeholder (a widget view that needs a kernel or a CDN);
* on a chapter page: no kernel-free explorer (:func:`sparsity_lib.widgets.static_explorer`), or one whose control,
  when moved, does not change the figure;
* a display equation wider than the text column (it would scroll sideways: split it over lines);
* a cross-reference of the book left unresolved (``{eq}``, ``{numref}``, ``{ref}``, ``{doc}`` to a missing target;
  Python-domain references of the API page, ``:func:`` and the like, are not checked), or, on chapter NN's page,
  an equation, figure or exercise number that is not of the chapter's own form (NN.k) (tools/book_numbers.py).

A full-page screenshot of every page goes to ``<build>/_screenshots/`` for a person to look at, and a table of page
sizes (HTML bytes, and everything the page loaded from ``_static/``) is printed. Exit status 1 on any failure.
Driven by Playwright's Python package with the system's Chromium (``executable_path``): no browser download.
"""
from __future__ import annotations

import argparse
import hashlib
import html as html_lib
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
SKIP_DIRS = {"_static", "_sources", "_images", "_screenshots", "_downloads"}
RAW_MATH = [re.compile(r"\\\(.+?\\\)"), re.compile(r"\\\[.+?\\\]"),
            re.compile(r"(?<![\w$])\$[^$\s][^$\n]{0,300}?[\\^_{}][^$\n]{0,300}?\$(?![\w$])")]
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")
WIDGET_TEXT = ("Loading widget", "Error displaying widget", "Cannot show ipywidgets", "Cannot show widget")


def find_chromium(given: str | None) -> str:
    for candidate in [given, "/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or ""]:
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("check_book: no Chromium found (apt-get install chromium, or pass --chromium PATH)")


def pages_of(root: Path):
    return sorted(p for p in root.rglob("*.html") if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS))


def ids_of(path: Path, cache={}) -> set:
    if path not in cache:
        text = path.read_text(encoding="utf-8", errors="replace")
        cache[path] = set(re.findall(r'\bid="([^"]+)"', text)) | set(re.findall(r'\bname="([^"]+)"', text))
    return cache[path]


def check_links(page_path: Path, hrefs, root: Path):
    problems = []
    for href in hrefs:
        if not href or href.startswith(("mailto:", "javascript:", "http://", "https://", "data:")):
            continue
        target, fragment = urldefrag(href)
        if target.startswith("file:"):
            file = Path(unquote(urlparse(target).path))
        elif target:
            file = (page_path.parent / unquote(target)).resolve()
        else:
            file = page_path
        if file.is_dir():
            file = file / "index.html"
        if not file.exists():
            problems.append(f"broken link {href}")
        elif fragment and file.suffix == ".html" and unquote(fragment) not in ids_of(file):
            problems.append(f"link to a missing anchor {href}")
    return problems


MOVE_JS = """async (div) => {
  const vis = () => JSON.stringify(div.data.map(t => t.visible));
  const svg = () => div.querySelector('.cartesianlayer') ? div.querySelector('.cartesianlayer').innerHTML : '';
  return [vis(), svg()];
}"""


def move_controls(page, div):
    """Move the explorer's controls like a reader (mouse clicks); return (changed, what was done)."""
    before = div.evaluate(MOVE_JS)
    done = []
    header = div.query_selector(".updatemenu-header-group")

    def click(element):   # a reader's click at the element's place: whatever lies on top there gets it
        box = element.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)

    if header is not None:
        click(header)
        page.wait_for_timeout(200)
        buttons = div.query_selector_all(".updatemenu-dropdown-button")
        if len(buttons) > 1:
            click(buttons[1])   # the second entry (a long list scrolls; the first two are always in view)
            done.append("picked another dropdown entry")
            page.wait_for_timeout(300)
            if div.evaluate(MOVE_JS) == before:   # the second entry was the one shown: pick the first
                click(header)
                page.wait_for_timeout(200)
                click(div.query_selector_all(".updatemenu-dropdown-button")[0])
                page.wait_for_timeout(300)
    after_menu = div.evaluate(MOVE_JS)
    rail = div.query_selector(".slider-rail-touch-rect") or div.query_selector(".slider-rail-rect")
    changed_by_slider = False
    if rail is not None:
        box = rail.bounding_box()
        for fraction in (0.02, 0.98):
            state = div.evaluate(MOVE_JS)
            page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)
            page.wait_for_timeout(250)
            if div.evaluate(MOVE_JS) != state:
                changed_by_slider = True
        done.append("clicked both ends of the slider")
    changed = (after_menu != before or header is None) and (changed_by_slider or rail is None) and done
    return bool(changed), ", ".join(done), before != div.evaluate(MOVE_JS) or changed_by_slider


def check_page(context, path: Path, root: Path, shots: Path):
    problems, requests, console = [], [], []
    page = context.new_page()
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))

    def route(r):
        url = r.request.url
        if url.startswith(LOCAL_SCHEMES):
            if url.startswith("file:") and "/_static/" in url:
                requests.append(Path(unquote(urlparse(url).path)))
            return r.continue_()
        problems.append(f"non-local request {url[:120]}")
        return r.abort()

    page.route("**/*", route)
    page.goto(path.as_uri(), wait_until="load")
    page.evaluate("""async () => { if (window.MathJax && MathJax.startup && MathJax.startup.promise)
                                     { await MathJax.startup.promise; } }""")
    page.wait_for_timeout(300)
    info = page.evaluate("""() => {
        const main = document.querySelector('main') || document.body;
        const clone = main.cloneNode(true);
        clone.querySelectorAll('mjx-container, pre, code, script, style, .highlight, textarea').forEach(e => e.remove());
        return {
          untypeset: [...document.querySelectorAll('span.math, div.math')]
                        .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)),
          text: clone.innerText,
          fulltext: main.innerText,
          images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
          hrefs: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
          errors: document.querySelectorAll('.output.traceback, .output.error, .cell_output .traceback').length,
          widgets: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"], ' +
                                             '.jupyter-widgets-disconnected, .widget-subarea:empty').length,
          explorers: [...document.querySelectorAll('div.sl-static-explorer')].map(d => d.id),
          wide_math: [...main.querySelectorAll('div.math')].filter(d => [d, ...d.querySelectorAll('mjx-container')]
                          .some(e => e.scrollWidth > e.clientWidth + 2))
                        .map(d => (d.id || '') + ' ' + d.textContent.replace(/\\s+/g, ' ').slice(0, 60)),
          unresolved: [...main.querySelectorAll('.xref:not(.py)')].filter(e => !e.closest('a')).map(e => e.textContent.slice(0, 60)),
          numbers: [...main.querySelectorAll('span.eqno, span.caption-number, a span.std-numref')]
                      .map(e => e.textContent.replace(/[#\\u00b6]/g, '').replace(/\\s+/g, ' ').trim()),
        };
    }""")
    problems += [f"console error: {text[:200]}" for text in console]
    problems += [f"untypeset math: {m!r}" for m in info["untypeset"]]
    for pattern in RAW_MATH:
        problems += [f"raw math in the text: {m[:80]!r}" for m in pattern.findall(info["text"])]
    problems += [f"broken image {src}" for src in info["images"]]
    problems += check_links(path, info["hrefs"], root)
    if TRACEBACK.search(info["fulltext"]) or info["errors"]:
        problems.append(f"a Python traceback / error output is shown ({info['errors']} error outputs)")
    if info["widgets"] or any(t in info["fulltext"] for t in WIDGET_TEXT):
        problems.append(f"ipywidgets placeholder(s) in the page ({info['widgets']} widget views)")
    problems += [f"display equation wider than the column (scrolls sideways): {m!r}" for m in info["wide_math"]]
    problems += [f"unresolved cross-reference {text!r}" for text in sorted(set(info["unresolved"]))]
    moved = []
    is_chapter = path.parent.name == "chapters"
    chapter = re.match(r"(\d+)_", path.name) if is_chapter else None
    if chapter:
        own = re.compile(rf"^(\({int(chapter.group(1))}\.\d+\)|(Fig\.|Table|Listing|Exercise) {int(chapter.group(1))}\.\d+\b)")
        other = sorted({n for n in info["numbers"] if not own.match(n) and not n.startswith("Section")})
        cross = [n for n in other if re.match(r"^(Fig\.|Exercise) \d+\.\d+", n)]   # another chapter's, by label
        problems += [f"number not of this chapter's form: {n!r}" for n in other if n not in cross]
    if is_chapter and not info["explorers"]:
        problems.append("chapter page without a kernel-free explorer (sl.widgets.static_explorer)")
    for div_id in info["explorers"]:
        div = page.query_selector(f"#{div_id}")
        if not div.evaluate("d => Array.isArray(d.data)"):
            problems.append(f"{div_id}: the figure was not drawn (plotly.js missing?)")
            continue
        div.scroll_into_view_if_needed()
        changed, done, _ = move_controls(page, div)
        moved.append(f"{div_id}: {done}: {'figure changed' if changed else 'NO CHANGE'}")
        name = str(path.relative_to(root)).replace("/", "__").removesuffix(".html")
        div.screenshot(path=str(shots / f"{name}__{div_id}.png"))   # the explorer after the moves, close up
        if not changed:
            problems.append(f"{div_id}: moving its controls ({done or 'none found'}) did not change the figure")
    shot = shots / (str(path.relative_to(root)).replace("/", "__").removesuffix(".html") + ".png")
    height = page.evaluate("document.documentElement.scrollHeight")
    try:   # a very long page (the API reference) is cut at 16,000 px, Chromium's limit for one capture
        page.screenshot(path=str(shot), full_page=height <= 16000, timeout=60000)
    except Exception as error:  # noqa: BLE001  (a screenshot is for people; its failure is not the page's)
        print(f"    (no screenshot of {path.name}: {str(error).splitlines()[0]})")
    page.close()
    size_static = sum(p.stat().st_size for p in set(requests) if p.exists())
    return problems, moved, path.stat().st_size, size_static


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build", nargs="?", default="_build/html")
    parser.add_argument("--chromium", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="check only pages whose path contains one of these")
    args = parser.parse_args(argv)
    root = Path(args.build).resolve()
    if not (root / "index.html").exists():
        sys.exit(f"check_book: no built book at {root} (run `make book` first)")
    from playwright.sync_api import sync_playwright

    shots = root / "_screenshots"
    shots.mkdir(exist_ok=True)
    pages = [p for p in pages_of(root) if not args.only or any(o in str(p) for o in args.only)]
    failures = 0
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(args.chromium), headless=True,
                                     args=["--allow-file-access-from-files", "--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
        for path in pages:
            name = str(path.relative_to(root))
            if path.stat().st_size < 600 and "http-equiv" in path.read_text(errors="replace"):
                continue   # the root's redirect to the first page
            try:
                problems, moved, size_html, size_static = check_page(context, path, root, shots)
            except Exception as error:  # noqa: BLE001  (report the page and go on with the others)
                problems, moved, size_html, size_static = [f"the check itself failed: {error}"], [], 0, 0
            rows.append((name, size_html, size_static, len(problems)))
            status = "ok" if not problems else f"{len(problems)} problem(s)"
            print(f"{name}: {status}")
            for line in moved:
                print(f"    explorer {line}")
            for problem in problems[:25]:
                print(f"    - {problem}")
            failures += bool(problems)
        browser.close()
    print(f"\n{'page':<48} {'HTML KiB':>9} {'_static KiB':>12} {'problems':>9}")
    for name, size_html, size_static, count in rows:
        print(f"{name:<48} {size_html / 1024:>9.0f} {size_static / 1024:>12.0f} {count:>9}")
    print(f"\nscreenshots: {shots}")
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
