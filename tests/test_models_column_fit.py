"""``models.column_fit``: 2-D Gaussian column positions on perovskite frames rendered with known sub-pixel shifts."""

from __future__ import annotations

import time

import numpy as np
import pytest
from perovskite_image import perovskite, render

from models.column_fit import fit_columns


def _frame(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(frame, every column's true position): B columns moved by up to ±0.8 px each, A columns jittered."""
    shift = np.random.default_rng(seed + 1).uniform(-0.8, 0.8, (5 * 7, 2))
    a, b = perovskite((140, 190), 24.0, shift, seed=seed)
    return render((140, 190), a, b, noise=noise, seed=seed), np.concatenate([a, b])


def test_recovers_every_column_to_a_twentieth_of_a_pixel_from_a_pixel_away() -> None:
    frame, truth = _frame(noise=0.005)
    start = truth + np.random.default_rng(2).uniform(-1.0, 1.0, truth.shape)
    t0 = time.perf_counter()
    fit = fit_columns(frame, start, radius=7, sigma=3.0)
    assert time.perf_counter() - t0 < 5.0  # batched: a frame's columns take well under a second here
    assert fit.ok.all()
    assert np.abs(fit.positions - truth).max() < 0.05
    assert np.allclose(fit.sigma[: len(truth) // 2], 3.5, atol=0.1)


def test_the_neighbours_subtracted_remove_the_pull_of_the_bright_columns() -> None:
    """Without noise the joint fit is exact; one window at a time (no sweeps) is pulled by the A columns' tails."""
    frame, truth = _frame(noise=0.0, seed=3)
    joint = fit_columns(frame, truth, radius=7, sigma=3.0)
    alone = fit_columns(frame, truth, radius=7, sigma=3.0, sweeps=0)
    assert np.abs(joint.positions - truth).max() < 0.005
    assert np.abs(alone.positions - truth).max() > 0.02


def test_a_column_off_the_frame_is_not_ok_and_the_rest_are_unaffected() -> None:
    frame, truth = _frame(noise=0.005, seed=4)
    fit = fit_columns(frame, np.concatenate([truth, [[-30.0, 50.0]]]), radius=7, sigma=3.0)
    assert not fit.ok[-1] and fit.ok[:-1].all()
    assert np.abs(fit.positions[:-1] - truth).max() < 0.05
    assert fit_columns(frame, np.zeros((0, 2)), radius=7, sigma=3.0).positions.shape == (0, 2)


@pytest.mark.parametrize(("radius", "sigma"), [(1, 3.0), (5, 0.0)])
def test_a_bad_window_or_width_is_refused_with_the_value(radius: int, sigma: float) -> None:
    with pytest.raises(ValueError, match=f"radius={radius}"):
        fit_columns(np.zeros((20, 20)), np.array([[10.0, 10.0]]), radius=radius, sigma=sigma)
