"""Where an audit's generations run: in this process (``local``, batched) or on Ray workers (``ray``).

An executor takes the run's unfinished ``AuditTask``s and yields ``(task, TaskResult)`` as each finishes; the driver
(``runs._run``) alone writes them to the run store, so the store keeps one writer whichever executor made them.
Every task depends only on its own prompt and seed, so the order results arrive in changes nothing that is stored.

This module imports no Ray: ``auditor.ray_executor`` is imported only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from auditor.errors import AuditorError
from auditor.tasks import audit_tasks

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutionOptions:
    """How to run the generations; none of it changes the results, so none of it is part of the run's identity."""

    executor: str = "local"
    batch_size: int = 1  # (prompt, seed) pairs per pipeline call
    ray_address: str | None = None  # None: start a local Ray cluster; "auto" or HOST:PORT: join a running one
    workers: int | None = None  # Ray workers; None: as many as the cluster's CPUs (or GPUs / --gpus-per-worker)
    gpus_per_worker: float = 0.0

    def check(self) -> None:
        """Refuse values that cannot run, and Ray options given without the Ray executor (they would be ignored)."""
        if self.executor not in EXECUTORS:
            raise AuditorError(f"--executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if self.batch_size < 1:
            raise AuditorError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise AuditorError(f"--workers {self.workers}: must be at least 1")
        if not self.gpus_per_worker >= 0:
            raise AuditorError(f"--gpus-per-worker {self.gpus_per_worker}: must be at least 0")
        if self.executor == "ray":
            ray_available()
        if self.executor == "local":
            given = [name for name, value in (("--ray-address", self.ray_address), ("--workers", self.workers),
                                              ("--gpus-per-worker", self.gpus_per_worker or None)) if value]
            if given:
                raise AuditorError(f"{', '.join(given)}: only with --executor ray")


def ray_available() -> None:
    """Refuse --executor ray, before anything is loaded, where Ray is not installed (it is an optional extra)."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise AuditorError(f"--executor ray: Ray is not installed ({exc}); install it with "
                           f"pip install 'auditor[ray]'") from None


def batches(tasks: Iterable, size: int) -> list[list]:
    """``tasks`` cut into consecutive lists of at most ``size``."""
    items = list(tasks)
    return [items[i:i + size] for i in range(0, len(items), size)]


class LocalExecutor:
    """Generations in this process, ``batch_size`` tasks per pipeline call."""

    def __init__(self, pipe, settings, batch_size: int = 1, device: str = "cpu"):
        self.pipe, self.settings, self.batch_size, self.device = pipe, settings, int(batch_size), device

    def run(self, tasks: Sequence) -> Iterator[tuple[object, object]]:
        """Yield ``(task, result)`` for every task, in order."""
        for chunk in batches(tasks, self.batch_size):
            yield from zip(chunk, audit_tasks(self.pipe, chunk, self.settings))

    def map(self, fn, jobs: Sequence[tuple]) -> list:
        """``[fn(pipe, *args) for args in jobs]`` here, in order (the Ray executor spreads the same calls)."""
        return [fn(self.pipe, *args) for args in jobs]

    def close(self) -> None:
        """Nothing to release: the pipeline belongs to the caller."""

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the driver's model itself (the fingerprint proves it loaded the same one)."""

    spec: str
    device: str
    dtype: str
    allow_pickle: bool
    variant: str | None
    fingerprint: str

    @classmethod
    def of(cls, lm, device: str, allow_pickle: bool) -> "ModelSpec":
        """The spec of loaded model ``lm``: a bundled model by name, a folder by its absolute path.

        Args:
            lm: the driver's ``auditor.engine.models.LoadedModel``.
            device: the device the workers generate on (``--device``; ``auto`` is each worker's own pick).
            allow_pickle: ``--allow-pickle``.

        Returns:
            A ``ModelSpec`` that loads the same files on any machine that has them at the same place.
        """
        spec = lm.name if lm.source == "bundled" else str(lm.path.resolve())
        return cls(spec, device, lm.dtype, allow_pickle, lm.variant, lm.fingerprint)


def open_executor(options: ExecutionOptions, lm, settings, device: str, allow_pickle: bool):
    """The executor ``options`` ask for.

    Args:
        options: ``ExecutionOptions`` (checked here).
        lm: the driver's loaded model (local: it generates; Ray: workers load their own copy, checked against it).
        settings: the run's ``runs.TaskSettings``.
        device, allow_pickle: the user's ``--device`` and ``--allow-pickle``, for Ray workers' own loading.

    Returns:
        An executor with ``run(tasks)``, ``close()`` and ``device`` (where generations run, for the manifest).
    """
    options.check()
    if options.executor == "local":
        return LocalExecutor(lm.pipe, settings, options.batch_size, lm.device)
    from auditor.ray_executor import RayExecutor  # here: the local path never imports Ray

    return RayExecutor(options, ModelSpec.of(lm, device, allow_pickle), settings)
