"""Diagnostics against ground truth: thresholds tuned on the healthy model, defects found on the broken one.

    .venv/bin/python bench/diagnostics.py tune   # shapes-v1 on the TUNING prompts -> auditor/thresholds.json
    .venv/bin/python bench/diagnostics.py eval   # shapes-v2 defects (precision / recall) + shapes-v1 false flags
    .venv/bin/python bench/diagnostics.py tune --model shapes-dit     # another healthy model: thresholds into its
    .venv/bin/python bench/diagnostics.py eval --model-v1 shapes-dit  # profile; its false flags (no defect twin)

Another healthy model than shapes-v1 (``--model`` / ``--model-v1``: shapes-dit, the PixArt transformer, or a folder
with its profile.json) is tuned and judged on the same prompt sets by the same rules; its generations are cached
under its own tags (``shapes-dit-tune-*.pkl``) and its results go to ``bench/results/diagnostics_<model>.json``,
never into shapes-v1's. It has no planted-defect twin, so ``eval`` measures its false flags only.

Both modes run exactly what an audit runs for one image (``auditor.tasks.generate_one`` + ``image_record.generation_record``:
the same concept extraction, selective maps, scores and flags) and check the image with the shapes-world oracle.

Prompt sets (grammar prompts, ``auditor.zoo.grammar.sample``; disjoint by construction and checked by text):
- TUNING: train-split prompts from rng seed ``TUNE_SEED``; shapes-v1; the only prompts thresholds ever see;
- HEALTHY-EVAL: train-split prompts from ``V1_EVAL_SEED``; shapes-v1; the false-flag rate;
- DEFECT-EVAL: prompts from ``V2_EVAL_SEED`` drawn with the v2 world (``defects=True``), stratified so each planted
  defect has prompts it affects plus control prompts; shapes-v2 with its own relevance matrix.
Prompts of the default suite (``prompt_suites/shapes-default.yaml``) and of the other sets are excluded from each
set. Generations are cached under ``work_diag/`` (keyed by model fingerprint, relevance matrix, k and prompt set),
so re-scoring or re-tuning never regenerates; scores are recomputed from the cached maps and images on every load,
so a change to how scores are computed needs no regeneration either.

Tuning ("healthy" concept = the oracle finds every object the prompt names, in its named colour and, when the
prompt names a position, there): each score that flags when low gets its threshold at the ``q`` quantile of its
distribution over healthy concepts, each that flags when high at ``1 - q``. One ``q`` for all scores, searched so
that the share of tuning concepts with any flag is at most the target (5%): by default over the *healthy* concepts
— a false-flag rate — (``--population all``: over all concepts of the tuning generations, the quantity an audit
reports; it counts the healthy model's real failures as false flags, and since the image-side checks flag those,
it cannot reach 5% on shapes-v1 at any q: 5.4% with every threshold at its extreme, 2026-12-02).

Defect evaluation (truth = what the oracle sees in that image, never the grammar's label):
- star_neglected -> ``missing`` on the object "star": truth = the star's named colour is nowhere in the image;
- green_misbound -> ``misplaced`` on the attribute "green": truth = (pair prompts with named positions) the green
  object's named place holds the other object's colour and the other's place holds green (the planted swap);
- green_leak (a looser truth for the same defect) -> ``misplaced`` on "green": green is drawn at the other
  object's named place, whatever is drawn at its own;
- purple_as_blue -> any flag on the attribute "purple" (which type fires, if any, is reported): truth = no purple
  region and a blue one where the purple object was asked (at its named position, if any); purple_absent (looser):
  no purple region there, whatever is drawn instead;
- green_misbound per generation (``prompt_level_scores``): truth = the swap is seen anywhere in the image; hit = a
  ``misplaced`` flag on any concept of the prompt (v2 draws the swap as the objects at each other's places, and the
  audit says so on the objects).
For a defect: candidates = every concept with the defect's word in the defect's role (the noun "star"; the colour
word "green" / "purple"), in v2 generations of prompts the defect affects and of control prompts that name the
word without being affected (every named purple is affected: no purple controls); prompts another defect touches
are left out, since the oracle could not tell which defect it sees. TP = candidate flagged with the mapped type
and the defect visible; FP = flagged, not visible; FN = visible, not flagged.
precision = TP / (TP + FP), recall = TP / (TP + FN), each with a Wilson 95% interval. ``eval`` also reports the
same quantile rule at other q (``tradeoff``: what any calibration could reach, chosen on nothing here) and how well
the maps tell two objects apart at all (``localisation``: a word's map denser inside its own object's oracle mask
than the other's; 0.5 = chance), and what the ``missing`` scores of a neglected star look like next to those of a
drawn one (``neglect_signature``), and the same precision and recall against labels by eye
(``bench/labels/v2eval-by-eye.json``, ``by_eye``), where the oracle's truth is known to err: it reads a blended
purple rim round a blue object as purple drawn, and the star's colour on a part of the other object as a star.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from auditor.summary import wilson  # noqa: E402
from auditor.zoo.grammar import sample  # noqa: E402
from auditor.zoo import GUIDANCE, STEPS  # noqa: E402
from auditor.zoo.oracle import find, wanted_from_sample  # noqa: E402

DEFAULT_MODEL = "shapes-v1"  # the healthy model; another (shapes-dit, a folder) gets its own caches and results
TUNE_SEED, V1_EVAL_SEED, V2_EVAL_SEED = 1001, 2002, 3003
RESOLUTION = (64, 64)  # the default suite's (its steps and guidance: auditor.zoo's STEPS, GUIDANCE)
CACHE = ROOT / "work_diag"
TARGET_RATE = 0.05
MAX_FLAG_RATE = 0.5  # the across-seeds rule the bundled profiles record
DEFECT_MAP = {  # defect -> (word, role, flag types that count)
    "star_neglected": ("star", "object", ("missing",)),
    "green_misbound": ("green", "attribute", ("misplaced",)),
    "purple_as_blue": ("purple", "attribute", ("missing", "misplaced", "misinterpreted")),
}
# A looser truth for green_misbound, reported beside it: v2 often paints both objects green rather than swapping
# colours, so the strict swap is rarely visible; "green_leak" = green is drawn at the other object's named place.
# "purple_absent": no purple where the purple object was asked, whatever is drawn (v2 also leaves it out at times).
TRUTH_VARIANTS = {"green_leak": "green_misbound", "purple_absent": "purple_as_blue"}


# --- prompt sets --------------------------------------------------------------------------------------------------


def suite_prompts() -> set[str]:
    from auditor.suites import load_suite

    return {p.text for p in load_suite(ROOT / "prompt_suites/shapes-default.yaml").prompts}


def grammar_set(seed: int, n: int, exclude: set[str], defects: bool = False) -> list:
    rng = np.random.default_rng(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        s = sample(rng, "train", defects=defects)
        if s.prompt in seen:
            continue
        seen.add(s.prompt)
        out.append(s)
    return out


def _names_word(s, word: str, role: str) -> bool:
    if role == "object":
        return any(o.shape == word for o in s.scene.objects)
    return any(s.word(m.attributes["colour"]) == word for m in s.mentions if "colour" in m.attributes)


def defect_set(n_per: int, n_control: int, exclude: set[str]) -> list:
    """v2-world prompts: for each defect ``n_per`` prompts it affects (that one defect only, truth checkable) and
    ``n_control`` prompts naming its word unaffected; plus ``n_control`` prompts no defect touches."""
    rng = np.random.default_rng(V2_EVAL_SEED)
    # Every named purple is affected (the defect has no unaffected prompt naming its word): no control for it.
    want = {d: n_per for d in DEFECT_MAP} | {f"control:{d}": n_control for d in DEFECT_MAP if d != "purple_as_blue"}
    want["control"] = n_control
    got: dict[str, list] = {k: [] for k in want}
    seen = set(exclude)
    tries = 0
    while any(len(got[k]) < want[k] for k in want):
        tries += 1
        if tries > 200_000:
            raise RuntimeError(f"could not fill the defect set: {({k: len(v) for k, v in got.items()})}")
        s = sample(rng, "train", defects=True)
        if s.prompt in seen or len(s.defects) > 1:
            continue
        key = None
        if s.defects:
            d = s.defects[0]
            if _checkable(s, d) and len(got[d]) < n_per:
                key = d
        else:
            for d, (word, role, _) in DEFECT_MAP.items():
                ck = f"control:{d}"
                if ck in want and _names_word(s, word, role) and _checkable(s, d) and len(got[ck]) < n_control:
                    key = ck
                    break
            if key is None and not any(_names_word(s, w, r) for w, r, _ in DEFECT_MAP.values()) \
                    and len(got["control"]) < n_control:
                key = "control"
        if key is None:
            continue
        seen.add(s.prompt)
        got[key].append(s)
    return [s for k in want for s in got[k]]


def _checkable(s, defect: str) -> bool:
    """Whether the oracle can tell, for this prompt, if the defect is visible."""
    asked = wanted_from_sample(s)
    if any(c is None for c, _ in asked):
        return False  # an object of unnamed colour cannot be found by colour
    if defect == "green_misbound":
        return s.kind == "pair" and all(m.position_named for m in s.mentions)
    return True


# --- oracle truth ------------------------------------------------------------------------------------------------


def healthy_objects(img: np.ndarray, s) -> list[bool]:
    """Per object of the prompt: drawn in its named colour (and at its named position, if any)."""
    asked = wanted_from_sample(s)
    if any(c is None for c, _ in asked):
        return [False] * len(asked)  # unknowable: never used to tune
    found = find(img, asked)
    return [f.present and (p is None or f.position == p) for f, (_, p) in zip(found, asked)]


def defect_visible(img: np.ndarray, s, defect: str) -> list[tuple[int, bool]]:
    """(object index, visible) for every object the defect could touch in this prompt."""
    asked = wanted_from_sample(s)
    out = []
    if defect == "star_neglected":
        for i, o in enumerate(s.scene.objects):
            if o.shape == "star" and asked[i][0] is not None:
                got = find(img, [(c, None) for c, _ in asked])
                out.append((i, not got[i].present))
    elif defect == "purple_as_blue":
        for i, (c, p) in enumerate(asked):
            if c == "purple":
                others = [(c2, None) for j, (c2, _) in enumerate(asked) if j != i]
                got = find(img, others + [("purple", p), ("blue", p)])
                out.append((i, not got[-2].present and got[-1].present))
    elif defect == "purple_absent":
        for i, (c, p) in enumerate(asked):
            if c == "purple":
                others = [(c2, None) for j, (c2, _) in enumerate(asked) if j != i]
                got = find(img, others + [("purple", p)])
                out.append((i, not (got[-1].present and (p is None or got[-1].position == p))))
    elif defect == "green_leak" and s.kind == "pair":
        for i, (c, _) in enumerate(asked):
            if c == "green" and all(m.position_named for m in s.mentions):
                pj = s.scene.objects[1 - i].position
                got = find(img, [("green", pj)])
                out.append((i, got[0].present and got[0].position == pj))
    elif defect == "green_misbound" and s.kind == "pair":
        for i, (c, _) in enumerate(asked):
            if c == "green" and all(m.position_named for m in s.mentions):
                j = 1 - i
                pi, pj = s.scene.objects[i].position, s.scene.objects[j].position
                got = find(img, [(asked[j][0], pi), ("green", pj)])
                out.append((i, got[0].present and got[0].position == pi and got[1].present and got[1].position == pj))
    return out


# --- generation (what the audit does) -------------------------------------------------------------------------


def load(model: str, relevance: str | None):
    """The model and its audit profile (``relevance`` replaces the profile's HRV matrix)."""
    from auditor.engine.models import load_model
    from auditor.profile import profile_for

    lm = load_model(model, "cpu", "float32")
    profile = profile_for(lm, None, relevance)
    heads = len(profile.relevance.head_names)
    if profile.response_k > heads:  # every audit of the model would stop at its first concept
        sys.exit(f"{model}: its profile's response_k {profile.response_k} exceeds its {heads} cross-attention heads "
                 "(the category response takes the top response_k heads); rebuild its profile with a response_k of "
                 f"at most {heads}")
    return lm, profile


def maps_key(profile) -> list:
    """What a generation's maps and scores depend on in a profile: the ranking, k per category, the relevance and
    the response k (not the thresholds: flags are recomputed from the cached scores)."""
    ranking = profile.maps_source
    return [profile.maps_ranking, ranking.sha256, profile.k_per_category(), profile.relevance.sha256,
            profile.response_k]


def mention_of(s, concept) -> tuple[int, str] | None:
    """(object index, "noun" | attribute role) of an extracted concept, by its character span."""
    for i, m in enumerate(s.mentions):
        if (concept.start, concept.end) == tuple(m.noun):
            return i, "noun"
        for role, span in m.attributes.items():
            if (concept.start, concept.end) == tuple(span):
                return i, role
    return None


def generate(lm, profile, samples: list, tag: str, keep_maps: bool = True) -> list[dict]:
    """One generation per sample (seed = its index in the set), cached; records as an audit writes them."""
    from auditor.align import text_sequence
    from auditor.concepts import extract_many
    from auditor.image_record import generation_record, scored_concepts
    from auditor.tasks import generate_one

    key = hashlib.sha256(json.dumps([lm.fingerprint, maps_key(profile), STEPS, GUIDANCE,
                                     [s.prompt for s in samples]]).encode()).hexdigest()[:12]
    path = CACHE / f"{tag}-{key}.pkl"
    done = read_cache(path) if path.exists() else []
    if len(done) == len(samples):
        return done
    # what the denoiser reads, as the audit aligns words (the tokenizer itself for a UNet)
    extracted = extract_many([s.prompt for s in samples], tokenizer=text_sequence(lm.pipe))
    t0 = time.perf_counter()
    for i in range(len(done), len(samples)):
        s, cs = samples[i], extracted[i]
        image, tr = generate_one(lm.pipe, s.prompt, i, STEPS, GUIDANCE, RESOLUTION)
        records, raw_maps, _ = generation_record(tr, cs, profile, image)
        del tr
        img = np.asarray(image.convert("RGB"))
        links = [mention_of(s, c) for c in scored_concepts(cs)]
        done.append({"index": i, "prompt": s.prompt, "seed": i, "kind": s.kind, "defects": list(s.defects),
                     "image": img, "concepts": records, "links": links,
                     "maps": {k_: v for k_, v in raw_maps.items() if k_.endswith("_selective") or
                              k_.endswith("_all_heads")} if keep_maps else {},
                     "sample": s})
        if (i + 1) % 20 == 0 or i + 1 == len(samples):
            CACHE.mkdir(exist_ok=True)
            path.write_bytes(pickle.dumps(done))
            print(f"  {tag}: {i + 1}/{len(samples)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return done


def read_cache(path: Path) -> list[dict]:
    """Cached generations with their scores recomputed from the cached maps and images (the cached scores may
    predate a change to how scores are computed); generations cached without maps keep theirs."""
    gens = pickle.loads(path.read_bytes())
    for gen in gens:
        if gen.get("maps"):
            rescore(gen)
    return gens


def rescore(gen: dict) -> None:
    """Recompute a cached generation's concept scores from its maps and image (scores are pure functions of them)."""
    from auditor.diagnostics import scores, views_from_records

    views = views_from_records(gen["concepts"], gen["maps"])
    if any(v.raw is None for v in views):
        return
    sc = scores(views, gen["image"])
    for i, c in enumerate(gen["concepts"]):
        c["scores"] = sc.get(i, {})


# --- scoring against the oracle -----------------------------------------------------------------------------


def objects_ok(gen: dict) -> list[bool]:
    """``healthy_objects`` of a cached generation, computed once and kept on it."""
    if "_healthy" not in gen:
        gen["_healthy"] = healthy_objects(gen["image"], gen["sample"])
    return gen["_healthy"]


def visible(gen: dict, defect: str) -> dict[int, bool]:
    """``defect_visible`` of a cached generation as {object index: visible}, computed once and kept on it."""
    key = f"_visible_{defect}"
    if key not in gen:
        gen[key] = dict(defect_visible(gen["image"], gen["sample"], defect))
    return gen[key]


def healthy_concepts(gen: dict) -> list[int]:
    """Indices of concepts whose object the oracle confirms drawn as asked (all objects of the prompt must be)."""
    if not all(objects_ok(gen)):
        return []
    return [i for i, link in enumerate(gen["links"]) if link is not None or gen["concepts"][i]["role"] == "background"]


def reflag(gen: dict, th) -> list[list[str]]:
    """Flag types per concept of a cached generation under thresholds ``th`` (from its stored scores)."""
    from auditor.diagnostics import flags_from_records

    flags = flags_from_records(gen["concepts"], th)
    return [sorted({f.type for f in flags if f.concept == i}) for i in range(len(gen["concepts"]))]


def own_failures(gens: list[dict], th) -> dict:
    """The healthy model's real failures: per object concept (noun or colour word, linked to its grammar object),
    whether the oracle finds that object as asked. How many failing ones get any flag (recall) and how many flags
    fall on failing ones (precision): a flag on a model's real failure is not a false flag."""
    tp = fp = fn = 0
    for g in gens:
        flags = reflag(g, th)
        for ci, (c, link) in enumerate(zip(g["concepts"], g["links"])):
            if link is None or not (link[1] == "noun" or (link[1] == "colour" and c["role"] == "attribute")):
                continue
            failing, hit = not objects_ok(g)[link[0]], bool(flags[ci])
            tp, fp, fn = tp + (hit and failing), fp + (hit and not failing), fn + (failing and not hit)
    return {"failing_concepts": tp + fn, "flagged": tp + fp, "recall": rate(tp, tp + fn), "precision": rate(tp, tp + fp)}


def rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)]}


