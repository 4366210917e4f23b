"""Run folder -> report.html and report.pdf, from the store alone (re-rendering never regenerates anything).

One template renders both: the HTML for a screen (navigation, wide layout) and, with ``pdf`` set, the document
WeasyPrint paginates (title page, table of contents with page numbers, running footer). Autoescaping is on for
every template: prompt text is user input.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from auditor.engine.heads import layer_of
from auditor.errors import AuditorError
from auditor.manifest import flatten
from auditor.report.figures import flag_bars, relevance_heatmap, short_head
from auditor.run_relevance import Relevance, read_relevance
from auditor.resources import templates_dir
from auditor.run_folder import atomic_write
from auditor.store import RELEVANCE_NAME, RunStore
from auditor.summary import UNCATEGORISED, concept_labels
from auditor.vocabulary import FLAG_TYPES, SIDE_WORDS

HTML_NAME = "report.html"
# The PDF embeds images at print resolution: a map is printed 20 mm wide, so the templates ask for its 256 px overlay
# as a 128 px JPEG (made here, once per file; WeasyPrint would otherwise decode and re-encode every PNG twice). That
# makes the PDF of the default shapes audit about 0.8 MB instead of 11 MB, and quicker to write. ``dpi`` caps the rest.
PDF_OPTIONS = {"dpi": 150}
PDF_NAME = "report.pdf"
MAP_METHODS = (("selective", "selective heads"), ("all_heads", "all heads"))
FLAG_MEANINGS = {
    "missing": "an object the prompt names has no region of its own in its selective map, or its map peaks on "
               "empty background in the image: the model most likely did not draw it (neglected it), or drew it on "
               "top of another object",
    "misplaced": "an attribute's attention lands on another object than the one it describes (a colour or texture "
                 "leaked to the wrong object), or an object sits away from the position or relation the prompt names",
    "misinterpreted": "a word with several readings (\"orange\": a colour or a fruit) responds most in the heads of "
                      "a category its role in the prompt does not imply: the model read it the other way; or a colour "
                      "word's colour is not in the image where its heads and its object are (\"purple\" drawn "
                      "blue)",
}

# The diagnostics' settings (auditor/thresholds.py), in words for the methods chapter.
THRESHOLD_MEANINGS = {
    "min_peak_ratio": "missing when an object's peak attention is below this share of the strongest object's peak",
    "min_concentration": "missing when, next to another object, less than this share of an object's attention falls "
                         "inside its own region",
    "max_shared_region": "missing when an object's region overlaps another object's by more than this (IoU)",
    "min_binding_margin": "misplaced when an attribute's share on its own object minus its share on another object "
                          "(one not judged missing) is below this",
    "position_margin": "misplaced when an object's centre is not at least this far (fraction of the image) on the "
                       "side the prompt names",
    "min_category_margin": "misinterpreted when the log-ratio of the expected reading's response to the strongest "
                           "other reading's is below this",
    "max_area": "missing when, next to another object, an object's region covers more than this share of the "
                "image (spread over the background, not on an object)",
    "min_drawn_share": "missing when less than this share of an object's map peak lies on drawn (non-background) "
                       "pixels of the image; on a plain background, at least this share on a drawn region no other "
                       "object's map peaks on silences the attention-only missing rules",
    "min_colour_share": "misinterpreted when less than this share of the drawn pixels under a colour word's map (or "
                        "its object's) has that colour",
    "max_flag_rate": "a concept fails its prompt when flagged in more than this share of its seeds",
    "k": "heads per category in a selective map",
}


# --- shared with the compare report ---------------------------------------------------------------------------------


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(templates_dir())), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v, digits=0: "—" if v is None else f"{100 * float(v):.{digits}f}%"
    env.filters["ci"] = lambda ci: "—" if not ci else f"{100 * ci[0]:.0f}–{100 * ci[1]:.0f}%"
    env.filters["num"] = lambda v, digits=3: "—" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))
    env.filters["signed"] = lambda v, digits=2: "—" if v is None else f"{v:+.{digits}f}"
    env.filters["head"] = short_head
    return env


def stylesheet() -> Markup:
    """The CSS, inlined into the page so report.html is one file plus its images."""
    parts = []
    for name in ("base.css", "screen.css", "print.css"):
        try:
            parts.append((templates_dir() / "css" / name).read_text(encoding="utf-8"))
        except OSError as exc:
            raise AuditorError(f"{templates_dir() / 'css' / name}: missing report stylesheet ({exc.strerror})") from None
    return Markup("\n".join(parts))  # our own file, not user input


def image_source(base_dir: Path, pdf: bool):
    """``src(path, px=None)`` for the templates: on screen the relative path itself (the folder moves as a whole);
    in the PDF, with ``px``, an image larger than ``px`` becomes a ``px``-sized JPEG data URI. Anything unreadable
    keeps its path, so WeasyPrint reports it like any missing image."""
    cache: dict[tuple[str, int], str] = {}

    def src(rel: str | None, px: int | None = None) -> str | None:
        if not (rel and pdf and px):
            return rel
        key = (rel, px)
        if key not in cache:
            cache[key] = _thumbnail_uri(base_dir / rel, px) or rel
        return cache[key]

    return src


def _thumbnail_uri(path: Path, px: int) -> str | None:
    import base64
    import io

    from PIL import Image

    try:
        with Image.open(path) as im:
            if max(im.size) <= px:
                return None  # already small (a 64 px image): embedded as it is, pixel-exact
            im = im.convert("RGB")
            im.thumbnail((px, px), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def page_args(base_dir: Path, pdf: bool) -> dict:
    """What every report template gets besides its content: the CSS, the medium, and the image source function."""
    return {"css": stylesheet(), "pdf": pdf, "src": image_source(base_dir, pdf)}


def write_text(path: Path, text: str) -> Path:
    atomic_write(path, text.encode("utf-8"))
    return path


def pdf_bytes(html: str, base_dir: Path) -> bytes:
    """Lay the HTML out for print."""
    from weasyprint import HTML

    return HTML(string=html, base_url=str(base_dir)).write_pdf(**PDF_OPTIONS)


def write_pdf(html: str, base_dir: Path, path: Path) -> Path:
    """Lay the HTML out for print and write it atomically (a reader never sees half a PDF)."""
    atomic_write(path, pdf_bytes(html, base_dir))
    return path


# --- the run report -------------------------------------------------------------------------------------------------


def build_context(store: RunStore) -> dict:
    """Everything the template shows, computed once (figures are written here) for both HTML and PDF."""
    m = store.manifest
    summary = store.summary()
    rel = read_relevance(store.dir / RELEVANCE_NAME)
    prof = m.get("profile") or {}
    k = (m.get("method") or {}).get("k") or prof.get("response_k") or (m.get("thresholds") or {}).get("k")
    figures = {}
    if rel is not None:
        figures["relevance"] = _rel(relevance_heatmap(rel, store.dir / "figures" / "relevance.png"), store.dir)
    bars = flag_bars(summary, store.dir / "figures" / "flags.png")
    if bars is not None:
        figures["flags"] = _rel(bars, store.dir)
    return {
        "title": f"Prompt-fidelity audit of {(m.get('model') or {}).get('name', 'a model')}",
        "run_id": store.run_id,
        "run": run_facts(m, summary),
        "provenance": flatten(_reading_order(m)),
        "summary": summary,
        "prompts": prompt_views(store.generations(), summary),
        "model": model_view(rel, summary, k, m),
        "figures": figures,
        "flag_types": FLAG_TYPES,
        "flag_meanings": FLAG_MEANINGS,
        "methods": MAP_METHODS,
        "thresholds": m.get("thresholds") or {},
        "profile": profile_view(m),
        "threshold_meanings": THRESHOLD_MEANINGS,
        "k": k,
        "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def profile_view(m: dict) -> dict:
    """How the run's audit profile chose heads, k and thresholds, in words (runs before profiles: their settings)."""
    prof = m.get("profile") or {}
    prov = prof.get("provenance") or {}
    ranking = prov.get("ranking")
    ranking_text = (ranking.get("how") if isinstance(ranking, dict) else ranking) or "HRV category votes"
    ks = prof.get("k_per_category") or {}
    forced = (m.get("method") or {}).get("k")
    named = [(c, k) for c, k in ks.items() if c != "*"] + [(c, k) for c, k in ks.items() if c == "*"]
    k_text = (f"--k {forced} for every category" if forced else
              ", ".join(f"{c if c != '*' else 'any other'} {k}" for c, k in named) or
              f"{(m.get('thresholds') or {}).get('k', '—')} for every category")
    th = prov.get("thresholds")
    if isinstance(th, dict):
        th_text = th.get("how") or "calibrated"
        if th.get("inherited_from"):
            th_text = f"inherited from {th['inherited_from']} ({th.get('why', '')}): {th_text}"
    else:
        th_text = th or ("set on the bundled shapes-world reference model: each at a low quantile of its score over "
                         "concepts an oracle confirmed drawn as asked")
    return {"sha256": prof.get("sha256") or "—", "ranking_text": ranking_text, "k_text": k_text,
            "thresholds_text": th_text}


