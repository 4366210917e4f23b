"""Head maps -> concept maps: aggregation by method, resizing to one grid, normalisation, and the mask policy.

Methods:
- ``all_heads``: the DAAM baseline, computed exactly as the daam package (castorini/daam 0.2.0) does by default
  (``daam_map``): the down and up blocks' heads only (DAAM does not hook the mid block), each head's map of each
  token upsampled bicubically to the latent grid and clamped at 0, the mean over those heads, a word = the mean of
  its tokens' maps, then bicubic to the output grid;
- ``selective``: the top-k heads of the word's category in a head ranking (a localisation ranking or an HRV
  matrix), k the ranking's own unless given;
- ``weighted``: every head weighted by its score for the category;
- ``bottom_k``: the k lowest-ranked heads (the control: selection should beat it).
Every method goes through ``pooled_map`` and differs only in the weight each head gets (``head_weights``). ``raw``
is in attention-probability units per counted step; ``norm`` rescales it to [0, 1]. Binary masks come from
``binarize`` only. ``aggregate`` (each layer's weighted heads resized bilinearly, a word's tokens summed) is the
category response's, and ``head_maps`` the reading API's per-head maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from auditor.errors import AuditorError

METHODS = ("selective", "all_heads", "bottom_k", "weighted")
MASK_POLICIES = ("otsu", "quantile")
MASK_POLICY = "otsu"  # the default everywhere a concept's region is needed
MASK_QUANTILE = 0.8  # for the "quantile" policy: the top 20% of pixels


def head_weights(method: str, n_heads: int, relevance=None, category: str | None = None,
                 k: int | None = None, head_names: Sequence[str] | None = None) -> np.ndarray:
    """Weight of every head [H] for ``method``."""
    if method not in METHODS:
        raise AuditorError(f"unknown map method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "all_heads":
        if head_names is None:
            raise AuditorError("method 'all_heads' needs the head names (DAAM leaves the mid block out)")
        return daam_weights(head_names)
    if relevance is None:
        raise AuditorError(f"method {method!r} needs a head-relevance matrix")
    if head_names is not None and tuple(relevance.head_names) != tuple(head_names):
        raise AuditorError("the head-relevance matrix was computed for another architecture "
                           f"({len(relevance.head_names)} heads, this model has {len(head_names)})")
    if method == "weighted":
        w = relevance.row(category).astype(np.float32)
        if w.sum() <= 0:
            raise AuditorError(f"category {category!r} has no relevant heads in the relevance matrix")
        return w
    k = relevance.k_for(category) if k is None else int(k)
    if not 1 <= k <= n_heads:
        raise AuditorError(f"k must be between 1 and the number of heads ({n_heads}), got {k}")
    chosen = relevance.top_heads(category, k) if method == "selective" else relevance.bottom_heads(category, k)
    w = np.zeros(n_heads, dtype=np.float32)
    w[chosen] = 1.0
    return w


def target_size(trace, size="image") -> tuple[int, int]:
    """The common grid: "image" (pixels), "latent" (the largest layer grid), or an explicit (h, w)."""
    if size == "image":
        return trace.image_size
    if size == "latent":
        return max(trace.grids.values(), key=lambda hw: hw[0] * hw[1])
    h, w = size
    return int(h), int(w)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, h, w] -> [C, H, W], bilinear."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def _layer_maps(trace, token_indices: Sequence[int], item: int):
    """(layer index, [heads, h, w]) per layer: the tokens' attention, mean over counted steps."""
    if not token_indices:
        raise AuditorError("no token indices to build a map from")
    cols = [trace.column(t) for t in token_indices]
    steps = max(trace.steps_counted, 1)
    for li, name in enumerate(trace.head_index.layers):
        buf = trace.buffers.get(name)
        if buf is None:  # a layer the generation never ran (cannot happen with the SD UNets; kept honest)
            continue
        h, w = trace.grids[name]
        m = buf[item][..., cols].sum(-1) / steps
        yield li, m.reshape(m.shape[0], h, w)


def head_maps(trace, token_indices: Sequence[int], item: int = 0, size="image") -> torch.Tensor:
    """[H, H_out, W_out] every head's map of the tokens, in global head order."""
    hw = target_size(trace, size)
    return torch.cat([_resize(m, hw) for _, m in _layer_maps(trace, token_indices, item)])


def aggregate(trace, token_indices: Sequence[int], weights: np.ndarray, item: int = 0, size="image") -> torch.Tensor:
    """[H_out, W_out] weighted mean of the heads' maps."""
    hw = target_size(trace, size)
    wt = torch.as_tensor(weights, dtype=torch.float32)
    out = None
    for li, m in _layer_maps(trace, token_indices, item):
        wl = wt[trace.head_index.layer_slice(li)].to(m.device)
        if not bool((wl != 0).any()):
            continue
        layer = _resize((wl[:, None, None] * m).sum(0, keepdim=True), hw)[0]
        out = layer if out is None else out + layer
    if out is None:
        raise AuditorError("every head has weight 0: nothing to aggregate")
    return out / float(wt.sum())


