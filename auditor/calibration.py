"""Calibrating a model's audit profile: head relevance, the localisation ranking and the diagnostic thresholds.

``calibrate_profile`` runs three stages on prompts of the caller's choosing (general prompts by default):
1. **HRV relevance** (``engine.hrv.calibrate``): which heads respond to which category, for the category
   response;
2. **localisation ranking** (``engine.localise.calibrate_localisation``): which heads' maps of a word are peaked,
   and k per category;
3. **thresholds** from the model's own generations, no ground truth (``self_fit_thresholds``): audit-style
   generations of the threshold prompts are scored with the new ranking, and the quantile rule runs twice. Each
   score's cut sits at the same quantile ``q`` of its distribution over the concepts its rule judges, ``q`` the
   largest for which at most ``flag_budget`` of those concepts get any flag. The first pass, over every concept,
   marks the generations it flags as presumed failures (where no q above 0 keeps within the budget, those its
   smallest q flags: scores tied at a bad extreme); the second takes its quantiles and its budget over the
   concepts of the other generations, the presumed healthy ones. That is the oracle tuning's recipe (quantiles
   over the generations drawn as asked) with the first pass standing in for the oracle: a model's outright
   failures would otherwise sit in the quantiles and pull every cut towards them. The budget is therefore a
   false-flag budget over presumed-healthy concepts; the share of all calibration concepts flagged is larger by
   the model's failures, and is recorded beside it.

``fit_thresholds`` is the quantile rule itself; ``bench/diagnostics.py tune`` applies it to the concepts the
shapes-world oracle confirms drawn as asked, which is how the bundled models' thresholds were set.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from auditor.engine.localise import WordTarget
from auditor.errors import AuditorError
from auditor.thresholds import Thresholds
from auditor import __version__
from auditor.align import text_sequence
from auditor.concepts import extract_many
from auditor.diagnostics import SCORE_DIRECTIONS, flags_from_records, judges
from auditor.engine.hrv import calibrate
from auditor.engine.localise import calibrate_localisation
from auditor.manifest import manifest_base
from auditor.profile import AuditProfile
from auditor.image_record import generation_record
from auditor.tasks import generate_one

FIT_ROLES = ("object", "attribute")  # roles whose words occupy a region: the localisation ranking's words


def word_targets(prompts: Sequence[str], tokenizer) -> list[list[WordTarget]]:
    """The words of each prompt the localisation ranking scores: objects and their attributes with a lexicon
    category and token indices, not negated, not describing the background (a background's map is spread by
    nature, so it says nothing about whether a head localises). ``tokenizer`` is what the denoiser reads
    (``auditor.align.text_sequence(pipe)``: a transformer's words get their columns of its text sequence)."""
    out = []
    for ex in extract_many(list(prompts), tokenizer=tokenizer):
        background = {c.id for c in ex.items if c.role == "background"}
        out.append([WordTarget(c.category, tuple(c.token_indices)) for c in ex.items
                    if c.role in FIT_ROLES and c.category != "unknown" and c.token_indices and not c.negated
                    and c.binds_to not in background])
    return out


def _population(generations: Sequence[Sequence[dict]], select) -> list[tuple[int, int]]:
    return [(g, i) for g, recs in enumerate(generations)
            for i in (range(len(recs)) if select is None else select(g))]


def thresholds_at(generations: Sequence[Sequence[dict]], q: float, max_flag_rate: float,
                  select: Callable[[int], Sequence[int]] | None = None) -> Thresholds:
    """Every score's cut at the ``q`` (low is bad) or ``1 - q`` (high is bad) quantile of its values over the
    population's concepts its rule judges; None where no such concept has the score."""
    pop = _population(generations, select)
    vals: dict[str, float | None] = {}
    for name, (score, direction, role) in SCORE_DIRECTIONS.items():
        xs = []
        for g, i in pop:
            c = generations[g][i]
            s = c.get("scores") or {}
            if s.get(score) is not None and (role is None or c["role"] == role) and judges(name, s):
                xs.append(float(s[score]))
        vals[name] = _cut(np.asarray(xs), q, direction) if xs else None
    return Thresholds(**vals, max_flag_rate=float(max_flag_rate))


def _cut(xs: np.ndarray, q: float, direction: str) -> float:
    """The q quantile on the bad side. A repeated extreme value held by a minority (a colour share of exactly 0:
    none of the colour anywhere) is a state of its own, not the low tail of the rest: at any q above 0 it is
    flagged whole and the cut is the q quantile of the other values, so that a model's outright failures do not
    use up the quantile meant for the weak cases among the others. A value most concepts share discriminates
    nothing and gets no such treatment."""
    extreme = float(xs.min() if direction == "low" else xs.max())
    tied = xs == extreme
    if q > 0 and 1 < int(tied.sum()) < len(xs) / 2:
        xs = xs[~tied]
    return float(np.quantile(xs, q if direction == "low" else 1 - q))


def flag_rate(generations: Sequence[Sequence[dict]], th: Thresholds,
              select: Callable[[int], Sequence[int]] | None = None) -> tuple[int, int, dict[str, int]]:
    """(flagged concepts, concepts, flags per type) over the population, judged from the stored scores."""
    k = n = 0
    by_type: dict[str, int] = {}
    for g, recs in enumerate(generations):
        flags = flags_from_records(list(recs), th)
        for i in (range(len(recs)) if select is None else select(g)):
            types = {f.type for f in flags if f.concept == i}
            n += 1
            k += bool(types)
            for t in types:
                by_type[t] = by_type.get(t, 0) + 1
    return k, n, by_type


_SAME = object()
_SMALLEST_Q = 1e-9  # above 0: flags minority ties at a bad extreme and each score's single most extreme other value


def fit_thresholds(generations: Sequence[Sequence[dict]], budget: float, max_flag_rate: float,
                   select: Callable[[int], Sequence[int]] | None = None, budget_select=_SAME, iterations: int = 30
                   ) -> tuple[Thresholds, float, dict]:
    """The quantile rule: the largest common ``q`` (bisection in [0, 0.25]) whose thresholds flag at most
    ``budget`` of the population's concepts.

    Args:
        generations: each generation's concept records (``role``, ``scores``, and what ``flags_from_records``
            reads).
        budget: the largest share of the population's concepts that may get a flag.
        max_flag_rate: the across-seeds rule's value, recorded with the thresholds.
        select: the population the quantiles are taken over: ``select(g)`` gives the concept indices of
            generation ``g`` (default: all).
        budget_select: the population whose flag rate the budget bounds (default: ``select``'s; None: all).

    Returns:
        (thresholds, q, {"flagged", "concepts", "rate", "by_type"}).
    """
    if not 0.0 < budget < 1.0:
        raise AuditorError(f"flag budget {budget}: must be between 0 and 1")
    if not _population(generations, select):
        raise AuditorError("no calibration concept to set thresholds on")
    over = select if budget_select is _SAME else budget_select
    lo, hi = 0.0, 0.25
    for _ in range(iterations):
        mid = (lo + hi) / 2
        k, n, _ = flag_rate(generations, thresholds_at(generations, mid, max_flag_rate, select), over)
        if k / n > budget:
            hi = mid
        else:
            lo = mid
    th = thresholds_at(generations, lo, max_flag_rate, select)
    k, n, by_type = flag_rate(generations, th, over)
    return th, lo, {"flagged": k, "concepts": n, "rate": k / n, "by_type": by_type}


def self_fit_thresholds(generations: Sequence[Sequence[dict]], budget: float, max_flag_rate: float
                        ) -> tuple[Thresholds, float, dict]:
    """Thresholds from a model's own generations, no ground truth: the quantile rule in two passes.

    Args:
        generations: each generation's concept records, as for ``fit_thresholds``.
        budget: the largest share of the presumed-healthy concepts that may get a flag (in both passes: the
            first pass bounds the share of every concept).
        max_flag_rate: the across-seeds rule's value, recorded with the thresholds.

    Returns:
        (thresholds, q, achieved): the second pass's thresholds and q; ``achieved`` holds its flag rate over the
        presumed-healthy concepts ("flagged", "concepts", "rate", "by_type"), the rate over every concept
        ("all_concepts_rate"), the first pass ("first_pass": q, rate, generations presumed failures) and which
        pass the thresholds are ("pass": 1 or 2). Where the first pass finds q = 0, the generations its smallest
        quantile above 0 flags (scores tied at a bad extreme, and each score's most extreme other value) are the
        presumed failures. Where no generation is presumed a failure, or every one is, the first pass's result
        is returned as is.

    Example:
        >>> th, q, achieved = self_fit_thresholds(records, 0.05, 0.5)  # doctest: +SKIP
        >>> achieved["first_pass"]["presumed_failures"], achieved["all_concepts_rate"]  # doctest: +SKIP
    """
    first, q1, a1 = fit_thresholds(generations, budget, max_flag_rate)
    # Where even the smallest quantile flags more than the budget, it is the outright failures that do (a minority
    # tied at a score's bad extreme, flagged whole by ``_cut``): they are presumed failures all the same.
    presume = first if q1 > 0.0 else thresholds_at(generations, _SMALLEST_Q, max_flag_rate)
    healthy = {g for g, recs in enumerate(generations) if not flags_from_records(list(recs), presume)}
    passes = {"first_pass": {"q": q1, "rate": a1["rate"], "presumed_failures": len(generations) - len(healthy),
                             "generations": len(generations)}}
    if not any(len(generations[g]) for g in healthy) or len(healthy) == len(generations):
        return first, q1, {**a1, "all_concepts_rate": a1["rate"], **passes, "pass": 1}
    th, q, achieved = fit_thresholds(generations, budget, max_flag_rate,
                                     lambda g: range(len(generations[g])) if g in healthy else ())
    k, n, _ = flag_rate(generations, th)
    return th, q, {**achieved, "all_concepts_rate": k / n, **passes, "pass": 2}


def calibrate_profile(lm, prompts: Sequence[str], prompt_source: str, *, budget: int, threshold_prompts: int,
                      flag_budget: float, max_flag_rate: float, steps: int = 20, guidance: float = 7.5,
                      seed: int = 0, lexicon=None, progress: Callable[[str, int, int], None] | None = None,
                      executor=None):
    """A complete audit profile for the loaded model ``lm`` (``engine.models.LoadedModel``).

    Args:
        lm: the loaded model (its pipeline and fingerprint).
        prompts: calibration prompts (cycled up to ``budget``; each pass gets new noise).
        prompt_source: where they came from, recorded in the profile.
        budget: at most this many prompts for each ranking (each stops once its top heads agree).
        threshold_prompts: prompts generated (as images) to set the thresholds on; 0 leaves the profile
            uncalibrated.
        flag_budget: the largest share of the presumed-healthy concepts of the threshold prompts' generations
            that may be flagged (``self_fit_thresholds``).
        max_flag_rate: the across-seeds rule's value.
        steps, guidance, seed: generation settings (prompt i uses seed ``seed + i``).
        lexicon: {category: words} for HRV concept keys (default: the package lexicon).
        progress: ``progress(stage, done, total)``.
        executor: an ``auditor.executors`` executor whose ``map`` spreads the batches of both rankings and the
            threshold generations (over Ray workers, say); None: all here.

    Returns:
        ``auditor.profile.AuditProfile``.

    Example:
        >>> from auditor.calibration import calibrate_profile
        >>> prof = calibrate_profile(lm, ["a red circle"], "example", budget=16, threshold_prompts=0,
        ...                          flag_budget=0.05, max_flag_rate=0.5)  # doctest: +SKIP
    """
    if not prompts:
        raise AuditorError("calibration needs at least one prompt")
    if budget < 1 or threshold_prompts < 0:
        raise AuditorError("calibration budget must be at least 1 prompt; threshold prompts at least 0")
    pipe = lm.pipe
    cycled = [prompts[i % len(prompts)] for i in range(budget)]
    tick = (lambda stage: (lambda n: progress(stage, n, budget))) if progress else (lambda stage: None)
    gen = {"steps": steps, "guidance": guidance, "seed": seed}
    mapper = None if executor is None else executor.map
    rm = calibrate(pipe, cycled, lexicon, steps=steps, guidance_scale=guidance, seed=seed,
                   fingerprint=lm.fingerprint, prompt_source=prompt_source, progress=tick("relevance"), mapper=mapper)
    hr = calibrate_localisation(pipe, cycled, word_targets(cycled, text_sequence(pipe)), steps=steps,
                                guidance_scale=guidance, seed=seed, fingerprint=lm.fingerprint,
                                prompt_source=prompt_source, progress=tick("ranking"), mapper=mapper)
    tool = manifest_base([]).get("tool")
    provenance = {
        "tool": tool, "model_fingerprint": lm.fingerprint, "date": time.strftime("%Y-%m-%d"),
        "relevance": {"how": "HRV category votes (auditor.engine.hrv.calibrate)", "prompts": prompt_source,
                      "budget_prompts": rm.budget_prompts, "converged": rm.converged, **gen},
        "ranking": {"how": "localisation: mean concentration of each head's map of a word, k per category by "
                           "split-half stability (auditor.engine.localise)", "prompts": prompt_source,
                    "budget_prompts": hr.budget_prompts, "converged": hr.converged, **gen},
        "response_k": "the k at which the HRV calibration's top heads were compared for convergence",
        "image_checks": "every check on; each stays silent on images it cannot read (auditor.pixels)",
    }
    prof = AuditProfile(lm.fingerprint, rm, hr, "localisation", int(rm.k), None, provenance=provenance)
    if threshold_prompts:
        th, q, achieved = self_calibrated_thresholds(lm, prof, [prompts[i % len(prompts)] for i in
                                                                range(threshold_prompts)],
                                                     flag_budget, max_flag_rate, steps, guidance, seed, progress,
                                                     executor)
        if q <= 0.0:  # every informative cut flagged more than the budget: thresholds at the extremes cannot fail
            over = "concepts" if achieved["pass"] == 1 else "presumed-healthy concepts (the second pass)"
            prof.provenance["thresholds"] = (
                f"none: uncalibrated. At every quantile q above 0 the thresholds flagged more than {flag_budget:.0%} "
                f"of the {threshold_prompts} threshold generations' {over}, so they would sit at the scores' "
                "extremes and flag nothing: this model's maps do not separate its concepts (auditor.calibration)")
            return prof
        prof.thresholds = th
        prof.provenance["thresholds"] = {
            "how": "self-calibrated, no ground truth (auditor.calibration.self_fit_thresholds): each score's cut "
                   "at the q / (1 - q) quantile of its values over the concepts its rule judges, q the largest "
                   "flagging at most the budget; a first pass over every concept of the threshold prompts' "
                   "generations presumes the generations it flags failures, the second pass fits over the rest",
            "prompts": prompt_source, "generations": threshold_prompts, "flag_budget": flag_budget, "q": round(q, 5),
            "achieved": _rounded(achieved),
            "version": __version__, **gen}
    else:
        prof.provenance["thresholds"] = "none: uncalibrated (no threshold prompts)"
    return prof


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else _rounded(v) if isinstance(v, dict) else v
            for k, v in d.items()}