def run_facts(m: dict, summary: dict) -> dict:
    """The manifest facts the pages quote, with a readable stand-in for anything a manifest lacks."""
    model, suite = m.get("model") or {}, m.get("suite") or {}
    seeds = m.get("seeds") or summary.get("seeds") or []
    given = m.get("given_images")
    expected = (len(given.get("images") or []) if isinstance(given, dict) else
                len(suite.get("prompt_ids") or []) * len(seeds)) or None
    return {
        "model_name": model.get("name") or "—", "fingerprint": model.get("fingerprint") or "—",
        "suite_name": suite.get("name") or "—", "start": m.get("start_time") or "—",
        "end": m.get("end_time") or "not finished", "seeds": ", ".join(map(str, seeds)) or "—",
        "steps": "—" if m.get("steps") is None else m["steps"],
        "guidance": "—" if m.get("guidance") is None else m["guidance"],
        "partial": bool(summary.get("partial")), "expected": expected or "?",
        "uncalibrated": m.get("calibrated") is False,
        "given": given if isinstance(given, dict) else None,
        "forced": [f for f in m.get("forced") or [] if isinstance(f, dict)],
        "tool_version": (m.get("tool") or {}).get("version") or "",
    }


# The provenance appendix reads top-down: which run, what was audited with what settings, then the environment.
_PROVENANCE_ORDER = ("run_id", "status", "start_time", "end_time", "command_line", "tool", "model", "suite", "seeds",
                     "steps", "guidance", "resolution", "device", "dtype", "method", "thresholds", "relevance")


