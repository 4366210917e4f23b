"""Kill an audit process with SIGKILL once it has stored some generations (the kill -9 tests share it)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path


def stored_rows(run: Path) -> list:
    """(prompt id, seed, finished_at) of every generation the run folder's store holds."""
    with sqlite3.connect(run / "run.sqlite") as db:
        return db.execute("SELECT prompt_id, seed, finished_at FROM generations").fetchall()


def kill_after_stored(proc: subprocess.Popen, run: Path, at_least: int = 2) -> list:
    """SIGKILL ``proc`` as soon as ``run`` holds ``at_least`` generations; the rows it kept.

    It waits on the run, not on a clock: however slow the machine, the kill comes after ``at_least`` generations
    (a run that hangs is ended by the suite's pytest timeout)."""
    while proc.poll() is None:
        try:
            if len(stored_rows(run)) >= at_least:
                break
        except sqlite3.Error:  # the store is not created yet
            pass
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return stored_rows(run)
