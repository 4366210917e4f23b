"""The head-relevance record: which cross-attention heads respond to which concept category, and where a model's is kept.

A ``RelevanceMatrix`` holds per category the share of HRV votes each head got (``auditor.engine.hrv`` calibrates
it), the agreement curve that stopped calibration and the budget it used. It saves as ``<name>.npz`` (arrays) plus
``<name>.json`` (everything else, with a sha256 of the content that run manifests cite). Matrices are cached per
model fingerprint in the user cache folder; bundled models ship theirs as ``relevance.npz``/``.json`` in the model
folder (``find_for_pipe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from auditor.engine.heads import HeadIndex, denoiser_of
from auditor.engine.models import cache_dir, fingerprint_of, folder_of
from auditor.engine.records import check_sha256, content_sha256, read_record, write_record
from auditor.errors import AuditorError

ORIGINAL_BUDGET = {"prompts": 2100, "steps": 50}  # the HRV paper's calibration
AGREEMENT = 0.9  # Jaccard of top-k head sets between budgets n/2 and n, for every category
CONVERGENCE_K = 8  # the top-k whose agreement stops calibration unless the caller names one (recorded as ``k``)
BUNDLED_FILE = "relevance.npz"
FORMAT_VERSION = 1


# --- the record -----------------------------------------------------------------------------------------------


def _stable_order(values: np.ndarray, descending: bool) -> np.ndarray:
    """Head indices by value; ties keep head order, so a selection never depends on the sort algorithm."""
    idx = np.arange(len(values))
    return np.lexsort((idx, -values if descending else values))


@dataclass
class RelevanceMatrix:
    categories: tuple[str, ...]
    head_names: tuple[str, ...]
    matrix: np.ndarray  # [C, H] float32, each row sums to 1 (0 for a category that got no votes)
    votes: np.ndarray  # [C, H] int64 raw vote counts
    budget_prompts: int
    steps: int
    agreement_curve: list[dict] = field(default_factory=list)  # {"prompts", "compared_with", "min_jaccard", "mean_jaccard"}
    model_fingerprint: str | None = None
    k: int = 8
    converged: bool = False
    prompt_source: str = ""
    seed: int = 0
    created: str = ""  # not part of the content hash

    def __post_init__(self):
        self.categories = tuple(self.categories)
        self.head_names = tuple(self.head_names)
        self.matrix = np.asarray(self.matrix, dtype=np.float32)
        self.votes = np.asarray(self.votes, dtype=np.int64)

    @classmethod
    def from_votes(cls, categories, head_names, votes: np.ndarray, **meta) -> "RelevanceMatrix":
        return cls(categories, head_names, normalise_rows(votes), votes, **meta)

    def _cat(self, category: str) -> int:
        try:
            return self.categories.index(category)
        except ValueError:
            raise AuditorError(f"category {category!r} is not in the relevance matrix") from None

    def ranks(self, category: str) -> bool:
        """Whether the matrix ranks heads for ``category``: it is one of its categories and got votes."""
        return category in self.categories and int(self.votes[self.categories.index(category)].sum()) > 0

    def k_for(self, category: str) -> int:
        """The k of a selective map by this matrix: the one k its calibration compared top heads at."""
        return int(self.k)

    @property
    def category_limit(self) -> tuple[str, ...]:
        """The categories a word's category must be one of to get a selective map."""
        return self.categories

    def row(self, category: str) -> np.ndarray:
        return self.matrix[self._cat(category)]

    def _ranked(self, category: str, descending: bool) -> np.ndarray:
        c = self._cat(category)
        if self.votes[c].sum() == 0:
            raise AuditorError(f"category {category!r} got no votes in calibration ({self.budget_prompts} prompts): "
                               "its heads are unknown; calibrate with a larger budget or use method 'all_heads'")
        return _stable_order(self.matrix[c], descending)

    def top_heads(self, category: str, k: int) -> np.ndarray:
        """Global indices of the k most relevant heads of ``category``."""
        return self._ranked(category, True)[:k]

    def bottom_heads(self, category: str, k: int) -> np.ndarray:
        return self._ranked(category, False)[:k]

    @property
    def budget_fraction(self) -> float:
        """Denoising evaluations spent, as a fraction of the original 2,100 x 50."""
        return self.budget_prompts * self.steps / (ORIGINAL_BUDGET["prompts"] * ORIGINAL_BUDGET["steps"])

    def meta(self) -> dict:
        """Everything but the arrays and the creation time (what the content hash covers besides the arrays)."""
        return {
            "format": FORMAT_VERSION, "categories": list(self.categories), "head_names": list(self.head_names),
            "budget_prompts": int(self.budget_prompts), "steps": int(self.steps),
            "agreement_curve": self.agreement_curve, "model_fingerprint": self.model_fingerprint, "k": int(self.k),
            "converged": bool(self.converged), "prompt_source": self.prompt_source, "seed": int(self.seed),
            "original_budget": ORIGINAL_BUDGET,
        }

    @property
    def sha256(self) -> str:
        return content_sha256(self.meta(), ((self.matrix, "<f4"), (self.votes, "<i8")))

    def save(self, path: str | Path) -> Path:
        """Write ``<base>.npz`` and ``<base>.json``; returns the .npz path."""
        npz, side = _paths(path)
        return write_record(npz, side, {"matrix": self.matrix, "votes": self.votes},
                            {**self.meta(), "sha256": self.sha256}, self.created)

    @classmethod
    def load(cls, path: str | Path) -> "RelevanceMatrix":
        npz, side = _paths(path)

        def build(meta: dict, arrays: dict) -> "RelevanceMatrix":
            return cls(meta["categories"], meta["head_names"], arrays["matrix"], arrays["votes"],
                       meta["budget_prompts"], meta["steps"], meta.get("agreement_curve", []),
                       meta.get("model_fingerprint"), meta.get("k", 8), meta.get("converged", False),
                       meta.get("prompt_source", ""), meta.get("seed", 0), meta.get("created", ""))

        rm, meta = read_record(npz, side, ("matrix", "votes"), build, "relevance matrix",
                               "relevance file not found (a matrix is a .npz with a .json beside it)")
        if rm.matrix.shape != (len(rm.categories), len(rm.head_names)) or rm.votes.shape != rm.matrix.shape:
            raise AuditorError(f"{npz}: matrix shape {rm.matrix.shape} does not match its categories and heads")
        check_sha256(meta, rm.sha256, npz, side)
        return rm

    def summary(self, top: int = 5) -> dict:
        last = self.agreement_curve[-1] if self.agreement_curve else {}
        return {
            "sha256": self.sha256, "model_fingerprint": self.model_fingerprint, "heads": len(self.head_names),
            "categories": len(self.categories), "budget_prompts": self.budget_prompts, "steps": self.steps,
            "original_budget": ORIGINAL_BUDGET, "budget_fraction": round(self.budget_fraction, 5), "k": self.k,
            "converged": self.converged, "agreement": {k: last.get(k) for k in ("min_jaccard", "mean_jaccard")},
            "no_votes": [c for c, v in zip(self.categories, self.votes.sum(1)) if v == 0],
            "top_heads": {c: [self.head_names[i] for i in _stable_order(self.matrix[j], True)[:top]]
                          for j, c in enumerate(self.categories) if self.votes[j].sum() > 0},
        }


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def normalise_rows(votes: np.ndarray) -> np.ndarray:
    v = np.asarray(votes, dtype=np.float64)
    s = v.sum(axis=1, keepdims=True)
    return np.divide(v, s, out=np.zeros_like(v), where=s > 0).astype(np.float32)


