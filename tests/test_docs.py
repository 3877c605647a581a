"""The docs site builds with --strict, and every ```python block in docs/ runs.

Blocks of one page run in order in one namespace (so a page reads like a session);
a block whose first line is ``# skip-test`` is shown but not run (downloads, long runs); the
line itself is removed from the page by docs/hooks/mkdocs_hooks.py. The built HTML is checked
for what readers see: examples as code, cross-references as links, dataclass fields listed,
no markup meant for tools (reST roles, doctest flags, skip markers), small figures.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(DOCS.rglob("*.md"))


def python_blocks(page: Path) -> list[str]:
    return [b for b in BLOCK.findall(page.read_text()) if not b.lstrip().startswith("# skip-test")]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_docs_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(page)):
        try:
            exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # name the page and block in the failure
            raise AssertionError(f"{page.name}, python block {i} failed: {type(exc).__name__}: {exc}\n{block}") from exc


# --- the built site, as readers see it -------------------------------------------------------

ROLE_TEXT = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(?:`|<code)")
FIGURES = DOCS / "figures"


class _Text(HTMLParser):
    """The text of a page, split into what is inside ``<code>``/``<pre>`` and what is not."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.code: list[str] = []
        self.prose: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("code", "pre"):
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in ("code", "pre"):
            self.depth -= 1

    def handle_data(self, data):
        (self.code if self.depth > 0 else self.prose).append(data)


def page_text(html: str) -> _Text:
    parser = _Text()
    parser.feed(html[html.find("<article"):html.find("</article>")])  # the page, not the navigation
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(out)],
                          cwd=DOCS.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_docs_site_builds_strict(site):
    assert (site / "index.html").exists()
    assert (site / "api.html").exists()


def test_no_markup_meant_for_tools_is_visible(site):
    """reST roles, doctest flags and the docs tests' ``# skip-test`` marker never reach a reader."""
    problems = []
    for page in sorted(site.rglob("*.html")):
        html = page.read_text()
        article = html[html.find("<article"):html.find("</article>")]
        text = "".join(page_text(html).prose + page_text(html).code)
        rel = page.relative_to(site)
        problems += [f"{rel}: reST role {m[0]!r}" for m in ROLE_TEXT.finditer(article)]
        problems += [f"{rel}: {marker!r}" for marker in ("doctest: +SKIP", "# skip-test", "skip-test")
                     if marker in text]
    assert not problems, ("run `python tools/convert_roles.py FILES` on the docstrings that still use reST roles:\n"
                          + "\n".join(problems))


def test_api_examples_are_code_blocks(site):
    """``>>>`` examples render inside <code> (griffe's Examples section), not as nested quotes."""
    html = (site / "api.html").read_text()
    text = page_text(html)
    assert ">>>" not in "".join(text.prose)
    assert "<blockquote>" not in html
    assert "".join(text.code).count(">>>") >= 20  # the examples of finetune, FinetuneConfig, load, ...
    finetune = _section(html, "transferkit.finetune")
    assert re.search(r'<div class="highlight"><pre>.*?&gt;&gt;&gt;', finetune, re.S), "finetune's example is no code block"


def _section(html: str, anchor: str) -> str:
    start = html.index(f'id="{anchor}"')
    end = html.find('class="doc doc-heading"', html.index("</h3>", start))  # the next object's heading
    return html[start:end if end != -1 else len(html)]


@pytest.mark.parametrize("anchor, cls", [("transferkit.FinetuneConfig", "transferkit.config.FinetuneConfig"),
                                         ("transferkit.FinetuneResult", "transferkit.api.FinetuneResult"),
                                         ("transferkit.Decisions", "transferkit.decisions.Decisions"),
                                         ("transferkit.Policy", "transferkit.policies.spec.Policy")])
def test_api_lists_dataclass_fields(site, anchor, cls):
    import dataclasses
    import importlib

    module, name = cls.rsplit(".", 1)
    fields = [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))]
    section = _section((site / "api.html").read_text(), anchor)
    missing = [f for f in fields if f'title="{anchor}.{f}">{f}</span></code></td>' not in section]
    assert not missing, f"{anchor}: fields not listed on the API page: {missing}"


