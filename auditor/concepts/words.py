"""From a parsed prompt to words and runs: multiword and glued words merged into one token, each token's lexicon
readings (object, attribute, style, count, marker), and the nominal runs ("determiner/number + modifiers + head
noun") the concepts are read from (``auditor.concepts.read``)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from auditor import lexicon

_NOUNS = ("NOUN", "PROPN")
_LINKS = ("and", "or", ",", "&")


# --- spaCy side: matchers built once per pipeline ------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _matchers(nlp):
    """(merge matcher for multiword nouns/modifiers/styles, marker matcher for relation/position/style phrases)."""
    from spacy.matcher import PhraseMatcher

    merge = PhraseMatcher(nlp.vocab, attr="LOWER")
    for label, role in (("object", "object"), ("attribute", "attribute"), ("style", "style")):
        phrases = [p for p in lexicon.entries(role) if " " in p or "-" in p]
        if role != "attribute":  # "fire hydrants", "oil paintings"
            phrases += [_plural(p) for p in phrases]
        merge.add(label, [nlp.make_doc(p) for p in phrases])
    markers = PhraseMatcher(nlp.vocab, attr="LOWER")
    markers.add("relation", [nlp.make_doc(p) for p in lexicon.entries("relation")])
    markers.add("position", [nlp.make_doc(p) for p in lexicon.entries("position")])
    markers.add("style_marker", [nlp.make_doc(p) for p in lexicon.markers("style_markers")])
    return merge, markers



def _plural(phrase: str) -> str:
    return phrase + ("es" if phrase.endswith(("s", "x", "ch", "sh")) else "s")



def _merge_multiwords(doc, merge) -> None:
    from spacy.util import filter_spans

    spans = []
    for label_id, s, e in merge(doc):
        span = doc[s:e]
        span.label_ = doc.vocab.strings[label_id]
        spans.append(span)
    with doc.retokenize() as rt:
        for span in filter_spans(spans):
            entries = _entry_set(span.label_)
            text = lexicon.normalise(span.text)
            base = text if text in entries else next((text[:-n] for n in (2, 1) if text[:-n] in entries), text)
            if span.label_ == "attribute":
                attrs = {"LEMMA": base, "POS": "ADJ", "TAG": "JJ"}
            else:
                attrs = {"LEMMA": base, "POS": "NOUN", "TAG": "NN" if base == text else "NNS"}
            rt.merge(span, attrs=attrs)



def _merge_glued(doc) -> None:
    """Merge what the tokenizer splits but a reader sees as one word: hyphenated compounds the lexicon does not
    list ("close-up" stays a shot, not the verb "close"; "black-and-white" one colour, not two) and a numeral
    with its unit ("35mm", "85 mm": a lens, not 35 of something)."""
    units = set(lexicon.markers("units"))
    spans = []
    i = 0
    while i < len(doc):
        t = doc[i]
        if t.like_num and i + 1 < len(doc) and doc[i + 1].lower_ in units:
            e = i + 2
            if e < len(doc) and doc[e].lower_ in lexicon.markers("camera_words"):
                e += 1  # "85mm lens", "35mm film": the camera's, never a thing in the picture
            spans.append((i, e, "unit"))
            i = e
            continue
        j = i
        # A chain of word pieces joined by hyphens with no space anywhere: "black-and-white", "3-year-old".
        while (j + 2 < len(doc) and doc[j + 1].text == "-" and not doc[j].whitespace_
               and not doc[j + 1].whitespace_ and doc[j].text[-1:].isalnum() and doc[j + 2].text[:1].isalnum()):
            j += 2
        if j > i:
            spans.append((i, j + 1, "hyphen"))
            i = j + 1
            continue
        i += 1
    if not spans:
        return
    with doc.retokenize() as rt:
        for s, e, kind in spans:
            span = doc[s:e]
            text = lexicon.normalise(span.text)
            nxt = doc[e] if e < len(doc) else None
            if kind == "unit":
                attrs = {"LEMMA": text, "POS": "ADJ", "TAG": "JJ"}
            elif _lookup_any(text, ("object", "style")) or (
                not _lookup_any(text, ("attribute",)) and (nxt is None or nxt.pos_ not in _NOUNS)
            ):
                attrs = {"LEMMA": text, "POS": "NOUN", "TAG": "NN"}  # "a close-up", "a t-shirt"
            else:
                attrs = {"LEMMA": text, "POS": "ADJ", "TAG": "JJ"}  # "red-haired woman", "black-and-white photo"
            rt.merge(span, attrs=attrs)



def _lookup_any(text: str, roles: tuple[str, ...]) -> bool:
    return any(lexicon.lookup(text, r, strict=True) != lexicon.UNKNOWN for r in roles)



@functools.lru_cache(maxsize=None)
def _entry_set(role: str) -> frozenset[str]:
    return frozenset(lexicon.entries(role))


# --- word classes --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _style_categories() -> frozenset[str]:
    return frozenset(c.name for c in lexicon.categories() if c.role == "style")



def _forms(t, noun: bool) -> list[str]:
    """Spellings to look a token up under: surface, lemma, and naive de-inflections (the lemmatizer follows the
    tagger, so a mis-tagged word gets a wrong lemma: "riding" -> "rid")."""
    low = t.lower_
    forms = [low]
    if noun:
        if t.pos_ in _NOUNS or t.pos_ == "ADJ":
            forms.append(t.lemma_.lower())  # irregular plurals: "people", "mice"
        if low.endswith("ies"):
            forms.append(low[:-3] + "y")
        if low.endswith("ves"):  # "leaves", "shelves", "knives"
            forms += [low[:-3] + "f", low[:-3] + "fe"]
        if low.endswith("es"):
            forms.append(low[:-2])
        if low.endswith("s"):
            forms.append(low[:-1])
    else:
        forms.append(t.lemma_.lower())
        for suffix in ("ing", "ed"):
            if low.endswith(suffix) and len(low) > len(suffix) + 2:
                stem = low[: -len(suffix)]
                forms += [stem, stem + "e"] + ([stem[:-1]] if stem[-1] == stem[-2] else [])
    return forms



@dataclass
class _Tok:
    """One token with its lexicon readings: (lemma, category) or None for each."""

    t: object
    obj: tuple[str, str] | None = None
    attr: tuple[str, str] | None = None
    style: tuple[str, str] | None = None
    count: tuple[str, int | None] | None = None
    marker: str | None = None  # relation | position | style_marker
    preposition: bool = False  # a one-word relation ("on", "in", "with"), which never names a worn garment or a time
    verb: bool = False  # an -ing word tagged as a noun that is the verb of the noun before it ("grey hair knitting")

    @property
    def det(self) -> bool:
        return self.t.pos_ == "DET" or self.t.tag_ == "PRP$"

    @property
    def modifier(self) -> bool:
        """Can modify a noun: adjectives, attribute words, participles ("striped", "sleeping")."""
        t = self.t
        return bool(self.attr) or t.pos_ == "ADJ" or (t.tag_ in ("VBN", "VBG") and t.dep_ in ("amod", "compound"))

    @property
    def transparent(self) -> bool:
        """Inside a run but never a concept: hyphens, adverbs on adjectives ("very big")."""
        t = self.t
        return t.tag_ == "HYPH" or (t.pos_ == "ADV" and t.dep_ == "advmod" and t.head.pos_ in ("ADJ", "VERB", "NOUN"))



def _lex(t, role: str, noun: bool, style: bool = False) -> tuple[str, str] | None:
    """(form, category) of the first spelling the lexicon knows in ``role``; style words only when ``style``."""
    styles = _style_categories()
    for form in _forms(t, noun):
        cat = lexicon.lookup(form, role, strict=True)
        if cat != lexicon.UNKNOWN and (cat in styles) == style:
            return form, cat
    return None



def _classify(doc, markers) -> list[_Tok]:
    from spacy.util import filter_spans

    toks = []
    for t in doc:
        x = _Tok(t)
        x.obj = _lex(t, "object", True)
        x.attr = _lex(t, "attribute", False)
        x.style = _lex(t, "object", True, style=True) if t.pos_ != "VERB" else None
        kind = _numeral_kind(t) if not (x.obj or x.attr or x.style) else None
        if kind == "count":
            x.count = (t.text, int(t.text))
        elif kind == "era":
            x.attr = (t.lower_, "age")
        elif kind == "format":
            x.style = (t.lower_, "style")
        elif lexicon.lookup(t.lower_, "count") != lexicon.UNKNOWN:
            x.count = (t.lower_, lexicon.count_value(t.lower_))
        toks.append(x)
    found = []
    for label_id, s, e in markers(doc):
        span = doc[s:e]
        span.label_ = doc.vocab.strings[label_id]
        found.append(span)
    for span in filter_spans(found):
        for i in range(span.start, span.end):
            toks[i].marker = span.label_
    for i, x in enumerate(toks):
        x.verb = _gerund_after_noun(toks, i)
    preps = set(lexicon.markers("prepositions"))
    for x in toks:  # "on", "in", "under", "with": only where no longer phrase ("on the left", "in front of") took it
        if x.marker is None and x.t.lower_ in preps and x.t.pos_ in ("ADP", "SCONJ"):
            x.marker, x.preposition = "relation", True
    return toks


def _gerund_after_noun(toks: list[_Tok], i: int) -> bool:
    """An -ing word the tagger made a noun compounded with the lexicon noun before it, where a reader sees that
    noun's owner doing something: "a woman with grey hair knitting by the fireplace". Only when the word is no
    lexicon word and ends its phrase (a preposition, a comma, "and" or the end follows), so "a shopping bag" and
    "a swimming pool" stay nouns."""
    x = toks[i]
    t = x.t
    if t.tag_ != "NN" or not t.lower_.endswith("ing") or len(t.lower_) < 6 or i == 0:
        return False
    if x.obj or x.attr or x.style or x.count or x.marker:
        return False
    prev = toks[i - 1]
    if not prev.obj or prev.t.pos_ not in _NOUNS or prev.style:
        return False
    nxt = t.doc[i + 1] if i + 1 < len(t.doc) else None
    return nxt is None or nxt.pos_ in ("ADP", "PUNCT", "CCONJ", "SCONJ")



_ERA = re.compile(r"^(\d{2}|')?\d0'?s$|^\d+-(year|month|week|day)s?-old$")


def _numeral_kind(t) -> str | None:
    """What a word with digits is: "count" (a plain number of things: "3 bikes"), "era" (a decade, a year, an
    age: "1920s", "a 1920 car", "3-year-old"), "format" (a medium or camera setting: "35mm", "4k", "1080p",
    "f/1.8"), or None for a word without digits. Only a plain number is a count."""
    text = t.lower_
    if not any(ch.isdigit() for ch in text):
        return None
    if text.isdigit():
        after = t.doc[t.i + 1] if t.i + 1 < len(t.doc) else None
        year = len(text) == 4 and 1000 <= int(text) <= 2100 and not (after is not None and after.tag_ == "NNS")
        return "era" if year else "count"
    return "era" if _ERA.match(text) else "format"



def _nominal(x: _Tok, prev: _Tok | None) -> bool:
    """May this token stand in a nominal run?"""
    t = x.t
    if x.marker or x.verb:
        return False
    if x.det or x.count or x.style or x.transparent or t.pos_ in ("NUM", "ADJ") or t.pos_ in _NOUNS:
        return True
    if t.pos_ in ("VERB", "AUX"):
        if t.dep_ in ("amod", "compound", "nmod") or (x.attr and x.attr[1] != "action"):
            return True
        # A noun tagged as a verb ("a green cross", "autumn leaves"): a noun when a determiner, a modifier or a
        # noun precedes it; after a noun, not an -ing form, which is the noun's verb ("two kids building a fort").
        return bool(x.obj) and prev is not None and (
            prev.det or prev.count or prev.modifier or (prev.t.pos_ in _NOUNS and t.tag_ != "VBG"))
    return bool(x.obj or x.attr)



def _noun_capable(x: _Tok) -> bool:
    if x.obj or x.style:
        return True
    return x.t.pos_ in _NOUNS and not x.attr and not (x.count and x.count[1] is not None)



def _runs(toks: list[_Tok]) -> list[list[int]]:
    """Maximal nominal runs. "and"/"," continue a run only between two modifiers ("a red and blue car")."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for i, x in enumerate(toks):
        if x.t.lower_ in _LINKS and cur and not x.marker:
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            last = next((toks[j] for j in reversed(cur) if not toks[j].transparent), None)
            between_modifiers = last and nxt and last.modifier and nxt.modifier and not nxt.det
            if between_modifiers and (last.attr or not _noun_capable(last)):
                cur.append(i)
                continue
        if _nominal(x, toks[cur[-1]] if cur else None):
            cur.append(i)
            continue
        if cur:
            runs.append(cur)
        cur = []
    if cur:
        runs.append(cur)
    return [part for run in runs for part in _split_at_style_heads(toks, run)]



def _split_at_style_heads(toks: list[_Tok], run: list[int]) -> list[list[int]]:
    """"anime style portrait" -> "anime style" + "portrait": a style head ends its own run."""
    heads = lexicon.markers("style_heads")
    parts, cur = [], []
    for i in run:
        cur.append(i)
        if toks[i].t.lemma_.lower() in heads and i != run[-1]:
            parts.append(cur)
            cur = []
    return parts + ([cur] if cur else [])
