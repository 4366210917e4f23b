"""Head ranking by localisation: which heads put a word's map on a small part of the image, with no ground truth.

Calibration generates from ordinary prompts under ``trace``. For every word the caller names in a prompt (a
category and its token indices: objects and their attributes, things that occupy a region), each head's map of the
word on the latent grid, built as DAAM builds it (``maps.latent_head_maps``), gets a **concentration**: the share of
its mass in its top ``TOP_SHARE`` of pixels. Concentrations are averaged per category and over every word (the
pooled ranking, which categories with fewer than ``MIN_WORDS`` calibration words use).

**k per category**: the largest k (at most ``MAX_K``) for which the top-k head sets computed from the two halves of
the calibration prompts (even and odd prompts) are the same set, for every k' up to k. That is as many heads as the
calibration data supports, and no more. Calibration stops early once, for every ranked category, the top-k sets at
budget n agree with those at n/2 (Jaccard >= ``AGREEMENT``), at each category's own k.

Why concentration: on shapes-v1 the heads whose single-head maps overlap the objects best are the ones whose maps
are most peaked, while HRV's category votes rank them against localisation (bench/head_ranking.py;
docs/benchmarks.md, "Head rankings"). Its weak point is a head that always attends to one fixed spot; such a head
is peaked for every word and still localises nothing, which ``fixed_spot`` measures for the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from auditor.engine.families import call_kwargs
from auditor.engine.maps import latent_head_maps
from auditor.engine.records import check_sha256, content_sha256, read_record, write_record
from auditor.engine.relevance import checkpoints
from auditor.errors import AuditorError
from auditor.engine.trace import trace

TOP_SHARE = 0.10  # the "top" of a map whose mass share is its concentration
MIN_WORDS = 8  # calibration words a category needs for a ranking of its own
MAX_K = 16
AGREEMENT = 0.9
MIN_BUDGET = 64  # prompts before the first agreement check (16-prompt halves chose k = 1 for most of shapes-v2)
POOLED = "*"  # the pooled ranking's name in the record
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WordTarget:
    """A word of a calibration prompt: its category and its token indices in the text sequence."""

    category: str
    token_indices: tuple[int, ...]


def _order(values: np.ndarray, descending: bool = True) -> np.ndarray:
    idx = np.arange(len(values))
    return np.lexsort((idx, -values if descending else values))


def concentration(maps: torch.Tensor, top_share: float = TOP_SHARE) -> torch.Tensor:
    """[heads] the share of each map's mass in its top ``top_share`` of pixels (0 for an all-zero map)."""
    flat = maps.reshape(maps.shape[0], -1)
    n = max(1, int(round(top_share * flat.shape[1])))
    top = flat.topk(n, dim=1).values.sum(1)
    return top / flat.sum(1).clamp_min(1e-12)


def stable_k(a: np.ndarray, b: np.ndarray, max_k: int = MAX_K) -> int:
    """The largest k <= max_k whose top-k sets of scores ``a`` and ``b`` agree for every k' <= k (at least 1)."""
    oa, ob = _order(a), _order(b)
    k = 1
    for kk in range(1, min(max_k, len(a)) + 1):
        if set(oa[:kk].tolist()) != set(ob[:kk].tolist()):
            break
        k = kk
    return k


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


