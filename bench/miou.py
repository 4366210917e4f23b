"""Selective vs all-heads concept maps against ground truth: mean IoU on held-out shapes-world prompts.

    .venv/bin/python bench/miou.py                          # default: 100 tuning + 200 test generations
    .venv/bin/python bench/miou.py --n-tune 16 --n-test 16  # a quick look
    .venv/bin/python bench/miou.py --analyse-only           # re-score cached captures (no generation)
    .venv/bin/python bench/miou.py --relevance PATH.npz     # another head-relevance matrix
    .venv/bin/python bench/miou.py --model shapes-dit       # the PixArt transformer (or a diffusers folder)

Protocol
- Prompts: ``auditor.zoo.grammar.sample(rng, "heldout")``, whose first object is always a held-out (shape, colour,
  position) composition the model never saw. Two splits from two rng seeds: TUNING (``TUNE_SEED``) and TEST
  (``TEST_SEED``); test prompts whose text also occurs in tuning are dropped, so no prompt is in both. One image
  per prompt with a fixed seed (tuning 10000 + i, test 20000 + i), 20 steps, guidance 5, 64x64: the defaults.
- Ground truth: the oracle (``auditor.zoo.oracle.find``) locates each prompted object in the generated image by
  its named colour (and named position); objects the oracle does not find are not scored (counted as skipped).
- Concepts: each object's noun (category "shape", or "food" for the fruit "orange") and its colour, size and
  texture words (categories of the same name); token indices from the grammar's character spans
  (``auditor.align.align_spans``), so the parser plays no part. Truth for an attribute is its object's mask.
- Maps: ``auditor.engine.maps`` aggregation, DAAM's (each head's map of each token upsampled bicubically to the
  latent grid and clamped at 0, the weighted mean over heads and the mean over the word's tokens, bicubic to
  64x64), mask by ``maps.binarize`` (Otsu), IoU against the oracle mask. Methods: ``all_heads`` (DAAM's default:
  no mid block; the engine's own map is stored by the capture and the fast path is checked against it),
  ``selective`` (top-k of the category by HRV relevance, k swept), ``weighted`` (relevance-weighted), ``bottom_k``
  (the k least relevant), and the shipped profile's localisation ranking at its own k per category (``profile``).
  Attention is captured once per image and split into quarters of the denoising steps, so timestep windows are
  scored from the same generations.
- Choices made on TUNING only: the selective k (pooled mean IoU, all steps), each method's best timestep window,
  k per layer resolution, per-category k. TEST reports them with cluster-bootstrap 95% intervals (generations
  resampled, seed 0). bottom_k uses the selective k.
- Investigation: each single head's IoU; how well the relevance ranking predicts it (Spearman, tuning split); an
  "oracle ranking" that orders heads by their tuning-split IoU (chosen on tuning, reported on test) bounds what
  any head selection could gain; per-head min-max normalisation before aggregation.

Models: shapes-v1 by default; ``--model`` takes another bundled name (shapes-dit, the PixArt transformer on v1's VAE
and text encoder, whose maps are on its 8x8 patch grid and whose ``all_heads`` is every head) or a diffusers
folder. Each model is scored with its own relevance matrix (``relevance.npz`` beside it) and its own profile.
A transformer has fewer heads than the largest k swept: a k above its head count is left out (not scored).

Captures go to ``work_bench/miou_<split>.npz`` (keyed by model fingerprint and settings; reused when they match);
results to ``bench/results/miou.json``; for another model ``miou_<model>_<split>.npz`` and ``miou_<model>.json``
(``<model>`` the bundled name or the folder's name). ``bench/report.py`` turns them into docs/benchmarks.md and
figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from stats import bootstrap_mean, iou, paired_difference  # noqa: E402

from auditor.align import align_spans, text_sequence  # noqa: E402
from auditor.engine.heads import layer_of  # noqa: E402
from auditor.engine.maps import binarize, concept_map, daam_weights, head_weights  # noqa: E402
from auditor.zoo.grammar import sample  # noqa: E402
from auditor.zoo.oracle import find, wanted_from_sample  # noqa: E402
from auditor.zoo.world import FRUIT  # noqa: E402

DEFAULT_MODEL = "shapes-v1"
TUNE_SEED, TEST_SEED = 6001, 6002
IMAGE_SEED = {"tune": 10_000, "test": 20_000}
SEGMENTS = 4
KS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48)
WINDOWS = {  # name -> (first segment, end segment); segment q covers steps [5q, 5q + 5) of 20 (0 = noisiest)
    "0-1": (0, 4), "0-0.5": (0, 2), "0.5-1": (2, 4), "0-0.75": (0, 3), "0.25-1": (1, 4), "0.25-0.75": (1, 3),
}
FULL = "0-1"
ATTRIBUTE_ROLES = ("colour", "size", "texture")
METHODS = ("all_heads", "selective", "weighted", "bottom_k", "random_k")
RANDOM_DRAWS = 8


# --- stage 1: generate and capture ------------------------------------------------------------------------------


def draw_samples(n: int, seed: int, exclude: set[str] = frozenset()):
    rng = np.random.default_rng(seed)
    got = []
    while len(got) < n:
        s = sample(rng, "heldout")
        if s.prompt not in exclude:
            got.append(s)
    return got


def concepts_of(s, found, tokenizer) -> list[dict]:
    """The scored concepts of one sample: (object index, role, category, word, token indices)."""
    out = []
    for i, (obj, m) in enumerate(zip(s.scene.objects, s.mentions)):
        if not found[i].present:
            continue
        words = [("noun", "food" if obj.shape == FRUIT else "shape", m.noun)]
        words += [(r, r, span) for r, span in m.attributes.items() if r in ATTRIBUTE_ROLES]
        for role, cat, span in words:
            idx = align_spans(s.prompt, [span], tokenizer)[0].indices
            if idx:
                out.append({"object": i, "role": role, "category": cat, "word": s.word(span), "tokens": list(idx)})
    return out


def capture(lm, split: str, samples, batch: int, log) -> dict:
    """Generate every sample under trace; keep each concept's per-layer head maps per step segment."""
    pipe = lm.pipe
    words = text_sequence(pipe)  # what the denoiser reads: the tokenizer itself for a UNet (as the audit aligns)
    base = IMAGE_SEED[split]
    rows, groups, text_groups, truths, images, daam, skipped, objects = [], {}, {}, [], [], [], 0, 0
    n_token_rows = 0
    gen_seconds = 0.0
    for b0 in range(0, len(samples), batch):
        chunk = samples[b0:b0 + batch]
        t = time.perf_counter()
        imgs, views, full = common.traced_batch(pipe, [s.prompt for s in chunk],
                                                [base + b0 + j for j in range(len(chunk))], segments=SEGMENTS)
        gen_seconds += time.perf_counter() - t
        for j, (s, im) in enumerate(zip(chunk, imgs)):
            g = b0 + j
            found = find(im, wanted_from_sample(s))
            objects += len(found)
            skipped += sum(not f.present for f in found)
            images.append(im)
            # the prompt's own words (no start / end / padding tokens), for the "share" normalisation
            n_ids = len(pipe.tokenizer(s.prompt)["input_ids"])
            text = [{n: m * v.steps_counted for n, m in common.layer_maps(v, range(1, n_ids - 1), j).items()}
                    for v in views]
            for layer in text[0]:
                grid = text[0][layer].shape[1:]
                text_groups.setdefault(f"{grid[0]}x{grid[1]}", {}).setdefault(layer, []).append(
                    np.stack([p[layer].reshape(p[layer].shape[0], -1) for p in text]))
            for c in concepts_of(s, found, words):
                # each token's attention sums per segment (layer_maps gives the mean over the segment's steps):
                # DAAM upsamples and clamps every token's map before it averages a word's tokens
                c["g_rows"] = []
                for t in c["tokens"]:
                    per_seg = [{n: m * v.steps_counted for n, m in common.layer_maps(v, [t], j).items()}
                               for v in views]
                    for layer in per_seg[0]:
                        grid = per_seg[0][layer].shape[1:]
                        key = f"{grid[0]}x{grid[1]}"
                        groups.setdefault(key, {}).setdefault(layer, []).append(
                            np.stack([p[layer].reshape(p[layer].shape[0], -1) for p in per_seg]))
                    c["g_rows"].append(n_token_rows)
                    n_token_rows += 1
                truths.append(found[c["object"]].mask)
                # the engine's all_heads map (DAAM's aggregation) on the whole trace: the fast path must equal it
                daam.append(concept_map(full, c["tokens"], "all_heads", item=j).raw)
                rows.append({**c, "gen": g, "prompt": s.prompt, "seed": base + g, "kind": s.kind})
        log(f"{split}: {min(b0 + batch, len(samples))}/{len(samples)} generations, {len(rows)} concepts, "
            f"{gen_seconds:.0f} s generating")
    head_names = full.head_index.names
    arrays = {"truth": np.stack(truths), "images": np.stack(images), "daam": np.stack(daam).astype(np.float32)}
    for key, layers in groups.items():
        names = sorted(layers, key=lambda n: full.head_index.layers.index(n))
        arrays[f"g_{key}"] = np.concatenate([np.stack(layers[n]) for n in names], axis=2).astype(np.float32)
        arrays[f"t_{key}"] = np.concatenate([np.stack(text_groups[key][n]) for n in names], axis=2).astype(np.float32)
        arrays[f"heads_{key}"] = np.concatenate(
            [np.arange(full.head_index.heads_per_layer[full.head_index.layers.index(n)])
             + int(sum(full.head_index.heads_per_layer[:full.head_index.layers.index(n)])) for n in names])
    meta = {"rows": rows, "objects": objects, "skipped_objects": skipped, "generations": len(samples),
            "generate_seconds": gen_seconds, "head_names": list(head_names), "layers": list(full.head_index.layers),
            "grids": {n: list(full.grids[n]) for n in full.head_index.layers},
            "segment_steps": [v.steps_counted for v in views], "seq_len": full.seq_len}
    # consistency: every concept's all-heads map rebuilt from the stored token maps vs the engine's concept_map
    data = {"meta": meta, **arrays}
    W = daam_weights(head_names)[None]
    diffs = [np.abs(aggregate(data, i, W, WINDOWS[FULL])[0] - data["daam"][i]).max() / max(np.abs(data["daam"][i]).max(),
                                                                                          1e-12) for i in range(len(rows))]
    meta["consistency_max_rel_diff"] = float(max(diffs)) if diffs else None
    return data