def test_api_cross_references_are_links(site):
    html = (site / "api.html").read_text()
    finetune = _section(html, "transferkit.finetune")
    assert 'href="#transferkit.FinetuneConfig"' in finetune  # the docstring's [`FinetuneConfig`][...]
    assert 'href="#transferkit.decisions.plan"' in finetune


def test_skip_marker_hidden_but_block_still_skipped(site):
    """A ```python block opened by ``# skip-test`` is not run by the tests, and the page shows it without the line."""
    page = DOCS / "getting-started.md"
    marked = [b for b in BLOCK.findall(page.read_text()) if b.lstrip().startswith("# skip-test")]
    assert marked, "getting-started.md has no skip-test block any more: pick another page for this test"
    assert not any(b in python_blocks(page) for b in marked)
    html = (site / "getting-started.html").read_text()
    code = "".join(page_text(html).code)
    first_code_line = marked[0].splitlines()[1].strip()
    assert first_code_line.split("(")[0] in code  # the block is on the page, its marker is not
    assert "skip-test" not in html


def test_figures_are_small_and_shown():
    figures = sorted(FIGURES.glob("*.png"))
    assert figures, "docs/figures/ has no PNG: run `make docs-figures`"
    pages = "".join(p.read_text() for p in PAGES)
    for fig in figures:
        assert fig.stat().st_size < 200_000, f"{fig.name} is {fig.stat().st_size} bytes (keep figures < 200 KB)"
        assert f"figures/{fig.name}" in pages, f"{fig.name} is on no page"


# --- the site opens from disk and reads clean ---------------------------------------------------

def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html")


def test_navigation_works_from_disk(site):
    """Opened as file://.../site/index.html, every link to a page lands on that page's HTML
    file (a link to a folder would show a directory listing)."""
    bad = []
    for page in _pages(site):
        html = page.read_text()
        for href in re.findall(r'<a [^>]*href="([^"#?]*)(?:[#?][^"]*)?"', html):
            if not href or re.match(r"[a-z]+:", href):
                continue  # same-page anchors, http(s):, mailto:
            target = (page.parent / href).resolve()
            if href.endswith("/") or target.is_dir() or not target.exists():
                bad.append(f"{page.relative_to(site)} -> {href}")
    assert not bad, "links that do not open a file from disk:\n" + "\n".join(sorted(set(bad))[:20])


def test_the_site_loads_nothing_from_the_network(site):
    """Opened from disk without a network, search worked only with a script from unpkg.com
    (the offline plugin's Web Worker shim), and the theme asked Google for its fonts: every
    script, style sheet and font is in the site, and the shim is loaded before the search."""
    remote = []
    for page in _pages(site):
        html = page.read_text()
        remote += [f"{page.name}: {u}" for u in re.findall(r'<(?:script|link|img)\b[^>]*?(?:src|href)="((?:https?:)?//'
                                                            r'[^"]+)"', html)]
        assert '<script src="' in html and "iframe-worker-shim.js" in html, page.name
    assert not remote, "\n".join(remote[:20])
    assert (site / "javascripts" / "iframe-worker-shim.js").read_text().count("window.Worker=") == 1


def test_no_stray_quote_boxes(site):
    """A prose line that starts with '>' (such as '>= 0.94') renders as a grey quote box; the
    pages use no block quotes, and the Markdown has no such line outside code."""
    quoted = []
    for page in _pages(site):
        html = page.read_text()
        if "<blockquote" in html[html.find("<article"):html.find("</article>")]:
            quoted.append(str(page.relative_to(site)))
    assert not quoted, f"block quotes on {quoted}"
    lines = []
    for page in PAGES:
        in_code = False
        for i, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            elif not in_code and line.startswith(">"):
                lines.append(f"{page.name}:{i}: {line[:60]}")
    assert not lines, "prose lines starting with '>' (a quote box):\n" + "\n".join(lines)


