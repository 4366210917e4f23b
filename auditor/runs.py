"""An audit run: every (prompt, seed) of a suite generated under trace, its concepts mapped and diagnosed, each
finished generation committed to the run store, then the summary and the reports. A killed run resumes where it
stopped: finished generations are never redone, and each generation depends only on its own prompt and seed, so
the final results equal an uninterrupted run's.

Stages are functions over records (``generation_record`` is the whole per-image audit); the CLI and the store are
the edges.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from auditor.errors import AuditorError, GateFailure
from auditor.thresholds import Thresholds

FAIL_ON = ("missing", "misplaced", "misinterpreted", "any")
MAPPED_ROLES = ("object", "background", "attribute", "style")  # roles whose words name something visible
SHOWN_METHODS = ("selective", "all_heads")  # stored per concept; the report shows them side by side
_SIDE_WORDS = ("left", "right", "top", "bottom")


@dataclass
class AuditOptions:
    suite: str
    model: str | None = None  # None: the bundled default (or, on resume, the run's own model)
    seeds: list[int] | None = None
    steps: int | None = None
    out: str | None = None
    resume: str | None = None
    pdf: bool = True
    device: str = "auto"
    dtype: str = "float32"
    relevance: str | None = None
    allow_pickle: bool = False
    k: int | None = None
    fail_on: str | None = None


@dataclass
class AuditResult:
    run_dir: Path
    summary: dict
    files: list[Path]
    generated: int  # generations made by this invocation (a resume skips finished ones)
    skipped: int
    seconds: float
    gate: str | None = None  # why the audit fails its gate, if it does
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        s = self.summary
        return {"run_dir": str(self.run_dir), "generated": self.generated, "resumed_skipped": self.skipped,
                "seconds": round(self.seconds, 2), "prompts": s.get("prompts"), "fidelity": s.get("fidelity"),
                "flags_by_type": s.get("flags_by_type"), "acceptance": s.get("acceptance"),
                "files": [str(p) for p in self.files], "gate": self.gate}


# --- per generation ---------------------------------------------------------------------------------------------


def usable_categories(relevance) -> set[str]:
    """Categories whose heads calibration found (a category with no votes has no top heads)."""
    return {c for c, v in zip(relevance.categories, relevance.votes) if int(np.asarray(v).sum()) > 0}


def candidate_categories(concept, usable: set[str]) -> list[str]:
    """The categories a word can belong to (by the lexicon, any role), among those the model has heads for."""
    from auditor.lexicon import lookup

    found = [concept.category] + [lookup(concept.lemma or concept.text, r) for r in ("attribute", "object")]
    found += [lookup(concept.text, r) for r in ("attribute", "object")]
    return [c for c in dict.fromkeys(found) if c in usable]


def side_of(position_text: str) -> str | None:
    words = position_text.lower().split()
    return next((w for w in _SIDE_WORDS if w in words), None)


def scored_concepts(concepts) -> list:
    """The concepts that get maps and verdicts: visible roles with tokens inside the model's window."""
    return [c for c in concepts.items if c.role in MAPPED_ROLES and c.token_indices and not c.negated]


