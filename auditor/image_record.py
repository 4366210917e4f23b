"""The audit of one image: every scored concept of a traced generation (or of a given image read by the model)
mapped, scored and flagged, as the records the run store keeps (``generation_record``), and the overlays the report
shows (``overlays``)."""

from __future__ import annotations

import numpy as np

from auditor.concepts import VISIBLE_ROLES
from auditor.diagnostics import ConceptView, diagnose
from auditor.engine.maps import category_response, concept_map, normalise
from auditor.lexicon import lookup
from auditor.prompt_maps import overlay
from auditor.vocabulary import SIDE_WORDS as _SIDE_WORDS

SHOWN_METHODS = ("selective", "all_heads")  # stored per concept; the report shows them side by side


def candidate_categories(concept, usable: set[str]) -> list[str]:
    """The categories a word can belong to (by the lexicon, any role), among those the model has heads for."""
    found = [concept.category] + [lookup(concept.lemma or concept.text, r) for r in ("attribute", "object")]
    found += [lookup(concept.text, r) for r in ("attribute", "object")]
    return [c for c in dict.fromkeys(found) if c in usable]


def side_of(position_text: str) -> str | None:
    words = position_text.lower().split()
    return next((w for w in _SIDE_WORDS if w in words), None)


def scored_concepts(concepts) -> list:
    """The concepts that get maps and verdicts: visible roles with tokens inside the model's window."""
    return [c for c in concepts.items if c.role in VISIBLE_ROLES and c.token_indices and not c.negated]


def generation_record(tr, concepts, profile, image=None, k: int | None = None,
                      item: int = 0) -> tuple[list[dict], dict, dict]:
    """Maps, scores and flags of every scored concept of one traced generation (``image``, the generated one, for
    the image-side scores: is a colour word's colour drawn, does an object's map peak on anything drawn).

    Selective maps take each category's top heads and k from ``profile`` (``auditor.profile.AuditProfile``; ``k``
    overrides its k for every category); the category response reads its HRV matrix. An uncalibrated profile
    gives scores and no flags. ``item`` is the generation's slice of a batched trace (``Trace.item``).

    Returns (concept records, maps {"<i>_<method>": raw map}, normalised maps for overlays). Attribute bindings
    (``binds_to``) index this list, so a record stands on its own."""
    relevance = profile.relevance
    ranking = profile.maps_source
    usable = {c for c in relevance.categories if relevance.ranks(c)}  # categories the category response can read
    chosen = scored_concepts(concepts)
    index = {c.id: i for i, c in enumerate(chosen)}
    records, raw_maps, norms, views = [], {}, {}, []
    for i, c in enumerate(chosen):
        method = "selective" if ranking.ranks(c.category) else "all_heads"
        maps = {"selective": None, "all_heads": concept_map(tr, c.token_indices, "all_heads", item=item)}
        if method == "selective":
            maps["selective"] = concept_map(tr, c.token_indices, "selective", ranking, c.category, k, item=item)
        primary = maps[method]
        view = ConceptView(index=i, text=c.text, role=c.role, category=c.category, raw=primary.raw,
                           binds_to=index.get(c.binds_to) if c.role == "attribute" else None)
        cands = candidate_categories(c, usable)
        if len(cands) > 1 and c.category in usable:
            view.category_response = category_response(tr, c.token_indices, relevance, cands, profile.response_k,
                                                        item=item)
            view.expected_category = c.category
        views.append(view)
        rec = {"id": i, "text": c.text, "lemma": c.lemma, "role": c.role, "category": c.category,
               "category_source": c.category_source, "binds_to": view.binds_to, "token_indices": list(c.token_indices),
               "map_method": method}
        if primary.k is not None:
            rec["k"] = primary.k
        if c.role == "object":
            rec["count"] = c.count
        if method != "selective":
            rec["note"] = (f"no calibrated heads for category {c.category!r}: verdicts use the all-heads map")
        if view.category_response:
            rec["category_response"] = {k_: round(v, 6) for k_, v in view.category_response.items()}
        records.append(rec)
        for name, m in maps.items():
            if m is not None:
                raw_maps[f"{i}_{name}"] = m.raw.astype(np.float16)
                norms[f"{i}_{name}"] = normalise(m.raw)
    # Where the prompt puts things: absolute positions and relations between objects.
    for c in concepts.items:
        if c.role == "position" and c.binds_to in index and side_of(c.text):
            views[index[c.binds_to]].position = side_of(c.text)
        if c.role == "relation" and c.subject in index and c.object in index:
            views[index[c.subject]].relations.append((c.text.lower(), index[c.object]))
    for v, rec in zip(views, records):
        if v.position:
            rec["position"] = v.position
        if v.relations:
            rec["relations"] = [{"relation": r, "object": o} for r, o in v.relations]
    th = profile.judging_thresholds()
    sc, flags = diagnose(views, th, None if image is None else np.asarray(image.convert("RGB")))
    for i, rec in enumerate(records):
        rec["scores"] = {k_: clean(v) for k_, v in sc.get(i, {}).items()}
        rec["flags"] = [f.to_json() for f in flags if f.concept == i]
    return records, raw_maps, norms


def clean(v):
    if isinstance(v, (float, np.floating)):
        return round(float(v), 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def overlays(image, norms: dict, concepts: list[dict]) -> dict:
    return {key: overlay(image, m, alpha=0.55) for key, m in norms.items()}