def files_for(model: str) -> dict[str, Path]:
    """The model's capture caches ("tune", "test") and results file: shapes-v1 keeps the names it always had
    (``miou_<split>.npz``, ``miou.json``); any other model's carry its name (``miou_shapes-dit_tune.npz``)."""
    slug = common.model_slug(model)
    if slug == DEFAULT_MODEL:
        return {"tune": common.CACHE / "miou_tune.npz", "test": common.CACHE / "miou_test.npz",
                "results": common.RESULTS / "miou.json"}
    return {"tune": common.CACHE / f"miou_{slug}_tune.npz", "test": common.CACHE / f"miou_{slug}_test.npz",
            "results": common.RESULTS / f"miou_{slug}.json"}


def cache_key(lm, split: str, n: int) -> str:
    h = hashlib.sha256(json.dumps(["v4", lm.fingerprint, split, n, TUNE_SEED, TEST_SEED, IMAGE_SEED, SEGMENTS,
                                   common.STEPS, common.GUIDANCE, common.SIDE]).encode())
    return h.hexdigest()[:16]


def save(data: dict, path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in data.items() if k != "meta"}
    with open(path, "wb") as f:
        np.savez(f, meta=json.dumps({**data["meta"], "key": key}), **arrays)


def load(path: Path, key: str | None) -> dict | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if key is not None and meta.get("key") != key:
            return None
        return {"meta": meta, **{k: z[k] for k in z.files if k != "meta"}}


