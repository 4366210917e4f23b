"""Verdicts per concept of one generation, from its selective map: missing, misplaced, misinterpreted.

Nothing here knows the shapes world: it reads concept records (role, category, binding, named position, relations)
and the maps the engine built from a relevance matrix, so it runs the same on a real checkpoint. Every score is
scale-free (a ratio, a share, an overlap, a position in image fractions, a log-ratio), so thresholds calibrated on
one model mean the same thing on another.

- **missing** (an object the model neglected): its selective map has no confident region of its own — next to
  another object, its peak is weak beside the strongest object's (``peak_ratio``), its region is mostly a
  stronger object's region (``shared_region``: IoU) or spread over much of the image (``area``: on shapes-v2 a
  neglected object's map covers the background around the object that was drawn) or its mass is diffuse
  (``concentration``: share of the mass inside its own region); for any object, lone ones too, its map peaks on
  empty background in the image (``drawn_share``, from ``auditor.pixels``) or on pixels of another colour than its
  named one (``own_colour``). An object whose map peaks on a drawn thing of its own (``own_drawn``) is not flagged
  by the attention rules or the own-colour rule (``overruled``);
- **misplaced**: an attribute's mass lands on another object's region rather than its own object's
  (``binding_margin``: own-region share minus the best other object's share; not when that other object is judged
  missing in the image), or an object's map sits on the wrong side of the image or of another object for the
  position or relation the prompt names (``side_offset``);
- **misinterpreted**: for a word with several candidate readings (categories), its attention within each
  category's top heads is stronger for another category than the one its role implies (``category_margin``); or,
  for a colour word, the image holds little of that colour where its colour heads look or its object's map lies
  (``colour_share``, from ``auditor.pixels``: attention alone cannot tell which colour was drawn).

Scores do not depend on thresholds: ``scores`` computes them, ``flags_from_scores`` applies thresholds, so stored
results can be re-judged (``flags_from_records``) without the maps. Thresholds come from the model's audit profile
(``auditor.profile``); ``auditor.thresholds`` says what each one cuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from auditor.engine.maps import binarize
from auditor.thresholds import Thresholds
from auditor.vocabulary import SIDE_WORDS
from auditor import pixels

# named side -> (axis, sign): axis 0 = x, 1 = y; sign -1 = low side (left, right, top, bottom in SIDE_WORDS' order)
SIDES = dict(zip(SIDE_WORDS, ((0, -1), (0, 1), (1, -1), (1, 1))))
RELATION_SIDES = {"to the left of": (0, -1), "left of": (0, -1), "to the right of": (0, 1), "right of": (0, 1),
                  "above": (1, -1), "on top of": (1, -1), "over": (1, -1), "below": (1, 1), "under": (1, 1),
                  "beneath": (1, 1)}
# threshold field -> (score it cuts, the side that is bad, the role the score exists for): used by calibration
SCORE_DIRECTIONS = {
    "min_peak_ratio": ("peak_ratio", "low", "object"),
    "min_concentration": ("concentration", "low", "object"),
    "max_shared_region": ("shared_region", "high", "object"),
    "max_area": ("area", "high", "object"),
    "min_drawn_share": ("drawn_share", "low", "object"),
    "min_own_colour": ("own_colour", "low", "object"),
    "min_binding_margin": ("binding_margin", "low", "attribute"),
    "position_margin": ("side_offset", "low", "object"),
    "min_category_margin": ("category_margin", "low", None),
    "min_colour_share": ("colour_share", "low", "attribute"),
}


@dataclass
class ConceptView:
    """What the diagnostics need of one concept in one generation."""

    index: int
    text: str
    role: str  # object | attribute | ...
    category: str
    raw: np.ndarray | None  # selective map before normalisation [S, S]; None when re-judging stored scores
    binds_to: int | None = None  # index of the object an attribute modifies
    position: str | None = None  # absolute position the prompt names for an object
    relations: list[tuple[str, int]] = field(default_factory=list)  # (relation, other object index), this = subject
    category_response: dict[str, float] = field(default_factory=dict)  # candidate category -> response
    expected_category: str | None = None  # set when the word has several candidate readings


@dataclass
class Flag:
    type: str
    severity: str  # low | medium | high
    message: str  # the evidence, then " — " and the verdict
    concept: int
    scores: dict = field(default_factory=dict)
    verdict: str = ""  # what the evidence probably means, in a few words (the summary's sentence across seeds ends so)

    def to_json(self) -> dict:
        return {"type": self.type, "severity": self.severity, "message": self.message, "verdict": self.verdict,
                "scores": {k: _round(v) for k, v in self.scores.items()}}


def _flag(type_: str, excess: float, evidence: str, verdict: str, concept: int, scores: dict) -> Flag:
    return Flag(type_, _severity(excess), f"{evidence} — {verdict}", concept, scores, verdict)


def _round(v):
    return round(float(v), 4) if isinstance(v, (float, np.floating)) else v


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def _centroid(raw: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mass-weighted centre of the region, as fractions of width and height (0 = left / top)."""
    w = raw * mask
    if w.sum() <= 0:
        w = raw
    ys, xs = np.mgrid[0 : raw.shape[0], 0 : raw.shape[1]]
    s = w.sum() + 1e-12
    return float((w * xs).sum() / s / max(raw.shape[1] - 1, 1)), float((w * ys).sum() / s / max(raw.shape[0] - 1, 1))