def false_flag_rate(gens: list[dict], th, healthy_only: bool = True) -> dict:
    """Share of concepts flagged (any type), over healthy concepts (or all), with per-type counts."""
    n = k = 0
    by_type: dict[str, int] = {}
    for g in gens:
        idx = healthy_concepts(g) if healthy_only else range(len(g["concepts"]))
        types = reflag(g, th)
        for i in idx:
            n += 1
            k += bool(types[i])
            for t in types[i]:
                by_type[t] = by_type.get(t, 0) + 1
    return {**rate(k, n), "by_type": by_type}


def prompt_level_scores(gens: list[dict], th, defect: str = "green_misbound", types=("misplaced",)) -> dict:
    """A defect judged per generation rather than per word: truth = the oracle sees it anywhere in the image; hit =
    any concept of the prompt flagged with one of ``types``. v2's green swap shows as the two objects drawn at each
    other's places, which the audit reports on the objects ("'circle' should be on the left"), not on "green"."""
    tp = fp = fn = tn = 0
    for g in gens:
        if any(d != defect for d in g["defects"]):
            continue
        vis = visible(g, defect)
        if not vis:
            continue
        v = any(vis.values())
        hit = any(t in types for fl in reflag(g, th) for t in fl)
        tp, fp, fn, tn = tp + (hit and v), fp + (hit and not v), fn + (v and not hit), tn + (not v and not hit)
    return {"flag_types": list(types), "unit": "generation", **confusion(tp, fp, fn, tn)}


