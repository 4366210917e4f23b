"""The run manifest: the compliance record of an audit run (what was audited, with what, how, when, by which command).

The runner builds it from ``manifest_base()`` plus the model, device, dtype, suite, seeds, steps, guidance, resolution,
thresholds, relevance and method settings; the store keeps it in ``run.sqlite`` and the report prints it.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version as _pkg_version
from pathlib import Path
from auditor import __version__

LIBRARIES = ("torch", "diffusers", "transformers", "spacy", "numpy")
# Manifest keys that differ between two invocations of the same run (a resume) and so do not identify it.
_VOLATILE = ("run_id", "start_time", "end_time", "command_line", "resumed_at", "status")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def manifest_base(argv: list[str] | None = None) -> dict:
    """The parts of the manifest the tool knows by itself: versions, git commit, platform, command line, start time.

    The runner adds model, device, dtype, suite, seeds, steps, guidance, resolution, thresholds, relevance, method."""
    libs = {}
    for name in LIBRARIES:  # metadata only: importing torch here would cost seconds for nothing
        try:
            libs[name] = _pkg_version(name)
        except PackageNotFoundError:
            libs[name] = None
    return {
        "tool": {"name": "auditor", "version": __version__, "git": _git_state()},
        "libraries": libs,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command_line": list(sys.argv if argv is None else argv),
        "start_time": utc_now(),
    }


def _git_state() -> dict | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None  # an installed wheel: the version is the record
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "dirty": bool(dirty)}


def run_identity(manifest: dict) -> dict:
    """What makes two manifests the same run (so a resume may continue it): everything but times and argv."""
    return {k: v for k, v in manifest.items() if k not in _VOLATILE}


def flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    """Nested manifest -> ("model.fingerprint", "…") rows for the provenance table."""
    rows: list[tuple[str, str]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flatten(value, name + ".")
        elif isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                rows += flatten(v, f"{name}[{i}].") if isinstance(v, dict) else [(f"{name}[{i}]", str(v))]
        elif isinstance(value, (list, tuple)):
            sep = " " if key == "command_line" else ", "
            rows.append((name, sep.join(str(v) for v in value) or "—"))
        else:
            rows.append((name, "—" if value is None or value == {} else str(value)))
    return rows


def new_run_id(manifest: dict) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    model = re.sub(r"[^A-Za-z0-9]+", "-", str((manifest.get("model") or {}).get("name") or "run")).strip("-")[:24]
    return f"{stamp}-{model}-{uuid.uuid4().hex[:6]}"