def _severity(excess: float) -> str:
    """How far past its threshold a score is, as a share of the threshold's distance to the score's far end."""
    return "high" if excess > 0.5 else "medium" if excess > 0.2 else "low"


def _past(value: float, threshold: float, direction: str, lo: float, hi: float) -> float:
    """How far ``value`` is past ``threshold`` towards the bad end of [lo, hi], in [0, 1]."""
    span = (threshold - lo) if direction == "low" else (hi - threshold)
    d = (threshold - value) if direction == "low" else (value - threshold)
    return max(0.0, min(1.0, d / span)) if span > 1e-9 else 1.0


def views_by(views: list[ConceptView], index: int) -> ConceptView:
    return next(v for v in views if v.index == index)


# --- scores ---------------------------------------------------------------------------------------------------


def scores(views: list[ConceptView], image: np.ndarray | None = None) -> dict[int, dict]:
    """Every number a verdict rests on, per concept (kept in results.json as evidence). ``image`` (the generated
    image, [H, W, 3] uint8) adds the image-side scores (``drawn_share``, ``colour_share``); without it they are
    skipped."""
    px = pixels.read(image) if image is not None else None
    masks = {v.index: binarize(v.raw) for v in views}
    objects = [v for v in views if v.role == "object"]
    top_peak = max((float(v.raw.max()) for v in objects), default=0.0)
    own_drawn = pixels.own_drawn_shares({o.index: o.raw for o in objects}, px) \
        if px is not None and objects else None
    out: dict[int, dict] = {}
    for v in views:
        m = masks[v.index]
        total = float(v.raw.sum()) + 1e-12
        s = {
            "peak": float(v.raw.max()),
            "mass": float(v.raw.mean()),
            "area": float(m.mean()),
            "concentration": float((v.raw * m).sum() / total),
        }
        s["centroid_x"], s["centroid_y"] = _centroid(v.raw, m)
        if v.role == "object" and len(objects) > 1:
            s["peak_ratio"] = s["peak"] / top_peak if top_peak > 0 else 0.0
            # Overlap with a stronger object's region: the weaker of two objects sharing a region has none of its own.
            shared = [(o.index, _iou(m, masks[o.index])) for o in objects
                      if o.index != v.index and float(o.raw.max()) >= s["peak"]]
            j, best = max(shared, key=lambda t: t[1]) if shared else (None, 0.0)
            s["shared_region"], s["shared_with"] = best, j
        if v.binds_to is not None and len(objects) > 1:
            own = float((v.raw * masks[v.binds_to]).sum() / total)
            other = [(o.index, float((v.raw * masks[o.index]).sum() / total)) for o in objects if o.index != v.binds_to]
            j, best = max(other, key=lambda t: t[1])
            s["own_share"], s["other_share"], s["other_object"] = own, best, j
            s["binding_margin"] = own - best
        if v.expected_category and len(v.category_response) > 1:
            exp = v.category_response.get(v.expected_category, 0.0)
            rivals = {c: r for c, r in v.category_response.items() if c != v.expected_category}
            rc = max(rivals, key=rivals.get)
            s["expected_response"], s["winner"] = exp, max(v.category_response, key=v.category_response.get)
            s["category_margin"] = math.log((exp + 1e-9) / (rivals[rc] + 1e-9))
            s["rival_category"] = rc
        if px is not None and v.role == "object":
            s["drawn_share"] = pixels.drawn_share(v.raw, px)
            if own_drawn is not None:
                s["own_drawn"] = own_drawn[v.index]
            s.update(_own_colour(v, views, px))
        if px is not None and v.role == "attribute" and pixels.checkable(v.text):
            # Where the word looks or where its object is: a word whose attention strays to the other object (the
            # binding scores judge that) must not read as a colour not drawn when its object has the colour.
            looks = [v.raw] + [o.raw for o in objects if o.index == v.binds_to]
            got = [c for c in (pixels.colour_scores(raw, v.text, px) for raw in looks) if c]
            if got:
                s.update(max(got, key=lambda c: c["colour_share"]))
        out[v.index] = s
    for v in views:  # where the prompt puts an object: needs every centroid first
        if v.role == "object":
            out[v.index].update(_side_scores(v, out))
    return out