def jaccard_topk(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, Jaccard similarity of the top-k column sets of ``a`` and ``b``."""
    out = []
    for ra, rb in zip(a, b):
        sa = set(_stable_order(np.asarray(ra, float), True)[:k].tolist())
        sb = set(_stable_order(np.asarray(rb, float), True)[:k].tolist())
        out.append(len(sa & sb) / len(sa | sb))
    return np.array(out)


def checkpoints(budget: int, first: int) -> list[int]:
    """Prompt counts at which agreement is checked: first, 2 first, 4 first, ... and the budget itself."""
    first = max(1, min(first, budget))
    out = [first]
    while out[-1] * 2 <= budget:
        out.append(out[-1] * 2)
    if out[-1] != budget:
        out.append(budget)
    return out


# --- where a model's matrix is kept ----------------------------------------------------------------------------


def cache_path(fingerprint: str) -> Path:
    return cache_dir() / "relevance" / f"{fingerprint}.npz"


def find_for_pipe(pipe, fingerprint: str | None = None) -> RelevanceMatrix | None:
    """A stored matrix for this model: shipped in its folder, or cached by fingerprint; None if there is none."""
    fp = fingerprint or fingerprint_of(pipe)
    if fp is None:
        return None
    folder = folder_of(pipe)
    for cand in ([folder / BUNDLED_FILE] if folder else []) + [cache_path(fp)]:
        if cand.is_file():
            rm = RelevanceMatrix.load(cand)
            if rm.model_fingerprint == fp:
                return rm
    return None


def check_compatible(rm: RelevanceMatrix, pipe, source: str) -> RelevanceMatrix:
    """``rm`` when its heads are ``pipe``'s cross-attention heads, in order; else an AuditorError naming ``source``."""
    names = HeadIndex.from_unet(denoiser_of(pipe)).names
    if tuple(rm.head_names) != tuple(names):
        raise AuditorError(f"{source}: relevance matrix has {len(rm.head_names)} heads that do not match this "
                           f"model's {len(names)} cross-attention heads")
    return rm
