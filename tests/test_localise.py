"""auditor.engine.localise: the localisation head ranking, its k per category and its record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor.engine import localise as L
from auditor.errors import AuditorError


def test_concentration_is_the_top_share_of_a_maps_mass():
    flat = torch.ones(1, 10, 10)
    peaked = torch.zeros(1, 10, 10)
    peaked[0, 2, 3] = 5.0
    half = torch.zeros(1, 10, 10)
    half[0, :5] = 1.0
    got = L.concentration(torch.cat([flat, peaked, half, torch.zeros(1, 10, 10)]))
    np.testing.assert_allclose(got.numpy(), [0.1, 1.0, 0.2, 0.0], atol=1e-6)


def test_stable_k_is_the_longest_prefix_on_which_both_halves_agree():
    a = np.array([0.9, 0.8, 0.7, 0.1, 0.6])
    assert L.stable_k(a, a) == 5
    b = np.array([0.9, 0.7, 0.8, 0.1, 0.6])  # 2nd and 3rd swap: {0, 2} != {0, 1}, but top-3 sets agree
    assert L.stable_k(a, b) == 1
    c = np.array([0.2, 0.9, 0.8, 0.7, 0.6])  # even the top head differs: still at least one head
    assert L.stable_k(a, c) == 1
    assert L.stable_k(a, a, max_k=2) == 2


def _ranking(counts=(20, 3), H=6, seed=0) -> L.HeadRanking:
    rng = np.random.default_rng(seed)
    cats = ("colour", "shape", L.POOLED)
    counts = np.array(list(counts) + [sum(counts)])
    halves = rng.random((2, 3, H)) * counts[None, :, None] / 2
    halves[:, 0, 4] += 100  # head 4 is clearly colour's best in both halves
    sums = halves.sum(0)
    hc = np.stack([counts // 2, counts - counts // 2])
    return L.HeadRanking(cats, [f"l#h{j}" for j in range(H)], sums, counts, halves, hc, budget_prompts=10, steps=2)


def test_a_category_with_few_words_uses_the_pooled_ranking():
    hr = _ranking()
    assert hr.own("colour") and not hr.own("shape") and not hr.own("vehicle")
    assert hr.top_heads("colour")[0] == 4 and len(hr.top_heads("colour")) == hr.k_for("colour")
    np.testing.assert_array_equal(hr.row("shape"), hr.row(L.POOLED))
    assert hr.k_for("vehicle") == hr.k_for(L.POOLED) and hr.ranks("vehicle")
    assert len(hr.top_heads("colour", 3)) == 3 and 4 not in hr.bottom_heads("colour", 3)


def test_record_round_trip_and_tampering(tmp_path):
    hr = _ranking()
    p = hr.save(tmp_path / "r")
    again = L.HeadRanking.load(p)
    assert again.sha256 == hr.sha256 and again.k_per_category() == hr.k_per_category()
    z = dict(np.load(p))
    z["sums"][0, 0] += 1.0
    with open(p, "wb") as f:
        np.savez_compressed(f, **z)
    with pytest.raises(AuditorError, match="sha256"):
        L.HeadRanking.load(p)


def test_calibration_on_a_tiny_pipeline_ranks_every_head_and_records_its_budget():
    pipe = tp.sd15()
    prompts = ["a red cat", "a blue dog", "a red car", "a blue cat"]
    targets = [[L.WordTarget("colour", (2,)), L.WordTarget("animal", (3,))]] * 4
    hr = L.calibrate_localisation(pipe, prompts, targets, steps=2, guidance_scale=5.0, batch_size=2, first=2,
                                  height=64, width=64, prompt_source="test")
    assert hr.head_names[0].endswith("#h0") and hr.sums.shape == (3, 128)
    assert list(hr.counts) == [4, 4, 8] and list(hr.half_counts.sum(0)) == [4, 4, 8]
    assert hr.budget_prompts == 4 and hr.agreement_curve and hr.agreement_curve[0]["compared_with"] == 2
    assert ((0 <= hr.sums) & (hr.sums <= hr.counts[:, None] + 1e-9)).all()  # shares in [0, 1] per word
    with pytest.raises(AuditorError, match="words for"):
        L.calibrate_localisation(pipe, prompts, targets[:2])
    with pytest.raises(AuditorError, match="no calibration prompt names a word"):
        L.calibrate_localisation(pipe, prompts, [[]] * 4)
