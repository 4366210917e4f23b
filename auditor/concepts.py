"""Concept extraction: a prompt -> typed concepts with lexicon categories, bindings and token indices.

Roles: object, attribute (with ``binds_to`` its object), count (``value``, binds to its object), relation
(``subject`` and ``object``), position ("on the left", binds to its object), style ("oil painting",
"in the style of van gogh") and background ("on a white background": an object of its own, never a shape).

How a parsed prompt is read (spaCy's small model parses it; the lexicon repairs what it gets wrong):
0. the prompt is normalised first (``auditor.nlp.normalise_prompt``: NFKC, invisible format characters removed);
   when that changes it, ``Concepts.original`` and ``Concepts.changes`` say so and spans index the normalised text;
1. multiword lexicon entries ("fire hydrant", "oil painting") are merged into one token, and so are hyphenated
   compounds ("close-up", "black-and-white") and numerals with their unit ("35mm", "85 mm lens"); a word with
   digits counts only when it is a plain number ("3 cats"), not a format ("4k"), a decade or a year ("1920s");
2. marker phrases are found: relations ("to the left of"), positions ("on the left"), style markers, and one-word
   prepositions ("on", "in", "by", "with") where no longer phrase took the word;
3. the remaining words are cut into nominal runs, "determiner/number + modifiers + head noun". Word classes come
   from spaCy's tags, repaired by the lexicon: the small model tags colour words as proper nouns ("cyan cross"),
   shape nouns as verbs or adjectives ("a green cross", "a pink square"), and "orange" either way. A run's head is
   its last word that can be a noun, so "an orange star" is a star coloured orange and "an orange" is the fruit;
4. modifiers with no head ("the car is red", "a car that is not red") bind through the dependency tree; a verb of
   action the parse hangs on a garment, a body part or an absent object describes who wears, has or lacks it ("a
   chef in a white apron cooking", "a knight with a long beard wearing armor", "a man without shoes walking");
5. relations, positions, styles and negation attach to the runs around them. A relation places the one doing
   the verb before it ("a man holding an umbrella in the rain"), else the nearest object before it that is present
   and is not a garment, body part or accessory of the noun before ("a woman in a red dress on a beach"); each of
   coordinated subjects and objects gets it ("a cat and a dog on a sofa"). A garment worn ("in a red dress"), a
   time ("at night") or an absent object ("no cars") is in no relation. Suite overrides are applied; token
   indices come from ``auditor.align`` (words past the 77-token limit are kept, marked ``truncated``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

from auditor import lexicon
from auditor.align import align_spans

ROLE_ORDER = ("object", "background", "attribute", "count", "position", "relation", "style")
VISIBLE_ROLES = ("object", "background", "attribute", "style")  # roles whose words name something visible: mapped
_NOUNS = ("NOUN", "PROPN")
_LINKS = ("and", "or", ",", "&")
_SINGULAR_DETS = ("a", "an", "one", "the", "this", "that", "each", "every")
_ARGUMENTS = ("pobj", "dobj", "nsubj", "nsubjpass", "conj", "appos", "ROOT")  # noun slots, not modifier slots


@dataclass(frozen=True)
class Concept:
    id: int
    text: str
    lemma: str
    role: str  # one of ROLE_ORDER
    category: str  # a lexicon category, or "unknown"
    category_source: str  # "lexicon" | "override" | "unknown"
    start: int  # character span [start, end) in the prompt
    end: int
    negated: bool = False
    binds_to: int | None = None  # attribute / count / position: id of the object it describes
    count: int | None = None  # object: expected number; None when unspecified ("cats") or mass ("lavender")
    plural: bool = False  # object: named in the plural
    value: int | None = None  # count: the number; None for "several", "many"
    subject: int | None = None  # relation: id of the object placed
    object: int | None = None  # relation: id of the reference object
    token_indices: tuple[int, ...] = ()
    truncated: bool = False

    def to_json(self, concepts: "Concepts") -> dict:
        keep = {"id", "text", "lemma", "role", "category", "category_source", "start", "end", "negated",
                "token_indices", "truncated"}
        keep |= {"object": {"count", "plural"}, "background": set(), "style": set(), "count": {"binds_to", "value"},
                 "attribute": {"binds_to"}, "position": {"binds_to"}, "relation": {"subject", "object"}}[self.role]
        out = {}
        for k, v in asdict(self).items():
            if k not in keep:
                continue
            out[k] = list(v) if k == "token_indices" else v
            if k in ("binds_to", "subject", "object"):  # the referenced concept's text, for people reading JSON
                out[f"{k}_text"] = concepts.items[v].text if v is not None else None
        return out


@dataclass(frozen=True)
class Concepts:
    prompt: str  # the prompt as parsed (see ``auditor.nlp.normalise_prompt``); spans index this text
    items: tuple[Concept, ...] = field(default_factory=tuple)
    original: str | None = None  # the prompt as given, when normalisation changed it
    changes: tuple[str, ...] = ()  # what normalisation changed, one line per kind

    def role(self, *roles: str) -> list[Concept]:
        return [c for c in self.items if c.role in roles]

    @property
    def objects(self) -> list[Concept]:
        return self.role("object")

    @property
    def attributes(self) -> list[Concept]:
        return self.role("attribute")

    def refuse_if_truncated(self, where: str, tokenizer) -> None:
        """The one check for a prompt too long for the text encoder: a concept past its context would be scored on
        attention the model never computed, so it is refused with a one-line error naming ``where`` and the word."""
        word = next((c.text for c in self.items if c.truncated), None)
        if word is not None:
            from auditor.errors import AuditorError

            raise AuditorError(f"{where} is too long for the model's text encoder ('{word}' falls past token "
                               f"{getattr(tokenizer, 'model_max_length', '?')})")

    def bound_to(self, obj: Concept) -> list[Concept]:
        """Attributes, counts and positions describing ``obj``."""
        return [c for c in self.items if c.binds_to == obj.id]

    def find(self, text: str, role: str | None = None) -> Concept:
        """The first concept with this text (case-insensitive), optionally of one role."""
        for c in self.items:
            if c.text.lower() == text.lower() and (role is None or c.role == role):
                return c
        raise KeyError(f"no concept {text!r} in {self.prompt!r}")

    def to_json(self) -> dict:
        out = {"prompt": self.prompt}
        if self.original is not None:  # only then, so that unchanged prompts keep their JSON as it was
            out["original_prompt"] = self.original
            out["normalisation"] = list(self.changes)
        out["concepts"] = [c.to_json(self) for c in self.items]
        return out

    def to_text(self) -> str:
        """A table for people: one concept a line."""
        rows = [("id", "text", "role", "category", "describes", "tokens")]
        for c in self.items:
            if c.role == "relation":
                link = f"{self._text(c.subject)} -> {self._text(c.object)}"
            elif c.binds_to is not None:
                link = f"-> {self._text(c.binds_to)}"
            else:
                link = f"count={c.count}" if c.role == "object" and c.count is not None else ""
            if c.role == "count":
                link = f"={c.value if c.value is not None else 'many'} {link}"
            cat = c.category + ("*" if c.category_source == "override" else "")
            toks = ",".join(map(str, c.token_indices)) + (" (truncated)" if c.truncated else "")
            role = c.role + (" (negated)" if c.negated else "")
            rows.append((str(c.id), c.text, role, cat, link, toks))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        table = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
        if self.original is not None:
            table += f"\nprompt normalised to {self.prompt!r}: " + "; ".join(self.changes)
        return table

    def _text(self, cid: int | None) -> str:
        return self.items[cid].text if cid is not None else "?"


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
    preps = set(lexicon.markers("prepositions"))
    for x in toks:  # "on", "in", "under", "with": only where no longer phrase ("on the left", "in front of") took it
        if x.marker is None and x.t.lower_ in preps and x.t.pos_ in ("ADP", "SCONJ"):
            x.marker, x.preposition = "relation", True
    return toks


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
    if x.marker:
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


# --- building concepts ----------------------------------------------------------------------------------------


class _Builder:
    """Collects concepts with temporary keys; ids are assigned in prompt order at the end."""

    def __init__(self, doc, toks: list[_Tok]):
        self.doc, self.toks = doc, toks
        self.items: list[dict] = []
        self.token_owner: dict[int, int] = {}  # token index -> key of the object/background/style of its run
        self.run_head: dict[int, int] = {}  # first token index of a run -> key of its head concept
        self.worn: set[int] = set()  # keys of garments and body parts someone wears or has: never a relation's subject
        self.accessories: set[int] = set()  # keys of objects after "with" or a container's "of": the same
        self.owner: dict[int, int] = {}  # garment, body part or absent object key -> key of who wears, has or lacks it
        self.head_tok: dict[int, int] = {}  # object key -> token index of its head noun
        self.runs: list[list[int]] = []

    def add(self, role: str, start_tok: int, end_tok: int, lemma: str, category: str | None, **kw) -> int:
        span = self.doc[start_tok:end_tok]
        cat = category or lexicon.UNKNOWN
        item = dict(role=role, text=span.text, lemma=lemma, category=cat,
                    category_source="unknown" if cat == lexicon.UNKNOWN else "lexicon",
                    start=span.start_char, end=span.end_char, first=start_tok, **kw)
        self.items.append(item)
        return len(self.items) - 1

    def nearest_object(self, tok: int, before: bool = True, present: bool = False) -> int | None:
        """Key of the nearest object (role object) ending before token ``tok`` (or starting after it); only objects
        that are not negated when ``present``."""
        objs = [(k, it) for k, it in enumerate(self.items)
                if it["role"] == "object" and not (present and it["negated"])]
        if before:
            cands = [(it["first"], k) for k, it in objs if it["first"] < tok]
            return max(cands)[1] if cands else None
        cands = [(it["first"], k) for k, it in objs if it["first"] > tok]
        return min(cands)[1] if cands else None


def _read_run(b: _Builder, run: list[int], pending_count: dict | None) -> dict | None:
    """Concepts of one run. Returns a pending count for the next run ("a pair of" shoes), or None."""
    toks, doc = b.toks, b.doc
    body = [i for i in run if not toks[i].transparent and toks[i].t.lower_ not in _LINKS]
    dets = [i for i in body if toks[i].det and not toks[i].count]
    head = _head(toks, body, dets)
    negated = any(toks[i].t.lower_ in lexicon.markers("negation") for i in dets)
    x = toks[head] if head is not None else None
    after = run[-1] + 1
    if x and x.count and after + 1 < len(doc) and doc[after].lower_ == "of" and not toks[after].marker:
        return {"tok": head, "value": x.count[1], "lemma": x.count[0], "negated": negated, "run": run[0]}
    start = head
    while head is not None and start - 1 in body and toks[start - 1].t.pos_ in _NOUNS and not (
        toks[start - 1].attr or toks[start - 1].style or toks[start - 1].count or toks[start - 1].det
    ):
        start -= 1  # compounds kept whole: "coffee cup", "Eiffel tower" (lexicon ones are merged already)
    mods = [i for i in body if (head is None or i < start or i > head) and i not in dets]
    head_lemma = x.t.lemma_.lower() if x else ""
    key = target = None
    if x is None:
        pass
    elif head_lemma in lexicon.markers("carriers") and mods:
        target = b.nearest_object(run[0])  # "a vase in lavender color": lavender describes the vase
    elif head_lemma in lexicon.markers("style_heads") and head - 1 in mods and (
        not toks[head - 1].attr or toks[head - 1].attr[1] == "age"  # "1920s style", "vintage style"
    ):
        s = head - 1  # "anime style", "a cyberpunk style": the words right before the head name the style
        while s - 1 in mods and not (toks[s - 1].attr or toks[s - 1].count):
            s -= 1
        text = lexicon.normalise(doc[s:head].text)
        cat = lexicon.lookup(text, "style")
        b.add("style", s, head + 1, text, cat if cat != lexicon.UNKNOWN else "style", negated=negated)
        mods = [i for i in mods if i < s]
    else:
        nums = [toks[i].count[1] for i in mods if toks[i].count]
        count = nums[0] if nums else pending_count["value"] if pending_count else None
        article = any(toks[i].t.lower_ in _SINGULAR_DETS for i in dets)
        key = target = _add_head(b, start, head, count, article and not pending_count, negated)
        b.head_tok[key] = head
        for i in run:
            b.token_owner[i] = key
    b.run_head[run[0]] = key if key is not None else -1
    if pending_count:
        b.run_head[pending_count["run"]] = b.run_head[run[0]]  # "next to a pair of shoes" relates to the shoes
        b.add("count", pending_count["tok"], pending_count["tok"] + 1, pending_count["lemma"], "count",
              value=pending_count["value"], binds_to=target, negated=pending_count["negated"] or negated)
    for i in mods:
        m = toks[i]
        if m.count:
            b.add("count", i, i + 1, m.count[0], "count", value=m.count[1], binds_to=target, negated=negated)
        elif m.style:
            b.add("style", i, i + 1, m.style[0], m.style[1], negated=negated)
        else:
            lemma = m.attr[0] if m.attr else m.t.lemma_.lower()
            cat = m.attr[1] if m.attr else lexicon.lookup(lemma, "attribute")
            b.add("attribute", i, i + 1, lemma, cat, binds_to=target, negated=negated, headless=target is None)
    return None


def _head(toks: list[_Tok], body: list[int], dets: list[int]) -> int | None:
    """The run's head: its last word that can be a noun. Failing that, an attribute word standing where a noun
    stands ("a stone", "strawberries with cream")."""
    heads = [i for i in body if _noun_capable(toks[i])]
    if heads:
        return heads[-1]
    last = toks[body[-1]].t if body else None
    if last is not None and last.pos_ in _NOUNS and last.dep_ not in ("compound", "amod", "nmod") and (
        dets or last.dep_ in _ARGUMENTS
    ):
        return body[-1]
    return None


def _add_head(b: _Builder, start: int, head: int, count: int | None, article: bool, negated: bool) -> int:
    """The run's head concept: an object, the background, or a style named as a noun ("an oil painting")."""
    x = b.toks[head]
    lemma, cat = _object_reading(b.doc, b.toks, start, head)
    role = "style" if cat in _style_categories() else "background" if cat == "background" else "object"
    if role != "object":
        return b.add(role, start, head + 1, lemma, cat, negated=negated)
    # Plural by the tag, or by the lexicon matching a singular form of a mis-tagged word ("crosses"/VERB).
    plural = x.t.tag_ in ("NNS", "NNPS") or (x.obj is not None and x.obj[0] != x.t.lower_ and x.t.pos_ != "ADJ")
    if count is None and article and not plural:
        count = 1
    return b.add("object", start, head + 1, lemma, cat, negated=negated, count=count,
                 plural=plural or bool(count and count > 1))


