"""Sub-pixel atomic-column positions from 2-D Gaussian fits, every column of a frame fitted at once.

Why: a polarisation signal in a HAADF image (the B column's offset inside its A cell, ≈ 0.5 px on the PbTiO₃ scan)
is as small as the error of a peak finder's centre of mass, which is biased towards the brighter neighbours and
rounded by the smoothing. A least-squares fit of

    I(y, x) = a · exp(−((y − y₀)² + (x − x₀)²) / (2 s²)) + b

to the pixels of a small square window around each column is the standard sub-pixel measurement of STEM column
positions (Atomap and StatSTEM do the same). The tails of the neighbouring columns are not left in the window as a
bias (a bright A column pulls a dim B column's fit towards it by a tenth of a pixel): the fit is repeated over a few
sweeps, each subtracting every other column's current Gaussian first — block coordinate descent on the sum of all
the frame's Gaussians. (A sloping background plane in each window instead trades off against the position: on a
rendered frame its 90th-percentile error was 0.09 px against 0.05 px for this.)

The fit is Levenberg–Marquardt, batched: all N windows are one ``(N, P)`` array and each iteration solves N 5×5
normal equations with one ``numpy.linalg.solve``, with a damping factor per column — about a thousand columns take
seconds on two cores, where a ``scipy.optimize.least_squares`` call per column and sweep would take minutes. A column
whose fit leaves the middle of its window, or whose width or amplitude is absurd, is reported as not ``ok``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ColumnFit", "fit_columns"]

#: parameters per column: y₀, x₀ (offsets from the window's centre pixel), s, a, b
_N_PARAMS = 5


@dataclass(frozen=True)
class ColumnFit:
    """Per column: fitted ``positions`` (N, 2) (y, x) in frame pixels, ``sigma`` and ``amplitude`` of the Gaussian,
    ``ok`` (the fit converged inside its window with a sane width and a positive peak)."""

    positions: np.ndarray
    sigma: np.ndarray
    amplitude: np.ndarray
    ok: np.ndarray


def _window_index(shape: tuple[int, int], pix: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """``(flat frame index (N, P), inside (N, P) bool)`` of the (2r+1)² windows around the pixels ``pix`` (N, 2);
    pixels beyond the frame's edge are ``inside`` False (left out of the fit, so a border column is still fitted)."""
    h, w = shape
    off = np.arange(-radius, radius + 1)
    ys, xs = np.broadcast_arrays(pix[:, 0, None, None] + off[None, :, None], pix[:, 1, None, None] + off[None, None, :])
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat = np.clip(ys, 0, h - 1) * w + np.clip(xs, 0, w - 1)
    return flat.reshape(len(pix), -1), inside.reshape(len(pix), -1)


