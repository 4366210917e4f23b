"""Oracle segmenter for shapes-world images: palette colour clustering + connected components + position.

Generated images have no masks, so benchmarks and the v2 defect checks ask this oracle where each prompted object
is. It only uses what the world guarantees (a known palette, flat colours, a uniform background); its own accuracy
on rendered scenes, where masks are exact, is measured by ``bench/zoo_quality.py`` and pinned by a test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.measure import label, regionprops

from auditor.zoo.world import BACKGROUNDS, COLOURS, POSITIONS, STRIPE_DARKEN

# pixels. A smaller region is not an object: the smallest object the world draws shows 61 px (over 5,571 rendered
# objects, occlusion included; the small star 82), and in generated images the regions below this are blended rims
# of a neighbour (a blue shape on a pink ground leaves a purple ring of 10-25 px) or the fruit's leaf. Until
# 2026-12-02 this was 10, which read such rims as objects: "purple present" beside a blue object, "both colours
# present" for a pair whose second object was a smudge (docs/benchmarks.md gives every rate under both).
MIN_AREA = 30
MAX_DIST = 70.0  # RGB distance beyond which a pixel matches no palette colour


@dataclass
class Found:
    present: bool
    mask: np.ndarray  # bool [64, 64]
    colour: str | None = None  # palette colour of the matched region
    position: str | None = None  # nearest named position of its centroid
    centroid: tuple[float, float] | None = None  # (x, y)
    area: int = 0


def _palette():
    names, cols = [], []
    for n, c in COLOURS.items():
        names += [n, n]
        cols += [c, tuple(int(v * STRIPE_DARKEN) for v in c)]  # stripes are a darker shade of the same colour
    return names, np.array(cols, np.float32)


_NAMES, _COLS = _palette()


def background(img: np.ndarray) -> str:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    names = list(BACKGROUNDS)
    cols = np.array([BACKGROUNDS[n] for n in names], np.float32)
    d = np.linalg.norm(border[:, None, :] - cols[None], axis=-1)
    return names[int(np.bincount(d.argmin(1), minlength=len(names)).argmax())]


def colour_labels(img: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per-pixel palette colour index (-1 = background or no match)."""
    px = img.astype(np.float32).reshape(-1, 3)
    bg = np.array(BACKGROUNDS[background(img)], np.float32)
    d = np.linalg.norm(px[:, None, :] - _COLS[None], axis=-1)
    best = d.argmin(1)
    dbest = d[np.arange(len(px)), best]
    dbg = np.linalg.norm(px - bg, axis=-1)
    names = list(COLOURS)
    idx = np.array([names.index(_NAMES[b]) for b in best])
    idx[(dbest > MAX_DIST) | (dbg <= dbest)] = -1
    return idx.reshape(img.shape[:2]), names


def nearest_position(x: float, y: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def regions(img: np.ndarray) -> list[Found]:
    """Every confident single-colour region of the image, largest first."""
    lab, names = colour_labels(img)
    out = []
    for ci, cname in enumerate(names):
        comp = label(lab == ci, connectivity=1)
        for r in regionprops(comp):
            if r.area < MIN_AREA:
                continue
            y, x = r.centroid
            out.append(Found(True, comp == r.label, cname, nearest_position(x, y), (float(x), float(y)), int(r.area)))
    return sorted(out, key=lambda f: -f.area)


def find(img: np.ndarray, wanted: list[tuple[str | None, str | None]]) -> list[Found]:
    """Match each wanted object (colour, position — either may be None) to a distinct region of the image.

    Objects with a colour take the largest unused region of that colour (preferring one at the wanted position);
    objects without a colour take the largest unused region at their position, if any.
    """
    regs = regions(img)
    used: set[int] = set()
    out: list[Found] = []
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i][0] is None, wanted[i][1] is None))
    result: dict[int, Found] = {}
    for i in order:
        colour, pos = wanted[i]
        cands = [j for j, r in enumerate(regs) if j not in used and (colour is None or r.colour == colour)]
        if colour is None and pos is not None:
            cands = [j for j in cands if regs[j].position == pos]
        if pos is not None:
            at = [j for j in cands if regs[j].position == pos]
            cands = at or cands
        if cands:
            used.add(cands[0])
            result[i] = regs[cands[0]]
        else:
            result[i] = Found(False, np.zeros(img.shape[:2], bool))
    out = [result[i] for i in range(len(wanted))]
    return out


def wanted_from_sample(s) -> list[tuple[str | None, str | None]]:
    """What the prompt of a grammar sample asks for, object by object (colour, named position)."""
    out = []
    for obj, m in zip(s.scene.objects, s.mentions):
        colour = s.prompt[m.attributes["colour"][0] : m.attributes["colour"][1]] if "colour" in m.attributes else None
        if obj.shape == "orange":
            colour = "orange"
        out.append((colour, obj.position if m.position_named else None))
    return out