def generation_record(tr, concepts, relevance, th: Thresholds, k: int, image=None) -> tuple[list[dict], dict, dict]:
    """Maps, scores and flags of every scored concept of one traced generation (``image``, the generated one, for
    the image-side scores: is a colour word's colour drawn, does an object's map peak on anything drawn).

    Returns (concept records, maps {"<i>_<method>": raw map}, normalised maps for overlays). Attribute bindings
    (``binds_to``) index this list, so a record stands on its own."""
    from auditor.diagnostics import ConceptView, diagnose
    from auditor.engine.maps import concept_map, category_response, normalise

    usable = usable_categories(relevance)
    chosen = scored_concepts(concepts)
    index = {c.id: i for i, c in enumerate(chosen)}
    records, raw_maps, norms, views = [], {}, {}, []
    for i, c in enumerate(chosen):
        method = "selective" if c.category in usable else "all_heads"
        maps = {"selective": None, "all_heads": None}
        maps["all_heads"] = concept_map(tr, c.token_indices, "all_heads", relevance, c.category, k)
        if method == "selective":
            maps["selective"] = concept_map(tr, c.token_indices, "selective", relevance, c.category, k)
        primary = maps[method]
        view = ConceptView(index=i, text=c.text, role=c.role, category=c.category, raw=primary.raw,
                           binds_to=index.get(c.binds_to) if c.role == "attribute" else None)
        cands = candidate_categories(c, usable)
        if len(cands) > 1 and c.category in usable:
            view.category_response = category_response(tr, c.token_indices, relevance, cands, k)
            view.expected_category = c.category
        views.append(view)
        rec = {"id": i, "text": c.text, "lemma": c.lemma, "role": c.role, "category": c.category,
               "category_source": c.category_source, "binds_to": view.binds_to, "token_indices": list(c.token_indices),
               "map_method": method}
        if c.role == "object":
            rec["count"] = c.count
        if method != "selective":
            rec["note"] = (f"no calibrated heads for category {c.category!r}: verdicts use the all-heads map")
        if view.category_response:
            rec["category_response"] = {k_: round(v, 6) for k_, v in view.category_response.items()}
        records.append(rec)
        for name, m in maps.items():
            if m is not None:
                raw_maps[f"{i}_{name}"] = m.raw.astype(np.float16)
                norms[f"{i}_{name}"] = normalise(m.raw)
    # Where the prompt puts things: absolute positions and relations between objects.
    for c in concepts.items:
        if c.role == "position" and c.binds_to in index and side_of(c.text):
            views[index[c.binds_to]].position = side_of(c.text)
        if c.role == "relation" and c.subject in index and c.object in index:
            views[index[c.subject]].relations.append((c.text.lower(), index[c.object]))
    for v, rec in zip(views, records):
        if v.position:
            rec["position"] = v.position
        if v.relations:
            rec["relations"] = [{"relation": r, "object": o} for r, o in v.relations]
    sc, flags = diagnose(views, th, None if image is None else np.asarray(image.convert("RGB")))
    for i, rec in enumerate(records):
        rec["scores"] = {k_: _clean(v) for k_, v in sc.get(i, {}).items()}
        rec["flags"] = [f.to_json() for f in flags if f.concept == i]
    return records, raw_maps, norms


def _clean(v):
    if isinstance(v, (float, np.floating)):
        return round(float(v), 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def generate_one(pipe, prompt: str, seed: int, steps: int, guidance: float, resolution, relevance):
    """One image under trace; the generator is seeded per (prompt, seed) so a resume reproduces it exactly."""
    from auditor.engine.capture import trace

    g = torch.Generator("cpu").manual_seed(int(seed))
    size = {"height": resolution[0], "width": resolution[1]} if resolution else {}
    with trace(pipe, relevance=relevance) as tr:
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g, **size).images[0]
    return image, tr


# --- the run ------------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_manifest(argv, lm, suite, suite_path: Path, seeds, steps, guidance, resolution, device, dtype,
                   th: Thresholds, k: int, relevance) -> dict:
    from auditor.engine.maps import MASK_POLICY
    from auditor.manifest import manifest_base

    m = manifest_base(argv)
    model = lm.to_json()
    m.update({
        "model": {"name": model.get("name"), "fingerprint": lm.fingerprint, "source": model.get("source"),
                  "path": model.get("path"), "pipeline": type(lm.pipe).__name__},
        "suite": {"name": suite.name, "path": str(suite_path), "sha256": sha256_of(suite_path),
                  "prompt_ids": [p.id for p in suite.prompts],
                  "acceptance": suite.acceptance.model_dump(mode="json") if suite.acceptance else None},
        "seeds": list(seeds), "steps": int(steps), "guidance": float(guidance), "resolution": list(resolution) if resolution else None,
        "device": device, "dtype": dtype,
        "thresholds": th.to_json(),
        "method": {"maps": "selective (top-k heads of the concept's category)", "k": int(k), "mask_policy": MASK_POLICY,
                   "baseline": "all_heads"},
        "relevance": {"sha256": relevance.sha256, "prompts": int(relevance.budget_prompts),
                      "steps": int(relevance.steps), "converged": bool(relevance.converged),
                      "categories": list(relevance.categories), "source": relevance.prompt_source},
    })
    return m


