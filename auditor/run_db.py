"""The run database (``run.sqlite``) and what a row holds: the schema, how the database is created and opened, a
generation's files and record as they are stored, and the checks every stored row passes (a generation record, its
flags) before a reader relies on it.

The database is built under a temporary name with its manifest in the transaction that creates it, then renamed into
place: ``run.sqlite`` exists only with a manifest. Every artefact's sha256 is recorded in it (``artifacts``).
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np

from auditor.errors import AuditorError
from auditor.run_folder import _TMP_MARK, DB_NAME, RUN_SUBDIRS, _fsync_dir, _unlink, _why
from auditor.vocabulary import FLAG_TYPES, SEVERITIES

MAX_SEED = 2 ** 63 - 1  # SQLite's INTEGER; torch's generator takes any seed up to this
_MAP_KEY = re.compile(r"^(?P<index>\d+)_(?P<method>[a-z][a-z0-9_]*)$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the suite's prompt-id rule: safe inside a file name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifest (id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    prompt_id TEXT NOT NULL, seed INTEGER NOT NULL, record TEXT NOT NULL, finished_at TEXT NOT NULL,
    PRIMARY KEY (prompt_id, seed));
CREATE TABLE IF NOT EXISTS summary (id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    recorded_at TEXT NOT NULL);
"""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    try:
        if readonly:  # a reader never writes, not even a journal: a reviewer's copy may be read-only
            return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        conn = sqlite3.connect(path, timeout=30)  # busy timeout: wait for another reader rather than fail
        conn.execute("PRAGMA journal_mode=DELETE")  # one file on disk: what the checksums and a zip carry
        conn.execute("PRAGMA synchronous=FULL")
        return conn
    except sqlite3.Error as exc:
        raise AuditorError(f"{path}: cannot open the run database ({exc})") from None


class _NoManifest(Exception):
    pass


def _unreadable(conn: sqlite3.Connection, db: Path, run_dir: Path, exc: Exception) -> str:
    """Why ``db`` cannot be opened as a run, and what to do about it."""
    no_table = isinstance(exc, sqlite3.OperationalError) and "no such table: manifest" in str(exc)
    if isinstance(exc, _NoManifest) or no_table:
        try:
            rows = conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        except sqlite3.Error:
            rows = 0
        if not rows:  # what an older auditor left when killed while creating the database: nothing to lose
            return (f"{db}: holds no run manifest (an audit was interrupted while creating the run); remove {db} "
                    f"and run the audit again with `out={run_dir}`")
        return f"{db}: the run manifest is missing although {rows} generation(s) are stored (the database was altered)"
    return f"{db}: not a readable run database ({exc})"


def _create_run(run_dir: Path, manifest: dict) -> None:
    """The sub-folders and the database of a new run in an empty (or swept) ``run_dir``."""
    try:
        for sub in RUN_SUBDIRS:
            (run_dir / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise AuditorError(f"{run_dir}: cannot write the run folder ({_why(exc)})") from None
    _create_database(run_dir, manifest)


def _upgrade(conn: sqlite3.Connection, db: Path) -> None:
    """Add the tables a run made by an older auditor lacks (its old files stay unrecorded)."""
    try:
        with conn:
            conn.executescript(_SCHEMA)
    except sqlite3.Error as exc:
        raise AuditorError(f"{db}: cannot update the run database ({exc})") from None


def _create_database(run_dir: Path, manifest: dict) -> None:
    """Build ``run.sqlite`` under a temporary name, schema and manifest in one transaction, then rename it into place:
    a kill or a full disk at any instant leaves either no ``run.sqlite`` or one with its manifest."""
    db = run_dir / DB_NAME
    tmp = run_dir / f".{DB_NAME}{_TMP_MARK}{os.getpid()}"
    for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
        _unlink(leftover)  # this process's own name: a previous attempt of this very process
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO manifest (id, json) VALUES (1, ?)", (json.dumps(manifest, sort_keys=True),))
            conn.commit()
        finally:
            conn.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, db)
        _fsync_dir(run_dir)
    except (sqlite3.Error, OSError) as exc:
        _unlink(tmp)
        _unlink(tmp.with_name(tmp.name + "-journal"))
        why = _why(exc) if isinstance(exc, OSError) else ("disk full" if "full" in str(exc) else str(exc))
        raise AuditorError(f"{db}: cannot create the run database ({why}); nothing was written, run the audit again "
                           f"with `out={run_dir}` once that is fixed") from None


