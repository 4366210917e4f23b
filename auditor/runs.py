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

FAIL_ON = ("missing", "misplaced", "misinterpreted", "any")
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
    profile: str | None = None  # an audit profile file; None: the model's own (shipped or cached)
    allow_pickle: bool = False
    k: int | None = None
    fail_on: str | None = None
    variant: str | None = None  # the weight files' variant (fp16); None: the plain files, or on resume the run's
    height: int | None = None  # image size; None: the suite's resolution, or on resume the run's
    width: int | None = None


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
    from auditor.concepts import VISIBLE_ROLES

    return [c for c in concepts.items if c.role in VISIBLE_ROLES and c.token_indices and not c.negated]


def generation_record(tr, concepts, profile, image=None, k: int | None = None) -> tuple[list[dict], dict, dict]:
    """Maps, scores and flags of every scored concept of one traced generation (``image``, the generated one, for
    the image-side scores: is a colour word's colour drawn, does an object's map peak on anything drawn).

    Selective maps take each category's top heads and k from ``profile`` (``auditor.profile.AuditProfile``; ``k``
    overrides its k for every category); the category response reads its HRV matrix. An uncalibrated profile
    gives scores and no flags.

    Returns (concept records, maps {"<i>_<method>": raw map}, normalised maps for overlays). Attribute bindings
    (``binds_to``) index this list, so a record stands on its own."""
    from auditor.diagnostics import ConceptView, diagnose
    from auditor.engine.maps import category_response, concept_map, normalise

    relevance = profile.relevance
    ranking = profile.maps_source
    usable = {c for c in relevance.categories if relevance.ranks(c)}  # categories the category response can read
    chosen = scored_concepts(concepts)
    index = {c.id: i for i, c in enumerate(chosen)}
    records, raw_maps, norms, views = [], {}, {}, []
    for i, c in enumerate(chosen):
        method = "selective" if ranking.ranks(c.category) else "all_heads"
        maps = {"selective": None, "all_heads": concept_map(tr, c.token_indices, "all_heads")}
        if method == "selective":
            maps["selective"] = concept_map(tr, c.token_indices, "selective", ranking, c.category, k)
        primary = maps[method]
        view = ConceptView(index=i, text=c.text, role=c.role, category=c.category, raw=primary.raw,
                           binds_to=index.get(c.binds_to) if c.role == "attribute" else None)
        cands = candidate_categories(c, usable)
        if len(cands) > 1 and c.category in usable:
            view.category_response = category_response(tr, c.token_indices, relevance, cands, profile.response_k)
            view.expected_category = c.category
        views.append(view)
        rec = {"id": i, "text": c.text, "lemma": c.lemma, "role": c.role, "category": c.category,
               "category_source": c.category_source, "binds_to": view.binds_to, "token_indices": list(c.token_indices),
               "map_method": method}
        if primary.k is not None:
            rec["k"] = primary.k
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
    th = profile.judging_thresholds()
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


def generate_one(pipe, prompt: str, seed: int, steps: int, guidance: float, resolution):
    """One image under trace; the generator is seeded per (prompt, seed) so a resume reproduces it exactly."""
    from auditor.engine.capture import trace

    g = torch.Generator("cpu").manual_seed(int(seed))
    size = {"height": resolution[0], "width": resolution[1]} if resolution else {}
    with trace(pipe) as tr:
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g, **size).images[0]
    return image, tr


# --- the run ------------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_manifest(argv, lm, suite, suite_path: Path, seeds, steps, guidance, resolution, device, dtype,
                   profile, k: int | None) -> dict:
    from auditor.engine.maps import MASK_POLICY
    from auditor.manifest import manifest_base

    m = manifest_base(argv)
    model = lm.to_json()
    relevance = profile.relevance
    th = profile.judging_thresholds()
    m.update({
        "model": {"name": model.get("name"), "fingerprint": lm.fingerprint, "source": model.get("source"),
                  "path": model.get("path"), "pipeline": type(lm.pipe).__name__,
                  # only when set: a plain load keeps the identity of runs made before variants existed
                  **({"variant": lm.variant} if lm.variant else {})},
        "suite": {"name": suite.name, "path": str(suite_path), "sha256": sha256_of(suite_path),
                  "prompt_ids": [p.id for p in suite.prompts],
                  "acceptance": suite.acceptance.model_dump(mode="json") if suite.acceptance else None},
        "seeds": list(seeds), "steps": int(steps), "guidance": float(guidance), "resolution": list(resolution) if resolution else None,
        "device": device, "dtype": dtype,
        "calibrated": profile.calibrated,
        "thresholds": None if th is None else th.to_json(),
        "profile": {"sha256": profile.sha256, "maps_ranking": profile.maps_ranking,
                    "k_per_category": profile.k_per_category(), "response_k": profile.response_k,
                    "image_checks": profile.image_checks, "provenance": profile.provenance},
        "method": {"maps": f"selective (the top-k heads of the concept's category by the profile's "
                           f"{profile.maps_ranking} ranking; DAAM's aggregation over them)",
                   "k": None if k is None else int(k), "k_source": "--k" if k is not None else "profile",
                   "mask_policy": MASK_POLICY, "baseline": "all_heads (DAAM's default aggregation)"},
        "relevance": {"sha256": relevance.sha256, "prompts": int(relevance.budget_prompts),
                      "steps": int(relevance.steps), "converged": bool(relevance.converged),
                      "categories": list(relevance.categories), "source": relevance.prompt_source},
    })
    return m


