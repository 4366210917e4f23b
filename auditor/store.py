"""The run store: one audit run as a folder that survives a kill at any instant and can be verified by a reviewer.

Layout of a run folder::

    run.sqlite                      manifest (one JSON row), generations (one row per finished (prompt_id, seed)),
                                    summary (one JSON row once the run finished)
    images/<pid>__s<seed>.png       the generated image
    maps/<pid>__s<seed>.npz         float16 concept maps, one array per "<concept_index>_<method>"
    maps/<pid>__s<seed>__<concept_index>_<method>.png   overlays the report shows
    relevance.npz                   the head-relevance matrix used (matrix, categories, head_names)
    figures/                        report figures
    results.json, report.html, report.pdf, checksums.sha256

Crash safety: every file of a generation is written to a temporary name, fsynced and renamed into place *before* the
generation's row commits, so after a kill -9 a generation is either finished (row + all files) or absent from the
database (its stray files are overwritten when the run resumes). Paths inside records are relative to the run
folder, so the folder can be moved or zipped.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np

from auditor.errors import AuditorError
from auditor.manifest import manifest_base, new_run_id, run_identity, utc_now  # noqa: F401 (manifest_base: API)
from auditor.summary import FLAG_TYPES, summarise

DB_NAME = "run.sqlite"
RESULTS_NAME = "results.json"
CHECKSUMS_NAME = "checksums.sha256"
RELEVANCE_NAME = "relevance.npz"
SEVERITIES = ("low", "medium", "high")
_MAP_KEY = re.compile(r"^(?P<index>\d+)_(?P<method>[a-z][a-z0-9_]*)$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the suite's prompt-id rule: safe inside a file name
_TMP_MARK = ".tmp-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifest (id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    prompt_id TEXT NOT NULL, seed INTEGER NOT NULL, record TEXT NOT NULL, finished_at TEXT NOT NULL,
    PRIMARY KEY (prompt_id, seed));
CREATE TABLE IF NOT EXISTS summary (id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
"""


def gen_stem(prompt_id: str, seed: int) -> str:
    return f"{prompt_id}__s{int(seed)}"


# --- atomic files ---------------------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise AuditorError(f"{path}: cannot write ({_why(exc)})") from None


def _fsync_dir(path: Path) -> None:
    # The renames must reach the disk before the database says the generation is finished.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full"
    return exc.strerror or str(exc)


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the store ------------------------------------------------------------------------------------------------------


