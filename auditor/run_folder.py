"""A run folder on disk: files written atomically, one writer at a time, the leftovers of killed writers swept.

Every file of a run is written to a temporary name, fsynced and renamed into place (``atomic_write``), so a reader or
a crash sees the old file or the whole new one. One writer per folder: an audit, a resume or a re-render holds an
exclusive ``flock`` on ``.auditor.lock`` for as long as it writes; compare and verify hold a shared one while they
read. The kernel drops the lock when the process dies, so a killed run never leaves the folder locked.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: msvcrt below
    fcntl = None

from auditor.errors import AuditorError

DB_NAME = "run.sqlite"
CHECKSUMS_NAME = "checksums.sha256"
LOCK_NAME = ".auditor.lock"
RUN_SUBDIRS = ("images", "maps", "figures")
_TMP_MARK = ".tmp-"


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path) -> Path:
    """``checksums.sha256`` over every file of ``folder`` in ``sha256sum`` format: ``sha256sum -c checksums.sha256``
    run inside the folder verifies them. Only for a folder this process has just written whole (a compare folder);
    a run folder's come from its records (``RunStore.write_checksums``)."""
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in artifact_files(folder)]
    path = folder / CHECKSUMS_NAME
    atomic_write(path, "".join(lines).encode())
    return path


def folder_problems(run_dir: Path, recorded: dict[str, str], referenced: list) -> list[str]:
    """What differs from the records, one line per file: a ``recorded`` artefact (path -> sha256) missing or altered,
    or a ``referenced`` path that was never recorded."""
    problems = []
    for rel, digest in recorded.items():
        path = run_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: altered (sha256 differs from the one recorded when it was written)")
    unrecorded = sorted({p for p in referenced if isinstance(p, str) and p not in recorded})
    problems += [f"{rel}: not recorded when written (no sha256 to verify it against)" for rel in unrecorded]
    return problems


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


# --- what a folder holds -----------------------------------------------------------------------------------------


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
