"""Verdicts per concept of one generation, from its selective map: missing, misplaced, misinterpreted.

Nothing here knows the shapes world: it reads concept records (role, category, binding, named position, relations)
and the maps the engine built from a relevance matrix, so it runs the same on a real checkpoint.

- **missing** (an object the model neglected): its selective map has no confident region of its own — its peak is
  weak next to the prompt's other objects, its mass is diffuse, or its region is mostly another object's region;
- **misplaced**: an attribute's mass lands on another object's region rather than its own object's (leakage /
  wrong binding), or an object's map sits away from the position or relation the prompt names;
- **misinterpreted**: across the categories the word can belong to, its attention within each category's top heads
  is strongest for a category its role does not imply ("orange" as a modifier should win colour).
Thresholds: ``auditor.thresholds`` (one place).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from auditor.engine.maps import binarize
from auditor.thresholds import Thresholds

FLAG_TYPES = ("missing", "misplaced", "misinterpreted")
SIDES = {  # named position -> (axis, sign): axis 0 = x, 1 = y; sign -1 = low side
    "left": (0, -1),
    "right": (0, 1),
    "top": (1, -1),
    "bottom": (1, 1),
}
RELATION_SIDES = {"to the left of": (0, -1), "left of": (0, -1), "to the right of": (0, 1), "right of": (0, 1),
                  "above": (1, -1), "on top of": (1, -1), "over": (1, -1), "below": (1, 1), "under": (1, 1),
                  "beneath": (1, 1)}


@dataclass
class ConceptView:
    """What the diagnostics need of one concept in one generation."""

    index: int
    text: str
    role: str  # object | attribute | ...
    category: str
    raw: np.ndarray  # selective map before normalisation [S, S] (attention probability, summed over tokens)
    binds_to: int | None = None  # index of the object an attribute modifies
    position: str | None = None  # absolute position the prompt names for an object
    relations: list[tuple[str, int]] = field(default_factory=list)  # (relation, other object index), this = subject
    category_response: dict[str, float] = field(default_factory=dict)  # candidate category -> response
    expected_category: str | None = None  # set when the word has several candidate readings


@dataclass
class Flag:
    type: str
    severity: str  # low | medium | high
    message: str
    concept: int
    scores: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"type": self.type, "severity": self.severity, "message": self.message,
                "scores": {k: _round(v) for k, v in self.scores.items()}}


def _round(v):
    return round(float(v), 4) if isinstance(v, (float, np.floating)) else v


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def _centroid(raw: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    w = raw * mask
    if w.sum() <= 0:
        w = raw
    ys, xs = np.mgrid[0 : raw.shape[0], 0 : raw.shape[1]]
    s = w.sum() + 1e-12
    return float((w * xs).sum() / s / (raw.shape[1] - 1)), float((w * ys).sum() / s / (raw.shape[0] - 1))


def _severity(excess: float) -> str:
    """How far past its threshold a score is, in units of the threshold's own scale."""
    return "high" if excess > 1.0 else "medium" if excess > 0.4 else "low"


def scores(views: list[ConceptView]) -> dict[int, dict]:
    """Every number a verdict rests on, per concept (kept in results.json as evidence)."""
    masks = {v.index: binarize(v.raw) for v in views}
    objects = [v for v in views if v.role == "object"]
    top_peak = max((float(v.raw.max()) for v in objects), default=0.0)
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
        if v.role == "object":
            s["peak_ratio"] = s["peak"] / top_peak if top_peak > 0 else 0.0
            others = [(o.index, _iou(m, masks[o.index])) for o in objects if o.index != v.index]
            # An object whose region is mostly another one's: only the weaker of the two has no region of its own.
            shared = [(j, iou) for j, iou in others if float(views_by(views, j).raw.max()) >= s["peak"]]
            s["shared_region"] = max((iou for _, iou in shared), default=0.0)
            s["shared_with"] = max(shared, key=lambda t: t[1])[0] if shared else None
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
        out[v.index] = s
    return out


def views_by(views: list[ConceptView], index: int) -> ConceptView:
    return next(v for v in views if v.index == index)


