"""Relations and positions: which objects a marker phrase ("to the left of", "on", "on the left") places, and
which objects no phrase can place (worn garments and body parts, accessories, times, absent objects)."""

from __future__ import annotations

from auditor import lexicon
from auditor.concepts.build import _Builder, _coordinated, _doer, _wearer
from auditor.concepts.words import _Tok

_WORN = ("clothing", "body part")


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