@dataclass
class HeadRanking:
    """Heads ranked by localisation per category, k per category, and how they were obtained.

    ``sums[c, h]`` / ``counts[c]`` is head h's mean concentration over the calibration words of category c; row
    ``POOLED`` holds every word. ``halves`` are the same sums over the even and the odd calibration prompts."""

    categories: tuple[str, ...]  # the last one is POOLED
    head_names: tuple[str, ...]
    sums: np.ndarray  # [C, H] float64
    counts: np.ndarray  # [C] int64
    halves: np.ndarray  # [2, C, H] float64
    half_counts: np.ndarray  # [2, C] int64
    budget_prompts: int
    steps: int
    agreement_curve: list[dict] = field(default_factory=list)
    converged: bool = False
    model_fingerprint: str | None = None
    prompt_source: str = ""
    seed: int = 0
    created: str = ""

    def __post_init__(self):
        self.categories, self.head_names = tuple(self.categories), tuple(self.head_names)
        self.sums = np.asarray(self.sums, np.float64)
        self.counts = np.asarray(self.counts, np.int64)
        self.halves = np.asarray(self.halves, np.float64)
        self.half_counts = np.asarray(self.half_counts, np.int64)

    # --- reading ----------------------------------------------------------------------------------------------
    kind = "localisation"

    def _row(self, category: str) -> int:
        """The row that ranks ``category``: its own with enough words, else the pooled one."""
        if category in self.categories[:-1]:
            c = self.categories.index(category)
            if self.counts[c] >= MIN_WORDS:
                return c
        return len(self.categories) - 1

    def own(self, category: str) -> bool:
        """Whether ``category`` has a ranking of its own (else it uses the pooled one)."""
        return self._row(category) != len(self.categories) - 1

    def ranks(self, category: str) -> bool:
        """Every category is ranked: those without enough calibration words by the pooled ranking."""
        return self.counts[-1] > 0

    category_limit = None  # any category: those without words of their own use the pooled ranking

    def row(self, category: str) -> np.ndarray:
        """[H] mean concentration of each head for ``category``."""
        c = self._row(category)
        return (self.sums[c] / max(self.counts[c], 1)).astype(np.float32)

    def k_for(self, category: str) -> int:
        """The calibrated k of ``category`` (split-half stability, see the module docstring)."""
        c = self._row(category)
        a, b = (self.halves[i, c] / max(self.half_counts[i, c], 1) for i in (0, 1))
        return stable_k(a, b)

    def _ranked(self, category: str, k: int | None, descending: bool) -> np.ndarray:
        if not self.ranks(category):
            raise AuditorError("the localisation ranking saw no calibration word: calibrate with other prompts")
        return _order(self.row(category).astype(np.float64), descending)[:self.k_for(category) if k is None else int(k)]

    def top_heads(self, category: str, k: int | None = None) -> np.ndarray:
        """Global indices of the k most concentrated heads of ``category`` (k: its calibrated one)."""
        return self._ranked(category, k, True)

    def bottom_heads(self, category: str, k: int | None = None) -> np.ndarray:
        return self._ranked(category, k, False)

    def k_per_category(self) -> dict[str, int]:
        return {c: self.k_for(c) for c in self.categories}

    # --- the record -------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": self.kind, "categories": list(self.categories),
                "head_names": list(self.head_names), "budget_prompts": int(self.budget_prompts),
                "steps": int(self.steps), "agreement_curve": self.agreement_curve, "converged": bool(self.converged),
                "model_fingerprint": self.model_fingerprint, "prompt_source": self.prompt_source,
                "seed": int(self.seed), "top_share": TOP_SHARE, "min_words": MIN_WORDS, "max_k": MAX_K}

    @property
    def sha256(self) -> str:
        return content_sha256(self.meta(), ((self.sums, "<f8"), (self.counts, "<i8"), (self.halves, "<f8"),
                                            (self.half_counts, "<i8")))

    def save(self, path: str | Path) -> Path:
        """Write ``<base>.npz`` (arrays) and ``<base>.json`` (the rest, with the content's sha256)."""
        npz = Path(path).with_suffix(".npz")
        arrays = {"sums": self.sums, "counts": self.counts, "halves": self.halves, "half_counts": self.half_counts}
        return write_record(npz, npz.with_suffix(".json"), arrays,
                            {**self.meta(), "sha256": self.sha256, "k": self.k_per_category()}, self.created)

    @classmethod
    def load(cls, path: str | Path) -> "HeadRanking":
        npz = Path(path).with_suffix(".npz")
        side = npz.with_suffix(".json")

        def build(meta: dict, arrays: dict) -> "HeadRanking":
            return cls(meta["categories"], meta["head_names"], budget_prompts=meta["budget_prompts"],
                       steps=meta["steps"], agreement_curve=meta.get("agreement_curve", []),
                       converged=meta.get("converged", False), model_fingerprint=meta.get("model_fingerprint"),
                       prompt_source=meta.get("prompt_source", ""), seed=meta.get("seed", 0),
                       created=meta.get("created", ""), **arrays)

        hr, meta = read_record(npz, side, ("sums", "counts", "halves", "half_counts"), build, "head ranking",
                               "head-ranking file not found (a .npz with a .json beside it)")
        C, H = len(hr.categories), len(hr.head_names)
        if hr.sums.shape != (C, H) or hr.halves.shape != (2, C, H) or hr.counts.shape != (C,):
            raise AuditorError(f"{npz}: arrays do not match its {C} categories and {H} heads")
        if not np.isfinite(hr.sums).all() or not np.isfinite(hr.halves).all():
            raise AuditorError(f"{npz}: the head ranking holds non-finite scores")
        check_sha256(meta, hr.sha256, npz, side)
        return hr

    def summary(self, top: int = 5) -> dict:
        last = self.agreement_curve[-1] if self.agreement_curve else {}
        return {"sha256": self.sha256, "kind": self.kind, "heads": len(self.head_names),
                "budget_prompts": self.budget_prompts, "steps": self.steps, "converged": self.converged,
                "agreement": {k: last.get(k) for k in ("min_jaccard", "mean_jaccard")},
                "words": {c: int(n) for c, n in zip(self.categories, self.counts)},
                "k": self.k_per_category(),
                "top_heads": {c: [self.head_names[i] for i in self.top_heads(c, top)] for c in self.categories}}


