"""Head relevance (HRV-style): which cross-attention heads respond to which concept category, once per model.

Calibration generates images from ordinary prompts. At every denoising step one word per lexicon category is drawn
and encoded by the model's own text encoder (its token states from the hidden states the UNet sees); every
cross-attention head then also scores those concept keys against its image queries: a softmax over all the drawn
words' tokens, averaged over pixels and over each word's tokens. The category with the most attention gets that
head's vote (one vote per head, step and prompt). Votes sum into ``[categories, heads]``; rows are normalised.

The original work spends 2,100 prompts x 50 steps. Here prompts run in growing batches with checkpoints at
n0, 2 n0, 4 n0, ...; calibration stops once, for every category, the top-k heads at budget n agree with those at
n/2 (Jaccard >= 0.9). The agreement curve and the budget used are part of the record.

A ``RelevanceMatrix`` saves as ``<name>.npz`` (arrays) plus ``<name>.json`` (everything else, with a sha256 of
the content that run manifests cite). Matrices are cached per model fingerprint in the user cache folder; bundled
models ship theirs as ``relevance.npz``/``.json`` in the model folder.
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from auditor.engine.capture import Tap, tapped
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
        h = hashlib.sha256()
        h.update(json.dumps(self.meta(), sort_keys=True, separators=(",", ":")).encode())
        h.update(np.ascontiguousarray(self.matrix, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.votes, dtype="<i8").tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write ``<base>.npz`` and ``<base>.json``; returns the .npz path."""
        npz, side = _paths(path)
        npz.parent.mkdir(parents=True, exist_ok=True)
        with open(npz, "wb") as f:  # an open file keeps numpy from appending a second .npz
            np.savez_compressed(f, matrix=self.matrix, votes=self.votes)
        side.write_text(json.dumps({**self.meta(), "sha256": self.sha256,
                                    "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
        return npz

    @classmethod
    def load(cls, path: str | Path) -> "RelevanceMatrix":
        npz, side = _paths(path)
        for p in (npz, side):
            if not p.is_file():
                raise AuditorError(f"{p}: relevance file not found (a matrix is a .npz with a .json beside it)")
        try:
            meta = json.loads(side.read_text())
            with np.load(npz) as arrays:
                matrix, votes = arrays["matrix"], arrays["votes"]
            rm = cls(meta["categories"], meta["head_names"], matrix, votes, meta["budget_prompts"], meta["steps"],
                     meta.get("agreement_curve", []), meta.get("model_fingerprint"), meta.get("k", 8),
                     meta.get("converged", False), meta.get("prompt_source", ""), meta.get("seed", 0),
                     meta.get("created", ""))
        except (EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError) as exc:
            raise AuditorError(f"{npz}: unreadable relevance matrix ({exc})") from None
        if rm.matrix.shape != (len(rm.categories), len(rm.head_names)) or rm.votes.shape != rm.matrix.shape:
            raise AuditorError(f"{npz}: matrix shape {rm.matrix.shape} does not match its categories and heads")
        if meta.get("sha256") and meta["sha256"] != rm.sha256:
            raise AuditorError(f"{npz}: content does not match the sha256 in {side.name} (file changed or corrupt)")
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


# --- concept-word embeddings ------------------------------------------------------------------------------------


@torch.no_grad()
def encode_words(pipe, words: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Each word's token states [n_tokens, D] in the space the UNet's cross-attention reads (``encode_prompt``)."""
    device = pipe.unet.device
    out: list[torch.Tensor] = []
    for i in range(0, len(words), batch_size):
        chunk = list(words[i:i + batch_size])
        emb = pipe.encode_prompt(prompt=chunk, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
        for j, w in enumerate(chunk):
            n = len(pipe.tokenizer(w, add_special_tokens=False)["input_ids"])
            n = max(1, min(n, emb.shape[1] - 2))
            out.append(emb[j, 1:1 + n].clone())  # position 0 is the start token
    return out


class ConceptBank:
    """The lexicon's words per category, encoded once; ``draw`` picks one word per category."""

    def __init__(self, pipe, lexicon: Mapping[str, Sequence[str]]):
        self.categories = tuple(c for c, ws in lexicon.items() if ws)
        words = [list(lexicon[c]) for c in self.categories]
        flat = encode_words(pipe, [w for ws in words for w in ws])
        self.embeds: list[list[torch.Tensor]] = []
        for ws in words:
            self.embeds.append(flat[:len(ws)])
            flat = flat[len(ws):]

    def draw(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states [n, D] of one word per category, category of each token [n])."""
        states, owner = [], []
        for c, options in enumerate(self.embeds):
            e = options[int(rng.integers(len(options)))]
            states.append(e)
            owner += [c] * e.shape[0]
        return torch.cat(states), torch.tensor(owner)


# --- calibration ----------------------------------------------------------------------------------------------


class _Voter(Tap):
    """Adds one vote per head, conditional item and counted step to the category its queries favour."""

    def __init__(self, pipe, bank: ConceptBank, seed: int):
        super().__init__(pipe)
        self.bank = bank
        self.rng = np.random.default_rng(seed)
        self.votes = torch.zeros(len(bank.categories), self.head_index.total, dtype=torch.int64)
        self._keys = None

    def on_step(self, sample, encoder_hidden_states) -> None:
        super().on_step(sample, encoder_hidden_states)
        states, owner = self.bank.draw(self.rng)
        dev = sample.device
        dtype = encoder_hidden_states.dtype if encoder_hidden_states is not None else states.dtype
        counts = torch.bincount(owner, minlength=len(self.bank.categories)).to(dev)
        self._keys = (states.to(dev, dtype), owner.to(dev), counts)

    needs_probs = False  # votes read the queries only: the generation itself keeps SDPA

    def on_attention(self, layer_index, attn, query, probs, rows, n) -> None:
        states, owner, counts = self._keys
        ehs = attn.norm_encoder_hidden_states(states[None])[0] if attn.norm_cross else states
        key = attn.to_k(ehs)
        key = key.view(-1, attn.heads, key.shape[-1] // attn.heads).transpose(0, 1)  # [heads, n_tok, d]
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        p = torch.matmul(query.float(), key.float().transpose(-1, -2) * attn.scale).softmax(-1)  # [B, h, N, n_tok]
        per_token = p.mean(2)  # over pixels -> [B, heads, n_tok]
        per_cat = torch.zeros(*per_token.shape[:2], len(counts), device=per_token.device)
        per_cat.index_add_(2, owner, per_token)
        per_cat = per_cat / counts  # mean over each word's tokens
        win = per_cat.argmax(-1)  # [B, heads]
        one_hot = torch.nn.functional.one_hot(win, len(counts)).sum(0).T  # [C, heads]
        self.votes[:, self.head_index.layer_slice(layer_index)] += one_hot.cpu()


def checkpoints(budget: int, first: int) -> list[int]:
    """Prompt counts at which agreement is checked: first, 2 first, 4 first, ... and the budget itself."""
    first = max(1, min(first, budget))
    out = [first]
    while out[-1] * 2 <= budget:
        out.append(out[-1] * 2)
    if out[-1] != budget:
        out.append(budget)
    return out


def calibrate(pipe, prompts: Sequence[str], lexicon: Mapping[str, Sequence[str]] | None = None, *,
              steps: int = 20, k: int | None = None, first: int = 16, threshold: float = AGREEMENT,
              batch_size: int = 8, guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
              width: int | None = None, fingerprint: str | None = None, prompt_source: str = "",
              progress: Callable[[int], None] | None = None) -> RelevanceMatrix:
    """Calibrate head relevance on ``prompts`` (at most all of them), stopping once top-k heads agree."""
    if not prompts:
        raise AuditorError("calibration needs at least one prompt")
    if lexicon is None:
        from auditor.lexicon import words_by_category

        lexicon = words_by_category()
    k = CONVERGENCE_K if k is None else int(k)
    bank = ConceptBank(pipe, lexicon)
    voter = _Voter(pipe, bank, seed)
    if not 1 <= k <= voter.head_index.total:
        raise AuditorError(f"k must be between 1 and the number of heads ({voter.head_index.total}), got {k}")
    budget = len(prompts)
    marks = checkpoints(budget, first)
    snapshots: dict[int, np.ndarray] = {}
    curve: list[dict] = []
    done, converged = 0, False
    size = {} if height is None else {"height": height, "width": width or height}
    with tapped(voter):
        for mark in marks:
            while done < mark:
                batch = list(prompts[done:min(done + batch_size, mark)])
                g = torch.Generator("cpu").manual_seed(seed + done)
                pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
                     output_type="latent", **size)
                done += len(batch)
                if progress is not None:
                    progress(len(batch))
            snapshots[mark] = voter.votes.numpy().copy()
            earlier = [m for m in snapshots if m <= mark / 2]
            if earlier:
                m = max(earlier)
                j = jaccard_topk(normalise_rows(snapshots[m]), normalise_rows(snapshots[mark]), k)
                curve.append({"prompts": mark, "compared_with": m, "min_jaccard": round(float(j.min()), 4),
                              "mean_jaccard": round(float(j.mean()), 4)})
                if j.min() >= threshold:
                    converged = True
                    break
    return RelevanceMatrix.from_votes(bank.categories, voter.head_index.names, voter.votes.numpy(),
                                      budget_prompts=done, steps=steps, agreement_curve=curve,
                                      model_fingerprint=fingerprint, k=k, converged=converged,
                                      prompt_source=prompt_source, seed=seed)


# --- prompts, cache and lookup --------------------------------------------------------------------------------


def general_prompts() -> list[str]:
    """The shipped calibration prompts for real checkpoints (one a line; # comments)."""
    from auditor.resources import suites_dir

    path = suites_dir() / "calibration-general.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def default_prompts(n: int, bundled: bool, seed: int = 0) -> tuple[list[str], str]:
    """``n`` calibration prompts and where they came from: the shapes grammar for a bundled model, else the
    general list (cycled when ``n`` exceeds it; each pass gets new noise, so votes still differ)."""
    if bundled:
        from auditor.zoo.grammar import sample_prompts

        return sample_prompts(n, seed), f"auditor.zoo.grammar.sample_prompts(n={n}, seed={seed})"
    base = general_prompts()
    return [base[i % len(base)] for i in range(n)], f"prompt_suites/calibration-general.txt ({len(base)} prompts)"


def cache_path(fingerprint: str) -> Path:
    from auditor.engine.models import cache_dir

    return cache_dir() / "relevance" / f"{fingerprint}.npz"


def find_for_pipe(pipe, fingerprint: str | None = None) -> RelevanceMatrix | None:
    """A stored matrix for this model: shipped in its folder, or cached by fingerprint; None if there is none."""
    from auditor.engine.models import fingerprint_of, folder_of

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
    from auditor.engine.heads import HeadIndex

    names = HeadIndex.from_unet(pipe.unet).names
    if tuple(rm.head_names) != tuple(names):
        raise AuditorError(f"{source}: relevance matrix has {len(rm.head_names)} heads that do not match this "
                           f"model's {len(names)} cross-attention heads")
    return rm


# --- categories of words ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryGuess:
    word: str
    category: str
    inferred: bool  # False: the lexicon lists the word; True: nearest lexicon words in the text-embedding space
    neighbours: tuple[tuple[str, str, float], ...] = ()  # (lexicon word, its category, cosine)


_LEXICON_EMBEDDINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _word_vector(states: torch.Tensor) -> torch.Tensor:
    v = states.float().mean(0)
    return v / v.norm().clamp_min(1e-8)


def infer_category(word: str, pipe, lexicon: Mapping[str, Sequence[str]] | None = None,
                   neighbours: int = 5) -> CategoryGuess:
    """The category of a word the lexicon lacks: its nearest lexicon words (cosine, mean token state in the
    model's own text space) vote, weighted by similarity. Marked ``inferred``."""
    if lexicon is None:
        from auditor.lexicon import words_by_category

        lexicon = words_by_category()
    pairs = tuple((w, c) for c, ws in lexicon.items() for w in ws)
    if not pairs:
        raise AuditorError("the lexicon is empty: no category to infer from")
    per_encoder = _LEXICON_EMBEDDINGS.setdefault(pipe.unet, {})
    if pairs not in per_encoder:
        per_encoder[pairs] = torch.stack([_word_vector(s) for s in encode_words(pipe, [w for w, _ in pairs])])
    table = per_encoder[pairs]
    q = _word_vector(encode_words(pipe, [word])[0]).to(table.device)
    sims = (table @ q).cpu()
    top = torch.topk(sims, min(neighbours, len(pairs))).indices.tolist()
    score: dict[str, float] = {}
    for i in top:
        score[pairs[i][1]] = score.get(pairs[i][1], 0.0) + float(sims[i])
    best = max(score, key=score.get)
    return CategoryGuess(word, best, True, tuple((pairs[i][0], pairs[i][1], round(float(sims[i]), 4)) for i in top))


def category_of(word: str, pipe=None, categories: Sequence[str] | None = None,
                lexicon: Mapping[str, Sequence[str]] | None = None) -> CategoryGuess:
    """A word's category: the lexicon's (object reading first, as in "an orange"), else inferred from ``pipe``.

    ``categories`` limits the answer to those a relevance matrix has."""
    from auditor import lexicon as lex

    key = lex.normalise(word)
    if lexicon is None:
        for role in ("object", "attribute", "style"):
            cat = lex.lookup(key, role)
            if cat != lex.UNKNOWN and (categories is None or cat in categories):
                return CategoryGuess(word, cat, False)
        lexicon = lex.words_by_category()
    for cat, ws in lexicon.items():
        if key in {lex.normalise(w) for w in ws} and (categories is None or cat in categories):
            return CategoryGuess(word, cat, False)
    if pipe is None:
        raise AuditorError(f"{word!r} is not in the lexicon and no model was given to infer its category")
    if categories is not None:
        lexicon = {c: ws for c, ws in lexicon.items() if c in categories}
    return infer_category(word, pipe, lexicon)


def calibrate_model(pipe, *, bundled: bool = False, fingerprint: str | None = None, budget: int = 2100,
                    steps: int = 20, seed: int = 0, save: bool = True, **calibrate_kwargs) -> RelevanceMatrix:
    """Calibrate with the default prompts for the model (shapes grammar if bundled, else the general list), up to
    ``budget`` prompts, and cache the result under the fingerprint."""
    from auditor.engine.models import fingerprint_of

    fp = fingerprint or fingerprint_of(pipe)
    prompts, source = default_prompts(budget, bundled, seed)
    if bundled and calibrate_kwargs.get("lexicon") is None:
        from auditor.zoo import lexicon

        calibrate_kwargs["lexicon"] = lexicon()  # only the words the shapes world taught the model
    rm = calibrate(pipe, prompts, steps=steps, seed=seed, fingerprint=fp, prompt_source=source, **calibrate_kwargs)
    if save and fp is not None:
        rm.save(cache_path(fp))
    return rm


def relevance_for(pipe, path: str | Path | None = None, *, compute: bool = False, **calibrate_kwargs) -> RelevanceMatrix:
    """The relevance matrix to use with ``pipe``: ``path`` if given; else the shipped or cached one for its
    fingerprint; else, with ``compute``, a fresh calibration (``calibrate_model``). Otherwise an AuditorError."""
    if path is not None:
        return check_compatible(RelevanceMatrix.load(path), pipe, str(path))
    found = find_for_pipe(pipe)
    if found is not None:
        return check_compatible(found, pipe, "cached relevance")
    if not compute:
        raise AuditorError("no head-relevance matrix for this model: run `auditor calibrate` (or pass --relevance)")
    return calibrate_model(pipe, **calibrate_kwargs)
