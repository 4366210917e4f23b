"""Generations on Ray workers: each worker (an actor) loads the model once and audits batches of (prompt, seed)
tasks; results come back to the driver, which alone writes the run store.

A worker that dies (killed, out of memory, its machine gone) loses only the tasks it held, which go back to the
queue for the other workers, and a replacement worker is started. A driver that dies takes its workers with it (they
belong to its Ray job); ``--resume`` continues the run from what the store holds.

Imported only for ``--executor ray``: importing it imports Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import deque
from typing import Iterator, Sequence

import ray

from auditor.engine.models import load_model
from auditor.errors import AuditorError
from auditor.executors import ExecutionOptions, ModelSpec, batches
from auditor.tasks import audit_tasks

IN_FLIGHT = 2  # batches queued per worker: the next one is there when it finishes, while the driver stores results


class AuditWorker:
    """One Ray worker: the model loaded once, then ``run`` for each batch of tasks."""

    def __init__(self, model: ModelSpec):
        import torch

        # Ray gives each worker its CPUs; torch would otherwise start a thread per core of the machine, and workers
        # sharing cores spin against each other.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        lm = load_model(model.spec, model.device, model.dtype, model.allow_pickle, model.variant)
        lm.pipe.set_progress_bar_config(disable=True)
        self.pipe = lm.pipe
        self.about = {"fingerprint": lm.fingerprint, "device": lm.device, "host": socket.gethostname(),
                      "pid": os.getpid()}

    def describe(self) -> dict:
        return self.about

    def call(self, fn, *args):
        """``fn(pipe, *args)`` on this worker's model (``fn`` a module-level function, sent by reference)."""
        return fn(self.pipe, *args)


class _Slot:
    """A worker the executor started, and how many batches it holds."""

    def __init__(self, handle, name: str):
        self.handle, self.name, self.busy, self.alive = handle, name, 0, True


