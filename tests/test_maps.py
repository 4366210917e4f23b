"""auditor.engine.maps: aggregation by method, normalisation, the mask policy, one prompt end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor import trace
from auditor.engine import maps as M
from auditor.engine.relevance import RelevanceMatrix
from auditor.errors import AuditorError

CATS = ("animal", "colour", "vehicle")


@pytest.fixture(scope="module")
def traced():
    pipe = tp.sd15()
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures run before the autouse one_thread)
    with trace(pipe) as tr:
        tp.generate(pipe, prompt="a red cat and a blue car", steps=2, width=96)
    torch.set_num_threads(n)
    return tr


def _relevance(tr, seed=0) -> RelevanceMatrix:
    rng = np.random.default_rng(seed)
    votes = rng.integers(0, 50, size=(len(CATS), tr.head_index.total))
    return RelevanceMatrix.from_votes(CATS, tr.head_names, votes, budget_prompts=10, steps=2)


def test_maps_are_normalised_and_masks_binary(traced):
    rm = _relevance(traced)
    for method in M.METHODS:
        m = traced.maps("cat", method=method, k=8, relevance=rm)
        assert m.shape == (64, 96) and m.dtype == np.float32
        assert m.min() == 0.0 and m.max() == 1.0
        mask = M.binarize(m)
        assert mask.dtype == bool and 0 < mask.sum() < mask.size
        q = M.binarize(m, "quantile")
        assert abs(q.mean() - (1 - M.MASK_QUANTILE)) < 0.05
    assert not M.binarize(np.full((4, 4), 0.3)).any()  # a flat map has no region
    with pytest.raises(AuditorError):
        M.binarize(m, "median")


def test_methods_differ_when_relevance_differs(traced):
    rm = _relevance(traced)
    idx = traced.token_indices("cat")
    cm = {m: M.concept_map(traced, idx, m, rm, "animal", k=8) for m in M.METHODS}
    for a in M.METHODS:
        for b in M.METHODS:
            if a < b:
                assert not np.allclose(cm[a].raw, cm[b].raw), (a, b)
    top = set(rm.top_heads("animal", 8).tolist())
    assert set(cm["selective"].heads.tolist()) == top
    assert set(cm["bottom_k"].heads.tolist()).isdisjoint(top)
    # another category selects other heads, so another map
    assert not np.allclose(M.concept_map(traced, idx, "selective", rm, "vehicle", 8).raw, cm["selective"].raw)


def test_methods_differ_only_in_their_heads(traced):
    # selective over exactly the heads DAAM aggregates is DAAM's map: one aggregation, other heads
    idx = traced.token_indices("car")
    daam = M.daam_weights(traced.head_names)
    votes = np.vstack([daam * 100 + np.arange(len(daam))[::-1] % 7] * len(CATS)).astype(np.int64)
    rm = RelevanceMatrix.from_votes(CATS, traced.head_names, votes, budget_prompts=1, steps=1)
    sel = M.concept_map(traced, idx, "selective", rm, "vehicle", k=int(daam.sum()))
    np.testing.assert_allclose(sel.raw, M.concept_map(traced, idx, "all_heads").raw, rtol=1e-5, atol=1e-8)
    assert not any(traced.head_names[h].startswith("mid_block") for h in sel.heads)


def test_aggregation_is_the_weighted_mean_of_latent_head_maps(traced):
    rm = _relevance(traced, seed=4)
    idx = traced.token_indices("red")
    heads = M.latent_head_maps(traced, idx)  # [H, 8, 12]: the latent grid
    assert tuple(heads.shape) == (128, 8, 12) and float(heads.min()) >= 0.0
    w = torch.as_tensor(rm.row("colour"))
    lat = (w[:, None, None] * heads).sum(0) / w.sum()
    want = torch.nn.functional.interpolate(lat[None, None], size=(64, 96), mode="bicubic")[0, 0].numpy()
    np.testing.assert_allclose(M.concept_map(traced, idx, "weighted", rm, "colour").raw, want, rtol=1e-4, atol=1e-7)
    # a word's map is the mean of its tokens' maps (DAAM's rule), for every method
    both = M.concept_map(traced, (2, 3), "selective", rm, "colour", k=8).raw
    one = [M.concept_map(traced, (t,), "selective", rm, "colour", k=8).raw for t in (2, 3)]
    np.testing.assert_allclose(both, (one[0] + one[1]) / 2, rtol=1e-4, atol=1e-8)
    # the bilinear per-layer mean (category_response's) is still the mean of bilinearly resized head maps
    bil = traced.token_head_maps(list(idx)).numpy()
    np.testing.assert_allclose(M.aggregate(traced, idx, np.ones(128, np.float32)).numpy(), bil.mean(0),
                               rtol=1e-4, atol=1e-6)


def test_head_maps_carry_names(traced):
    hm = traced.heads("cat")
    assert len(hm) == 128 and hm.maps.shape == (128, 8, 12)  # the largest latent grid
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2#h3"
    np.testing.assert_array_equal(hm[name], hm.maps[traced.head_index.index(name)])


def test_errors_name_the_problem(traced):
    rm = _relevance(traced)
    idx = traced.token_indices("cat")
    with pytest.raises(AuditorError, match="unknown map method"):
        M.concept_map(traced, idx, "best", rm, "animal")
    with pytest.raises(AuditorError, match="category"):
        M.concept_map(traced, idx, "selective", rm, None)
    with pytest.raises(AuditorError, match="not in the relevance"):
        M.concept_map(traced, idx, "selective", rm, "weather")
    with pytest.raises(AuditorError, match="k must be"):
        M.concept_map(traced, idx, "selective", rm, "animal", k=0)
    other = RelevanceMatrix.from_votes(CATS, rm.head_names[:10], np.ones((3, 10)), budget_prompts=1, steps=1)
    with pytest.raises(AuditorError, match="another architecture"):
        M.concept_map(traced, idx, "selective", other, "animal", k=2)
    with pytest.raises(AuditorError, match="does not occur"):
        traced.maps("dog", method="all_heads")
    with pytest.raises(AuditorError, match="head-relevance"):
        traced.maps("cat", method="selective")  # an in-memory model has no stored matrix


def test_word_category_comes_from_the_lexicon(traced):
    rm = _relevance(traced)
    by_word = traced.concept("cat", "selective", k=8, relevance=rm)
    assert by_word.category == "animal"
    np.testing.assert_array_equal(by_word.raw, M.concept_map(traced, traced.token_indices("cat"), "selective",
                                                             rm, "animal", 8).raw)


def test_category_response_ranks_candidate_readings(traced):
    rm = _relevance(traced)
    resp = M.category_response(traced, traced.token_indices("red"), rm, ["colour", "animal"], k=8)
    assert set(resp) == {"colour", "animal"} and all(v > 0 for v in resp.values())
    assert resp["colour"] != resp["animal"]


def test_prompt_maps_writes_image_and_side_by_side_overlays(tmp_path, traced):
    pipe = tp.sd15()
    rm = _relevance(traced)
    from auditor.prompt_maps import prompt_maps, save_prompt_maps

    res = prompt_maps(pipe, "a red cat", words=["cat", "red"], methods=list(M.METHODS), k=8, steps=2,
                        relevance=rm, height=64, width=64)
    assert [c.category for c in res.concepts] == ["animal", "colour"]
    rec = save_prompt_maps(res, tmp_path)
    from PIL import Image

    assert Image.open(tmp_path / "image.png").size == (64, 64)
    panel = Image.open(rec["concepts"][0]["overlay"])
    assert panel.width > 4 * 256 and set(rec["concepts"][0]["maps"]) == set(M.METHODS)
    assert rec["relevance_sha256"] == rm.sha256


def test_a_map_too_flat_for_otsus_bins_has_no_region():
    m = np.full((8, 8), 0.0125, np.float32)
    m[0, 0] = np.nextafter(np.float32(0.0125), np.float32(1))  # a range of one float32 step
    assert not M.binarize(m).any()
