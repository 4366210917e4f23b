"""Models known by name, and what their calibration draws on: the generic side of the bundled models.

A package that ships diffusers folders (the bundled shapes world, ``auditor.zoo``) registers a ``ModelSource``: the
folders it has installed, the names it owns even when a folder is missing, and the words and prompts its models
learned. Model resolution and calibration ask this registry, so neither depends on any one world. The sources named
in ``DEFAULT_SOURCES`` register themselves when first imported; ``register`` adds others.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "shapes-v1"  # the model an audit uses when none is named
DEFAULT_SOURCES = ("auditor.zoo",)  # modules that register a source when imported: the bundled reference world


@dataclass(frozen=True)
class ModelSource:
    """One family of named models shipped with a package."""

    name: str
    models: Callable[[], dict[str, Path]]  # installed models: name -> diffusers folder
    folder: Path  # where its model folders live (named in the error for one that is not installed)
    owns: re.Pattern  # names that belong to this source even when their folder is missing
    lexicon: Callable[[], dict[str, list[str]]]  # the words its models learned, by lexicon category
    prompts: Callable[[int, int], list[str]]  # (n, seed) -> n calibration prompts of its world
    prompt_source: Callable[[int, int], str]  # (n, seed) -> where those prompts came from, for the record
    guidance: float | None = None  # the guidance scale its models generate at (their suites, shipped profiles)


_SOURCES: dict[str, ModelSource] = {}
_loaded = False


def register(source: ModelSource) -> None:
    """Add (or replace, by name) a source of named models."""
    _SOURCES[source.name] = source


def sources() -> list[ModelSource]:
    """Every registered source, the default ones first imported (a default source that cannot be imported is
    skipped: its models are then simply not known by name)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in DEFAULT_SOURCES:
            try:
                importlib.import_module(module)
            except ImportError:
                continue
    return list(_SOURCES.values())


def installed_models() -> dict[str, Path]:
    """Every installed named model: name -> diffusers folder."""
    out: dict[str, Path] = {}
    for s in sources():
        out.update({name: Path(path) for name, path in s.models().items()})
    return out


def owner_of(name: str) -> ModelSource | None:
    """The source a model name belongs to, installed or not; None for a name no source owns."""
    for s in sources():
        if name in s.models() or s.owns.fullmatch(name) or (s.folder / name).is_dir():
            return s
    return None


def bundled_source() -> ModelSource:
    """The source of the bundled models (the first registered): what calibrates a model resolved by name."""
    found = sources()
    if not found:
        raise LookupError("no bundled model source is registered")
    return found[0]


def bundled_lexicon() -> dict[str, list[str]]:
    """The words the bundled models learned, by lexicon category."""
    return bundled_source().lexicon()
