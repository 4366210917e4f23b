"""The category of a word, for the category response and selective maps: the lexicon's, else inferred in the model's
own text space (the nearest lexicon words vote). Also how words are encoded the way the UNet's cross-attention reads
them, which head-relevance calibration shares."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from auditor import lexicon as lex
from auditor.errors import AuditorError
from auditor.engine.heads import denoiser_of


@torch.no_grad()
def encode_words(pipe, words: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Each word's token states [n_tokens, D] in the space the UNet's cross-attention reads (``encode_prompt``)."""
    device = denoiser_of(pipe).device
    out: list[torch.Tensor] = []
    for i in range(0, len(words), batch_size):
        chunk = list(words[i:i + batch_size])
        emb = pipe.encode_prompt(prompt=chunk, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
        for j, w in enumerate(chunk):
            n = len(pipe.tokenizer(w, add_special_tokens=False)["input_ids"])
            n = max(1, min(n, emb.shape[1] - 2))
            out.append(emb[j, 1:1 + n].clone())  # position 0 is the start token
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
