"""The shapes world: a seeded procedural renderer of 64x64 scenes with exact per-object masks.

Everything the bundled reference model knows comes from here: shapes, colours, sizes, textures, positions and
backgrounds, all drawn without antialiasing so every object's mask is exact (a pixel belongs to one object or to
the background; later objects occlude earlier ones and the masks record what is visible).

"orange" is deliberately polysemous: a colour ("an orange star") and an object, the fruit ("an orange"), drawn
as an orange disc with a green leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage.draw import polygon as _polygon

SIZE = 64

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "hexagon")
FRUIT = "orange"  # the object reading of the polysemous word
OBJECTS = SHAPES + (FRUIT,)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 200),
    "cyan": (30, 200, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
LEAF = (40, 170, 60)  # the fruit's leaf shares the green of the palette
STRIPE_DARKEN = 0.55  # striped objects alternate their colour with a darker shade of it

SIZES = {"small": 7, "big": 12}  # radius in pixels
TEXTURES = ("solid", "striped")
POSITIONS: dict[str, tuple[int, int]] = {  # (x, y) anchor of each named position
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 15),
    "bottom": (32, 49),
    "center": (32, 32),
}
JITTER = 2


@dataclass
class SceneObject:
    shape: str  # one of OBJECTS
    colour: str  # drawn colour (the fruit is always orange)
    size: str = "big"
    texture: str = "solid"
    position: str = "center"
    xy: tuple[int, int] = (32, 32)
    mask: np.ndarray | None = field(default=None, repr=False)  # visible pixels, bool [64, 64]

    @property
    def area(self) -> int:
        return int(self.mask.sum()) if self.mask is not None else 0


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str
    image: np.ndarray | None = field(default=None, repr=False)  # uint8 [64, 64, 3]


def _grid():
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return x.astype(np.float32), y.astype(np.float32)


_X, _Y = _grid()


def _poly(points: np.ndarray) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    rr, cc = _polygon(points[:, 1], points[:, 0], shape=m.shape)
    m[rr, cc] = True
    return m


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Exact boolean mask of a shape centred at (cx, cy) with radius r (no antialiasing)."""
    dx, dy = _X - cx, _Y - cy
    if shape in ("circle", FRUIT):
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "cross":
        t = 0.36 * r
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    if shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + 0.8 * r], [cx + r, cy + 0.8 * r]])
        return _poly(pts)
    if shape == "hexagon":
        ang = np.deg2rad(np.arange(6) * 60.0)
        return _poly(np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1))
    if shape == "star":
        ang = np.deg2rad(-90 + np.arange(10) * 36.0)
        rad = np.where(np.arange(10) % 2 == 0, 1.15 * r, 0.5 * r)
        return _poly(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1))
    if shape == "heart":
        u, v = dx / (1.05 * r), -(dy + 0.1 * r) / (1.05 * r)
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator | None = None) -> Scene:
    """Draw the scene in object order; fills ``scene.image`` and each object's visible ``mask``."""
    rng = rng or np.random.default_rng(0)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    owner = np.full((SIZE, SIZE), -1, np.int16)
    stripes = ((np.arange(SIZE) // 3) % 2 == 1)[:, None] & np.ones((1, SIZE), bool)
    for i, obj in enumerate(scene.objects):
        ax, ay = POSITIONS[obj.position]
        cx, cy = ax + int(rng.integers(-JITTER, JITTER + 1)), ay + int(rng.integers(-JITTER, JITTER + 1))
        obj.xy = (cx, cy)
        r = SIZES[obj.size]
        m = shape_mask(obj.shape, cx, cy, r)
        col = np.array(COLOURS[obj.colour], np.float32)
        img[m] = col.astype(np.uint8)
        if obj.texture == "striped":
            dark = m & stripes
            img[dark] = (col * STRIPE_DARKEN).astype(np.uint8)
        if obj.shape == FRUIT:  # a small leaf on top of the fruit, part of the object
            leaf = ((_X - (cx + 0.25 * r)) / 2.6) ** 2 + ((_Y - (cy - r - 1)) / 1.6) ** 2 <= 1.0
            img[leaf] = LEAF
            m = m | leaf
        owner[m] = i
    for i, obj in enumerate(scene.objects):
        obj.mask = owner == i
    scene.image = img
    return scene