class RayExecutor:
    """Tasks spread over Ray workers (see the module docstring); results yielded as they finish."""

    def __init__(self, options: ExecutionOptions, model: ModelSpec, settings):
        self.options, self.model = options, model
        self.started_ray = _connect(options.ray_address)
        self.slots: list[_Slot] = []
        self.retried = 0  # batches given to another worker after theirs died
        try:
            self.workers = _worker_count(options)
            self.replacements_left = 2 * self.workers
            self._tag = uuid.uuid4().hex[:8]
            self.settings_ref = ray.put(settings)  # sent once, shared by every worker on a node
            for _ in range(self.workers):
                self._start_worker()
            self.device = self._check_workers()
        except BaseException:
            self.close()
            raise

    def _start_worker(self) -> _Slot:
        name = f"auditor-worker-{self._tag}-{len(self.slots)}"
        actor = _remote_worker().options(num_cpus=1, num_gpus=self.options.gpus_per_worker, name=name)
        slot = _Slot(actor.remote(self.model), name)
        self.slots.append(slot)
        return slot

    def _check_workers(self) -> str:
        """Wait for every worker's model; refuse one that loaded other files or on another kind of device."""
        try:
            about = ray.get([s.handle.describe.remote() for s in self.slots])
        except ray.exceptions.RayError as exc:
            raise AuditorError(f"--executor ray: a worker could not load the model: {_reason(exc)}") from None
        for a in about:
            if a["fingerprint"] != self.model.fingerprint:
                raise AuditorError(f"--executor ray: the worker on {a['host']} loaded {self.model.spec} with "
                                   f"fingerprint {a['fingerprint'][:12]}, not the driver's "
                                   f"{self.model.fingerprint[:12]}; give every machine the same model files")
        devices = sorted({a["device"] for a in about})
        if len(devices) > 1:  # one run's images must come from one kind of device (the manifest records it)
            raise AuditorError(f"--executor ray: workers generate on different devices ({', '.join(devices)}); "
                               f"set --device, or --gpus-per-worker for GPU workers")
        return devices[0]

    def run(self, tasks: Sequence) -> Iterator[tuple[object, object]]:
        """Yield ``(task, result)`` for every task as its batch finishes, each task exactly once."""
        chunks = batches(tasks, self.options.batch_size)
        for i, results in self._dispatch([(audit_tasks, (c, self.settings_ref)) for c in chunks]):
            yield from zip(chunks[i], results)

    def map(self, fn, jobs: Sequence[tuple]) -> list:
        """``[fn(pipe, *args) for args in jobs]``, spread over the workers, in the order of ``jobs``.

        Args:
            fn: a module-level function of the worker's pipeline and ``args``.
            jobs: one argument tuple per call.

        Returns:
            The calls' results, in the order of ``jobs``.
        """
        out = [None] * len(jobs)
        for i, result in self._dispatch([(fn, args) for args in jobs]):
            out[i] = result
        return out

    def _dispatch(self, jobs: list[tuple]) -> Iterator[tuple[int, object]]:
        """Yield ``(job index, result)`` as jobs finish; a dead worker's jobs go back to the queue."""
        queue, inflight = deque(range(len(jobs))), {}
        while queue or inflight:
            self._fill(queue, inflight, jobs)
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            slot, i = inflight.pop(ref)
            slot.busy -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker died: its jobs go to the others
                queue.appendleft(i)
                self.retried += 1
                self._lost(slot, exc)
                continue
            except ray.exceptions.RayTaskError as exc:  # the job itself failed: the same on any worker
                cause = getattr(exc, "cause", None)
                if isinstance(cause, AuditorError):
                    raise AuditorError(str(cause)) from None
                raise cause if isinstance(cause, Exception) else exc
            yield i, result

    def _fill(self, queue: deque, inflight: dict, jobs: list[tuple]) -> None:
        alive = [s for s in self.slots if s.alive]
        if not alive and queue:
            raise AuditorError("--executor ray: every worker died and no replacement could be started")
        while queue:
            slot = min(alive, key=lambda s: s.busy)
            if slot.busy >= IN_FLIGHT:
                return
            i = queue.popleft()
            fn, args = jobs[i]
            inflight[slot.handle.call.remote(fn, *args)] = (slot, i)
            slot.busy += 1

    def _lost(self, slot: _Slot, exc: Exception) -> None:
        if not slot.alive:
            return
        slot.alive = False
        if self.replacements_left > 0:  # bounded: a worker that cannot live (no memory, no model) must not loop
            self.replacements_left -= 1
            self._start_worker()
        elif not any(s.alive for s in self.slots):
            raise AuditorError(f"--executor ray: every worker died (last: {_reason(exc)})")

    def close(self) -> None:
        """Stop the workers and wait until they are gone (``ray.kill`` only asks); a cluster this executor started is
        shut down, one it joined is left running."""
        killed = []
        for slot in self.slots:
            if slot.alive:
                try:
                    ray.kill(slot.handle)
                    killed.append(slot.handle)
                except Exception:  # already gone: nothing to stop
                    pass
        for handle in killed:  # a call to a killed actor fails once the cluster has marked it dead
            try:
                ray.get(handle.describe.remote())
            except Exception:
                pass
        self.slots = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REMOTE_WORKER = None


def _remote_worker():
    """The Ray actor class of ``AuditWorker``, made once per process (each ``ray.remote`` registers a class)."""
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(AuditWorker)
    return _REMOTE_WORKER


def _connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (or the one this process already joined), else start a local one. Returns
    whether this call connected (and so should disconnect at the end)."""
    if ray.is_initialized():
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--ray-address {address}" if address else "--executor ray"
        raise AuditorError(f"{where}: cannot start or join a Ray cluster ({_reason(exc)})") from None
    return True


def _worker_count(options: ExecutionOptions) -> int:
    """--workers, else as many as the cluster has room for; refused when the cluster cannot hold them (they would
    wait forever for resources)."""
    res = ray.cluster_resources()
    cpus, gpus, per_gpu = int(res.get("CPU", 0)), float(res.get("GPU", 0)), options.gpus_per_worker
    room = cpus if per_gpu == 0 else min(cpus, int(gpus // per_gpu + 1e-9))
    n = options.workers or room
    if n < 1 or n > room:
        what = f"{cpus} CPUs" + (f" and {gpus:g} GPUs at {per_gpu:g} per worker" if per_gpu else "")
        raise AuditorError(f"--workers {n}: the Ray cluster has room for {room} worker(s) ({what}, one CPU each)")
    return n


def _reason(exc: Exception) -> str:
    """The line of a Ray error that says what went wrong (its message carries the remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "AuditorError:" in line:
            return line.split("AuditorError:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__
