"""The run store: roundtrip, resume after a kill or a failed write, atomic files, checksums, results.json, summary."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fake_run
from auditor.errors import AuditorError
from auditor.store import RunStore, atomic_write, manifest_base
from auditor.summary import summarise, wilson

TESTS = Path(__file__).resolve().parent


def _gen(pid: str, seed: int, n_concepts: int = 2):
    """One generation's arguments for add_generation."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    concepts = [{"text": f"w{i}", "role": "object", "category": "shape", "binds_to": None, "token_indices": [i + 1],
                 "scores": {"peak": 0.5}, "flags": []} for i in range(n_concepts)]
    maps = {f"{i}_{m}": rng.random((16, 16)) for i in range(n_concepts) for m in ("selective", "all_heads")}
    overlays = {k: Image.fromarray((v * 255).astype(np.uint8)) for k, v in maps.items()}
    return {"prompt_id": pid, "prompt": f"prompt {pid}", "seed": seed, "concepts": concepts}, image, maps, overlays


def _manifest(**extra) -> dict:
    return {"model": {"name": "m", "fingerprint": "f"}, "suite": {"name": "s", "prompt_ids": ["b", "a"]},
            "seeds": [0, 1], **extra}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return fake_run.build(tmp_path_factory.mktemp("store") / "run")


def test_roundtrip_keeps_every_artifact_and_orders_by_suite_then_seed(run):
    with RunStore.open(run) as store:
        gens = store.generations()
        assert store.finished() == {(p[0], s) for p in fake_run.PROMPTS for s in (0, 1, 2)}
        assert [(g["prompt_id"], g["seed"]) for g in gens] == [(p[0], s) for p in fake_run.PROMPTS for s in (0, 1, 2)]
        assert store.manifest["model"]["name"] == "shapes-fake" and store.manifest["status"] == "finished"
    g = gens[0]
    assert Image.open(run / g["image"]).size == (32, 32)
    with np.load(run / g["maps_file"], allow_pickle=False) as z:
        assert sorted(z.files) == sorted(f"{i}_{m}" for i in range(4) for m in fake_run.METHODS)
        assert z["0_selective"].dtype == np.float16 and z["0_selective"].shape == (32, 32)
    for c in g["concepts"]:
        assert set(c["maps"]) == set(fake_run.METHODS)
        assert all((run / p).is_file() and not Path(p).is_absolute() for p in c["maps"].values())


def test_generations_follow_suite_order_not_finishing_order(tmp_path):
    with RunStore.create(tmp_path / "r", _manifest()) as store:
        for pid, seed in [("a", 1), ("b", 1), ("a", 0), ("b", 0)]:
            store.add_generation(*_gen(pid, seed))
        assert [(g["prompt_id"], g["seed"]) for g in store.generations()] == [("b", 0), ("b", 1), ("a", 0), ("a", 1)]


def test_create_refuses_a_different_run_and_reopens_the_same_one(tmp_path):
    with RunStore.create(tmp_path / "r", _manifest(steps=20)) as store:
        store.add_generation(*_gen("a", 0))
    with pytest.raises(AuditorError, match=r"already holds a different run .*steps") as err:
        RunStore.create(tmp_path / "r", _manifest(steps=30))
    assert "\n" not in str(err.value)
    with RunStore.create(tmp_path / "r", _manifest(steps=20, command_line=["auditor", "audit", "--resume"])) as again:
        assert again.finished() == {("a", 0)}
    with RunStore.open(tmp_path / "r") as reopened:  # the resume is on the record
        assert [r["command_line"] for r in reopened.manifest["resumed_at"]] == [["auditor", "audit", "--resume"]]


def test_create_refuses_an_unwritable_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditorError, match="cannot write the run folder"):
        RunStore.create(blocker / "run", _manifest())


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such run folder"),
    (lambda d: d.mkdir(), "not an auditor run folder"),
    (lambda d: (d.mkdir(), (d / "run.sqlite").write_bytes(b"this is not sqlite" * 100)), "run database"),
])
def test_open_names_what_is_wrong(tmp_path, setup, message):
    setup(tmp_path / "r")
    with pytest.raises(AuditorError, match=message):
        RunStore.open(tmp_path / "r")


def test_a_disk_full_mid_generation_leaves_nothing_of_it_and_keeps_the_rest(tmp_path, monkeypatch):
    store = RunStore.create(tmp_path / "r", _manifest())
    store.add_generation(*_gen("a", 0))
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*.png")}
    calls = {"n": 0}
    real_fsync = os.fsync

    def full_disk(fd):  # the third file of the generation hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(AuditorError, match=r"a__s1__0_all_heads\.png: cannot write \(disk full\)"):
        store.add_generation(*_gen("a", 1))
    monkeypatch.undo()
    assert store.finished() == {("a", 0)}
    assert not [p for p in (tmp_path / "r").rglob("*") if "a__s1" in p.name or ".tmp-" in p.name]
    assert all(p.read_bytes() == data for p, data in before.items())
    store.add_generation(*_gen("a", 1))  # the resume writes it whole
    assert store.finished() == {("a", 0), ("a", 1)}