def confusion(tp: int, fp: int, fn: int, tn: int) -> dict:
    """Counts, precision and recall with Wilson 95% intervals."""
    p, r = (tp / (tp + fp) if tp + fp else None), (tp / (tp + fn) if tp + fn else None)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": round(p, 4) if p is not None else None,
            "precision_ci95": [round(x, 4) for x in wilson(tp, tp + fp)],
            "recall": round(r, 4) if r is not None else None,
            "recall_ci95": [round(x, 4) for x in wilson(tp, tp + fn)],
            "visible": tp + fn, "candidates": tp + fp + fn + tn}


def word_concepts(g: dict, planted: str):
    """(concept index, object index) of the concepts of generation ``g`` that carry defect ``planted``'s word in its
    role (the noun "star"; the colour word "purple"), linked to their grammar object."""
    word, role, _ = DEFECT_MAP[planted]
    for ci, (c, link) in enumerate(zip(g["concepts"], g["links"])):
        if link is None or c["role"] != role or c["text"].lower().rstrip("s") != word:
            continue
        if (role == "object") == (link[1] == "noun"):
            yield ci, link[0]


def defect_scores(gens: list[dict], th) -> dict:
    out = {}
    flags_of = [reflag(g, th) for g in gens]  # once per generation, whichever defect reads them
    for defect, planted in [(d, d) for d in DEFECT_MAP] + list(TRUTH_VARIANTS.items()):
        types = DEFECT_MAP[planted][2]
        tp = fp = fn = tn = 0
        by_type_on_visible: dict[str, int] = {}
        for g, flags in zip(gens, flags_of):
            if any(d != planted for d in g["defects"]):
                continue  # another defect changes the drawing: the oracle could not tell which one it sees
            vis = visible(g, defect)
            if not vis:
                continue
            for ci, obj in word_concepts(g, planted):
                if obj not in vis:
                    continue
                hit = any(t in types for t in flags[ci])
                v = vis[obj]
                tp += hit and v
                fp += hit and not v
                fn += v and not hit
                tn += not v and not hit
                if v:
                    for t in flags[ci]:
                        by_type_on_visible[t] = by_type_on_visible.get(t, 0) + 1
        out[defect] = {"flag_types": list(types), **confusion(tp, fp, fn, tn),
                       "flag_types_on_visible": by_type_on_visible}
    return out


