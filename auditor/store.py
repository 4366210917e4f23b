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
database (its stray files are overwritten when the run resumes). The database itself is built under a temporary name
with its manifest in the transaction that creates it, then renamed into place: ``run.sqlite`` exists only with a
manifest. Paths inside records are relative to the run folder, so the folder can be moved or zipped.

One writer per folder: an audit, a resume or a re-render holds an exclusive ``flock`` on ``.auditor.lock`` for as
long as it writes; compare and verify hold a shared one while they read. The kernel drops the lock when the process
dies, so a killed run never leaves the folder locked.

Integrity: every artefact's sha256 is recorded in ``run.sqlite`` in the transaction that records what it belongs to;
``verify`` compares the folder with those records, and ``checksums.sha256`` is written from them, never from
whatever is on disk.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: msvcrt below
    fcntl = None

import numpy as np

from auditor.errors import AuditorError
from auditor.manifest import manifest_base, new_run_id, run_identity, utc_now  # noqa: F401 (manifest_base: API)
from auditor.summary import FLAG_TYPES, summarise

DB_NAME = "run.sqlite"
RESULTS_NAME = "results.json"
CHECKSUMS_NAME = "checksums.sha256"
RELEVANCE_NAME = "relevance.npz"
LOCK_NAME = ".auditor.lock"
DERIVED = (RESULTS_NAME, "report.html", "report.pdf", "figures/")  # remade from the store by every re-render
RUN_SUBDIRS = ("images", "maps", "figures")
MAX_SEED = 2 ** 63 - 1  # SQLite's INTEGER; torch's generator takes any seed up to this
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
CREATE TABLE IF NOT EXISTS artifacts (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    recorded_at TEXT NOT NULL);
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


# --- one writer per run folder -------------------------------------------------------------------------------------


@dataclass
class _Held:
    fd: int
    exclusive: bool
    count: int


# A process holds one descriptor per folder: flock conflicts between two descriptors of the same file even within
# one process, so nested users (the audit, then the store it opens, then the reports) share this one.
_HELD: dict[str, _Held] = {}


def acquire_lock(run_dir: str | Path, exclusive: bool = True) -> str | None:
    """Lock ``run_dir`` (which must exist) for writing (``exclusive``) or reading. Returns a key for
    ``release_lock``; None when a reader finds a folder it cannot write a lock file into (a read-only copy, which
    no writer can be changing either). Raises AuditorError at once, without waiting, when the folder is in use."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    held = _HELD.get(key)
    if held is not None:
        if exclusive and not held.exclusive:
            _flock(held.fd, True, run_dir)
            held.exclusive = True
        held.count += 1
        return key
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if not exclusive and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        raise AuditorError(f"{run_dir}: cannot write the run folder ({_why(exc)})") from None
    try:
        _flock(fd, exclusive, run_dir)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = _Held(fd, exclusive, 1)
    return key


def release_lock(key: str | None) -> None:
    held = _HELD.get(key) if key is not None else None
    if held is None:
        return
    held.count -= 1
    if held.count == 0:
        del _HELD[key]
        os.close(held.fd)  # closing the last descriptor releases the lock


def _flock(fd: int, exclusive: bool, run_dir: Path) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows has no shared locks: readers exclude each other too
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            doing = "writing or reading" if exclusive else "writing"
            raise AuditorError(f"{run_dir}: another auditor process is {doing} this run folder (audit, resume, "
                               f"report or compare); wait for it to finish or use another folder") from None
        raise AuditorError(f"{run_dir}: cannot lock the run folder ({_why(exc)})") from None


class run_lock:
    """``with run_lock(run_dir):`` holds the folder's lock for the block (re-entrant within the process)."""

    def __init__(self, run_dir: str | Path, exclusive: bool = True):
        self.run_dir, self.exclusive, self.key = Path(run_dir), exclusive, None

    def __enter__(self) -> "run_lock":
        self.key = acquire_lock(self.run_dir, self.exclusive)
        return self

    def __exit__(self, *exc) -> None:
        release_lock(self.key)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _sweep_temporaries(run_dir: Path) -> None:
    """Remove half-written temporaries of killed writers. Called only under the exclusive lock, so no live auditor is
    writing them; a temporary whose process still exists (its pid is in the name) is left alone all the same."""
    for stray in list(run_dir.glob(f"*/.*{_TMP_MARK}*")) + list(run_dir.glob(f".*{_TMP_MARK}*")):
        m = re.search(rf"{re.escape(_TMP_MARK)}(\d+)", stray.name)
        if m and not _pid_alive(int(m.group(1))):
            _unlink(stray)


