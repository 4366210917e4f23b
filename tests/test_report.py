"""Reports: sections in order, images that resolve wherever the folder moves (and in the PDF), escaped user text, the
prompt grid (one cell per seed, fallbacks and readings shown), a paginated PDF that packs several concepts per page,
and the `report` command (re-render from the store, checksums, bad folders)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import fake_run
from auditor.report import render as render_mod
from auditor.report.figures import short_head, short_layer
from auditor.report.render import pdf_document, publish, render_html

# Text a user controls, in the prompt and in a concept: it must come out as text, never as markup.
HOSTILE = ("markup", "<script>alert(1)</script> a <i>cube</i> & a \"striped\" ring",
           [("<i>cube</i>", "object", "shape", None), ("striped", "attribute", "texture", None)])
PROMPTS = [*fake_run.PROMPTS, fake_run.FALLBACK_PROMPT, HOSTILE]
SEEDS = (0, 1, 2)


class _Page(HTMLParser):
    """What a test needs of a page: ids, image sources, link targets, visible text, and the class of every tag."""

    def __init__(self, html: str):
        super().__init__()
        self.ids, self.srcs, self.hrefs, self.text, self.classes = set(), [], [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.srcs.append(a.get("src"))
        if tag == "a" and a.get("href", "").startswith("#"):
            self.hrefs.append(a["href"][1:])
        self.classes += (a.get("class") or "").split()

    def handle_data(self, data):
        self.text.append(data)


def _article(html: str, pid: str) -> str:
    """The HTML of one prompt's article."""
    start = html.index(f'id="prompt-{pid}"')
    return html[start:html.index("</article>", start)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = fake_run.build(tmp_path_factory.mktemp("report") / "run", prompts=PROMPTS, seeds=SEEDS,
                         forced={("markup", "<i>cube</i>"): 1.0, ("polysemy", "sphere"): 0.0})
    publish(run, pdf=False)  # the PDF is laid out once, by the doc fixture, and written by the report command test
    return run


@pytest.fixture(scope="module")
def html(run) -> str:
    return (run / "report.html").read_text()


def test_html_has_every_section_in_order(html):
    page = _Page(html)
    sections = ["summary", "acceptance", "flags-by-category", "failing-concepts", "prompt-overview", "prompts", "model",
                "methods", "provenance"]
    assert set(sections) <= page.ids
    assert [html.index(f'id="{s}"') for s in sections] == sorted(html.index(f'id="{s}"') for s in sections)
    assert {f"prompt-{p[0]}" for p in PROMPTS} <= page.ids
    assert set(page.hrefs) <= page.ids  # every in-page link lands somewhere
    text = " ".join(page.text)
    for phrase in ("share of (concept, seed) pairs with no flag", "Selective head maps", "How the thresholds were set",
                   "model.fingerprint", "fp0000", "flag rate (missing)", "Prompts at a glance",
                   "heads per category in a selective map"):
        assert phrase in text


def test_every_image_resolves_relative_to_the_report_even_after_a_move(run, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(run, moved)
    srcs = _Page((moved / "report.html").read_text()).srcs
    gens = len(PROMPTS) * len(SEEDS)
    # two maps per concept and seed; one (all heads) for a category without calibrated heads
    maps = sum(2 if c[2] in fake_run.CATEGORIES else 1 for _, _, cs in PROMPTS for c in cs) * len(SEEDS)
    assert len(srcs) == gens + maps + 2  # + the relevance heatmap and the flag bars
    for src in srcs:
        assert src and not Path(src).is_absolute() and "://" not in src
        assert (moved / src).is_file(), src


def test_user_text_is_escaped_everywhere(html):
    assert "<script>" not in html and "<i>cube</i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the prompt, shown as text
    assert "&lt;i&gt;cube&lt;/i&gt;" in html  # the concept, its alt texts and its flag message
    assert "&#34;striped&#34;" in html or "&quot;striped&quot;" in html
    markup = _article(html, "markup")
    assert "'&lt;i&gt;cube&lt;/i&gt;': its shape heads" in markup or "&#39;&lt;i&gt;cube&lt;/i&gt;&#39;" in markup
    assert "<i>" not in markup.replace("<i>(", "")  # no tag made of the user's text


def test_each_concept_row_has_one_cell_per_seed_under_the_images(html):
    for pid, _, concepts in PROMPTS:
        art = _article(html, pid)
        assert art.count('<figure class="gen">') == len(SEEDS)
        assert art.count('class="row concept') == len(concepts)
        assert art.count('class="cell-seed"') == len(concepts) * len(SEEDS)
        seeds = re.findall(r'class="cell-seed">seed (\d+)<', art)
        assert seeds == [str(s) for s in SEEDS] * len(concepts)  # the same order as the images, in every row
    assert "flagged in 3 of 3 seeds" in _article(html, "markup")
    assert "no flag in 3 seeds" in _article(html, "polysemy")


def test_a_category_without_heads_says_the_all_heads_map_decides(html):
    art = _article(html, fake_run.FALLBACK_PROMPT[0])
    assert "no selective map: no calibrated heads for vehicle" in art
    assert "no calibrated heads for category &#39;vehicle&#39;: verdicts use the all-heads map" in art  # the note
    assert art.count("all heads (decides)") == 2 * len(SEEDS)
    assert "selective heads, seed" not in art  # no selective image is pretended
    assert "asked: on the left" in art
    assert "all heads (decides)" not in _article(html, "two-objects")


def test_a_polysemous_word_shows_which_reading_the_heads_favour(html):
    art = _article(html, "polysemy")
    assert art.count('class="response"') == 2 * len(SEEDS)  # both "orange"s, every seed; not "sphere"
    rows = re.findall(r'<tr class="([a-z ]*)"><th>(\w+)</th>', art)
    assert ("strongest expected", "fruit") in [(" ".join(c.split()), cat) for c, cat in rows]  # the fruit orange
    assert (("expected", "colour") in [(" ".join(c.split()), cat) for c, cat in rows]
            or ("strongest expected", "colour") in [(" ".join(c.split()), cat) for c, cat in rows])
    assert "response" not in _article(html, "two-objects")


def _bookmarks(doc) -> dict[str, int]:
    pages: dict[str, int] = {}

    def walk(tree):
        for label, (page, *_), children, *_ in tree:
            pages.setdefault(label, page)
            walk(children)

    walk(doc.make_bookmark_tree())
    return pages


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def doc(run):
    """The paginated PDF of the report, and what WeasyPrint warned about while laying it out."""
    handler, log = _Warnings(), logging.getLogger("weasyprint")
    log.addHandler(handler)
    try:
        document = pdf_document(run)
    finally:
        log.removeHandler(handler)
    document.warnings = handler.messages
    return document


def test_pdf_is_paginated_with_contents_in_order(doc):
    pages = _bookmarks(doc)
    chapters = ["Summary", "Prompts", "The model's heads", "Methods", "Provenance"]
    assert pages["Contents"] == 1  # after the title page
    assert [pages[c] for c in chapters] == sorted({pages[c] for c in chapters})  # one chapter per page run, in order
    assert pages["Summary"] == 2


def test_pdf_prompt_pages_hold_several_concepts_each(doc):
    pages = _bookmarks(doc)
    rows = sum(len(c) for _, _, c in PROMPTS) + len(PROMPTS)  # concept rows and image rows
    assert pages["The model's heads"] - pages["Prompts"] <= rows / 4  # at least 4 rows a page, not a concept a page
    starts = [next(page for label, page in pages.items() if label.startswith(pid + " ")) for pid, _, _ in PROMPTS]
    assert starts == sorted(starts) and pages["Prompts"] <= starts[0]  # every prompt is a bookmark, in suite order


def test_pdf_images_all_load(doc):
    assert not [m for m in doc.warnings if "image" in m.lower()], doc.warnings


def test_a_run_without_relevance_or_finish_still_renders_and_says_so(tmp_path):
    run = fake_run.build(tmp_path / "r", with_relevance=False, finish=False, prompts=fake_run.PROMPTS[:1])
    html = render_html(run).read_text()
    assert "carries no relevance matrix" in html and "This run is incomplete" in html
    assert all((run / s).is_file() for s in _Page(html).srcs)


def test_an_unconverged_calibration_is_said(tmp_path, monkeypatch):
    run = fake_run.build(tmp_path / "r", prompts=fake_run.PROMPTS[:1], seeds=(0,))
    from auditor.store import RunStore

    with RunStore.open(run) as store:
        store._write_manifest({**store.manifest, "relevance": {"sha256": "ef" * 32, "prompts": 16, "steps": 20,
                                                               "converged": False}})
    html = render_html(run).read_text()
    assert "not converged" in html and "calibrated on\n  16 prompts × 20 steps" in html


def test_layer_names_shorten_readably():
    assert short_layer("up_blocks.1.attentions.0.transformer_blocks.0.attn2") == "up1.0"
    assert short_layer("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid"
    assert short_layer("down_blocks.2.attentions.1.transformer_blocks.9.attn2") == "down2.1.t9"
    assert short_head("down_blocks.0.attentions.0.transformer_blocks.0.attn2#h5") == "down0.0 h5"


# --- re-rendering from the store ------------------------------------------------------------------------------------


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_changed_templates_give_a_new_report_without_regenerating(run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    kept = [*sorted((copy / "images").iterdir()), *sorted((copy / "maps").iterdir())]
    before = _digest(kept), _stored_run(copy)
    templates = tmp_path / "templates"
    shutil.copytree(render_mod.templates_dir(), templates)
    methods = templates / "partials" / "methods.html.j2"
    methods.write_text(methods.read_text().replace("<h2>Methods</h2>", "<h2>Methods</h2><p>TEMPLATE-MARK</p>"))
    monkeypatch.setattr(render_mod, "templates_dir", lambda: templates)
    render_html(copy)
    assert "TEMPLATE-MARK" in (copy / "report.html").read_text()
    assert (_digest(kept), _stored_run(copy)) == before  # nothing of the run itself was touched


def _stored_run(run: Path) -> list:
    """The run as stored: manifest, generations and summary (run.sqlite also records the sha256 of the reports a
    re-render writes, so its bytes change)."""
    import sqlite3

    conn = sqlite3.connect(run / "run.sqlite")
    try:
        return [conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("manifest", "generations", "summary")]
    finally:
        conn.close()


def test_report_command_rerenders_with_pdf_and_checksums_verify(cli, run, doc, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("report.html", "checksums.sha256"):
        (copy / name).unlink()
    code, out, err = cli("report", str(copy))
    assert code == 0, err
    assert out.split() == [str(copy / n) for n in ("results.json", "report.html", "report.pdf", "checksums.sha256")]
    assert (copy / "report.pdf").read_bytes()[:5] == b"%PDF-"
    if shutil.which("pdfinfo"):  # the file holds the document the layout tests looked at
        info = subprocess.run(["pdfinfo", str(copy / "report.pdf")], capture_output=True, text=True).stdout
        assert f"Pages:           {len(doc.pages)}" in info or re.search(rf"Pages:\s+{len(doc.pages)}\b", info)
    if shutil.which("sha256sum"):
        ok = subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=copy, capture_output=True,
                            text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    listed = {line.split("  ", 1)[1] for line in (copy / "checksums.sha256").read_text().splitlines()}
    assert {"report.html", "report.pdf", "results.json", "figures/relevance.png"} <= listed


def _one_line_error(result, *needles):
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("auditor: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_report_refuses_a_missing_folder(cli, tmp_path):
    _one_line_error(cli("report", str(tmp_path / "missing")), "no such run folder")


def test_report_refuses_a_folder_that_is_not_a_run(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    _one_line_error(cli("report", str(tmp_path)), "not an auditor run folder")
    _one_line_error(cli("report", str(tmp_path / "notes.txt")), "no such run folder")


def test_report_refuses_an_unwritable_folder(cli, run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # Root ignores file modes, so block the report another way: its name is taken by a folder.
    (copy / "report.html").unlink()
    (copy / "report.html").mkdir()
    _one_line_error(cli("report", str(copy), "--no-pdf"), "report.html", "cannot write")
    if os.geteuid() != 0:
        shutil.rmtree(copy / "report.html")
        for p in [copy, *copy.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            _one_line_error(cli("report", str(copy), "--no-pdf"), "cannot write")
        finally:
            for p in [copy, *copy.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)


def _wide_run(run_dir: Path, height: int = 32, width: int = 64) -> Path:
    """A one-image run of a non-square audit, its overlays made by the runner's own ``overlay``."""
    import numpy as np
    from PIL import Image

    from auditor.prompt_maps import overlay
    from auditor.store import RunStore, manifest_base
    from auditor.summary import summarise

    manifest = {**manifest_base(["auditor", "audit", "wide.yaml"]), "model": {"name": "wide", "fingerprint": "fpw"},
                "suite": {"name": "wide", "prompt_ids": ["wide"]}, "seeds": [0], "steps": 2,
                "resolution": [height, width]}
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    norm = rng.random((height, width)).astype(np.float32)
    concept = {"id": 0, "text": "star", "role": "object", "category": "shape", "binds_to": None,
               "token_indices": [2], "flags": [], "map_method": "selective", "scores": {}}
    with RunStore.create(run_dir, manifest) as store:
        store.add_generation({"prompt_id": "wide", "prompt": "a star", "seed": 0, "tags": [], "concepts": [concept]},
                             image, {"0_selective": norm, "0_all_heads": norm},
                             {"0_selective": overlay(image, norm), "0_all_heads": overlay(image, norm)})
        store.finish(summarise(store.generations(), None, 0.5))
    return run_dir


def _image_boxes(document, base: Path):
    """(laid-out width / height, the image file's width / height) of every image WeasyPrint placed."""
    import base64
    import io

    from PIL import Image

    for page in document.pages:
        stack = [page._page_box]
        while stack:
            box = stack.pop()
            stack.extend(getattr(box, "children", None) or [])
            src = box.element.get("src") if getattr(box, "replacement", None) and box.element is not None else None
            if not src:
                continue
            data = base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:") else (base / src).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                yield src[:40], box.width / box.height, im.width / im.height


def test_a_non_square_audit_keeps_its_aspect_ratio_in_html_and_pdf(tmp_path):
    from weasyprint import HTML

    run = _wide_run(tmp_path / "wide")
    publish(run, pdf=False)
    screen = HTML(filename=str(run / "report.html"), media_type="screen").render()
    for name, document in (("html", screen), ("pdf", pdf_document(run))):
        shown = [(src, laid, own) for src, laid, own in _image_boxes(document, run) if "figures/" not in src]
        assert len(shown) == 3, (name, shown)  # the image and its concept's two maps
        for src, laid, own in shown:
            assert own == pytest.approx(2.0) and laid == pytest.approx(own, rel=0.02), (name, src, laid, own)