def _own_colour(v: ConceptView, views: list[ConceptView], px) -> dict:
    """For an object a colour word describes: the share of its map's peak region on pixels of that colour (the
    lowest over its colour words) and the word; nothing when no colour word of it can be read in this image."""
    got = [g for g in ((pixels.named_share(v.raw, a.text, px), a.text) for a in views if a.role == "attribute"
                       and a.binds_to == v.index and pixels.checkable(a.text)) if g[0] is not None]
    return dict(zip(("own_colour", "own_colour_word"), min(got))) if got else {}


def _side_scores(v: ConceptView, sc: dict) -> dict:
    """The most wrong of the object's named position and relations: how far (image fractions) its centroid is on
    the named side (positive) or the other side (negative)."""
    s = sc[v.index]
    c = (s["centroid_x"], s["centroid_y"])
    worst: dict = {}
    if v.position in SIDES:
        axis, sign = SIDES[v.position]
        worst = {"side_offset": (c[axis] - 0.5) * sign, "side_rule": v.position}
    for rel, other in v.relations:
        if rel not in RELATION_SIDES or other not in sc:
            continue
        axis, sign = RELATION_SIDES[rel]
        off = (c[axis] - (sc[other]["centroid_x"], sc[other]["centroid_y"])[axis]) * sign
        if not worst or off < worst["side_offset"]:
            worst = {"side_offset": off, "side_rule": rel, "side_other": other}
    return worst


# --- verdicts -------------------------------------------------------------------------------------------------


def flags_from_scores(views: list[ConceptView], sc: dict[int, dict], th: Thresholds) -> list[Flag]:
    """The flags the thresholds raise on precomputed scores (no maps needed)."""
    flags: list[Flag] = []
    missing = {v.index: _missing(v, sc[v.index], views, th) for v in views if v.role == "object"}
    for v in views:
        s = sc[v.index]
        name = f"'{v.text}'"
        if v.role == "object":
            if missing[v.index]:
                flags.append(missing[v.index])
            f = _misplaced_object(v, s, views, th)
            if f:
                flags.append(f)
        # An attribute's attention on another object's region says it went to that object only if that object is
        # drawn: beside an object judged missing, its flag says why the prompt failed and this one would misstate it.
        if s.get("binding_margin") is not None and th.min_binding_margin is not None \
                and s["binding_margin"] < th.min_binding_margin \
                and not missing.get(s["other_object"]):
            own = views_by(views, v.binds_to).text
            other = views_by(views, s["other_object"]).text
            excess = _past(s["binding_margin"], th.min_binding_margin, "low", -1.0, 1.0)
            flags.append(_flag("misplaced", excess,
                               f"{name} (said of '{own}'): its {v.category} heads put {s['other_share']:.0%} of their "
                               f"attention on '{other}' and {s['own_share']:.0%} on '{own}' (margin "
                               f"{s['binding_margin']:+.2f}, threshold {th.min_binding_margin:+.2f})",
                               f"the {v.category} probably went to '{other}'",
                               v.index, _pick(s, "own_share", "other_share", "binding_margin")))
        if s.get("category_margin") is not None and th.min_category_margin is not None \
                and s["category_margin"] < th.min_category_margin:
            excess = _past(s["category_margin"], th.min_category_margin, "low",
                           th.min_category_margin - 2.0, th.min_category_margin + 2.0)
            flags.append(_flag("misinterpreted", excess,
                               f"{name} reads as {s['rival_category']}, not {v.expected_category}: its attention "
                               f"within the {s['rival_category']} heads is close to or above its "
                               f"{v.expected_category} heads' (log-ratio {s['category_margin']:+.2f}, threshold "
                               f"{th.min_category_margin:+.2f})",
                               f"the model may have read the word as {s['rival_category']}",
                               v.index, _pick(s, "expected_response", "category_margin", "winner")))
        excess = _beyond(s, th, "min_colour_share")
        if excess is not None:
            on = f" on '{views_by(views, v.binds_to).text}'" if v.binds_to is not None else ""
            instead = f"mostly {s['drawn_colour']}" if s.get("drawn_colour") else "no colour but the background's"
            flags.append(_flag("misinterpreted", excess,
                               f"{name}{on}: where its {v.category} heads look, the image is {instead}, only "
                               f"{s['colour_share']:.0%} {v.text} (threshold {th.min_colour_share:.0%})",
                               "the colour is probably not drawn as asked",
                               v.index, _pick(s, "colour_share", "drawn_colour")))
    return flags


