"""Reports: sections, images that resolve from anywhere the folder moves, escaped user text, a paginated PDF, the
`report` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import fake_run
from auditor.report.figures import short_head, short_layer
from auditor.report.render import pdf_document, publish, render_html


class _Page(HTMLParser):
    """What a test needs of a page: ids, image sources, link targets, visible text."""

    def __init__(self, html: str):
        super().__init__()
        self.ids, self.srcs, self.hrefs, self.text = set(), [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.srcs.append(a.get("src"))
        if tag == "a" and a.get("href", "").startswith("#"):
            self.hrefs.append(a["href"][1:])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = fake_run.build(tmp_path_factory.mktemp("report") / "run")
    publish(run, pdf=True)
    return run


def test_html_has_every_section_in_order(run):
    html = (run / "report.html").read_text()
    page = _Page(html)
    sections = ["summary", "acceptance", "flags-by-category", "prompts", "model", "methods", "provenance"]
    assert set(sections) <= page.ids
    assert [html.index(f'id="{s}"') for s in sections] == sorted(html.index(f'id="{s}"') for s in sections)
    assert {f"prompt-{p[0]}" for p in fake_run.PROMPTS} <= page.ids
    assert set(page.hrefs) <= page.ids  # every in-page link lands somewhere
    text = " ".join(page.text)
    for phrase in ("share of (concept, seed) pairs with no flag", "Selective head maps", "How the thresholds were set",
                   "model.fingerprint", "fp0000", "flag rate (missing)"):
        assert phrase in text


def test_every_image_resolves_relative_to_the_report_even_after_a_move(run, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(run, moved)
    srcs = _Page((moved / "report.html").read_text()).srcs
    # 9 generations + 11 concepts x 3 seeds x 2 methods + the relevance and flag figures
    assert len(srcs) == 9 + 66 + 2
    for src in srcs:
        assert src and not Path(src).is_absolute() and "://" not in src
        assert (moved / src).is_file(), src


def test_prompt_text_is_escaped(run):
    html = (run / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;striped&#34;" in html or "&quot;striped&quot;" in html


def test_pdf_is_paginated_with_contents_in_order(run):
    assert (run / "report.pdf").read_bytes()[:5] == b"%PDF-"
    doc = pdf_document(run)
    assert len(doc.pages) > 1
    # WeasyPrint's outline holds every heading with the page (0-based) it landed on.
    pages = {}

    def walk(tree):
        for label, (page, *_), children, *_ in tree:
            pages.setdefault(label, page)
            walk(children)

    walk(doc.make_bookmark_tree())
    chapters = ["Summary", "Prompts", "The model's heads", "Methods", "Provenance"]
    assert pages["Contents"] == 1  # after the title page
    assert [pages[c] for c in chapters] == sorted({pages[c] for c in chapters})  # one chapter per page run, in order
    assert pages["Summary"] == 2


def test_a_run_without_relevance_or_finish_still_renders_and_says_so(tmp_path):
    run = fake_run.build(tmp_path / "r", with_relevance=False, finish=False, prompts=fake_run.PROMPTS[:1])
    html = render_html(run).read_text()
    assert "carries no relevance matrix" in html and "This run is incomplete" in html
    assert all((run / s).is_file() for s in _Page(html).srcs)


def test_layer_names_shorten_readably():
    assert short_layer("up_blocks.1.attentions.0.transformer_blocks.0.attn2") == "up1.0"
    assert short_layer("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid"
    assert short_layer("down_blocks.2.attentions.1.transformer_blocks.9.attn2") == "down2.1.t9"
    assert short_head("down_blocks.0.attentions.0.transformer_blocks.0.attn2#h5") == "down0.0 h5"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, timeout=120)


def test_report_command_rerenders_and_refuses_bad_folders(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    ok = _cli("report", str(copy), "--no-pdf")
    assert ok.returncode == 0, ok.stderr
    assert (copy / "report.html").is_file() and str(copy / "checksums.sha256") in ok.stdout
    for target, message in ((tmp_path / "missing", "no such run folder"), (tmp_path, "not an auditor run folder")):
        bad = _cli("report", str(target))
        assert bad.returncode == 2
        assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("auditor: error: ") and message in bad.stderr