def check_record(where: str, pid: str, seed: int, raw) -> dict:
    """The stored generation record of row (``pid``, ``seed``), checked for what every reader relies on; an
    AuditorError starting with ``where`` when it is corrupt."""
    try:
        r = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise AuditorError(f"{where}: corrupt record ({exc}); the database was altered") from None
    problem = None
    if not isinstance(r, dict):
        problem = "not a JSON object"
    elif r.get("prompt_id") != pid or r.get("seed") != seed or isinstance(r.get("seed"), bool):
        problem = f"its prompt_id/seed ({r.get('prompt_id')!r}, {r.get('seed')!r}) disagree with its row"
    elif not isinstance(r.get("image"), str) or not isinstance(r.get("concepts"), list):
        problem = "'image' or 'concepts' missing"
    else:
        for c in r["concepts"]:
            if not isinstance(c, dict) or not isinstance(c.get("flags", []), list) or not isinstance(
                    c.get("maps", {}), dict) or not isinstance(c.get("scores", {}), dict):
                problem = "a concept is not an object with flags, maps and scores"
                break
            try:
                _check_flags(c.get("flags", []))
            except (ValueError, AttributeError, TypeError):
                problem = "a flag lacks its type, severity or message"
                break
    if problem:
        raise AuditorError(f"{where}: corrupt record ({problem}); the database was altered")
    return r


def check_summary(db: Path, raw: str) -> dict:
    """The stored summary row, checked; an AuditorError naming ``db`` when it is corrupt."""
    try:
        summary = json.loads(raw)
    except ValueError as exc:
        summary = exc
    if not isinstance(summary, dict) or not isinstance(summary.get("concepts", []), list):
        raise AuditorError(f"{db}: the stored summary is corrupt ({summary}); the database was altered")
    return summary


def in_suite_order(records: list[dict], prompt_ids: list[str]) -> list[dict]:
    """Generation records in the suite's prompt order, then seed; prompts the list does not name keep the order
    they finished in, after those it names."""
    order = {pid: i for i, pid in enumerate(prompt_ids)}
    first_seen: dict[str, int] = {}
    for r in records:
        first_seen.setdefault(r["prompt_id"], len(order) + len(first_seen))
    return sorted(records, key=lambda r: (order.get(r["prompt_id"], first_seen[r["prompt_id"]]), r["seed"]))


def _check_flags(flags) -> None:
    for f in flags:
        if f.get("type") not in FLAG_TYPES or f.get("severity") not in SEVERITIES or not isinstance(f.get("message"), str):
            raise ValueError(f"flag {f!r}: needs type in {FLAG_TYPES}, severity in {SEVERITIES} and a message")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, datetime)):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# --- a generation's row and files ----------------------------------------------------------------------------


def gen_stem(prompt_id: str, seed: int) -> str:
    return f"{prompt_id}__s{int(seed)}"


def _png_bytes(image) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v, dtype=np.float16) for k, v in arrays.items()})
    return buf.getvalue()


def _checked_id(record: dict) -> tuple[str, int]:
    """(prompt_id, seed) of a generation record; a ValueError when either cannot name its files and row."""
    pid, seed = record.get("prompt_id"), record.get("seed")
    if not isinstance(pid, str) or not _SAFE_ID.match(pid):
        raise ValueError(f"prompt_id {pid!r} must match {_SAFE_ID.pattern}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed {seed!r} must be an integer from 0 to {MAX_SEED}")
    return pid, int(seed)


def _check_contents(record: dict, maps: dict, overlays: dict) -> None:
    """The concepts are a list, every map key names one of them, every flag is well formed (else a ValueError)."""
    concepts = record.get("concepts")
    if not isinstance(concepts, list):
        raise ValueError("record['concepts'] must be a list")
    for key in list(maps) + list(overlays):
        m = _MAP_KEY.match(key)
        if not m or int(m["index"]) >= len(concepts):
            raise ValueError(f"map key {key!r}: expected '<concept_index>_<method>' for one of {len(concepts)} concepts")
    for c in concepts:
        _check_flags(c.get("flags", []))


def _generation_files(stem: str, image, maps: dict, overlays: dict) -> list[tuple[str, bytes]]:
    """(path relative to the run folder, content) of a generation's files: the image first, then maps, overlays."""
    files: list[tuple[str, bytes]] = [(f"images/{stem}.png", _png_bytes(image))]
    if maps:
        files.append((f"maps/{stem}.npz", _npz_bytes(maps)))
    files += [(f"maps/{stem}__{key}.png", _png_bytes(img)) for key, img in sorted(overlays.items())]
    return files


def _stored_record(record: dict, seed: int, stem: str, files: list, maps: dict, overlays: dict) -> dict:
    """A private, JSON-clean copy of ``record`` that names its files (image, maps, each concept's overlays)."""
    stored = json.loads(json.dumps(record, default=_json_default))
    stored["seed"] = seed
    stored["image"] = files[0][0]
    if maps:
        stored["maps_file"] = f"maps/{stem}.npz"
    for c in stored["concepts"]:
        c.setdefault("flags", [])
        c["maps"] = {}
    for key in sorted(overlays):
        m = _MAP_KEY.match(key)
        stored["concepts"][int(m["index"])]["maps"][m["method"]] = f"maps/{stem}__{key}.png"
    return stored
