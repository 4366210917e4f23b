"""`auditor audit`: a model audited on a prompt suite."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from auditor.cli.app import (_HEIGHT_HELP, _MODEL_HELP, _VARIANT_HELP, _WIDTH_HELP, _int_list, _print_json,
                             _seed_list, app)
from auditor.errors import AuditorError


FAILING_SHOWN = 10  # failing concepts an audit prints, one line each; the report lists them all


# short_help: one line in `auditor --help` (click cuts a longer first sentence mid-phrase at 80 columns)
@app.command("audit", short_help="Audit a text-to-image model on a prompt suite.")
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
    batch_size: int = typer.Option(1, "--batch-size", help="(prompt, seed) pairs per pipeline call, each with its own generator; records equal batch 1's within float noise."),
    executor: str = typer.Option("local", "--executor", help="local (this process) | ray (Ray workers; pip install 'auditor[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --executor ray: 'auto' or HOST:PORT of a running cluster (default: start a local one)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="With --executor ray: workers, each loads the model once (default: as many as the cluster has room for)."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="With --executor ray: GPUs each worker takes (0: CPU workers)."),
    images: Optional[str] = typer.Option(None, "--images", help="Audit these images instead of generating: a folder (images named <prompt id>__s<seed>.png or <prompt id>.png, or a run folder) or a manifest.jsonl of {image, prompt or prompt_id, seed}."),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help="With --images: comma list of training-schedule timesteps to read each image at (default: 30%, 50% and 70% of the schedule)."),
    draws: int = typer.Option(1, "--draws", help="With --images: noised copies per timestep."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Audit a model on a prompt suite: generate every (prompt, seed) image, map every concept with its category's
    top heads, and flag what is missing, misplaced or misinterpreted; write the run folder with HTML and PDF reports.
    With --images, audit existing images with their prompts instead: nothing is generated.

    Models: the bundled shapes-v1 and shapes-v2, or a diffusers folder of Stable Diffusion 1.x or 2.x
    (StableDiffusionPipeline) or SDXL (StableDiffusionXLPipeline); other pipelines are refused."""
    from tqdm import tqdm

    from auditor.report.render import publish
    from auditor.runs import AuditOptions, raise_gate, run_audit
    from auditor.vocabulary import GATE_TYPES as FAIL_ON

    if fail_on is not None and fail_on not in FAIL_ON:
        raise AuditorError(f"--fail-on {fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise AuditorError("--resume continues the run in its own folder: leave out --out")
    opts = AuditOptions(suite=suite, model=model, seeds=_seed_list(seeds), steps=steps, out=out, resume=resume,
                        pdf=not no_pdf, device=device, dtype=dtype, relevance=relevance, profile=profile,
                        allow_pickle=allow_pickle, k=k, fail_on=fail_on, variant=variant, height=height, width=width,
                        executor=executor, batch_size=batch_size, ray_address=ray_address, workers=workers,
                        gpus_per_worker=gpus_per_worker, images=images,
                        timesteps=_int_list(timesteps, "--timesteps"), draws=draws)

    def bar(total: int, done: int):
        return tqdm(total=total, initial=done, desc="generations", unit="image", file=sys.stderr,
                    disable=as_json and not sys.stderr.isatty())

    result = run_audit(opts, sys.argv, progress=bar, publish=publish)
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
        if acc.get("declared"):  # an uncalibrated profile flags nothing: its PASS would say nothing
            verdict = ("not judged (uncalibrated)" if not s.get("calibrated", True)
                       else "PASS" if acc["passed"] else "FAIL")
            typer.echo(f"acceptance: {verdict}")
        typer.echo("report: " + ", ".join(str(x) for x in result.files if x.suffix in (".html", ".pdf")))
    raise_gate(result)
