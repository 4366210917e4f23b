"""The command line: the only module that parses arguments, prints, and maps errors to exit codes.

Exit codes: 0 ok, 1 a gated failure the user asked for (--fail-on ...), 2 usage or input error.
A user error prints exactly one line: ``auditor: error: <message>``.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

import typer

from auditor.cli import info, maps, audit, folders  # noqa: F401, I001 (each registers its commands; --help lists them in this order)
from auditor.cli.app import app
from auditor.cli.audit import FAILING_SHOWN  # noqa: F401 (the audit's own printing rule; tests read it)
from auditor.errors import AuditorError, GateFailure


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the console script; returns the exit code."""
    # The libraries' advice (install accelerate, sequence longer than 77) is not the user's problem: our own
    # messages say what matters, on one line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        app(args=argv, prog_name="auditor", standalone_mode=False)
    except AuditorError as exc:
        print(f"auditor: error: {_in_flags(_one_line(exc), exc.argument)}", file=sys.stderr)
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


# The library names its parameters (errors.AuditorError); the user of the CLI knows them as these flags.
_FLAGS = {"model": "--model", "device": "--device", "dtype": "--dtype", "variant": "--variant",
          "tokenizer": "--tokenizer", "out": "--out", "allow_pickle": "--allow-pickle"}


_KEYWORD = re.compile(r"`(?P<name>[a-z_]+)=(?P<value>[^`]*)`")


def _in_flags(message: str, argument: str | None) -> str:
    """A library error in the CLI's terms: the parameter it starts with, and any `name=value` advice, as flags."""
    if argument in _FLAGS and message.startswith((f"{argument} ", f"{argument}:")):
        message = _FLAGS[argument] + message[len(argument):]

    def flag(m: re.Match) -> str:
        name, value = m["name"], m["value"]
        if name not in _FLAGS:
            return m[0]
        return _FLAGS[name] if value == "True" else f"{_FLAGS[name]} {value}"

    return _KEYWORD.sub(flag, message)


def _usage_message(exc) -> str:
    """Click's usage error as one line, with the command whose --help explains it."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return f"{message} (see '{path} --help')" if path else message
