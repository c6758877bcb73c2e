"""Atomic columns in a frame: smoothed local maxima, optionally refined to sub-pixel centres.

Atom-centred patches (the paper's STEM case) need the same centres in training (``models.data``) and serving
(``streamer.pipeline``), so the finder lives here, in pure torch, and runs on the frame's device.

Steps: Gaussian smoothing (separable, reflect-padded, so noise does not make spurious maxima) → normalise the smoothed
frame to [0, 1] (so ``threshold`` is relative and survives gain changes) → a pixel is a peak when it equals the maximum
of its ``(2·min_distance+1)²`` window and exceeds ``threshold`` → ties on a plateau (an atom exactly between two
pixels) keep one pixel → optional centre of mass of the smoothed frame around each peak.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AtomFinderError", "find_atoms", "gaussian_smooth"]


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


def find_atoms(
    frame: torch.Tensor, *, sigma: float, min_distance: int, threshold: float, subpixel: bool = True
) -> torch.Tensor:
    """Centres of bright columns in a 2-D ``frame``: ``(N, 2)`` float32 ``(y, x)`` in frame pixels, row-major order.

    ``min_distance`` is the smallest separation of two peaks in pixels (the maximum-filter half width); ``threshold``
    is relative to the smoothed frame's range (0 keeps every local maximum, 1 only the brightest). ``subpixel``
    refines each peak to the centre of mass in a ``min_distance // 2`` (at least 1) neighbourhood.
    """
    if frame.ndim != 2:
        raise AtomFinderError(f"frame must be 2-D (H, W), got shape {tuple(frame.shape)}")
    if min_distance < 1:
        raise AtomFinderError(f"min_distance={min_distance} must be at least 1 pixel")
    if not 0.0 <= threshold <= 1.0:
        raise AtomFinderError(f"threshold={threshold} is relative to the frame's range; use a value in [0, 1]")
    if sigma < 0:
        raise AtomFinderError(f"sigma={sigma} must be non-negative (0 turns smoothing off)")
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
    if subpixel:
        return _centre_of_mass(smooth, yx, max(1, min_distance // 2)).to(torch.float32)
    return yx.to(torch.float32)
