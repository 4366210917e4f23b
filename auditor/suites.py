"""Prompt suites: a YAML (or plain-text) file -> a validated, immutable ``Suite``.

YAML::

    name: fidelity-core
    description: ...
    defaults: {steps: 30, seeds: [0, 1], guidance: 7.5, resolution: 512}     # resolution: N or [h, w]
    acceptance:                                                              # optional gate for `auditor audit`
      max_flag_rate: {missing: 0.1, any: 0.3}                                # per flag type
      max_flag_rate_per_category: {colour: 0.2}
      required_categories: [colour, shape]
    prompts:
      - id: p1
        text: an orange cat
        tags: [polysemy]
        words: {orange: {category: colour}}                                  # per-word overrides

A ``.txt`` suite has one prompt a line (blank lines and ``#`` comments skipped), ids p1, p2, ... in order.
Every error is an ``AuditorError`` naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator
from pydantic import model_validator

from auditor import lexicon
from auditor.errors import AuditorError
from auditor.vocabulary import GATE_TYPES
from auditor.concepts import extract_many

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAX_SEED = 2 ** 63 - 1  # the run store keeps seeds as SQLite integers (auditor.store.MAX_SEED)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_category(name: str) -> str:
    if name not in lexicon.category_names():
        raise ValueError(f"unknown category {name!r} (known: {', '.join(lexicon.category_names())})")
    return name


class Defaults(_Model):
    steps: StrictInt = Field(30, ge=1, le=1000)
    seeds: tuple[StrictInt, ...] = Field((0,), min_length=1)
    guidance: StrictFloat = Field(7.5, ge=0, le=50)
    resolution: tuple[StrictInt, StrictInt] | None = None  # (height, width); None: the model's native size

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("seeds must be distinct integers >= 0")
        if any(s > _MAX_SEED for s in v):
            raise ValueError(f"seeds must be at most {_MAX_SEED}")
        return v

    @field_validator("resolution", mode="before")
    @classmethod
    def _square(cls, v):
        return [v, v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v):
        # The VAE downsamples by 8; any other size is silently cropped by the pipeline.
        if v is not None and any(x < 8 or x % 8 for x in v):
            raise ValueError("resolution must be positive multiples of 8")
        return v


class WordOverride(_Model):
    """What the suite author says a word means: its category, and for an object how many are expected."""

    category: StrictStr | None = None
    count: StrictInt | None = Field(None, ge=1)

    @field_validator("category")
    @classmethod
    def _category(cls, v):
        return v if v is None else _known_category(v)

    @model_validator(mode="after")
    def _something(self):
        if self.category is None and self.count is None:
            raise ValueError("an override needs 'category' or 'count'")
        return self


class Prompt(_Model):
    id: StrictStr
    text: StrictStr
    tags: tuple[StrictStr, ...] = ()
    words: dict[StrictStr, WordOverride] = Field(default_factory=dict)

    @field_validator("id", mode="before")
    @classmethod
    def _int_id(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("id")
    @classmethod
    def _id(cls, v):
        if not v.strip():
            raise ValueError("is empty")
        if not _ID.match(v):
            raise ValueError(f"id {v!r} may hold only letters, digits, '_', '.', '-'")
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        v = " ".join(v.split())
        if not v:
            raise ValueError("is empty")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v):
        if any(not t.strip() for t in v):
            raise ValueError("tags must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _words_in_text(self):
        for word in self.words:
            if not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", self.text, flags=re.IGNORECASE):
                raise ValueError(f"override word {word!r} does not occur in the prompt")
        return self


class Acceptance(_Model):
    max_flag_rate: dict[Literal[GATE_TYPES], float] = Field(default_factory=dict)
    max_flag_rate_per_category: dict[StrictStr, float] = Field(default_factory=dict)
    required_categories: tuple[StrictStr, ...] = ()

    @field_validator("max_flag_rate", "max_flag_rate_per_category")
    @classmethod
    def _rates(cls, v):
        for k, rate in v.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"rate for {k!r} must be between 0 and 1, got {rate}")
        return v

    @field_validator("max_flag_rate_per_category")
    @classmethod
    def _rate_categories(cls, v):
        for k in v:
            _known_category(k)
        return v

    @field_validator("required_categories")
    @classmethod
    def _required(cls, v):
        return tuple(_known_category(c) for c in v)

    @model_validator(mode="after")
    def _something(self):
        if not (self.max_flag_rate or self.max_flag_rate_per_category or self.required_categories):
            raise ValueError("acceptance needs max_flag_rate, max_flag_rate_per_category or required_categories")
        return self


class _SuiteFile(_Model):
    name: StrictStr = Field(min_length=1)
    description: StrictStr = ""
    defaults: Defaults = Defaults()
    acceptance: Acceptance | None = None
    prompts: tuple[Prompt, ...] = Field(min_length=1)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    defaults: Defaults
    prompts: tuple[Prompt, ...]
    acceptance: Acceptance | None
    path: Path
    sha256: str  # of the file's bytes: the audit manifest records exactly which suite ran
    lines: Mapping[str, int] = field(default_factory=dict, hash=False, compare=False)  # prompt id -> file line

    def prompt(self, prompt_id: str) -> Prompt:
        for p in self.prompts:
            if p.id == prompt_id:
                return p
        raise KeyError(prompt_id)


# --- loading --------------------------------------------------------------------------------------------------


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.exists():
        raise AuditorError(f"suite file not found: {path}")
    if not path.is_file():
        raise AuditorError(f"suite path is not a file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AuditorError(f"{path.name} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    if path.suffix.lower() == ".txt":
        data, lines = _from_txt(text, path)
    else:
        data, lines = _from_yaml(text, path)
    try:
        model = _SuiteFile.model_validate(data)
    except ValidationError as exc:
        raise AuditorError(_describe(exc, data, lines, path)) from None
    seen: dict[str, int] = {}
    for i, p in enumerate(model.prompts):
        line = lines.get(("prompts", i), 0)
        if p.id in seen:
            raise AuditorError(f"{path.name} line {line}: duplicate prompt id '{p.id}' (first on line {seen[p.id]})")
        seen[p.id] = line
    return Suite(model.name, model.description, model.defaults, model.prompts, model.acceptance, path,
                 hashlib.sha256(raw).hexdigest(), seen)


def _from_txt(text: str, path: Path) -> tuple[dict, dict]:
    prompts, lines = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lines[("prompts", len(prompts))] = n
        prompts.append({"id": f"p{len(prompts) + 1}", "text": line})
    if not prompts:
        raise AuditorError(f"{path.name}: no prompts (one prompt a line; blank lines and # comments are skipped)")
    return {"name": path.stem, "prompts": prompts}, lines


def _from_yaml(text: str, path: Path) -> tuple[object, dict]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise AuditorError(f"{path.name}{where}: invalid YAML: {problem}") from None
    if node is None:
        raise AuditorError(f"{path.name}: the file is empty")
    if not isinstance(data, dict):
        raise AuditorError(f"{path.name} line {node.start_mark.line + 1}: expected a mapping with name and prompts")
    lines: dict[tuple, int] = {}
    _node_lines(node, (), lines, path)
    return data, lines


def _node_lines(node, path: tuple, out: dict, file: Path) -> None:
    """Line (1-based) of every key and item, keyed by its path of keys and indices; duplicate keys are errors
    (PyYAML would silently keep the last)."""
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for k, v in node.value:
            key = k.value
            if key in keys:
                raise AuditorError(f"{file.name} line {k.start_mark.line + 1}: duplicate key '{key}'")
            keys.add(key)
            out[path + (key,)] = k.start_mark.line + 1
            _node_lines(v, path + (key,), out, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _node_lines(v, path + (i,), out, file)


_FIELDS = {"": _SuiteFile, "defaults": Defaults, "acceptance": Acceptance, "prompt": Prompt, "word": WordOverride}


def _describe(exc: ValidationError, data, lines: dict, path: Path) -> str:
    """The first validation error as one line: file, line, which prompt, which field, what is wrong."""
    # A failed item also fails its list's length check; count only errors not implied by a deeper one.
    errors = [e for e in exc.errors() if not any(tuple(o["loc"])[: len(e["loc"])] == tuple(e["loc"])
                                                 and len(o["loc"]) > len(e["loc"]) for o in exc.errors())]
    err = errors[0]
    loc = tuple(err["loc"])
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    where, fld, model = "", loc, _FIELDS[""]
    if loc[:1] == ("prompts",) and len(loc) > 1 and isinstance(loc[1], int):
        where, fld, model = _prompt_label(data, loc[1]), loc[2:], Prompt
        if fld[:1] == ("words",) and len(fld) > 1:
            where, fld, model = f"{where} word '{fld[1]}'", fld[2:], WordOverride
    elif loc[:1] in (("defaults",), ("acceptance",)):
        model = _FIELDS[loc[0]]
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg.replace("valid tuple", "valid list").replace("Tuple should", "List should")  # YAML has lists
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        msg = f"unknown key '{fld[-1]}' (allowed: {allowed})"
        fld = fld[:-1]
    elif err["type"] == "missing":
        msg = f"missing field '{fld[-1]}'"
        fld = fld[:-1]
    else:
        msg = msg[0].lower() + msg[1:]
    fld = tuple(p for p in fld if p != "[key]")  # pydantic's marker for a failed dict key
    if fld and fld != ("text",):
        label = ".".join(str(p) for p in fld)
        where = f"{where} field '{label}'".strip()
    # "prompt 'p7' is empty" reads as a sentence; anything else follows a colon.
    sep = " " if where and msg.startswith("is ") else ": " if where else ""
    head = f"{path.name} line {line}" if line else path.name
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{head}: {where}{sep}{msg}{more}"


def _prompt_label(data, index: int) -> str:
    try:
        pid = data["prompts"][index].get("id")
    except (AttributeError, IndexError, KeyError, TypeError):
        pid = None
    return f"prompt '{pid}'" if isinstance(pid, (str, int)) and str(pid).strip() else f"prompt #{index + 1}"


# --- checking -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteCheck:
    """What `auditor suite check` reports about a valid suite."""

    suite: Suite
    categories: dict  # concept category -> number of concepts
    roles: dict  # concept role -> number of concepts
    tags: dict  # tag -> number of prompts
    warnings: tuple[str, ...]

    def to_json(self) -> dict:
        s = self.suite
        return {
            "name": s.name, "path": str(s.path), "sha256": s.sha256, "prompts": len(s.prompts),
            "defaults": s.defaults.model_dump(mode="json"),
            "acceptance": s.acceptance.model_dump(mode="json") if s.acceptance else None,
            "tags": self.tags, "concept_roles": self.roles, "concept_categories": self.categories,
            "warnings": list(self.warnings),
        }

    def to_text(self) -> str:
        s = self.suite
        d = s.defaults
        out = [f"suite {s.name}: {len(s.prompts)} prompts ({s.path})",
               f"defaults: steps {d.steps}, seeds {list(d.seeds)}, guidance {d.guidance}, "
               "resolution " + (f"{d.resolution[0]}x{d.resolution[1]}" if d.resolution else "the model's native size"),
               "concepts by role: " + ", ".join(f"{k} {v}" for k, v in self.roles.items()),
               "concepts by category:"]
        width = max(map(len, self.categories), default=0)
        out += [f"  {k.ljust(width)}  {v}" for k, v in self.categories.items()]
        if self.tags:
            out.append("tags: " + ", ".join(f"{k} {v}" for k, v in self.tags.items()))
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)


def check_suite(suite: Suite, tokenizer=None) -> SuiteCheck:
    """Extract every prompt's concepts and summarise; a required category no prompt covers is an error."""
    from collections import Counter

    cats, roles, tags, warnings = Counter(), Counter(), Counter(), []
    for p, cs in zip(suite.prompts, extract_many(suite.prompts, tokenizer)):
        tags.update(p.tags)
        for c in cs.items:
            cats[c.category] += 1
            roles[c.role] += 1
        cut = [c for c in cs.items if c.truncated]
        if cut:
            warnings.append(f"prompt '{p.id}' (line {suite.lines.get(p.id)}): past the 77-token limit: "
                            f"{len(cut)} concept(s) from '{cut[0].text}' (char {cut[0].start}) on")
        known = {lexicon.normalise(c.text) for c in cs.items} | {c.lemma for c in cs.items}
        for w in p.words:
            if lexicon.normalise(w) not in known:
                warnings.append(f"prompt '{p.id}' (line {suite.lines.get(p.id)}): override word '{w}' is not a concept")
    if suite.acceptance:
        for c in suite.acceptance.required_categories:
            if not cats.get(c):
                raise AuditorError(f"{suite.path.name}: acceptance.required_categories: no prompt has a '{c}' concept")
    return SuiteCheck(suite, _by_count(cats), _by_count(roles), _by_count(tags), tuple(warnings))


def _by_count(counter) -> dict:
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))
