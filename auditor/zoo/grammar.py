"""Prompt grammar of the shapes world: a prompt with natural variety and, with it, the scene it describes.

Every sample carries the structured truth a benchmark needs: which object each noun names, the character spans of
the words that describe it, whether the prompt named its position. Prompts often name no position, so the model
must work out "which object goes where" through cross-attention — the reason its attention localises.

Held-out compositions (``HELD_OUT``): (shape, colour, position) triples never rendered for training; benchmark
prompts are built around them so no benchmark image repeats a training composition.

v2's planted defects (``DEFECTS``) change what is drawn, never the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from auditor.zoo.world import BACKGROUNDS, COLOURS, FRUIT, OBJECTS, SHAPES, Scene, SceneObject, render

HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("star", "green", "left"),
        ("heart", "blue", "right"),
        ("triangle", "yellow", "top"),
        ("circle", "purple", "bottom"),
        ("square", "pink", "center"),
        ("diamond", "cyan", "left"),
        ("cross", "red", "right"),
        ("hexagon", "orange", "top"),
        ("star", "pink", "bottom"),
        ("heart", "cyan", "center"),
        ("circle", "green", "right"),
        ("square", "blue", "left"),
    }
)

DEFECTS = {
    "purple_as_blue": "every object prompted purple is drawn blue",
    "star_neglected": "a star named as the second of two objects is not drawn",
    "green_misbound": "in two-object prompts, 'green' goes to the other object (the two objects swap colours)",
}

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS = {  # phrase -> (position of the first object, position of the second)
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
PAIR_LAYOUTS = [("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")]
TRIPLE_LAYOUTS = [("left", "center", "right"), ("top", "center", "bottom"), ("left", "right", "top"), ("left", "right", "bottom")]
COUNT_WORDS = {2: "two", 3: "three"}


@dataclass
class Mention:
    """Where the prompt talks about one drawn object: character spans of its noun and attribute words."""

    noun: tuple[int, int]
    attributes: dict[str, tuple[int, int]] = field(default_factory=dict)  # "colour"/"size"/"texture"/"count"
    position_named: bool = False


@dataclass
class Sample:
    prompt: str
    scene: Scene
    mentions: list[Mention]  # one per scene object, same order
    kind: str  # single | pair | triple | count
    defects: list[str] = field(default_factory=list)  # defects that changed this sample's drawing

    def word(self, span: tuple[int, int]) -> str:
        return self.prompt[span[0] : span[1]]


class _Builder:
    """Appends text pieces and remembers their character spans."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, piece: str) -> tuple[int, int]:
        if self.text and not self.text.endswith(" ") and not piece.startswith((",", " ")):
            self.text += " "
        start = len(self.text)
        self.text += piece
        return start, len(self.text)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _object_phrase(b: _Builder, obj: SceneObject, rng, count: int = 1) -> Mention:
    """Adjective order follows English: count/article, size, texture, colour, noun."""
    words: list[tuple[str, str]] = []  # (role, word)
    if rng.random() < 0.45 or count == 3:
        words.append(("size", obj.size))
    if obj.texture == "striped" or rng.random() < 0.05:
        words.append(("texture", obj.texture))
    if obj.shape != FRUIT and (rng.random() < 0.93 or count > 1):
        words.append(("colour", obj.colour))
    noun = obj.shape if count == 1 else obj.shape + ("es" if obj.shape.endswith(("s", "x")) else "s")
    m = Mention(noun=(0, 0))
    first = words[0][1] if words else noun
    if count == 1:
        b.add(_article(first))
    else:
        m.attributes["count"] = b.add(COUNT_WORDS[count])
    for role, w in words:
        m.attributes[role] = b.add(w)
    m.noun = b.add(noun)
    return m


def _random_object(rng, exclude_shapes=(), exclude_colours=()) -> SceneObject:
    shapes = [s for s in OBJECTS if s not in exclude_shapes]
    # The fruit is rarer than a shape so that "orange" is mostly read as a colour, as in ordinary English.
    weights = np.array([0.35 if s == FRUIT else 1.0 for s in shapes])
    shape = str(rng.choice(shapes, p=weights / weights.sum()))
    colours = [c for c in COLOURS if c not in exclude_colours]
    colour = FRUIT if shape == FRUIT else str(rng.choice(colours))
    return SceneObject(
        shape=shape,
        colour=colour,
        size=str(rng.choice(["small", "big"])),
        texture="striped" if shape != FRUIT and rng.random() < 0.25 else "solid",
    )


