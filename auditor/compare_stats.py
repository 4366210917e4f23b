"""The paired statistics of a regression comparison, and the policy that turns them into verdicts.

Every (prompt, seed, concept) observed in both runs is a pair: flagged or not in run A, flagged or not in run B.
A flag-rate change is tested with McNemar's exact test on the discordant pairs; rate and score changes get a
paired bootstrap interval. ``Policy`` alone decides what counts as a regression (``auditor.compare`` pools the
pairs per concept, category and tag and asks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from auditor.summary import Pair

BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Policy:
    """A flag-rate increase is a regression when it is large (at least ``min_rate_increase``, e.g. a concept clean in
    every seed of A and flagged in half of B's) or significant (McNemar exact p < ``alpha``); improvements mirror it.
    Large-but-not-significant counts because audits run few seeds: a concept that breaks in most seeds must not
    pass a gate for lack of samples. No multiple-testing correction: a gate should err towards a human look."""

    min_rate_increase: float = 0.5
    alpha: float = 0.05

    def classify(self, rate_delta: float, p: float, b: int, c: int) -> str | None:
        """The verdict on one pooled set of pairs.

        Args:
            rate_delta: flag rate in B minus flag rate in A.
            p: McNemar's exact p-value of the discordant pairs.
            b: pairs flagged only in A (fixed).
            c: pairs flagged only in B (broken).

        Returns:
            "regression", "improvement", or None for no verdict.
        """
        if c > b and (rate_delta >= self.min_rate_increase or p < self.alpha):
            return "regression"
        if b > c and (-rate_delta >= self.min_rate_increase or p < self.alpha):
            return "improvement"
        return None

    def describe(self) -> str:
        """The policy in one sentence, for reports.

        Returns:
            The sentence.
        """
        return (f"a concept or category regressed when its flag rate rose by at least {self.min_rate_increase:.0%} "
                f"(absolute) or McNemar's exact test on its paired (prompt, seed, concept) observations gives "
                f"p < {self.alpha} with more pairs broken than fixed; improvements mirror this")


POLICY = Policy()


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a binomial test of b against n = b + c, p = 1/2).

    Args:
        b, c: the two discordant counts (pairs flagged only in A, only in B).

    Returns:
        The p-value, 1.0 when there is no discordant pair.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(deltas, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired differences (seeded: the same runs give the same report).

    Args:
        deltas: the paired differences (B minus A).
        resamples: bootstrap resamples.
        seed: the resampling generator's seed.

    Returns:
        (low, high); both the one difference when there is one, NaN when there is none.
    """
    d = np.asarray(deltas, dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    if d.size == 1:
        return (float(d[0]), float(d[0]))
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def paired_stats(pairs: list[tuple[Pair, Pair]], policy: Policy) -> dict:
    """Flag-rate change, McNemar and bootstrap over matched (A, B) observations, and mean score changes.

    Args:
        pairs: the matched observations, (A's, B's).
        policy: what decides the verdict.

    Returns:
        The counts, rates, rate change with its interval, McNemar's p, the policy's verdict, and per score every
        observation has: the mean change, its interval and whether the interval excludes no change.
    """
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