def _reading_order(m: dict) -> dict:
    return {**{k: m[k] for k in _PROVENANCE_ORDER if k in m}, **{k: v for k, v in sorted(m.items()) if k not in _PROVENANCE_ORDER}}


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def prompt_views(generations: list[dict], summary: dict) -> list[dict]:
    """Per prompt: its images by seed, and per concept one cell per seed (maps, flags, category response) aligned
    with the images, with what the prompt asks of it and its flag rate across seeds."""
    stats = {(c["prompt_id"], c["concept"]): c for c in summary.get("concepts", [])}
    flagged_prompts = set((summary.get("prompts") or {}).get("flagged_ids", []))
    views: "OrderedDict[str, dict]" = OrderedDict()
    for g in generations:
        v = views.setdefault(g["prompt_id"], {"id": g["prompt_id"], "text": g.get("prompt", ""), "images": [],
                                              "seeds": [], "concepts": OrderedDict(), "flags": 0,
                                              "passed": g["prompt_id"] not in flagged_prompts})
        v["seeds"].append(g["seed"])
        v["images"].append({"seed": g["seed"], "src": g.get("image")})
        concepts = g.get("concepts") or []
        for label, c in zip(concept_labels(concepts), concepts):
            cv = v["concepts"].get(label)
            if cv is None:
                cv = v["concepts"][label] = {**concept_facts(c, concepts), "label": label,
                                             "stats": stats.get((g["prompt_id"], label)), "by_seed": {}, "notes": []}
            v["flags"] += len(c.get("flags") or [])
            method = c.get("map_method") or "selective"
            if c.get("note") and c["note"] not in cv["notes"]:
                cv["notes"].append(c["note"])
            if method != "selective":
                cv["fallback"] = True
            cv["by_seed"][g["seed"]] = {"seed": g["seed"], "maps": c.get("maps") or {}, "method": method,
                                        "flags": c.get("flags") or [], "scores": c.get("scores") or {},
                                        "response": category_response(c)}
    out = []
    for v in views.values():
        concepts = list(v["concepts"].values())
        for cv in concepts:  # one cell per seed of the prompt, in image order; None where a seed lacks the concept
            cv["cells"] = [cv["by_seed"].get(seed) for seed in v["seeds"]]
            cv.setdefault("fallback", False)
        out.append({**v, "concepts": concepts, "flagged_concepts": sum(1 for c in concepts if c["stats"] and not c["stats"]["passed"])})
    return out


