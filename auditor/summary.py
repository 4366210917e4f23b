"""The numbers at the top of a report: what passed, what was flagged, how often, and the suite's acceptance verdict.

The unit of counting is a *(concept, seed) pair*: one concept of one prompt in one generated image. A pair is
flagged when the diagnostics raised at least one flag on that concept in that image.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from auditor.vocabulary import FLAG_TYPES

UNCATEGORISED = "uncategorised"
FIDELITY_DEFINITION = ("the share of (concept, seed) pairs with no flag: every concept of every prompt, in every "
                       "seed's image, counts once; 1.0 means no diagnostic fired anywhere")
PROMPT_RULE = "a prompt passes when none of its concepts is flagged in more than {rate:.0%} of its seeds"
UNCALIBRATED_RULE = ("uncalibrated: the model's profile has no diagnostic thresholds, so no concept is flagged and "
                     "no prompt can fail; run `auditor calibrate` for verdicts")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n; stays inside [0, 1] and is honest at 0/n and n/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Pair:
    """One concept of one prompt in one seed's image."""

    prompt_id: str
    concept: str  # label unique within the prompt, e.g. "red (attribute of cube)"
    text: str
    role: str
    category: str
    seed: int
    types: frozenset  # flag types raised
    scores: dict
    bound: str | None = None  # text of the object an attribute is said of
    verdicts: tuple = ()  # what each flag raised says the evidence probably means

    @property
    def flagged(self) -> bool:
        return bool(self.types)


def _bound_text(c: dict, concepts: list[dict]):
    """The text of the object concept ``c`` is said of (``binds_to`` holds its index; older records the text)."""
    bound = c.get("binds_to")
    if isinstance(bound, int) and not isinstance(bound, bool) and 0 <= bound < len(concepts):
        return concepts[bound].get("text")
    return bound


def concept_labels(concepts: list[dict]) -> list[str]:
    """A readable label per concept, unique within its prompt: text, role, the object it binds to, and an ordinal
    when the same word plays the same part twice ("a red cube and a red ball" has two red attributes)."""
    labels = []
    for c in concepts:
        bound = _bound_text(c, concepts)
        role = c.get("role") or "concept"
        labels.append(f"{c.get('text')} ({role} of {bound})" if bound else f"{c.get('text')} ({role})")
    seen: Counter = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def pairs_of(generations: list[dict]) -> list[Pair]:
    out = []
    for g in generations:
        concepts = g.get("concepts") or []
        for label, c in zip(concept_labels(concepts), concepts):
            flags = c.get("flags") or []
            out.append(Pair(g["prompt_id"], label, str(c.get("text")), c.get("role") or "concept",
                            c.get("category") or UNCATEGORISED, int(g["seed"]),
                            frozenset(f["type"] for f in flags), c.get("scores") or {}, _bound_text(c, concepts),
                            tuple(f.get("verdict") or "" for f in flags)))
    return out


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"flagged": k, "pairs": n, "rate": round(k / n, 4) if n else None, "ci": [round(lo, 4), round(hi, 4)]}


def summarise(generations: list[dict], acceptance, max_flag_rate: float | None) -> dict:
    """Summary of a run's finished generations. ``acceptance`` is the suite's block (dict or pydantic model) or None;
    ``max_flag_rate`` is the per-concept rate across seeds above which a concept fails its prompt (the profile's;
    None for an uncalibrated profile, whose runs raise no flag, so nothing fails and ``calibrated`` is False)."""
    pairs = pairs_of(generations)
    by_concept: dict[tuple[str, str], list[Pair]] = defaultdict(list)
    for p in pairs:
        by_concept[(p.prompt_id, p.concept)].append(p)

    concepts = []
    for (pid, label), ps in by_concept.items():
        k = sum(p.flagged for p in ps)
        types = Counter(t for p in ps for t in p.types)
        concepts.append({"prompt_id": pid, "concept": label, "text": ps[0].text, "role": ps[0].role,
                         "category": ps[0].category, "seeds": len(ps), **_rate(k, len(ps)),
                         "by_type": {t: types.get(t, 0) for t in FLAG_TYPES},
                         "passed": max_flag_rate is None or k / len(ps) <= max_flag_rate, **across_seeds(ps)})

    prompt_ids = list(dict.fromkeys(g["prompt_id"] for g in generations))
    failed = [pid for pid in prompt_ids if any(not c["passed"] for c in concepts if c["prompt_id"] == pid)]

    flag_types = Counter()
    by_cat_type: dict[str, Counter] = defaultdict(Counter)
    for g in generations:
        for c in g.get("concepts") or []:
            for f in c.get("flags") or []:
                flag_types[f["type"]] += 1
                by_cat_type[c.get("category") or UNCATEGORISED][f["type"]] += 1

    categories = {}
    for cat in sorted({p.category for p in pairs}):
        ps = [p for p in pairs if p.category == cat]
        categories[cat] = {"concepts": len({(p.prompt_id, p.concept) for p in ps}), **_rate(sum(p.flagged for p in ps), len(ps)),
                           "by_type": {t: by_cat_type[cat].get(t, 0) for t in FLAG_TYPES}}

    clean = sum(not p.flagged for p in pairs)
    lo, hi = wilson(clean, len(pairs))
    return {
        "generations": len(generations),
        "seeds": sorted({int(g["seed"]) for g in generations}),
        "max_flag_rate": max_flag_rate,
        "calibrated": max_flag_rate is not None,
        "prompts": {"total": len(prompt_ids), "passed": len(prompt_ids) - len(failed), "flagged": len(failed),
                    "flagged_ids": failed,
                    "rule": UNCALIBRATED_RULE if max_flag_rate is None else PROMPT_RULE.format(rate=max_flag_rate)},
        "fidelity": {"score": round(clean / len(pairs), 4) if pairs else None, "clean": clean, "pairs": len(pairs),
                     "ci": [round(lo, 4), round(hi, 4)], "definition": FIDELITY_DEFINITION},
        "flags_by_type": {t: flag_types.get(t, 0) for t in FLAG_TYPES},
        "flags_by_category": {cat: {t: n.get(t, 0) for t in FLAG_TYPES} for cat, n in sorted(by_cat_type.items())},
        "categories": categories,
        "concepts": concepts,
        "acceptance": acceptance_results(pairs, acceptance),
    }