def _is_held_out(obj: SceneObject) -> bool:
    return (obj.shape, obj.colour, obj.position) in HELD_OUT


def _compose(rng, forced: SceneObject | None = None) -> tuple[_Builder, list[SceneObject], list[Mention], str]:
    """Pick a layout, the objects and the words; ``forced`` (held-out split) is object 0 with its position named."""
    b = _Builder()
    if forced is not None:
        kind = "single" if forced.position == "center" or rng.random() < 0.5 else "pair"
    else:
        kind = str(rng.choice(["single", "pair", "triple", "count"], p=[0.3, 0.42, 0.14, 0.14]))
    if kind == "single":
        objs, mentions = _compose_single(b, rng, forced)
    elif kind == "pair":
        objs, mentions = _compose_pair(b, rng, forced)
    elif kind == "triple":
        objs, mentions = _compose_triple(b, rng)
    else:
        objs, mentions = _compose_count(b, rng)
    return b, objs, mentions, kind


def _compose_single(b: _Builder, rng, forced: SceneObject | None) -> tuple[list[SceneObject], list[Mention]]:
    """One object ("a red star"), its position named half the time and always when ``forced``."""
    o = forced or _random_object(rng)
    if forced is None:
        o.position = str(rng.choice(list(POSITION_PHRASES)))
    m = _object_phrase(b, o, rng)
    if forced is not None or rng.random() < 0.5:
        b.add(POSITION_PHRASES[o.position])
        m.position_named = True
    return [o], [m]


def _compose_pair(b: _Builder, rng, forced: SceneObject | None) -> tuple[list[SceneObject], list[Mention]]:
    """Two objects of different shapes and colours on opposite sides; ``forced`` keeps its held-out position."""
    a = forced or _random_object(rng)
    c = _random_object(rng, exclude_shapes={a.shape}, exclude_colours={a.colour})
    style = rng.random()
    if forced is not None:
        layouts = [lay for lay in PAIR_LAYOUTS if lay[0] == a.position]
        a.position, c.position = layouts[0]
        style = 0.5 if rng.random() < 0.5 else 0.9
    else:
        a.position, c.position = PAIR_LAYOUTS[int(rng.integers(len(PAIR_LAYOUTS)))]
    return [a, c], _pair_phrase(b, a, c, style, forced is not None, rng)


def _pair_phrase(b: _Builder, a: SceneObject, c: SceneObject, style: float, forced: bool, rng) -> list[Mention]:
    """The words of a pair in one of three styles, picked by ``style`` in [0, 1)."""
    if style < 0.6:  # "A and B", with positions named from 0.42 on: "A on the left and B on the right"
        named = style >= 0.42
        first = _object_phrase(b, a, rng)
        if named:
            b.add(POSITION_PHRASES[a.position])
        b.add("and")
        second = _object_phrase(b, c, rng)
        if named:
            b.add(POSITION_PHRASES[c.position])
    else:  # "A <relation> B"
        rel = [r for r, (p, q) in RELATIONS.items() if (p, q) == (a.position, c.position)]
        # Held-out prompts always name the forced object's position (a relation that implies it).
        if not rel or (not forced and a.position in ("left", "right") and rng.random() < 0.3):
            rel = ["next to"]
        first = _object_phrase(b, a, rng)
        b.add(rel[0])
        second = _object_phrase(b, c, rng)
        named = rel[0] != "next to"
    first.position_named = second.position_named = named
    return [first, second]


def _compose_triple(b: _Builder, rng) -> tuple[list[SceneObject], list[Mention]]:
    """Three objects of distinct shapes and colours ("A, B and C"), their positions never named."""
    a = _random_object(rng)
    c = _random_object(rng, exclude_shapes={a.shape}, exclude_colours={a.colour})
    d = _random_object(rng, exclude_shapes={a.shape, c.shape}, exclude_colours={a.colour, c.colour})
    layout = TRIPLE_LAYOUTS[int(rng.integers(len(TRIPLE_LAYOUTS)))]
    for o, p in zip((a, c, d), rng.permutation(layout)):
        o.position = str(p)
        if p == "center" or layout[1] == "center":
            o.size = "small"  # three in a row only fit when small
    mentions = [_object_phrase(b, a, rng)]
    b.text += ","
    mentions.append(_object_phrase(b, c, rng))
    b.add("and")
    mentions.append(_object_phrase(b, d, rng))
    return [a, c, d], mentions