def _object_reading(doc, toks, start: int, head: int) -> tuple[str, str]:
    """(lemma, category) of an object noun: the whole compound first, then its head word."""
    whole = lexicon.normalise(doc[start : head + 1].text)
    if start < head and lexicon.lookup(whole, "object") != lexicon.UNKNOWN:
        return whole, lexicon.lookup(whole, "object")
    x = toks[head]
    if x.style:
        return x.style
    if x.obj:
        return (x.obj[0] if start == head else whole), x.obj[1]
    lemma = x.t.lemma_.lower()
    return (lemma if start == head else whole), lexicon.lookup(lemma, "object")


def _governing_object(b: _Builder, tok) -> int | None:
    """The object a word outside any noun phrase describes: the subject of its verb ("the car is red"), the noun a
    relative clause or participle hangs on ("a car that is red", "a man riding a horse"), else the nearest object."""
    seen = 0
    a = tok
    while seen < 12:
        seen += 1
        if a.i in b.token_owner and b.items[b.token_owner[a.i]]["role"] != "style":
            return b.token_owner[a.i]
        if a.pos_ in ("VERB", "AUX"):
            for ch in a.children:
                if ch.dep_ in ("nsubj", "nsubjpass") and ch.i in b.token_owner:
                    return b.token_owner[ch.i]
        if a.head.i == a.i:
            break
        a = a.head
    return b.nearest_object(tok.i) if b.nearest_object(tok.i) is not None else b.nearest_object(tok.i, before=False)


