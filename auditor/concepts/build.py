"""The builder concepts are collected in while a prompt is read, and the questions later steps ask of it: who wears
or has a thing, who does a verb, which objects are coordinated with one."""

from __future__ import annotations

from auditor import lexicon
from auditor.concepts.words import _LINKS, _Tok



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

    def add(self, role: str, start_tok: int, end_tok: int, lemma: str, category: str | None,
            source: str | None = None, **kw) -> int:
        """A new item; ``source`` says where a category the lexicon does not give came from ("parse")."""
        span = self.doc[start_tok:end_tok]
        cat = category or lexicon.UNKNOWN
        item = dict(role=role, text=span.text, lemma=lemma, category=cat,
                    category_source="unknown" if cat == lexicon.UNKNOWN else source or "lexicon",
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



def _wearer(b: _Builder, key: int) -> int:
    """What a verb of action describes when the parse hangs it on a garment, a body part or an absent object ("a
    knight with a long beard wearing armor", "a chef in a white apron cooking", "a man without shoes walking"):
    the one who wears, has or lacks it (``b.owner``). Anything else is kept."""
    return b.owner.get(key, key)



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
