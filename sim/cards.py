"""The paper's *cards* data set: the four suits under random affine transforms, with every true parameter.

Each suit is a union of discs and convex polygons, described by a signed distance function (SDF) in "shape units"
(the card spans about ±1). A pixel's value is its area coverage, approximated by a one-pixel-wide linear ramp of the
SDF (the classic analytic antialiasing), averaged over ``supersample``² sub-pixel samples. That keeps edges smooth at
24×24 without any font, and the whole batch is rendered with numpy broadcasting, no per-image Python loop.

Geometry (why each suit looks the way it does):

* diamond — a rhombus, taller than wide, so its second-moment orientation measures the rotation angle;
* heart — two discs over a downward triangle;
* spade — the heart upside down, smaller, plus a stem;
* club — three equal discs at 120° around a centre, plus a stem: the three-fold lobes are what makes ±120°
  rotations hard for the paper's models, so they are kept exact.

Transform of one image (``p`` a pixel centre in normalised coordinates, x right and y *up*, both in [-1, 1]):
``p = t + M q`` with ``M = scale · R(angle) · Sh(shear)``, ``R`` a counter-clockwise rotation *as displayed*,
``Sh = [[1, tan(shear)], [0, 1]]`` a horizontal shear, ``q = FILL · (shape units)``, and ``t`` the shift. Angles and
shears are in degrees; shifts are in pixels as ``(shift_y, shift_x)`` with rows growing downwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import numpy as np

__all__ = ["CLASS_NAMES", "Cards", "load_cards", "make_cards", "save_npz"]

CLASS_NAMES: tuple[str, ...] = ("clubs", "spades", "diamonds", "hearts")

#: Half-extent of an untransformed card in normalised image units: the card is ~62 % of the image tall, so it
#: stays inside the frame under scale 1.2, a 0.1 shift and any rotation.
FILL = 0.62

_CHUNK = 256  # images per vectorised block: bounds memory at ~CHUNK·H·W·ss² floats


@dataclass(frozen=True)
class Cards:
    """A batch of cards and the true transform of each image (see the module docstring for conventions)."""

    images: np.ndarray  # (N, H, W) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64, index into class_names
    angle: np.ndarray  # (N,) float64, degrees, counter-clockwise as displayed
    shear: np.ndarray  # (N,) float64, degrees
    scale: np.ndarray  # (N,) float64
    shift: np.ndarray  # (N, 2) float64, pixels, (shift_y, shift_x), rows downwards
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def shift_y(self) -> np.ndarray:
        return self.shift[:, 0]

    @property
    def shift_x(self) -> np.ndarray:
        return self.shift[:, 1]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ---------------------------------------------------------------- signed distance functions (shape units)
def _disc(u: np.ndarray, v: np.ndarray, cu: float, cv: float, r: float) -> np.ndarray:
    return np.hypot(u - cu, v - cv) - r


def _convex(u: np.ndarray, v: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Max of signed edge distances: exact inside, a lower bound outside — good enough for a 1-px ramp."""
    pts = np.asarray(vertices, dtype=np.float64)
    area2 = np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
    sign = 1.0 if area2 > 0 else -1.0  # make the outward normal point out for either winding
    out = None
    for (u0, v0), (u1, v1) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
        eu, ev = u1 - u0, v1 - v0
        length = np.hypot(eu, ev)
        nu, nv = sign * ev / length, -sign * eu / length
        d = (u - u0) * nu + (v - v0) * nv
        out = d if out is None else np.maximum(out, d)
    assert out is not None
    return out


_STEM = [(0.0, -0.15), (-0.28, -0.95), (0.28, -0.95)]


