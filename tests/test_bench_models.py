"""The ground-truth benches on a second model (shapes-dit, issue 18): file names per model, the random-k control
on a transformer with fewer heads than the largest k, the pipeline's step callback, and the report section beside
shapes-v1's. Never runs a benchmark or loads a model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_shapes_v1_keeps_its_file_names_and_another_model_gets_its_own():
    import common
    import diagnostics as bd
    import miou

    v1 = miou.files_for("shapes-v1")
    assert (v1["tune"].name, v1["test"].name, v1["results"].name) == ("miou_tune.npz", "miou_test.npz", "miou.json")
    dit = miou.files_for("shapes-dit")
    assert (dit["tune"].name, dit["test"].name, dit["results"].name) == \
        ("miou_shapes-dit_tune.npz", "miou_shapes-dit_test.npz", "miou_shapes-dit.json")
    assert miou.files_for("/tmp/x/my-dit")["results"].name == "miou_my-dit.json"  # a folder: by its name
    assert dit["tune"].parent == common.CACHE and dit["results"].parent == common.RESULTS

    assert bd.results_path("shapes-v1").name == "diagnostics.json"
    assert bd.results_path("shapes-dit").name == "diagnostics_shapes-dit.json"
    assert [bd.tag_for(m, "tune") for m in ("shapes-v1", "shapes-v2", "shapes-dit", "/tmp/a/b")] == \
        ["tune", "tune", "shapes-dit-tune", "b-tune"]


def test_a_folder_model_reads_the_relevance_beside_it(tmp_path):
    import common

    from auditor.zoo import MODELS_DIR

    assert common.default_relevance_path() == MODELS_DIR / "shapes-v1" / "relevance.npz"
    assert common.default_relevance_path("shapes-dit") == MODELS_DIR / "shapes-dit" / "relevance.npz"
    (tmp_path / "model_index.json").write_text("{}")
    assert common.default_relevance_path(str(tmp_path)) == tmp_path / "relevance.npz"


def test_random_k_draws_are_unchanged_for_shapes_v1_and_left_out_past_a_transformers_heads():
    import miou

    # the draws as shapes-v1's results were made (56 heads, every k of KS drawable)
    rng = np.random.default_rng(0)
    old = np.zeros((len(miou.KS) * miou.RANDOM_DRAWS, 56), np.float32)
    for j, heads in enumerate(rng.choice(56, size=k, replace=False) for k in miou.KS for _ in range(miou.RANDOM_DRAWS)):
        old[j, heads] = 1.0
    assert np.array_equal(miou.random_weights(56), old)

    W = miou.random_weights(36)  # shapes-dit: 6 blocks x 6 heads
    by_k = W.reshape(len(miou.KS), miou.RANDOM_DRAWS, 36)
    for i, k in enumerate(miou.KS):
        if k > 36:
            assert np.isnan(by_k[i]).all()
        else:
            assert (by_k[i].sum(1) == k).all()


def test_step_callback_uses_what_the_pipeline_takes():
    import common

    class New:  # SD, SDXL, SD3, Flux
        def __call__(self, prompt, callback_on_step_end=None, **kwargs):
            pass

    class Old:  # PixArt-α: takes **kwargs (so callback_on_step_end is silently ignored) and the older callback
        def __call__(self, prompt, callback=None, callback_steps=1, **kwargs):
            pass

    seen = []
    on_end = object()
    assert common.step_callback(New(), seen.append, on_end) == {"callback_on_step_end": on_end}
    kw = common.step_callback(Old(), seen.append, on_end)
    assert kw["callback_steps"] == 1
    kw["callback"](3, 999, None)
    assert seen == [3]


def _miou(heads: int, k: int, mean: float) -> dict:
    c = {"mean": mean, "ci95": [mean - 0.01, mean + 0.01], "n": 10}
    d = {"mean": 0.01, "ci95": [-0.01, 0.03], "n": 10}
    return {"command": f".venv/bin/python bench/miou.py # {heads}", "machine": {"cpu": "cpu"}, "model": {"heads": heads},
            "splits": {"test": {"generations": 4, "concepts": 10, "skipped_objects": 1, "objects": 8}},
            "tuning": {"k": k}, "test": {"main": {"all_heads": c, "selective": c, "bottom_k": c,
                                                 "diff_vs_all_heads": {"selective": d}}},
            "profile": {"selective": c, "bottom_k": c, "all_heads": c, "k": {"shape": 2, "*": 1},
                        "selective_minus_all_heads": d, "selective_minus_bottom_k": d,
                        "per_category": {"shape": {"concepts": 10, "k": 2, "selective": c, "all_heads": c,
                                                   "bottom_k": c, "selective_minus_all_heads": d}}},
            "oracle_ranking": {"test": c, "k": 4}, "per_head": {"shape": {"head_iou": [0.0] * heads}}}


def _diag(command: str | None) -> dict:
    r = {"k": 3, "n": 100, "rate": 0.03, "ci95": [0.01, 0.08], "by_type": {"missing": 3}}
    own = {"failing_concepts": 5, "flagged": 4, "recall": {"k": 2, "n": 5, "rate": 0.4},
           "precision": {"k": 2, "n": 4, "rate": 0.5}}
    t = {"generations": 40, "healthy_concepts": 100, "q": 0.04,
         "false_flag_rate": {"healthy_concepts": r, "all_concepts": r}}
    e = {"machine": "x86_64", "date": "2026-12-02", "v1_false_flags": {"healthy_concepts": r, "all_concepts": r},
         "v1_own_failures": own, "k_per_category": {"shape": 2},
         "v1_localisation": {"noun:selective": {"rate": 0.9, "n": 10}}}
    if command:
        t["command"], e["command"] = command + " tune", command + " eval"
    return {"tuning": t, "evaluation": e}


def test_report_section_puts_shapes_dit_beside_shapes_v1():
    import report

    text = report.second_model_section(_miou(56, 48, 0.4), _diag(None), _miou(36, 8, 0.3), _diag("DIT"),
                                       v1_tune_command="V1TUNE")
    assert text.startswith("## Transformer maps against ground truth: shapes-dit beside shapes-v1")
    assert "| | shapes-v1 (56 heads) | shapes-dit (36 heads) |" in text
    assert "| all_heads (DAAM) | 0.400 [0.390, 0.410] | 0.300 [0.290, 0.310] |" in text
    assert "(k 48) | 0.300 [0.290, 0.310] (k 8) |" in text
    for cmd in ("# 56   # shapes-v1", "# 36   # shapes-dit", "V1TUNE   # shapes-v1", "DIT tune   # shapes-dit",
                "DIT eval   # shapes-dit"):
        assert cmd in text
    assert "| HEALTHY-EVAL, healthy concepts flagged (false flags) | 3.0% (3 of 100; 1.0%–8.0%) | 3.0%" in text
    assert "| own failures found (recall / precision) | 0.40 / 0.50 (5 failing, 4 flagged) |" in text
    # either part alone, and without shapes-v1's results: only what exists is shown
    only_miou = report.second_model_section(None, None, _miou(36, 8, 0.3), None)
    assert "| | shapes-dit (36 heads) |" in only_miou and "### Diagnostics" not in only_miou
    only_diag = report.second_model_section(None, None, None, _diag("DIT"))
    assert "### mIoU" not in only_diag and "| measure | shapes-dit |" in only_diag


def test_report_leaves_the_other_sections_alone_without_shapes_dit_results(monkeypatch):
    import report

    calls = []
    monkeypatch.setattr(report, "second_model_section", lambda *a, **k: calls.append(a) or "")
    monkeypatch.setattr(report, "load", lambda name: None)
    doc = {}
    monkeypatch.setattr(report, "DOC", type("D", (), {"is_file": lambda s: False,
                                                      "write_text": lambda s, t: doc.setdefault("t", t)})())
    monkeypatch.setattr(report, "profile_section", lambda: "## Calibration of the audit profile\n")
    monkeypatch.setattr(report, "costs_section", lambda *a: "## Costs summary\n")
    monkeypatch.setattr(sys, "argv", ["report.py"])
    report.main()
    assert not calls and "shapes-dit" not in doc["t"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
