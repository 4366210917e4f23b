"""The command line: the only module that parses arguments, prints, and maps errors to exit codes.

Exit codes: 0 ok, 1 a gated failure the user asked for (--fail-on ...), 2 usage or input error.
A user error prints exactly one line: ``auditor: error: <message>``.
"""

from __future__ import annotations

import hashlib

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from auditor import __version__
from auditor.errors import AuditorError, GateFailure

# Plain (click) help, not typer's rich panels: those print every on/off flag as `--json <bool>`, as if it took a
# value.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help=("Audit text-to-image diffusion models with selective head-relevance attention maps. Models: the bundled "
          "shapes-v1 and shapes-v2, or a diffusers folder of Stable Diffusion 1.x or 2.x (StableDiffusionPipeline) "
          "or SDXL (StableDiffusionXLPipeline)."),
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"auditor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """auditor: prompt suites -> images -> selective head maps -> flags -> HTML/PDF reports."""


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


# --- commands -----------------------------------------------------------------------------------
# (each command: parse options, call one library function, print; no logic of its own)


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the bundled reference models and their cards."""
    from auditor.zoo import bundled_models

    models = bundled_models()
    if as_json:
        _print_json([m.to_json() for m in models])
        return
    for m in models:
        typer.echo(f"{m.name:12s} {m.version:4s} {m.summary}")
        typer.echo(f"{'':12s} {m.path}")


