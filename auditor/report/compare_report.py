"""A comparison -> a folder a reviewer can move or zip: compare.json, compare.html, compare.pdf, the figure, copies of
the regressed concepts' images and maps from both runs, and checksums.sha256."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from auditor.errors import AuditorError
from auditor.report.figures import relevance_shift
from auditor.run_relevance import Relevance, read_relevance
from auditor.report.render import environment, page_args, write_pdf, write_text
from auditor.store import RELEVANCE_NAME, RunStore, atomic_write, write_checksums
from auditor.summary import concept_labels

MAX_EVIDENCE = 30  # regressed concepts shown with their maps; the rest are listed (all are in compare.json)


def write_compare(comparison: dict, out_dir: str | Path, pdf: bool = True) -> list[Path]:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditorError(f"{out}: cannot create the compare folder ({exc.strerror or exc})") from None
    figure = None
    heads = comparison["heads"]
    if heads["comparable"] and heads["categories"]:
        a = _shared(read_relevance(Path(comparison["run_a"]["dir"]) / RELEVANCE_NAME), heads["categories"])
        b = _shared(read_relevance(Path(comparison["run_b"]["dir"]) / RELEVANCE_NAME), heads["categories"])
        figure = relevance_shift(a, b, heads["overlap"], heads["k"], out / "figures" / "heads.png").relative_to(out).as_posix()
    shown = evidence(comparison, out)
    ctx = {
        "c": comparison,
        "evidence": shown,
        # regressed concept -> its evidence block, for the links in the tables (improvements have none)
        "anchors": {f"{e['prompt_id']}/{e['concept']}": e["anchor"] for e in shown},
        "figure": figure,
        "rendered": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "max_evidence": MAX_EVIDENCE,
    }
    template = environment().get_template("compare.html.j2")
    json_path = out / "compare.json"
    atomic_write(json_path, (json.dumps(comparison, indent=2, ensure_ascii=False) + "\n").encode())
    written = [json_path, write_text(out / "compare.html", template.render(**ctx, **page_args(out, False)))]
    if pdf:
        written.append(write_pdf(template.render(**ctx, **page_args(out, True)), out, out / "compare.pdf"))
    written.append(write_checksums(out))
    return written


def _shared(rel: Relevance, categories: list[str]) -> Relevance:
    """The matrix's rows of the categories both runs have, in one order: only those are compared head by head."""
    rows = [rel.categories.index(c) for c in categories]
    return Relevance(list(categories), rel.head_names, rel.matrix[rows])


def evidence(comparison: dict, out: Path) -> list[dict]:
    """Per regressed concept (up to MAX_EVIDENCE), per seed: both runs' image, selective map and flags, copied into
    ``out/runs/{a,b}/`` so the report does not point into the run folders."""
    wanted = [r for r in comparison["regressions"] if r["level"] == "concept"][:MAX_EVIDENCE]
    if not wanted:
        return []
    sides = {}
    for side in ("a", "b"):
        with RunStore.open(comparison[f"run_{side}"]["dir"], readonly=True) as store:
            sides[side] = (store.dir, {(g["prompt_id"], g["seed"]): g for g in store.generations()})
    shown = []
    for r in wanted:
        seeds = []
        for seed in r["seeds"]:
            row = {"seed": seed}
            for side, (run_dir, gens) in sides.items():
                g = gens[(r["prompt_id"], seed)]
                concept = dict(zip(concept_labels(g["concepts"]), g["concepts"]))[r["concept"]]
                row[side] = {"image": _copy(run_dir, g["image"], out, side),
                             "map": _copy(run_dir, (concept.get("maps") or {}).get("selective"), out, side),
                             "flags": concept.get("flags") or []}
            seeds.append(row)
        shown.append({**r, "prompt": sides["a"][1][(r["prompt_id"], r["seeds"][0])].get("prompt", ""), "rows": seeds,
                      "anchor": f"ev-{len(shown) + 1}"})
    return shown


def _copy(run_dir: Path, rel: str | None, out: Path, side: str) -> str | None:
    if not rel or not (run_dir / rel).is_file():
        return None
    target = out / "runs" / side / rel
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / rel, target)
    except OSError as exc:
        raise AuditorError(f"{target}: cannot copy evidence ({exc.strerror or exc})") from None
    return target.relative_to(out).as_posix()