# --- stage 2: maps from stored head maps ------------------------------------------------------------------------


def groups_of(data: dict) -> list[str]:
    return sorted(k[2:] for k in data if k.startswith("g_"))


def latent_of(data: dict) -> tuple[int, int]:
    """The latent grid: the largest layer grid."""
    return tuple(max((tuple(g) for g in data["meta"]["grids"].values()), key=lambda hw: hw[0] * hw[1]))


def aggregate(data: dict, i: int, W: np.ndarray, window: tuple[int, int], norm: str = "raw") -> np.ndarray:
    """[V, 64, 64] maps of concept ``i`` for V weight vectors over all heads, aggregated as the engine does
    (``auditor.engine.maps.pooled_map``, DAAM's way): each head's map of each token over the window's steps
    upsampled bicubically to the latent grid and clamped at 0, the weighted mean over heads, the mean over the
    word's tokens, bicubic to 64x64. ``norm="head"`` min-max normalises every head's map first; ``norm="share"``
    divides it by the attention the prompt's own words get at each pixel."""
    a, b = window
    steps = data["meta"].get("segment_steps")
    latent = latent_of(data)
    row = data["meta"]["rows"][i]
    tot = W.sum(1)[:, None]
    out = np.zeros((len(W), latent[0] * latent[1]), np.float32)
    for t_row in row["g_rows"]:
        for key in groups_of(data):
            w = W[:, data[f"heads_{key}"]]
            if not w.any():
                continue
            G = data[f"g_{key}"][t_row, a:b].sum(0)  # [heads in this grid, h*w]
            if steps is not None:
                G = G / float(sum(steps[a:b]))
            if norm == "head":
                lo, hi = G.min(1, keepdims=True), G.max(1, keepdims=True)
                G = (G - lo) / np.maximum(hi - lo, 1e-12)
            elif norm == "share":  # the word's share of the attention the prompt's own words get, per head and pixel
                text = data[f"t_{key}"][row["gen"], a:b].sum(0)
                if steps is not None:
                    text = text / float(sum(steps[a:b]))
                G = G / np.maximum(text, 1e-12)
            h, ww = (int(x) for x in key.split("x"))
            x = torch.from_numpy(G.astype(np.float32)).reshape(len(G), 1, h, ww)
            up = F.interpolate(x, size=latent, mode="bicubic", align_corners=False).clamp_(min=0)
            out += (w @ up.reshape(len(G), -1).numpy()).astype(np.float32)
    out = out / np.where(tot > 0, tot, 1.0) / len(row["g_rows"])
    m = torch.from_numpy(out).reshape(len(W), 1, *latent)
    return F.interpolate(m, size=(common.SIDE, common.SIDE), mode="bicubic", align_corners=False)[:, 0].numpy()


