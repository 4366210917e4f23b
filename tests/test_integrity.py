"""Run-folder integrity (issue 19): one writer per folder, sha256 of every artefact recorded in the store and checked
before `report` and `compare`, crash-consistent creation of the store, unfinished runs refused by `compare`."""

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
from pathlib import Path

import pytest

import fake_run
from auditor.errors import AuditorError
from auditor.store import LOCK_NAME, RunStore

TESTS = Path(__file__).resolve().parent
RED = ("two-objects", "red")


def _one_line_error(result, *needles):
    code, out, err = result
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("auditor: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def published(tmp_path) -> Path:
    from auditor.report.render import publish

    run = fake_run.build(tmp_path / "run", forced={RED: 0.0})
    publish(run, pdf=False)
    return run


def _sha256sum_ok(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sha256sum", "-c", "--quiet", "checksums.sha256"], cwd=run, capture_output=True, text=True)


# --- one writer per run folder ------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from auditor.store import run_lock
    with run_lock(sys.argv[1], exclusive=sys.argv[2] == "ex"):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder():
    """Another process holding a run folder's lock; killed (-9) at the end or when the test asks."""
    procs = []

    def start(run_dir: Path, mode: str = "ex") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_locked_folder_refuses_a_second_writer_and_readers_until_its_holder_dies(published, holder, cli, tmp_path):
    before = {p: p.read_bytes() for p in published.rglob("*") if p.is_file()}
    proc = holder(published)
    _one_line_error(cli("report", str(published), "--no-pdf"), "another auditor process", str(published))
    _one_line_error(cli("verify", str(published)), "another auditor process")
    _one_line_error(cli("compare", str(published), str(published), "--out", str(tmp_path / "cmp"), "--no-pdf"),
                    "another auditor process")
    with pytest.raises(AuditorError, match="another auditor process"):
        RunStore.create(published, {})
    assert {p: p.read_bytes() for p in published.rglob("*") if p.is_file()} == before  # nothing touched
    proc.send_signal(signal.SIGKILL)  # a killed holder never leaves the folder locked
    proc.wait()
    code, _, err = cli("report", str(published), "--no-pdf")
    assert code == 0, err


def test_readers_share_a_folder_but_exclude_a_writer(published, holder, cli, tmp_path):
    holder(published, "sh")  # e.g. a compare reading it
    code, out, err = cli("verify", str(published))
    assert code == 0 and "intact" in out, err
    _one_line_error(cli("report", str(published), "--no-pdf"), "another auditor process")


def test_the_store_holds_the_lock_of_its_folder_while_generations_are_written(tmp_path, monkeypatch):
    """While generations are being written, a second writer of the same folder (another audit into the same --out,
    a resume, a report) is refused instead of racing it."""
    import auditor.store as store_mod

    seen = []
    real_add = store_mod.RunStore.add_generation

    def add_and_probe(self, *args, **kwargs):
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom auditor.store import run_lock\n"
                                "with run_lock(sys.argv[1]): pass", str(self.dir)], capture_output=True, text=True)
        seen.append(probe.stderr.strip().splitlines()[-1] if probe.returncode else "acquired")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(store_mod.RunStore, "add_generation", add_and_probe)
    fake_run.build(tmp_path / "run", seeds=(0,), prompts=fake_run.PROMPTS[:1])
    assert seen and all("another auditor process" in s for s in seen), seen


def test_writer_sweeps_only_temporaries_of_dead_processes(published):
    mine = published / "images" / f".x.png.tmp-{os.getpid()}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = published / "images" / f".y.png.tmp-{int(dead.stdout)}"
    mine.write_bytes(b"half")
    stale.write_bytes(b"half")
    with RunStore.open(published, readonly=True):
        assert stale.exists()  # a reader deletes nothing
    with RunStore.open(published):
        pass
    assert mine.exists() and not stale.exists()


