"""Statistics shared by the benchmarks: IoU, cluster-bootstrap confidence intervals, rates, rank AUC.

Concepts of one generation share an image, a seed and a prompt, so they are not independent: every interval here
resamples whole *clusters* (generations, or prompt pairs) when ``groups`` is given. All resampling uses a seeded
``numpy.random.default_rng`` so a rerun gives the same interval.

    from bench.stats import iou, bootstrap_mean, bootstrap_median, paired_difference, rate, auc
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from auditor.summary import wilson

N_BOOT = 2000
SEED = 0


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks; NaN when both are empty (nothing to score)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    union = int((pred | truth).sum())
    if union == 0:
        return float("nan")
    return int((pred & truth).sum()) / union


def _clusters(values: np.ndarray, groups: Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) per cluster; every value its own cluster when ``groups`` is None."""
    if groups is None:
        return values.copy(), np.ones_like(values)
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(inv, weights=values)
    counts = np.bincount(inv).astype(float)
    return sums, counts


def bootstrap_mean(values: Sequence[float], groups: Sequence | None = None, n_boot: int = N_BOOT,
                   seed: int = SEED, level: float = 0.95) -> dict:
    """Mean of ``values`` (NaNs dropped) with a percentile bootstrap interval, resampling clusters of ``groups``.

    Returns {"mean", "ci95": [lo, hi], "n", "clusters"}; an empty input gives NaNs."""
    v = np.asarray(values, dtype=float)
    keep = ~np.isnan(v)
    g = None if groups is None else np.asarray(groups)[keep]
    v = v[keep]
    if v.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0, "clusters": 0}
    sums, counts = _clusters(v, g)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return {"mean": float(v.mean()), "ci95": [float(lo), float(hi)], "n": int(v.size), "clusters": int(len(sums))}


def bootstrap_median(values: Sequence[float], n_boot: int = N_BOOT, seed: int = SEED, level: float = 0.95) -> dict:
    """Median of ``values`` with a percentile bootstrap interval (each value resampled on its own).

    Returns {"median", "ci95": [lo, hi], "n"}."""
    v = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    a = (1 - level) / 2
    lo, hi = np.quantile(np.median(v[idx], axis=1), [a, 1 - a])
    return {"median": float(np.median(v)), "ci95": [float(lo), float(hi)], "n": int(v.size)}


def paired_difference(a: Sequence[float], b: Sequence[float], groups: Sequence | None = None, **kw) -> dict:
    """Mean of a - b over pairs where both are defined, with a cluster-bootstrap interval, and the share of pairs
    where a beats b (ties count half)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    out = bootstrap_mean(d, None if groups is None else np.asarray(groups)[keep], **kw)
    out["a_wins"] = float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size) if d.size else float("nan")
    return out


def rate(hits: Sequence[bool]) -> dict:
    """Share of True with its Wilson 95% interval."""
    h = np.asarray(hits, bool)
    k, n = int(h.sum()), int(h.size)
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci95": [lo, hi]}


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Probability that a random ``pos`` score exceeds a random ``neg`` one (ties count half): the Mann-Whitney
    form of the ROC AUC. 0.5 means the score does not separate the two groups at all."""
    p, n = np.asarray(pos, float), np.asarray(neg, float)
    if p.size == 0 or n.size == 0:
        return float("nan")
    greater = (p[:, None] > n[None, :]).sum()
    ties = (p[:, None] == n[None, :]).sum()
    return float((greater + 0.5 * ties) / (p.size * n.size))


def bootstrap_auc(pos: Sequence[float], neg: Sequence[float], n_boot: int = N_BOOT, seed: int = SEED,
                  level: float = 0.95) -> dict:
    """AUC with a percentile bootstrap interval (each group resampled on its own)."""
    p, n = np.asarray(pos, float), np.asarray(neg, float)
    rng = np.random.default_rng(seed)
    boot = [auc(p[rng.integers(0, p.size, p.size)], n[rng.integers(0, n.size, n.size)]) for _ in range(n_boot)]
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a]) if p.size and n.size else (float("nan"), float("nan"))
    return {"auc": auc(p, n), "ci95": [float(lo), float(hi)], "n_pos": int(p.size), "n_neg": int(n.size)}


def fmt_ci(d: dict, key: str = "mean", digits: int = 3) -> str:
    """'0.512 [0.480, 0.540]' for tables."""
    lo, hi = d["ci95"]
    return f"{d[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
