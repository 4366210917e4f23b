"""Every diagnostic threshold, in one place.

``auditor/thresholds.json`` (beside this file) holds the calibrated values and overrides the defaults below; the
run manifest records the values actually used. It is written by ``bench/diagnostics.py tune``: shapes-v1 (the
healthy bundled model) generates the TUNING prompts (grammar prompts from their own rng seed, disjoint from the
evaluation prompts and from every shipped suite); over the concepts the oracle confirms drawn as asked, each
score's threshold sits at the same low (or, for "high is bad" scores, high) quantile of its distribution, that
quantile chosen so that 5% of those healthy concepts get a flag. The file's ``provenance`` says which prompts,
seeds, model, relevance matrix and quantile; ``load`` ignores it. The defaults below are only a fallback.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

CALIBRATED = Path(__file__).resolve().parent / "thresholds.json"


@dataclass(frozen=True)
class Thresholds:
    # missing: an object's selective map has no confident region of its own
    min_peak_ratio: float = 0.25  # object's peak / strongest object's peak in the prompt
    min_concentration: float = 0.30  # share of the map's mass inside its own region
    max_shared_region: float = 0.60  # IoU with another object's region above which it has no region of its own
    max_area: float = 0.60  # share of the image in its region above which the map is spread, not on an object
    min_drawn_share: float = 0.20  # share of its map's peak region on non-background pixels of the image
    # misplaced: an attribute lands on another object; an object away from its named position
    min_binding_margin: float = -0.10  # own-object share minus best other-object share of the attribute's mass
    position_margin: float = 0.05  # centroid must be this far (in image fractions) on the named side
    # misinterpreted: the word's response in its expected category vs the best other candidate
    min_category_margin: float = 0.0  # log-ratio expected / best other candidate
    min_colour_share: float = 0.02  # share of the named colour in the image under a colour word's map
    # across seeds: a concept fails when its flag rate exceeds this
    max_flag_rate: float = 0.5
    # methods
    k: int = 8  # top-k heads for selective maps (set from the tuning sweep)

    def to_json(self) -> dict:
        return asdict(self)


def load(path: Path | None = None) -> Thresholds:
    p = path or CALIBRATED
    if p.is_file():
        data = json.loads(p.read_text())
        known = {f.name for f in fields(Thresholds)}
        return Thresholds(**{k: v for k, v in data.items() if k in known})
    return Thresholds()
