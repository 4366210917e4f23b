"""Which heads localise? Label-free head rankings against ground truth, on bench/miou.py's cached captures.

    .venv/bin/python bench/miou.py --fresh          # the captures (work_bench/miou_{tune,test}.npz)
    .venv/bin/python bench/head_ranking.py          # -> bench/results/head_ranking.json

Maps are scored with ``bench/miou.py``'s fast path (the engine's aggregation over the chosen heads); the DAAM
baseline is the engine's own ``all_heads`` map stored by the capture. Head scores are computed per category on the
TUNING split without its masks (what a calibration could compute for any model) from each head's own map (the
same aggregation, one head at a time); k is chosen on TUNING, and everything is reported on TEST with
cluster-bootstrap intervals over generations:

- ``hrv``: the shipped head-relevance matrix (HRV category votes);
- ``concentration``: the share of a head's map mass in its top 10% of pixels (peaked maps);
- ``consensus``: IoU of the head's Otsu mask with the DAAM map's Otsu mask of the same word;
- ``contrast``: 1 - Pearson correlation between the head's maps of two different nouns of one image (a head that
  gives every word the same map cannot tell where anything is);
- ``oracle``: each head's own IoU against the oracle masks of the tuning split (uses ground truth: the bound).

The ranking the shipped profile holds (calibrated without ground truth) is scored in ``bench/miou.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from miou import KS, load, score  # noqa: E402
from stats import bootstrap_mean, iou, paired_difference  # noqa: E402

from auditor.engine.maps import binarize  # noqa: E402

LATENT = (16, 16)


def head_stack(data: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """([concepts, H, 16*16] every head's map of every concept at the latent grid, as the engine builds it: each
    token's step mean upsampled bicubically and clamped, the mean over the word's tokens; [H] whether DAAM hooks the
    head; head names)."""
    meta = data["meta"]
    names = meta["head_names"]
    steps = float(sum(meta["segment_steps"]))
    rows = meta["rows"]
    T = sum(len(r["g_rows"]) for r in rows)
    per_token = np.zeros((T, len(names), LATENT[0] * LATENT[1]), np.float32)
    for key in sorted(k[2:] for k in data if k.startswith("g_")):
        h, w = (int(x) for x in key.split("x"))
        G = data[f"g_{key}"].sum(1) / steps  # [token rows, heads, h*w]
        heads = data[f"heads_{key}"]
        x = torch.from_numpy(G.reshape(T * len(heads), 1, h, w).astype(np.float32))
        up = F.interpolate(x, size=LATENT, mode="bicubic", align_corners=False).clamp_(min=0)
        per_token[:, heads] = up.reshape(T, len(heads), -1).numpy()
    out = np.stack([per_token[r["g_rows"]].mean(0) for r in rows])
    daam_heads = np.array([not n.startswith("mid_block") for n in names])
    return out, daam_heads, names


def to_image(m: np.ndarray) -> np.ndarray:
    """[V, 16*16] -> [V, 64, 64], bicubic (DAAM's expand_as)."""
    x = torch.from_numpy(m.reshape(-1, 1, *LATENT).astype(np.float32))
    return F.interpolate(x, size=(common.SIDE, common.SIDE), mode="bicubic", align_corners=False)[:, 0].numpy()


# --- label-free head scores (per concept, per head), averaged per category over the tuning split -------------


def concentration(U: np.ndarray) -> np.ndarray:
    """[C, H] share of a head's mass in its top 10% pixels."""
    s = np.sort(U, axis=2)[:, :, ::-1]
    top = max(1, int(0.1 * U.shape[2]))
    return s[:, :, :top].sum(2) / np.maximum(s.sum(2), 1e-12)


def consensus(U: np.ndarray, daam: np.ndarray) -> np.ndarray:
    """[C, H] IoU of each head's Otsu mask with the DAAM map's Otsu mask."""
    C, H, _ = U.shape
    out = np.zeros((C, H), np.float32)
    for i in range(C):
        ref = binarize(daam[i])
        hm = to_image(U[i])
        out[i] = [iou(binarize(hm[h]), ref) if hm[h].max() > hm[h].min() else 0.0 for h in range(H)]
    return np.nan_to_num(out)


def contrast(U: np.ndarray, rows) -> np.ndarray:
    """[C, H] 1 - Pearson(head's map of this noun, head's map of another noun of the same image); NaN when the
    concept is not a noun or its image has one noun."""
    out = np.full(U.shape[:2], np.nan, np.float32)
    nouns: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r["role"] == "noun":
            nouns.setdefault(r["gen"], []).append(i)
    for idx in nouns.values():
        for a in idx:
            others = [b for b in idx if b != a]
            if not others:
                continue
            x = U[a] - U[a].mean(1, keepdims=True)
            vals = []
            for b in others:
                y = U[b] - U[b].mean(1, keepdims=True)
                r_ = (x * y).sum(1) / np.maximum(np.sqrt((x * x).sum(1) * (y * y).sum(1)), 1e-12)
                vals.append(1 - r_)
            out[a] = np.mean(vals, 0)
    return out


def per_category(scores: np.ndarray, rows, fallback: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{category: [H] mean score over its tuning concepts}; categories with no defined score use ``fallback``
    (the mean over all concepts) so that every category has a ranking."""
    cats = sorted({r["category"] for r in rows})
    overall = np.nanmean(scores, 0)
    out = {}
    for c in cats:
        m = np.array([r["category"] == c for r in rows])
        sub = scores[m]
        ok = ~np.isnan(sub).all(1)
        out[c] = np.nanmean(sub[ok], 0) if ok.any() else (overall if fallback is None else fallback)
    return out


def ranking_weights(rank_scores: dict[str, np.ndarray], allowed: np.ndarray):
    """weights_for(category) -> [len(KS), H]: the top-k heads among ``allowed`` (ties: lower index first)."""
    H = len(allowed)

    def wf(cat):
        s = rank_scores.get(cat)
        if s is None:
            return np.full((len(KS), H), np.nan)
        order = [h for h in np.lexsort((np.arange(H), -np.nan_to_num(s, nan=-np.inf))) if allowed[h]]
        W = np.zeros((len(KS), H), np.float32)
        for j, k in enumerate(KS):
            W[j, order[:k]] = 1.0
        return W

    return wf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.RESULTS / "head_ranking.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = common.Log("heads")
    tune, test = (load(common.CACHE / f"miou_{s}.npz", None) for s in ("tune", "test"))
    if tune is None or test is None or "daam" not in test:
        sys.exit("no cached captures with DAAM maps: run bench/miou.py --fresh first")
    Ut, daam_heads, names = head_stack(tune)
    Us, _, _ = head_stack(test)
    rows_t, rows_s = tune["meta"]["rows"], test["meta"]["rows"]
    H = len(names)
    gens_s = np.array([r["gen"] for r in rows_s])
    cats_s = np.array([r["category"] for r in rows_s])
    log(f"{len(rows_t)} tuning, {len(rows_s)} test concepts, {H} heads")

    # the baseline, and a check that the head stack reproduces it
    base = np.array([iou(binarize(test["daam"][i]), test["truth"][i]) for i in range(len(rows_s))])
    mine = to_image(Us[:, daam_heads].mean(1))
    single = np.array([len(r["tokens"]) == 1 for r in rows_s])
    rel = np.abs(mine - test["daam"]).max((1, 2)) / np.abs(test["daam"]).max((1, 2))
    log(f"head stack vs engine DAAM map: max rel diff {rel[single].max():.1e} (single-token words), "
        f"{rel[~single].max() if (~single).any() else 0:.1e} (multi-token words)")

    rm = common.load_relevance(common.default_relevance_path())
    hrv = {c: rm.matrix[rm.categories.index(c)].astype(np.float64) for c in rm.categories}
    scores_t = {
        "hrv": hrv,
        "concentration": per_category(concentration(Ut), rows_t),
        "consensus": per_category(consensus(Ut, tune["daam"]), rows_t),
        "contrast": per_category(contrast(Ut, rows_t), rows_t),
        "oracle": per_category(np.nan_to_num(score(tune, lambda c: np.eye(H, dtype=np.float32))), rows_t),
    }
    cons_c = {c: scores_t["consensus"][c] * scores_t["contrast"][c] for c in scores_t["consensus"]}
    scores_t["consensus_x_contrast"] = cons_c
    log("scored heads on the tuning split")

    res = {"baseline_daam": bootstrap_mean(base, gens_s), "rankings": {}}
    for pool_name, allowed in (("all heads", np.ones(H, bool)), ("daam layers", daam_heads)):
        for name, sc in scores_t.items():
            wf = ranking_weights(sc, allowed)
            It, Is = score(tune, wf), score(test, wf)
            # k per category, chosen on tuning (with its masks) -- and one global k
            j_glob = int(np.nanargmax(np.nanmean(It, 0)))
            pc = np.full(len(rows_s), np.nan)
            kc = {}
            for c in sorted(set(cats_s)):
                mt = np.array([r["category"] == c for r in rows_t])
                j = int(np.nanargmax(np.nanmean(It[mt], 0))) if mt.any() else j_glob
                kc[c] = KS[j]
                pc[cats_s == c] = Is[cats_s == c, j]
            bottom_wf = ranking_weights({c: -s for c, s in sc.items()}, allowed)
            Bs = score(test, bottom_wf)
            bpc = np.full(len(rows_s), np.nan)
            for c in sorted(set(cats_s)):
                bpc[cats_s == c] = Bs[cats_s == c, KS.index(kc[c])]
            entry = {"k_global": KS[j_glob], "global_k": bootstrap_mean(Is[:, j_glob], gens_s),
                     "global_k_minus_daam": paired_difference(Is[:, j_glob], base, gens_s),
                     "k_per_category": kc, "per_category_k": bootstrap_mean(pc, gens_s),
                     "per_category_k_minus_daam": paired_difference(pc, base, gens_s),
                     "bottom_per_category_k": bootstrap_mean(bpc, gens_s),
                     "top_minus_bottom": paired_difference(pc, bpc, gens_s),
                     "curve_test": {str(k): float(np.nanmean(Is[:, j])) for j, k in enumerate(KS)}}
            res["rankings"][f"{name} ({pool_name})"] = entry
            log(f"{name:22s} {pool_name:11s} k={KS[j_glob]:2d} {entry['global_k']['mean']:.3f} | per-cat "
                f"{entry['per_category_k']['mean']:.3f} diff {entry['per_category_k_minus_daam']['mean']:+.3f} "
                f"{[round(x, 3) for x in entry['per_category_k_minus_daam']['ci95']]} top-bottom "
                f"{entry['top_minus_bottom']['mean']:+.3f} k={kc}")
    log(f"DAAM baseline {res['baseline_daam']['mean']:.3f} {res['baseline_daam']['ci95']}")
    out = {"benchmark": "head_ranking", "command": common.command(), "machine": common.machine(),
           "commit": common.git_commit(), **res, "wall_seconds": log.elapsed()}
    Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