# --- integrity from the store -------------------------------------------------------------------------------------


def _tamper(run: Path) -> str:
    victim = run / "images" / "polysemy__s1.png"
    victim.write_bytes(victim.read_bytes() + b"\0")
    return "images/polysemy__s1.png"


@pytest.mark.parametrize("damage, named", [
    (_tamper, "images/polysemy__s1.png: altered"),
    (lambda run: shutil.rmtree(run / "images"), "images/hostile-text__s0.png: missing"),
    (lambda run: shutil.rmtree(run / "maps"), ": missing"),
    (lambda run: (run / "relevance.npz").unlink(), "relevance.npz: missing"),
])
def test_report_refuses_an_altered_folder_naming_the_file(published, cli, damage, named):
    damage(published)
    checksums = (published / "checksums.sha256").read_bytes()
    _one_line_error(cli("report", str(published), "--no-pdf"), named, "--force")
    assert (published / "checksums.sha256").read_bytes() == checksums  # nothing rewritten over the damage
    code, out, err = cli("verify", str(published))
    assert code == 2 and named in out and err.startswith("auditor: error: ") and err.count("\n") == 1


def test_an_altered_report_is_named_by_verify_and_rewritten_by_report_with_a_warning(published, cli):
    (published / "report.html").write_text("<p>all fine</p>")
    (published / "results.json").unlink()
    code, out, _ = cli("verify", str(published))
    assert code == 2 and out.splitlines() == ["report.html: altered (sha256 differs from the one recorded when it was "
                                              "written)", "results.json: missing"]
    code, _, err = cli("report", str(published), "--no-pdf")  # the re-render remakes both from the store
    assert code == 0 and err.count("auditor: warning: ") == 2 and "report.html: altered" in err, err
    assert cli("verify", str(published))[0] == 0
    with RunStore.open(published, readonly=True) as store:
        assert "forced" not in store.manifest


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_forced_report_is_on_the_record_and_the_checksums_still_catch_the_tampering(published, cli):
    assert _sha256sum_ok(published).returncode == 0
    name = _tamper(published)
    code, _, err = cli("report", str(published), "--no-pdf", "--force")
    assert code == 0, err
    bad = _sha256sum_ok(published)
    assert bad.returncode != 0 and f"{name}: FAILED" in bad.stdout  # the checksums come from the records
    with RunStore.open(published, readonly=True) as store:
        forced = store.manifest["forced"]
        assert store.verify() == [f"{name}: altered (sha256 differs from the one recorded when it was written)"]
    assert forced[0]["command"] == "report" and name in forced[0]["problems"][0]
    html = (published / "report.html").read_text()
    assert "--force" in html and name in html.split('id="prompts"')[0]  # said before the prompts, on the first page


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_an_intact_run_verifies_and_rerenders(published, cli):
    code, out, err = cli("verify", str(published), "--json")
    data = json.loads(out)
    assert code == 0 and data["intact"] and data["checked"] > 30 and data["status"] == "finished", err
    code, _, err = cli("report", str(published), "--no-pdf")
    assert code == 0, err
    assert _sha256sum_ok(published).returncode == 0


def test_compare_refuses_an_altered_run_unless_forced(tmp_path, published, cli):
    other = fake_run.build(tmp_path / "other", forced={RED: 1.0})
    _tamper(published)
    out = tmp_path / "cmp"
    _one_line_error(cli("compare", str(published), str(other), "--out", str(out), "--no-pdf"),
                    "images/polysemy__s1.png: altered", "--force")
    assert not out.exists()
    code, _, err = cli("compare", str(published), str(other), "--out", str(out), "--no-pdf", "--force")
    assert code == 0 and "compared anyway (--force)" in err
    data = json.loads((out / "compare.json").read_text())
    assert data["forced"][0]["problems"] == ["images/polysemy__s1.png: altered (sha256 differs from the one "
                                             "recorded when it was written)"]
    assert "compared anyway (--force)" in (out / "compare.html").read_text().split('id="changes"')[0]


