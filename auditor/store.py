"""The run store: one audit run as a folder that survives a kill at any instant and can be verified by a reviewer.

Layout of a run folder::

    run.sqlite                      manifest (one JSON row), generations (one row per finished (prompt_id, seed)),
                                    summary (one JSON row once the run finished), artifacts (path -> sha256)
    images/<pid>__s<seed>.png       the generated image
    maps/<pid>__s<seed>.npz         float16 concept maps, one array per "<concept_index>_<method>"
    maps/<pid>__s<seed>__<concept_index>_<method>.png   overlays the report shows
    relevance.npz                   the head-relevance matrix used (``auditor.run_relevance``)
    figures/                        report figures
    results.json, report.html, report.pdf, checksums.sha256

Crash safety: every file of a generation is written atomically (``auditor.run_folder``) *before* the generation's
row commits, so after a kill -9 a generation is either finished (row + all files) or absent from the database (its
stray files are overwritten when the run resumes); ``run.sqlite`` exists only with its manifest
(``auditor.run_db``). Paths inside records are relative to the run folder, so the folder can be moved or zipped.
One writer per folder: a store holds the folder's lock (``run_folder.acquire_lock``) until it is closed.

Integrity: every artefact's sha256 is recorded in ``run.sqlite`` in the transaction that records what it belongs to;
``verify`` compares the folder with those records, and ``checksums.sha256`` is written from them, never from
whatever is on disk.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np

from auditor.errors import AuditorError
from auditor.manifest import manifest_base, new_run_id, run_identity, utc_now  # noqa: F401 (manifest_base: API)
from auditor.run_db import (  # noqa: F401 (MAX_SEED, gen_stem: the store's API)
    MAX_SEED, _check_contents, _checked_id, _connect, _create_run, _generation_files, _json_default, _NoManifest,
    _stored_record, _unreadable, _upgrade, check_record, check_summary, gen_stem, in_suite_order,
)
from auditor.run_folder import (  # noqa: F401 (LOCK_NAME, run_lock, write_checksums: the store's API)
    CHECKSUMS_NAME, DB_NAME, LOCK_NAME, _fsync_dir, _interrupted_creation, _refuse_foreign,
    _sweep_temporaries, _unlink, _why, acquire_lock, atomic_write, folder_problems, release_lock, run_lock,
    sha256_file, write_checksums,
)
from auditor.run_relevance import RELEVANCE_NAME, relevance_bytes
from auditor.summary import summarise

RESULTS_NAME = "results.json"
DERIVED = (RESULTS_NAME, "report.html", "report.pdf", "figures/")  # remade from the store by every re-render


# --- the store ------------------------------------------------------------------------------------------------------


class RunStore:
    """One run folder. Create it with ``RunStore.create``; reopen it (resume, re-render) with ``RunStore.open``, or
    ``RunStore.open(dir, readonly=True)`` to read it (compare, verify). A store holds the folder's lock until
    ``close`` (or the end of a ``with`` block).

    Example:
        >>> import tempfile, numpy as np
        >>> from auditor.store import RunStore
        >>> folder = tempfile.mkdtemp()
        >>> with RunStore.create(folder, {"model": {"name": "m"}, "seeds": [0]}) as store:
        ...     rec = store.add_generation({"prompt_id": "p1", "seed": 0, "concepts": [{"text": "cat"}]},
        ...                                np.zeros((8, 8, 3), np.uint8), {"0_selective": np.ones((4, 4))}, {})
        ...     store.finish({"concepts": []})
        ...     rec["image"], rec["maps_file"], store.is_finished, store.verify()
        ('images/p1__s0.png', 'maps/p1__s0.npz', True, [])
    """

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
        that holds anything but a run (or what an interrupted creation left).

        Args:
            run_dir: the run folder (created if missing; may hold only this run or what its creation left).
            manifest: the run's manifest (``auditor.manifest``); ``start_time`` and ``run_id`` are added if missing.

        Returns:
            The open store, holding the folder's exclusive lock.
        """
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
            _create_run(run_dir, manifest)
            return cls.open(run_dir)
        finally:
            release_lock(key)

    @classmethod
    def open(cls, run_dir: str | Path, readonly: bool = False) -> "RunStore":
        """The run in ``run_dir``, locked for writing (a resume, a re-render) or, ``readonly``, shared with other
        readers (compare, verify); an AuditorError naming the folder when it holds no readable run."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise AuditorError(f"{run_dir}: no such run folder")
        db = run_dir / DB_NAME
        if not db.is_file():
            if (run_dir / LOCK_NAME).exists() and _interrupted_creation(run_dir):
                raise AuditorError(f"{run_dir}: holds no run: an audit was interrupted while creating it; run the "
                                   f"audit again with `out={run_dir}` (the folder is reused)")
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
                _upgrade(conn, db)
            except AuditorError:
                store.close()
                raise
            _sweep_temporaries(run_dir)
        return store

    def close(self) -> None:
        """Close the database and release the folder's lock."""
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
        """(prompt_id, seed) of every finished generation."""
        return {(p, int(s)) for p, s in self._all("SELECT prompt_id, seed FROM generations")}

    def generations(self) -> list[dict]:
        """Finished generations in suite prompt order (``manifest.suite.prompt_ids``), then seed."""
        rows = self._all("SELECT prompt_id, seed, record FROM generations ORDER BY rowid")
        records = [self._record(pid, seed, raw) for pid, seed, raw in rows]
        return in_suite_order(records, (self.manifest.get("suite") or {}).get("prompt_ids") or [])

    def summary(self) -> dict:
        """The finished run's summary, or a provisional one (``partial: true``) computed from what is finished."""
        stored = self._one("SELECT json FROM summary WHERE id = 1")
        if stored is not None:
            return check_summary(self.dir / DB_NAME, stored)
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
        return check_record(f"{self.dir / DB_NAME}: generation ({pid}, seed {seed})", pid, seed, raw)

    # integrity

    def artifacts(self) -> dict[str, str]:
        """Recorded artefacts: path relative to the run folder -> sha256."""
        return dict(self._all("SELECT path, sha256 FROM artifacts ORDER BY path"))

    def verify(self) -> list[str]:
        """What differs from the records, one line per file: a recorded artefact missing or altered, or a file a
        generation refers to that was never recorded (a run made before artefacts were recorded). Empty: intact."""
        try:
            recorded = self.artifacts()
        except AuditorError:
            recorded = {}  # a read-only open of a run older than the artefacts table
        referenced = []
        for g in self.generations():
            referenced += [g["image"], g.get("maps_file")] + [p for c in g["concepts"] for p in c["maps"].values()]
        if (self.dir / RELEVANCE_NAME).exists():
            referenced.append(RELEVANCE_NAME)
        return folder_problems(self.dir, recorded, referenced)

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
        """Store one finished generation. Files land first, the row commits last.

        Args:
            record: the generation record: ``prompt_id`` (the suite's id rule), ``seed`` (0 to ``MAX_SEED``), and
                ``concepts``, a list of dicts whose ``flags`` each have a type, a severity and a message.
            image: the generated image (PIL image or uint8 array).
            maps: ``"<concept_index>_<method>" -> 2-D array``, kept as float16 in ``maps/<stem>.npz``.
            overlays: the same keys -> PIL image, written as PNGs the report shows.

        Returns:
            The record as stored, with ``image`` and each concept's ``maps`` (method -> overlay path) filled in,
            paths relative to the run folder.

        Raises:
            ValueError: the record, a map key or a flag is malformed, or the generation is already stored.
            AuditorError: a file or the row cannot be written; nothing of the generation is left behind.
        """
        pid, seed = _checked_id(record)
        if (pid, seed) in self.finished():
            raise ValueError(f"generation ({pid}, seed {seed}) is already stored; resume skips finished ones")
        _check_contents(record, maps, overlays)
        stem = gen_stem(pid, seed)
        files = _generation_files(stem, image, maps, overlays)
        stored = _stored_record(record, seed, stem, files, maps, overlays)
        self._commit_generation(pid, seed, files, stored)
        return stored

    def _commit_generation(self, pid: str, seed: int, files: list[tuple[str, bytes]], stored: dict) -> None:
        """Write the files, then the row with their sha256 in one transaction; on failure remove what was written."""
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

    def save_relevance(self, categories, head_names, matrix: np.ndarray) -> Path:
        """Keep a copy of the relevance matrix the run used (figures and compare read it; no pickles)."""
        return self.write_artifact(RELEVANCE_NAME, relevance_bytes(categories, head_names, matrix))

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


