"""The statistics and small helpers of the ground-truth benchmarks (bench/); never runs a benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import stats  # noqa: E402


def test_iou_basic_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert np.isnan(stats.iou(a, b))  # nothing to score
    a[:2] = True
    assert stats.iou(a, b) == 0.0
    b[1:3] = True
    assert stats.iou(a, b) == pytest.approx(4 / 12)
    assert stats.iou(a, a) == 1.0


def test_bootstrap_median_is_seeded_and_covers_the_median():
    x = np.random.default_rng(1).normal(1.03, 0.05, 40)
    a, b = stats.bootstrap_median(x, n_boot=500), stats.bootstrap_median(x, n_boot=500)
    assert a == b and a["n"] == 40 and a["median"] == pytest.approx(float(np.median(x)))
    assert a["ci95"][0] < a["median"] < a["ci95"][1]
    assert stats.bootstrap_median(x, n_boot=500, seed=1) != a
    # more rounds, a narrower interval
    wide = stats.bootstrap_median(x[:10], n_boot=500)
    assert wide["ci95"][1] - wide["ci95"][0] > a["ci95"][1] - a["ci95"][0]


def test_bootstrap_mean_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 0.1, 300)
    a, b = stats.bootstrap_mean(x, n_boot=500), stats.bootstrap_mean(x, n_boot=500)
    assert a == b  # fixed seed: same interval every run
    lo, hi = a["ci95"]
    assert lo < a["mean"] < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(300), rel=0.25)


def test_bootstrap_drops_nan_and_handles_empty():
    out = stats.bootstrap_mean([1.0, np.nan, 3.0], n_boot=200)
    assert out["n"] == 2 and out["mean"] == 2.0
    empty = stats.bootstrap_mean([np.nan])
    assert empty["n"] == 0 and np.isnan(empty["mean"])


def test_cluster_bootstrap_is_wider_for_correlated_values():
    """Ten clusters of 30 identical values: resampling clusters gives the width of 10 values, not of 300."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, 10)
    x = np.repeat(centres, 30)
    g = np.repeat(np.arange(10), 30)
    naive = stats.bootstrap_mean(x, n_boot=1000)
    clustered = stats.bootstrap_mean(x, g, n_boot=1000)
    width = lambda d: d["ci95"][1] - d["ci95"][0]  # noqa: E731
    assert clustered["clusters"] == 10
    assert width(clustered) > 3 * width(naive)


def test_paired_difference():
    a = np.array([0.5, 0.6, 0.7, np.nan])
    b = np.array([0.4, 0.6, 0.5, 0.1])
    d = stats.paired_difference(a, b, n_boot=200)
    assert d["n"] == 3
    assert d["mean"] == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert d["a_wins"] == pytest.approx((2 + 0.5) / 3)


def test_rate_and_auc():
    r = stats.rate([True, True, False, True])
    assert r["rate"] == 0.75 and r["n"] == 4 and 0 < r["ci95"][0] < 0.75 < r["ci95"][1] <= 1
    assert stats.auc([2, 3], [0, 1]) == 1.0
    assert stats.auc([0, 1], [2, 3]) == 0.0
    assert stats.auc([1, 1], [1, 1]) == 0.5
    b = stats.bootstrap_auc([0.2, 0.9, 0.8, 0.7], [0.1, 0.3, 0.2, 0.6], n_boot=200)
    assert b["ci95"][0] <= b["auc"] <= b["ci95"][1]


def test_fmt_ci():
    assert stats.fmt_ci({"mean": 0.5, "ci95": [0.4, 0.6]}) == "0.500 [0.400, 0.600]"


def test_segment_bounds_and_calibration_reach():
    import calibration
    import common

    assert common.segment_bounds(20, 4) == [5, 10, 15, 20]
    assert common.segment_bounds(20, 1) == [20]
    curve = [{"prompts": 8, "x": 0.95}, {"prompts": 16, "x": 0.8}, {"prompts": 32, "x": 0.91}, {"prompts": 64, "x": 0.9}]
    assert calibration.reaches(curve, "x") == 32  # must stay >= 0.9 from there on
    assert calibration.reaches(curve[:2], "x") is None


