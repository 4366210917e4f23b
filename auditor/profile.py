"""The audit profile of one model: every value an audit needs that depends on the model, and where each came from.

A profile holds
- the **head ranking** selective maps use (``localisation`` by default: ``auditor.engine.localise``; or ``hrv``)
  and, with it, k per category;
- the **HRV relevance matrix** (``auditor.engine.relevance``), which the category response reads (the
  misinterpretation evidence), and the k that response uses;
- the **diagnostic thresholds**, or none: a profile without thresholds is *uncalibrated*; its audits build maps
  and scores but raise no flag, and say so;
- which **image-side checks** apply to the model's images;
- the **provenance** of each part (prompts, budget, seeds, code version, model fingerprint).

It is one JSON file (``FORMAT`` versioned, a sha256 over its content), resolved once per loaded model by
fingerprint (``profile_for``): the bundled models ship ``profile.json`` in their folder; ``auditor calibrate``
writes one for any checkpoint into the user cache (``cache_path``). A profile made for another fingerprint is
refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from auditor.engine.localise import HeadRanking
from auditor.engine.models import cache_dir, fingerprint_of, folder_of
from auditor.engine.relevance import RelevanceMatrix, check_compatible, find_for_pipe
from auditor.errors import AuditorError
from auditor.thresholds import Thresholds
from auditor.engine.heads import HeadIndex, denoiser_of

FORMAT = 1
FILE = "profile.json"
RANKINGS = ("localisation", "hrv")
# image-side checks (auditor.pixels) -> the thresholds that switch each off when the model's images do not suit it:
# "drawn" reads what is drawn (an object's map on empty background; the own-drawn overrule), "colour" the colours;
# an object's own named colour under its map (min_own_colour) reads both, so either switches it off
IMAGE_CHECKS = {"drawn": ("min_drawn_share", "min_own_colour"), "colour": ("min_colour_share", "min_own_colour")}


def _ranking_json(hr: HeadRanking) -> dict:
    return {**hr.meta(), "created": hr.created, "sums": hr.sums.tolist(), "counts": hr.counts.tolist(),
            "halves": hr.halves.tolist(), "half_counts": hr.half_counts.tolist()}


def _ranking_from(d: dict) -> HeadRanking:
    return HeadRanking(d["categories"], d["head_names"], np.array(d["sums"]), np.array(d["counts"]),
                       np.array(d["halves"]), np.array(d["half_counts"]), d["budget_prompts"], d["steps"],
                       d.get("agreement_curve", []), d.get("converged", False), d.get("model_fingerprint"),
                       d.get("prompt_source", ""), d.get("seed", 0), d.get("created", ""))


def _relevance_json(rm: RelevanceMatrix) -> dict:
    return {**rm.meta(), "created": rm.created, "matrix": rm.matrix.tolist(), "votes": rm.votes.tolist()}


def _relevance_from(d: dict) -> RelevanceMatrix:
    return RelevanceMatrix(d["categories"], d["head_names"], np.array(d["matrix"], np.float32),
                           np.array(d["votes"], np.int64), d["budget_prompts"], d["steps"],
                           d.get("agreement_curve", []), d.get("model_fingerprint"), d.get("k", 8),
                           d.get("converged", False), d.get("prompt_source", ""), d.get("seed", 0),
                           d.get("created", ""))


@dataclass
class AuditProfile:
    """Everything model-specific an audit uses. Build with ``auditor calibrate``; read with ``profile_for``."""

    model_fingerprint: str
    relevance: RelevanceMatrix
    ranking: HeadRanking | None
    maps_ranking: str  # which ranking selective maps use: "localisation" or "hrv"
    response_k: int  # top-k HRV heads per category for the category response (and for hrv maps)
    thresholds: Thresholds | None = None
    image_checks: dict[str, bool] = field(default_factory=lambda: {c: True for c in IMAGE_CHECKS})
    provenance: dict = field(default_factory=dict)  # part -> where it came from
    created: str = ""

    def __post_init__(self):
        if self.maps_ranking not in RANKINGS:
            raise AuditorError(f"profile: unknown head ranking {self.maps_ranking!r}; expected one of "
                               f"{', '.join(RANKINGS)}")
        if self.maps_ranking == "localisation" and self.ranking is None:
            raise AuditorError("profile: the localisation ranking is missing")
        unknown = set(self.image_checks) - set(IMAGE_CHECKS)
        if unknown:
            raise AuditorError(f"profile: unknown image checks {sorted(unknown)}")

    # --- what an audit reads ----------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """Whether the profile has diagnostic thresholds (else audits raise no flag)."""
        return self.thresholds is not None

    @property
    def head_names(self) -> tuple[str, ...]:
        return self.relevance.head_names

    @property
    def maps_source(self):
        """The ranking ``maps.concept_map`` takes as ``relevance`` for selective maps."""
        return self.ranking if self.maps_ranking == "localisation" else self.relevance

    def judging_thresholds(self) -> Thresholds | None:
        """The thresholds diagnostics apply: the calibrated ones with the image checks this profile turns off
        silenced (None), or None for an uncalibrated profile."""
        if self.thresholds is None:
            return None
        off = {name: None for c, on in self.image_checks.items() if not on for name in IMAGE_CHECKS[c]}
        return replace(self.thresholds, **off)

    def k_for(self, category: str) -> int:
        """k of the selective map of ``category``."""
        return self.maps_source.k_for(category)

    def k_per_category(self) -> dict[str, int]:
        return {c: self.k_for(c) for c in self.maps_source.categories}

    def check(self, fingerprint: str | None, head_names, source: str) -> "AuditProfile":
        """Refuse a profile made for another model (fingerprint) or another architecture (heads)."""
        if fingerprint is not None and self.model_fingerprint != fingerprint:
            raise AuditorError(f"{source}: the profile was made for model {self.model_fingerprint[:12]}, "
                               f"not this one ({fingerprint[:12]}); calibrate this model (`auditor calibrate`)")
        if tuple(head_names) != tuple(self.head_names):
            raise AuditorError(f"{source}: the profile has {len(self.head_names)} heads that do not match this "
                               f"model's {len(head_names)} cross-attention heads")
        return self

    # --- the record -------------------------------------------------------------------------------------------
    def content(self) -> dict:
        return {
            "format": FORMAT, "model_fingerprint": self.model_fingerprint, "maps_ranking": self.maps_ranking,
            "response_k": int(self.response_k),
            "k_per_category": self.k_per_category(),
            "thresholds": None if self.thresholds is None else self.thresholds.to_json(),
            "image_checks": dict(self.image_checks), "provenance": self.provenance,
            "relevance": _relevance_json(self.relevance),
            "ranking": None if self.ranking is None else _ranking_json(self.ranking),
        }

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {**self.content(), "sha256": self.sha256, "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AuditProfile":
        path = Path(path)
        if not path.is_file():
            raise AuditorError(f"{path}: profile not found")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise AuditorError(f"{path}: profile format {d.get('format')!r}; this version reads {FORMAT}")
            th = d.get("thresholds")
            prof = cls(d["model_fingerprint"], _relevance_from(d["relevance"]),
                       _ranking_from(d["ranking"]) if d.get("ranking") else None, d["maps_ranking"],
                       int(d["response_k"]),
                       None if th is None else Thresholds.from_json(th, f"{path}: thresholds"),
                       dict(d.get("image_checks") or {}), d.get("provenance") or {}, d.get("created", ""))
        except AuditorError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuditorError(f"{path}: unreadable profile ({type(exc).__name__}: {exc})") from None
        for part in (prof.relevance.matrix, *(() if prof.ranking is None else (prof.ranking.sums,))):
            if not np.isfinite(part).all():
                raise AuditorError(f"{path}: the profile holds non-finite values")
        if d.get("sha256") and d["sha256"] != prof.sha256:
            raise AuditorError(f"{path}: content does not match its sha256 (file changed or corrupt)")
        return prof

    def summary(self) -> dict:
        return {"sha256": self.sha256, "model_fingerprint": self.model_fingerprint, "calibrated": self.calibrated,
                "maps_ranking": self.maps_ranking, "k_per_category": self.k_per_category(),
                "response_k": self.response_k, "image_checks": self.image_checks,
                "thresholds": None if self.thresholds is None else self.thresholds.to_json(),
                "provenance": self.provenance}


def cache_path(fingerprint: str) -> Path:
    return cache_dir() / "profiles" / f"{fingerprint}.json"


def find(fingerprint: str | None, folder: Path | None) -> tuple[AuditProfile, Path] | None:
    """The stored profile for a model: shipped in its folder, else cached by fingerprint."""
    if fingerprint is None:
        return None
    for cand in ([folder / FILE] if folder else []) + [cache_path(fingerprint)]:
        if cand.is_file():
            prof = AuditProfile.load(cand)
            if prof.model_fingerprint == fingerprint:
                return prof, cand
    return None


def stored_ranking(pipe):
    """The ranking selective maps of a traced pipeline use: its audit profile's (shipped beside the model or cached
    for its fingerprint), else its cached head-relevance matrix, else None."""
    fp = fingerprint_of(pipe)
    stored = find(fp, folder_of(pipe))
    return stored[0].maps_source if stored is not None else find_for_pipe(pipe, fp)


def from_relevance(rm: RelevanceMatrix, source: str) -> AuditProfile:
    """An uncalibrated profile from a head-relevance matrix alone (a model calibrated before profiles existed, or
    ``--relevance`` without a profile): HRV ranking at the matrix's own k, no thresholds."""
    return AuditProfile(rm.model_fingerprint or "", rm, None, "hrv", int(rm.k), None, provenance={
        "relevance": {"from": source, "sha256": rm.sha256},
        "ranking": "hrv: the relevance matrix's own ranking at its convergence k (no localisation ranking)",
        "thresholds": "none: uncalibrated (no profile for this model)"})


