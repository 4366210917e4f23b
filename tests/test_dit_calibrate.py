"""Calibration and the audit on the transformer families (PixArt, SD3, SD3.5, Flux), on tiny random copies:
head relevance by concept passes, the keywords every call passes, and `auditor calibrate` / `audit` / `compare`
end to end on saved folders."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_dit as td
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor.align import text_length, text_sequence
from auditor.engine import hrv
from auditor.engine.categories import encode_words
from auditor.engine.families import call_kwargs, family, text_kwargs

FAMILIES = ("pixart", "sd3", "sd35", "flux")
LEXICON = {"colour": ["red", "blue", "green"], "animal": ["cat", "dog"], "vehicle": ["car"]}
PROMPTS = ["a red cat next to a blue car", "a green dog on a yellow bench", "a photo of a cat and a dog"]


def _latents(pipe, recording=None, steps=2):
    g = torch.Generator("cpu").manual_seed(3)
    kw = dict(num_inference_steps=steps, guidance_scale=4.0, generator=g, output_type="latent", height=64,
              width=64, **call_kwargs(pipe))
    if recording is None:
        return pipe(PROMPTS[:2], **kw).images
    with recording:
        return pipe(PROMPTS[:2], **kw).images


@pytest.mark.parametrize("name", FAMILIES)
def test_calibration_votes_once_per_head_item_and_step(name):
    pipe = td.shared(name)
    rm = hrv.calibrate(pipe, PROMPTS, LEXICON, steps=2, first=2, batch_size=2, height=64, width=64)
    assert rm.matrix.shape == (3, td.EXPECTED_HEADS[name]) and rm.categories == ("colour", "animal", "vehicle")
    assert rm.k == min(8, td.EXPECTED_HEADS[name])  # the default k is capped at a small model's heads
    # every head votes once per prompt and denoising step, whatever the guidance doubling of the batch
    assert (rm.votes.sum(0) == len(PROMPTS) * 2).all()
    assert rm.budget_prompts == len(PROMPTS)


@pytest.mark.parametrize("name", FAMILIES)
def test_concept_passes_leave_the_generation_unchanged(name):
    pipe = td.shared(name)
    bank = hrv.ConceptBank(pipe, LEXICON)
    voter = hrv._PassVoter(pipe, bank, seed=0)
    voter.items = 2
    plain = _latents(pipe)
    voted = _latents(pipe, voter.recording())
    assert torch.equal(plain, voted)
    assert int(voter.votes.sum()) == 2 * 2 * td.EXPECTED_HEADS[name]  # 2 items x 2 steps, every head
    assert not voter.denoiser._forward_hooks  # the hook is gone after the block


def test_concept_pass_reads_the_drawn_words_as_the_whole_text():
    pipe = td.shared("flux")
    bank = hrv.ConceptBank(pipe, LEXICON)
    voter = hrv._PassVoter(pipe, bank, seed=0)
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["encoder_hidden_states"].shape, kwargs["txt_ids"].shape, kwargs["hidden_states"].shape))

    handle = voter.denoiser.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        voter.items = 2
        _latents(pipe, voter.recording(), steps=1)
    finally:
        handle.remove()
    (gen_text, gen_ids, gen_hs), (text, ids, hs) = seen  # the generation's evaluation, then its concept pass
    n_tok = int(voter._owner.numel())
    assert text[:2] == (2, n_tok) and ids[0] == n_tok and hs == gen_hs
    assert gen_text[1] == text_length(pipe)


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_words_are_encoded_at_the_columns_they_own(name):
    pipe = td.shared(name)
    sequence = text_sequence(pipe)
    states = encode_words(pipe, ["red", "astronaut"])
    for word, s in zip(["red", "astronaut"], states):
        columns = [i for seg in sequence.segments for i in range(seg.offset, seg.offset + seg.length)]
        ids = td.t5_tokenizer()(word, add_special_tokens=False)["input_ids"]
        expected = len(ids) + (len(pipe.tokenizer(word, add_special_tokens=False)["input_ids"]) if name == "sd3" else 0)
        assert s.shape[0] == expected and max(columns) >= s.shape[0]


def test_text_length_is_capped_by_the_tokenizer():
    from diffusers import PixArtAlphaPipeline

    pipe = td.shared("pixart")
    assert text_length(pipe) == 120  # PixArt's call default, its tokenizer reads 512
    assert call_kwargs(pipe) == {"max_sequence_length": 120, "clean_caption": False}  # sample size 32 has bins
    short = PixArtAlphaPipeline(tokenizer=td.t5_tokenizer(model_max_length=24), text_encoder=pipe.text_encoder,
                                vae=pipe.vae, transformer=pipe.transformer, scheduler=pipe.scheduler)
    assert text_length(short) == 24 and text_kwargs(short)["max_sequence_length"] == 24
    assert text_sequence(short).segments[0].length == 24
    assert family(td.shared("sd35")) == "sd3" and text_kwargs(td.shared("flux")) == {"max_sequence_length": 512}


SUITE = """name: tiny-dit
description: Two prompts for the tiny transformer copies.
defaults:
  steps: 2
  seeds: [0]
  guidance: 4.0
  resolution: 64
