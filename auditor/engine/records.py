"""The on-disk layout of a calibration record: ``<base>.npz`` holds its arrays, ``<base>.json`` beside it the rest.

The HRV relevance matrix (``relevance``) and the localisation head ranking (``localise``) are both kept this way,
and the bundled models ship such files, so the layout, its content hash and the checks on reading live here once.
The JSON side carries a sha256 of the content (the metadata as canonical JSON, then each array's bytes in a fixed
dtype) that run manifests cite; reading refuses a record whose content no longer matches it.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from auditor.errors import AuditorError

T = TypeVar("T")


def content_sha256(meta: dict, arrays: Sequence[tuple[np.ndarray, str]]) -> str:
    """The hash a record's JSON side states for its content.

    Args:
        meta: the record's metadata that the hash covers (not its creation time).
        arrays: (array, dtype) pairs in a fixed order; each is hashed as its bytes in that dtype (e.g. ``"<f4"``).

    Returns:
        The hex sha256.
    """
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for a, dtype in arrays:
        h.update(np.ascontiguousarray(a, dtype=dtype).tobytes())
    return h.hexdigest()


def write_record(npz: Path, side: Path, arrays: dict[str, np.ndarray], fields: dict, created: str = "") -> Path:
    """Write a record: its arrays to ``npz`` (compressed), ``fields`` plus the creation time to ``side``.

    Args:
        npz, side: the two files' paths; their folder is made if missing.
        arrays: named arrays, stored under these names.
        fields: the JSON side's content, in order (metadata and sha256).
        created: the creation time to record; empty records now.

    Returns:
        ``npz``.
    """
    npz.parent.mkdir(parents=True, exist_ok=True)
    with open(npz, "wb") as f:  # an open file keeps numpy from appending a second .npz
        np.savez_compressed(f, **arrays)
    side.write_text(json.dumps({**fields, "created": created or time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    return npz


def read_record(npz: Path, side: Path, names: Sequence[str], build: Callable[[dict, dict], T], what: str,
                missing: str) -> tuple[T, dict]:
    """Read a record written by ``write_record`` and build the object it holds.

    Args:
        npz, side: the two files' paths.
        names: the arrays to read from ``npz``.
        build: ``build(meta, arrays) -> record``; a KeyError, TypeError or ValueError it raises (a field missing or
            malformed) is reported as an unreadable record.
        what: the record's name in messages (``"relevance matrix"``).
        missing: what a missing file's message says after its path.

    Returns:
        (the record, the JSON side's content); an AuditorError when a file is missing or unreadable.
    """
    for p in (npz, side):
        if not p.is_file():
            raise AuditorError(f"{p}: {missing}")
    try:
        meta = json.loads(side.read_text())
        with np.load(npz) as z:
            arrays = {k: z[k] for k in names}
        return build(meta, arrays), meta
    except (EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditorError(f"{npz}: unreadable {what} ({exc})") from None


def check_sha256(meta: dict, actual: str, npz: Path, side: Path) -> None:
    """Refuse a record whose content differs from the sha256 its JSON side states (none stated: nothing to check).

    Args:
        meta: the JSON side's content.
        actual: the sha256 of the content as read.
        npz, side: the record's files, for the message.

    Returns:
        None; an AuditorError on a mismatch.
    """
    if meta.get("sha256") and meta["sha256"] != actual:
        raise AuditorError(f"{npz}: content does not match the sha256 in {side.name} (file changed or corrupt)")
