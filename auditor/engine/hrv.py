"""Head relevance calibration (HRV-style): which cross-attention heads respond to which concept category, per model.

Calibration generates images from ordinary prompts. At every denoising step one word per lexicon category is drawn
and encoded by the model's own text encoder (its token states from the hidden states the UNet sees); every
cross-attention head then also scores those concept keys against its image queries: a softmax over all the drawn
words' tokens, averaged over pixels and over each word's tokens. The category with the most attention gets that
head's vote (one vote per head, step and prompt). Votes sum into ``[categories, heads]``; rows are normalised.
That is the UNet families' rule (``_Voter``). A transformer's text states change from block to block (SD3, Flux),
so there each step is followed by a concept pass with the drawn words as the text (``_PassVoter``).

The original work spends 2,100 prompts x 50 steps. Here prompts run in growing batches with checkpoints at
n0, 2 n0, 4 n0, ...; calibration stops once, for every category, the top-k heads at budget n agree with those at
n/2 (Jaccard >= 0.9). The agreement curve and the budget used are part of the record (``RelevanceMatrix``).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from auditor import lexicon as lex
from auditor import registry
from auditor.engine.capture import Tap, tapped
from auditor.engine.heads import denoiser_of, text_attention_modules
from auditor.engine.categories import encode_words
from auditor.engine.families import call_kwargs, family
from auditor.engine.models import fingerprint_of
from auditor.engine.relevance import (
    AGREEMENT, CONVERGENCE_K, RelevanceMatrix, cache_path, check_compatible, checkpoints, find_for_pipe, jaccard_topk,
    normalise_rows,
)
from auditor.errors import AuditorError
from auditor.resources import suites_dir


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


class _Ballot(Tap):
    """What both voters hold: the concept bank, the seeded word draws and the votes [categories, heads]."""

    def __init__(self, pipe, bank: ConceptBank, seed: int | Sequence[int], free_passes: bool = False):
        super().__init__(pipe, free_passes=free_passes)
        self.bank = bank
        self.rng = np.random.default_rng(seed)
        self.votes = torch.zeros(len(bank.categories), self.head_index.total, dtype=torch.int64)
        self.items = 1  # conditional items of the generation call (the last ones of the denoiser's batch)


class _Voter(_Ballot):
    """UNet families: one vote per head, conditional item and counted step, for the category its queries favour
    among the drawn words' keys (projected by the head's own ``to_k``)."""

    def __init__(self, pipe, bank: ConceptBank, seed: int | Sequence[int]):
        super().__init__(pipe, bank, seed)
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

    def recording(self):
        """The generations inside the block vote (the tap installed on the pipeline)."""
        return tapped(self)


class _PassVoter(_Ballot):
    """Transformer families: one vote per head, conditional item and step, from a concept pass.

    SD3's and Flux's text stream changes from block to block, so a word's keys at a block cannot be had by
    projecting its encoder states (the UNet voter's way). Instead, after each denoiser evaluation of the generation,
    the denoiser runs once more on the conditional items' latents at the same timestep, with one drawn word per
    category as its whole text; every head's image queries' attention on each word's tokens (normalised as the model
    normalises it, mean over pixels and over the word's tokens) decides the head's vote. PixArt, whose text states
    are the same at every block, is voted the same way, so all transformer families share one rule.
    """

    def __init__(self, pipe, bank: ConceptBank, seed: int | Sequence[int]):
        super().__init__(pipe, bank, seed, free_passes=True)
        self._forward = inspect.signature(self.denoiser.forward)  # read once: every step binds its call to it
        self._owner: torch.Tensor | None = None
        self._sums: dict[int, torch.Tensor] = {}

    def on_attention(self, layer_index, attn, query, probs, rows, n) -> None:
        part = probs.sum(2)  # over this block of pixels -> [items, heads, n_tok]
        self._sums[layer_index] = self._sums[layer_index] + part if layer_index in self._sums else part

    def tally(self) -> None:
        """Turn the finished concept pass's attention into votes (a sum over pixels ranks as the mean does)."""
        owner = self._owner
        counts = torch.bincount(owner, minlength=len(self.bank.categories))
        for layer_index, per_token in self._sums.items():
            per_token = per_token.float().cpu()
            per_cat = torch.zeros(*per_token.shape[:2], len(counts)).index_add_(2, owner, per_token) / counts
            one_hot = torch.nn.functional.one_hot(per_cat.argmax(-1), len(counts)).sum(0).T  # [C, heads]
            self.votes[:, self.head_index.layer_slice(layer_index)] += one_hot
        self._sums.clear()

    def concept_call(self, args, kwargs) -> dict:
        """The denoiser's keywords for the concept pass of the evaluation it was just called with."""
        bound = self._forward.bind(*args, **kwargs).arguments
        bound = {**bound.pop("kwargs", {}), **bound}
        batch = int(bound["hidden_states"].shape[0])
        lo = max(batch - self.items, 0)

        def cond(v):
            if torch.is_tensor(v) and v.ndim and v.shape[0] == batch:
                return v[lo:]
            return {k: cond(x) for k, x in v.items()} if isinstance(v, dict) else v

        call = {k: (v if k in ("img_ids", "txt_ids") else cond(v)) for k, v in bound.items()}
        states, self._owner = self.bank.draw(self.rng)
        text = call["encoder_hidden_states"]
        call["encoder_hidden_states"] = states.to(text.device, text.dtype)[None].expand(batch - lo, -1, -1)
        n_tok = states.shape[0]
        if call.get("encoder_attention_mask") is not None:  # PixArt: every drawn token is read
            call["encoder_attention_mask"] = torch.ones(batch - lo, n_tok, device=text.device)
        if call.get("txt_ids") is not None:  # Flux: text positions are all zero
            ids = call["txt_ids"]
            call["txt_ids"] = ids.new_zeros((*ids.shape[:-2], n_tok, ids.shape[-1]))
        call["return_dict"] = False
        return call

    @contextlib.contextmanager
    def recording(self):
        """Concept passes after every denoiser evaluation inside the block (the generation itself is not tapped)."""
        net, busy = self.denoiser, [False]

        def after(module, args, kwargs, output):
            if busy[0]:
                return
            busy[0] = True
            try:
                with torch.no_grad(), tapped(self):
                    module(**self.concept_call(args, kwargs))
                self.tally()
            finally:
                busy[0] = False

        handle = net.register_forward_hook(after, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def _agreement(snapshots: dict[int, np.ndarray], mark: int, k: int) -> tuple[dict, float] | None:
    """The agreement at ``mark`` against the latest snapshot at half the prompts or fewer: (the curve's point, the
    unrounded smallest top-k Jaccard over categories, which decides convergence); None at the first checkpoint."""
    earlier = [m for m in snapshots if m <= mark / 2]
    if not earlier:
        return None
    m = max(earlier)
    j = jaccard_topk(normalise_rows(snapshots[m]), normalise_rows(snapshots[mark]), k)
    return {"prompts": mark, "compared_with": m, "min_jaccard": round(float(j.min()), 4),
            "mean_jaccard": round(float(j.mean()), 4)}, j.min()


def calibrate(pipe, prompts: Sequence[str], lexicon: Mapping[str, Sequence[str]] | None = None, *,
              steps: int = 20, k: int | None = None, first: int = 16, threshold: float = AGREEMENT,
              batch_size: int = 8, guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
              width: int | None = None, fingerprint: str | None = None, prompt_source: str = "",
              progress: Callable[[int], None] | None = None, mapper=None) -> RelevanceMatrix:
    """Calibrate head relevance on ``prompts`` (at most all of them), stopping once top-k heads agree.

    Prompts run in batches; at each checkpoint (``first``, twice that, ... and all of them) the votes so far are
    compared with those at half as many prompts, and calibration stops once every category's top-k heads agree.

    Args:
        pipe: a loaded diffusers pipeline (``engine.models.load_model(...).pipe``).
        prompts: the calibration prompts; the budget is their number.
        lexicon: words per category (default: the project lexicon); each step draws one word per category.
        steps: denoising steps per prompt.
        k: the top-k whose agreement stops calibration (default ``CONVERGENCE_K``), recorded as the matrix's ``k``.
        first: prompts before the first agreement check.
        threshold: the Jaccard every category's top-k must reach to stop.
        batch_size: prompts generated together.
        guidance_scale: classifier-free guidance of the generations.
        seed: seeds the generations (batch by batch) and the word draws.
        height: image height in pixels (default: the model's); ``width`` defaults to ``height``.
        width: image width in pixels.
        fingerprint: the model's weights fingerprint, recorded in the matrix.
        prompt_source: where the prompts came from, recorded in the matrix.
        progress: called with the number of prompts of each finished batch.
        mapper: ``mapper(fn, jobs) -> [fn(pipe, *job) for job in jobs]``, e.g. an executor's ``map`` that spreads
            the batches (``vote_batch``) over Ray workers; None runs them here. Votes add up the same either way.

    Returns:
        A ``RelevanceMatrix`` ([categories, heads] vote shares) with its agreement curve, the budget it used and
        whether it converged.

    Example:
        >>> from auditor.engine.hrv import calibrate
        >>> from auditor.engine.models import load_model
        >>> from auditor.zoo import lexicon
        >>> lm = load_model("shapes-v1", device="cpu")
        >>> rm = calibrate(lm.pipe, ["a red circle", "a blue square on the left"], lexicon(), steps=2, first=1)
        >>> rm.budget_prompts, rm.matrix.shape, rm.categories[:3]
        (2, (7, 56), ('colour', 'shape', 'size'))
        >>> [point["prompts"] for point in rm.agreement_curve]
        [2]
    """
    if not prompts:
        raise AuditorError("calibration needs at least one prompt")
    lexicon = {c: list(ws) for c, ws in (lex.words_by_category() if lexicon is None else lexicon).items()}
    total = sum(int(m.heads) for _, m in text_attention_modules(denoiser_of(pipe)))
    # the default k never exceeds a small model's heads; a k the caller names is checked
    k = min(CONVERGENCE_K, total) if k is None else int(k)
    if not 1 <= k <= total:
        raise AuditorError(f"k must be between 1 and the number of heads ({total}), got {k}")
    snapshots: dict[int, np.ndarray] = {}
    curve: list[dict] = []
    done, converged, names, votes = 0, False, None, None
    size = {} if height is None else {"height": height, "width": width or height}
    run = mapper or (lambda fn, jobs: [fn(pipe, *job) for job in jobs])
    for mark in checkpoints(len(prompts), first):
        # one job per batch up to the next checkpoint: the batches and their draws are the same whoever runs them
        jobs = [(list(prompts[a:min(a + batch_size, mark)]), lexicon, a, steps, guidance_scale, seed, size)
                for a in range(done, mark, batch_size)]
        for job, (names, batch_votes) in zip(jobs, run(vote_batch, jobs)):
            votes = batch_votes if votes is None else votes + batch_votes
            if progress is not None:
                progress(len(job[0]))
        done = mark
        snapshots[mark] = votes.copy()
        agreement = _agreement(snapshots, mark, k)
        if agreement is not None:
            curve.append(agreement[0])
            if agreement[1] >= threshold:
                converged = True
                break
    categories = tuple(c for c, ws in lexicon.items() if ws)
    return RelevanceMatrix.from_votes(categories, names, votes, budget_prompts=done, steps=steps,
                                      agreement_curve=curve, model_fingerprint=fingerprint, k=k,
                                      converged=converged, prompt_source=prompt_source, seed=seed)


_BANKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vote_batch(pipe, prompts: Sequence[str], lexicon: Mapping[str, Sequence[str]], first: int, steps: int,
               guidance_scale: float, seed: int, size: dict) -> tuple[tuple[str, ...], np.ndarray]:
    """One batch of calibration, the same wherever it runs (here or on a worker): ``prompts`` (calibration prompts
    ``first``, ``first + 1``, ...) generated in one call from a generator seeded ``seed + first``, the words drawn
    from a generator seeded ``(seed, first)``.

    Returns:
        (head names, votes [categories, heads] of this batch).
    """
    key = tuple((c, tuple(ws)) for c, ws in lexicon.items())
    banks = _BANKS.setdefault(denoiser_of(pipe), {})
    if key not in banks:  # the words are encoded once per model and lexicon
        banks[key] = ConceptBank(pipe, lexicon)
    voter = (_Voter if family(pipe) == "unet" else _PassVoter)(pipe, banks[key], [seed, first])
    voter.items = len(prompts)
    g = torch.Generator("cpu").manual_seed(seed + first)
    with voter.recording():
        pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
             output_type="latent", **size, **call_kwargs(pipe))
    return voter.head_index.names, voter.votes.numpy()


# --- the default prompts, and calibration on demand -----------------------------------------------------------


def general_prompts() -> list[str]:
    """The shipped calibration prompts for real checkpoints (one a line; # comments)."""
    path = suites_dir() / "calibration-general.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def default_prompts(n: int, bundled: bool, seed: int = 0) -> tuple[list[str], str]:
    """``n`` calibration prompts and where they came from: the bundled models' own prompts (``auditor.registry``)
    for a bundled model, else the general list (cycled when ``n`` exceeds it; each pass gets new noise, so votes
    still differ)."""
    if bundled:
        source = registry.bundled_source()
        return source.prompts(n, seed), source.prompt_source(n, seed)
    base = general_prompts()
    return [base[i % len(base)] for i in range(n)], f"prompt_suites/calibration-general.txt ({len(base)} prompts)"


def calibrate_model(pipe, *, bundled: bool = False, fingerprint: str | None = None, budget: int = 2100,
                    steps: int = 20, seed: int = 0, save: bool = True, **calibrate_kwargs) -> RelevanceMatrix:
    """Calibrate with the default prompts for the model (the bundled models' own if bundled, else the general
    list), up to ``budget`` prompts, and cache the result under the fingerprint."""
    fp = fingerprint or fingerprint_of(pipe)
    prompts, source = default_prompts(budget, bundled, seed)
    if bundled and calibrate_kwargs.get("lexicon") is None:
        calibrate_kwargs["lexicon"] = registry.bundled_lexicon()  # only the words the bundled models learned
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
        raise AuditorError("no head-relevance matrix for this model: calibrate one (`compute=True`, or the "
                           "`auditor calibrate` command) or pass its file (`path=...`)")
    return calibrate_model(pipe, **calibrate_kwargs)