def score(data: dict, weights_for, window: str = FULL, norm: str = "raw") -> np.ndarray:
    """IoU [concepts, V]: ``weights_for(category)`` -> [V, H] weights (a row of NaN = not defined)."""
    rows = data["meta"]["rows"]
    cache: dict[str, np.ndarray] = {}
    out = None
    for i, r in enumerate(rows):
        W = cache.get(r["category"])
        if W is None:
            W = cache[r["category"]] = weights_for(r["category"])
        if out is None:
            out = np.full((len(rows), len(W)), np.nan)
        ok = ~np.isnan(W).any(1)
        if not ok.any():
            continue
        maps = aggregate(data, i, np.where(ok[:, None], W, 0.0).astype(np.float32), WINDOWS[window], norm)
        truth = data["truth"][i]
        for v in np.flatnonzero(ok):
            out[i, v] = iou(binarize(maps[v]), truth)
    return out


def subset_weights(rm, category: str, method: str, k: int | None, allowed: np.ndarray) -> np.ndarray:
    """Weights of ``method`` restricted to ``allowed`` heads (top/bottom k ranked among them only)."""
    H = len(allowed)
    nan = np.full(H, np.nan)
    if method == "all_heads":
        return (allowed & (daam_weights(rm.head_names) > 0)).astype(np.float32)
    c = rm.categories.index(category) if category in rm.categories else None
    if c is None or rm.votes[c].sum() == 0:
        return nan
    row = rm.matrix[c].astype(np.float64)
    if method == "weighted":
        w = np.where(allowed, row, 0.0)
        return w.astype(np.float32) if w.sum() > 0 else nan
    n = int(allowed.sum())
    if k is None or k > n:
        return nan
    idx = np.arange(H)
    key = -row if method == "selective" else row
    order = [h for h in np.lexsort((idx, key)) if allowed[h]]  # ties keep head order, as RelevanceMatrix does
    w = np.zeros(H, np.float32)
    w[order[:k]] = 1.0
    return w


def method_set(rm, allowed: np.ndarray):
    """Variants [(label, method, k)] and their weights_for(category)."""
    variants = [("all_heads", "all_heads", None), ("weighted", "weighted", None)]
    variants += [(f"selective@{k}", "selective", k) for k in KS]
    variants += [(f"bottom_k@{k}", "bottom_k", k) for k in KS]

    def weights_for(cat):
        return np.stack([subset_weights(rm, cat, m, k, allowed) for _, m, k in variants])

    return variants, weights_for


def check_weights(rm, n_heads: int) -> None:
    """subset_weights over all heads must equal the engine's own head_weights."""
    allowed = np.ones(n_heads, bool)
    for cat in rm.categories:
        if rm.votes[rm.categories.index(cat)].sum() == 0:
            continue
        for m, k in (("selective", 8), ("bottom_k", 8), ("weighted", None), ("all_heads", None)):
            ours = subset_weights(rm, cat, m, k, allowed)
            theirs = head_weights(m, n_heads, rm, cat, k, rm.head_names)
            assert np.allclose(ours, theirs), (cat, m, k)


# --- summaries ---------------------------------------------------------------------------------------------------


def col(labels: list[str], label: str) -> int:
    return labels.index(label)