def self_calibrated_thresholds(lm, profile, prompts: Sequence[str], flag_budget: float, max_flag_rate: float,
                               steps: int, guidance: float, seed: int, progress=None, executor=None):
    """Generate each prompt as an audit does, score its concepts with ``profile``, fit thresholds to the budget
    with ``self_fit_thresholds`` (the generations spread by ``executor.map`` when given)."""
    extracted = extract_many(list(prompts), tokenizer=text_sequence(lm.pipe))
    jobs = [(p, cs, seed + i, steps, guidance, profile) for i, (p, cs) in enumerate(zip(prompts, extracted))]
    if executor is None:
        records = []
        for job in jobs:
            records.append(threshold_record(lm.pipe, *job))
            if progress:
                progress("thresholds", 1, len(prompts))
    else:
        records = executor.map(threshold_record, jobs)
        if progress:
            progress("thresholds", len(records), len(prompts))
    return self_fit_thresholds(records, flag_budget, max_flag_rate)


def threshold_record(pipe, prompt: str, concepts, seed: int, steps: int, guidance: float, profile) -> list[dict]:
    """The concept records of one threshold-prompt generation, as an audit makes them (no files)."""
    image, tr = generate_one(pipe, prompt, seed, steps, guidance, None)
    return generation_record(tr, concepts, profile, image)[0]