def concept_facts(c: dict, concepts: list[dict]) -> dict:
    """What the prompt says about a concept, in words: its role, the object it describes, its category and where
    the prompt puts it."""
    def text_of(i):
        ok = isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(concepts)
        return concepts[i].get("text") if ok else None

    role, bound = c.get("role") or "concept", text_of(c.get("binds_to"))
    asks = []
    if c.get("position"):
        asks.append(f"on the {c['position']}" if c["position"] in SIDE_WORDS else str(c["position"]))
    for r in c.get("relations") or []:
        other = text_of(r.get("object"))
        asks.append(f"{r.get('relation')} {other!r}" if other else str(r.get("relation")))
    if c.get("count") and int(c["count"]) > 1:
        asks.append(f"{c['count']} of them")
    category, source = c.get("category") or UNCATEGORISED, c.get("category_source")
    return {"text": c.get("text"), "role": role, "role_text": f"{role} of {bound!r}" if bound else role,
            "category": category, "category_note": CATEGORY_SOURCES.get(source), "asks": asks}


CATEGORY_SOURCES = {"override": "set by the suite", "unknown": "not in the lexicon"}


def category_response(c: dict) -> list[dict] | None:
    """A word with several readings: how strongly each candidate category's heads respond to it, strongest first,
    with the category its role implies marked ``expected``; None for other words."""
    resp = c.get("category_response")
    if not isinstance(resp, dict) or not resp:
        return None
    top = max(resp.values()) or 1.0
    rows = sorted(resp.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"category": cat, "value": value, "share": max(0.0, value / top), "expected": cat == c.get("category"),
             "strongest": i == 0} for i, (cat, value) in enumerate(rows)]


def model_view(rel: Relevance | None, summary: dict, k: int, manifest: dict) -> dict:
    rows = []
    for cat, s in (summary.get("categories") or {}).items():
        top = rel.top(cat, 3) if rel is not None and cat in rel.categories else []
        rows.append({"category": cat, **s, "top_heads": top})
    info = {"heads": None, "layers": None, "categories": None}
    if rel is not None:
        info = {"heads": len(rel.head_names), "layers": len({layer_of(h) for h in rel.head_names}),
                "categories": len(rel.categories)}
    return {"rows": rows, "relevance": manifest.get("relevance") or {}, "k": k, **info}


def render(run_dir: str | Path, *, html: bool = True, pdf: bool = True, store: RunStore | None = None) -> list[Path]:
    """Write report.html and/or report.pdf of the run in ``run_dir``; returns what was written."""
    own = store is None
    store = store or RunStore.open(run_dir)
    try:
        ctx = build_context(store)
        template = environment().get_template("report.html.j2")
        for rel in ctx["figures"].values():
            store.record_file(rel)
        out = []
        if html:
            out.append(store.write_artifact(HTML_NAME, template.render(**ctx, **page_args(store.dir, False)).encode("utf-8")))
        if pdf:
            out.append(store.write_artifact(PDF_NAME, pdf_bytes(template.render(**ctx, **page_args(store.dir, True)),
                                                                store.dir)))
        return out
    finally:
        if own:
            store.close()


def render_html(run_dir: str | Path) -> Path:
    return render(run_dir, pdf=False)[0]


def render_pdf(run_dir: str | Path) -> Path:
    return render(run_dir, html=False)[0]


def pdf_document(run_dir: str | Path):
    """The paginated WeasyPrint document of the report (tests and callers that need page counts)."""
    from weasyprint import HTML

    with RunStore.open(run_dir) as store:
        html = environment().get_template("report.html.j2").render(**build_context(store), **page_args(store.dir, True))
        return HTML(string=html, base_url=str(store.dir)).render(**PDF_OPTIONS)


def publish(run_dir: str | Path, pdf: bool = True, force: bool = False, command_line: list[str] | None = None,
            notes: list[str] | None = None) -> list[Path]:
    """Everything a finished (or interrupted) run hands over: results.json, the reports, then checksums last.

    The folder is verified against its records first. Altered or missing evidence (images, maps, the relevance
    matrix) is refused, naming the file, unless ``force``; then the manifest records the forced re-render and what
    differed, and the report's first page says so. The altered files keep their recorded sha256, so ``verify`` and
    ``sha256sum -c`` still fail on them. Files the re-render writes afresh (results.json, the reports, figures) are
    remade whatever they hold; each that differed from its record is appended to ``notes``."""
    with RunStore.open(run_dir) as store:
        problems = store.verify()
        evidence = store.evidence_problems(problems)
        if evidence and not force:
            raise store.integrity_error(evidence, "re-render it anyway with `auditor report --force`, which puts "
                                                  "that on the record")
        if evidence:
            store.mark_forced("report", evidence, command_line)
        if notes is not None:
            notes += [f"{p}; written afresh from the store" for p in problems if p not in evidence]
        written = [store.export_results(), *render(store.dir, pdf=pdf, store=store)]
        written.append(store.write_checksums())
    return written