def _resumed_settings(run_dir: Path) -> tuple[dict, str | None]:
    """The run's manifest, with the folder's lock kept (the returned key) for the rest of the resume. A folder that
    differs from its records is refused: continuing it would hand over altered evidence under new checksums."""
    from auditor.store import RunStore, acquire_lock

    with RunStore.open(run_dir) as store:
        altered = [p for p in store.verify() if "not recorded" not in p]  # a run from before records resumes
        if altered:
            raise store.integrity_error(altered, "it cannot be continued; audit again into a new folder")
        return dict(store.manifest), acquire_lock(run_dir)


def check_values(opts: AuditOptions) -> None:
    """The options' values, refused as given (0 is a value, not "unset"), before anything is loaded."""
    from auditor.store import MAX_SEED

    if opts.fail_on is not None and opts.fail_on not in FAIL_ON:
        raise AuditorError(f"--fail-on {opts.fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    if opts.steps is not None and opts.steps < 1:
        raise AuditorError(f"--steps {opts.steps}: must be at least 1")
    if opts.k is not None and opts.k < 1:
        raise AuditorError(f"--k {opts.k}: must be at least 1 head")
    for seed in opts.seeds or []:
        if not 0 <= seed <= MAX_SEED:
            raise AuditorError(f"--seeds: {seed} is out of range (0 to {MAX_SEED})")


def check_generation_values(steps: int, seed: int, guidance: float, k: int | None) -> None:
    """`maps` and `calibrate`: the generation options' values as given, before the model is loaded."""
    from auditor.store import MAX_SEED

    if steps < 1:
        raise AuditorError(f"--steps {steps}: must be at least 1")
    if not 0 <= seed <= MAX_SEED:
        raise AuditorError(f"--seed {seed}: out of range (0 to {MAX_SEED})")
    if not (np.isfinite(guidance) and guidance >= 0):
        raise AuditorError(f"--guidance {guidance}: must be a finite number >= 0")
    if k is not None and k < 1:
        raise AuditorError(f"--k {k}: must be at least 1 head")


def check_steps(steps: int, pipe) -> None:
    """More denoising steps than the scheduler was trained with cannot be scheduled."""
    trained = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if trained and steps > int(trained):
        raise AuditorError(f"--steps {steps}: the model's scheduler was trained with {trained} steps; use at most that")


def check_model_values(steps: int, k: int | None, pipe, relevance) -> None:
    """Values only the loaded model can judge: its scheduler's training steps, its number of heads, the matrix."""
    check_steps(steps, pipe)
    heads = len(relevance.head_names)
    if k is not None and k > heads:
        raise AuditorError(f"--k {k}: the model has {heads} cross-attention heads; use at most that")
    matrix = np.asarray(relevance.matrix, dtype=np.float64)
    if not np.isfinite(matrix).all():
        bad = int((~np.isfinite(matrix)).sum())
        raise AuditorError(f"relevance matrix {relevance.sha256[:12]}: {bad} of {matrix.size} values are NaN or "
                           f"infinite; recalibrate (`auditor calibrate`) or pass another --relevance")


def run_audit(opts: AuditOptions, argv: list[str] | None = None,
              progress: Callable[[int, int], object] | None = None) -> AuditResult:
    """The whole audit. ``progress(total, done)`` returns an object with ``update(n)`` (e.g. a tqdm bar)."""
    from auditor.resources import find_suite
    from auditor.store import release_lock
    from auditor.suites import load_suite

    t0 = time.perf_counter()
    check_values(opts)
    suite_path = find_suite(opts.suite)
    suite = load_suite(suite_path)
    prior, resume_lock = None, None
    if opts.resume:
        prior, resume_lock = _resumed_settings(Path(opts.resume))
    try:
        if prior is not None:
            _check_resume(prior, opts, suite_path)
        return _run(opts, argv, progress, t0, suite_path, suite, prior)
    finally:
        release_lock(resume_lock)


def _run(opts, argv, progress, t0, suite_path, suite, prior) -> AuditResult:
    from auditor.concepts import extract_many
    from auditor.engine.models import load_model
    from auditor.profile import profile_for
    from auditor.report.render import publish
    from auditor.store import RELEVANCE_NAME, RunStore, run_lock
    from auditor.zoo import DEFAULT_MODEL

    model_spec = opts.model or ((prior or {}).get("model") or {}).get("path") or DEFAULT_MODEL
    if prior is not None and opts.model is None and ((prior.get("model") or {}).get("source") == "bundled"):
        model_spec = prior["model"]["name"]
    seeds = list(opts.seeds) if opts.seeds else list((prior or {}).get("seeds") or suite.defaults.seeds)
    steps = int(opts.steps if opts.steps is not None else (prior or {}).get("steps") or suite.defaults.steps)
    guidance = float(suite.defaults.guidance)
    check_image_size(opts.height, opts.width)
    variant = opts.variant or ((prior or {}).get("model") or {}).get("variant")

    lm = load_model(model_spec, opts.device, opts.dtype, opts.allow_pickle, variant)
    resolution = image_size(opts.height, opts.width, (prior or {}).get("resolution") or suite.defaults.resolution,
                            lm.pipe)
    pipe = lm.pipe
    pipe.set_progress_bar_config(disable=True)
    profile = profile_for(lm, opts.profile, opts.relevance)
    relevance = profile.relevance
    th = profile.judging_thresholds()
    k = opts.k
    check_model_values(steps, k, pipe, relevance)
    manifest = build_manifest(argv, lm, suite, suite_path, seeds, steps, guidance, resolution, lm.device, lm.dtype,
                              profile, k)
    if prior is not None:
        if prior.get("model", {}).get("fingerprint") != lm.fingerprint:
            raise AuditorError(f"--resume {opts.resume}: the run was made with model {prior['model'].get('name')} "
                               f"(fingerprint {str(prior['model'].get('fingerprint'))[:12]}), not {lm.name}")
        was = (prior.get("profile") or {}).get("sha256")
        if was and was != profile.sha256:
            raise AuditorError(f"--resume {opts.resume}: the run used audit profile {was[:12]}, not "
                               f"{profile.sha256[:12]}; results judged by two profiles cannot be mixed")
        manifest["run_id"], manifest["start_time"] = prior["run_id"], prior["start_time"]
    from auditor.manifest import new_run_id

    manifest.setdefault("run_id", new_run_id(manifest))
    run_dir = Path(opts.resume or opts.out or Path("reports") / manifest["run_id"])
    extracted = extract_many(suite.prompts, tokenizer=pipe.tokenizer)
    for p, cs in zip(suite.prompts, extracted):  # refused before anything is written
        cs.refuse_if_truncated(f"{suite_path}: prompt {p.id!r}", pipe.tokenizer)
    store = RunStore.create(run_dir, manifest)
    if prior is None and store.manifest.get("resumed_at"):  # the same run again into its own --out: a resume
        altered = [p for p in store.verify() if "not recorded" not in p]
        if altered:
            store.close()
            raise store.integrity_error(altered, "it cannot be continued; audit again into a new folder")
    with run_lock(run_dir), _finished_generations_kept(run_dir):  # held from creation through the reports
        with store:
            if RELEVANCE_NAME not in store.artifacts() and not (run_dir / RELEVANCE_NAME).exists():
                store.save_relevance(relevance.categories, relevance.head_names, relevance.matrix)
            done = store.finished()
            todo = [(p, cs, s) for p, cs in zip(suite.prompts, extracted) for s in seeds if (p.id, s) not in done]
            skipped = len(suite.prompts) * len(seeds) - len(todo)
            bar = progress(len(suite.prompts) * len(seeds), skipped) if progress else None
            try:
                for p, cs, seed in todo:
                    # the prompt as parsed: token indices refer to it (invisible characters removed, forms folded)
                    image, tr = generate_one(pipe, cs.prompt, seed, steps, guidance, resolution)
                    concepts, raw_maps, norms = generation_record(tr, cs, profile, image, k)
                    del tr
                    overlays = _overlays(image, norms, concepts)
                    row = {"prompt_id": p.id, "prompt": cs.prompt, "seed": int(seed), "tags": list(p.tags),
                           "concepts": concepts}
                    if cs.original is not None:
                        row["prompt_as_given"], row["prompt_changes"] = cs.original, list(cs.changes)
                    store.add_generation(row, image, raw_maps, overlays)
                    if bar is not None:
                        bar.update(1)
            finally:  # end the bar's line so an error message gets a line of its own
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
            from auditor.summary import summarise

            summary = summarise(store.generations(), suite.acceptance, None if th is None else th.max_flag_rate)
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
    from auditor.prompt_maps import overlay

    return {key: overlay(image, m, alpha=0.55) for key, m in norms.items()}


def check_image_size(height: int | None, width: int | None) -> None:
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 8 or value % 8):
            raise AuditorError(f"{name} {value}: must be a positive multiple of 8 (the VAE's downsampling)")


def image_size(height: int | None, width: int | None, default, pipe) -> tuple[int, int] | None:
    """(height, width) to generate: --height/--width over ``default`` (the suite's or resumed run's resolution); one
    given alone keeps the other side of ``default``, or of the model's native square size. None: the model's own."""
    check_image_size(height, width)
    if height is None and width is None:
        return tuple(default) if default else None
    if not default:
        native = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8) or 8)
        default = (native, native)
    return (int(height or default[0]), int(width or default[1]))


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
    was = prior.get("resolution")
    for name, value, side in (("--height", opts.height, 0), ("--width", opts.width, 1)):
        if value is not None and (not was or int(was[side]) != value):
            size = f"{was[0]}x{was[1]}" if was else "the model's native size"
            raise AuditorError(f"--resume {opts.resume}: the run's images are {size} (height x width), "
                               f"not {name} {value}")


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