@app.command("concepts", short_help="Concepts of a prompt: roles, bindings, categories, tokens.")
def concepts_cmd(
    prompt: str = typer.Argument(..., help="The prompt to analyse."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    tokenizer: str = typer.Option("clip", "--tokenizer", help="'clip', 'none', or a local tokenizer folder."),
) -> None:
    """Concepts of a prompt: objects, attributes and what they bind to, counts, relations, categories, tokens."""
    from auditor.concepts import extract, resolve_tokenizer

    result = extract(prompt, resolve_tokenizer(tokenizer))
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(result.to_text())


suite_app = typer.Typer(no_args_is_help=True, help="Prompt suites: validate and summarise.")
app.add_typer(suite_app, name="suite")


@suite_app.command("check")
def suite_check_cmd(
    file: str = typer.Argument(..., help="A suite file (.yaml or .txt) or the name of a shipped suite."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Validate a suite and summarise it: prompts, concepts per category, warnings."""
    from auditor.concepts import resolve_tokenizer
    from auditor.resources import find_suite
    from auditor.suites import check_suite, load_suite

    report = check_suite(load_suite(find_suite(file)), resolve_tokenizer("clip"))
    if as_json:
        _print_json(report.to_json())
    else:
        typer.echo(report.to_text())


# --- engine: maps of one prompt, head-relevance calibration (auditor.engine) ---------------------------------------

_MODEL_HELP = ("A bundled model name, a local diffusers folder, or a hub id already in the local cache "
               "(Stable Diffusion 1.x/2.x or SDXL).")
_VARIANT_HELP = ("Load this variant of the weight files, e.g. fp16 for model.fp16.safetensors (SDXL folders often "
                 "hold only those); default: the plain files.")
_HEIGHT_HELP = "Image height in pixels, a multiple of 8 (default: the suite's resolution, else the model's)."
_WIDTH_HELP = "Image width in pixels, a multiple of 8 (default: the suite's resolution, else the model's)."


@app.command("maps", short_help="Generate one image and write each concept's attention map.")
def maps_cmd(
    prompt: str = typer.Argument(..., help="The prompt to generate and map."),
    concept: Optional[list[str]] = typer.Option(None, "--concept", help="A word to map (repeatable); default: the prompt's lexicon concepts."),
    method: str = typer.Option("selective", "--method", help="selective | all_heads | bottom_k | weighted | all"),
    k: Optional[int] = typer.Option(None, "--k", help="Heads per concept for selective / bottom_k (default: the profile's k of its category)."),
    model: str = typer.Option("shapes-v1", "--model", help=_MODEL_HELP),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(20, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    out: str = typer.Option("reports/maps", "--out", help="Folder for image.png and the overlays."),
    relevance: Optional[str] = typer.Option(None, "--relevance", help="A relevance matrix (.npz) to use instead of the profile's."),
    profile: Optional[str] = typer.Option(None, "--profile", help="An audit profile (profile.json) instead of the model's own."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height in pixels, a multiple of 8 (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width in pixels, a multiple of 8 (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    variant: Optional[str] = typer.Option(None, "--variant", help=_VARIANT_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Generate one image and write each concept's attention map over it (methods side by side with --method all)."""
    from auditor.engine.maps import METHODS
    from auditor.prompt_maps import prompt_maps, save_prompt_maps
    from auditor.engine.models import load_model
    from auditor.profile import profile_for
    from auditor.runs import check_generation_values, check_image_size, check_steps

    if method != "all" and method not in METHODS:
        raise AuditorError(f"--method {method}: expected one of {', '.join(METHODS)}, all")
    methods = list(METHODS) if method == "all" else [method]
    check_image_size(height, width)
    check_generation_values(steps, seed, guidance, k)
    lm = load_model(model, device, dtype, allow_pickle, variant)
    check_steps(steps, lm.pipe)
    ranking = None if methods == ["all_heads"] else profile_for(lm, profile, relevance).maps_source
    result = prompt_maps(lm.pipe, prompt, concept, methods, k, seed, steps, guidance, ranking, height, width)
    record = {"model": lm.to_json(), **save_prompt_maps(result, out)}
    if as_json:
        _print_json(record)
        return
    typer.echo(f"image: {record['image']}")
    for c in record["concepts"]:
        typer.echo(f"{c['text']:16s} {c['category'] or '-':12s} ({c['category_source']}) tokens "
                   f"{','.join(map(str, c['token_indices']))} -> {c['overlay']}")


@app.command("calibrate", short_help="Calibrate the model's audit profile: head rankings, k, thresholds.")
def calibrate_cmd(
    model: str = typer.Option("shapes-v1", "--model", help=_MODEL_HELP),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Calibration prompts: a .txt (one a line) or a suite (.yaml or shipped name); default: general prompts (a bundled model: its world's)."),
    budget: int = typer.Option(512, "--budget", help="At most this many prompts per head ranking; each stops earlier once its top heads agree between n/2 and n."),
    threshold_prompts: int = typer.Option(200, "--threshold-prompts", help="Images generated to set the diagnostic thresholds on (0: an uncalibrated profile, no flags)."),
    flag_budget: float = typer.Option(0.10, "--flag-budget", help="The largest share of the threshold prompts' concepts the thresholds may flag."),
    max_flag_rate: float = typer.Option(0.5, "--max-flag-rate", help="A concept fails its prompt when flagged in more than this share of its seeds."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps per prompt."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale of the calibration images."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[str] = typer.Option(None, "--out", help="Also save the profile here (a .json file)."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    variant: Optional[str] = typer.Option(None, "--variant", help=_VARIANT_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Calibrate the model's audit profile, cached by model fingerprint: HRV head relevance (the category response),
    the localisation ranking with k per category (selective maps), and diagnostic thresholds set on the model's own
    generations to a flag budget (no ground truth)."""
    from tqdm import tqdm

    from auditor.calibration import calibrate_profile
    from auditor.engine.models import load_model
    from auditor.engine.relevance import default_prompts
    from auditor.profile import cache_path
    from auditor.runs import check_generation_values, check_steps

    if budget < 1:
        raise AuditorError(f"--budget {budget}: must be at least 1 prompt")
    if threshold_prompts < 0:
        raise AuditorError(f"--threshold-prompts {threshold_prompts}: must be at least 0")
    if not 0.0 < flag_budget < 1.0:
        raise AuditorError(f"--flag-budget {flag_budget}: must be between 0 and 1")
    if not 0.0 <= max_flag_rate < 1.0:
        raise AuditorError(f"--max-flag-rate {max_flag_rate}: must be at least 0 and below 1")
    check_generation_values(steps, seed, guidance, None)
    if out is not None and Path(out).suffix != ".json":
        raise AuditorError(f"--out {out}: a profile is a .json file")
    chosen, source = _calibration_prompts(prompts)
    lm = load_model(model, device, dtype, allow_pickle, variant)
    check_steps(steps, lm.pipe)
    if chosen is None:
        chosen, source = default_prompts(budget, bundled=lm.source == "bundled", seed=seed)
    lexicon = None
    if lm.source == "bundled":
        from auditor.zoo import lexicon as world_lexicon

        lexicon = world_lexicon()  # only the words the shapes world taught the model
    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int, total: int) -> None:
        if stage not in bars:
            for b in bars.values():
                b.close()
            bars[stage] = tqdm(total=total, desc=stage, unit="prompt", file=sys.stderr)
        bars[stage].update(n)

    try:
        prof = calibrate_profile(lm, chosen, source, budget=budget, threshold_prompts=threshold_prompts,
                                 flag_budget=flag_budget, max_flag_rate=max_flag_rate, steps=steps,
                                 guidance=guidance, seed=seed, lexicon=lexicon, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    saved = [prof.save(cache_path(lm.fingerprint))] + ([prof.save(out)] if out else [])
    summary = {"model": lm.to_json(), "saved": [str(p) for p in saved], **prof.summary()}
    if as_json:
        _print_json(summary)
        return
    rm, hr = prof.relevance, prof.ranking
    typer.echo(f"profile: {', '.join(map(str, saved))}  sha256 {prof.sha256[:16]}")
    typer.echo(f"prompts: {source}")
    typer.echo(f"relevance (HRV): {rm.budget_prompts} prompts x {rm.steps} steps "
               f"({100 * rm.budget_fraction:.2f}% of the original 2,100 x 50), agreement "
               f"{'reached' if rm.converged else 'not reached'}")
    typer.echo(f"ranking (localisation): {hr.budget_prompts} prompts, agreement "
               f"{'reached' if hr.converged else 'not reached'}; k per category "
               + ", ".join(f"{c} {k_}" for c, k_ in prof.k_per_category().items()))
    if prof.calibrated:
        a = prof.provenance["thresholds"]["achieved"]
        typer.echo(f"thresholds: set on {threshold_prompts} generations, {a['rate']:.1%} of their concepts "
                   f"flagged (budget {flag_budget:.0%})")
    else:
        typer.echo("thresholds: none (uncalibrated: audits will map and score, and flag nothing)")


def _calibration_prompts(spec: str | None) -> tuple[list[str] | None, str]:
    """Prompts from --prompts (a .txt file, or any suite) and how the profile names them; (None, "") by default."""
    if spec is None:
        return None, ""
    from auditor.resources import find_suite
    from auditor.suites import load_suite

    path = find_suite(spec)
    suite = load_suite(path)
    texts = [p.text for p in suite.prompts]
    if not texts:
        raise AuditorError(f"--prompts {spec}: no prompt in it")
    return texts, f"{path} ({len(texts)} prompts, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"


# --- the audit (auditor.runs) ---------------------------------------------------------------------------------


def _seed_list(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AuditorError(f"--seeds {text!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise AuditorError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    from auditor.store import MAX_SEED

    if max(seeds) > MAX_SEED:
        raise AuditorError(f"--seeds {text!r}: a seed may be at most {MAX_SEED}")
    return seeds


FAILING_SHOWN = 10  # failing concepts an audit prints, one line each; the report lists them all


# short_help: one line in `auditor --help` (click cuts a longer first sentence mid-phrase at 80 columns)
@app.command("audit", short_help="Audit a model (SD 1.x/2.x or SDXL) on a prompt suite.")
def audit_cmd(
    suite: str = typer.Argument(..., help="A prompt suite (.yaml or .txt), or the name of a shipped one."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma list, e.g. 0,1,2 (default: the suite's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: the suite's)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default reports/<run-id>/)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue an interrupted run in this folder."),
    no_pdf: bool = typer.Option(False, "--no-pdf", help="Skip the PDF report."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="missing | misplaced | misinterpreted | any: exit 1 when the audit finds them."),
    k: Optional[int] = typer.Option(None, "--k", help="Heads per concept for selective maps, every category (default: the profile's k per category)."),
    relevance: Optional[str] = typer.Option(None, "--relevance", help="A relevance matrix (.npz) to use instead of the profile's."),
    profile: Optional[str] = typer.Option(None, "--profile", help="An audit profile (profile.json) instead of the model's own; refused if made for another model."),
    height: Optional[int] = typer.Option(None, "--height", help=_HEIGHT_HELP),
    width: Optional[int] = typer.Option(None, "--width", help=_WIDTH_HELP),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    variant: Optional[str] = typer.Option(None, "--variant", help=_VARIANT_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Audit a model on a prompt suite: generate every (prompt, seed) image, map every concept with its category's
    top heads, and flag what is missing, misplaced or misinterpreted; write the run folder with HTML and PDF reports.

    Models: the bundled shapes-v1 and shapes-v2, or a diffusers folder of Stable Diffusion 1.x or 2.x
    (StableDiffusionPipeline) or SDXL (StableDiffusionXLPipeline); other pipelines are refused."""
    from tqdm import tqdm

    from auditor.runs import AuditOptions, FAIL_ON, raise_gate, run_audit

    if fail_on is not None and fail_on not in FAIL_ON:
        raise AuditorError(f"--fail-on {fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise AuditorError("--resume continues the run in its own folder: leave out --out")
    opts = AuditOptions(suite=suite, model=model, seeds=_seed_list(seeds), steps=steps, out=out, resume=resume,
                        pdf=not no_pdf, device=device, dtype=dtype, relevance=relevance, profile=profile,
                        allow_pickle=allow_pickle, k=k, fail_on=fail_on, variant=variant, height=height, width=width)

    def bar(total: int, done: int):
        return tqdm(total=total, initial=done, desc="generations", unit="image", file=sys.stderr,
                    disable=as_json and not sys.stderr.isatty())

    result = run_audit(opts, sys.argv, progress=bar)
    if not result.summary.get("calibrated", True):
        typer.echo("auditor: warning: uncalibrated: the model's profile has no diagnostic thresholds, so nothing was "
                   "flagged" + (f" and --fail-on {fail_on} cannot fail" if fail_on else "") +
                   "; run `auditor calibrate` for verdicts", err=True)
    if as_json:
        _print_json(result.to_json())
    else:
        s = result.summary
        p, f = s["prompts"], s["fidelity"]
        typer.echo(f"run: {result.run_dir}  ({result.generated} generated, {result.skipped} resumed, "
                   f"{result.seconds:.0f} s)")
        typer.echo(f"prompts: {p['passed']} passed, {p['flagged']} flagged of {p['total']}; "
                   f"fidelity {f['score']} (95% CI {f['ci'][0]}-{f['ci'][1]})")
        typer.echo("flags: " + ", ".join(f"{t} {n}" for t, n in s["flags_by_type"].items()))
        failing = [c for c in s["concepts"] if not c["passed"]]
        for c in failing[:FAILING_SHOWN]:
            typer.echo(f"  fails  {c['prompt_id']}: {c.get('sentence') or c['concept']}")
        if len(failing) > FAILING_SHOWN:
            typer.echo(f"  ... and {len(failing) - FAILING_SHOWN} more failing concepts (report, 'Concepts that fail')")
        acc = s.get("acceptance") or {}
        if acc.get("declared"):
            typer.echo(f"acceptance: {'PASS' if acc['passed'] else 'FAIL'}")
        typer.echo("report: " + ", ".join(str(x) for x in result.files if x.suffix in (".html", ".pdf")))
    raise_gate(result)


# --- run store: re-render a run, compare two runs (auditor.store, auditor.report, auditor.compare) -----------------


@app.command("report", short_help="Re-render a run's reports and checksums from its store.")
def report_cmd(
    run_dir: str = typer.Argument(..., help="A run folder written by `auditor audit`."),
    no_pdf: bool = typer.Option(False, "--no-pdf", help="Skip the PDF (faster)."),
    force: bool = typer.Option(False, "--force", help="Re-render even when files differ from what the audit recorded; the manifest and the report's first page say so."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-render a run's results.json, report.html, report.pdf and checksums from its store (nothing is regenerated).
    The folder is verified first: an altered or missing file is refused unless --force."""
    from auditor.report.render import publish

    notes: list[str] = []
    written = [str(p) for p in publish(run_dir, pdf=not no_pdf, force=force, command_line=sys.argv, notes=notes)]
    for note in notes:
        print(f"auditor: warning: {note}", file=sys.stderr)
    if as_json:
        _print_json({"run_dir": run_dir, "written": written})
    else:
        typer.echo("\n".join(written))


@app.command("verify", short_help="Check a run's files against their recorded sha256.")
def verify_cmd(
    run_dir: str = typer.Argument(..., help="A run folder written by `auditor audit`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check every file of a run against the sha256 recorded when it was written; list what is altered or missing."""
    from auditor.store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        problems = store.verify()
        checked = len(store.artifacts())
        done, planned = store.progress()
        finished = store.is_finished
    status = "finished" if finished else f"unfinished ({done} of {planned or '?'} generations)"
    if as_json:
        _print_json({"run_dir": run_dir, "checked": checked, "status": status, "problems": problems,
                     "intact": not problems})
    else:
        for line in problems:
            typer.echo(line)
        if not problems:
            typer.echo(f"{run_dir}: intact ({checked} files match their recorded sha256; run {status})")
    if problems:
        raise AuditorError(f"{run_dir}: {len(problems)} file(s) differ from what the audit recorded "
                           f"(first: {problems[0]})")


@app.command("compare", short_help="Paired regression statistics of run B against run A; CI gate.")
def compare_cmd(
    run_a: str = typer.Argument(..., help="The reference run folder (before)."),
    run_b: str = typer.Argument(..., help="The run folder to check against it (after)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the compare report (default reports/compare-A-vs-B)."),
    max_regressions: Optional[int] = typer.Option(None, "--max-regressions", help="Exit 1 when more regressions than this."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="'regression': exit 1 on any regression."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Compare unfinished runs too; the report's first page says so."),
    force: bool = typer.Option(False, "--force", help="Compare even when a run's files differ from what its audit recorded; the report says so."),
    no_pdf: bool = typer.Option(False, "--no-pdf", help="Skip the PDF (faster)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Paired regression statistics of run B against run A (same suite and seeds); HTML/PDF report; CI gate."""
    from auditor.compare import check_gate, compare_runs, default_out, gate, to_text
    from auditor.report.compare_report import write_compare

    check_gate(max_regressions, fail_on)
    result = compare_runs(run_a, run_b, allow_partial=allow_partial, force=force)
    for w in result["warnings"]:
        print(f"auditor: warning: {w}", file=sys.stderr)
    written = [str(p) for p in write_compare(result, out or default_out(run_a, run_b), pdf=not no_pdf)]
    if as_json:
        _print_json({**result, "written": written})
    else:
        typer.echo(to_text(result))
        typer.echo("report: " + ", ".join(written))
    failure = gate(result, max_regressions, fail_on)
    if failure:
        raise GateFailure(failure)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the console script; returns the exit code."""
    # The libraries' advice (install accelerate, sequence longer than 77) is not the user's problem: our own
    # messages say what matters, on one line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        app(args=argv, prog_name="auditor", standalone_mode=False)
    except AuditorError as exc:
        print(f"auditor: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except GateFailure as exc:
        print(f"auditor: gate failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    except typer.Exit as exc:  # --version, --help
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("auditor: error: interrupted", file=sys.stderr)
        return 2
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        try:  # typer >= 0.2x carries its own copy of click, whose exceptions are not click's
            from typer._click.exceptions import ClickException
        except ImportError:
            from click.exceptions import ClickException

        if isinstance(exc, ClickException):
            print(f"auditor: error: {_usage_message(exc)}", file=sys.stderr)
            return 2
        if os.environ.get("AUDITOR_TRACEBACK"):
            raise
        # A bug, not the user's input; still one line, and the way to see more.
        what = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"auditor: error: internal error ({what[:300]}); rerun with AUDITOR_TRACEBACK=1 for the traceback "
              f"and report it", file=sys.stderr)
        return 2
    return 0


def _one_line(exc: Exception) -> str:
    # A message quotes user input (paths, prompts) that may hold line breaks; the error stays one line.
    return str(exc).replace("\r", "\\r").replace("\n", "\\n")


def _usage_message(exc) -> str:
    """Click's usage error as one line, with the command whose --help explains it."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return f"{message} (see '{path} --help')" if path else message


if __name__ == "__main__":  # python -m auditor.cli
    sys.exit(main())
