"""tools/check_book.py has teeth: on a tiny hand-made "book" it reports each kind of defect it promises to find.
Needs Playwright and a Chromium (skipped otherwise; .ci/run installs Debian's chromium)."""
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("playwright")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_book  # noqa: E402

CHROMIUM = next((p for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or ""]
                 if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")

BAD = """<html><head><script src="https://cdn.example.org/lib.js"></script></head><body><main>
<p>Raw math: $w_i^2$ and \\(x\\).</p>
<img src="missing.png"> <a href="nowhere.html">a broken link</a> <a href="#no-such-anchor">a missing anchor</a>
<pre>Traceback (most recent call last):
  File "x.py", line 1</pre>
<script>console.error("boom")</script>
<p>See <span class="xref std std-numref">fig-ch01-missing</span>, <a href="#top2"><span class="std std-numref">Fig. 7</span></a>,
<a href="#top2"><span class="std std-numref">Fig. 3.2</span></a> (another chapter's: fine).</p>
<div class="math" id="wide" style="overflow-x: auto"><span style="display: inline-block; width: 4000px">a long line</span></div>
<div class="math" id="top2"><span class="eqno">(4)<a class="headerlink" href="#top2">#</a></span></div>
</main></body></html>"""
GOOD = """<html><body><main><p id="top">Fine: it costs $5 and $10.</p><a href="#top">up</a>
<a href="../index.html">home</a></main></body></html>"""


def test_the_check_reports_every_kind_of_defect(tmp_path, capsys):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "index.html").write_text(GOOD.replace("../index.html", "index.html"))
    (tmp_path / "chapters" / "01_bad.html").write_text(BAD)
    (tmp_path / "chapters" / "02_good.html").write_text(GOOD)
    status = check_book.main([str(tmp_path), "--chromium", CHROMIUM])
    out = capsys.readouterr().out
    bad = out.split("chapters/01_bad.html")[1].split("chapters/02_good.html")[0]
    for expected in ["non-local request https://cdn.example.org/lib.js", "raw math in the text: '$w_i^2$'",
                     "raw math in the text: '\\\\(x\\\\)'", "broken image missing.png", "broken link nowhere.html",
                     "missing anchor #no-such-anchor", "traceback", "console error: boom",
                     "without a kernel-free explorer", "unresolved cross-reference 'fig-ch01-missing'",
                     "number not of this chapter's form: 'Fig. 7'", "number not of this chapter's form: '(4)'",
                     "display equation wider than the column (scrolls sideways): 'wide a long line'"]:
        assert expected in bad, (expected, bad)
    assert "without a kernel-free explorer" in out.split("chapters/02_good.html")[1]   # a chapter needs one
    assert "Fig. 3.2" not in bad
    assert "index.html: ok" in out and status == 1
    assert (tmp_path / "_screenshots" / "chapters__01_bad.png").is_file()