def test_a_failed_commit_removes_the_generations_files(tmp_path):
    store = RunStore.create(tmp_path / "r", _manifest())

    class FullDatabase:  # sqlite3.Connection's methods cannot be patched; stand in for the whole connection
        def __init__(self, conn):
            self.conn = conn

        def execute(self, sql, *args):
            if sql.startswith("INSERT INTO generations"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.conn.execute(sql, *args)

        def __enter__(self):
            return self.conn.__enter__()

        def __exit__(self, *exc):
            return self.conn.__exit__(*exc)

    store._conn = FullDatabase(store._conn)
    with pytest.raises(AuditorError, match=r"run\.sqlite: cannot record generation \(a, seed 0\)"):
        store.add_generation(*_gen("a", 0))
    assert not list((tmp_path / "r" / "images").iterdir()) and not list((tmp_path / "r" / "maps").iterdir())


def test_atomic_write_keeps_the_old_file_when_the_new_one_fails(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(AuditorError, match="results.json: cannot write"):
        atomic_write(target, b"new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_add_generation_refuses_duplicates_and_malformed_input(tmp_path):
    with RunStore.create(tmp_path / "r", _manifest()) as store:
        store.add_generation(*_gen("a", 0))
        with pytest.raises(ValueError, match="already stored"):
            store.add_generation(*_gen("a", 0))
        rec, img, maps, ov = _gen("a", 1)
        with pytest.raises(ValueError, match="map key"):
            store.add_generation(rec, img, {"5_selective": maps["0_selective"]}, {})
        rec["concepts"][0]["flags"] = [{"type": "wrong", "severity": "high", "message": "x"}]
        with pytest.raises(ValueError, match="flag"):
            store.add_generation(rec, img, maps, ov)
        rec, img, maps, ov = _gen("../escape", 1)
        with pytest.raises(ValueError, match="prompt_id"):
            store.add_generation(rec, img, maps, ov)
        assert store.finished() == {("a", 0)}


def test_a_seed_sqlite_cannot_hold_is_refused_before_any_file_is_written(tmp_path):
    with RunStore.create(tmp_path / "r", _manifest()) as store:
        for seed in (2 ** 63, -1):
            rec, image, maps, overlays = _gen("a", 0)
            with pytest.raises(ValueError, match="seed"):
                store.add_generation({**rec, "seed": seed}, image, maps, overlays)
        assert store.finished() == set()
    assert not list((tmp_path / "r" / "images").iterdir()) and not list((tmp_path / "r" / "maps").iterdir())


def test_every_artefact_is_recorded_with_its_sha256_in_the_transaction_of_its_generation(tmp_path):
    import hashlib

    with RunStore.create(tmp_path / "r", _manifest()) as store:
        stored = store.add_generation(*_gen("a", 0))
        recorded = store.artifacts()
    files = {stored["image"], stored["maps_file"], *(p for c in stored["concepts"] for p in c["maps"].values())}
    assert set(recorded) == files
    for rel, digest in recorded.items():
        assert hashlib.sha256((tmp_path / "r" / rel).read_bytes()).hexdigest() == digest


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_store import _gen, _manifest
    from auditor.store import RunStore
    store = RunStore.create(sys.argv[1], _manifest())
    for seed in range(10_000):
        store.add_generation(*_gen("a", seed, n_concepts=6))
""")


def test_kill_9_leaves_only_whole_generations_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(run_dir), str(TESTS)])
    try:
        while proc.poll() is None:  # let a few generations finish, then kill in the middle of the next ones
            if (run_dir / "images").is_dir() and len(list((run_dir / "images").iterdir())) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    with RunStore.open(run_dir) as store:
        done = store.finished()
        assert done, "the writer was killed before it finished anything"
        for g in store.generations():
            Image.open(run_dir / g["image"]).verify()
            with np.load(run_dir / g["maps_file"]) as z:
                assert len(z.files) == 12
            for c in g["concepts"]:
                for p in c["maps"].values():
                    Image.open(run_dir / p).verify()
        assert not list(run_dir.rglob(".*.tmp-*"))  # opening swept the half-written temporaries
        nxt = max(s for _, s in done) + 1
        store.add_generation(*_gen("a", nxt, n_concepts=6))
        assert ("a", nxt) in store.finished()


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    from auditor.report.render import publish

    run = fake_run.build(tmp_path_factory.mktemp("pub") / "run")
    publish(run, pdf=False)
    return run


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_checksums_verify_with_sha256sum_and_catch_tampering(published, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(published, run)  # a reviewer's copy, somewhere else
    listed = [line.split("  ", 1)[1] for line in (run / "checksums.sha256").read_text().splitlines()]
    for name in ("results.json", "report.html", "run.sqlite", "relevance.npz", "images/two-objects__s0.png",
                 "maps/two-objects__s0.npz", "maps/two-objects__s0__1_selective.png", "figures/relevance.png"):
        assert name in listed
    ok = subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=run, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    victim = run / "images" / "polysemy__s1.png"
    victim.write_bytes(victim.read_bytes() + b"\0")
    bad = subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=run, capture_output=True, text=True)
    assert bad.returncode != 0 and "images/polysemy__s1.png: FAILED" in bad.stdout


def test_results_json_follows_the_contract(published):
    data = json.loads((published / "results.json").read_text())
    assert set(data) == {"run_id", "model", "suite", "generations", "summary"}
    assert set(data["model"]) == {"name", "fingerprint"} and set(data["suite"]) == {"path", "sha256"}
    g = data["generations"][0]
    assert {"prompt_id", "prompt", "seed", "image", "concepts"} <= set(g)
    for c in (c for g in data["generations"] for c in g["concepts"]):
        assert {"text", "role", "category", "binds_to", "token_indices", "scores", "flags", "maps"} <= set(c)
        assert set(c["maps"]) == {"selective", "all_heads"}
        for f in c["flags"]:
            assert set(f) >= {"type", "severity", "message"}
            assert f["type"] in ("missing", "misplaced", "misinterpreted") and f["severity"] in ("low", "medium", "high")
    assert data["summary"]["fidelity"]["pairs"] == 33


def test_manifest_base_records_versions_and_the_command():
    m = manifest_base(["auditor", "audit", "x.yaml"])
    assert m["tool"]["version"] and m["command_line"] == ["auditor", "audit", "x.yaml"]
    assert set(m["libraries"]) == {"torch", "diffusers", "transformers", "spacy", "numpy"}
    assert m["libraries"]["numpy"] == np.__version__


# --- summary ----------------------------------------------------------------------------------------------------


def test_wilson_interval_matches_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson(0, 0) == (0.0, 1.0)


def _g(pid, seed, flags_per_concept, category="colour"):
    return {"prompt_id": pid, "seed": seed, "concepts": [
        {"text": f"c{i}", "role": "attribute", "category": category,
         "flags": [{"type": t, "severity": "low", "message": "m"} for t in types]}
        for i, types in enumerate(flags_per_concept)]}


def test_summary_counts_prompts_fidelity_and_acceptance():
    gens = [_g("p1", 0, [["misplaced"], []]), _g("p1", 1, [["misplaced"], []]),
            _g("p2", 0, [[], ["missing", "misplaced"]]), _g("p2", 1, [[], []])]
    acc = {"max_flag_rate": {"any": 0.3, "missing": 0.2}, "max_flag_rate_per_category": {"shape": 0.5},
           "required_categories": ["colour", "animal"]}
    s = summarise(gens, acc, max_flag_rate=0.5)
    assert s["prompts"] == {**s["prompts"], "total": 2, "passed": 1, "flagged_ids": ["p1"]}  # p2's 1/2 is not > 50%
    assert s["fidelity"]["score"] == 5 / 8 and s["fidelity"]["pairs"] == 8
    assert s["flags_by_type"] == {"missing": 1, "misplaced": 3, "misinterpreted": 0}
    crit = {c["criterion"]: c for c in s["acceptance"]["criteria"]}
    assert crit["flag rate (any)"]["measured"] == 0.375 and not crit["flag rate (any)"]["passed"]
    assert crit["flag rate (missing)"]["measured"] == 0.125 and crit["flag rate (missing)"]["passed"]
    assert not crit["flag rate of category shape"]["passed"]  # nothing measured is not a pass
    assert crit["category colour audited"]["passed"] and not crit["category animal audited"]["passed"]
    assert s["acceptance"]["passed"] is False
    assert summarise(gens, None, 0.5)["acceptance"] == {"declared": False, "passed": None, "criteria": []}


def test_a_failing_concept_gets_one_sentence_across_seeds_naming_its_words():
    def gen(seed, flags):
        return {"prompt_id": "p", "seed": seed, "concepts": [
            {"text": "star", "role": "object", "category": "shape", "flags": []},
            {"text": "purple", "role": "attribute", "category": "colour", "binds_to": 0, "flags": flags}]}

    not_drawn = {"type": "misinterpreted", "severity": "high", "message": "m",
                 "verdict": "the colour is probably not drawn as asked"}
    went = {"type": "misplaced", "severity": "low", "message": "m", "verdict": "the colour probably went to 'cube'"}
    gens = [gen(0, [not_drawn]), gen(1, [not_drawn, went]), gen(2, [not_drawn]), gen(3, [])]
    star, purple = summarise(gens, None, 0.5)["concepts"]
    assert star["sentence"] is None and star["verdict"] is None
    assert purple["verdict"] == "the colour is probably not drawn as asked"  # what most of its flags say
    assert purple["sentence"] == ("'purple' on 'star': flagged in 3 of 4 seeds (misplaced ×1, misinterpreted ×3) — "
                                  "the colour is probably not drawn as asked")
    old = [gen(0, [{"type": "missing", "severity": "low", "message": "m"}])]  # a run stored before verdicts
    assert summarise(old, None, 0.5)["concepts"][1]["sentence"] == "'purple' on 'star': flagged in 1 of 1 seed (missing ×1)"


def test_a_partial_run_gets_a_provisional_summary(tmp_path):
    run = fake_run.build(tmp_path / "r", finish=False)
    with RunStore.open(run) as store:
        assert not store.is_finished and store.summary()["partial"] is True