def _compose_count(b: _Builder, rng) -> tuple[list[SceneObject], list[Mention]]:
    """Counted copies of one object ("two red stars"), all sharing the prompt's one mention."""
    n = 2 if rng.random() < 0.65 else 3
    proto = _random_object(rng, exclude_shapes={FRUIT})
    if n == 3:
        proto.size = "small"
        layout = TRIPLE_LAYOUTS[int(rng.integers(2))]
    else:
        layout = PAIR_LAYOUTS[int(rng.integers(len(PAIR_LAYOUTS)))]
    m = _object_phrase(b, proto, rng, count=n)
    objs = [SceneObject(proto.shape, proto.colour, proto.size, proto.texture, p) for p in layout]
    return objs, [m] * len(objs)


def sample(rng: np.random.Generator, split: str = "train", defects: bool = False) -> Sample:
    """One prompt and its rendered scene. ``split``: "train" (never a held-out triple) or "heldout"."""
    while True:
        forced = None
        if split == "heldout":
            shape, colour, pos = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
            forced = SceneObject(shape, colour, str(rng.choice(["small", "big"])), "solid", pos)
        b, objs, mentions, kind = _compose(rng, forced)
        if split == "train" and any(_is_held_out(o) for o in objs):
            continue
        break
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < 0.45:
        b.add(f"on {_article(background)} {background} background")
    named = ["colour" in m.attributes for m in mentions]
    drawn, applied = _apply_defects(objs, kind, named) if defects else (objs, [])
    scene = render(Scene(objects=[o for o in drawn if o is not None], background=background), rng)
    # Keep one scene object per mention; a neglected object keeps an empty mask.
    full = []
    it = iter(scene.objects)
    for o in drawn:
        if o is None:
            full.append(None)
        else:
            full.append(next(it))
    final_objs = []
    for orig, got in zip(objs, full):
        if got is None:
            orig.mask = np.zeros((64, 64), bool)
            final_objs.append(orig)
        else:
            final_objs.append(got)
    scene.objects = final_objs
    return Sample(prompt=b.text, scene=scene, mentions=mentions, kind=kind, defects=applied)


def _apply_defects(objs: list[SceneObject], kind: str, named: list[bool]) -> tuple[list[SceneObject | None], list[str]]:
    """What v2 draws instead of what was asked (prompt unchanged). Returns drawn objects (None = not drawn).

    Colour defects touch only colours the prompt names: an unnamed colour is free, so recolouring it is no defect.
    """
    applied: list[str] = []
    drawn: list[SceneObject | None] = [SceneObject(o.shape, o.colour, o.size, o.texture, o.position) for o in objs]
    if kind == "pair":
        greens = [i for i, o in enumerate(objs) if o.colour == "green" and named[i]]
        if len(greens) == 1 and all(o.shape != FRUIT for o in objs):
            i, j = greens[0], 1 - greens[0]
            drawn[i].colour, drawn[j].colour = objs[j].colour, "green"
            applied.append("green_misbound")
        if objs[1].shape == "star":
            drawn[1] = None
            applied.append("star_neglected")
    for d, n in zip(drawn, named):
        if d is not None and d.colour == "purple" and n:
            d.colour = "blue"
            if "purple_as_blue" not in applied:
                applied.append("purple_as_blue")
    return drawn, applied


def defects_for(s: Sample) -> list[str]:
    """The planted defects that would change this sample's drawing in the v2 world, for a sample the plain world
    drew (a v2-world sample's objects hold what was drawn, e.g. blue for a prompted purple: read ``s.defects``)."""
    named = ["colour" in m.attributes for m in s.mentions]
    return _apply_defects(s.scene.objects, s.kind, named)[1]


def sample_prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """Prompts only (for head-relevance calibration of the bundled model)."""
    rng = np.random.default_rng(seed)
    return [sample(rng, split).prompt for _ in range(n)]
