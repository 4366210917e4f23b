"""Token <-> word alignment: the one place that maps character spans of a prompt to a tokenizer's indices.

Indices are positions in the tokenizer's full encoded sequence (so index 0 is the start token for CLIP).
Words are located by character offsets, so a repeated word maps to its own occurrence and a word split into
several BPE pieces maps to all of them. Pieces past ``max_length`` are reported as truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SpanTokens:
    """Token indices of one character span ``[start, end)`` of a prompt."""

    start: int
    end: int
    indices: tuple[int, ...] = field(default_factory=tuple)  # kept indices (< max_length)
    truncated: bool = False  # some or all pieces fall past the model's max length


def _offsets(prompt: str, tokenizer) -> list[tuple[int, int]]:
    """Character offsets of every token of the untruncated encoding (specials get (0, 0))."""
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, truncation=False, add_special_tokens=True)
        return [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        pass
    # Slow tokenizers have no offsets: CLIP-style BPE never merges across whitespace or punctuation
    # boundaries, so the tokens of prompt[:i] are a prefix of the tokens of the prompt.
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"]
    offs: list[tuple[int, int]] = [(0, 0)] * len(ids)
    n_start = 1 if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else 0
    prev_n, prev_i = n_start, 0
    for i in range(1, len(prompt) + 1):
        if i < len(prompt) and not prompt[i].isspace() and prompt[i - 1].isalnum() == prompt[i].isalnum():
            continue
        n = len(tokenizer(prompt[:i], add_special_tokens=False)["input_ids"]) + n_start
        for j in range(prev_n, min(n, len(offs))):
            offs[j] = (prev_i, i)
        if n > prev_n:
            prev_n, prev_i = n, i
        elif prompt[i - 1].isspace():
            prev_i = i
    return offs


def align_spans(prompt: str, spans: list[tuple[int, int]], tokenizer, max_length: int | None = None) -> list[SpanTokens]:
    """Token indices of each character span; a token belongs to a span when their characters overlap."""
    max_length = max_length or getattr(tokenizer, "model_max_length", 77)
    if max_length is None or max_length > 100_000:
        max_length = 77
    offs = _offsets(prompt, tokenizer)
    # The end token must fit too, so content tokens at index >= max_length - 1 are cut by the pipeline.
    limit = max_length - 1
    out = []
    for s, e in spans:
        hit = [i for i, (a, b) in enumerate(offs) if b > a and a < e and b > s]
        kept = tuple(i for i in hit if i < limit)
        out.append(SpanTokens(s, e, kept, truncated=len(kept) < len(hit)))
    return out


def word_indices(prompt: str, word: str, tokenizer, occurrence: int = 0) -> SpanTokens:
    """Token indices of the ``occurrence``-th appearance of ``word`` (whole-word match, case-insensitive)."""
    import re

    matches = [m for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)]
    if len(matches) <= occurrence:
        raise KeyError(f"word {word!r} does not occur {occurrence + 1} time(s) in the prompt {prompt!r}")
    m = matches[occurrence]
    return align_spans(prompt, [(m.start(), m.end())], tokenizer)[0]


def token_strings(prompt: str, tokenizer) -> list[str]:
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids)