def _negated_tokens(doc, toks: list[_Tok], runs: list[list[int]]) -> set[int]:
    """Token indices under a negation outside a determiner: "without a hat or a scarf", "not wearing a hat"."""
    neg = lexicon.markers("negation")
    out: set[int] = set()
    starts = {r[0]: r for r in runs}
    for t in doc:
        if t.lower_ not in neg or (t.pos_ == "DET"):
            continue
        if t.dep_ == "neg" and t.head.pos_ in ("VERB", "AUX"):
            out |= {d.i for d in t.head.subtree if d.i > t.i}
            out.add(t.head.i)
        # The runs right after the word, and those coordinated with them.
        i = t.i + 1
        while i in starts:
            out |= set(starts[i])
            i = starts[i][-1] + 1
            while i < len(doc) and doc[i].lower_ in _LINKS:
                i += 1
    return out


def _read(doc, markers) -> list[dict]:
    """Concept items (dicts with temporary keys) of a parsed, merged prompt."""
    toks = _classify(doc, markers)
    runs = _runs(toks)
    b = _Builder(doc, toks)
    b.runs = runs
    pending = None
    for run in runs:
        before = run[0] - 1
        if before >= 0 and toks[before].marker == "style_marker":
            if doc[before].lower_ != "by" or _by_names_style(b, run):
                body = [i for i in run if not toks[i].det]
                if body:
                    text = lexicon.normalise(doc[body[0] : run[-1] + 1].text)
                    cat = lexicon.lookup(text, "style")
                    b.add("style", body[0], run[-1] + 1, text, cat if cat != lexicon.UNKNOWN else "style")
                    b.run_head[run[0]] = -1
                continue
            toks[before].marker, toks[before].preposition = "relation", True  # "a cabin by the lake"
        pending = _read_run(b, run, pending)
    for t in doc:  # verbs of action outside runs: "a man riding a horse"
        x = toks[t.i]
        if t.pos_ == "VERB" and not x.marker and t.i not in b.token_owner and x.attr and x.attr[1] == "action":
            if not any(it["first"] == t.i for it in b.items):
                b.add("attribute", t.i, t.i + 1, x.attr[0], "action", binds_to=None, headless=True)
    _find_accessories(b)
    for it in b.items:  # modifiers without a noun of their own
        if it.pop("headless", False):
            it["binds_to"] = _governing_object(b, doc[it["first"]])
        if it["role"] == "attribute" and it["category"] == "action" and it["binds_to"] is not None:
            it["binds_to"] = _wearer(b, it["binds_to"])
    negs = _negated_tokens(doc, toks, runs)
    _mark_negated(b, negs)
    _add_markers(b, doc, toks)  # after negation: an absent object is nobody's relation
    _mark_negated(b, negs)
    return b.items


