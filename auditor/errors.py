"""Error types the CLI maps to exit codes (one place for that policy)."""

from __future__ import annotations


class AuditorError(Exception):
    """A user or input error: bad file, unknown model, unwritable output.

    The CLI prints ``auditor: error: <message>`` on one line and exits 2.
    The message must name the thing that is wrong (file, line, field, id), in the library's terms: a function's
    parameter is named as such (``model shapes-v9: ...``), advice to pass one as a keyword in backticks
    (```variant=fp16```). ``argument`` is the parameter the message starts with, if any; a front end may say both
    in its own terms (the CLI names its flags).
    """

    def __init__(self, message: str = "", argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class GateFailure(Exception):
    """The audit or comparison found what the user asked to gate on (exit 1)."""
