"""Batched generation (`auditor audit --batch-size N`): several (prompt, seed) pairs in one pipeline call, each with
its own generator and its own slice of the trace, give the records batch size 1 gives (images within 1/255 per
pixel, scores within float noise, the same flags); the execution options are checked before anything loads; the
local path never imports Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PIXEL_TOLERANCE = 1  # of 255: what two batch sizes' float rounding measured at most (docs/benchmarks.md)
# Scores are stored to 6 decimals and batched matmuls differ in the last float bits. At the suite's 20 steps every
# score of shapes-default agreed to 1e-6 (docs/benchmarks.md); at 3 steps one near-flat map's Otsu threshold moved a
# histogram bin (area 0.295 vs 0.289), which is why these tests generate with 20.
SCORE_TOLERANCE = 1e-4

SUITE = """\
name: tiny-batch
description: prompts of different token lengths in one batch
defaults: {steps: 20, seeds: [0, 1], guidance: 5.0, resolution: 64}
prompts:
  - {id: p1, text: a red star}
  - {id: p2, text: a big blue circle and a small green heart}
  - {id: p3, text: an orange on a black background}
"""


def assert_close_records(a, b, where=""):
    """Concept records equal but for float scores, which may differ by float noise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close_records(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_records(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= SCORE_TOLERANCE, (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same generations: records (floats within noise), flags, images within 1/255."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    ga, gb = ra["generations"], rb["generations"]
    assert [(g["prompt_id"], g["seed"]) for g in ga] == [(g["prompt_id"], g["seed"]) for g in gb]
    for x, y in zip(ga, gb):
        assert_close_records({k: v for k, v in x.items() if k not in ("image", "maps_file")},
                             {k: v for k, v in y.items() if k not in ("image", "maps_file")}, x["prompt_id"])
        ia, ib = (np.asarray(Image.open(d / g["image"]), dtype=int) for d, g in ((a, x), (b, y)))
        assert np.abs(ia - ib).max() <= PIXEL_TOLERANCE, (x["prompt_id"], x["seed"])
    assert ra["summary"]["flags_by_type"] == rb["summary"]["flags_by_type"]


@pytest.fixture(scope="module")
def lm():
    from auditor.engine.models import load_model

    return load_model("shapes-v1", "cpu")


def _tasks(lm, seeds=(0, 1)):
    import yaml

    from auditor.concepts import extract_many
    from auditor.tasks import AuditTask
    from auditor.suites import Prompt

    prompts = [Prompt(**p) for p in yaml.safe_load(SUITE)["prompts"]]
    extracted = extract_many(prompts, tokenizer=lm.pipe.tokenizer)
    return [AuditTask(p.id, s, cs) for p, cs in zip(prompts, extracted) for s in seeds]


def test_a_batch_gives_each_item_the_records_of_batch_1(lm):
    from auditor.profile import profile_for
    from auditor.tasks import TaskSettings, audit_tasks

    settings = TaskSettings(steps=20, guidance=5.0, resolution=(64, 64), profile=profile_for(lm))
    tasks = _tasks(lm)  # three prompts of different lengths, two seeds each: the same prompt twice in the batch
    alone = [audit_tasks(lm.pipe, [t], settings)[0] for t in tasks]
    batched = audit_tasks(lm.pipe, tasks, settings)
    assert len(batched) == len(tasks) == 6
    differs = 0
    for t, one, many in zip(tasks, alone, batched):
        pixels = np.abs(np.asarray(one.image, dtype=int) - np.asarray(many.image, dtype=int))
        assert pixels.max() <= PIXEL_TOLERANCE, (t.prompt_id, t.seed)
        assert_close_records(one.concepts, many.concepts, f"{t.prompt_id}/{t.seed}")
        assert one.raw_maps.keys() == many.raw_maps.keys() == one.overlays.keys()
        for key, m in one.raw_maps.items():
            np.testing.assert_allclose(m.astype(np.float32), many.raw_maps[key].astype(np.float32),
                                       rtol=1e-2, atol=1e-3 * float(np.abs(m).max()))
        differs += int(not np.array_equal(np.asarray(alone[0].image), np.asarray(one.image)))
    assert differs == len(tasks) - 1  # the items are six different generations, not one repeated


def test_audit_with_a_batch_size_stores_what_batch_1_stores(cli, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    runs = {}
    for n in (1, 4):  # 6 generations in batches of 4: a full batch and a short one
        runs[n] = tmp_path / f"b{n}"
        code, out, err = cli("audit", str(suite), "--out", str(runs[n]), "--no-pdf", "--json", "--batch-size", str(n))
        assert code == 0, err
        assert json.loads(out)["generated"] == 6
    assert_same_run(runs[1], runs[4])
    code, _, err = cli("verify", str(runs[4]))
    assert code == 0, err


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--workers", "2"], "only with --executor ray"),
    (["--ray-address", "auto"], "only with --executor ray"),
    (["--executor", "dask"], "--executor 'dask'"),
    (["--executor", "ray", "--workers", "0"], "--workers 0"),
    (["--executor", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker"),
])
def test_execution_options_are_refused_before_anything_loads(cli, tmp_path, args, needle, monkeypatch):
    import auditor.engine.models as models
    import auditor.runs as runs

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(runs, "load_model", no_load)  # the audit's own reference to it
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    if "--executor" in args and "ray" in args:
        pytest.importorskip("ray")
    code, out, err = cli("audit", str(suite), "--out", str(tmp_path / "run"), *args)
    assert code == 2 and out == ""
    assert err.startswith("auditor: error: ") and err.count("\n") == 1 and needle in err, err


def test_calibrate_refuses_ray_options_without_the_ray_executor(cli, monkeypatch):
    import auditor.engine.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded before the options were checked"))
    code, out, err = cli("calibrate", "--workers", "2", "--ray-address", "auto")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--ray-address, --workers: only with --executor ray" in err, err


def test_without_ray_the_ray_executor_is_one_line_error(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    code, _, err = cli("audit", str(suite), "--out", str(tmp_path / "run"), "--executor", "ray")
    assert code == 2 and err.count("\n") == 1 and "Ray is not installed" in err and "auditor[ray]" in err, err


def test_the_local_path_imports_no_ray(tmp_path):
    """A whole local audit, batched, in a fresh interpreter: Ray is never imported (it is an optional extra, and
    importing it costs seconds)."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.replace("seeds: [0, 1]", "seeds: [0]").replace("steps: 20", "steps: 2"))
    probe = ("import sys\n"
             "from auditor.cli import main\n"
             "import auditor.runs, auditor.executors, auditor.store, auditor.calibration\n"
             f"code = main(['audit', {str(suite)!r}, '--out', {str(tmp_path / 'run')!r}, '--no-pdf', "
             "'--batch-size', '2'])\n"
             "assert code == 0, code\n"
             "print('ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
