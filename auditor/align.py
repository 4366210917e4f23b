"""Token <-> word alignment: the one place that maps character spans of a prompt to a tokenizer's indices.

Indices are positions in the tokenizer's full encoded sequence (so index 0 is the start token for CLIP).
Words are located by character offsets, so a repeated word maps to its own occurrence and a word split into
several BPE pieces maps to all of them; a SentencePiece (T5) word owns its pieces from the one marked ``▁`` (a
lone ``▁`` piece's offsets point at the word it starts). Pieces past ``max_length`` are reported as truncated.

A transformer pipeline's denoiser reads a text sequence that is not one tokenizer's: ``TextSequence`` describes it
as segments (``text_sequence(pipe)``). SD3 reads 77 CLIP columns (CLIP-L and CLIP-G side by side, one column per
CLIP token) followed by the T5 tokens; Flux reads the T5 tokens only (CLIP gives it just a pooled vector); PixArt
reads T5. A word owns its columns in every segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


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


@dataclass(frozen=True)
class Segment:
    """Columns ``[offset, offset + length)`` of a denoiser's text sequence: ``tokenizer``'s encoding of the prompt,
    truncated to ``length`` tokens (its end token included) and padded."""

    tokenizer: object
    offset: int
    length: int


@dataclass(frozen=True)
class TextSequence:
    """The text sequence a transformer reads, as the segments of its text encoders (see the module docstring).

    It stands in for a tokenizer wherever words meet tokens (``align_spans``, ``word_indices``, the concept
    extractor's ``tokenizer=``): indices are columns of the whole sequence."""

    segments: tuple[Segment, ...]

    @property
    def model_max_length(self) -> int:
        return max(s.offset + s.length for s in self.segments)


def text_sequence(pipe, t5_length: int | None = None):
    """What ``pipe``'s denoiser reads, for aligning words: the tokenizer itself for a UNet pipeline, else a
    ``TextSequence``.

    Args:
        pipe: a diffusers text-to-image pipeline.
        t5_length: the T5 tokens the call used (``max_sequence_length``); default: ``text_length(pipe)``.

    Returns:
        A tokenizer (UNet pipelines) or a ``TextSequence`` (PixArt, SD3, Flux).
    """
    name = type(pipe).__name__
    if getattr(pipe, "transformer", None) is None:
        return pipe.tokenizer
    if t5_length is None:
        t5_length = text_length(pipe)
    if name.startswith("StableDiffusion3"):
        clip = int(getattr(pipe, "tokenizer_max_length", 77) or 77)
        segs = [Segment(pipe.tokenizer, 0, clip)]
        if getattr(pipe, "text_encoder_3", None) is not None:
            segs.append(Segment(pipe.tokenizer_3, clip, int(t5_length)))
        return TextSequence(tuple(segs))
    if name.startswith("Flux"):
        return TextSequence((Segment(pipe.tokenizer_2, 0, int(t5_length)),))
    return TextSequence((Segment(pipe.tokenizer, 0, int(t5_length)),))


def _sequence_tokenizer(pipe):
    """The tokenizer of the long text segment of a transformer pipeline: SD3's T5, Flux's T5, PixArt's only one."""
    name = type(pipe).__name__
    if name.startswith("StableDiffusion3"):
        return getattr(pipe, "tokenizer_3", None)
    attr = "tokenizer_2" if name.startswith("Flux") else "tokenizer"
    return getattr(pipe, attr, None)


def text_length(pipe) -> int:
    """The tokens of a transformer pipeline's long text segment (``max_sequence_length``) that the audit uses: the
    pipeline call's default, but never more than its tokenizer declares it reads (a text encoder with fewer
    positions than the call's default, as the bundled shapes-dit's CLIP encoder has, would fail on the default).

    Every call the audit makes (generation, encoding words, reading images) passes this length, and alignment uses
    it, so token columns mean the same everywhere."""
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    length = int(param.default) if param is not None and isinstance(param.default, int) else 512
    tok = _sequence_tokenizer(pipe)
    declared = getattr(tok, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < min(length, 100_000):
        length = declared
    return length


def _align_sequence(prompt: str, spans: Sequence[tuple[int, int]], seq: TextSequence) -> list[SpanTokens]:
    """Per span, its columns in every segment; truncated only when some segment cuts it and no segment holds all
    of it (a word the T5 segment reads whole still reaches the model)."""
    per_segment = [align_spans(prompt, list(spans), s.tokenizer, s.length) for s in seq.segments]
    out = []
    for i, (a, b) in enumerate(spans):
        found = [(seg, part[i]) for seg, part in zip(seq.segments, per_segment)]
        kept = tuple(seg.offset + j for seg, st in found for j in st.indices)
        whole = any(not st.truncated and st.indices for _, st in found)
        out.append(SpanTokens(a, b, kept, truncated=any(st.truncated for _, st in found) and not whole))
    return out


def align_spans(prompt: str, spans: list[tuple[int, int]], tokenizer, max_length: int | None = None) -> list[SpanTokens]:
    """Token indices of each character span; a token belongs to a span when their characters overlap.

    Args:
        prompt: the text.
        spans: character ranges ``[start, end)`` of ``prompt``.
        tokenizer: a tokenizer, or a ``TextSequence`` (indices are then columns of the whole sequence).
        max_length: the tokens the model reads (default: the tokenizer's ``model_max_length``).

    Returns:
        One ``SpanTokens`` per span.
    """
    if isinstance(tokenizer, TextSequence):
        return _align_sequence(prompt, spans, tokenizer)
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
