"""The command line: the only module that parses arguments, prints, and maps errors to exit codes.

Exit codes: 0 ok, 1 a gated failure the user asked for (--fail-on ...), 2 usage or input error.
A user error prints exactly one line: ``auditor: error: <message>``.
"""

from __future__ import annotations

import json
import sys
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


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the console script; returns the exit code."""
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
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":  # python -m auditor.cli
    sys.exit(main())
