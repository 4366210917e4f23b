"""An audit run: every (prompt, seed) of a suite generated under trace, its concepts mapped and diagnosed, each
finished generation committed to the run store, then the summary and the reports. A killed run resumes where it
stopped: finished generations are never redone, and each generation depends only on its own prompt and seed, so
the final results equal an uninterrupted run's.

Stages are functions over records: ``tasks`` plans the run and does each task, ``image_record`` is the whole
per-image audit, ``run_checks`` refuses bad values before anything is written; the store is the edge, and the CLI
hands in how the reports are published.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from auditor.engine import image_read as ir
from auditor.engine.maps import MASK_POLICY
from auditor.engine.models import load_model
from auditor.errors import AuditorError, GateFailure
from auditor.executors import ExecutionOptions, open_executor
from auditor.given_images import plan_given_images
from auditor.manifest import manifest_base, new_run_id
from auditor.profile import profile_for
from auditor.registry import DEFAULT_MODEL
from auditor.resources import find_suite
from auditor.run_checks import (check_image_size, check_model_values, check_resume, check_values, image_size,
                                resumed_settings, sha256_of)
from auditor.store import RELEVANCE_NAME, RunStore, release_lock, run_lock
from auditor.suites import load_suite
from auditor.summary import summarise
from auditor.tasks import TaskSettings, plan_tasks, task_row


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
    # how generations run (none of it changes the results, so a resume may choose differently): auditor.executors
    executor: str = "local"
    batch_size: int = 1
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    # given images instead of generations (auditor.given_images): a folder or manifest.jsonl, and how to read them
    images: str | None = None
    timesteps: list[int] | None = None  # None: auditor.engine.image_read.default_timesteps
    draws: int = 1

    def execution(self):
        return ExecutionOptions(self.executor, self.batch_size, self.ray_address, self.workers, self.gpus_per_worker)


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


# --- the run ------------------------------------------------------------------------------------------------------


def build_manifest(argv, lm, suite, suite_path: Path, seeds, steps, guidance, resolution, device, dtype,
                   profile, k: int | None) -> dict:
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


def run_audit(opts: AuditOptions, argv: list[str] | None = None,
              progress: Callable[[int, int], object] | None = None,
              publish: Callable[..., list[Path]] | None = None) -> AuditResult:
    """The whole audit: every task generated (or read) and stored, the summary, then the reports.

    Args:
        opts: what to audit and how.
        argv: the command line, recorded in the manifest.
        progress: ``progress(total, done)`` returns an object with ``update(n)`` (e.g. a tqdm bar).
        publish: ``publish(run_dir, pdf=...)`` writes the reports (the CLI passes ``report.render.publish``) while
            the run folder is still locked; None writes none (the store holds every result).

    Returns:
        The ``AuditResult``; ``gate`` says why it fails ``opts.fail_on``, if it does.
    """
    t0 = time.perf_counter()
    check_values(opts)
    suite_path = find_suite(opts.suite)
    suite = load_suite(suite_path)
    prior, resume_lock = None, None
    if opts.resume:
        prior, resume_lock = resumed_settings(Path(opts.resume))
    try:
        if prior is not None:
            check_resume(prior, opts, suite_path)
        return _run(opts, argv, progress, t0, suite_path, suite, prior, publish)
    finally:
        release_lock(resume_lock)


def _run(opts, argv, progress, t0, suite_path, suite, prior, publish) -> AuditResult:
    model_spec = opts.model or ((prior or {}).get("model") or {}).get("path") or DEFAULT_MODEL
    if prior is not None and opts.model is None and ((prior.get("model") or {}).get("source") == "bundled"):
        model_spec = prior["model"]["name"]
    seeds = list(opts.seeds) if opts.seeds else list((prior or {}).get("seeds") or suite.defaults.seeds)
    steps = int(opts.steps if opts.steps is not None else (prior or {}).get("steps") or suite.defaults.steps)
    guidance = float(suite.defaults.guidance)
    check_image_size(opts.height, opts.width)
    variant = opts.variant or ((prior or {}).get("model") or {}).get("variant")

    # Ray workers load their own copies on their own devices: the driver's copy only reads the tokenizer, the
    # scheduler and the fingerprint, so it stays off the GPUs the workers need.
    lm = load_model(model_spec, "cpu" if opts.executor == "ray" else opts.device, opts.dtype, opts.allow_pickle,
                    variant)
    resolution = image_size(opts.height, opts.width, (prior or {}).get("resolution") or suite.defaults.resolution,
                            lm.pipe)
    pipe = lm.pipe
    pipe.set_progress_bar_config(disable=True)
    profile = profile_for(lm, opts.profile, opts.relevance)
    k = opts.k
    check_model_values(steps, k, pipe, profile.relevance)
    given, reading = _given_images(opts, prior, suite, pipe)
    settings = TaskSettings(steps, guidance, resolution, profile, k, reading)
    with open_executor(opts.execution(), lm, settings, opts.device, opts.allow_pickle) as executor:
        return _audit(opts, argv, progress, t0, suite_path, suite, prior, lm, seeds, settings, executor, given,
                      publish)


def _given_images(opts, prior, suite, pipe):
    """(the given images, (timesteps, draws)) of an audit of given images, checked before anything is written;
    (None, None) for an audit that generates. A resume reads the same images the same way or not at all."""
    was = (prior or {}).get("given_images")
    if prior is not None and was is None and (opts.images is not None or opts.timesteps or opts.draws != 1):
        raise AuditorError(f"--resume {opts.resume}: the run generated its images; --images, --timesteps and "
                           f"--draws read given images in a new run")
    source = opts.images or (was or {}).get("source")
    if source is None:
        return None, None
    ts = ir.check_timesteps(pipe, opts.timesteps or (was or {}).get("timesteps") or ir.default_timesteps(pipe))
    draws = int(opts.draws if opts.draws != 1 or was is None else was.get("draws", 1))
    if was is not None and (list(ts) != list(was.get("timesteps") or []) or draws != was.get("draws")):
        raise AuditorError(f"--resume {opts.resume}: the run read its images at timesteps {was.get('timesteps')} "
                           f"with {was.get('draws')} draw(s); a resume reads them the same way")
    given = plan_given_images(source, suite, lambda path: ir.read_size(pipe, ir.image_shape(path)))
    if was is not None and [g.to_json() for g in given] != was.get("images"):
        raise AuditorError(f"--resume {opts.resume}: the images in {source} are not the ones the run started with")
    return given, (ts, draws)


def _audit(opts, argv, progress, t0, suite_path, suite, prior, lm, seeds, settings, executor,
           given=None, publish=None) -> AuditResult:
    """The run once the model is loaded and the executor started: manifest, store, every unfinished task."""
    pipe, profile, k = lm.pipe, settings.profile, settings.k
    relevance, th = profile.relevance, profile.judging_thresholds()
    manifest = build_manifest(argv, lm, suite, suite_path, seeds, settings.steps, settings.guidance,
                              settings.resolution, executor.device, lm.dtype, profile, k)
    if given is not None:  # nothing was generated: no steps, guidance or size of this run's making
        ts, draws = settings.reading
        manifest.update({"seeds": sorted({g.seed for g in given}), "steps": None, "guidance": None,
                         "resolution": None, "given_images": {
                             "source": str(opts.images or prior["given_images"]["source"]), "timesteps": list(ts),
                             "draws": draws, "noise_seed": "each image's seed (0 unless given)",
                             "images": [g.to_json() for g in given]}})
    if prior is not None:
        if prior.get("model", {}).get("fingerprint") != lm.fingerprint:
            raise AuditorError(f"--resume {opts.resume}: the run was made with model {prior['model'].get('name')} "
                               f"(fingerprint {str(prior['model'].get('fingerprint'))[:12]}), not {lm.name}")
        was = (prior.get("profile") or {}).get("sha256")
        if was and was != profile.sha256:
            raise AuditorError(f"--resume {opts.resume}: the run used audit profile {was[:12]}, not "
                               f"{profile.sha256[:12]}; results judged by two profiles cannot be mixed")
        manifest["run_id"], manifest["start_time"] = prior["run_id"], prior["start_time"]
    manifest.setdefault("run_id", new_run_id(manifest))
    run_dir = Path(opts.resume or opts.out or Path("reports") / manifest["run_id"])
    planned = plan_tasks(suite, suite_path, seeds, pipe, given)
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
            # the prompt as parsed: token indices refer to it (invisible characters removed, forms folded)
            todo = [t for t in planned if (t.prompt_id, t.seed) not in done]
            skipped = len(planned) - len(todo)
            bar = progress(len(planned), skipped) if progress else None
            try:
                for task, res in executor.run(todo):  # in the order they finish (Ray); the store sorts them
                    store.add_generation(task_row(task, res), res.image, res.raw_maps, res.overlays)
                    if bar is not None:
                        bar.update(1)
            finally:  # end the bar's line so an error message gets a line of its own
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
            summary = summarise(store.generations(), suite.acceptance, None if th is None else th.max_flag_rate)
            store.finish(summary)
        files = publish(run_dir, pdf=opts.pdf) if publish is not None else []
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
