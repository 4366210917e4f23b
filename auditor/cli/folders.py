"""`auditor report`, `auditor verify`, `auditor compare`: what is done with finished run folders."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from auditor.cli.app import _print_json, app
from auditor.errors import AuditorError, GateFailure


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