def _resumed_settings(run_dir: Path) -> dict:
    from auditor.store import RunStore

    with RunStore.open(run_dir) as store:
        return dict(store.manifest)


def run_audit(opts: AuditOptions, argv: list[str] | None = None,
              progress: Callable[[int, int], object] | None = None) -> AuditResult:
    """The whole audit. ``progress(total, done)`` returns an object with ``update(n)`` (e.g. a tqdm bar)."""
    from auditor.concepts import extract_many
    from auditor.engine.models import load_model
    from auditor.engine.relevance import relevance_for
    from auditor.report.render import publish
    from auditor.resources import find_suite
    from auditor.store import RunStore
    from auditor.suites import load_suite
    from auditor.thresholds import load as load_thresholds
    from auditor.zoo import DEFAULT_MODEL

    t0 = time.perf_counter()
    if opts.fail_on is not None and opts.fail_on not in FAIL_ON:
        raise AuditorError(f"--fail-on {opts.fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    suite_path = find_suite(opts.suite)
    suite = load_suite(suite_path)
    prior = None
    if opts.resume:
        prior = _resumed_settings(Path(opts.resume))
        _check_resume(prior, opts, suite_path)
    model_spec = opts.model or ((prior or {}).get("model") or {}).get("path") or DEFAULT_MODEL
    if prior is not None and opts.model is None and ((prior.get("model") or {}).get("source") == "bundled"):
        model_spec = prior["model"]["name"]
    seeds = list(opts.seeds) if opts.seeds else list((prior or {}).get("seeds") or suite.defaults.seeds)
    steps = int(opts.steps or (prior or {}).get("steps") or suite.defaults.steps)
    guidance, resolution = float(suite.defaults.guidance), suite.defaults.resolution
    if steps < 1:
        raise AuditorError(f"--steps {steps}: must be at least 1")

    lm = load_model(model_spec, opts.device, opts.dtype, opts.allow_pickle)
    pipe = lm.pipe
    pipe.set_progress_bar_config(disable=True)
    relevance = relevance_for(pipe, opts.relevance)
    th = load_thresholds()
    k = int(opts.k or th.k)
    manifest = build_manifest(argv, lm, suite, suite_path, seeds, steps, guidance, resolution, lm.device, lm.dtype,
                              th, k, relevance)
    if prior is not None:
        if prior.get("model", {}).get("fingerprint") != lm.fingerprint:
            raise AuditorError(f"--resume {opts.resume}: the run was made with model {prior['model'].get('name')} "
                               f"(fingerprint {str(prior['model'].get('fingerprint'))[:12]}), not {lm.name}")
        manifest["run_id"], manifest["start_time"] = prior["run_id"], prior["start_time"]
    from auditor.manifest import new_run_id

    manifest.setdefault("run_id", new_run_id(manifest))
    run_dir = Path(opts.resume or opts.out or Path("reports") / manifest["run_id"])
    extracted = extract_many(suite.prompts, tokenizer=pipe.tokenizer)
    for p, cs in zip(suite.prompts, extracted):  # refused before anything is written
        cs.refuse_if_truncated(f"{suite_path}: prompt {p.id!r}", pipe.tokenizer)
    store = RunStore.create(run_dir, manifest)
    with _finished_generations_kept(run_dir):
        with store:
            if not (run_dir / "relevance.npz").exists():
                store.save_relevance(relevance.categories, relevance.head_names, relevance.matrix)
            done = store.finished()
            todo = [(p, cs, s) for p, cs in zip(suite.prompts, extracted) for s in seeds if (p.id, s) not in done]
            skipped = len(suite.prompts) * len(seeds) - len(todo)
            bar = progress(len(suite.prompts) * len(seeds), skipped) if progress else None
            try:
                for p, cs, seed in todo:
                    image, tr = generate_one(pipe, p.text, seed, steps, guidance, resolution, relevance)
                    concepts, raw_maps, norms = generation_record(tr, cs, relevance, th, k, image)
                    del tr
                    overlays = _overlays(image, norms, concepts)
                    store.add_generation({"prompt_id": p.id, "prompt": p.text, "seed": int(seed), "tags": list(p.tags),
                                          "concepts": concepts}, image, raw_maps, overlays)
                    if bar is not None:
                        bar.update(1)
            finally:  # end the bar's line so an error message gets a line of its own
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
            from auditor.summary import summarise

            summary = summarise(store.generations(), suite.acceptance, th.max_flag_rate)
            store.finish(summary)
        files = publish(run_dir, pdf=opts.pdf)
    result = AuditResult(run_dir, summary, files, len(todo), skipped, time.perf_counter() - t0)
    result.gate = gate(summary, opts.fail_on)
    return result


@contextmanager
def _finished_generations_kept(run_dir: Path):
    """Said here, not where a write failed (the store and the reports serve `auditor report` too): only an audit
    has finished generations to keep."""
    try:
        yield
    except AuditorError as exc:
        raise AuditorError(f"{exc}; finished generations are kept (continue with --resume {run_dir})") from None


def _overlays(image, norms: dict, concepts: list[dict]) -> dict:
    from auditor.engine.maps import overlay

    return {key: overlay(image, m, alpha=0.55) for key, m in norms.items()}


def _check_resume(prior: dict, opts: AuditOptions, suite_path: Path) -> None:
    """Refuse to continue a run with another suite or other settings: the results would mix two audits."""
    suite = prior.get("suite") or {}
    if suite.get("sha256") and suite_path.is_file() and sha256_of(suite_path) != suite["sha256"]:
        raise AuditorError(f"--resume {opts.resume}: the run audited suite {suite.get('path')} "
                           f"(sha256 {suite['sha256'][:12]}); {suite_path} differs")
    if opts.seeds and list(opts.seeds) != list(prior.get("seeds") or []):
        raise AuditorError(f"--resume {opts.resume}: the run used seeds {prior.get('seeds')}, not {opts.seeds}")
    if opts.steps and int(opts.steps) != int(prior.get("steps") or 0):
        raise AuditorError(f"--resume {opts.resume}: the run used {prior.get('steps')} steps, not {opts.steps}")


def gate(summary: dict, fail_on: str | None) -> str | None:
    """Why the audit fails the user's gate, or None. A concept counts when it fails its prompt (flagged in more
    than the configured share of seeds) for that flag type; ``any`` also fails on unmet acceptance criteria."""
    if fail_on is None:
        return None
    failing = [c for c in summary.get("concepts", []) if not c["passed"]
               and (fail_on == "any" or c["by_type"].get(fail_on, 0) > 0)]
    reasons = []
    if failing:
        names = ", ".join(f"{c['prompt_id']}:{c['text']}" for c in failing[:5])
        reasons.append(f"{len(failing)} concept(s) fail with {fail_on if fail_on != 'any' else 'flags'} ({names}"
                       f"{', ...' if len(failing) > 5 else ''})")
    acc = summary.get("acceptance") or {}
    if fail_on == "any" and acc.get("declared") and not acc.get("passed"):
        bad = [c["criterion"] for c in acc.get("criteria", []) if not c["passed"]]
        reasons.append(f"acceptance criteria not met: {', '.join(bad)}")
    return "; ".join(reasons) or None


def raise_gate(result: AuditResult) -> None:
    if result.gate:
        raise GateFailure(f"audit gate: {result.gate}")
