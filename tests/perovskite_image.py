"""A HAADF-like perovskite frame rendered here with known sub-pixel column positions (test helper).

Bright A columns on a square lattice of spacing ``d`` and dim B columns at the cell centres, each B moved by a known
displacement, Gaussian columns and noise: what the PbTiO₃ scan looks like, with the truth known to 1e-12 px."""

from __future__ import annotations

import numpy as np


def render(
    shape: tuple[int, int], a: np.ndarray, b: np.ndarray, *, sigma_a: float = 3.5, sigma_b: float = 3.0,
    amp_b: float | np.ndarray = 0.4, noise: float = 0.005, seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """``shape`` frame: amplitude-1 Gaussians of width ``sigma_a`` at ``a`` (N, 2), ``amp_b`` ones of ``sigma_b`` at
    ``b`` (one amplitude, or one per B column), on a 0.1 background, plus normal noise of ``noise``."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    frame = np.full(shape, 0.1)
    for centres, amp, s in ((a, 1.0, sigma_a), (b, amp_b, sigma_b)):
        for (y, x), k in zip(centres, np.broadcast_to(np.asarray(amp, np.float64), len(centres)), strict=True):
            frame += k * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s**2))
    return frame + np.random.default_rng(seed).normal(0.0, noise, shape)


def perovskite(
    shape: tuple[int, int], spacing: float, shift: np.ndarray | float, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)``: A columns on a lattice jittered by ±0.4 px, B at each cell centre plus ``shift`` ((M, 2) per B
    column or one number for all) plus ±0.1 px; only columns at least 6 px inside the frame."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(8.0, shape[0] - 6, spacing), np.arange(9.0, shape[1] - 6, spacing), indexing="ij")
    a = np.stack([ys.ravel(), xs.ravel()], axis=1) + rng.uniform(-0.4, 0.4, (ys.size, 2))
    cells = np.stack([ys[:-1, :-1].ravel(), xs[:-1, :-1].ravel()], axis=1) + spacing / 2
    b = cells + shift + rng.uniform(-0.1, 0.1, cells.shape)
    return a, b
