"""The records concept extraction produces: ``Concept`` (one word or phrase with its role, category, binding and
token indices) and ``Concepts`` (a prompt's concepts, as parsed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from auditor.errors import AuditorError

ROLE_ORDER = ("object", "background", "attribute", "count", "position", "relation", "style")
VISIBLE_ROLES = ("object", "background", "attribute", "style")  # roles whose words name something visible: mapped


@dataclass(frozen=True)
class Concept:
    id: int
    text: str
    lemma: str
    role: str  # one of ROLE_ORDER
    category: str  # a lexicon category, or "unknown"
    category_source: str  # "lexicon" | "override" | "parse" (a verb the lexicon lacks, by its tag) | "unknown"
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