MAKING_OF = re.compile(r"\bthe issue'?s?\b|\bissue \d|sessions? that wrote|\blent to\b|\breviewers?\b|"
                       r"other engineers", re.I)


def test_docs_speak_of_the_software_not_of_how_it_was_made(site):
    found = []
    for page in _pages(site):
        text = " ".join(page_text(page.read_text()).prose)
        found += [f"{page.relative_to(site)}: ...{text[max(0, m.start() - 40):m.end() + 40]}..."
                  for m in MAKING_OF.finditer(text)]
    readme = (DOCS.parent / "README.md").read_text()
    found += [f"README.md: {m.group(0)}" for m in MAKING_OF.finditer(readme)]
    assert not found, "\n".join(found)


# Material's tables: every column is at least 5rem (100 px) wide, the text column about 730 px at
# a 1280 px window; a wider table scrolls sideways and its last columns are cut off from view.
TEXT_WIDTH_PX, MIN_COLUMN_PX, CHAR_PX, CELL_PADDING_PX = 740, 100, 7.0, 32


def _table_min_width(table: str) -> float:
    import html as html_lib

    def text(cell: str) -> str:  # code wraps anywhere: only prose words set a column's width
        return html_lib.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<code>.*?</code>", " ", cell, flags=re.S)))

    rows = [[text(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)]
            for r in re.findall(r"<tr>.*?</tr>", table, re.S)]
    columns = max(len(r) for r in rows)
    width = 0.0
    for j in range(columns):  # a browser breaks lines at spaces and after '-' and '/'
        words = [w for r in rows if j < len(r) for w in re.split(r"\s+|(?<=[-/])", r[j]) if w]
        width += max(MIN_COLUMN_PX, max((len(w) for w in words), default=0) * CHAR_PX + CELL_PADDING_PX)
    return width


def test_tables_fit_the_page(site):
    too_wide = []
    for page in _pages(site):
        html = page.read_text()
        article = html[html.find("<article"):html.find("</article>")]
        for table in re.findall(r"<table>.*?</table>", article, re.S):
            if _table_min_width(table) > TEXT_WIDTH_PX:
                head = re.sub(r"<[^>]+>", " ", table[:400]).split()
                too_wide.append(f"{page.relative_to(site)}: {' '.join(head[:8])} ... "
                                f"({_table_min_width(table):.0f} px)")
    assert not too_wide, "tables wider than the page (cut off on screen):\n" + "\n".join(too_wide)


def test_the_home_page_says_what_plots_dir_writes(tmp_path):
    """The home page names the pictures ``plots_dir`` writes: exactly the files a run writes there."""
    from transferkit.train.reporting import write_reports

    pytest.importorskip("matplotlib")
    text = (DOCS / "index.md").read_text()
    sentence = next(s for s in re.split(r"(?<=\.)\s", text.replace("\n", " ")) if "`plots_dir=`" in s)
    promised = set(re.findall(r"`([\w.]+\.png)`", sentence))
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_acc": 0.5},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_acc": 0.7}]
    written = write_reports(tmp_path, history, {"confusion_matrix": [[3, 1], [0, 4]]}, ["a", "b"])
    assert promised == {p.name for p in written.values()}


def test_the_benchmarks_page_leads_with_what_users_get(site):
    text = " ".join(page_text((site / "benchmarks.html").read_text()).prose)
    first = text[:text.find("Why:")] if "Why:" in text else text[:1500]
    assert "How fast transferkit is" in first and "SpeedConfig" not in first
    assert re.search(r"\d+(\.\d+)?x faster", first)


def test_the_export_page_states_the_torchscript_deprecation_and_the_onnx_path(site):
    text = " ".join(page_text((site / "export.html").read_text()).prose)
    assert "deprecated" in text and "quiet_jit" in " ".join(page_text((site / "export.html").read_text()).code)
    assert re.search(r"way forward is ONNX", text)


def test_the_notebook_is_a_page_of_the_site(site):
    html = (site / "notebook.html").read_text()
    assert "tk.finetune" in html and "show_results" in html
    assert 'href="notebook.html"' in (site / "index.html").read_text()
