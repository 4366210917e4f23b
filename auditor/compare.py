"""Regression statistics between two audit runs of one suite (a model before and after a change).

Both runs generated the same prompts with the same seeds, so every (prompt, seed, concept) is a *paired*
observation: flagged or not in run A, flagged or not in run B. Observations are pooled per concept, per category and
per suite tag (the prompts a tag marks, e.g. those a known defect affects). Flag-rate changes are tested with
McNemar's exact test on the discordant pairs; mean score changes get a paired bootstrap interval (resampling seeds,
or pairs for a category or tag). The statistics and ``Policy``, which alone decides what counts as a regression, are
in ``auditor.compare_stats``; this module matches the runs' observations, pools them and reports.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from auditor.compare_stats import POLICY, Policy, paired_stats
from auditor.errors import AuditorError
from auditor.manifest import flatten
from auditor.run_relevance import Relevance, read_relevance
from auditor.store import RELEVANCE_NAME, RunStore
from auditor.summary import Pair, across_seeds, pairs_of

TOP_CHANGED_HEADS = 10


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
    """Compare run B against run A (the reference).

    Args:
        run_a, run_b: the two run folders, of one suite with the same seeds.
        policy: what counts as a regression or an improvement.
        allow_partial: compare an unfinished run on its finished generations.
        force: compare a run folder whose files differ from its records.

    Returns:
        The comparison: the runs, warnings, per-concept, -category and -tag statistics, regressions and
        improvements, head-role changes and the manifest settings that differ. Raises AuditorError when the runs
        cannot be compared: different suites or seeds, an uncalibrated run, an unfinished one unless
        ``allow_partial``, an altered one unless ``force``, or no observation in common.
    """
    notes: dict = {"partial": [], "forced": []}
    a, b = _load(run_a, allow_partial, force, notes), _load(run_b, allow_partial, force, notes)
    suite, seeds = _check_design(run_a, a, run_b, b)
    warnings, matched = _match(a, b)
    warnings += _profile_differences(a.manifest, b.manifest)
    warnings += _reading_differences(a.manifest, b.manifest)
    matched, not_comparable = _leave_out_not_comparable(a, b, matched)
    if not_comparable:
        warnings.append(_not_comparable_text(not_comparable))
    warnings += _notes_text(notes)
    if not matched:
        why = f" ({_not_comparable_text(not_comparable)})" if not_comparable else ""
        raise AuditorError(f"{run_a} and {run_b} have no finished (prompt, seed, concept) in common to compare{why}")
    concepts, categories, tags = _pooled_stats(matched, a.generations, policy)
    overall = paired_stats(matched, policy)
    overall.pop("verdict")  # the gate is on concepts, tags and categories; the overall numbers are context
    levels = [("concept", concepts), ("tag", tags), ("category", categories)]
    regressions = [{"level": lv, **c} for lv, rows in levels for c in rows if c["verdict"] == "regression"]
    improvements = [{"level": lv, **c} for lv, rows in levels for c in rows if c["verdict"] == "improvement"]
    return {
        "run_a": a.info, "run_b": b.info, "suite": suite, "seeds": seeds,
        "warnings": warnings,
        "common_prompts": len({pa.prompt_id for pa, _ in matched}), "pairs": len(matched),
        "policy": {**asdict(policy), "text": policy.describe()},
        "overall": {**overall, "fidelity_a": round(1 - overall["rate_a"], 4), "fidelity_b": round(1 - overall["rate_b"], 4)},
        "concepts": concepts, "categories": categories, "tags": tags,
        "regressions": regressions, "improvements": improvements,
        "heads": compare_heads(a.relevance, b.relevance, _heads_k(a.manifest)),
        "manifest_differences": _differences(a.manifest, b.manifest),
        "partial": notes["partial"], "forced": notes["forced"], "not_comparable": not_comparable,
    }


def _check_design(run_a: str | Path, a: _Run, run_b: str | Path, b: _Run) -> tuple[str | None, list]:
    """The suite name and seeds both runs share; an AuditorError when they differ, or when a run flagged nothing for
    want of thresholds, since paired statistics need the same prompts, the same seeds and real flags."""
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
    return suite_a, seeds_a


def _leave_out_not_comparable(a: _Run, b: _Run, matched: list) -> tuple[list, dict | None]:
    """``matched`` without the observations of categories only one run's model has heads for (``_not_comparable``),
    and that record with what was left out added (None when both models have heads for the same categories)."""
    not_comparable = _not_comparable(a, b)
    if not not_comparable:
        return matched, not_comparable
    only = set(not_comparable["only_a"]) | set(not_comparable["only_b"])
    left_out = [(pa, pb) for pa, pb in matched if pa.category in only or pb.category in only]
    matched = [(pa, pb) for pa, pb in matched if pa.category not in only and pb.category not in only]
    not_comparable["observations_left_out"] = len(left_out)
    not_comparable["concepts_left_out"] = sorted({f"{pa.prompt_id}: {pa.concept}" for pa, _ in left_out})
    return matched, not_comparable


def _notes_text(notes: dict) -> list[str]:
    """Warnings for the runs ``_load`` let through: unfinished ones (--allow-partial) and altered ones (--force)."""
    partial = [f"run {n['run_id']} is unfinished ({n['generations']} of {n['planned'] or '?'} generations; "
               f"--allow-partial): compared on its finished generations only" for n in notes["partial"]]
    forced = [f"run {n['run_id']} differs from what its audit recorded ({'; '.join(n['problems'][:3])}"
              f"{'; …' if len(n['problems']) > 3 else ''}): compared anyway (--force)" for n in notes["forced"]]
    return partial + forced


def _pooled_stats(matched: list, generations_a: list[dict], policy: Policy) -> tuple[list, list, list]:
    """The paired statistics pooled per concept, per category and per suite tag (tags as run A's generations
    recorded them): (concepts, categories, tags), categories and tags sorted by name."""
    by_concept: dict[tuple[str, str], list] = defaultdict(list)
    by_category: dict[str, list] = defaultdict(list)
    by_tag: dict[str, list] = defaultdict(list)
    tags_of = {g["prompt_id"]: list(g.get("tags") or []) for g in generations_a}
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
    return concepts, categories, tags


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