def diagnose(views: list[ConceptView], th: Thresholds) -> tuple[dict[int, dict], list[Flag]]:
    """Scores and flags for every concept of one generation."""
    sc = scores(views)
    flags: list[Flag] = []
    for v in views:
        s = sc[v.index]
        name = f"'{v.text}'"
        if v.role == "object":
            reasons, excess = [], 0.0
            if s["peak_ratio"] < th.min_peak_ratio:
                reasons.append(f"its peak is {s['peak_ratio']:.0%} of the strongest object's")
                excess = max(excess, (th.min_peak_ratio - s["peak_ratio"]) / th.min_peak_ratio * 2)
            if s["concentration"] < th.min_concentration:
                reasons.append(f"only {s['concentration']:.0%} of its attention falls in its own region")
                excess = max(excess, (th.min_concentration - s["concentration"]) / th.min_concentration * 2)
            if s["shared_region"] > th.max_shared_region:
                other = views_by(views, s["shared_with"]).text
                reasons.append(f"its region is {s['shared_region']:.0%} the same as '{other}'s")
                excess = max(excess, (s["shared_region"] - th.max_shared_region) / (1 - th.max_shared_region + 1e-9))
            if reasons:
                flags.append(Flag("missing", _severity(excess),
                                  f"{name}: its {v.category} heads find no region of its own ({'; '.join(reasons)}) "
                                  f"— the object is probably not drawn", v.index, _pick(s, "peak_ratio", "concentration", "shared_region")))
            pos_flag = _position_flag(v, s, sc, views, th)
            if pos_flag:
                flags.append(pos_flag)
        if "binding_margin" in s and s["binding_margin"] < th.min_binding_margin:
            own = views_by(views, v.binds_to).text
            other = views_by(views, s["other_object"]).text
            excess = (th.min_binding_margin - s["binding_margin"]) / 0.3
            flags.append(Flag("misplaced", _severity(excess),
                              f"{name} on '{own}': its {v.category} heads put {s['other_share']:.0%} of its attention on "
                              f"'{other}' and {s['own_share']:.0%} on '{own}' — the {v.category} probably went to the wrong object",
                              v.index, _pick(s, "own_share", "other_share", "binding_margin")))
        if "category_margin" in s and s["category_margin"] < th.min_category_margin:
            excess = (th.min_category_margin - s["category_margin"]) / 0.5
            flags.append(Flag("misinterpreted", _severity(excess),
                              f"{name} reads as {s['rival_category']}, not {v.expected_category}: its attention within the "
                              f"{s['rival_category']} heads beats its {v.expected_category} heads "
                              f"(log-ratio {s['category_margin']:+.2f}) — the model may have misread the word",
                              v.index, _pick(s, "expected_response", "category_margin", "winner")))
    return sc, flags


def _pick(s: dict, *keys) -> dict:
    return {k: s[k] for k in keys if k in s}


def _position_flag(v: ConceptView, s: dict, sc: dict, views, th: Thresholds) -> Flag | None:
    c = (s["centroid_x"], s["centroid_y"])
    if v.position in SIDES:
        axis, sign = SIDES[v.position]
        off = (c[axis] - 0.5) * sign  # positive when on the named side
        if off < th.position_margin:
            return Flag("misplaced", _severity((th.position_margin - off) / 0.25),
                        f"'{v.text}': the prompt puts it {('on the ' if axis == 0 else 'at the ') + v.position}, but its map "
                        f"is centred at x={c[0]:.2f}, y={c[1]:.2f}", v.index, {"centroid_x": c[0], "centroid_y": c[1]})
    for rel, other in v.relations:
        if rel not in RELATION_SIDES:
            continue
        axis, sign = RELATION_SIDES[rel]
        oc = (sc[other]["centroid_x"], sc[other]["centroid_y"])
        off = (c[axis] - oc[axis]) * sign
        if off < th.position_margin:
            o = views_by(views, other).text
            return Flag("misplaced", _severity((th.position_margin - off) / 0.25),
                        f"'{v.text}' should be {rel} '{o}', but its map is centred at "
                        f"({c[0]:.2f}, {c[1]:.2f}) and '{o}'s at ({oc[0]:.2f}, {oc[1]:.2f})", v.index,
                        {"centroid_x": c[0], "centroid_y": c[1], "other_x": oc[0], "other_y": oc[1]})
    return None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n (well-behaved at 0/n and n/n, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))
