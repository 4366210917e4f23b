"""The concept lexicon: word categories with role-aware lookup. The data is ``lexicon.yaml`` beside this file.

A word's category depends on the role it plays in the prompt: ``lookup("orange", "attribute")`` is ``"colour"``,
``lookup("orange", "object")`` is ``"food"``. Head-relevance calibration draws its words from
``words_by_category()``; concept extraction uses ``lookup``, ``count_value`` and the marker lists.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROLES = ("object", "attribute", "position", "relation", "count", "style")
UNKNOWN = "unknown"
_ALIASES = {"noun": "object", "modifier": "attribute"}
_DATA = Path(__file__).resolve().parent / "lexicon.yaml"


@dataclass(frozen=True)
class Category:
    name: str
    description: str
    role: str
    words: tuple[str, ...]
    modifiers: tuple[str, ...] = ()  # adjectives carrying this category as attributes ("rainy" -> weather)


@dataclass(frozen=True)
class _Lexicon:
    categories: tuple[Category, ...]
    index: dict  # (role, word) -> category name
    count_values: dict  # count word -> number
    markers: dict  # marker list name -> tuple of words
    rgb: dict  # colour word -> typical sRGB (0-255)


def normalise(word: str) -> str:
    """The lexicon's key form of a word or phrase: lower case, single spaces."""
    return re.sub(r"\s+", " ", word.strip().lower())


def _role(role: str) -> str:
    role = _ALIASES.get(role, role)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)} (or noun/modifier)")
    return role


@functools.lru_cache(maxsize=1)
def _load() -> _Lexicon:
    data = yaml.safe_load(_DATA.read_text(encoding="utf-8"))
    cats: list[Category] = []
    index: dict[tuple[str, str], str] = {}

    def add(role: str, word: str, name: str) -> None:
        key = (role, normalise(word))
        # Two categories claiming one word in one role would make lookup order-dependent.
        if key in index and index[key] != name:
            raise ValueError(f"lexicon: {word!r} is listed as {role} under both {index[key]!r} and {name!r}")
        index[key] = name

    for c in data["categories"]:
        cat = Category(
            name=c["name"],
            description=c["description"],
            role=_role(c["role"]),
            words=tuple(normalise(w) for w in c["words"]),
            modifiers=tuple(normalise(w) for w in c.get("modifiers", ())),
        )
        if any(x.name == cat.name for x in cats):
            raise ValueError(f"lexicon: category {cat.name!r} is defined twice")
        for w in cat.words:
            add(cat.role, w, cat.name)
        for w in cat.modifiers:
            add("attribute", w, cat.name)
        cats.append(cat)
    values = {normalise(k): int(v) for c in data["categories"] for k, v in (c.get("values") or {}).items()}
    markers = {k: tuple(normalise(w) for w in v) for k, v in data["markers"].items()}
    rgb = {normalise(k): tuple(int(x) for x in v) for c in data["categories"] for k, v in (c.get("rgb") or {}).items()}
    return _Lexicon(tuple(cats), index, values, markers, rgb)


def categories() -> list[Category]:
    return list(_load().categories)


def category_names() -> list[str]:
    return [c.name for c in _load().categories]


def words_by_category() -> dict[str, tuple[str, ...]]:
    """Every category's words (its modifiers after them), for calibration and documentation."""
    return {c.name: c.words + c.modifiers for c in _load().categories}


def lookup(lemma: str, role: str, strict: bool = False) -> str:
    """The category of ``lemma`` in ``role`` ("object"/"noun", "attribute"/"modifier", "position", ...).

    Style words count in any slot ("a watercolor landscape", "a watercolor"). Unless ``strict``, a word with no
    entry for its role falls back to its other reading: a noun used as a modifier keeps its noun category
    ("a rose garden" -> plant) and an adjective used as a noun keeps its attribute category.
    Returns ``"unknown"`` when the lexicon does not know the word.
    """
    role, word, index = _role(role), normalise(lemma), _load().index
    if (role, word) in index:
        return index[(role, word)]
    if role in ("object", "attribute"):
        if ("style", word) in index:
            return index[("style", word)]
        other = "attribute" if role == "object" else "object"
        if not strict and (other, word) in index:
            return index[(other, word)]
    return UNKNOWN


def count_value(word: str) -> int | None:
    """The number a count word stands for ("two" -> 2, "a pair" -> 2); None for "several", "many", unknown."""
    return _load().count_values.get(normalise(word))


def colour_values() -> dict[str, tuple[int, int, int]]:
    """Typical sRGB of the basic colour words (``gray`` and ``grey`` alike)."""
    return dict(_load().rgb)


def markers(name: str) -> tuple[str, ...]:
    """A marker list: "negation", "carriers", "style_markers", "style_heads"."""
    return _load().markers[name]


def entries(role: str) -> tuple[str, ...]:
    """Every word or phrase listed under ``role`` (attribute includes the categories' modifiers)."""
    role = _role(role)
    return tuple(w for (r, w) in _load().index if r == role)