class RunStore:
    """One run folder. Create it with ``RunStore.create``; reopen it (resume, re-render) with ``RunStore.open``."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection):
        self.dir = run_dir
        self._conn = conn
        self.manifest: dict = json.loads(self._one("SELECT json FROM manifest WHERE id = 1"))

    # construction

    @classmethod
    def create(cls, run_dir: str | Path, manifest: dict) -> "RunStore":
        """A new run in ``run_dir``. A folder that already holds the *same* run (same identity: model, suite, seeds,
        settings) is reopened, so creating twice is a resume; a different run there is refused."""
        run_dir = Path(run_dir)
        manifest = dict(manifest)
        manifest.setdefault("start_time", utc_now())
        manifest.setdefault("run_id", new_run_id(manifest))
        if (run_dir / DB_NAME).exists():
            store = cls.open(run_dir)
            if run_identity(store.manifest) != run_identity(manifest):
                diff = sorted(k for k in set(run_identity(store.manifest)) | set(run_identity(manifest))
                              if store.manifest.get(k) != manifest.get(k))
                store.close()
                raise AuditorError(f"{run_dir}: already holds a different run ({store.manifest.get('run_id')}; "
                                   f"differs in {', '.join(diff)}); choose another output folder")
            store.mark_resumed(manifest.get("command_line"))
            return store
        try:
            for sub in ("", "images", "maps", "figures"):
                (run_dir / sub).mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / ".write-test", b"")
            (run_dir / ".write-test").unlink()
        except OSError as exc:
            raise AuditorError(f"{run_dir}: cannot write the run folder ({_why(exc)})") from None
        conn = _connect(run_dir / DB_NAME)
        try:
            with conn:
                conn.executescript(_SCHEMA)
                conn.execute("INSERT INTO manifest (id, json) VALUES (1, ?)", (json.dumps(manifest, sort_keys=True),))
        except sqlite3.Error as exc:
            conn.close()
            raise AuditorError(f"{run_dir / DB_NAME}: cannot create the run database ({exc})") from None
        return cls(run_dir, conn)

    @classmethod
    def open(cls, run_dir: str | Path) -> "RunStore":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise AuditorError(f"{run_dir}: no such run folder")
        db = run_dir / DB_NAME
        if not db.is_file():
            raise AuditorError(f"{run_dir}: not an auditor run folder (no {DB_NAME})")
        conn = _connect(db)
        try:
            store = cls(run_dir, conn)
        except (sqlite3.Error, TypeError, ValueError) as exc:
            conn.close()
            raise AuditorError(f"{db}: not a readable run database ({exc})") from None
        for stray in list(run_dir.glob(f"*/.*{_TMP_MARK}*")) + list(run_dir.glob(f".*{_TMP_MARK}*")):
            _unlink(stray)  # half-written temporaries of a killed run
        return store

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # reading

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def finished(self) -> set[tuple[str, int]]:
        return {(p, int(s)) for p, s in self._all("SELECT prompt_id, seed FROM generations")}

    def generations(self) -> list[dict]:
        """Finished generations in suite prompt order (``manifest.suite.prompt_ids``), then seed."""
        rows = self._all("SELECT record FROM generations ORDER BY rowid")
        records = [json.loads(r) for (r,) in rows]
        order = {pid: i for i, pid in enumerate((self.manifest.get("suite") or {}).get("prompt_ids") or [])}
        first_seen: dict[str, int] = {}
        for r in records:  # prompts the suite list does not name keep the order they finished in
            first_seen.setdefault(r["prompt_id"], len(order) + len(first_seen))
        return sorted(records, key=lambda r: (order.get(r["prompt_id"], first_seen[r["prompt_id"]]), r["seed"]))

    def summary(self) -> dict:
        """The finished run's summary, or a provisional one (``partial: true``) computed from what is finished."""
        stored = self._one("SELECT json FROM summary WHERE id = 1")
        if stored is not None:
            return json.loads(stored)
        s = summarise(self.generations(), (self.manifest.get("suite") or {}).get("acceptance"),
                      (self.manifest.get("thresholds") or {}).get("max_flag_rate", 0.5))
        return {**s, "partial": True}

    @property
    def is_finished(self) -> bool:
        return self._one("SELECT json FROM summary WHERE id = 1") is not None

    # writing

    def add_generation(self, record: dict, image, maps: dict[str, np.ndarray], overlays: dict) -> dict:
        """Store one finished generation: image, maps (``"<concept_index>_<method>" -> 2-D array``), overlays
        (same keys -> PIL image). Files land first, the row commits last. Returns the record as stored, with
        ``image`` and each concept's ``maps`` (method -> overlay path) filled in, paths relative to the run folder."""
        pid, seed = record.get("prompt_id"), record.get("seed")
        if not isinstance(pid, str) or not _SAFE_ID.match(pid):
            raise ValueError(f"prompt_id {pid!r} must match {_SAFE_ID.pattern}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed {seed!r} must be an integer")
        seed = int(seed)
        if (pid, seed) in self.finished():
            raise ValueError(f"generation ({pid}, seed {seed}) is already stored; resume skips finished ones")
        concepts = record.get("concepts")
        if not isinstance(concepts, list):
            raise ValueError("record['concepts'] must be a list")
        for key in list(maps) + list(overlays):
            m = _MAP_KEY.match(key)
            if not m or int(m["index"]) >= len(concepts):
                raise ValueError(f"map key {key!r}: expected '<concept_index>_<method>' for one of {len(concepts)} concepts")
        for c in concepts:
            _check_flags(c.get("flags", []))

        stem = gen_stem(pid, seed)
        files: list[tuple[str, bytes]] = [(f"images/{stem}.png", _png_bytes(image))]
        if maps:
            files.append((f"maps/{stem}.npz", _npz_bytes(maps)))
        files += [(f"maps/{stem}__{key}.png", _png_bytes(img)) for key, img in sorted(overlays.items())]

        stored = json.loads(json.dumps(record, default=_json_default))  # a private copy, JSON-clean
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

        written: list[Path] = []
        try:
            for rel, data in files:
                atomic_write(self.dir / rel, data)
                written.append(self.dir / rel)
            for sub in ("images", "maps"):
                _fsync_dir(self.dir / sub)
            try:
                with self._conn:
                    self._conn.execute("INSERT INTO generations (prompt_id, seed, record, finished_at) VALUES (?, ?, ?, ?)",
                                       (pid, seed, json.dumps(stored, sort_keys=True), utc_now()))
            except sqlite3.Error as exc:
                raise AuditorError(f"{self.dir / DB_NAME}: cannot record generation ({pid}, seed {seed}) ({exc})") from None
        except AuditorError:
            for p in written:  # leave nothing of an unfinished generation behind
                _unlink(p)
            raise
        return stored

    def save_relevance(self, categories, head_names, matrix: np.ndarray) -> Path:
        """Keep a copy of the relevance matrix the run used (figures and compare read it; no pickles)."""
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.shape != (len(categories), len(head_names)):
            raise ValueError(f"relevance matrix shape {matrix.shape} != ({len(categories)}, {len(head_names)})")
        buf = io.BytesIO()
        np.savez_compressed(buf, matrix=matrix, categories=np.array(list(categories), dtype=str),
                            head_names=np.array(list(head_names), dtype=str))
        path = self.dir / RELEVANCE_NAME
        atomic_write(path, buf.getvalue())
        return path

    def mark_resumed(self, command_line: list[str] | None = None) -> None:
        """Note in the manifest when (and by which command) the run was continued: part of the compliance record."""
        entry = {"time": utc_now(), "command_line": command_line}
        self._write_manifest({**self.manifest, "resumed_at": [*self.manifest.get("resumed_at", []), entry]})

    def _write_manifest(self, manifest: dict, *extra: tuple[str, tuple]) -> None:
        """Replace the manifest row, and run any ``extra`` statements in the same transaction."""
        try:
            with self._conn:
                for sql, args in extra:
                    self._conn.execute(sql, args)
                self._conn.execute("UPDATE manifest SET json = ? WHERE id = 1", (json.dumps(manifest, sort_keys=True),))
        except sqlite3.Error as exc:
            raise AuditorError(f"{self.dir / DB_NAME}: cannot update the run manifest ({exc})") from None
        self.manifest = manifest

    def finish(self, summary: dict, end_time: datetime | str | None = None) -> None:
        """Record the summary and the end time: the run is complete."""
        end = end_time.isoformat(timespec="seconds") if isinstance(end_time, datetime) else (end_time or utc_now())
        self._write_manifest({**self.manifest, "end_time": end, "status": "finished"},
                             ("INSERT OR REPLACE INTO summary (id, json) VALUES (1, ?)",
                              (json.dumps(summary, sort_keys=True, default=_json_default),)))

    def export_results(self) -> Path:
        """Write ``results.json`` (the contract other tools read)."""
        m = self.manifest
        suite = m.get("suite") or {}
        out = {
            "run_id": self.run_id,
            "model": {"name": (m.get("model") or {}).get("name"), "fingerprint": (m.get("model") or {}).get("fingerprint")},
            "suite": {"path": suite.get("path"), "sha256": suite.get("sha256")},
            "generations": self.generations(),
            "summary": self.summary(),
        }
        path = self.dir / RESULTS_NAME
        atomic_write(path, (json.dumps(out, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode())
        return path

    def write_checksums(self) -> Path:
        """Write it last: anything written afterwards (a re-rendered report) needs a new one."""
        return write_checksums(self.dir)

    # sqlite helpers

    def _one(self, sql: str):
        row = self._conn.execute(sql).fetchone()
        return row[0] if row else None

    def _all(self, sql: str) -> list:
        try:
            return self._conn.execute(sql).fetchall()
        except sqlite3.Error as exc:
            raise AuditorError(f"{self.dir / DB_NAME}: cannot read the run database ({exc})") from None


def write_checksums(folder: Path) -> Path:
    """``checksums.sha256`` over every file of ``folder`` in ``sha256sum`` format: ``sha256sum -c checksums.sha256``
    run inside the folder verifies them."""
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in artifact_files(folder)]
    path = folder / CHECKSUMS_NAME
    atomic_write(path, "".join(lines).encode())
    return path


def artifact_files(run_dir: Path) -> list[Path]:
    """Every file a reviewer verifies: all but the checksum file itself, temporaries and SQLite's side files."""
    out = []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.as_posix() == CHECKSUMS_NAME or p.name.endswith(("-journal", "-wal", "-shm")):
            continue
        out.append(p)
    return out


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=30)  # busy timeout: wait for another reader rather than fail
        conn.execute("PRAGMA journal_mode=DELETE")  # one file on disk: what the checksums and a zip carry
        conn.execute("PRAGMA synchronous=FULL")
        return conn
    except sqlite3.Error as exc:
        raise AuditorError(f"{path}: cannot open the run database ({exc})") from None


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
