"""What the generated image shows under a concept's map: the diagnostics' only scores that read pixels.

Attention alone cannot tell "purple" drawn purple from "purple" drawn blue (the word still attends to the object it
describes), nor always a neglected object from a faint one (its map still has a peak somewhere). So every pixel of
the image gets its nearest basic colour term (CIELAB distance to the lexicon's typical sRGB values), the background
is the term most frequent along the image border, and a concept's own map weighs the pixels:
- ``colour_share`` (colour words): the map-weighted share of the named colour among non-background pixels. A
  healthy drawing puts the named colour under the word's map; a colour drawn as another, or not drawn, leaves none.
- ``drawn_share`` (objects): the share of the map's peak region (weights (map / peak)^8: a pixel at half the peak
  counts 1/256) that is not background. A drawn object's map peaks on the object; a neglected one's on empty
  background. On an image without a plain background (a photograph) nearly every pixel is "drawn", so the score
  stays high and never flags: the check helps where backgrounds are plain and is silent elsewhere.
- ``named_share`` (objects a colour word describes): the share of the map's peak region (weighed as ``drawn_share``)
  on pixels of the named colour. Low = where the object's heads look, nothing of its colour is drawn: empty
  background, or another thing (on shapes-v2, a neglected star's map peaks on the other object).
- ``own_drawn_shares`` (every object): the share of the map's peak region on one drawn thing (a connected
  non-background region) that no other object's map peaks on most. High = the word attends to something drawn of
  its own, which contradicts "not drawn" (the diagnostics let it overrule their attention-only and own-colour rules).
  Only on a plain background (``PLAIN``): on a busy image any scenery is a "drawn thing", and the score is None.
Nothing here knows a model or a palette beyond the lexicon's colour terms.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from auditor.lexicon import colour_values


@functools.lru_cache(maxsize=1)
def _terms() -> tuple[tuple[str, ...], np.ndarray, dict[str, int]]:
    """Distinct colour terms (synonyms with one value share a term), their Lab values, and word -> term."""
    from skimage.color import rgb2lab

    names: list[str] = []
    rgbs: list[tuple[int, int, int]] = []
    word_term: dict[str, int] = {}
    for word, rgb in colour_values().items():
        if rgb not in rgbs:
            rgbs.append(rgb)
            names.append(word)
        word_term[word] = rgbs.index(rgb)
    lab = rgb2lab(np.array(rgbs, np.uint8)[None])[0]
    return tuple(names), lab, word_term


def checkable(word: str) -> bool:
    return word.strip().lower() in _terms()[2]


@dataclass(frozen=True)
class Pixels:
    """An image as the checks read it: each pixel's nearest colour term, and which term is the background."""

    terms: np.ndarray  # [H, W] term index
    background: int

    @property
    def drawn(self) -> np.ndarray:
        return self.terms != self.background


def read(image: np.ndarray) -> Pixels:
    """Classify an image's pixels once ([H, W, 3] uint8 RGB); every score of that image reads the result."""
    from skimage.color import rgb2lab

    names, lab, _ = _terms()
    px = rgb2lab(np.asarray(image, np.uint8)[..., :3])
    terms = ((px[:, :, None, :] - lab[None, None]) ** 2).sum(-1).argmin(-1)
    border = np.concatenate([terms[0], terms[-1], terms[:, 0], terms[:, -1]])
    return Pixels(terms, int(np.bincount(border, minlength=len(names)).argmax()))


PEAK_POWER = 8  # drawn_share's sharpening: on cached shapes-v2 generations, 2-16 all separate neglect; 8 best


def _weights(raw: np.ndarray, shape: tuple[int, int], power: float = 1.0) -> np.ndarray:
    from skimage.transform import resize

    w = np.asarray(raw, np.float32) / (float(np.max(raw)) + 1e-12)
    if w.shape != shape:  # maps may sit on a coarser grid than the image
        w = resize(w, shape, order=1)
    return np.clip(w, 0.0, 1.0) ** power


def drawn_share(raw: np.ndarray, px: Pixels) -> float:
    """Share of the map's peak region on non-background pixels."""
    w = _weights(raw, px.terms.shape, PEAK_POWER)
    total = float(w.sum())
    return float((w * px.drawn).sum() / total) if total > 0 else 0.0


def named_share(raw: np.ndarray, word: str, px: Pixels) -> float | None:
    """Share of the map's peak region (weighed as ``drawn_share``) on pixels of the colour ``word`` names; None
    when the lexicon has no value for the word or the background is that colour (nothing to tell)."""
    want = _terms()[2].get(word.strip().lower())
    if want is None or px.background == want:
        return None
    w = _weights(raw, px.terms.shape, PEAK_POWER)
    total = float(w.sum())
    return float((w * (px.terms == want)).sum() / total) if total > 0 else 0.0


PLAIN = 0.5  # least share of background pixels for an image to count as a plain background (shapes: 5th pct 0.60)


def own_drawn_shares(raws: dict[int, np.ndarray], px: Pixels) -> dict[int, float] | None:
    """Per object (key -> its map): the share of its map's peak region on the drawn region it peaks on most, or 0.0
    when another object's map peaks on that same region most; None unless the background is plain. The image's
    regions are labelled once and each map weighed once, however many objects there are."""
    from skimage.measure import label

    if float(np.mean(~px.drawn)) < PLAIN:
        return None
    regions = label(px.drawn, connectivity=1).ravel()  # 0 = background
    n = int(regions.max()) + 1
    shares = {}
    for key, raw in raws.items():
        w = _weights(raw, px.terms.shape, PEAK_POWER).ravel()
        shares[key] = np.bincount(regions, weights=w, minlength=n) / (float(w.sum()) + 1e-12)
        shares[key][0] = 0.0
    best = {key: int(per.argmax()) for key, per in shares.items()}
    return {key: 0.0 if best[key] == 0 or any(best[o] == best[key] for o in best if o != key)
            else float(shares[key][best[key]]) for key in shares}


def colour_scores(raw: np.ndarray, word: str, px: Pixels) -> dict | None:
    """``colour_share`` of ``word`` under its map ``raw`` and ``drawn_colour``, the term most drawn there instead;
    None when the lexicon has no value for the word or the background is the named colour (nothing to tell)."""
    names, _, word_term = _terms()
    want = word_term.get(word.strip().lower())
    if want is None or px.background == want:
        return None
    w = _weights(raw, px.terms.shape)
    fg = px.drawn
    den = float((w * fg).sum())
    if den <= 0:
        return {"colour_share": 0.0, "drawn_colour": names[px.background]}
    per_term = np.bincount(px.terms[fg], weights=w[fg], minlength=len(names)) / den
    rivals = [(per_term[i], names[i]) for i in range(len(names)) if i not in (want, px.background)]
    return {"colour_share": float(per_term[want]), "drawn_colour": max(rivals)[1] if rivals else None}
