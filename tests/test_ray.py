"""`auditor audit --executor ray` on a local Ray cluster the tests start themselves (two CPUs, two workers, the
bundled model): the results equal the local executor's; a worker killed mid-run loses and redoes nothing; a driver
killed mid-run resumes (`--resume`) to the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from killing import kill_after_stored, start_audit, stored_rows  # noqa: E402
from test_batch import assert_same_run  # noqa: E402  (after the skip: it needs nothing of Ray)

pytestmark = pytest.mark.slow

# 20 steps, as tests/test_batch.py generates: comparisons across batch sizes hold at that many (at 3 steps one
# near-flat map's Otsu threshold moves a histogram bin between batch sizes, area 0.289 vs 0.295)
TINY = """\
name: tiny
description: two prompts of the shapes world
defaults: {steps: 20, seeds: [0, 1, 2, 3, 4, 5], guidance: 5.0, resolution: 64}
prompts:
  - {id: p1, text: a red star}
  - {id: p2, text: a big blue circle and a small green heart}
"""
PLANNED = 12


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU Ray cluster for this module; its address lets other processes join it as drivers."""
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    p.write_text(TINY)
    return p


@pytest.fixture(scope="module")
def local_run(suite, tmp_path_factory) -> Path:
    """The reference: the same audit with the local executor."""
    from auditor.report.render import publish
    from auditor.runs import AuditOptions, run_audit

    out = tmp_path_factory.mktemp("local") / "run"
    run_audit(AuditOptions(suite=str(suite), out=str(out), pdf=False), publish=publish)
    return out


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_ray_results_equal_the_local_executors(cluster, suite, local_run, tmp_path):
    from auditor.report.render import publish
    from auditor.runs import AuditOptions, run_audit

    out = tmp_path / "ray"
    result = run_audit(AuditOptions(suite=str(suite), out=str(out), pdf=False, executor="ray", workers=2),
                       publish=publish)
    assert result.generated == PLANNED
    a, b = _results(local_run), _results(out)
    assert a["generations"] == b["generations"]  # batch 1 on one CPU thread either way: the same bits
    for g in a["generations"]:
        assert (local_run / g["image"]).read_bytes() == (out / g["image"]).read_bytes()
    assert a["summary"] == b["summary"]
    from auditor.store import RunStore

    with RunStore.open(out, readonly=True) as store:
        assert store.manifest["device"] == "cpu"  # where the workers generated
    assert _no_workers_left()


def _no_workers_left() -> bool:
    """Every worker an executor started is gone (its ``close`` waits until they are)."""
    return not [n for n in ray.util.list_named_actors() if n.startswith("auditor-worker")]


def _worker_pids(busy_only: bool) -> list[int]:
    """This test's Ray workers (processes under this one titled ``ray::AuditWorker``, ``.call`` while busy)."""
    mine, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::AuditWorker") or (busy_only and not title.startswith("ray::AuditWorker.")):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != mine:  # a descendant of this process: a worker of this test's cluster
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if pid == mine:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_a_worker_killed_mid_run_loses_and_redoes_nothing(cluster, suite, local_run, tmp_path, monkeypatch):
    from auditor import ray_executor
    from auditor.report.render import publish
    from auditor.runs import AuditOptions, run_audit
    from auditor.store import RunStore

    stored: list[tuple[str, int]] = []
    add = RunStore.add_generation

    def counted(self, record, *args, **kwargs):
        stored.append((record["prompt_id"], record["seed"]))
        return add(self, record, *args, **kwargs)

    retried = []
    close = ray_executor.RayExecutor.close

    def noted(self):
        retried.append(self.retried)
        return close(self)

    monkeypatch.setattr(RunStore, "add_generation", counted)
    monkeypatch.setattr(ray_executor.RayExecutor, "close", noted)
    killed = []

    class KillOnFirstResult:  # the progress bar's place: called after each stored generation
        def update(self, n):
            if killed:
                return
            while not killed:  # a worker holding a batch: the driver is in here, so the others stay queued
                pids = _worker_pids(busy_only=True)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                else:
                    time.sleep(0.01)

    out = tmp_path / "ray"
    result = run_audit(AuditOptions(suite=str(suite), out=str(out), pdf=False, executor="ray", workers=2,
                                    batch_size=2), progress=lambda total, done: KillOnFirstResult(),
                       publish=publish)
    assert killed, "no busy worker was found to kill"
    assert retried and retried[0] >= 1, "the killed worker's batches were not given to another worker"
    assert result.generated == PLANNED
    assert sorted(stored) == sorted(set(stored)) and len(stored) == PLANNED  # each generation stored once
    assert_same_run(local_run, out)  # batches of 2: equal within the batching tolerance


