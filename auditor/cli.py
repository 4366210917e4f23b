"""The command line: the only module that parses arguments, prints, and maps errors to exit codes.

Exit codes: 0 ok, 1 a gated failure the user asked for (--fail-on ...), 2 usage or input error.
A user error prints exactly one line: ``auditor: error: <message>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from auditor import __version__
from auditor.errors import AuditorError, GateFailure

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Audit text-to-image diffusion models with selective head-relevance attention maps.",
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


@app.command("concepts")
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

_MODEL_HELP = "A bundled model name, a local diffusers folder, or a hub id already in the local cache."


@app.command("maps")
def maps_cmd(
    prompt: str = typer.Argument(..., help="The prompt to generate and map."),
    concept: Optional[list[str]] = typer.Option(None, "--concept", help="A word to map (repeatable); default: the prompt's lexicon concepts."),
    method: str = typer.Option("selective", "--method", help="selective | all_heads | bottom_k | weighted | all"),
    k: Optional[int] = typer.Option(None, "--k", help="Heads per concept for selective / bottom_k (default: calibrated)."),
    model: str = typer.Option("shapes-v1", "--model", help=_MODEL_HELP),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(20, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    out: str = typer.Option("reports/maps", "--out", help="Folder for image.png and the overlays."),
    relevance: Optional[str] = typer.Option(None, "--relevance", help="A relevance matrix (.npz) to use instead of the model's."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Generate one image and write each concept's attention map over it (methods side by side with --method all)."""
    from auditor.engine.maps import METHODS, prompt_maps, save_prompt_maps
    from auditor.engine.models import load_model
    from auditor.engine.relevance import relevance_for

    if method != "all" and method not in METHODS:
        raise AuditorError(f"--method {method}: expected one of {', '.join(METHODS)}, all")
    methods = list(METHODS) if method == "all" else [method]
    lm = load_model(model, device, dtype, allow_pickle)
    rm = None if methods == ["all_heads"] else relevance_for(lm.pipe, relevance)
    result = prompt_maps(lm.pipe, prompt, concept, methods, k, seed, steps, guidance, rm)
    record = {"model": lm.to_json(), **save_prompt_maps(result, out)}
    if as_json:
        _print_json(record)
        return
    typer.echo(f"image: {record['image']}")
    for c in record["concepts"]:
        typer.echo(f"{c['text']:16s} {c['category'] or '-':12s} ({c['category_source']}) tokens "
                   f"{','.join(map(str, c['token_indices']))} -> {c['overlay']}")


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Option("shapes-v1", "--model", help=_MODEL_HELP),
    budget: int = typer.Option(2100, "--budget", help="At most this many prompts (the original work's budget); stops earlier on agreement."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps per prompt."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale of the calibration images."),
    k: Optional[int] = typer.Option(None, "--k", help="Top-k heads whose agreement stops calibration."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[str] = typer.Option(None, "--out", help="Also save the matrix here (.npz + .json)."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rank the model's cross-attention heads per concept category (head relevance); cached by model fingerprint."""
    from tqdm import tqdm

    from auditor.engine.models import load_model
    from auditor.engine.relevance import cache_path, calibrate_model

    if budget < 1:
        raise AuditorError(f"--budget {budget}: must be at least 1 prompt")
    lm = load_model(model, device, dtype, allow_pickle)
    with tqdm(total=budget, desc="calibrating", unit="prompt", file=sys.stderr) as bar:
        rm = calibrate_model(lm.pipe, bundled=lm.source == "bundled", fingerprint=lm.fingerprint, budget=budget,
                             steps=steps, k=k, seed=seed, guidance_scale=guidance, progress=bar.update)
    saved = [str(cache_path(lm.fingerprint))] + ([str(rm.save(out))] if out else [])
    summary = {"model": lm.to_json(), "saved": saved, **rm.summary()}
    if as_json:
        _print_json({**summary, "agreement_curve": rm.agreement_curve})
        return
    a = summary["agreement"]
    typer.echo(f"budget used: {rm.budget_prompts} prompts x {rm.steps} steps "
               f"({100 * rm.budget_fraction:.2f}% of the original 2,100 x 50)")
    state = "reached" if rm.converged else "not reached"
    typer.echo(f"agreement (top-{rm.k} Jaccard, budget n vs n/2): {state}; min {a['min_jaccard']}, mean {a['mean_jaccard']}")
    typer.echo(f"saved: {', '.join(saved)}  sha256 {rm.sha256[:16]}")
    if summary["no_votes"]:
        typer.echo(f"categories with no votes: {', '.join(summary['no_votes'])}")
    typer.echo("top heads per category:")
    for cat, heads in summary["top_heads"].items():
        typer.echo(f"  {cat:12s} {', '.join(h.replace('.transformer_blocks', '').replace('.attentions', '') for h in heads[:3])}")


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
    return seeds


FAILING_SHOWN = 10  # failing concepts an audit prints, one line each; the report lists them all


@app.command("audit")
def audit_cmd(
    suite: str = typer.Argument(..., help="A prompt suite (.yaml or .txt), or the name of a shipped one."),
    model: Optional[str] = typer.Option(None, "--model", help=_MODEL_HELP),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma list, e.g. 0,1,2 (default: the suite's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: the suite's)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default reports/<run-id>/)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue an interrupted run in this folder."),
    no_pdf: bool = typer.Option(False, "--no-pdf", help="Skip the PDF report."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="missing | misplaced | misinterpreted | any: exit 1 when the audit finds them."),
    k: Optional[int] = typer.Option(None, "--k", help="Heads per concept for selective maps (default: calibrated)."),
    relevance: Optional[str] = typer.Option(None, "--relevance", help="A relevance matrix (.npz) to use instead of the model's."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | mps | auto"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.ckpt): they can run code."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Audit a model on a prompt suite: generate, map every concept with its category's top heads, flag what is
    missing, misplaced or misinterpreted; write the run folder with HTML and PDF reports."""
    from tqdm import tqdm

    from auditor.runs import AuditOptions, FAIL_ON, raise_gate, run_audit

    if fail_on is not None and fail_on not in FAIL_ON:
        raise AuditorError(f"--fail-on {fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise AuditorError("--resume continues the run in its own folder: leave out --out")
    opts = AuditOptions(suite=suite, model=model, seeds=_seed_list(seeds), steps=steps, out=out, resume=resume,
                        pdf=not no_pdf, device=device, dtype=dtype, relevance=relevance, allow_pickle=allow_pickle,
                        k=k, fail_on=fail_on)

    def bar(total: int, done: int):
        return tqdm(total=total, initial=done, desc="generations", unit="image", file=sys.stderr,
                    disable=as_json and not sys.stderr.isatty())

    result = run_audit(opts, sys.argv, progress=bar)
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


@app.command("report")
def report_cmd(
    run_dir: str = typer.Argument(..., help="A run folder written by `auditor audit`."),
    no_pdf: bool = typer.Option(False, "--no-pdf", help="Skip the PDF (faster)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-render a run's results.json, report.html, report.pdf and checksums from its store (nothing is regenerated)."""
    from auditor.report.render import publish

    written = [str(p) for p in publish(run_dir, pdf=not no_pdf)]
    if as_json:
        _print_json({"run_dir": run_dir, "written": written})
    else:
        typer.echo("\n".join(written))


@app.command("compare")
def compare_cmd(
    run_a: str = typer.Argument(..., help="The reference run folder (before)."),
    run_b: str = typer.Argument(..., help="The run folder to check against it (after)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the compare report (default reports/compare-A-vs-B)."),
    max_regressions: Optional[int] = typer.Option(None, "--max-regressions", help="Exit 1 when more regressions than this."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="'regression': exit 1 on any regression."),
    no_pdf: bool = typer.Option(False, "--no-pdf", help="Skip the PDF (faster)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Paired regression statistics of run B against run A (same suite and seeds); HTML/PDF report; CI gate."""
    from auditor.compare import check_gate, compare_runs, default_out, gate, to_text
    from auditor.report.compare_report import write_compare

    check_gate(max_regressions, fail_on)
    result = compare_runs(run_a, run_b)
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
        print(f"auditor: error: {exc}", file=sys.stderr)
        return 2
    except GateFailure as exc:
        print(f"auditor: gate failed: {exc}", file=sys.stderr)
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
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":  # python -m auditor.cli
    sys.exit(main())
