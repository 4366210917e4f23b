"""`auditor audit`: the run end to end on the bundled model, its gate, resume after kill -9, and bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.runs import gate
from killing import kill_after_stored, start_audit, stored_rows

TINY = """\
name: tiny
description: two prompts of the shapes world
defaults: {steps: 3, seeds: [0, 1], guidance: 5.0, resolution: 64}
acceptance:
  max_flag_rate: {any: 1.0}
  required_categories: [colour]
prompts:
  - {id: p1, text: a red star}
  - {id: p2, text: a big blue circle and a small green heart}
"""


@pytest.fixture
def tiny_suite(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _verify_checksums(run: Path) -> None:
    lines = (run / "checksums.sha256").read_text().splitlines()
    assert lines
    for line in lines:
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() == digest, name


def test_audit_end_to_end(cli, tiny_suite, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("audit", str(tiny_suite), "--out", str(run), "--no-pdf", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["run_dir"] == str(run) and summary["generated"] == 4
    res = _results(run)
    assert res["model"]["name"] == "shapes-v1" and len(res["model"]["fingerprint"]) == 64
    assert res["suite"]["sha256"] == hashlib.sha256(tiny_suite.read_bytes()).hexdigest()
    gens = res["generations"]
    assert [(g["prompt_id"], g["seed"]) for g in gens] == [("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)]
    p2 = gens[2]
    texts = [c["text"] for c in p2["concepts"]]
    assert {"big", "blue", "circle", "small", "green", "heart"} <= set(texts)
    for c in p2["concepts"]:
        assert c["token_indices"] and "scores" in c and isinstance(c["flags"], list)
        assert set(c["maps"]) == {"selective", "all_heads"}
        assert all((run / p).is_file() for p in c["maps"].values())
        if c["role"] == "attribute":  # bindings index the same list
            assert p2["concepts"][c["binds_to"]]["role"] == "object"
    assert (run / gens[0]["image"]).is_file() and (run / "report.html").is_file()
    m = json.loads(sqlite3.connect(run / "run.sqlite").execute("SELECT json FROM manifest").fetchone()[0])
    for key in ("tool", "model", "libraries", "device", "dtype", "suite", "seeds", "steps", "guidance", "thresholds",
                "relevance", "start_time", "end_time"):
        assert m.get(key) is not None, key
    assert m["seeds"] == [0, 1] and m["steps"] == 3 and m["relevance"]["sha256"]
    assert res["summary"]["acceptance"]["declared"] is True
    _verify_checksums(run)


def test_gate_counts_failing_concepts_of_the_asked_type():
    concept = {"prompt_id": "p", "text": "star", "passed": False, "by_type": {"missing": 2, "misplaced": 0,
                                                                            "misinterpreted": 0}}
    ok = {**concept, "text": "red", "passed": True, "by_type": {"missing": 1, "misplaced": 0, "misinterpreted": 0}}
    summary = {"concepts": [concept, ok], "acceptance": {"declared": False}}
    assert gate(summary, None) is None
    assert "p:star" in gate(summary, "missing") and "red" not in gate(summary, "missing")
    assert gate(summary, "misplaced") is None
    assert gate(summary, "any")
    failing_acceptance = {"concepts": [ok], "acceptance": {"declared": True, "passed": False,
                                                          "criteria": [{"criterion": "flag rate (any)", "passed": False}]}}
    assert "flag rate (any)" in gate(failing_acceptance, "any")
    assert gate(failing_acceptance, "missing") is None


def test_fail_on_exits_1_when_asked(cli, tiny_suite, tmp_path, monkeypatch):
    import auditor.runs as runs

    monkeypatch.setattr(runs, "gate", lambda summary, fail_on: "1 concept(s) fail" if fail_on else None)
    code, _, err = cli("audit", str(tiny_suite), "--out", str(tmp_path / "r"), "--no-pdf", "--seeds", "0",
                       "--fail-on", "missing")
    assert code == 1 and "gate" in err


def test_the_audit_prints_each_failing_concepts_sentence(cli, monkeypatch, tmp_path):
    from types import SimpleNamespace

    import auditor.runs as runs
    from auditor.cli import FAILING_SHOWN

    concepts = [{"prompt_id": f"p{i}", "concept": f"star ({i})", "passed": i % 2 == 1,
                 "sentence": f"'star': flagged in 4 of 4 seeds (missing ×4) — number {i}"} for i in range(30)]
    summary = {"prompts": {"passed": 15, "flagged": 15, "total": 30}, "fidelity": {"score": 0.5, "ci": [0.4, 0.6]},
               "flags_by_type": {"missing": 60}, "concepts": concepts, "acceptance": {}}
    monkeypatch.setattr(runs, "run_audit", lambda *a, **k: SimpleNamespace(
        summary=summary, run_dir=tmp_path, generated=120, skipped=0, seconds=1.0, files=[]))
    monkeypatch.setattr(runs, "raise_gate", lambda result: None)
    code, out, _ = cli("audit", "any.yaml", "--no-pdf")
    assert code == 0
    shown = [line for line in out.splitlines() if line.startswith("  fails")]
    assert len(shown) == FAILING_SHOWN
    assert shown[0] == "  fails  p0: 'star': flagged in 4 of 4 seeds (missing ×4) — number 0"
    assert [int(line.rsplit(" ", 1)[1]) for line in shown] == list(range(0, 2 * FAILING_SHOWN, 2))  # failing only
    assert "... and 5 more failing concepts" in out  # 15 fail, 10 shown


# --- bad input: one line, exit 2, nothing finished lost ---------------------------------------------------------


def _one_line_error(result, *needles):
    code, _, err = result
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("auditor:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_suite(cli, tmp_path):
    _one_line_error(cli("audit", str(tmp_path / "nope.yaml"), "--no-pdf"), "nope.yaml")


def test_unknown_model(cli, tiny_suite, tmp_path):
    _one_line_error(cli("audit", str(tiny_suite), "--model", "no-such-model", "--out", str(tmp_path / "r")),
                    "no-such-model")
    assert not (tmp_path / "r").exists()


def test_bad_seeds_and_fail_on(cli, tiny_suite):
    _one_line_error(cli("audit", str(tiny_suite), "--seeds", "0,x"), "--seeds")
    _one_line_error(cli("audit", str(tiny_suite), "--fail-on", "everything"), "--fail-on")


def test_output_not_writable(cli, tiny_suite, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(cli("audit", str(tiny_suite), "--out", str(blocker / "run"), "--no-pdf"), "cannot write")


def test_prompt_too_long(cli, tmp_path):
    long = " and ".join(["a red star"] * 40)
    suite = tmp_path / "long.yaml"
    suite.write_text(f"name: long\ndefaults: {{steps: 2, seeds: [0], resolution: 64}}\nprompts:\n  - {{id: p1, text: {long}}}\n")
    _one_line_error(cli("audit", str(suite), "--out", str(tmp_path / "r"), "--no-pdf"), "p1", "too long")


def test_folder_with_another_run_and_resume_mismatch(cli, tiny_suite, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("audit", str(tiny_suite), "--out", str(run), "--no-pdf", "--seeds", "0")
    assert code == 0, err
    before = _results(run)
    _one_line_error(cli("audit", str(tiny_suite), "--out", str(run), "--no-pdf", "--seeds", "1"),
                    "already holds a different run")
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("a red star", "a red square"))
    _one_line_error(cli("audit", str(other), "--resume", str(run), "--no-pdf"), "--resume", "differs")
    _one_line_error(cli("audit", str(tiny_suite), "--resume", str(tmp_path / "none"), "--no-pdf"), "none")
    assert _results(run) == before  # refused commands leave the finished run as it was


def test_disk_full_keeps_finished_generations(cli, tiny_suite, tmp_path, monkeypatch):
    real = os.replace  # the store's files and database are renamed into place with it
    calls = {"images": 0}

    def full_disk(src, dst):  # the second image's rename finds the disk full
        if Path(dst).parent.name == "images":
            calls["images"] += 1
            if calls["images"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    run = tmp_path / "run"
    _one_line_error(cli("audit", str(tiny_suite), "--out", str(run), "--no-pdf"), "disk full", "kept")
    rows = sqlite3.connect(run / "run.sqlite").execute("SELECT prompt_id, seed FROM generations").fetchall()
    assert rows == [("p1", 0)]  # the first generation is kept, the failed one left nothing behind
    assert sorted(p.name for p in (run / "images").iterdir()) == ["p1__s0.png"]
    monkeypatch.setattr(os, "replace", real)
    code, out, err = cli("audit", str(tiny_suite), "--resume", str(run), "--no-pdf", "--json")
    assert code == 0, err
    assert json.loads(out)["generated"] == 3 and json.loads(out)["resumed_skipped"] == 1


# --- resume after kill -9 ---------------------------------------------------------------------------------------


def _comparable(res: dict) -> list:
    return [{k: v for k, v in g.items()} for g in res["generations"]]


def test_polling_a_run_being_created_leaves_its_folder_as_it_was(tmp_path):
    # The kill tests poll the run folder while the audit creates it; a poll that made an empty run.sqlite there
    # would make the audit refuse the folder (a database without a manifest).
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(sqlite3.Error):
        stored_rows(run)
    assert list(run.iterdir()) == []


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(tiny_suite, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Twelve generations, killed after the second: enough left that the run cannot finish between the poll that
    # sees two rows and the kill, however loaded the machine is.
    cmd = [sys.executable, "-m", "auditor", "audit", str(tiny_suite), "--no-pdf", "--seeds", "0,1,2,3,4,5"]
    killed = tmp_path / "killed"
    log = tmp_path / "killed.stderr"
    kept = kill_after_stored(start_audit(cmd + ["--out", str(killed)], env, log), killed, log=log)
    assert 2 <= len(kept) < 12 and not (killed / "results.json").exists()

    r = subprocess.run(cmd + ["--resume", str(killed), "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_skipped"] == len(kept)
    after = sqlite3.connect(killed / "run.sqlite").execute("SELECT prompt_id, seed, finished_at FROM generations").fetchall()
    assert set(kept) <= set(after)  # nothing finished was redone

    whole = tmp_path / "whole"
    r = subprocess.run(cmd + ["--out", str(whole)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    a, b = _results(killed), _results(whole)
    assert _comparable(a) == _comparable(b)
    drop = ("partial",)
    assert {k: v for k, v in a["summary"].items() if k not in drop} == {k: v for k, v in b["summary"].items() if k not in drop}
    for g in a["generations"]:  # the images themselves are identical
        assert (killed / g["image"]).read_bytes() == (whole / g["image"]).read_bytes()
    _verify_checksums(killed)


def test_resume_with_another_model_is_refused(cli, tiny_suite, tmp_path):
    from auditor.zoo import bundled_model

    if bundled_model("shapes-v2") is None:
        pytest.skip("shapes-v2 is not bundled")
    run = tmp_path / "run"
    code, _, err = cli("audit", str(tiny_suite), "--out", str(run), "--no-pdf", "--seeds", "0")
    assert code == 0, err
    _one_line_error(cli("audit", str(tiny_suite), "--resume", str(run), "--model", "shapes-v2", "--no-pdf"),
                    "--resume", "shapes-v1")