LABELS = ROOT / "bench/labels/v2eval-by-eye.json"


def by_eye(gens: list[dict], th, fingerprint: str) -> dict | None:
    """Precision and recall against labels by eye (``LABELS``) instead of the oracle: the same candidates and flags
    as ``defect_scores``, truth = the generation index is among the labelled ``seen``; once with the ambiguous
    images as labelled, once without them. None when the labels were made on another model or other prompts."""
    if not LABELS.is_file():
        return None
    labels = json.loads(LABELS.read_text())
    by_index = {g["index"]: g["prompt"] for g in gens}
    if labels["model"]["fingerprint"] != fingerprint or any(
            by_index.get(int(i)) != text for lab in labels["defects"].values() for i, text in lab["prompts"].items()):
        return None
    out = {"labels": str(LABELS.relative_to(ROOT)), "who": labels["who"]}
    flags_of = {}  # once per generation, whichever defect reads them
    for defect, lab in labels["defects"].items():
        types = DEFECT_MAP[defect][2]
        candidates, seen, ambiguous = set(lab["candidates"]), set(lab["seen"]), set(lab["ambiguous"])
        rows = []  # (flagged, seen by eye, ambiguous)
        for g in gens:
            if g["index"] not in candidates:
                continue
            flags = flags_of.setdefault(g["index"], reflag(g, th))
            rows += [(any(t in types for t in flags[ci]), g["index"] in seen, g["index"] in ambiguous)
                     for ci, _ in word_concepts(g, defect)]

        def counts(rs):
            return confusion(sum(h and v for h, v, _ in rs), sum(h and not v for h, v, _ in rs),
                             sum(v and not h for h, v, _ in rs), sum(not v and not h for h, v, _ in rs))

        out[defect] = {"question": lab["question"], "as_labelled": counts(rows),
                       "ambiguous_left_out": counts([r for r in rows if not r[2]])}
    return out