# DAAM's locator hooks the cross-attention of the down and up blocks; the mid block only when heads are saved or
# loaded, which its default trace does not do.
DAAM_SKIPPED_STAGES = ("mid_block",)


def daam_weights(head_names: Sequence[str]) -> np.ndarray:
    """[H] 1 for every head DAAM aggregates by default, 0 for the others.

    DAAM has no transformer variant: a transformer's text-reading heads (``transformer_blocks.*``,
    ``single_transformer_blocks.*``) have no mid block to leave out, so every one of them is aggregated. Their maps
    are on the patch grid, which is the trace's ``latent_size`` for a transformer, so DAAM's upsampling to the
    latent grid is the identity there."""
    return np.array([n.split(".", 1)[0] not in DAAM_SKIPPED_STAGES for n in head_names], dtype=np.float32)


def _latent_grid(trace) -> tuple[int, int]:
    return tuple(trace.latent_size) if trace.latent_size else target_size(trace, "latent")


def latent_head_maps(trace, token_indices: Sequence[int], item: int = 0,
                     heads: Sequence[int] | None = None) -> torch.Tensor:
    """Each head's map of a word on the latent grid, built the way DAAM builds it.

    Per token, the head's attention (mean over counted steps) is upsampled bicubically to the latent grid and
    clamped at 0, as DAAM does before it averages; a word is the mean of its tokens' maps.

    Args:
        trace: a ``Trace`` holding the generation.
        token_indices: the word's token indices in the text sequence.
        item: which traced image (``Trace.item``).
        heads: global head indices to build (default: every head); the result follows this order.

    Returns:
        ``[len(heads), h, w]`` float32 tensor on the trace's device.
    """
    if not token_indices:
        raise AuditorError("no token indices to build a map from")
    index = trace.head_index
    wanted = np.arange(index.total) if heads is None else np.asarray(heads, dtype=np.int64)
    latent = _latent_grid(trace)
    cols = [trace.column(t) for t in token_indices]
    steps = float(max(trace.steps_counted, 1))
    parts, order = [], []
    for li, name in enumerate(index.layers):
        sl = index.layer_slice(li)
        here = wanted[(wanted >= sl.start) & (wanted < sl.stop)]
        if here.size == 0:
            continue
        buf = trace.buffers.get(name)
        if buf is None:
            raise AuditorError(f"layer {name} was not traced: no map for its heads")
        h, w = trace.grids[name]
        x = buf[item][torch.as_tensor(here - sl.start, device=buf.device)][..., cols].float() / steps
        x = x.permute(0, 2, 1).reshape(len(here) * len(cols), 1, h, w)
        up = F.interpolate(x, size=latent, mode="bicubic", align_corners=False).clamp_(min=0)
        parts.append(up.reshape(len(here), len(cols), *latent).mean(1))
        order.extend(here.tolist())
    if not parts:
        raise AuditorError("no head selected: nothing to aggregate")
    maps = torch.cat(parts)
    if heads is not None and order != wanted.tolist():
        maps = maps[torch.as_tensor([order.index(h) for h in wanted.tolist()], device=maps.device)]
    return maps


def pooled_map(trace, token_indices: Sequence[int], weights: np.ndarray, item: int = 0, size="image") -> torch.Tensor:
    """The weighted mean of the heads' latent maps (``latent_head_maps``), resized bicubically to ``size``.

    With ``daam_weights`` this is DAAM's map of the word (``daam_map``); the other methods only choose other
    weights, so every method shares DAAM's aggregation and differs in its heads alone.

    Returns:
        ``[h, w]`` float32 tensor, in attention per counted step, not normalised.
    """
    w = np.asarray(weights, dtype=np.float32)
    chosen = np.flatnonzero(w)
    if chosen.size == 0:
        raise AuditorError("every head has weight 0: nothing to aggregate")
    maps = latent_head_maps(trace, token_indices, item, chosen)
    wt = torch.as_tensor(w[chosen], device=maps.device)
    word = (wt[:, None, None] * maps).sum(0) / wt.sum()
    out = target_size(trace, size)
    if tuple(out) != tuple(word.shape):
        word = F.interpolate(word[None, None], size=tuple(out), mode="bicubic", align_corners=False)[0, 0]
    return word