def _refuse_foreign(run_dir: Path) -> None:
    if (run_dir / DB_NAME).exists() or _interrupted_creation(run_dir):
        return
    held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
    raise AuditorError(f"{run_dir}: not an auditor run folder and not empty (holds {', '.join(held[:3])}"
                       f"{', ...' if len(held) > 3 else ''}); choose a new or empty output folder")


def _interrupted_creation(run_dir: Path) -> bool:
    """What an audit killed (or out of disk) while creating the run leaves: the lock file, empty sub-folders and the
    temporaries of a database that never got its manifest. Such a folder is reused as if it were empty."""
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME or _TMP_MARK in p.name:
            continue
        if p.is_dir() and p.name in RUN_SUBDIRS and all(_TMP_MARK in q.name for q in p.iterdir()):
            continue
        return False
    return True


# --- the store ------------------------------------------------------------------------------------------------------


class RunStore:
    """One run folder. Create it with ``RunStore.create``; reopen it (resume, re-render) with ``RunStore.open``, or
    ``RunStore.open(dir, readonly=True)`` to read it (compare, verify). A store holds the folder's lock until
    ``close``."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection, lock_key: str | None = None, readonly: bool = False):
        self.dir = run_dir
        self._conn = conn
        self._lock_key = lock_key
        self.readonly = readonly
        raw = self._one("SELECT json FROM manifest WHERE id = 1")
        if raw is None:
            raise _NoManifest()
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("the manifest is not a JSON object")
        self.manifest: dict = manifest

    # construction

    @classmethod
    def create(cls, run_dir: str | Path, manifest: dict) -> "RunStore":
        """A new run in ``run_dir``. A folder that already holds the *same* run (same identity: model, suite, seeds,
        settings) is reopened, so creating twice is a resume; a different run there is refused, and so is a folder
        that holds anything but a run (or what an interrupted creation left)."""
        run_dir = Path(run_dir)
        manifest = dict(manifest)
        manifest.setdefault("start_time", utc_now())
        manifest.setdefault("run_id", new_run_id(manifest))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditorError(f"{run_dir}: cannot write the run folder ({_why(exc)})") from None
        _refuse_foreign(run_dir)  # before the lock file: nothing is written into someone else's folder
        key = acquire_lock(run_dir, exclusive=True)
        try:
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
            _refuse_foreign(run_dir)
            _sweep_temporaries(run_dir)
            try:
                for sub in RUN_SUBDIRS:
                    (run_dir / sub).mkdir(exist_ok=True)
            except OSError as exc:
                raise AuditorError(f"{run_dir}: cannot write the run folder ({_why(exc)})") from None
            _create_database(run_dir, manifest)
            return cls.open(run_dir)
        finally:
            release_lock(key)

    @classmethod
    def open(cls, run_dir: str | Path, readonly: bool = False) -> "RunStore":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise AuditorError(f"{run_dir}: no such run folder")
        db = run_dir / DB_NAME
        if not db.is_file():
            if (run_dir / LOCK_NAME).exists() and _interrupted_creation(run_dir):
                raise AuditorError(f"{run_dir}: holds no run: an audit was interrupted while creating it; run the "
                                   f"audit again with --out {run_dir} (the folder is reused)")
            raise AuditorError(f"{run_dir}: not an auditor run folder (no {DB_NAME})")
        key = acquire_lock(run_dir, exclusive=not readonly)
        try:
            conn = _connect(db, readonly)
            try:
                store = cls(run_dir, conn, key, readonly)
            except (sqlite3.Error, TypeError, ValueError, _NoManifest) as exc:
                message = _unreadable(conn, db, run_dir, exc)
                conn.close()
                raise AuditorError(message) from None
        except BaseException:
            release_lock(key)
            raise
        if not readonly:
            try:
                with conn:  # a run made before artefacts were recorded gets the table; its old files stay unrecorded
                    conn.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                store.close()
                raise AuditorError(f"{db}: cannot update the run database ({exc})") from None
            _sweep_temporaries(run_dir)
        return store

    def close(self) -> None:
        self._conn.close()
        release_lock(self._lock_key)
        self._lock_key = None

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
        rows = self._all("SELECT prompt_id, seed, record FROM generations ORDER BY rowid")
        records = [self._record(pid, seed, raw) for pid, seed, raw in rows]
        order = {pid: i for i, pid in enumerate((self.manifest.get("suite") or {}).get("prompt_ids") or [])}
        first_seen: dict[str, int] = {}
        for r in records:  # prompts the suite list does not name keep the order they finished in
            first_seen.setdefault(r["prompt_id"], len(order) + len(first_seen))
        return sorted(records, key=lambda r: (order.get(r["prompt_id"], first_seen[r["prompt_id"]]), r["seed"]))

    def summary(self) -> dict:
        """The finished run's summary, or a provisional one (``partial: true``) computed from what is finished."""
        stored = self._one("SELECT json FROM summary WHERE id = 1")
        if stored is not None:
            try:
                summary = json.loads(stored)
            except ValueError as exc:
                summary = exc
            if not isinstance(summary, dict) or not isinstance(summary.get("concepts", []), list):
                raise AuditorError(f"{self.dir / DB_NAME}: the stored summary is corrupt ({summary}); the database "
                                   f"was altered")
            return summary
        s = summarise(self.generations(), (self.manifest.get("suite") or {}).get("acceptance"),
                      (self.manifest.get("thresholds") or {}).get("max_flag_rate"))
        return {**s, "partial": True}

    @property
    def is_finished(self) -> bool:
        return self._one("SELECT json FROM summary WHERE id = 1") is not None

    def progress(self) -> tuple[int, int | None]:
        """(finished generations, generations the run plans: prompts x seeds, None when the manifest lacks them)."""
        m = self.manifest
        planned = len((m.get("suite") or {}).get("prompt_ids") or []) * len(m.get("seeds") or [])
        return len(self.finished()), planned or None

    def _record(self, pid, seed, raw) -> dict:
        """A stored generation record, checked for what every reader relies on."""
        where = f"{self.dir / DB_NAME}: generation ({pid}, seed {seed})"
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

    # integrity

    def artifacts(self) -> dict[str, str]:
        """Recorded artefacts: path relative to the run folder -> sha256."""
        return dict(self._all("SELECT path, sha256 FROM artifacts ORDER BY path"))

    def verify(self) -> list[str]:
        """What differs from the records, one line per file: a recorded artefact missing or altered, or a file a
        generation refers to that was never recorded (a run made before artefacts were recorded). Empty: intact."""
        problems = []
        try:
            recorded = self.artifacts()
        except AuditorError:
            recorded = {}  # a read-only open of a run older than the artefacts table
        for rel, digest in recorded.items():
            path = self.dir / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif sha256_file(path) != digest:
                problems.append(f"{rel}: altered (sha256 differs from the one recorded when it was written)")
        referenced = []
        for g in self.generations():
            referenced += [g["image"], g.get("maps_file")] + [p for c in g["concepts"] for p in c["maps"].values()]
        if (self.dir / RELEVANCE_NAME).exists():
            referenced.append(RELEVANCE_NAME)
        unrecorded = sorted({p for p in referenced if isinstance(p, str) and p not in recorded})
        problems += [f"{rel}: not recorded when written (no sha256 to verify it against)" for rel in unrecorded]
        return problems

    @staticmethod
    def evidence_problems(problems: list[str]) -> list[str]:
        """The problems with the audit's evidence (images, maps, the relevance matrix): what a re-render cannot
        remake. The rest concern files ``auditor report`` writes afresh from the store (results.json, the reports,
        their figures)."""
        return [p for p in problems if not p.split(":", 1)[0].startswith(DERIVED)]

    def integrity_error(self, problems: list[str], what_then: str) -> AuditorError:
        """One line naming the first problem, for a command that refuses an altered folder."""
        more = f" (and {len(problems) - 1} more; `auditor verify {self.dir}` lists them)" if len(problems) > 1 else ""
        return AuditorError(f"{self.dir}: {problems[0]}{more}: the run folder differs from what its audit recorded; "
                            f"{what_then}")

    # writing

    def add_generation(self, record: dict, image, maps: dict[str, np.ndarray], overlays: dict) -> dict:
        """Store one finished generation: image, maps (``"<concept_index>_<method>" -> 2-D array``), overlays
        (same keys -> PIL image). Files land first, the row commits last. Returns the record as stored, with
        ``image`` and each concept's ``maps`` (method -> overlay path) filled in, paths relative to the run folder."""
        pid, seed = record.get("prompt_id"), record.get("seed")
        if not isinstance(pid, str) or not _SAFE_ID.match(pid):
            raise ValueError(f"prompt_id {pid!r} must match {_SAFE_ID.pattern}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed {seed!r} must be an integer from 0 to {MAX_SEED}")
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
                now = utc_now()
                with self._conn:
                    for rel, data in files:
                        self._record_artifact(rel, data, now)
                    self._conn.execute("INSERT INTO generations (prompt_id, seed, record, finished_at) VALUES (?, ?, ?, ?)",
                                       (pid, seed, json.dumps(stored, sort_keys=True), now))
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
        return self.write_artifact(RELEVANCE_NAME, buf.getvalue())

    def write_artifact(self, rel: str, data: bytes) -> Path:
        """Write a file of the run atomically and record its sha256."""
        path = self.dir / rel
        atomic_write(path, data)
        self._commit_artifact(rel, data)
        return path

    def record_file(self, rel: str) -> Path:
        """Record the sha256 of a file this process has just written by other means (the report's figures)."""
        path = self.dir / rel
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AuditorError(f"{path}: cannot read what was just written ({_why(exc)})") from None
        self._commit_artifact(rel, data)
        return path

    def _commit_artifact(self, rel: str, data: bytes) -> None:
        try:
            with self._conn:
                self._record_artifact(rel, data, utc_now())
        except sqlite3.Error as exc:
            raise AuditorError(f"{self.dir / DB_NAME}: cannot record {rel} ({exc})") from None

    def _record_artifact(self, rel: str, data: bytes, when: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO artifacts (path, sha256, bytes, recorded_at) VALUES (?, ?, ?, ?)",
                           (rel, hashlib.sha256(data).hexdigest(), len(data), when))

    def mark_forced(self, command: str, problems: list[str], command_line: list[str] | None = None) -> None:
        """Put on the record that ``command`` went ahead although the folder differed from its records."""
        entry = {"time": utc_now(), "command": command, "command_line": command_line, "problems": list(problems)}
        self._write_manifest({**self.manifest, "forced": [*self.manifest.get("forced", []), entry]})

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
        return self.write_artifact(RESULTS_NAME, (json.dumps(out, indent=2, ensure_ascii=False,
                                                              default=_json_default) + "\n").encode())

    def write_checksums(self) -> Path:
        """``checksums.sha256`` from the recorded sha256 of every artefact (a file altered or deleted since it was
        written fails ``sha256sum -c``), plus ``run.sqlite`` as it is now. Write it last: anything written afterwards
        (a re-rendered report) needs a new one."""
        lines = [f"{digest}  {rel}\n" for rel, digest in self.artifacts().items()]
        lines.append(f"{sha256_file(self.dir / DB_NAME)}  {DB_NAME}\n")
        path = self.dir / CHECKSUMS_NAME
        atomic_write(path, "".join(sorted(lines, key=lambda line: line.split("  ", 1)[1])).encode())
        return path

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
    run inside the folder verifies them. Only for a folder this process has just written whole (a compare folder);
    a run folder's come from its records (``RunStore.write_checksums``)."""
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
                    f"and run the audit again with --out {run_dir}")
        return f"{db}: the run manifest is missing although {rows} generation(s) are stored (the database was altered)"
    return f"{db}: not a readable run database ({exc})"


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
                           f"with --out {run_dir} once that is fixed") from None


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