def mean_of(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def best(labels: list[str], ious: np.ndarray, prefix: str) -> str:
    """The label starting with ``prefix`` with the highest pooled mean IoU (ties: the first, i.e. smallest k)."""
    cands = [(mean_of(ious[:, j]), -j, lab) for j, lab in enumerate(labels) if lab.startswith(prefix)]
    cands = [c for c in cands if not np.isnan(c[0])]
    return max(cands)[2]


def curves(by_window: dict, labels: list[str]) -> dict:
    """{window: {label: pooled mean IoU}}, leaving out what was not scored for that window."""
    out = {}
    for w, ious in by_window.items():
        out[w] = {lab: mean_of(ious[:, j]) for j, lab in enumerate(labels) if not np.isnan(ious[:, j]).all()}
    return out


def ci(x: np.ndarray, gens: np.ndarray) -> dict:
    return bootstrap_mean(x, gens)


def rnd(d):
    if isinstance(d, dict):
        return {k: rnd(v) for k, v in d.items()}
    if isinstance(d, list):
        return [rnd(v) for v in d]
    if isinstance(d, float):
        return round(d, 4)
    return d


def random_weights(H: int) -> np.ndarray:
    """[len(KS) * RANDOM_DRAWS, H] the random-k control's head sets: RANDOM_DRAWS fixed-seed draws of k heads for
    each k of KS, in that order. A k above H (a transformer with fewer heads) draws nothing and gets a row of NaN
    (not scored); the draws of the other k are those a model with at least max(KS) heads gets."""
    rng = np.random.default_rng(0)
    W = np.zeros((len(KS) * RANDOM_DRAWS, H), np.float32)
    for j, k in enumerate(k for k in KS for _ in range(RANDOM_DRAWS)):
        if k > H:
            W[j] = np.nan
        else:
            W[j, rng.choice(H, size=k, replace=False)] = 1.0
    return W


def analyse(tune: dict, test: dict, rm, log) -> dict:
    H = len(tune["meta"]["head_names"])
    check_weights(rm, H)
    allowed_all = np.ones(H, bool)
    variants, wf = method_set(rm, allowed_all)
    labels = [v[0] for v in variants]
    t0 = time.perf_counter()
    res: dict = {}
    split = {"tune": tune, "test": test}
    gens = {s: np.array([r["gen"] for r in d["meta"]["rows"]]) for s, d in split.items()}
    cats = {s: np.array([r["category"] for r in d["meta"]["rows"]]) for s, d in split.items()}

    # A: every method, every window, all heads
    A = {s: {w: score(d, wf, w) for w in WINDOWS} for s, d in split.items()}
    log(f"scored windows in {time.perf_counter() - t0:.0f} s")
    # control: k heads drawn at random (RANDOM_DRAWS fixed-seed draws per k, the same for every category; a
    # concept's IoU is the mean over the draws), all steps only. Does relevance beat chance selection?
    W_rand = random_weights(H)
    for s_, d in split.items():
        R = score(d, lambda c: W_rand).reshape(-1, len(KS), RANDOM_DRAWS).mean(2)
        for w in WINDOWS:
            A[s_][w] = np.hstack([A[s_][w], R if w == FULL else np.full_like(R, np.nan)])
    labels = labels + [f"random_k@{k}" for k in KS]
    log(f"scored random heads at {time.perf_counter() - t0:.0f} s")

    # choices on the tuning split
    k_label = best(labels, A["tune"][FULL], "selective@")
    k_sel = int(k_label.split("@")[1])
    bottom_label = f"bottom_k@{k_sel}"
    chosen_window = {}
    for m, lab in (("all_heads", "all_heads"), ("weighted", "weighted"), ("bottom_k", bottom_label)):
        chosen_window[m] = max(WINDOWS, key=lambda w: mean_of(A["tune"][w][:, col(labels, lab)]))
    sel_joint = max(((w, lab) for w in WINDOWS for lab in labels if lab.startswith("selective@")),
                    key=lambda wl: mean_of(A["tune"][wl[0]][:, col(labels, wl[1])]))
    chosen_window["selective"] = sel_joint[0]
    k_sel_window = int(sel_joint[1].split("@")[1])
    per_cat_k = {}
    for c in sorted(set(cats["tune"])):
        sub = A["tune"][FULL][cats["tune"] == c]
        try:
            per_cat_k[c] = int(best(labels, sub, "selective@").split("@")[1])
        except ValueError:  # no votes for this category: no selective map
            per_cat_k[c] = None
    res["tuning"] = {
        "k": k_sel, "window": chosen_window, "k_at_selective_window": k_sel_window, "per_category_k": per_cat_k,
        "curves": curves(A["tune"], labels),
    }
    main_labels = {"all_heads": "all_heads", "selective": f"selective@{k_sel}", "weighted": "weighted",
                   "bottom_k": bottom_label, "random_k": f"random_k@{k_sel}"}

    def table(ious: np.ndarray, g: np.ndarray, pick=main_labels) -> dict:
        out = {m: ci(ious[:, col(labels, lab)], g) for m, lab in pick.items()}
        base = ious[:, col(labels, "all_heads")]
        out["diff_vs_all_heads"] = {m: paired_difference(ious[:, col(labels, lab)], base, g)
                                    for m, lab in pick.items() if m != "all_heads"}
        out["diff_selective_vs_bottom_k"] = paired_difference(ious[:, col(labels, pick["selective"])],
                                                              ious[:, col(labels, pick["bottom_k"])], g)
        if ious.shape[1] == len(labels) and "random_k" in pick:
            out["diff_selective_vs_random_k"] = paired_difference(ious[:, col(labels, pick["selective"])],
                                                                  ious[:, col(labels, pick["random_k"])], g)
        return out

    T = A["test"][FULL]
    res["test"] = {"main": table(T, gens["test"]),
                   "tune_same_protocol": table(A["tune"][FULL], gens["tune"]),
                   "curves": curves(A["test"], labels),
                   "per_category": {}}
    for c in sorted(set(cats["test"])):
        m = cats["test"] == c
        res["test"]["per_category"][c] = table(T[m], gens["test"][m])
    # each method at its tuning-chosen window (selective also at the k chosen jointly with its window)
    tw = {}
    for m, lab in main_labels.items():
        if m not in chosen_window:  # random_k: all steps only
            continue
        w = chosen_window[m]
        lab = f"selective@{k_sel_window}" if m == "selective" else lab
        tw[m] = {"window": w, "label": lab, **ci(A["test"][w][:, col(labels, lab)], gens["test"])}
    tw["diff_selective_vs_all_heads"] = paired_difference(
        A["test"][chosen_window["selective"]][:, col(labels, f"selective@{k_sel_window}")],
        A["test"][chosen_window["all_heads"]][:, col(labels, "all_heads")], gens["test"])
    res["test"]["tuned_windows"] = tw
    # per-category k (chosen on tuning)
    pc = np.full(len(T), np.nan)
    for c, k in per_cat_k.items():
        if k is not None:
            m = cats["test"] == c
            pc[m] = T[m, col(labels, f"selective@{k}")]
    res["test"]["selective_per_category_k"] = {**ci(pc, gens["test"]),
                                               "diff_vs_all_heads": paired_difference(pc, T[:, 0], gens["test"])}

    # how much a word's map stands out: attention per pixel relative to a uniform spread over the text positions,
    # and inside the object vs outside it
    res["contrast"] = contrast(test, [("all_heads", lambda c: daam_weights(rm.head_names)[None]),
                                      ("selective", lambda c: wf(c)[[col(labels, main_labels["selective"])]])],
                               gens["test"])

    # B: layer resolutions
    head_grid = np.empty(H, object)
    for key in groups_of(tune):
        head_grid[tune[f"heads_{key}"]] = key
    res["per_resolution"] = {}
    for key in groups_of(tune):
        allowed = head_grid == key
        v_r, wf_r = method_set(rm, allowed)
        lab_r = [v[0] for v in v_r]
        Rt, Rs = score(tune, wf_r), score(test, wf_r)
        k_r = int(best(lab_r, Rt, "selective@").split("@")[1])
        pick = {"all_heads": "all_heads", "selective": f"selective@{k_r}", "weighted": "weighted",
                "bottom_k": f"bottom_k@{k_r}"}
        res["per_resolution"][key] = {"heads": int(allowed.sum()), "k": k_r,
                                      **{m: ci(Rs[:, col(lab_r, lab)], gens["test"]) for m, lab in pick.items()},
                                      "diff_selective_vs_all_heads": paired_difference(
                                          Rs[:, col(lab_r, pick["selective"])], Rs[:, 0], gens["test"])}
    log(f"scored resolutions at {time.perf_counter() - t0:.0f} s")

    # C: normalisations before aggregation: per-head min-max ("head"); the word's share of the attention that the
    # prompt's own words get at each pixel ("share": start, end and padding tokens left out)
    res["normalisations"] = {}
    base = labels[:len(variants)]  # the method set's own columns (random_k draws are scored separately above)
    for norm in ("head", "share"):
        Nt, Ns = score(tune, wf, norm=norm), score(test, wf, norm=norm)
        k_n = int(best(base, Nt, "selective@").split("@")[1])
        sel = Ns[:, col(base, f"selective@{k_n}")]
        res["normalisations"][norm] = {
            "k": k_n, "all_heads": ci(Ns[:, 0], gens["test"]), "selective": ci(sel, gens["test"]),
            "weighted": ci(Ns[:, col(base, "weighted")], gens["test"]),
            "bottom_k": ci(Ns[:, col(base, f"bottom_k@{k_n}")], gens["test"]),
            "diff_selective_vs_all_heads": paired_difference(sel, Ns[:, 0], gens["test"]),
            "diff_selective_vs_raw_all_heads": paired_difference(sel, T[:, 0], gens["test"]),
            "diff_all_heads_vs_raw_all_heads": paired_difference(Ns[:, 0], T[:, 0], gens["test"]),
            "curve_tune": {lab: mean_of(Nt[:, j]) for j, lab in enumerate(base)},
            "curve_test": {lab: mean_of(Ns[:, j]) for j, lab in enumerate(base)}}
    log(f"scored normalisations at {time.perf_counter() - t0:.0f} s")

    # D: single heads; does relevance predict them? and an oracle ranking learned on tuning
    eye = np.eye(H, dtype=np.float32)
    Pt, Ps = score(tune, lambda c: eye), score(test, lambda c: eye)
    from scipy.stats import spearmanr

    per_head = {}
    oracle_rank = {}
    for c in sorted(set(cats["tune"])):
        mt = cats["tune"] == c
        head_iou = np.nanmean(Pt[mt], 0)
        ci_ = rm.categories.index(c) if c in rm.categories else None
        rel = rm.matrix[ci_] if ci_ is not None else np.zeros(H)
        rho = spearmanr(rel, head_iou).statistic if rel.std() > 0 else float("nan")
        top8 = np.argsort(-head_iou)[:8]
        per_head[c] = {"concepts": int(mt.sum()), "spearman_relevance_vs_head_iou": float(rho),
                       "head_iou": [float(x) for x in head_iou], "relevance": [float(x) for x in rel],
                       "best_heads": [tune["meta"]["head_names"][h] for h in top8],
                       "best_head_iou": float(head_iou.max()), "all_heads_iou": mean_of(A["tune"][FULL][mt, 0])}
        oracle_rank[c] = np.lexsort((np.arange(H), -head_iou))
    res["per_head"] = per_head
    res["per_layer_all_heads"] = {}
    layers = tune["meta"]["layers"]
    for li, name in enumerate(layers):
        w = np.array([layer_of(n) == name for n in tune["meta"]["head_names"]], np.float32)[None]
        res["per_layer_all_heads"][name] = {"grid": tune["meta"]["grids"][name],
                                            **ci(score(test, lambda c: w)[:, 0], gens["test"])}

    def oracle_wf(cat):
        order = oracle_rank.get(cat)
        W = np.zeros((len(KS), H), np.float32)
        if order is None:
            return np.full((len(KS), H), np.nan)
        for j, k in enumerate(KS):
            if k > H:  # fewer heads than k (a transformer): not scored
                W[j] = np.nan
            else:
                W[j, order[:k]] = 1.0
        return W

    Ot, Os = score(tune, oracle_wf), score(test, oracle_wf)
    j_o = int(np.nanargmax([mean_of(Ot[:, j]) if k <= H else np.nan for j, k in enumerate(KS)]))
    res["oracle_ranking"] = {"k": KS[j_o], "test": ci(Os[:, j_o], gens["test"]),
                             "diff_vs_all_heads": paired_difference(Os[:, j_o], T[:, 0], gens["test"]),
                             "curve_test": {str(k): mean_of(Os[:, j]) for j, k in enumerate(KS)},
                             "curve_tune": {str(k): mean_of(Ot[:, j]) for j, k in enumerate(KS)}}
    res["analysis_seconds"] = time.perf_counter() - t0
    return res


def profile_section(test: dict, profile, gens: np.ndarray) -> dict:
    """The shipped profile's ranking at its own k per category (what an audit's selective map is), its bottom k
    at the same k, against the DAAM baseline (all_heads) on the test split."""
    ranking = profile.maps_source
    H = len(profile.head_names)
    daam = daam_weights(profile.head_names)

    def weights_for(cat):
        W = np.zeros((3, H), np.float32)
        k = profile.k_for(cat)
        W[0, ranking.top_heads(cat, k)] = 1.0
        W[1, ranking.bottom_heads(cat, k)] = 1.0
        W[2] = daam
        return W

    ious = score(test, weights_for)
    cats = np.array([r["category"] for r in test["meta"]["rows"]])
    out = {"ranking_sha256": profile.maps_source.sha256, "ranking": profile.maps_ranking, "k": profile.k_per_category(),
           "selective": ci(ious[:, 0], gens), "bottom_k": ci(ious[:, 1], gens), "all_heads": ci(ious[:, 2], gens),
           "selective_minus_all_heads": paired_difference(ious[:, 0], ious[:, 2], gens),
           "selective_minus_bottom_k": paired_difference(ious[:, 0], ious[:, 1], gens), "per_category": {}}
    for c in sorted(set(cats)):
        m = cats == c
        out["per_category"][c] = {"concepts": int(m.sum()), "k": profile.k_for(c),
                                  "selective": ci(ious[m, 0], gens[m]), "all_heads": ci(ious[m, 2], gens[m]),
                                  "bottom_k": ci(ious[m, 1], gens[m]),
                                  "selective_minus_all_heads": paired_difference(ious[m, 0], ious[m, 2], gens[m])}
    return out


def contrast(data: dict, methods, gens: np.ndarray) -> dict:
    """Per method: the map's mean attention per token position relative to uniform (1 = 1/T of each pixel's
    attention), and the ratio of its mean inside the object's mask to outside it (> 1: the word is attended more
    on its object), with the share of concepts where that ratio exceeds 1."""
    T = int(data["meta"].get("seq_len") or 77)
    out = {}
    for name, wfun in methods:
        level, ratio = [], []
        for i, r in enumerate(data["meta"]["rows"]):
            W = wfun(r["category"])
            if np.isnan(W).any():
                level.append(np.nan)
                ratio.append(np.nan)
                continue
            m = aggregate(data, i, W.astype(np.float32), WINDOWS[FULL])[0]
            t = data["truth"][i]
            level.append(float(m.mean() * T))
            ratio.append(float(m[t].mean() / max(m[~t].mean(), 1e-12)))
        ratio = np.array(ratio)
        ok = ~np.isnan(ratio)
        out[name] = {"level_vs_uniform": bootstrap_mean(level, gens), "inside_over_outside": bootstrap_mean(ratio, gens),
                     "share_inside_higher": float((ratio[ok] > 1).mean()) if ok.any() else float("nan")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-tune", type=int, default=100, help="tuning-split generations")
    ap.add_argument("--n-test", type=int, default=200, help="test-split generations")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="a bundled model (shapes-v1, shapes-dit) or a diffusers folder with its relevance.npz and "
                         "profile beside it or cached")
    ap.add_argument("--relevance", default=None, help="head-relevance matrix (default: the one beside the model)")
    ap.add_argument("--analyse-only", action="store_true", help="use the cached captures; fail if missing")
    ap.add_argument("--fresh", action="store_true", help="generate again even when cached captures match")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results file (default: bench/results/miou.json for shapes-v1, "
                                                "miou_<model>.json for another)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = common.Log("miou")
    mach = common.machine()
    files = files_for(args.model)
    args.out = args.out or str(files["results"])
    rel_path = Path(args.relevance) if args.relevance else common.default_relevance_path(args.model)
    if not rel_path.is_file():
        sys.exit(f"{rel_path}: no head-relevance matrix; calibrate the model first (bundled: `python -m "
                 f"auditor.zoo.profiles relevance {args.model}`, then `ranking`) or pass --relevance")
    rm = common.load_relevance(rel_path)
    lm = common.load_model(args.model)
    data = {}
    tune_samples = draw_samples(args.n_tune, TUNE_SEED)
    test_samples = draw_samples(args.n_test, TEST_SEED, exclude={s.prompt for s in tune_samples})
    for split, samples in (("tune", tune_samples), ("test", test_samples)):
        path = files[split]
        key = cache_key(lm, split, len(samples))
        data[split] = None if args.fresh else load(path, key)
        if data[split] is None:
            if args.analyse_only:
                sys.exit(f"{path}: no cached capture for these settings; run without --analyse-only")
            data[split] = capture(lm, split, samples, args.batch, log)
            save(data[split], path, key)
        else:
            log(f"{split}: reusing {path.relative_to(common.ROOT)}")
    res = analyse(data["tune"], data["test"], rm, log)
    from auditor.profile import profile_for

    profile = profile_for(lm)
    res["profile"] = profile_section(data["test"], profile,
                                     np.array([r["gen"] for r in data["test"]["meta"]["rows"]]))
    p = res["profile"]
    log(f"profile ({profile.maps_ranking}, k {p['k']}): selective {p['selective']['mean']:.3f}, all_heads (DAAM) "
        f"{p['all_heads']['mean']:.3f}, difference {p['selective_minus_all_heads']['mean']:+.3f} "
        f"{[round(x, 3) for x in p['selective_minus_all_heads']['ci95']]}; minus bottom-k "
        f"{p['selective_minus_bottom_k']['mean']:+.3f} {[round(x, 3) for x in p['selective_minus_bottom_k']['ci95']]}")
    meta = {s: {k: d["meta"][k] for k in ("generations", "objects", "skipped_objects", "generate_seconds")}
            | {"concepts": len(d["meta"]["rows"]),
               "concepts_by_category": {c: sum(r["category"] == c for r in d["meta"]["rows"])
                                        for c in sorted({r["category"] for r in d["meta"]["rows"]})},
               "consistency_max_rel_diff": d["meta"].get("consistency_max_rel_diff")}
            for s, d in data.items()}
    gen_s = sum(m["generate_seconds"] for m in meta.values())
    n_gen = sum(m["generations"] for m in meta.values())
    out = {"benchmark": "miou", "command": common.command(), "machine": mach, "commit": common.git_commit(),
           "model": {"name": args.model, "fingerprint": lm.fingerprint} | (
               {} if args.model == DEFAULT_MODEL else {"pipeline": type(lm.pipe).__name__,
                                                       "heads": len(data["tune"]["meta"]["head_names"])}),
           "relevance": common.relevance_record(rm, rel_path),
           "settings": {"steps": common.STEPS, "guidance": common.GUIDANCE, "size": common.SIDE, "ks": list(KS),
                        "windows": {w: [a / SEGMENTS, b / SEGMENTS] for w, (a, b) in WINDOWS.items()},
                        "seeds": {"tune_prompts": TUNE_SEED, "test_prompts": TEST_SEED, "images": IMAGE_SEED,
                                  "bootstrap": 0}, "mask": "otsu (auditor.engine.maps.binarize)"},
           "splits": meta, "traced_seconds_per_image": gen_s / max(n_gen, 1), **res,
           "wall_seconds": log.elapsed()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rnd(out), indent=1))
    m = out["test"]["main"]
    log("test mIoU: " + ", ".join(f"{k} {m[k]['mean']:.3f} [{m[k]['ci95'][0]:.3f}, {m[k]['ci95'][1]:.3f}]"
                                  for k in METHODS) + f" (k={res['tuning']['k']})")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
