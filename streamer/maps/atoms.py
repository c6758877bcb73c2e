"""Atomic columns in a frame: smoothed local maxima, optionally refined to sub-pixel centres.

Atom-centred patches (the paper's STEM case) need the same centres in training (``models.data``) and serving
(``streamer.maps.pipeline``), so the finder lives here, in pure torch, and runs on the frame's device.

Steps: Gaussian smoothing (separable, reflect-padded, so noise does not make spurious maxima) → normalise the smoothed
frame to [0, 1] (so ``threshold`` is relative and survives gain changes) → a pixel is a peak when it equals the maximum
of its ``(2·min_distance+1)²`` window and exceeds ``threshold`` → ties on a plateau (an atom exactly between two
pixels) keep one pixel → optional centre of mass of the smoothed frame around each peak → optionally one sublattice.

**One sublattice** (``sublattice="brightest"``): atom-centred patches on a lattice with two kinds of column (the A and
B sites of a perovskite, Mo and S₂ in MoS₂) split into classes by sublattice, which is not what a user asks the
classes for. Each column's intensity is compared with the median of its 4 nearest columns; when that local contrast is
clearly bimodal (two-group split by Otsu's criterion, Ashman's D ≥ 2, each group ≥ 20 %) the brighter group's
lattice spacing ``d`` (median nearest-neighbour distance) is measured and every column whose
nearest bright column (other than itself) is at least ``0.85·d`` away is kept: bright sites and whatever sits on
their lattice — a dark dopant or a vacancy-like dim column on the bright sublattice stays (it is selected by where
it is, not by how bright it is), while the other sublattice (nearest bright column at d/√2 in a perovskite, d/√3
in a honeycomb) goes. A unimodal frame keeps every column.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

__all__ = ["SUBLATTICES", "AtomFinderError", "Sublattice", "find_atoms", "gaussian_smooth", "one_sublattice"]

Sublattice = Literal["all", "brightest"]
SUBLATTICES: tuple[str, ...] = ("all", "brightest")
_BIMODAL_D = 2.0
_SAME_SUBLATTICE = 0.85
_LOCAL = 4
_MIN_SHARE = 0.2


class AtomFinderError(ValueError):
    """A frame or a parameter the atom finder cannot work with."""


def gaussian_smooth(frame: torch.Tensor, sigma: float) -> torch.Tensor:
    """A 2-D frame blurred by a Gaussian of width ``sigma`` pixels (two 1-D passes, edges reflected)."""
    x = frame.to(torch.float32) if not frame.is_floating_point() else frame
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3.0 * sigma))
    radius = min(radius, x.shape[0] - 1, x.shape[1] - 1)
    if radius < 1:
        return x.clone()
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    img = x[None, None]
    img = F.pad(img, (radius, radius, radius, radius), mode="reflect")
    img = F.conv2d(img, kernel.view(1, 1, -1, 1))
    img = F.conv2d(img, kernel.view(1, 1, 1, -1))
    return img[0, 0]


def _normalise(x: torch.Tensor) -> torch.Tensor | None:
    lo, hi = x.amin(), x.amax()
    span = float(hi - lo)
    if not math.isfinite(span) or span <= 0:
        return None
    return (x - lo) / span


def _one_per_plateau(values: torch.Tensor, peaks: torch.Tensor, window: int) -> torch.Tensor:
    """Among peaks that share a window (which means they are equal: each is the window's maximum) keep the last."""
    h, w = values.shape
    index = torch.arange(h * w, device=values.device, dtype=torch.float64).view(h, w)
    tagged = torch.where(peaks, index, torch.full_like(index, -1.0))
    best = F.max_pool2d(tagged[None, None], window, stride=1, padding=window // 2)[0, 0]
    return peaks & (best == tagged)


def _centre_of_mass(values: torch.Tensor, peaks_yx: torch.Tensor, radius: int) -> torch.Tensor:
    """Each peak moved to the centre of mass of ``values`` (minus the local minimum) in a square around it."""
    h, w = values.shape
    offsets = torch.arange(-radius, radius + 1, device=values.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    ys = peaks_yx[:, 0, None] + dy.reshape(1, -1)
    xs = peaks_yx[:, 1, None] + dx.reshape(1, -1)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    vals = values[ys.clamp(0, h - 1), xs.clamp(0, w - 1)]
    floor = torch.where(inside, vals, torch.full_like(vals, math.inf)).amin(dim=1, keepdim=True)
    weights = torch.where(inside, vals - floor, torch.zeros_like(vals))
    total = weights.sum(dim=1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    cy = (weights * ys.to(values.dtype)).sum(dim=1) / safe
    cx = (weights * xs.to(values.dtype)).sum(dim=1) / safe
    refined = torch.stack([cy, cx], dim=1)
    return torch.where((total > 0)[:, None], refined, peaks_yx.to(values.dtype))


def one_sublattice(centres: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the columns on the brighter sublattice (see the module docstring); all when not bimodal."""
    n = centres.shape[0]
    keep = np.ones(n, dtype=bool)
    if n < 8:
        return keep
    pts = np.asarray(centres, np.float64)
    v = np.asarray(values, np.float64)
    # each column against its nearest neighbours: the two sublattices differ locally, even where a bright layer
    # (the substrate) makes the whole frame's intensities bimodal for another reason
    _, idx = cKDTree(pts).query(pts, k=min(_LOCAL + 1, n))
    r = v - np.median(v[idx[:, 1:]], axis=1)
    bright = _upper_mode(r)
    if bright is None:
        return keep
    tree = cKDTree(pts[bright])
    d_bright = float(np.median(tree.query(pts[bright], k=2)[0][:, 1]))
    dist, _ = tree.query(pts, k=2)
    nearest_other = np.where(bright, dist[:, 1], dist[:, 0])
    return nearest_other >= _SAME_SUBLATTICE * d_bright


def _upper_mode(r: np.ndarray) -> np.ndarray | None:
    """The upper group of a clearly two-group 1-D sample (Otsu split, Ashman's D >= 2, each >= 20 %), else None."""
    n = r.size
    v = np.sort(r)
    k = np.arange(1, n)
    left = np.cumsum(v)[:-1]
    mean_lo, mean_hi = left / k, (v.sum() - left) / (n - k)
    best = int(np.argmax(k * (n - k) * (mean_hi - mean_lo) ** 2))
    lo, hi = v[: best + 1], v[best + 1 :]
    if min(lo.size, hi.size) < _MIN_SHARE * n:
        return None
    spread = math.sqrt((lo.var() + hi.var()) / 2)
    if spread <= 0 or (hi.mean() - lo.mean()) / spread < _BIMODAL_D:
        return None
    return r > v[best]


def find_atoms(
    frame: torch.Tensor,
    *,
    sigma: float,
    min_distance: int,
    threshold: float,
    subpixel: bool = True,
    sublattice: Sublattice = "all",
) -> torch.Tensor:
    """Centres of bright columns in a 2-D ``frame``: ``(N, 2)`` float32 ``(y, x)`` in frame pixels, row-major order.

    ``min_distance`` is the smallest separation of two peaks in pixels (the maximum-filter half width); ``threshold``
    is relative to the smoothed frame's range (0 keeps every local maximum, 1 only the brightest). ``subpixel``
    refines each peak to the centre of mass in a ``min_distance // 2`` (at least 1) neighbourhood. ``sublattice``
    "brightest" keeps one sublattice (module docstring).
    """
    if frame.ndim != 2:
        raise AtomFinderError(f"frame must be 2-D (H, W), got shape {tuple(frame.shape)}")
    if min_distance < 1:
        raise AtomFinderError(f"min_distance={min_distance} must be at least 1 pixel")
    if not 0.0 <= threshold <= 1.0:
        raise AtomFinderError(f"threshold={threshold} is relative to the frame's range; use a value in [0, 1]")
    if sigma < 0:
        raise AtomFinderError(f"sigma={sigma} must be non-negative (0 turns smoothing off)")
    if sublattice not in SUBLATTICES:
        raise AtomFinderError(f"sublattice={sublattice!r} must be one of {list(SUBLATTICES)}")
    empty = torch.zeros((0, 2), dtype=torch.float32, device=frame.device)
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        return empty
    smooth = _normalise(gaussian_smooth(frame, sigma))
    if smooth is None:
        return empty
    window = 2 * min_distance + 1
    local_max = F.max_pool2d(smooth[None, None], window, stride=1, padding=min_distance)[0, 0]
    peaks = (smooth >= local_max) & (smooth > threshold)
    peaks = _one_per_plateau(smooth, peaks, window)
    yx = peaks.nonzero()
    if yx.shape[0] == 0:
        return empty
    if sublattice == "brightest":
        values = smooth[yx[:, 0], yx[:, 1]].to("cpu", torch.float64).numpy()
        keep = one_sublattice(yx.to("cpu", torch.float64).numpy(), values)
        yx = yx[torch.from_numpy(keep).to(yx.device)]
    if subpixel:
        return _centre_of_mass(smooth, yx, max(1, min_distance // 2)).to(torch.float32)
    return yx.to(torch.float32)
