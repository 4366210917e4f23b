"""Words ↔ tokens for T5 (SentencePiece) and the transformers' text sequences (SD3: CLIP then T5; Flux, PixArt:
T5), the trace's word columns, the concept extractor with them, and loading/mapping saved tiny transformer folders."""

from __future__ import annotations

import json

import pytest

import tiny_dit as td
from tiny_pipelines import one_thread  # noqa: F401  (autouse fixture)
from auditor import trace
from auditor.align import Segment, TextSequence, align_spans, text_sequence, word_indices
from auditor.concepts import extract_many
from auditor.errors import AuditorError

PROMPT = "a red cat next to a blue car and a red dog"


def _pieces(tok, text, indices, offset=0):
    ids = tok(text)["input_ids"]
    return "".join(tok.convert_ids_to_tokens([ids[i - offset] for i in indices])).replace("▁", "")


def test_t5_word_owns_its_pieces_from_the_word_start():
    tok = td.t5_tokenizer()
    for word, occurrence in [("red", 0), ("red", 1), ("blue", 0), ("car", 0), ("dog", 0)]:
        span = word_indices(PROMPT, word, tok, occurrence)
        assert _pieces(tok, PROMPT, span.indices) == word and not span.truncated
        pieces = tok.convert_ids_to_tokens([tok(PROMPT)["input_ids"][span.indices[0]]])
        assert pieces[0].startswith("▁")  # the word's first piece carries the word-start mark
    assert word_indices(PROMPT, "red", tok, 0).indices != word_indices(PROMPT, "red", tok, 1).indices
    # T5 has no start token: the first word begins at column 0; its end token is the only special one
    assert word_indices(PROMPT, "a", tok).indices[0] == 0


def test_t5_truncation_keeps_the_end_token():
    tok = td.t5_tokenizer()
    n = len(tok(PROMPT)["input_ids"])
    cut = align_spans(PROMPT, [(PROMPT.rindex("dog"), len(PROMPT))], tok, max_length=n - 1)[0]
    whole = align_spans(PROMPT, [(PROMPT.rindex("dog"), len(PROMPT))], tok, max_length=n)[0]
    assert cut.truncated and not whole.truncated and whole.indices


def test_sd3_sequence_is_clip_columns_then_t5_columns():
    pipe = td.shared("sd3")
    seq = text_sequence(pipe, 24)
    assert [(s.offset, s.length) for s in seq.segments] == [(0, 77), (77, 24)] and seq.model_max_length == 101
    span = word_indices(PROMPT, "blue", seq)
    clip = [i for i in span.indices if i < 77]
    t5 = [i for i in span.indices if i >= 77]
    assert clip and t5
    assert pipe.tokenizer.decode([pipe.tokenizer(PROMPT)["input_ids"][i] for i in clip]).strip() == "blue"
    assert _pieces(pipe.tokenizer_3, PROMPT, t5, offset=77) == "blue"
    # a word past CLIP's 77 tokens but inside T5's is still read (through T5): not truncated
    long = " ".join(["red"] * 80) + " dog"
    past = word_indices(long, "dog", text_sequence(pipe, 512))
    assert not past.truncated and all(i >= 77 for i in past.indices)
    assert word_indices(long, "dog", TextSequence((Segment(pipe.tokenizer, 0, 77),))).truncated


def test_flux_reads_t5_only_and_pixart_reads_t5():
    for family, tok_attr in [("flux", "tokenizer_2"), ("pixart", "tokenizer")]:
        pipe = td.shared(family)
        seq = text_sequence(pipe)
        assert len(seq.segments) == 1 and seq.segments[0].tokenizer is getattr(pipe, tok_attr)
        assert seq.segments[0].length == (512 if family == "flux" else 120)  # the pipeline call's default
    assert text_sequence(__import__("tiny_pipelines").sd15()) is __import__("tiny_pipelines").sd15().tokenizer


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_trace_token_indices_and_concepts_agree(family):
    pipe = td.shared(family)
    with trace(pipe) as tr:
        td.generate(pipe, prompt=PROMPT, max_sequence_length=48)  # the tiny vocabulary spells words in pieces
    seq = text_sequence(pipe, 48)
    concepts = extract_many([PROMPT], tokenizer=seq)[0]
    blue = concepts.find("blue")
    assert tr.token_indices("blue") == blue.token_indices == word_indices(PROMPT, "blue", seq).indices
    assert tr.token_indices("red", occurrence=1) != tr.token_indices("red")
    assert max(tr.token_indices("dog")) < tr.seq_len
    with pytest.raises(AuditorError, match="does not occur"):
        tr.token_indices("horse")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}
    for family in ("sd3", "flux", "pixart"):
        folder = tmp_path_factory.mktemp(family)
        td.BUILDERS[family]().save_pretrained(folder, safe_serialization=True)
        folders[family] = folder
    return folders


@pytest.mark.parametrize("family, cls", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline"),
                                         ("pixart", "PixArtAlphaPipeline")])
def test_saved_folder_loads_and_maps(family, cls, saved, tmp_path, cli):
    from auditor.engine.models import load_model

    lm = load_model(str(saved[family]), device="cpu")
    assert type(lm.pipe).__name__ == cls and len(lm.fingerprint) == 64
    code, out, err = cli("maps", PROMPT, "--model", str(saved[family]), "--method", "all_heads", "--steps", "2",
                         "--height", "64", "--width", "64", "--out", str(tmp_path / "maps"), "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "maps" / "image.png").is_file() and "blue" in out


def test_unsupported_pipeline_is_refused_naming_the_supported(tmp_path, cli):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    (tmp_path / "w.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    code, out, err = cli("maps", "a cat", "--model", str(tmp_path), "--device", "cpu")
    assert code == 2 and "KandinskyPipeline is not supported" in err and "FluxPipeline" in err
    assert len(err.strip().splitlines()) == 1