prompts:
  - id: cat-car
    text: a red cat next to a blue car
  - id: dog-bench
    text: a green dog on a yellow bench
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}
    for name in ("sd3", "sd35", "flux", "pixart"):
        folder = tmp_path_factory.mktemp(name)
        td.BUILDERS[name]().save_pretrained(folder, safe_serialization=True)
        folders[name] = folder
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "sd35", "flux", "pixart"])
def test_calibrate_audit_and_compare_a_saved_transformer(name, saved, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = str(saved[name])
    args = ("calibrate", "--model", folder, "--budget", "4", "--threshold-prompts", "4", "--steps", "2", "--device",
            "cpu")
    # a random model's scores separate nothing: at the default 5% budget no cut above the extremes fits, and the profile
    # says it is uncalibrated rather than ship thresholds that cannot flag
    code, out, err = cli(*args)
    assert code == 0, err
    assert "relevance (HRV): 4 prompts x 2 steps" in out and "thresholds: none (uncalibrated" in out
    code, out, err = cli(*args, "--flag-budget", "0.9")  # a budget its scores can meet: thresholds to compare with
    assert code == 0, err
    assert "thresholds: set on 4 generations" in out
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    runs = []
    for i in range(2):  # the same audit twice: generation and maps are deterministic, so compare finds no change
        run = tmp_path / f"run{i}"
        code, out, err = cli("audit", str(suite), "--model", folder, "--out", str(run), "--no-pdf", "--device", "cpu")
        assert code == 0, err
        results = json.loads((run / "results.json").read_text())
        assert len(results["model"]["fingerprint"]) == 64 and len(results["generations"]) == 2
        assert (run / "report.html").is_file()
        runs.append(run)
    code, out, err = cli("compare", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp"), "--no-pdf")
    assert code == 0, err
    assert "same architecture" in out and " 0 regressions, 0 improvements" in out


def test_ranking_words_are_columns_of_the_denoisers_text_sequence():
    from auditor.align import word_indices
    from auditor.calibration import word_targets

    pipe = td.shared("flux")  # Flux reads T5 only: CLIP's token indices would point at the wrong columns
    prompt = "a red cat next to a blue car"
    targets = word_targets([prompt], text_sequence(pipe))[0]
    expected = {word_indices(prompt, w, text_sequence(pipe)).indices for w in ("red", "cat", "blue", "car")}
    assert {t.token_indices for t in targets} == expected
    assert {t.token_indices for t in targets} != {word_indices(prompt, w, pipe.tokenizer).indices
                                                  for w in ("red", "cat", "blue", "car")}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_special_tokens_are_columns_of_each_segment(name):
    from auditor import trace

    pipe = td.shared(name)
    with trace(pipe) as tr:
        td.generate(pipe, "a red cat", steps=1)
    special = tr.special_tokens()
    t5 = td.t5_tokenizer()("a red cat", add_special_tokens=True)["input_ids"]
    if name == "flux":  # T5 only: no start token, the end token after the words, padding to the traced length
        assert special["start"] == [] and special["end"] == [len(t5) - 1]
        assert special["padding"] == list(range(len(t5), tr.seq_len))
    else:  # CLIP's 77 columns (start, end, padding), then T5's
        clip = pipe.tokenizer("a red cat")["input_ids"]
        assert special["start"] == [0] and special["end"] == [len(clip) - 1, 77 + len(t5) - 1]
        assert special["padding"][-1] == tr.seq_len - 1 and 77 + len(t5) in special["padding"]