def daam_map(trace, token_indices: Sequence[int], item: int = 0, size="image") -> torch.Tensor:
    """A word's map as the daam package computes it by default, from a trace.

    DAAM sums each (layer, head, token) map over the denoising steps, upsamples it bicubically to the latent grid and
    clamps it at 0, averages over every hooked (layer, head), takes a word as the mean of its tokens' maps and
    resizes that bicubically to the image (``expand_as``), where it min-max normalises (``ConceptMap.norm`` here).
    The trace keeps the step sum, so the clamp acts on the summed map as DAAM's does; dividing by the counted steps
    keeps ``raw`` in the units of the other methods and changes nothing after normalisation.

    Args:
        trace: a ``Trace`` holding the generation.
        token_indices: the word's token indices in the text sequence.
        item: which traced image (``Trace.item``).
        size: the output grid: ``"image"``, ``"latent"`` or ``(h, w)``.

    Returns:
        ``[h, w]`` float32 tensor, not normalised.

    Example:
        >>> from auditor.engine.maps import daam_map, normalise
        >>> heat = normalise(daam_map(tr, tr.token_indices("star")).cpu().numpy())  # doctest: +SKIP
    """
    w = daam_weights(trace.head_index.names)
    if not w.any():
        raise AuditorError("the trace holds no layer DAAM aggregates (no down- or up-block cross-attention)")
    return pooled_map(trace, token_indices, w, item, size)


def normalise(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros (it localises nothing)."""
    m = np.asarray(m, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def binarize(m: np.ndarray, policy: str = MASK_POLICY, quantile: float = MASK_QUANTILE) -> np.ndarray:
    """A concept's region: Otsu's threshold on the map (default) or its top ``1 - quantile`` of pixels."""
    m = np.asarray(m, dtype=np.float32)
    if float(m.max() - m.min()) <= 1e-12:
        return np.zeros(m.shape, dtype=bool)
    if policy == "otsu":
        from skimage.filters import threshold_otsu

        try:
            return m > threshold_otsu(m)
        except ValueError:  # a range too small for float32 to hold 256 bins: as flat as a constant map
            return np.zeros(m.shape, dtype=bool)
    if policy == "quantile":
        return m >= np.quantile(m, quantile)
    raise AuditorError(f"unknown mask policy {policy!r}; expected one of {', '.join(MASK_POLICIES)}")


@dataclass
class ConceptMap:
    """One concept's map in one generation."""

    method: str
    token_indices: tuple[int, ...]
    raw: np.ndarray  # [H, W] attention per counted step: the weighted mean over heads of its tokens' mean map
    heads: np.ndarray  # global indices of heads with non-zero weight
    category: str | None = None
    k: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def norm(self) -> np.ndarray:
        return normalise(self.raw)

    def mask(self, policy: str = MASK_POLICY) -> np.ndarray:
        return binarize(self.raw, policy)


@dataclass
class HeadMaps:
    """Per-head maps of one word: ``maps[i]`` belongs to the head named ``names[i]``."""

    names: tuple[str, ...]
    maps: np.ndarray  # [H, h, w]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.maps[self.names.index(name)]

    def __len__(self) -> int:
        return len(self.names)


def concept_map(trace, token_indices: Sequence[int], method: str = "selective", relevance=None,
                category: str | None = None, k: int | None = None, item: int = 0, size="image") -> ConceptMap:
    """The map of a concept given by its token indices (as the concept extractor reports them)."""
    if method != "all_heads" and category is None:
        raise AuditorError(f"method {method!r} needs the concept's category")
    if method != "all_heads" and relevance is not None and not relevance.ranks(category):
        raise AuditorError(f"category {category!r} is not in the relevance matrix, or has no ranked heads")
    if method in ("all_heads", "weighted"):
        k_used = None
    elif k is not None:
        k_used = int(k)
    elif relevance is None:
        raise AuditorError(f"method {method!r} needs a head ranking")
    else:
        k_used = relevance.k_for(category)  # each ranking's own k: per category, or its calibration's
    w = head_weights(method, trace.head_index.total, relevance, category, k_used, trace.head_names)
    raw = pooled_map(trace, token_indices, w, item, size).float().cpu().numpy()
    return ConceptMap(method, tuple(int(t) for t in token_indices), raw, np.flatnonzero(w), category, k_used)


def category_response(trace, token_indices: Sequence[int], relevance, categories: Sequence[str],
                      k: int | None = None, item: int = 0) -> dict[str, float]:
    """Mean attention the word receives within each candidate category's top-k heads.

    The category whose selective heads respond most is how the model read the word (used for misinterpretation)."""
    out = {}
    for cat in categories:
        w = head_weights("selective", trace.head_index.total, relevance, cat, k, trace.head_names)
        out[cat] = float(aggregate(trace, token_indices, w, item, size="latent").mean())
    return out