def _driver(suite: Path, address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "auditor", "audit", str(suite), "--no-pdf", "--executor", "ray",
            "--ray-address", address, "--workers", "2", *args]


def test_a_killed_driver_resumes_to_the_same_results(cluster, suite, local_run, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    log = tmp_path / "killed.stderr"
    kept = kill_after_stored(start_audit(_driver(suite, cluster, "--out", str(killed)), env, log), killed, log=log)
    assert 2 <= len(kept) < PLANNED and not (killed / "results.json").exists()

    r = subprocess.run(_driver(suite, cluster, "--resume", str(killed), "--json"), env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["resumed_skipped"] == len(kept)
    assert set(kept) <= set(stored_rows(killed)) and len(stored_rows(killed)) == PLANNED  # nothing finished was redone
    a, b = _results(local_run), _results(killed)
    assert a["generations"] == b["generations"]
    assert {k: v for k, v in a["summary"].items() if k != "partial"} == \
        {k: v for k, v in b["summary"].items() if k != "partial"}
    for g in a["generations"]:
        assert (local_run / g["image"]).read_bytes() == (killed / g["image"]).read_bytes()
    code = subprocess.run([sys.executable, "-m", "auditor", "verify", str(killed)], capture_output=True).returncode
    assert code == 0


def test_calibration_sharded_on_ray_equals_calibration_here(cluster):
    """HRV relevance's and the ranking's batches and the threshold generations on two workers: the same profile
    as one process."""
    import numpy as np

    from auditor.calibration import calibrate_profile
    from auditor.engine.models import load_model
    from auditor.executors import ExecutionOptions, open_executor
    from auditor.registry import bundled_lexicon
    from auditor.zoo.grammar import sample_prompts

    lm = load_model("shapes-v1", "cpu")
    prompts = sample_prompts(24, seed=5)
    # The budget is loose so that six prompts' concepts always fit a quantile above 0 (a tight one can leave the
    # profile uncalibrated, which would compare nothing): this test is about sharding, not about the fit.
    kwargs = dict(budget=24, threshold_prompts=6, flag_budget=0.9, max_flag_rate=0.5, steps=3, guidance=5.0,
                  lexicon=bundled_lexicon())
    here = calibrate_profile(lm, prompts, "test", **kwargs)
    with open_executor(ExecutionOptions("ray", workers=2), lm, None, "cpu", False) as ex:
        sharded = calibrate_profile(lm, prompts, "test", executor=ex, **kwargs)
    assert here.relevance.budget_prompts == sharded.relevance.budget_prompts
    assert np.array_equal(here.relevance.votes, sharded.relevance.votes)
    assert here.relevance.agreement_curve == sharded.relevance.agreement_curve
    a, b = here.ranking, sharded.ranking
    assert a.budget_prompts == b.budget_prompts and a.agreement_curve == b.agreement_curve
    assert np.array_equal(a.sums, b.sums) and np.array_equal(a.halves, b.halves)
    assert here.thresholds is not None and here.thresholds.to_json() == sharded.thresholds.to_json()
    assert here.k_per_category() == sharded.k_per_category()
    assert here.provenance["thresholds"]["q"] > 0
    assert here.content() == sharded.content()


def test_workers_the_cluster_cannot_hold_or_another_model_are_refused(cluster):
    import dataclasses

    from auditor.engine.models import load_model
    from auditor.errors import AuditorError
    from auditor.executors import ExecutionOptions, ModelSpec
    from auditor.ray_executor import RayExecutor

    spec = ModelSpec.of(load_model("shapes-v1", "cpu"), "cpu", False)
    with pytest.raises(AuditorError, match="room for 2 worker"):  # they would wait for CPUs forever
        RayExecutor(ExecutionOptions("ray", workers=3), spec, None)
    other = dataclasses.replace(spec, fingerprint="0" * 64)  # as if another machine held other files there
    with pytest.raises(AuditorError, match=f"fingerprint {spec.fingerprint[:12]}, not the driver's 000000000000"):
        RayExecutor(ExecutionOptions("ray", workers=1), other, None)
    assert _no_workers_left()
