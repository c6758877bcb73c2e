"""A second, independent drawing of the cards, and a second shape family, for robustness checks.

``sim.cards`` builds each suit from discs and polygons as a signed distance function. Here the shapes come from a
font instead: the DejaVu Sans glyphs that matplotlib ships (♣ ♠ ♦ ♥ for the suits, the letters A K Q J for a
second family), rasterised once at high resolution and then resampled under the same random affine transforms as
the paper (rotation, shift up to 0.1 of the image, shear ±10°, scale 1–1.2). Different outlines, proportions,
stroke details and antialiasing: a model tuned to one generator has no way to have been tuned to this one.

Benchmark-only (matplotlib is a training extra, not a simulator dependency).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.font_manager import FontProperties
from matplotlib.path import Path
from matplotlib.textpath import TextPath
from scipy.ndimage import map_coordinates

__all__ = ["FAMILIES", "GlyphCards", "make_glyph_cards"]

FAMILIES: dict[str, tuple[str, ...]] = {
    "suits": ("\u2663", "\u2660", "\u2666", "\u2665"),  # clubs, spades, diamonds, hearts
    "ranks": ("A", "K", "Q", "J"),
}
NAMES: dict[str, tuple[str, ...]] = {
    "suits": ("clubs", "spades", "diamonds", "hearts"),
    "ranks": ("ace", "king", "queen", "jack"),
}
_RES = 256  # side of the master bitmap of one glyph


@dataclass(frozen=True)
class GlyphCards:
    images: np.ndarray  # (N, H, W) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    angle: np.ndarray  # degrees
    shear: np.ndarray  # degrees
    scale: np.ndarray
    shift: np.ndarray  # (N, 2) pixels (y, x)
    class_names: tuple[str, ...]


def _master(glyph: str) -> np.ndarray:
    """The glyph filled in a ``_RES``² bitmap, centred on its bounding box and fitted to ±0.9 of the square."""
    path = TextPath((0, 0), glyph, size=1.0, prop=FontProperties(family="DejaVu Sans"))
    verts = path.vertices
    lo, hi = verts.min(0), verts.max(0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2
    path = Path((verts - centre) / half * 0.9, path.codes)
    u = (np.arange(_RES) + 0.5) / _RES * 2 - 1
    xx, yy = np.meshgrid(u, -u)  # rows run downwards, y up
    points = np.column_stack([xx.ravel(), yy.ravel()])
    inside = np.zeros(len(points), dtype=bool)
    for ring in path.to_polygons():  # even-odd over the outlines, so the holes of A, Q, ♣'s stem gaps stay open
        inside ^= Path(ring).contains_points(points)
    return inside.reshape(_RES, _RES).astype(np.float32)


def make_glyph_cards(
    n: int,
    *,
    size: int = 28,
    rotation: float = 60.0,
    family: str = "suits",
    max_shift: float = 0.1,
    shear: float = 10.0,
    scale: tuple[float, float] = (1.0, 1.2),
    fill: float = 0.55,
    seed: int = 0,
    supersample: int = 3,
) -> GlyphCards:
    glyphs = FAMILIES[family]
    masters = np.stack([_master(g) for g in glyphs])
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(glyphs)).astype(np.int64)
    angle = rng.uniform(-rotation, rotation, n)
    shr = rng.uniform(-shear, shear, n)
    scl = rng.uniform(*scale, n)
    shift = rng.uniform(-max_shift, max_shift, (n, 2)) * size
    s = supersample
    v = ((np.arange(size * s) + 0.5) / (size * s)) * 2 - 1  # pixel centres in [-1, 1]
    px, py = np.meshgrid(v, -v)
    images = np.empty((n, size, size), np.float32)
    for i in range(n):
        a, sh = np.radians(angle[i]), np.radians(shr[i])
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        m = scl[i] * fill * rot @ np.array([[1.0, np.tan(sh)], [0.0, 1.0]])
        t = np.array([shift[i, 1], -shift[i, 0]]) * 2 / size  # (x, y-up) in normalised units
        q = np.linalg.solve(m, np.stack([px.ravel() - t[0], py.ravel() - t[1]]))  # shape units of each pixel
        rows = (1 - q[1]) / 2 * _RES - 0.5
        cols = (q[0] + 1) / 2 * _RES - 0.5
        hi = map_coordinates(masters[labels[i]], [rows, cols], order=1, mode="constant", cval=0.0)
        images[i] = hi.reshape(size, s, size, s).mean(axis=(1, 3))
    return GlyphCards(images, labels, angle, shr, scl, shift, NAMES[family])
