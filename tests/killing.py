"""Kill an audit process with SIGKILL once it has stored some generations (the kill -9 tests share it)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path


def stored_rows(run: Path) -> list:
    """(prompt id, seed, finished_at) of every generation the run folder's store holds.

    Read-only: a plain connect would create an empty ``run.sqlite`` when the poll comes between the audit making the
    folder and moving its database into place, and the audit rightly refuses a database without a manifest."""
    db = sqlite3.connect(f"{(run / 'run.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT prompt_id, seed, finished_at FROM generations").fetchall()
    finally:
        db.close()


def start_audit(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start ``cmd`` with its stderr in ``log`` (a file, not a pipe nobody reads, which could fill and stall it)."""
    with open(log, "wb") as err:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)


def kill_after_stored(proc: subprocess.Popen, run: Path, at_least: int = 2, log: Path | None = None) -> list:
    """SIGKILL ``proc`` as soon as ``run`` holds ``at_least`` generations; the rows it kept.

    It waits on the run, not on a clock: however slow the machine, the kill comes after ``at_least`` generations
    (a run that hangs is ended by the suite's pytest timeout). ``log``, the process's stderr, is quoted if it ends
    first."""
    while proc.poll() is None:
        try:
            if len(stored_rows(run)) >= at_least:
                break
        except sqlite3.Error:  # the store is not created yet
            pass
        time.sleep(0.02)
    if proc.poll() is not None:
        said = log.read_text(errors="replace")[-2000:] if log else "(stderr not kept)"
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed: {said}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return stored_rows(run)