def test_subset_weights_match_the_engine():
    """bench/miou's head selection over all heads equals auditor.engine.maps.head_weights; restricted to a subset it
    ranks within the subset only."""
    import miou

    from auditor.engine.relevance import RelevanceMatrix

    rng = np.random.default_rng(1)
    names = [f"l{i // 4}#h{i % 4}" for i in range(12)]
    votes = rng.integers(0, 20, (2, 12))
    votes[1, :] = 0  # a category with no votes has no selection
    rm = RelevanceMatrix.from_votes(("shape", "food"), names, votes, budget_prompts=1, steps=1)
    miou.check_weights(rm, 12)
    allowed = np.zeros(12, bool)
    allowed[4:8] = True
    w = miou.subset_weights(rm, "shape", "selective", 2, allowed)
    assert w.sum() == 2 and not w[~allowed].any()
    top_in_subset = 4 + np.argsort(-rm.matrix[0, 4:8], kind="stable")[:2]
    assert set(np.flatnonzero(w)) == set(top_in_subset)
    assert np.isnan(miou.subset_weights(rm, "food", "selective", 2, allowed)).all()
    assert np.isnan(miou.subset_weights(rm, "shape", "selective", 5, allowed)).all()  # k past the subset


def test_leaf_detector_on_rendered_scenes():
    import misinterpretation

    out = misinterpretation.leaf_detector_check(n=20)
    assert out["fruit_detected"]["rate"] == 1.0
    assert out["shape_detected"]["rate"] == 0.0


def test_polysemy_prompts_share_their_prefix_where_designed():
    import misinterpretation

    pairs = misinterpretation.pair_prompts(8, 0)
    for p in pairs:
        pre_c = p["colour"].split("orange")[0]
        pre_f = p["fruit"].split("orange")[0]
        assert (pre_c == pre_f) == (p["design"] == "same_prefix"), p
        assert p["colour"].count("orange") == p["fruit"].count("orange") == 1


def test_by_eye_counts_flags_against_the_labels_and_only_for_the_labelled_model(tmp_path, monkeypatch):
    import json

    import diagnostics as bd
    from auditor.thresholds import Thresholds

    def gen(index, drawn_share):  # one two-object prompt; the star's drawn_share decides its `missing` flag
        concepts = [{"text": "circle", "role": "object", "category": "shape", "scores": {"drawn_share": 0.9}},
                    {"text": "star", "role": "object", "category": "shape", "scores": {"drawn_share": drawn_share}}]
        return {"index": index, "prompt": f"p{index}", "concepts": concepts, "links": [(0, "noun"), (1, "noun")]}

    gens = [gen(0, 0.0), gen(1, 0.0), gen(2, 0.9), gen(3, 0.9)]  # flagged, flagged, silent, silent
    th = Thresholds(min_peak_ratio=0.0, min_concentration=0.0, max_shared_region=1.0, max_area=1.0,
                    min_drawn_share=0.5, min_binding_margin=-1.0, position_margin=-1.0, min_category_margin=-9.0,
                    min_colour_share=0.0, max_flag_rate=0.5)
    labels = {"who": "test", "model": {"fingerprint": "abc"}, "defects": {"star_neglected": {
        "question": "q", "candidates": [0, 1, 2, 3], "seen": [0, 2], "ambiguous": [1],
        "prompts": {str(i): f"p{i}" for i in range(4)}}}}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(labels))
    monkeypatch.setattr(bd, "LABELS", path)
    monkeypatch.setattr(bd, "ROOT", tmp_path)
    out = bd.by_eye(gens, th, "abc")["star_neglected"]
    assert (out["as_labelled"]["tp"], out["as_labelled"]["fp"], out["as_labelled"]["fn"], out["as_labelled"]["tn"]) \
        == (1, 1, 1, 1)
    assert (out["ambiguous_left_out"]["fp"], out["ambiguous_left_out"]["candidates"]) == (0, 3)
    assert bd.by_eye(gens, th, "another model") is None
    gens[3]["prompt"] = "another prompt at this index"  # labels of another prompt set do not apply either
    assert bd.by_eye(gens, th, "abc") is None