def _gaussian(p: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """``(N, P)``: each column's Gaussian (no background) on offsets ``gy, gx`` from its window's centre pixel."""
    return p[:, 3:4] * np.exp(-((gy[None] - p[:, 0:1]) ** 2 + (gx[None] - p[:, 1:2]) ** 2) / (2 * p[:, 2:3] ** 2))


def _model(p: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The window model (Gaussian + constant) ``(N, P)`` and its Jacobian ``(N, P, 5)`` at parameters ``p``."""
    y0, x0, s, a = p[:, 0:1], p[:, 1:2], p[:, 2:3], p[:, 3:4]
    dy, dx = gy[None] - y0, gx[None] - x0
    r2 = dy**2 + dx**2
    g = np.exp(-r2 / (2 * s**2))
    ag = a * g
    jac = np.stack([ag * dy / s**2, ag * dx / s**2, ag * r2 / s**3, g, np.ones_like(g)], axis=-1)
    return ag + p[:, 4:5], jac


def _levenberg_marquardt(
    p: np.ndarray, values: np.ndarray, weight: np.ndarray, gy: np.ndarray, gx: np.ndarray, *, iterations: int,
    max_sigma: float, radius: int,
) -> np.ndarray:  # fmt: skip
    """``iterations`` damped Gauss–Newton steps on every window at once (a damping factor per column)."""
    p = p.copy()
    damping = np.full(len(p), 1e-2)
    value, jac = _model(p, gy, gx)
    cost = (weight * (value - values) ** 2).sum(1)  # values outside the frame are finite: weight 0 leaves them out
    eye = np.eye(_N_PARAMS)[None]
    for _ in range(iterations):
        jw = jac * weight[..., None]
        normal = np.einsum("npi,npj->nij", jw, jac)
        grad = np.einsum("npi,np->ni", jw, values - value)
        diag = np.einsum("nii->ni", normal)
        step = np.linalg.solve(normal + (damping[:, None] * diag + 1e-9)[:, :, None] * eye, grad[..., None])[..., 0]
        trial = p + step
        trial[:, :2] = np.clip(trial[:, :2], -radius, radius)  # a diverging column stays in its window (not ok)
        trial[:, 2] = np.clip(trial[:, 2], 0.3, max_sigma)
        t_value, t_jac = _model(trial, gy, gx)
        t_cost = (weight * (t_value - values) ** 2).sum(1)
        better = t_cost < cost
        p[better], value[better], jac[better] = trial[better], t_value[better], t_jac[better]
        cost[better] = t_cost[better]
        damping = np.where(better, damping / 3.0, damping * 4.0)
    return p


def fit_columns(
    frame: np.ndarray, centres: np.ndarray, *, radius: int, sigma: float, sweeps: int = 4, iterations: int = 15
) -> ColumnFit:
    """Fit one Gaussian on a constant in the ``(2 radius + 1)²`` window around each of ``centres`` (N, 2) (y, x).

    After a first fit of each window alone, each of ``sweeps`` rounds subtracts every other column's current
    Gaussian (drawn over ±3.5 of its widest allowed s) from the window before fitting again (module docstring).
    ``sigma`` is the starting width in pixels (fits range from 0.3 px to the larger of twice it and ``radius``);
    ``radius`` should hold the column and little more (about 0.3 of the column spacing). The frame's intensity scale
    does not matter."""
    frame = np.asarray(frame, np.float64)
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    if frame.ndim != 2:
        raise ValueError(f"fit_columns needs one 2-D frame; got shape {frame.shape}")
    if radius < 2 or sigma <= 0:
        raise ValueError(f"radius={radius} must be ≥ 2 and sigma={sigma} > 0 (pixels)")
    if len(centres) == 0:
        return ColumnFit(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0, bool))
    scale = float(frame.std()) or 1.0
    image = (frame / scale).reshape(-1)
    pix = np.round(centres).astype(np.int64)
    flat, inside = _window_index(frame.shape, pix, radius)
    values, weight = image[flat], inside.astype(np.float64)
    max_sigma = max(2.0 * sigma, radius)
    reach = max(int(np.ceil(3.5 * max_sigma)), radius)
    r_flat, r_inside = _window_index(frame.shape, pix, reach)
    off = np.arange(-radius, radius + 1, dtype=np.float64)
    gy, gx = (g.reshape(-1) for g in np.meshgrid(off, off, indexing="ij"))
    r_off = np.arange(-reach, reach + 1, dtype=np.float64)
    ry, rx = (g.reshape(-1) for g in np.meshgrid(r_off, r_off, indexing="ij"))
    p = np.zeros((len(centres), _N_PARAMS))
    p[:, :2] = centres - pix
    p[:, 2] = sigma
    low = np.where(inside, values, np.inf).min(axis=1)
    p[:, 4] = np.where(np.isfinite(low), low, 0.0)  # a window wholly off the frame: not ok, but finite
    near = inside & ((gy[None] - p[:, 0:1]) ** 2 + (gx[None] - p[:, 1:2]) ** 2 <= 1.5)
    p[:, 3] = np.maximum(np.where(near, values, 0).sum(1) / np.maximum(near.sum(1), 1) - p[:, 4], 1e-3)
    for sweep in range(sweeps + 1):
        target = values
        if sweep:  # less every column's Gaussian on the frame but the column's own in its window
            rendered = np.zeros_like(image)
            np.add.at(rendered, r_flat[r_inside], _gaussian(p, ry, rx)[r_inside])
            target = values - (rendered[flat] - _gaussian(p, gy, gx))
        p = _levenberg_marquardt(p, target, weight, gy, gx, iterations=iterations, max_sigma=max_sigma, radius=radius)
    on_frame = (pix >= 0).all(axis=1) & (pix < np.array(frame.shape)).all(axis=1)
    sane = (p[:, 2] > 0.3) & (p[:, 2] < max_sigma) & (p[:, 3] > 0)  # a width at its bounds fitted something else
    ok = on_frame & sane & (np.abs(p[:, :2]).max(axis=1) <= radius / 2)
    return ColumnFit(positions=pix + p[:, :2], sigma=p[:, 2].copy(), amplitude=p[:, 3] * scale, ok=ok)
