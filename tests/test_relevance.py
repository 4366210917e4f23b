"""auditor.engine.relevance: the voting rule, vote counts, convergence, the stored record, word categories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor.engine.categories import category_of, infer_category
from auditor.engine.hrv import _Voter, calibrate, relevance_for
from auditor.engine.relevance import RelevanceMatrix, checkpoints, jaccard_topk
from auditor.errors import AuditorError

LEX = {"colour": ["red"], "animal": ["cat"], "vehicle": ["car"]}
PROMPTS = ["a red cat", "a blue car", "a dog on grass", "a green bus"]


class _Bank:
    categories = ("a", "b", "c")

    def draw(self, rng):
        raise AssertionError("not used: keys are set by the test")


def _keys_for(attn, wanted: torch.Tensor) -> torch.Tensor:
    """Text states whose to_k projection is exactly ``wanted`` [n, heads * d]."""
    w = attn.to_k.weight.detach()  # [out, in], square in the tiny SD1.5's first layer
    return wanted @ torch.linalg.inv(w).T


@pytest.mark.parametrize("scores, winner", [
    ({"a": [-4.0], "b": [4.0], "c": [0.0]}, 1),
    # mean over a word's tokens, not the sum: b's tokens (2, -6) average below c's single 1.5
    ({"a": [-4.0], "b": [2.0, -6.0], "c": [1.5]}, 2),
])
def test_each_head_votes_for_the_category_its_queries_favour(scores, winner):
    pipe = tp.sd15()
    voter = _Voter(pipe, _Bank(), seed=0)
    name, attn = voter.modules[0]
    heads, d = attn.heads, attn.to_q.out_features // attn.heads
    torch.manual_seed(1)
    base = torch.randn(heads, d)
    base = base / base.norm(dim=-1, keepdim=True) * (2.0 / attn.scale) ** 0.5  # q.q * scale == 2
    query = base[None, :, None, :].expand(2, heads, 5, d)  # 2 items, 5 pixels, all alike
    rows, owner = [], []
    for c, vals in enumerate(scores.values()):
        for v in vals:
            rows.append((base * v / 2.0).reshape(-1))  # score = v
            owner.append(c)
    states = _keys_for(attn, torch.stack(rows))
    owner = torch.tensor(owner)
    voter._keys = (states, owner, torch.bincount(owner))
    with torch.no_grad():
        voter.on_attention(0, attn, query, None, slice(0, 5), 5)
    votes = voter.votes[:, voter.head_index.layer_slice(0)]
    assert votes[winner].tolist() == [2] * heads and int(votes.sum()) == 2 * heads
    assert int(voter.votes.sum()) == 2 * heads  # no other layer touched


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_votes_sum_to_heads_times_prompts_times_steps(guidance):
    rm = calibrate(tp.sd15(), PROMPTS + PROMPTS[:2], LEX, steps=2, k=8, first=2, threshold=1.01, batch_size=4,
                   guidance_scale=guidance, height=64, width=64)
    assert rm.votes.shape == (3, 128)
    assert rm.votes.sum() == 128 * 6 * 2
    assert (rm.votes.sum(0) == 6 * 2).all()  # each head: one vote per prompt and step
    np.testing.assert_allclose(rm.matrix.sum(1), 1.0, rtol=1e-5)
    assert rm.budget_prompts == 6 and not rm.converged
    assert [(c["prompts"], c["compared_with"]) for c in rm.agreement_curve] == [(4, 2), (6, 2)]


def test_calibration_stops_when_top_heads_agree():
    prompts = PROMPTS * 8
    loose = calibrate(tp.sd15(), prompts, LEX, steps=2, k=8, first=2, threshold=0.5, height=64, width=64)
    strict = calibrate(tp.sd15(), prompts, LEX, steps=2, k=8, first=2, threshold=1.01, height=64, width=64)
    assert loose.converged and loose.budget_prompts < len(prompts)
    assert loose.agreement_curve[-1]["min_jaccard"] >= 0.5
    assert all(c["min_jaccard"] < 0.5 for c in loose.agreement_curve[:-1])
    assert not strict.converged and strict.budget_prompts == len(prompts)
    assert [c["prompts"] for c in strict.agreement_curve] == [4, 8, 16, 32]
    # the stopped run is a prefix of the full one (same seeds, same prompts)
    assert strict.agreement_curve[:len(loose.agreement_curve)] == loose.agreement_curve
    assert loose.budget_fraction == loose.budget_prompts * 2 / (2100 * 50)


def test_checkpoints_and_jaccard():
    assert checkpoints(100, 16) == [16, 32, 64, 100]
    assert checkpoints(64, 16) == [16, 32, 64]
    assert checkpoints(8, 16) == [8]
    a = np.array([[5, 4, 3, 0, 0], [1, 1, 1, 1, 1]], float)
    b = np.array([[5, 0, 3, 4, 0], [1, 1, 1, 1, 1]], float)
    np.testing.assert_allclose(jaccard_topk(a, b, 2), [1 / 3, 1.0])


def _record(**kw) -> RelevanceMatrix:
    votes = np.array([[3, 0, 5, 5], [0, 0, 0, 0], [1, 2, 3, 4]])
    names = [f"down_blocks.0.attentions.0.transformer_blocks.0.attn2#h{j}" for j in range(4)]
    return RelevanceMatrix.from_votes(["colour", "shape", "animal"], names, votes, budget_prompts=64, steps=20,
                                      agreement_curve=[{"prompts": 64, "compared_with": 32, "min_jaccard": 0.93,
                                                        "mean_jaccard": 0.97}],
                                      model_fingerprint="ab" * 32, k=2, converged=True, **kw)


def test_top_and_bottom_heads_break_ties_by_head_order():
    rm = _record()
    assert rm.top_heads("colour", 2).tolist() == [2, 3]
    assert rm.bottom_heads("colour", 2).tolist() == [1, 0]
    assert rm.top_heads("animal", 1).tolist() == [3]
    with pytest.raises(AuditorError, match="no votes"):
        rm.top_heads("shape", 2)
    with pytest.raises(AuditorError, match="not in the relevance"):
        rm.row("weather")


def test_save_load_roundtrip_keeps_content_and_hash(tmp_path):
    rm = _record()
    npz = rm.save(tmp_path / "rel")
    assert npz.name == "rel.npz" and (tmp_path / "rel.json").is_file()
    back = RelevanceMatrix.load(tmp_path / "rel.json")
    assert back.sha256 == rm.sha256 == json.loads((tmp_path / "rel.json").read_text())["sha256"]
    np.testing.assert_array_equal(back.votes, rm.votes)
    np.testing.assert_array_equal(back.matrix, rm.matrix)
    assert back.meta() == rm.meta()
    # the hash is the content's: saving again later gives the same one; other votes give another
    assert RelevanceMatrix.load(rm.save(tmp_path / "again.npz")).sha256 == rm.sha256
    changed = _record()
    changed.votes[0, 0] += 1
    assert changed.sha256 != rm.sha256


def test_tampered_or_missing_files_are_refused(tmp_path):
    rm = _record()
    rm.save(tmp_path / "rel")
    side = json.loads((tmp_path / "rel.json").read_text())
    side["k"] = 3
    (tmp_path / "rel.json").write_text(json.dumps(side))
    with pytest.raises(AuditorError, match="sha256"):
        RelevanceMatrix.load(tmp_path / "rel.npz")
    with pytest.raises(AuditorError, match="not found"):
        RelevanceMatrix.load(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "bad.json").write_text(json.dumps(side))
    with pytest.raises(AuditorError, match="unreadable"):
        RelevanceMatrix.load(tmp_path / "bad.npz")


def test_relevance_for_checks_the_architecture(tmp_path):
    _record().save(tmp_path / "rel")
    with pytest.raises(AuditorError, match="do not match"):
        relevance_for(tp.sd15(), tmp_path / "rel.npz")
    with pytest.raises(AuditorError, match="calibrate"):
        relevance_for(tp.sd15())  # an in-memory model has no shipped or cached matrix


def test_word_categories_lexicon_first_then_nearest_words():
    pipe = tp.sd15()
    assert category_of("cat", pipe, lexicon=LEX) == category_of("cat", None, lexicon=LEX)
    assert not category_of("cat", pipe, lexicon=LEX).inferred
    assert category_of("orange").category == "food" and category_of("crimson").category == "colour"
    # nearest words in the model's own text space: a word's nearest lexicon word is itself
    lex = {"colour": ["red", "blue"], "animal": ["cat", "giraffe"], "vehicle": ["car", "tractor"]}
    for word, cat in (("giraffe", "animal"), ("tractor", "vehicle"), ("blue", "colour")):
        g = infer_category(word, pipe, lex, neighbours=1)
        assert g.inferred and g.category == cat and g.neighbours[0][0] == word
        assert g.neighbours[0][2] == pytest.approx(1.0, abs=1e-4)
    guess = category_of("zebra", pipe, lexicon=lex)
    assert guess.inferred and guess.category in lex and len(guess.neighbours) == 5
    with pytest.raises(AuditorError, match="not in the lexicon"):
        category_of("zebra", None, lexicon=lex)



def test_calibration_prompts_shipped_and_chosen_per_model():
    from auditor.engine.hrv import default_prompts, general_prompts

    general = general_prompts()
    assert len(general) >= 500 and len(set(general)) == len(general)
    assert all(3 <= len(p.split()) <= 20 for p in general)
    prompts, source = default_prompts(len(general) + 3, bundled=False)
    assert prompts[-3:] == general[:3] and "calibration-general.txt" in source  # cycled past the end
    shapes, source = default_prompts(5, bundled=True, seed=2)
    assert len(shapes) == 5 and "grammar" in source and shapes[0] not in general