def _beyond(s: dict, th: Thresholds, name: str) -> float | None:
    """How far the score that threshold ``name`` cuts is past it, in [0, 1] (its direction from SCORE_DIRECTIONS;
    shares span [0, 1]); None when the score is absent or on the healthy side."""
    score, direction, _ = SCORE_DIRECTIONS[name]
    value, cut = s.get(score), getattr(th, name)
    if value is None or cut is None or (value >= cut if direction == "low" else value <= cut):
        return None
    return _past(value, cut, direction, 0.0, 1.0)


def judges(name: str, s: dict) -> bool:
    """Whether the rule of threshold ``name`` applies to a concept with scores ``s`` (calibration reads this too,
    so each threshold is set on the concepts it judges): the area and concentration rules only next to another
    object (peak_ratio exists then), since a lone object's map may spread over the image legitimately (on the
    shapes-v1 tuning prompts, concentration flagged 7 lone objects, 1 of them not drawn)."""
    return not (name in ("max_area", "min_concentration") and s.get("peak_ratio") is None)


ATTENTION_ONLY = ("min_peak_ratio", "min_concentration", "max_shared_region", "max_area")  # missing rules, no pixels


OWN_MAJORITY = 0.5  # "mostly its own colour": at least half of what is drawn under the map's peak
YIELD_TO_OWN_DRAWN = ATTENTION_ONLY + ("min_own_colour",)


def overruled(name: str, s: dict, th: Thresholds) -> bool:
    """Whether the image overrules missing-rule ``name``. The attention-only rules and the own-colour rule stay
    silent when the object's map peaks on a drawn thing of its own (``own_drawn`` at least ``min_drawn_share``, the
    share that counts as "on something drawn"): it is drawn, and a wrong colour is its colour word's flag.
    Attention alone flags drawn objects whose maps are weak or diffuse: at the thresholds tuned without this rule,
    it silenced 14 of the 33 missing flags on healthy shapes-v1 tuning concepts and 3 of the 12 false star flags of
    the shapes-v2 evaluation, and no true one. The drawn-share rule stays silent when what is drawn under the map's
    peak is mostly the object's own named colour (``own_colour`` at least ``min_own_colour`` and at least
    ``OWN_MAJORITY`` of ``drawn_share``): a small object drawn as named, its map spilling onto the background."""
    if name == "min_drawn_share":
        own = s.get("own_colour")
        return own is not None and th.min_own_colour is not None and own >= th.min_own_colour \
            and own >= OWN_MAJORITY * s.get("drawn_share", 0.0)
    own = s.get("own_drawn")
    return name in YIELD_TO_OWN_DRAWN and own is not None and th.min_drawn_share is not None \
        and own >= th.min_drawn_share