def _mark_negated(b: _Builder, negs: set[int]) -> None:
    for it in b.items:
        if it["first"] in negs:
            it["negated"] = True
    for it in b.items:  # what is said of an absent object is absent too: "no red cars"
        if it.get("binds_to") is not None and b.items[it["binds_to"]]["negated"]:
            it["negated"] = True


def _by_names_style(b: _Builder, run: list[int]) -> bool:
    """After "by": an artist ("by claude monet", "a painting by greg rutkowski"), or a place ("a cabin by the
    lake"). A name the lexicon knows as a style is one; else a style must precede and the run must read as a name:
    no determiner and no object word."""
    toks, doc = b.toks, b.doc
    body = [i for i in run if not toks[i].det]
    if body and lexicon.lookup(lexicon.normalise(doc[body[0] : run[-1] + 1].text), "style") != lexicon.UNKNOWN:
        return True
    named = not any(toks[i].det or toks[i].obj for i in run)
    return named and any(it["role"] == "style" for it in b.items)


_WORN = ("clothing", "body part")


def _wearer(b: _Builder, key: int) -> int:
    """What a verb of action describes when the parse hangs it on a garment, a body part or an absent object ("a
    knight with a long beard wearing armor", "a chef in a white apron cooking", "a man without shoes walking"):
    the one who wears, has or lacks it (``b.owner``). Anything else is kept."""
    return b.owner.get(key, key)