def word_scores(pipe, prompts: Sequence[str], targets: Sequence[Sequence[WordTarget]], first: int, steps: int,
                guidance_scale: float, seed: int, size: dict) -> tuple[tuple[str, ...], list]:
    """One batch of the ranking: the prompts generated in one call (prompt ``first + j`` from seed ``seed + first +
    j``), each target word's per-head concentration.

    Returns:
        (head names, [(prompt index, [(category, scores [heads] float64)])]).
    """
    gens = [torch.Generator("cpu").manual_seed(seed + first + j) for j in range(len(prompts))]
    with trace(pipe) as tr:
        pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
             output_type="latent", **size, **call_kwargs(pipe))
    scored = [(first + j, [(t.category, concentration(latent_head_maps(tr, t.token_indices, item=j)).double().cpu()
                            .numpy()) for t in words]) for j, words in enumerate(targets)]
    return tr.head_names, scored


def calibrate_localisation(pipe, prompts: Sequence[str], targets: Sequence[Sequence[WordTarget]], *,
                           steps: int = 20, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 8,
                           first: int = MIN_BUDGET, height: int | None = None, width: int | None = None,
                           fingerprint: str | None = None, prompt_source: str = "",
                           progress: Callable[[int], None] | None = None, mapper=None) -> HeadRanking:
    """Rank the heads of ``pipe`` by how concentrated their maps of the target words are.

    Args:
        pipe: a diffusers pipeline ``trace`` supports.
        prompts: calibration prompts; all of them at most (it stops early once the rankings agree).
        targets: for each prompt, the words to score (category and token indices).
        steps, guidance_scale, height, width: generation settings.
        seed: prompt ``i`` is generated from a generator seeded ``seed + i``.
        batch_size: prompts per pipeline call.
        first: the first budget whose ranking is compared with a later one (n/2 against n); with the default
            the earliest stop is at twice ``MIN_BUDGET`` prompts, so that the halves k is chosen on are not tiny.
        fingerprint, prompt_source: provenance recorded in the result.
        progress: called with the number of prompts each batch finished.
        mapper: ``mapper(fn, jobs) -> [fn(pipe, *job) for job in jobs]``, e.g. an executor's ``map`` that spreads
            the batches over Ray workers; None runs them here. Results are summed in prompt order either way.

    Returns:
        A ``HeadRanking``.

    Example:
        >>> from auditor.engine.localise import WordTarget, calibrate_localisation
        >>> hr = calibrate_localisation(pipe, ["a red circle"], [[WordTarget("shape", (3,))]])  # doctest: +SKIP
        >>> hr.top_heads("shape")  # doctest: +SKIP
    """
    if not prompts:
        raise AuditorError("calibration needs at least one prompt")
    if len(targets) != len(prompts):
        raise AuditorError(f"{len(prompts)} prompts but words for {len(targets)}")
    cats = sorted({t.category for ts in targets for t in ts})
    if not cats:
        raise AuditorError("no calibration prompt names a word to rank heads on")
    cats.append(POOLED)
    names: tuple[str, ...] | None = None
    sums = counts = halves = half_counts = None
    marks = checkpoints(len(prompts), max(2, first))  # two prompts at least: k compares two halves
    snapshots: dict[int, HeadRanking] = {}
    curve: list[dict] = []
    done, converged = 0, False
    size = {} if height is None else {"height": height, "width": width or height}

    def ranking(n_done: int) -> HeadRanking:
        return HeadRanking(cats, names, sums.copy(), counts.copy(), halves.copy(), half_counts.copy(), n_done,
                           steps, list(curve), converged, fingerprint, prompt_source, seed)

    run = mapper or (lambda fn, jobs: [fn(pipe, *job) for job in jobs])
    for mark in marks:
        # one job per batch up to the next checkpoint: the batches are the same whoever runs them
        jobs = [(list(prompts[a:min(a + batch_size, mark)]), list(targets[a:min(a + batch_size, mark)]), a, steps,
                 guidance_scale, seed, size) for a in range(done, mark, batch_size)]
        for head_names, scored in run(word_scores, jobs):
            if names is None:
                names = head_names
                H = len(names)
                sums, counts = np.zeros((len(cats), H)), np.zeros(len(cats), np.int64)
                halves, half_counts = np.zeros((2, len(cats), H)), np.zeros((2, len(cats)), np.int64)
            for i, words in scored:
                half = i % 2
                for category, score in words:
                    for c in (cats.index(category), len(cats) - 1):
                        sums[c] += score
                        counts[c] += 1
                        halves[half, c] += score
                        half_counts[half, c] += 1
            if progress is not None:
                progress(len(scored))
        done = mark
        now = snapshots[mark] = ranking(done)
        earlier = [m for m in snapshots if m <= mark / 2]
        if earlier:
            # at budget n's own k per category: do the top-k heads at n/2 already hold?
            before = snapshots[max(earlier)]
            m = before.budget_prompts
            js = [jaccard(set(before.top_heads(c, now.k_for(c)).tolist()), set(now.top_heads(c).tolist()))
                  for c in cats if now.own(c) or c == POOLED]
            curve.append({"prompts": mark, "compared_with": m, "min_jaccard": round(min(js), 4),
                          "mean_jaccard": round(float(np.mean(js)), 4)})
            if min(js) >= AGREEMENT:
                converged = True
                break
    return ranking(done)
