"""The diagnostic thresholds: what each one cuts. Their values live in a model's audit profile (``auditor.profile``).

No value here is a default: a threshold fitted to one model says nothing about another. A profile gets its
thresholds from a calibration (``auditor.calibration.fit_thresholds``: each score's cut at a quantile of its
distribution over a set of concepts, the quantile chosen to meet a flag budget), with the provenance beside them;
a profile without thresholds is *uncalibrated* and its audits raise no flag. A single threshold may be None: the
calibration saw no concept its rule judges, so the rule stays silent rather than guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from auditor.errors import AuditorError


OPTIONAL = ("min_own_colour",)  # rules newer than some saved profiles: absent from one, the rule stays silent


@dataclass(frozen=True)
class Thresholds:
    # missing: an object's selective map has no confident region of its own
    min_peak_ratio: float | None  # object's peak / strongest object's peak in the prompt
    min_concentration: float | None  # share of the map's mass inside its own region
    max_shared_region: float | None  # IoU with another object's region above which it has no region of its own
    max_area: float | None  # share of the image in its region above which the map is spread, not on an object
    min_drawn_share: float | None  # share of its map's peak region on non-background pixels of the image
    # misplaced: an attribute lands on another object; an object away from its named position
    min_binding_margin: float | None  # own-object share minus best other-object share of the attribute's mass
    position_margin: float | None  # centroid must be this far (in image fractions) on the named side
    # misinterpreted: the word's response in its expected category vs the best other candidate
    min_category_margin: float | None  # log-ratio expected / best other candidate
    min_colour_share: float | None  # share of the named colour in the image under a colour word's map
    # across seeds: a concept fails when its flag rate exceeds this
    max_flag_rate: float
    # missing, from the image (after max_flag_rate so profiles made before it still load: absent = silent)
    min_own_colour: float | None = None  # share of an object's map peak on pixels of its named colour

    def to_json(self) -> dict:
        """Every field; an optional one only when set, so a profile made before its rule keeps its content hash."""
        return {k: v for k, v in asdict(self).items() if not (k in OPTIONAL and v is None)}

    @classmethod
    def from_json(cls, data: dict, source: str = "thresholds") -> "Thresholds":
        """Every field required; unknown keys ignored (a newer profile may carry more)."""
        names = [f.name for f in fields(cls) if f.name in data or f.name not in OPTIONAL]
        missing = [n for n in names if n not in data]
        if missing:
            raise AuditorError(f"{source}: missing {', '.join(missing)}")
        try:
            vals = {n: None if data[n] is None else float(data[n]) for n in names}
        except (TypeError, ValueError):
            raise AuditorError(f"{source}: every threshold must be a number or null") from None
        if vals["max_flag_rate"] is None:
            raise AuditorError(f"{source}: max_flag_rate must be a number")
        bad = [n for n, v in vals.items() if v is not None and (v != v or v in (float("inf"), float("-inf")))]
        if bad:
            raise AuditorError(f"{source}: {', '.join(bad)} not finite")
        return cls(**vals)
