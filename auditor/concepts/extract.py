"""The public verbs: ``extract``/``extract_many`` (prompts to ``Concepts``, parsed in spaCy batches, with suite
overrides and token indices) and ``resolve_tokenizer``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Mapping

from auditor import lexicon
from auditor import nlp as _nlp
from auditor.align import align_spans
from auditor.concepts.read import _read
from auditor.concepts.records import ROLE_ORDER, Concept, Concepts
from auditor.concepts.words import _matchers, _merge_glued, _merge_multiwords
from auditor.errors import AuditorError
from auditor.tokenizer import load_tokenizer


def _finish(prompt: str, items: list[dict], words: Mapping | None, tokenizer) -> Concepts:
    order = sorted(range(len(items)), key=lambda k: (items[k]["start"], ROLE_ORDER.index(items[k]["role"])))
    new_id = {k: n for n, k in enumerate(order)}
    overrides = {lexicon.normalise(w): o for w, o in (words or {}).items()}
    spans = [(items[k]["start"], items[k]["end"]) for k in order]
    aligned = align_spans(prompt, spans, tokenizer) if tokenizer is not None and spans else None
    out = []
    for n, k in enumerate(order):
        it = dict(items[k])
        it.pop("first")
        for ref in ("binds_to", "subject", "object"):
            if it.get(ref) is not None:
                it[ref] = new_id[it[ref]]
        ov = overrides.get(lexicon.normalise(it["text"])) or overrides.get(it["lemma"])
        if ov is not None and it["role"] not in ("relation", "position"):
            if _get(ov, "category"):
                it["category"], it["category_source"] = _get(ov, "category"), "override"
            if _get(ov, "count") is not None and it["role"] == "object":
                it["count"] = _get(ov, "count")
        if aligned is not None:
            it["token_indices"], it["truncated"] = aligned[n].indices, aligned[n].truncated
        out.append(Concept(id=n, **it))
    return Concepts(prompt, tuple(out))



def _get(override, name: str):
    return override.get(name) if isinstance(override, Mapping) else getattr(override, name, None)



def extract_many(prompts: Iterable, tokenizer=None, batch_size: int = 256) -> list[Concepts]:
    """Concepts of many prompts, parsed in batches. Items are strings or suite prompts (``.text`` and ``.words``,
    the per-word overrides). With a ``tokenizer`` (CLIP BPE, a T5 SentencePiece tokenizer, or the
    ``auditor.align.TextSequence`` a transformer reads: ``text_sequence(pipe)``), every concept gets its token
    indices."""
    nlp = _nlp.load()
    items = list(prompts)
    raw = [p if isinstance(p, str) else p.text for p in items]
    normalised = [_nlp.normalise_prompt(t) for t in raw]
    merge, markers = _matchers(nlp)
    out = []
    for item, text, (_, changes), doc in zip(items, raw, normalised,
                                            nlp.pipe([n for n, _ in normalised], batch_size=batch_size)):
        _merge_multiwords(doc, merge)
        _merge_glued(doc)
        words = None if isinstance(item, str) else getattr(item, "words", None)
        cs = _finish(doc.text, _read(doc, markers), words, tokenizer)
        if changes:
            cs = Concepts(cs.prompt, cs.items, original=text, changes=changes)
        out.append(cs)
    return out



def extract(prompt: str, tokenizer=None, words: Mapping | None = None) -> Concepts:
    """Concepts of one prompt; ``words`` are per-word overrides ({word: {category, count}})."""
    if words:
        return extract_many([SimpleNamespace(text=prompt, words=words)], tokenizer)[0]
    return extract_many([prompt], tokenizer)[0]



def resolve_tokenizer(spec: str):
    """A tokenizer for token indices: "clip" (the standard CLIP BPE, shipped), "none", or a local folder with
    tokenizer files (a checkpoint's ``tokenizer/``). Nothing is downloaded."""
    if spec.lower() == "none":
        return None
    if spec.lower() == "clip":
        tok = load_tokenizer()
        # Alignment encodes prompts untruncated on purpose (to report what falls past 77 tokens); mark
        # transformers' one-time "sequence length is longer than the maximum" warning as already given.
        tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        return tok
    path = Path(spec)
    if not path.is_dir():
        raise AuditorError(f"tokenizer: expected 'clip', 'none' or a folder with tokenizer files, got {spec!r}",
                           "tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AuditorError(f"tokenizer: cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}",
                           "tokenizer") from None