@pytest.mark.parametrize("record", ["{not json", "null", json.dumps({"prompt_id": "two-objects", "seed": 0}),
                                    json.dumps({"prompt_id": "two-objects", "seed": 0, "image": "i.png",
                                                "concepts": [{"flags": [{"type": "bogus"}]}]})])
def test_a_corrupt_generation_record_is_one_line_in_report_and_compare(published, tmp_path, cli, record):
    with sqlite3.connect(published / "run.sqlite") as conn:
        conn.execute("UPDATE generations SET record = ? WHERE prompt_id = 'two-objects' AND seed = 0", (record,))
    _one_line_error(cli("report", str(published), "--no-pdf", "--force"), "generation (two-objects, seed 0)", "corrupt")
    _one_line_error(cli("compare", str(published), str(published), "--out", str(tmp_path / "c"), "--no-pdf",
                        "--force"), "generation (two-objects, seed 0)", "corrupt")


# --- crash-consistent creation ------------------------------------------------------------------------------------


def _manifest() -> dict:
    return {"model": {"name": "m", "fingerprint": "f"}, "suite": {"name": "s", "prompt_ids": ["a"]}, "seeds": [0]}


KILLED_CREATOR = textwrap.dedent("""
    import os, signal, sys
    import auditor.store as store
    real = os.replace

    def replace_then_die(src, dst):  # the database is complete under its temporary name: die before the rename
        if str(dst).endswith("run.sqlite"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    os.replace = replace_then_die
    store.RunStore.create(sys.argv[1], {"model": {"name": "m", "fingerprint": "f"}, "seeds": [0]})
""")


def test_a_kill_while_creating_the_store_leaves_a_folder_the_rerun_reuses(tmp_path, cli):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_CREATOR, str(run)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "run.sqlite").exists() and list(run.glob(".run.sqlite.tmp-*"))
    err = _one_line_error(cli("report", str(run), "--no-pdf"), "interrupted while creating it", f"--out {run}")
    assert "--resume" not in err
    with RunStore.create(run, _manifest()) as store:  # the rerun: the folder is reused
        assert store.manifest["seeds"] == [0] and store.finished() == set()
    assert not list(run.glob(".run.sqlite.tmp-*"))


@pytest.mark.parametrize("fail", ["replace", "sqlite"])
def test_a_full_disk_while_creating_the_store_leaves_nothing_half_made(tmp_path, monkeypatch, fail):
    run = tmp_path / "run"
    if fail == "replace":
        def full(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "replace", full)
    else:
        real_connect = sqlite3.connect

        def full(path, *a, **k):
            if ".tmp-" in str(path):
                raise sqlite3.OperationalError("database or disk is full")
            return real_connect(path, *a, **k)
        monkeypatch.setattr(sqlite3, "connect", full)
    with pytest.raises(AuditorError, match=r"run\.sqlite: cannot create the run database \(disk full\)") as err:
        RunStore.create(run, _manifest())
    assert "\n" not in str(err.value) and f"`out={run}`" in str(err.value)
    assert not (run / "run.sqlite").exists() and not list(run.glob(".*tmp-*"))
    monkeypatch.undo()
    with RunStore.create(run, _manifest()) as store:
        assert store.manifest["seeds"] == [0]