def profile_for(lm, path: str | Path | None = None, relevance: str | Path | None = None) -> AuditProfile:
    """The profile an audit of the loaded model ``lm`` uses.

    ``path`` if given (refused when made for another model); else the one shipped in the model's folder or cached
    for its fingerprint; else an uncalibrated one from its cached head-relevance matrix. ``relevance`` (a .npz)
    replaces the profile's HRV matrix, or makes an uncalibrated profile when there is none.

    Args:
        lm: an ``engine.models.LoadedModel``.
        path: a profile file.
        relevance: a head-relevance matrix file.

    Returns:
        An ``AuditProfile`` checked against the model's fingerprint and heads.

    Example:
        >>> from auditor.engine.models import load_model
        >>> from auditor.profile import profile_for
        >>> prof = profile_for(load_model("shapes-v1", device="cpu"))
        >>> prof.calibrated, prof.maps_ranking
        (True, 'localisation')
    """
    heads = HeadIndex.from_unet(denoiser_of(lm.pipe)).names
    prof = None
    if path is not None:
        prof = AuditProfile.load(path).check(lm.fingerprint, heads, str(path))
    else:
        found = find(lm.fingerprint, Path(lm.path) if lm.path else None)
        if found is not None:
            prof = found[0].check(lm.fingerprint, heads, str(found[1]))
    if relevance is not None:
        rm = check_compatible(RelevanceMatrix.load(relevance), lm.pipe, str(relevance))
        if prof is None:
            return from_relevance(rm, str(relevance))
        prof.relevance = rm
        prof.provenance = {**prof.provenance, "relevance": {"from": str(relevance), "sha256": rm.sha256}}
        return prof
    if prof is not None:
        return prof
    rm = find_for_pipe(lm.pipe, lm.fingerprint)
    if rm is None:
        raise AuditorError(f"no audit profile for model {lm.name} (fingerprint {str(lm.fingerprint)[:12]}): run "
                           "`auditor calibrate` first")
    return from_relevance(check_compatible(rm, lm.pipe, "cached relevance"), "the cached relevance matrix")