def _add_markers(b: _Builder, doc, toks: list[_Tok]) -> None:
    """Relations and positions from the marker phrases found in ``_classify``."""
    i = 0
    while i < len(doc):
        label = toks[i].marker
        if label not in ("relation", "position"):
            i += 1
            continue
        j = i
        while j < len(doc) and toks[j].marker == label:
            j += 1
        # A position followed by "of" is a relation: "on the left side of the road".
        if label == "position" and j + 1 < len(doc) and doc[j].lower_ == "of":
            label, j = "relation", j + 1
        text = lexicon.normalise(doc[i:j].text)
        if label == "position":
            target = b.nearest_object(i)
            if target is None:
                target = b.nearest_object(j - 1, before=False)
            if target is not None:
                b.add("position", i, j, text, lexicon.lookup(text, "position"), binds_to=target)
        else:
            obj = b.run_head.get(j, -1)
            if obj is not None and obj >= 0 and b.items[obj]["role"] == "object" and not b.items[obj]["negated"] \
                    and not (toks[i].preposition and _not_a_place(b, text, obj)):
                subj = _relation_subject(b, i, obj)
                if subj is None:
                    subj = b.nearest_object(b.items[obj]["first"], before=False, present=True)
                if subj is not None:
                    cat = lexicon.lookup(text, "relation")
                    cat = cat if cat != lexicon.UNKNOWN else "relation"  # "on the left side of": a relation all the same
                    for s_ in sorted(_coordinated(b, subj, backwards=True), key=lambda k: b.items[k]["first"]):
                        for o_ in _coordinated(b, obj, backwards=False):
                            b.add("relation", i, j, text, cat, subject=s_, object=o_)
        i = j