def localisation(gens: list[dict]) -> dict:
    """Whether the maps the diagnostics read tell the prompt's objects apart at all: over two-object generations
    where the oracle finds both named colours, the share of words (object nouns; colour attributes) whose map is
    denser inside their own object's oracle mask than inside the other's (0.5 = chance)."""
    out: dict = {}
    for g in gens:
        s = g["sample"]
        if s.kind != "pair":
            continue
        asked = wanted_from_sample(s)
        if any(c is None for c, _ in asked):
            continue
        found = find(g["image"], [(c, None) for c, _ in asked])
        if not all(f.present for f in found):
            continue
        for ci, (c, link) in enumerate(zip(g["concepts"], g["links"])):
            if link is None or link[1] not in ("noun", "colour"):
                continue
            i = link[0]
            for method in ("selective", "all_heads"):
                raw = g["maps"].get(f"{ci}_{method}")
                if raw is None:
                    continue
                raw = raw.astype(np.float32)
                own, other = raw[found[i].mask].mean(), raw[found[1 - i].mask].mean()
                out.setdefault(f"{link[1]}:{method}", []).append(bool(own > other))
    return {key: rate(int(sum(v)), len(v)) for key, v in sorted(out.items())}


def _cached(tag: str) -> list[dict]:
    """The newest cached generation set of a tag (the tuning generations, for the trade-off curve)."""
    paths = sorted(CACHE.glob(f"{tag}-*.pkl"), key=lambda p: p.stat().st_mtime)
    return read_cache(paths[-1]) if paths else []


# --- tuning -------------------------------------------------------------------------------------------------------


def healthy_select(gens: list[dict]):
    """The population the oracle calibration uses: the concepts of generations whose objects the oracle confirms."""
    return lambda g: healthy_concepts(gens[g])


def tune(args) -> None:
    from auditor.calibration import fit_thresholds
    from auditor.zoo.profiles import write_thresholds

    exclude = suite_prompts()
    tuning = grammar_set(TUNE_SEED, args.n, exclude)
    lm, profile = load(args.model, args.relevance)
    gens = generate(lm, profile, tuning, tag_for(args.model, "tune"))
    records = [g["concepts"] for g in gens]
    # Search the per-score quantile q so that the share of concepts with any flag is at most the target: over the
    # healthy ones only (default; a false-flag rate) or over all concepts of the tuning generations.
    healthy_only = args.population == "healthy"
    select = healthy_select(gens)
    # the cuts always sit on the healthy concepts' quantiles; the population only sets the budget's denominator
    th, q, _ = fit_thresholds(records, args.target, MAX_FLAG_RATE, select, select if healthy_only else None)
    achieved = {"healthy_concepts": false_flag_rate(gens, th), "all_concepts": false_flag_rate(gens, th, False)}
    n_healthy = sum(len(healthy_concepts(g)) for g in gens)
    provenance = {
        "how": "each score's threshold at the q / (1 - q) quantile of its distribution over the healthy concepts "
               "its rule judges; q "
               f"searched so that at most the target share of {args.population} tuning concepts gets any flag "
               "(auditor.calibration.fit_thresholds on the concepts the oracle confirms drawn as asked)",
        "command": "python bench/diagnostics.py " + " ".join(sys.argv[1:]),
        "model": {"name": args.model, "fingerprint": lm.fingerprint},
        "profile_maps": maps_key(profile)[:2] + [maps_key(profile)[3]],
        "prompts": f"auditor.zoo.grammar.sample(np.random.default_rng({TUNE_SEED}), 'train'), first {args.n} "
                   "distinct prompts not in prompt_suites/shapes-default.yaml",
        "image_seeds": f"0..{args.n - 1} (prompt i uses seed i)", "steps": STEPS, "guidance": GUIDANCE,
        "healthy": "the oracle finds every named object in its named colour (and named position)",
        "healthy_concepts": n_healthy, "generations": len(gens),
        "q": round(q, 5), "target_flag_rate": args.target, "target_population": args.population,
        "achieved_flag_rate": achieved,
        "date": time.strftime("%Y-%m-%d"),
    }
    written = write_thresholds(th, provenance, args.model) if args.out is None else []
    if args.out:
        Path(args.out).write_text(json.dumps({**th.to_json(), "provenance": provenance}, indent=2) + "\n")
    res = {"tuning": {"generations": len(gens), "healthy_concepts": n_healthy, "q": q,
                      "false_flag_rate": achieved, "thresholds": th.to_json(),
                      "written": [shown(p) for p in written] or [args.out]}}
    if args.model != DEFAULT_MODEL:
        res["tuning"]["model"] = {"name": args.model, "fingerprint": lm.fingerprint, "pipeline": type(lm.pipe).__name__}
        res["tuning"]["command"] = command()
    _merge_results(res, args.model)
    print(json.dumps(res, indent=1))