def test_a_database_an_older_version_left_without_manifest_says_what_to_remove(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    sqlite3.connect(run / "run.sqlite").close()  # killed right after sqlite created the file
    err = _one_line_error(cli("report", str(run), "--no-pdf"), "holds no run manifest", f"remove {run / 'run.sqlite'}")
    with pytest.raises(AuditorError, match="remove"):
        RunStore.create(run, _manifest())


@pytest.mark.parametrize("content", ["notes.txt", "images/cat.png"])
def test_a_folder_holding_other_files_is_not_written_into(tmp_path, content):
    out = tmp_path / "mine"
    (out / content).parent.mkdir(parents=True, exist_ok=True)
    (out / content).write_text("mine")
    with pytest.raises(AuditorError, match="not an auditor run folder and not empty"):
        RunStore.create(out, _manifest())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(  # not even a lock file
        {content, *(["images"] if "/" in content else [])})
    empty = tmp_path / "empty"
    empty.mkdir()
    RunStore.create(empty, _manifest()).close()


# --- compare: unfinished runs, different category sets -------------------------------------------------------------


def test_compare_refuses_an_unfinished_run_unless_allowed(tmp_path, cli):
    a = fake_run.build(tmp_path / "a", forced={RED: 0.0})
    b = fake_run.build(tmp_path / "b", forced={RED: 1.0}, finish=False)
    out = tmp_path / "cmp"
    _one_line_error(cli("compare", str(a), str(b), "--out", str(out), "--no-pdf", "--fail-on", "regression"),
                    "not finished", "--allow-partial", "--resume")
    assert not out.exists()
    code, _, err = cli("compare", str(a), str(b), "--out", str(out), "--no-pdf", "--fail-on", "regression",
                       "--allow-partial")
    assert code == 1 and "unfinished" in err and "--allow-partial" in err
    first_page = (out / "compare.html").read_text().split('id="changes"')[0]
    assert "unfinished" in first_page and "--allow-partial" in first_page
    assert json.loads((out / "compare.json").read_text())["partial"][0]["generations"] == 9


def test_compare_of_runs_with_different_category_sets_compares_the_shared_ones(tmp_path, cli):
    """Issue 22: a model calibrated on other categories (same architecture) used to crash the compare."""
    a = fake_run.build(tmp_path / "a", forced={RED: 0.0})
    more = fake_run.CATEGORIES + ["animal", "vehicle", "furniture"]
    fewer = [c for c in fake_run.CATEGORIES if c != "texture"]
    b = fake_run.build(tmp_path / "b", forced={RED: 1.0}, categories=[c for c in more if c in fewer or c not in
                                                                      fake_run.CATEGORIES])
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", str(a), str(b), "--out", str(out), "--no-pdf")
    assert code == 0, err
    assert "different categories" in err and "texture" in err and "vehicle" in err
    data = json.loads((out / "compare.json").read_text())
    nc = data["not_comparable"]
    assert nc["only_a"] == ["texture"] and nc["only_b"] == ["animal", "furniture", "vehicle"]
    assert nc["concepts_left_out"] == ["hostile-text: striped (attribute of ring)"]
    assert all(c["category"] != "texture" for c in data["concepts"])
    assert [r["concept"] for r in data["regressions"] if r["level"] == "concept"] == ["red (attribute of cube)"]
    assert data["heads"]["comparable"] and "texture" not in data["heads"]["overlap"]
    assert "different categories" in (out / "compare.html").read_text().split('id="changes"')[0]
    assert (out / "figures" / "heads.png").is_file()  # the head figure over the shared categories


# --- the audit command on a folder in use or not its own -----------------------------------------------------------

TINY = """\
name: tiny
defaults: {steps: 2, seeds: [0], guidance: 5.0, resolution: 64}
prompts:
  - {id: p1, text: a red star}
"""


def test_an_audit_into_a_folder_in_use_or_holding_other_files_is_refused(tmp_path, holder, cli):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY)
    busy = tmp_path / "busy"
    busy.mkdir()
    holder(busy)  # e.g. another audit writing there
    _one_line_error(cli("audit", str(suite), "--out", str(busy), "--no-pdf"), "another auditor process")
    assert sorted(p.name for p in busy.iterdir()) == [LOCK_NAME]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    _one_line_error(cli("audit", str(suite), "--out", str(mine), "--no-pdf"), "not an auditor run folder", "thesis.tex")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