def _missing(v: ConceptView, s: dict, views, th: Thresholds) -> Flag | None:
    rules = {  # threshold -> why it fired, in words
        "min_peak_ratio": lambda: f"its peak is {s['peak_ratio']:.0%} of the strongest object's "
                                  f"(threshold {th.min_peak_ratio:.0%})",
        "min_concentration": lambda: f"only {s['concentration']:.0%} of its attention falls in its own region "
                                     f"(threshold {th.min_concentration:.0%})",
        "max_shared_region": lambda: f"its region overlaps '{views_by(views, s['shared_with']).text}'s by "
                                     f"{s['shared_region']:.0%} IoU (threshold {th.max_shared_region:.0%})",
        "max_area": lambda: f"its region covers {s['area']:.0%} of the image (threshold {th.max_area:.0%}), spread "
                            f"rather than on an object",
        "min_drawn_share": lambda: f"only {s['drawn_share']:.0%} of its peak falls on anything drawn in the image "
                                   f"(threshold {th.min_drawn_share:.0%})",
        "min_own_colour": lambda: f"only {s['own_colour']:.0%} of its peak falls on {s['own_colour_word']} pixels "
                                  f"(threshold {th.min_own_colour:.0%})",
    }
    reasons, excess = [], 0.0
    for name, why in rules.items():
        past = _beyond(s, th, name) if judges(name, s) and not overruled(name, s, th) else None
        if past is None:
            continue
        reasons.append(why())
        excess = max(excess, past)
    if not reasons:
        return None
    return _flag("missing", excess,
                 f"'{v.text}': its {v.category} heads find no region of its own ({'; '.join(reasons)})",
                 "the object is probably not drawn", v.index,
                 _pick(s, "peak_ratio", "concentration", "shared_region", "area", "drawn_share", "own_drawn",
                       "own_colour"))


def _misplaced_object(v: ConceptView, s: dict, views, th: Thresholds) -> Flag | None:
    off = s.get("side_offset")
    if off is None or th.position_margin is None or off >= th.position_margin:
        return None
    excess = _past(off, th.position_margin, "low", -0.5, 0.5)
    where = f"its map is centred at x={s['centroid_x']:.2f}, y={s['centroid_y']:.2f}"
    if s.get("side_other") is not None:
        o = views_by(views, s["side_other"]).text
        msg = f"'{v.text}' should be {s['side_rule']} '{o}', but {where}, {off:+.2f} on that side of '{o}'s"
        verdict = f"it is probably not {s['side_rule']} '{o}'"
    else:
        msg = f"'{v.text}': the prompt puts it at the {s['side_rule']}, but {where} ({off:+.2f} towards that side)"
        verdict = f"it is probably not at the {s['side_rule']}"
    return _flag("misplaced", excess, msg + f" (threshold {th.position_margin:+.2f})", verdict, v.index,
                 _pick(s, "side_offset", "centroid_x", "centroid_y"))


def _pick(s: dict, *keys) -> dict:
    return {k: s[k] for k in keys if s.get(k) is not None}


def diagnose(views: list[ConceptView], th: Thresholds | None, image: np.ndarray | None = None
             ) -> tuple[dict[int, dict], list[Flag]]:
    """Scores and flags for every concept of one generation (``image``: see ``scores``). Without thresholds (an
    uncalibrated profile) there are scores and no flags: nothing says where a score turns bad."""
    sc = scores(views, image)
    return sc, ([] if th is None else flags_from_scores(views, sc, th))


# --- stored results -------------------------------------------------------------------------------------------


def views_from_records(records: list[dict], maps: dict | None = None) -> list[ConceptView]:
    """Concept views rebuilt from results.json concept records (``maps``: ``{"<i>_selective": raw}``, optional)."""
    views = []
    for i, r in enumerate(records):
        raw = None
        if maps is not None:
            raw = maps.get(f"{i}_{r.get('map_method', 'selective')}")
            raw = None if raw is None else np.asarray(raw, dtype=np.float32)
        resp = dict(r.get("category_response") or {})
        views.append(ConceptView(index=i, text=r["text"], role=r["role"], category=r.get("category"), raw=raw,
                                 binds_to=r.get("binds_to"), position=r.get("position"),
                                 relations=[(x["relation"], x["object"]) for x in r.get("relations") or []],
                                 category_response=resp, expected_category=r.get("category") if resp else None))
    return views


def flags_from_records(records: list[dict], th: Thresholds) -> list[Flag]:
    """Re-judge stored concept records (their ``scores``) under other thresholds."""
    views = views_from_records(records)
    return flags_from_scores(views, {i: r.get("scores") or {} for i, r in enumerate(records)}, th)