def _find_accessories(b: _Builder) -> None:
    """Objects that go with the noun before them and so are never what a later phrase places: garments and body
    parts after "in"/"with" or a verb of wearing (``b.worn``: "a woman in a red dress on a beach"), and whatever
    follows "with" or a container's "of" ("a soldier with a rifle behind a wall", "a cup of tea on a saucer"). Only
    a container's: "of" after other nouns often introduces the thing itself ("an image of a dragon over a castle")."""
    doc, toks = b.doc, b.toks
    worn_preps = set(lexicon.markers("worn_prepositions"))
    for t in doc:
        nxt = b.run_head.get(t.i + 1, -1)
        nxt = nxt if nxt is not None and nxt >= 0 and b.items[nxt]["role"] == "object" else None
        if t.lemma_.lower() == "wear" or t.lower_.startswith("wear"):
            for ch in t.children:
                if ch.dep_ == "dobj":
                    worn = {b.token_owner[w.i] for w in (ch, *ch.conjuncts) if w.i in b.token_owner}
                    b.worn |= worn
                    doer = _doer(b, t)
                    if doer is not None and b.items[doer]["role"] == "object":
                        b.owner.update({k: doer for k in worn if k != doer})
        if nxt is None:
            continue
        before = [(it["first"], k) for k, it in enumerate(b.items)
                  if it["role"] == "object" and it["first"] < t.i and k not in b.worn]
        before = max(before)[1] if before else None
        if toks[t.i].preposition and t.lower_ in worn_preps and b.items[nxt]["category"] in _WORN:
            worn = set(_coordinated(b, nxt, backwards=False))
            b.worn |= worn
            b.owner.update({k: before for k in worn if before is not None})
        elif t.lower_ in lexicon.markers("negation") and t.pos_ == "ADP" and before is not None:
            b.owner.update({k: before for k in _coordinated(b, nxt, backwards=False)})  # "a man without shoes"
        elif toks[t.i].preposition and t.lower_ == "with":
            b.accessories.add(nxt)
        elif t.lower_ == "of" and not toks[t.i].marker and t.i - 1 in b.token_owner \
                and b.items[b.token_owner[t.i - 1]]["category"] == "container":
            b.accessories.add(nxt)  # "a cup of tea on a saucer"; not "a field of lavender under a blue sky"


def _not_a_place(b: _Builder, prep: str, obj: int) -> bool:
    """A preposition whose object is no second thing in the scene: a garment or body part one is in or has ("a
    woman in a red dress", "a girl with long hair": worn, not placed), or a time ("at night", "in winter")."""
    if obj in b.worn and prep in lexicon.markers("worn_prepositions"):
        return True
    return b.items[obj]["lemma"] in lexicon.markers("times")


