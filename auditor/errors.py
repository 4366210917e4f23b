"""Error types the CLI maps to exit codes (one place for that policy)."""


class AuditorError(Exception):
    """A user or input error: bad file, unknown model, unwritable output.

    The CLI prints ``auditor: error: <message>`` on one line and exits 2.
    The message must name the thing that is wrong (file, line, field, id).
    """


class GateFailure(Exception):
    """The audit or comparison found what the user asked to gate on (exit 1)."""