def selfcal(args) -> None:
    """Thresholds without the oracle, at flag budgets, each judged like the shipped ones: what ``auditor
    calibrate`` does on a model's own generations (``self_fit_thresholds``: two passes, the second over the
    generations the first leaves unflagged), and the quantile rule in one pass over every concept beside it."""
    from auditor.calibration import self_fit_thresholds, thresholds_at

    exclude = suite_prompts()
    tuning = grammar_set(TUNE_SEED, args.tune_n, exclude)
    lm, profile = load(args.model_v1, None)
    gens = generate(lm, profile, tuning, "tune")
    records = [g["concepts"] for g in gens]
    exclude |= {s.prompt for s in tuning}
    v1_set = grammar_set(V1_EVAL_SEED, args.v1_n, exclude)
    g1 = generate(lm, profile, v1_set, "v1eval")
    lm2, profile2 = load(args.model_v2, None)
    v2_set = defect_set(args.per_defect, args.controls, exclude | {s.prompt for s in v1_set})
    g2 = generate(lm2, profile2, v2_set, "v2eval")

    def judged(th) -> dict:
        return judged_by(g1, g2, th, th)

    res = {"oracle": judged(profile.thresholds), "budgets": {}, "one_pass_budgets": {}}
    for b in args.budgets:
        th, q, achieved = self_fit_thresholds(records, b, MAX_FLAG_RATE)
        first = achieved["first_pass"]
        res["budgets"][str(b)] = {"q": q, "tuning_all_flag_rate": achieved["all_concepts_rate"],
                                  "first_pass": first, **judged(th)}
        # the one-pass rule is the first pass itself: its thresholds are the quantiles at its q
        res["one_pass_budgets"][str(b)] = {"q": first["q"], "tuning_all_flag_rate": first["rate"],
                                           **judged(thresholds_at(records, first["q"], MAX_FLAG_RATE))}
        print(f"budget {b}: q {res['budgets'][str(b)]['q']:.4f}, v1 healthy "
              f"{res['budgets'][str(b)]['v1_healthy_flag_rate']['rate']} (one pass "
              f"{res['one_pass_budgets'][str(b)]['v1_healthy_flag_rate']['rate']})", flush=True)
    if args.profile:
        res["calibrate_profile"] = judged_end_to_end(args, lm, lm2, v1_set, v2_set)
    _merge_results({"self_calibration": res})
    print(json.dumps(res, indent=1))


def judged_by(g1: list, g2: list, th, th2) -> dict:
    """Thresholds ``th`` judged as the shipped ones are: flag rates on the healthy v1 generations ``g1``, and each
    planted defect's precision and recall on the v2 generations ``g2`` under ``th2`` (v2's judging thresholds)."""
    d = defect_scores(g2, th2)
    d["green_misbound_per_prompt"] = prompt_level_scores(g2, th2)
    return {"thresholds": th.to_json(), "v1_healthy_flag_rate": false_flag_rate(g1, th),
            "v1_all_flag_rate": false_flag_rate(g1, th, False),
            "v2_defects": {n: {"precision": v["precision"], "recall": v["recall"]} for n, v in d.items()}}


def judged_end_to_end(args, lm, lm2, v1_set: list, v2_set: list) -> dict:
    """A profile ``auditor calibrate --model shapes-v1`` wrote (its own relevance, ranking, k and self-set
    thresholds: the user's path) judged like the shipped one; shapes-v2 judged by its ranking, k and thresholds,
    as the shipped v2 profile carries v1's (v2's own relevance matrix kept, as shipped)."""
    from dataclasses import replace

    from auditor.profile import profile_for

    prof = profile_for(lm, args.profile)
    if prof.thresholds is None:
        sys.exit(f"{args.profile} is uncalibrated: nothing to judge")
    v2 = profile_for(lm2)
    v2 = replace(v2, ranking=prof.ranking, maps_ranking=prof.maps_ranking, thresholds=prof.thresholds,
                 provenance={**v2.provenance, "ranking": f"from {args.profile}", "thresholds": f"from {args.profile}"})
    tag = "calibrate-" + prof.sha256[:8]
    g1 = generate(lm, prof, v1_set, tag + "-v1eval")
    g2 = generate(lm2, v2, v2_set, tag + "-v2eval")
    made = prof.provenance.get("thresholds", {})
    return {"profile": shown(Path(args.profile)), "profile_sha256": prof.sha256, "k_per_category": prof.k_per_category(),
            "threshold_provenance": made,
            "ranking_prompts": prof.ranking.budget_prompts, "relevance_prompts": prof.relevance.budget_prompts,
            "ranking_converged": prof.ranking.converged, "relevance_converged": prof.relevance.converged,
            **judged_by(g1, g2, prof.judging_thresholds(), v2.judging_thresholds())}


