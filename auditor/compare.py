"""Regression statistics between two audit runs of one suite (a model before and after a change).

Both runs generated the same prompts with the same seeds, so every (prompt, seed, concept) is a *paired*
observation: flagged or not in run A, flagged or not in run B. Observations are pooled per concept, per category and
per suite tag (the prompts a tag marks, e.g. those a known defect affects). Flag-rate changes are tested with
McNemar's exact test on the discordant pairs; mean score changes get a paired bootstrap interval (resampling seeds,
or pairs for a category or tag). What counts as a regression is decided by ``Policy`` alone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from auditor.errors import AuditorError
from auditor.manifest import flatten
from auditor.run_relevance import Relevance, read_relevance
from auditor.store import RELEVANCE_NAME, RunStore
from auditor.summary import Pair, across_seeds, pairs_of

BOOTSTRAP_RESAMPLES = 2000
TOP_CHANGED_HEADS = 10


@dataclass(frozen=True)
class Policy:
    """A flag-rate increase is a regression when it is large (at least ``min_rate_increase``, e.g. a concept clean in
    every seed of A and flagged in half of B's) or significant (McNemar exact p < ``alpha``); improvements mirror it.
    Large-but-not-significant counts because audits run few seeds: a concept that breaks in most seeds must not
    pass a gate for lack of samples. No multiple-testing correction: a gate should err towards a human look."""

    min_rate_increase: float = 0.5
    alpha: float = 0.05

    def classify(self, rate_delta: float, p: float, b: int, c: int) -> str | None:
        """b: pairs flagged only in A (fixed), c: pairs flagged only in B (broken)."""
        if c > b and (rate_delta >= self.min_rate_increase or p < self.alpha):
            return "regression"
        if b > c and (-rate_delta >= self.min_rate_increase or p < self.alpha):
            return "improvement"
        return None

    def describe(self) -> str:
        return (f"a concept or category regressed when its flag rate rose by at least {self.min_rate_increase:.0%} "
                f"(absolute) or McNemar's exact test on its paired (prompt, seed, concept) observations gives "
                f"p < {self.alpha} with more pairs broken than fixed; improvements mirror this")


POLICY = Policy()


# --- statistics -----------------------------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a binomial test of b against n = b + c, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(deltas, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired differences (seeded: the same runs give the same report)."""
    d = np.asarray(deltas, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    if d.size == 1:
        return (float(d[0]), float(d[0]))
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def paired_stats(pairs: list[tuple[Pair, Pair]], policy: Policy) -> dict:
    """Flag-rate change, McNemar and bootstrap over matched (A, B) observations, and mean score changes."""
    fa = np.array([a.flagged for a, _ in pairs], dtype=float)
    fb = np.array([b.flagged for _, b in pairs], dtype=float)
    fixed, broken = int(((fa == 1) & (fb == 0)).sum()), int(((fa == 0) & (fb == 1)).sum())
    p = mcnemar_exact(fixed, broken)
    delta = float(fb.mean() - fa.mean())
    lo, hi = paired_bootstrap(fb - fa)
    scores = {}
    keys = set.intersection(*({k for k, v in x.scores.items() if isinstance(v, float)} for pr in pairs for x in pr))
    for key in sorted(keys):
        d = [b.scores[key] - a.scores[key] for a, b in pairs]
        s_lo, s_hi = paired_bootstrap(d)
        scores[key] = {"mean_delta": round(float(np.mean(d)), 4), "ci": [round(s_lo, 4), round(s_hi, 4)],
                       "clear": bool(s_lo > 0 or s_hi < 0)}  # the interval excludes no change
    return {"n": len(pairs), "flagged_a": int(fa.sum()), "flagged_b": int(fb.sum()),
            "rate_a": round(float(fa.mean()), 4), "rate_b": round(float(fb.mean()), 4), "rate_delta": round(delta, 4),
            "rate_delta_ci": [round(lo, 4), round(hi, 4)], "fixed": fixed, "broken": broken, "p": round(p, 5),
            "verdict": policy.classify(delta, p, fixed, broken), "scores": scores}


# --- the comparison -------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    dir: Path
    manifest: dict
    generations: list[dict]
    relevance: Relevance | None

    @property
    def info(self) -> dict:
        m = self.manifest.get("model") or {}
        return {"dir": str(self.dir), "run_id": self.manifest.get("run_id"), "model": m.get("name"),
                "fingerprint": m.get("fingerprint"), "suite_sha256": (self.manifest.get("suite") or {}).get("sha256")}


def _load(path: str | Path, allow_partial: bool, force: bool, notes: dict) -> _Run:
    """Read a run (under a shared lock: no audit or re-render may be writing it), refusing one whose files differ
    from its records unless ``force``, and an unfinished one unless ``allow_partial``; what was let through is noted
    in ``notes`` for the report's first page."""
    with RunStore.open(path, readonly=True) as store:
        problems = store.evidence_problems(store.verify())  # what compare reads: records, images, maps, relevance
        if problems and not force:
            raise store.integrity_error(problems, "compare it anyway with --force, which the compare report states")
        done, planned = store.progress()
        if not store.is_finished:
            if not allow_partial:
                raise AuditorError(f"{store.dir}: the run is not finished ({done} of {planned or '?'} generations); "
                                   f"finish it with `auditor audit SUITE --resume {store.dir}`, or compare it as it "
                                   f"is with --allow-partial")
            notes["partial"].append({"dir": str(store.dir), "run_id": store.manifest.get("run_id"),
                                     "generations": done, "planned": planned})
        if problems:
            notes["forced"].append({"dir": str(store.dir), "run_id": store.manifest.get("run_id"),
                                    "problems": problems})
        return _Run(store.dir, store.manifest, store.generations(), read_relevance(store.dir / RELEVANCE_NAME))


def _categories(run: _Run) -> set[str] | None:
    """The categories the run's model has calibrated heads for (its relevance matrix), None when unknown."""
    if run.relevance is not None:
        return set(run.relevance.categories)
    cats = (run.manifest.get("relevance") or {}).get("categories")
    return set(cats) if isinstance(cats, list) else None


def compare_runs(run_a: str | Path, run_b: str | Path, policy: Policy = POLICY, allow_partial: bool = False,
                 force: bool = False) -> dict:
    """Compare run B against run A (the reference). Raises AuditorError when they cannot be compared: an unfinished
    run unless ``allow_partial``, a folder that differs from its records unless ``force``."""
    notes: dict = {"partial": [], "forced": []}
    a, b = _load(run_a, allow_partial, force, notes), _load(run_b, allow_partial, force, notes)
    suite_a, suite_b = (a.manifest.get("suite") or {}).get("name"), (b.manifest.get("suite") or {}).get("name")
    if suite_a != suite_b:
        raise AuditorError(f"{run_a} and {run_b} audited different suites ('{suite_a}' vs '{suite_b}'); "
                           f"compare two runs of one suite")
    seeds_a, seeds_b = sorted(a.manifest.get("seeds") or []), sorted(b.manifest.get("seeds") or [])
    if seeds_a != seeds_b:
        raise AuditorError(f"{run_a} and {run_b} used different seeds ({seeds_a} vs {seeds_b}); paired statistics "
                           f"need the same seeds")
    for run, m in ((run_a, a.manifest), (run_b, b.manifest)):
        if m.get("calibrated") is False:
            raise AuditorError(f"{run} is uncalibrated (its model's profile had no diagnostic thresholds, so it "
                               f"flagged nothing): its flags cannot be compared; calibrate the model and audit again")
    warnings, matched = _match(a, b)
    warnings += _profile_differences(a.manifest, b.manifest)
    warnings += _reading_differences(a.manifest, b.manifest)
    not_comparable = _not_comparable(a, b)
    if not_comparable:
        only = set(not_comparable["only_a"]) | set(not_comparable["only_b"])
        left_out = [(pa, pb) for pa, pb in matched if pa.category in only or pb.category in only]
        matched = [(pa, pb) for pa, pb in matched if pa.category not in only and pb.category not in only]
        not_comparable["observations_left_out"] = len(left_out)
        not_comparable["concepts_left_out"] = sorted({f"{pa.prompt_id}: {pa.concept}" for pa, _ in left_out})
        warnings.append(_not_comparable_text(not_comparable))
    for n in notes["partial"]:
        warnings.append(f"run {n['run_id']} is unfinished ({n['generations']} of {n['planned'] or '?'} generations; "
                        f"--allow-partial): compared on its finished generations only")
    for n in notes["forced"]:
        warnings.append(f"run {n['run_id']} differs from what its audit recorded ({'; '.join(n['problems'][:3])}"
                        f"{'; …' if len(n['problems']) > 3 else ''}): compared anyway (--force)")
    if not matched:
        why = f" ({_not_comparable_text(not_comparable)})" if not_comparable else ""
        raise AuditorError(f"{run_a} and {run_b} have no finished (prompt, seed, concept) in common to compare{why}")

    by_concept: dict[tuple[str, str], list] = defaultdict(list)
    by_category: dict[str, list] = defaultdict(list)
    by_tag: dict[str, list] = defaultdict(list)
    tags_of = {g["prompt_id"]: list(g.get("tags") or []) for g in a.generations}
    for pa, pb in matched:
        by_concept[(pa.prompt_id, pa.concept)].append((pa, pb))
        by_category[pa.category].append((pa, pb))
        for t in tags_of.get(pa.prompt_id, []):  # a suite's tags say what its prompts test ("pair", "defect:x")
            by_tag[t].append((pa, pb))
    concepts = [{"prompt_id": pid, "concept": label, "category": ps[0][0].category, "seeds": [x.seed for x, _ in ps],
                 **paired_stats(ps, policy), "b_says": across_seeds([y for _, y in ps])["verdict"]}
                for (pid, label), ps in by_concept.items()]
    categories = [{"category": cat, **paired_stats(ps, policy)} for cat, ps in sorted(by_category.items())]
    tags = [{"tag": t, "prompts": len({x.prompt_id for x, _ in ps}), **paired_stats(ps, policy)}
            for t, ps in sorted(by_tag.items())]
    overall = paired_stats(matched, policy)
    overall.pop("verdict")  # the gate is on concepts, tags and categories; the overall numbers are context

    levels = [("concept", concepts), ("tag", tags), ("category", categories)]
    regressions = [{"level": lv, **c} for lv, rows in levels for c in rows if c["verdict"] == "regression"]
    improvements = [{"level": lv, **c} for lv, rows in levels for c in rows if c["verdict"] == "improvement"]
    k = _heads_k(a.manifest)
    return {
        "run_a": a.info, "run_b": b.info, "suite": suite_a, "seeds": seeds_a,
        "warnings": warnings,
        "common_prompts": len({pa.prompt_id for pa, _ in matched}), "pairs": len(matched),
        "policy": {**asdict(policy), "text": policy.describe()},
        "overall": {**overall, "fidelity_a": round(1 - overall["rate_a"], 4), "fidelity_b": round(1 - overall["rate_b"], 4)},
        "concepts": concepts, "categories": categories, "tags": tags,
        "regressions": regressions, "improvements": improvements,
        "heads": compare_heads(a.relevance, b.relevance, k),
        "manifest_differences": _differences(a.manifest, b.manifest),
        "partial": notes["partial"], "forced": notes["forced"], "not_comparable": not_comparable,
    }


def _heads_k(m: dict) -> int:
    """How many top heads per category the head-role comparison shows: the run's --k, else its profile's
    category-response k (runs before profiles recorded one k for everything)."""
    k = (m.get("method") or {}).get("k") or (m.get("profile") or {}).get("response_k") \
        or (m.get("thresholds") or {}).get("k")
    if not k:
        raise AuditorError(f"run {m.get('run_id')}: its manifest records no k for its heads")
    return int(k)


def _profile_differences(ma: dict, mb: dict) -> list[str]:
    """What differs between the two runs' audit profiles, in words: each difference means a flag in A and one in
    B were not decided the same way, so the comparison measures the models and the profiles together."""
    out = []
    pa, pb = ma.get("profile") or {}, mb.get("profile") or {}
    if pa.get("sha256") == pb.get("sha256") and pa:
        return out
    if pa.get("maps_ranking") != pb.get("maps_ranking"):
        out.append(f"the runs' selective maps rank heads differently ({pa.get('maps_ranking') or 'hrv'} in A, "
                   f"{pb.get('maps_ranking') or 'hrv'} in B)")
    ka, kb = pa.get("k_per_category") or {}, pb.get("k_per_category") or {}
    diff_k = [f"{c} {ka.get(c, '—')} vs {kb.get(c, '—')}" for c in sorted(set(ka) | set(kb)) if ka.get(c) != kb.get(c)]
    if diff_k:
        out.append("the runs' profiles keep different numbers of heads per category (k: " + ", ".join(diff_k[:8])
                   + (", …" if len(diff_k) > 8 else "") + "); each run's maps use its own model's heads")
    ta, tb = ma.get("thresholds") or {}, mb.get("thresholds") or {}
    diff_t = [n for n in sorted(set(ta) | set(tb)) if n != "k" and ta.get(n) != tb.get(n)]
    if diff_t:
        out.append("the runs were judged by different thresholds (" + ", ".join(
            f"{n} {ta.get(n)} vs {tb.get(n)}" for n in diff_t[:6]) + (", …" if len(diff_t) > 6 else "")
            + "): a flag rate change may come from the thresholds, not the model")
    return out


def _reading_differences(ma: dict, mb: dict) -> list[str]:
    """Runs whose maps were made differently (captured while generating, or read from given images, at which
    timesteps) measure the reading together with the models."""
    ga, gb = ma.get("given_images"), mb.get("given_images")
    if not ga and not gb:
        return []
    if ga and gb:
        if (ga.get("timesteps"), ga.get("draws")) == (gb.get("timesteps"), gb.get("draws")):
            return []
        return [f"both runs read given images, at different timesteps ({ga.get('timesteps')} x {ga.get('draws')} in "
                f"A, {gb.get('timesteps')} x {gb.get('draws')} in B)"]
    which, other = ("A", "B") if ga else ("B", "A")
    return [f"run {which}'s maps were read from given images (nothing generated) and run {other}'s captured while "
            f"generating: the differences mix the way the maps were made with the models"]


def _not_comparable(a: _Run, b: _Run) -> dict | None:
    """Categories only one run's model has heads for: its concepts there were judged on selective maps in one run and
    on the all-heads fallback in the other, so their flags do not measure the same thing."""
    ca, cb = _categories(a), _categories(b)
    if ca is None or cb is None or ca == cb:
        return None
    return {"only_a": sorted(ca - cb), "only_b": sorted(cb - ca), "shared": sorted(ca & cb)}


def _not_comparable_text(nc: dict) -> str:
    def names(xs):
        return ", ".join(xs[:8]) + (f" and {len(xs) - 8} more" if len(xs) > 8 else "")

    sides = [f"{len(nc['only_a'])} only in A ({names(nc['only_a'])})" if nc["only_a"] else "",
             f"{len(nc['only_b'])} only in B ({names(nc['only_b'])})" if nc["only_b"] else ""]
    return (f"the runs' relevance matrices have different categories: {'; '.join(x for x in sides if x)}; "
            f"compared on the {len(nc['shared'])} shared categories, leaving out "
            f"{nc.get('observations_left_out', 0)} observations of {len(nc.get('concepts_left_out', []))} concepts "
            f"in the others")


def _match(a: _Run, b: _Run) -> tuple[list[str], list[tuple[Pair, Pair]]]:
    """Pairs observed in both runs, and a warning for everything left out."""
    warnings = []
    if a.info["suite_sha256"] != b.info["suite_sha256"]:
        warnings.append("the suite file changed between the runs (different sha256); compared on what they share")
    text_a = {g["prompt_id"]: g.get("prompt") for g in a.generations}
    text_b = {g["prompt_id"]: g.get("prompt") for g in b.generations}
    changed = sorted(p for p in set(text_a) & set(text_b) if text_a[p] != text_b[p])
    only_a, only_b = [p for p in text_a if p not in text_b], [p for p in text_b if p not in text_a]
    if only_a or only_b or changed:
        parts = [f"{len(only_a)} only in A ({', '.join(only_a[:5])}{'…' if len(only_a) > 5 else ''})" if only_a else "",
                 f"{len(only_b)} only in B ({', '.join(only_b[:5])}{'…' if len(only_b) > 5 else ''})" if only_b else "",
                 f"{len(changed)} with different text ({', '.join(changed[:5])})" if changed else ""]
        warnings.append(f"the runs' prompts differ: {'; '.join(x for x in parts if x)}; "
                        f"comparing the {len(set(text_a) & set(text_b)) - len(changed)} common prompts only")
    index_b = {(p.prompt_id, p.concept, p.seed): p for p in pairs_of(b.generations) if p.prompt_id not in changed}
    matched, unmatched = [], 0
    for p in pairs_of(a.generations):
        if p.prompt_id in changed:
            continue
        q = index_b.pop((p.prompt_id, p.concept, p.seed), None)
        if q is None:
            unmatched += p.prompt_id in text_b
        else:
            matched.append((p, q))
    unmatched += sum(pid in text_a for pid, _, _ in index_b)
    if unmatched:
        warnings.append(f"{unmatched} (prompt, seed, concept) observations of common prompts exist in one run only "
                        f"(an unfinished run, or concepts read differently) and are left out")
    return warnings, matched


def compare_heads(a: Relevance | None, b: Relevance | None, k: int) -> dict:
    """Top-k overlap per category and the heads whose role moved most, when both runs share one architecture."""
    if a is None or b is None:
        return {"comparable": False, "note": "one of the runs carries no relevance matrix: compared at concept level only"}
    if a.head_names != b.head_names:
        return {"comparable": False, "note": f"different architectures ({len(a.head_names)} heads vs "
                                             f"{len(b.head_names)}): compared at concept level only"}
    cats = [c for c in a.categories if c in b.categories]
    if not cats:
        return {"comparable": False, "note": "the relevance matrices share no category: compared at concept level only"}
    overlap = {c: len(set(a.top(c, k)) & set(b.top(c, k))) / k for c in cats}
    ia, ib = [a.categories.index(c) for c in cats], [b.categories.index(c) for c in cats]
    # A head's role: how its relevance spreads over the categories (its column, made a distribution).
    pa, pb = a.matrix[ia], b.matrix[ib]
    pa, pb = pa / np.maximum(pa.sum(0), 1e-12), pb / np.maximum(pb.sum(0), 1e-12)
    change = 0.5 * np.abs(pa - pb).sum(0)  # total-variation distance, 0..1
    order = sorted(range(len(change)), key=lambda i: (-change[i], i))[:TOP_CHANGED_HEADS]
    changed = [{"head": a.head_names[i], "role_a": cats[int(pa[:, i].argmax())], "role_b": cats[int(pb[:, i].argmax())],
                "change": round(float(change[i]), 4)} for i in order]
    return {"comparable": True, "k": k, "categories": cats, "overlap": {c: round(v, 4) for c, v in overlap.items()},
            "changed": changed, "note": f"same architecture ({len(a.head_names)} heads): relevance compared head by head"
                                        + (f" over the {len(cats)} categories both matrices have"
                                           if len(cats) < max(len(a.categories), len(b.categories)) else "")}


def _differences(ma: dict, mb: dict) -> list[dict]:
    """Manifest settings that differ between the runs (times and run ids always do, so they are left out)."""
    fa, fb = dict(flatten(ma)), dict(flatten(mb))
    skip = ("run_id", "start_time", "end_time", "command_line", "status")
    return [{"key": k, "a": fa.get(k, "—"), "b": fb.get(k, "—")} for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and k.split(".")[0] not in skip]


def check_gate(max_regressions: int | None, fail_on: str | None) -> None:
    """Refuse gate options that mean nothing, before any work is done."""
    if fail_on not in (None, "regression"):
        raise AuditorError(f"--fail-on {fail_on}: expected 'regression'")
    if max_regressions is not None and max_regressions < 0:
        raise AuditorError(f"--max-regressions {max_regressions}: must be 0 or more")


def gate(comparison: dict, max_regressions: int | None, fail_on: str | None) -> str | None:
    """Why the comparison fails the user's gate, or None. Counts regressions at every level (concept, tag, category)."""
    check_gate(max_regressions, fail_on)
    n = len(comparison["regressions"])
    if max_regressions is not None and n > max_regressions:
        return f"{n} regressions, more than --max-regressions {max_regressions}"
    if fail_on == "regression" and n:
        return f"{n} regression{'s' if n != 1 else ''} (--fail-on regression)"
    return None


def default_out(run_a: str | Path, run_b: str | Path) -> Path:
    return Path("reports") / f"compare-{Path(run_a).resolve().name}-vs-{Path(run_b).resolve().name}"


def to_text(comparison: dict) -> str:
    """The terminal summary: counts, then one line per regression."""
    c = comparison
    lines = [f"compared {c['pairs']} (prompt, seed, concept) pairs over {c['common_prompts']} prompts, "
             f"seeds {', '.join(map(str, c['seeds']))}: {len(c['regressions'])} regressions, "
             f"{len(c['improvements'])} improvements; fidelity {c['overall']['fidelity_a']:.1%} -> "
             f"{c['overall']['fidelity_b']:.1%}"]
    for r in c["regressions"]:
        if r["level"] == "concept":
            what = f"{r['prompt_id']}: {r['concept']}"
        elif r["level"] == "tag":
            what = f"tag {r['tag']} ({r['prompts']} prompt{'s' if r['prompts'] != 1 else ''})"
        else:
            what = f"category {r['category']}"
        says = f" — in B, {r['b_says']}" if r.get("b_says") else ""  # what run B's flags on it say, most often
        lines.append(f"  regression  {what}  flag rate {r['rate_a']:.0%} -> {r['rate_b']:.0%}  "
                     f"(broken {r['broken']}, fixed {r['fixed']}, McNemar p={r['p']:.3g}){says}")
    lines.append(f"heads: {c['heads']['note']}")
    return "\n".join(lines)