def across_seeds(ps: list[Pair]) -> dict:
    """What a concept's flags say over its seeds: ``verdict``, the meaning its flags give most often (None for old
    runs whose flags carry none), and ``sentence``, one line naming the words ("'purple' on 'star': flagged in 7 of 8
    seeds (misinterpreted ×7) — the colour is probably not drawn as asked"); both None when it was never flagged."""
    k = sum(p.flagged for p in ps)
    if not k:
        return {"verdict": None, "sentence": None}
    types = Counter(t for p in ps for t in p.types)
    said = Counter(v for p in ps for v in p.verdicts if v)
    verdict = said.most_common(1)[0][0] if said else None
    name = f"'{ps[0].text}'" + (f" on '{ps[0].bound}'" if ps[0].bound else "")
    kinds = ", ".join(f"{t} ×{types[t]}" for t in FLAG_TYPES if types.get(t))
    seeds = f"{len(ps)} seed{'s' if len(ps) != 1 else ''}"
    sentence = f"{name}: flagged in {k} of {seeds} ({kinds})" + (f" — {verdict}" if verdict else "")
    return {"verdict": verdict, "sentence": sentence}


def acceptance_results(pairs: list[Pair], acceptance) -> dict:
    """Each declared criterion with its measured value. A criterion that cannot be measured (no concept of the
    category in the run) fails: a compliance gate must not pass on missing evidence."""
    if acceptance is None:
        return {"declared": False, "passed": None, "criteria": []}
    acc = acceptance.model_dump(mode="json") if hasattr(acceptance, "model_dump") else dict(acceptance)
    criteria = []

    def rate(ps: list[Pair], flag_type: str | None) -> float | None:
        if not ps:
            return None
        hit = sum((flag_type in p.types) if flag_type else p.flagged for p in ps)
        return round(hit / len(ps), 4)

    for ftype, limit in (acc.get("max_flag_rate") or {}).items():
        measured = rate(pairs, None if ftype == "any" else ftype)
        criteria.append(_criterion(f"flag rate ({ftype})", limit, measured,
                                   f"share of (concept, seed) pairs with {'any flag' if ftype == 'any' else 'a ' + ftype + ' flag'}"))
    for cat, limit in (acc.get("max_flag_rate_per_category") or {}).items():
        measured = rate([p for p in pairs if p.category == cat], None)
        criteria.append(_criterion(f"flag rate of category {cat}", limit, measured,
                                   f"share of {cat} (concept, seed) pairs with any flag"))
    for cat in acc.get("required_categories") or []:
        n = sum(p.category == cat for p in pairs)
        criteria.append({"criterion": f"category {cat} audited", "kind": "count", "limit": 1, "measured": n,
                         "passed": n > 0, "note": f"(concept, seed) pairs of category {cat} in the run (at least 1)"})
    return {"declared": True, "passed": all(c["passed"] for c in criteria), "criteria": criteria}


def _criterion(name: str, limit: float, measured: float | None, note: str) -> dict:
    """A "rate at most limit" criterion."""
    if measured is None:
        note += " — nothing to measure in this run"
    return {"criterion": name, "kind": "max_rate", "limit": limit, "measured": measured,
            "passed": measured is not None and measured <= limit, "note": note}