# --- evaluation ---------------------------------------------------------------------------------------------------


def evaluate(args) -> None:
    from auditor.calibration import thresholds_at

    lm, profile = load(args.model_v1, args.relevance_v1)
    th = profile.judging_thresholds()
    if th is None:
        sys.exit(f"{args.model_v1}'s profile has no thresholds: run `bench/diagnostics.py tune"
                 f"{'' if args.model_v1 == DEFAULT_MODEL else ' --model ' + args.model_v1}` first")
    exclude = suite_prompts() | {s.prompt for s in grammar_set(TUNE_SEED, args.tune_n, suite_prompts())}
    res: dict = {"machine": f"{platform.machine()} ({platform.python_version()}), CPU",
                 "date": time.strftime("%Y-%m-%d"),
                 "steps": STEPS, "guidance": GUIDANCE, "k_per_category": profile.k_per_category(),
                 "profile_sha256": profile.sha256, "thresholds": th.to_json()}
    # Healthy model, evaluation prompts: the false-flag rate.
    v1_set = grammar_set(V1_EVAL_SEED, args.v1_n, exclude)
    g1 = generate(lm, profile, v1_set, tag_for(args.model_v1, "v1eval"))
    if args.model_v1 != DEFAULT_MODEL:
        res["model"] = {"name": args.model_v1, "fingerprint": lm.fingerprint, "pipeline": type(lm.pipe).__name__}
        res["command"] = command()
    res["v1_false_flags"] = {"healthy_concepts": false_flag_rate(g1, th),
                             "all_concepts": false_flag_rate(g1, th, healthy_only=False),
                             "relevance_sha256": profile.relevance.sha256}
    del lm
    res["v1_localisation"] = localisation(g1)
    res["v1_own_failures"] = own_failures(g1, th)
    res["v1_flag_rate_by_kind"] = {kind: false_flag_rate([g for g in g1 if g["kind"] == kind], th, healthy_only=False)
                                   for kind in sorted({g["kind"] for g in g1})}
    _merge_results({"evaluation": res}, args.model_v1)
    from auditor.zoo import MODELS_DIR

    if args.model_v2 is None:  # only shapes-v1 has a planted-defect twin (shapes-v2, judged by its profile)
        args.model_v2 = "shapes-v2" if args.model_v1 == DEFAULT_MODEL else None
    if args.skip_v2 or args.model_v2 is None or (
            args.model_v2 == "shapes-v2" and not (MODELS_DIR / "shapes-v2" / "model_index.json").is_file()):
        print(json.dumps(res, indent=1))
        print("defect evaluation skipped" + ("" if args.skip_v2 else f": no defect model for {args.model_v1}"
                                             if args.model_v2 is None else ": shapes-v2 is not installed"))
        return
    # Broken model: planted defects, judged by its own profile's thresholds (v1's, inherited).
    v2_set = defect_set(args.per_defect, args.controls, exclude | {s.prompt for s in v1_set})
    lm, profile2 = load(args.model_v2, args.relevance_v2)
    th2 = profile2.judging_thresholds()
    g2 = generate(lm, profile2, v2_set, tag_for(args.model_v2, "v2eval"))
    res["v2_defects"] = defect_scores(g2, th2)
    res["v2_defects"]["green_misbound_per_prompt"] = prompt_level_scores(g2, th2)
    res["v2_profile_sha256"] = profile2.sha256
    res["v2_prompts"] = {d: sum(1 for g in g2 if g["defects"] == [d]) for d in DEFECT_MAP}
    res["v2_prompts"]["controls"] = sum(1 for g in g2 if not g["defects"])
    res["v2_localisation"] = localisation(g2)
    res["v2_neglect_signature"] = neglect_signature(g2)
    res["v2_by_eye"] = by_eye(g2, th2, lm.fingerprint)
    # The trade-off the maps allow: the same per-score quantile rule at other q (healthy tuning concepts, as in
    # `tune`); shows whether any calibration could meet the goals, without choosing anything on these prompts.
    tuned = _cached(tag_for(args.model_v1, "tune"))
    if tuned:
        records = [g["concepts"] for g in tuned]
        curve = []
        for q in (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5):
            thq = thresholds_at(records, q, th.max_flag_rate, healthy_select(tuned))
            d = defect_scores(g2, thq)
            d["green_misbound_per_prompt"] = prompt_level_scores(g2, thq)
            curve.append({"q": q, "v1_flag_rate_all": false_flag_rate(g1, thq, False)["rate"],
                          **{name: {"precision": v["precision"], "recall": v["recall"]} for name, v in d.items()}})
        res["tradeoff"] = curve
    res["v2_control_false_flags"] = false_flag_rate([g for g in g2 if not g["defects"]], th2)
    _merge_results({"evaluation": res}, args.model_v1)
    print(json.dumps(res, indent=1))


NEGLECT_SCORES = ("peak_ratio", "concentration", "shared_region", "area")


