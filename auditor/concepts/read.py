"""Reading concepts off a merged, classified prompt: each nominal run's head and modifiers, counts, styles,
modifiers bound through the parse, negation; relations and positions last (``auditor.concepts.relations``)."""

from __future__ import annotations

from auditor import lexicon
from auditor.concepts.build import _Builder, _wearer
from auditor.concepts.relations import _add_markers, _find_accessories
from auditor.concepts.words import (_LINKS, _NOUNS, _classify, _noun_capable, _numeral_kind, _runs,
                                    _style_categories, _Tok)

_SINGULAR_DETS = ("a", "an", "one", "the", "this", "that", "each", "every")
_VERB_SLOTS = ("acl", "relcl", "advcl", "ROOT", "conj", "xcomp")  # a verb hung on a noun or heading the prompt
# Inflections a verb read from its tag alone must show ("resting", "parked", "barks"); irregular forms ("sat",
# "hung") are the lexicon's to know.
_VERB_SHAPES = {"VBG": lambda w: w.endswith("ing") and len(w) > 5, "VBN": lambda w: w.endswith(("ed", "en")),
                "VBD": lambda w: w.endswith("ed"), "VBZ": lambda w: w.endswith("s") and not w.endswith("ss"),
                "VBP": lambda w: False}
_ARGUMENTS = ("pobj", "dobj", "nsubj", "nsubjpass", "conj", "appos", "ROOT")  # noun slots, not modifier slots


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
    elif not pending_count and _tag_word(b, run, start, head, dets, mods):
        key = target = b.add("style", start, head + 1, lexicon.normalise(doc[start : head + 1].text), "style",
                             source="parse", negated=negated)  # "..., f/1.8, soft light", "..., 1970s, kodachrome"
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



def _tag_word(b: _Builder, run: list[int], start: int, head: int, dets: list[int], mods: list[int]) -> bool:
    """A bare noun the lexicon does not know, in a comma-separated list of tags after what the prompt shows ("...,
    85mm lens, f/1.8, soft light", "a street market in the 1970s, kodachrome"): a word about the picture (its
    light, film or look), not a thing in it. Only when the comma follows a phrase that is no object (a style, an
    era, a camera setting): after an object, a bare noun is one more of a list ("apples, pears, plums")."""
    toks, doc = b.toks, b.doc
    x = toks[head]
    if dets or x.obj or x.style or x.count or x.t.pos_ not in _NOUNS or any(toks[i].count for i in mods):
        return False
    if any(toks[i].obj for i in range(start, head)):
        return False
    before, after = run[0] - 1, run[-1] + 1
    if before < 1 or doc[before].text != "," or (after < len(doc) and doc[after].text != ","):
        return False
    prev = next((r for r in b.runs if r[-1] == before - 1), None)
    if prev is None:
        return False
    owner = b.run_head.get(prev[0], -1)
    return owner is None or owner < 0 or b.items[owner]["role"] != "object"



def _head(toks: list[_Tok], body: list[int], dets: list[int]) -> int | None:
    """The run's head: its last word that can be a noun. Failing that, an attribute word standing where a noun
    stands ("a stone", "strawberries with cream")."""
    heads = [i for i in body if _noun_capable(toks[i])]
    if heads:
        return heads[-1]
    last = toks[body[-1]].t if body else None
    if last is not None and last.pos_ in _NOUNS and last.dep_ not in ("compound", "amod", "nmod") and (
        dets or last.dep_ in _ARGUMENTS
    ) and not _era(toks[body[-1]]):
        return body[-1]
    return None



def _era(x: _Tok) -> bool:
    """A decade or a year standing where a noun stands ("a street market in the 1970s", "a diner from the
    fifties"): the time the scene is set in, which describes the scene and is never an object of its own."""
    return bool(x.attr) and x.attr[1] == "age" and (
        _numeral_kind(x.t) == "era" or x.t.lower_ in lexicon.markers("decades"))



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
    in_runs = {i for r in runs for i in r}
    for t in doc:  # verbs of action outside runs: "a man riding a horse", "three wolves howling at the moon"
        x = toks[t.i]
        if not (t.pos_ == "VERB" or x.verb) or x.marker or t.i in b.token_owner or any(
                it["first"] == t.i for it in b.items):
            continue
        if x.verb:  # "grey hair knitting": the tagger's noun, the reader's verb
            b.add("attribute", t.i, t.i + 1, t.lower_, "action", source="parse", binds_to=None, headless=True)
        elif x.attr and x.attr[1] == "action":
            b.add("attribute", t.i, t.i + 1, x.attr[0], "action", binds_to=None, headless=True)
        elif _action_by_tag(t, x, t.i in in_runs) and b.nearest_object(t.i) is not None:
            b.add("attribute", t.i, t.i + 1, t.lemma_.lower(), "action", source="parse", binds_to=None, headless=True)
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



def _action_by_tag(t, x: _Tok, in_run: bool) -> bool:
    """A verb the lexicon does not list that still describes what an object does or how it is: a participle or a
    finite verb the tagger and parser read as one ("a tiger resting under a tree", "a car parked on a street", "a
    dog that barks"), outside any noun phrase, whose lemma is not one of the lexicon's verbs that depict or
    compose rather than act ("a poster showing a cat", "a bowl filled with fruit"). A lexicon noun counts when the
    parse makes it a verb outside a run ("two kids building a sandcastle")."""
    if in_run or x.attr or x.style or x.count:
        return False
    if t.dep_ not in _VERB_SLOTS or not _VERB_SHAPES.get(t.tag_, lambda w: False)(t.lower_):
        return False  # the inflection must show on the word: "hedgehog" tagged as a past tense is a noun
    if t.tag_ in ("VBZ", "VBP", "VBD") and t.dep_ != "relcl" and not any(
            ch.dep_ in ("nsubj", "nsubjpass") for ch in t.children):
        return False  # a finite verb needs its subject ("a dog that barks", "a cat sleeps on a mat")
    lemma = t.lemma_.lower()
    return lemma.isalpha() and lemma not in lexicon.markers("not_actions")



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
