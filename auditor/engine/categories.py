"""The category of a word, for the category response and selective maps: the lexicon's, else inferred in the model's
own text space (the nearest lexicon words vote). Also how words are encoded the way the denoiser's text attention reads
them, which head-relevance calibration shares."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from auditor import lexicon as lex
from auditor.align import align_spans, text_sequence
from auditor.engine.families import native_size
from auditor.engine.heads import denoiser_of
from auditor.engine.image_read import conditioning
from auditor.errors import AuditorError


@torch.no_grad()
def encode_words(pipe, words: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Each word's token states in the space the denoiser's text attention reads.

    A word is encoded alone, as a prompt, by the pipeline's own encoders (``image_read.conditioning``, so with the
    length and options every audit call uses); its states are the columns it owns in that text sequence
    (``auditor.align``): its BPE pieces after CLIP's start token, its SentencePiece pieces in T5, both for SD3.

    Args:
        pipe: a loaded diffusers pipeline of a supported family.
        words: the words (or short phrases) to encode.
        batch_size: words encoded per call.

    Returns:
        One tensor [n_tokens, D] per word, in order.
    """
    sequence = text_sequence(pipe)
    side = native_size(pipe)
    out: list[torch.Tensor] = []
    for i in range(0, len(words), batch_size):
        chunk = list(words[i:i + batch_size])
        emb = conditioning(pipe, chunk, None, (side, side))[0]
        for j, w in enumerate(chunk):
            columns = align_spans(w, [(0, len(w))], sequence)[0].indices
            if not columns:
                raise AuditorError(f"the word {w!r} has no tokens the model reads")
            out.append(emb[j, list(columns)].clone())
    return out


@dataclass(frozen=True)
class CategoryGuess:
    word: str
    category: str
    inferred: bool  # False: the lexicon lists the word; True: nearest lexicon words in the text-embedding space
    neighbours: tuple[tuple[str, str, float], ...] = ()  # (lexicon word, its category, cosine)


_LEXICON_EMBEDDINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _word_vector(states: torch.Tensor) -> torch.Tensor:
    v = states.float().mean(0)
    return v / v.norm().clamp_min(1e-8)


def infer_category(word: str, pipe, lexicon: Mapping[str, Sequence[str]] | None = None,
                   neighbours: int = 5) -> CategoryGuess:
    """The category of a word the lexicon lacks: its nearest lexicon words (cosine, mean token state in the
    model's own text space) vote, weighted by similarity. Marked ``inferred``."""
    if lexicon is None:
        lexicon = lex.words_by_category()
    pairs = tuple((w, c) for c, ws in lexicon.items() for w in ws)
    if not pairs:
        raise AuditorError("the lexicon is empty: no category to infer from")
    per_encoder = _LEXICON_EMBEDDINGS.setdefault(denoiser_of(pipe), {})
    if pairs not in per_encoder:
        per_encoder[pairs] = torch.stack([_word_vector(s) for s in encode_words(pipe, [w for w, _ in pairs])])
    table = per_encoder[pairs]
    q = _word_vector(encode_words(pipe, [word])[0]).to(table.device)
    sims = (table @ q).cpu()
    top = torch.topk(sims, min(neighbours, len(pairs))).indices.tolist()
    score: dict[str, float] = {}
    for i in top:
        score[pairs[i][1]] = score.get(pairs[i][1], 0.0) + float(sims[i])
    best = max(score, key=score.get)
    return CategoryGuess(word, best, True, tuple((pairs[i][0], pairs[i][1], round(float(sims[i]), 4)) for i in top))


def category_of(word: str, pipe=None, categories: Sequence[str] | None = None,
                lexicon: Mapping[str, Sequence[str]] | None = None) -> CategoryGuess:
    """A word's category: the lexicon's (object reading first, as in "an orange"), else inferred from ``pipe``.

    ``categories`` limits the answer to those a relevance matrix has."""
    key = lex.normalise(word)
    if lexicon is None:
        for role in ("object", "attribute", "style"):
            cat = lex.lookup(key, role)
            if cat != lex.UNKNOWN and (categories is None or cat in categories):
                return CategoryGuess(word, cat, False)
        lexicon = lex.words_by_category()
    for cat, ws in lexicon.items():
        if key in {lex.normalise(w) for w in ws} and (categories is None or cat in categories):
            return CategoryGuess(word, cat, False)
    if pipe is None:
        raise AuditorError(f"{word!r} is not in the lexicon and no model was given to infer its category")
    if categories is not None:
        lexicon = {c: ws for c, ws in lexicon.items() if c in categories}
    return infer_category(word, pipe, lexicon)