def _relation_subject(b: _Builder, i: int, obj: int) -> int | None:
    """The object a relation places. After a verb phrase, the one who does it: the parse hangs the phrase on the
    verb, or the nearest object is the verb's object ("a man holding an umbrella in the rain", "a girl reading a
    book under a tree"). Else the nearest present object before the relation that does not go with the noun before
    it (``_find_accessories``). None when there is none before."""
    def usable(key):
        it = b.items[key] if key is not None else None
        return it is not None and it["role"] == "object" and not it["negated"] and it["first"] < i and key != obj

    a = b.doc[i]
    if b.toks[i].preposition and a.head.pos_ in ("VERB", "AUX"):
        doer = _doer(b, a.head)
        if usable(doer):
            return _wearer(b, doer)
    cands = [(it["first"], k) for k, it in enumerate(b.items) if usable(k) and k not in b.worn | b.accessories]
    if not cands:
        return None
    near = max(cands)[1]
    head = b.doc[b.head_tok[near]]
    if head.dep_ == "dobj" and head.head.pos_ == "VERB":
        doer = _doer(b, head.head)
        if usable(doer) and b.items[doer]["first"] < b.items[near]["first"]:
            return _wearer(b, doer)
    return near


def _doer(b: _Builder, verb) -> int | None:
    """The object doing ``verb``: its subject, or the noun a participle hangs on ("a man riding a horse")."""
    a = verb
    for _ in range(12):
        key = b.token_owner.get(a.i)
        if key is None and a.pos_ in ("VERB", "AUX"):
            key = next((b.token_owner[ch.i] for ch in a.children
                        if ch.dep_ in ("nsubj", "nsubjpass") and ch.i in b.token_owner), None)
        if key is not None or a.head.i == a.i:
            return key
        a = a.head
    return None


def _coordinated(b: _Builder, key: int, backwards: bool) -> list[int]:
    """``key`` and the present objects coordinated with it ("a cat and a dog on a sofa", "a room with a fireplace
    and a sofa"), read from the runs around it: only runs joined by "and"/"," whose own place the prompt does not
    name otherwise (a run after a relation, or one followed by its own relation or position, stays out)."""
    out = [key]
    runs = b.runs
    idx = next((n for n, r in enumerate(runs) if b.items[key]["first"] in r), None)
    if idx is None:
        return out
    step = -1 if backwards else 1
    n = idx
    while 0 <= n + step < len(runs):
        a, c = (runs[n + step], runs[n]) if backwards else (runs[n], runs[n + step])
        gap = range(a[-1] + 1, c[0])
        if not gap or any(b.doc[g].lower_ not in _LINKS for g in gap):
            break
        other = runs[n + step]
        k = b.run_head.get(other[0], -1)
        if k is None or k < 0 or b.items[k]["role"] != "object" or b.items[k]["negated"]:
            break
        around = other[0] - 1 if backwards else other[-1] + 1
        if 0 <= around < len(b.doc) and b.toks[around].marker in ("relation", "position"):
            break
        out.append(k)
        n += step
    return out


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


# --- public API -----------------------------------------------------------------------------------------------


def extract_many(prompts: Iterable, tokenizer=None, batch_size: int = 256) -> list[Concepts]:
    """Concepts of many prompts, parsed in batches. Items are strings or suite prompts (``.text`` and ``.words``,
    the per-word overrides). With a ``tokenizer``, every concept gets its token indices."""
    from auditor import nlp as _nlp

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
        from types import SimpleNamespace

        return extract_many([SimpleNamespace(text=prompt, words=words)], tokenizer)[0]
    return extract_many([prompt], tokenizer)[0]


def resolve_tokenizer(spec: str):
    """A tokenizer for token indices: "clip" (the standard CLIP BPE, shipped), "none", or a local folder with
    tokenizer files (a checkpoint's ``tokenizer/``). Nothing is downloaded."""
    from pathlib import Path

    from auditor.errors import AuditorError

    if spec.lower() == "none":
        return None
    if spec.lower() == "clip":
        from auditor.zoo.bpe import load_tokenizer

        tok = load_tokenizer()
        # Alignment encodes prompts untruncated on purpose (to report what falls past 77 tokens); mark
        # transformers' one-time "sequence length is longer than the maximum" warning as already given.
        tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        return tok
    path = Path(spec)
    if not path.is_dir():
        raise AuditorError(f"--tokenizer: expected 'clip', 'none' or a folder with tokenizer files, got {spec!r}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AuditorError(f"--tokenizer: cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