def _club(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cv, ring, r = 0.12, 0.44, 0.32
    d = _disc(u, v, 0.0, cv, 0.2)  # fills the gap between the lobes
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3
        d = np.minimum(d, _disc(u, v, ring * np.cos(a), cv + ring * np.sin(a), r))
    return np.minimum(d, _convex(u, v, _STEM))


def _spade(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    d = np.minimum(_disc(u, v, -0.36, -0.12, 0.4), _disc(u, v, 0.36, -0.12, 0.4))
    d = np.minimum(d, _convex(u, v, [(-0.74, -0.02), (0.74, -0.02), (0.0, 0.95)]))
    return np.minimum(d, _convex(u, v, _STEM))


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _convex(u, v, [(0.0, 0.97), (-0.68, 0.0), (0.0, -0.97), (0.68, 0.0)])


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    d = np.minimum(_disc(u, v, -0.42, 0.38, 0.47), _disc(u, v, 0.42, 0.38, 0.47))
    return np.minimum(d, _convex(u, v, [(-0.86, 0.2), (0.86, 0.2), (0.0, -0.88)]))


_SDF = (_club, _spade, _diamond, _heart)


# ---------------------------------------------------------------- rendering
def _render(
    labels: np.ndarray,
    angle: np.ndarray,
    shear: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    size: int,
    supersample: int,
) -> np.ndarray:
    """Coverage images for one block of parameters; all images share the sub-pixel grid."""
    n, ss = labels.shape[0], supersample
    half = size / 2.0
    offs = (np.arange(size * ss) + 0.5) / ss  # sub-pixel centres, in pixels
    x = (offs - half) / half
    y = -(offs - half) / half  # normalised, y up
    # p - t for every image: (n, Y, X)
    px = x[None, None, :] - (shift[:, 1] / half)[:, None, None]
    py = y[None, :, None] + (shift[:, 0] / half)[:, None, None]
    th, sh = np.deg2rad(angle), np.deg2rad(shear)
    c, s, t = np.cos(th), np.sin(th), np.tan(sh)
    # q = Sh⁻¹ R⁻¹ (p - t) / scale, then to shape units (divide by FILL)
    k = (1.0 / (scale * FILL))[:, None, None]
    ru = c[:, None, None] * px + s[:, None, None] * py
    rv = -s[:, None, None] * px + c[:, None, None] * py
    u = (ru - t[:, None, None] * rv) * k
    v = rv * k
    sdf = np.empty_like(u)
    for cls, fn in enumerate(_SDF):
        m = labels == cls
        if m.any():
            sdf[m] = fn(u[m], v[m])
    # one sub-pixel in shape units: the ramp width that turns the SDF into coverage
    ramp = ((2.0 / (size * ss)) / (scale * FILL))[:, None, None]
    cov = np.clip(0.5 - sdf / ramp, 0.0, 1.0)
    if ss > 1:
        cov = cov.reshape(n, size, ss, size, ss).mean(axis=(2, 4))
    return cov.astype(np.float32)


def make_cards(
    n: int,
    *,
    size: int = 48,
    rotation: float = 60.0,
    max_shift: float = 0.1,
    shear: float = 10.0,
    scale: tuple[float, float] = (1.0, 1.2),
    seed: int | np.random.Generator | None = 0,
    supersample: int = 2,
) -> Cards:
    """Draw ``n`` cards with balanced random suits and the paper's random affine transforms.

    ``rotation`` R: angle ~ U(-R, R) degrees; ``max_shift``: each shift component ~ U(-m, m)·size pixels;
    ``shear`` S: shear ~ U(-S, S) degrees; ``scale`` ~ U(lo, hi). Setting any range to zero switches that factor
    off, which is how tests isolate one factor. Randomness comes only from ``seed`` (no global state).
    """
    if n < 0 or size < 4 or supersample < 1:
        raise ValueError(f"need n >= 0, size >= 4 and supersample >= 1; got n={n}, size={size}, ss={supersample}")
    if not 0.0 <= max_shift < 0.5:
        raise ValueError(f"max_shift is a fraction of the image in [0, 0.5); got {max_shift}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.int64)
    angle = rng.uniform(-rotation, rotation, n)
    shear_deg = rng.uniform(-shear, shear, n)
    scl = rng.uniform(scale[0], scale[1], n)
    shift = rng.uniform(-max_shift, max_shift, (n, 2)) * size
    images = np.empty((n, size, size), dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        images[sl] = _render(labels[sl], angle[sl], shear_deg[sl], scl[sl], shift[sl], size, supersample)
    return Cards(images=images, labels=labels, angle=angle, shear=shear_deg, scale=scl, shift=shift)


def save_npz(path: str | PathLike[str], cards: Cards) -> None:
    """Write the batch as plain arrays (no Python objects): images, labels, angle, shear, scale, shift, class_names."""
    np.savez_compressed(
        path,
        images=cards.images,
        labels=cards.labels,
        angle=cards.angle,
        shear=cards.shear,
        scale=cards.scale,
        shift=cards.shift,
        class_names=np.array(cards.class_names, dtype=np.str_),
    )


def load_cards(path: str | PathLike[str]) -> Cards:
    """Read a file written by :func:`save_npz` back into :class:`Cards`."""
    with np.load(path, allow_pickle=False) as z:
        return Cards(
            images=z["images"],
            labels=z["labels"],
            angle=z["angle"],
            shear=z["shear"],
            scale=z["scale"],
            shift=z["shift"],
            class_names=tuple(str(c) for c in z["class_names"]),
        )