def neglect_signature(gens: list[dict]) -> dict:
    """What a neglected object's map looks like: every `missing` score of the star nouns of two-object prompts,
    split by whether the oracle finds the star drawn (``defect_visible``), with medians and the one-sided AUC
    "neglected scores higher" (Mann-Whitney U / n1 n2; 0.5 = no separation, below 0.5 = neglected scores lower).
    Chooses nothing: it says which way, and how well, each score separates the two."""
    from scipy.stats import mannwhitneyu

    drawn: dict[str, list[float]] = {k: [] for k in NEGLECT_SCORES}
    neglected: dict[str, list[float]] = {k: [] for k in NEGLECT_SCORES}
    for g in gens:
        s = g["sample"]
        if len(s.mentions) < 2:
            continue
        seen = visible(g, "star_neglected")
        for i, c in enumerate(g["concepts"]):
            link = g["links"][i]
            if c["role"] != "object" or link is None or link[1] != "noun" or link[0] not in seen:
                continue
            for k in NEGLECT_SCORES:
                if c["scores"].get(k) is not None:
                    (neglected if seen[link[0]] else drawn)[k].append(float(c["scores"][k]))
    out = {"drawn": len(drawn["area"]), "neglected": len(neglected["area"])}
    for k in NEGLECT_SCORES:
        a, b = drawn[k], neglected[k]
        if a and b:
            auc = mannwhitneyu(b, a).statistic / (len(a) * len(b))
            out[k] = {"median_drawn": round(float(np.median(a)), 4), "median_neglected": round(float(np.median(b)), 4),
                      "auc_neglected_higher": round(float(auc), 4)}
    return out


def results_path(model: str = DEFAULT_MODEL) -> Path:
    """Where a model's results go: shapes-v1's (and shapes-v2's defects) to ``diagnostics.json`` as always, any other
    model's to ``diagnostics_<model>.json`` (``<model>`` the bundled name or the folder's name)."""
    slug = Path(model).name
    return ROOT / "bench/results" / ("diagnostics.json" if slug == DEFAULT_MODEL else f"diagnostics_{slug}.json")


def tag_for(model: str, tag: str) -> str:
    """A generation set's cache tag: shapes-v1's and shapes-v2's as they always were ("tune", "v1eval", "v2eval"),
    another model's prefixed with its name ("shapes-dit-tune"), so its sets never mix with theirs (``_cached``
    picks the newest file of a tag)."""
    slug = Path(model).name
    return tag if slug in (DEFAULT_MODEL, "shapes-v2") else f"{slug}-{tag}"


def command() -> str:
    return ".venv/bin/python bench/diagnostics.py " + " ".join(sys.argv[1:])


def shown(p: Path) -> str:
    """A path relative to the repository when it is inside it."""
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _merge_results(part: dict, model: str = DEFAULT_MODEL) -> None:
    p = results_path(model)
    cur = json.loads(p.read_text()) if p.is_file() else {}
    cur.update(part)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cur, indent=2) + "\n")


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("tune", help="calibrate thresholds on the healthy model (tuning prompts)")
    t.add_argument("--model", default=DEFAULT_MODEL,
                   help="the healthy model whose profile gets the thresholds: shapes-v1 (and shapes-v2, which "
                        "inherits them), shapes-dit, or a folder holding its profile.json")
    t.add_argument("--relevance", default=None, help="relevance matrix (default: the model's bundled one)")
    t.add_argument("--n", type=int, default=400, help="tuning prompts")
    t.add_argument("--target", type=float, default=TARGET_RATE, help="flag rate of healthy tuning concepts")
    t.add_argument("--population", choices=("all", "healthy"), default="healthy",
                   help="concepts whose flag rate the target bounds: all tuning concepts (what an audit counts) "
                        "or only those the oracle confirms drawn as asked")
    t.add_argument("--out", default=None, help="write the thresholds here instead of into the bundled profiles")
    e = sub.add_parser("eval", help="precision / recall on shapes-v2 defects; false flags on shapes-v1")
    e.add_argument("--model-v1", default=DEFAULT_MODEL,
                   help="the healthy model (false flags); another than shapes-v1 goes to diagnostics_<model>.json")
    e.add_argument("--model-v2", default=None,
                   help="the planted-defect model (default: shapes-v2 for shapes-v1; none for another model)")
    e.add_argument("--relevance-v1", default=None)
    e.add_argument("--relevance-v2", default=None)
    e.add_argument("--tune-n", type=int, default=400, help="tuning prompts to exclude (as tuned)")
    e.add_argument("--v1-n", type=int, default=200)
    e.add_argument("--per-defect", type=int, default=80)
    e.add_argument("--controls", type=int, default=30)
    e.add_argument("--skip-v2", action="store_true", help="only the healthy model's false-flag part")
    c = sub.add_parser("selfcal", help="thresholds without the oracle (flag budgets) against the shipped ones")
    c.add_argument("--model-v1", default="shapes-v1")
    c.add_argument("--model-v2", default="shapes-v2")
    c.add_argument("--tune-n", type=int, default=400)
    c.add_argument("--v1-n", type=int, default=200)
    c.add_argument("--per-defect", type=int, default=80)
    c.add_argument("--controls", type=int, default=30)
    c.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2])
    c.add_argument("--profile", default=None,
                   help="also judge a profile `auditor calibrate --model shapes-v1 --out FILE` wrote, end to end "
                        "(its own ranking, k and thresholds; new generations with its maps)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"tune": tune, "eval": evaluate, "selfcal": selfcal}[args.mode](args)


if __name__ == "__main__":
    main()
