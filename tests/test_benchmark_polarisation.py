"""``benchmarks/polarisation.py``: the B-inside-A displacement on perovskite frames rendered with a known one."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from perovskite_image import perovskite, render

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import polarisation

SHAPE = (150, 200)


def _truth(a: np.ndarray, b: np.ndarray, centre: np.ndarray, on_a: bool) -> np.ndarray:
    """The module's definition on the true columns: 4 nearest B around an A, or B less its 4 nearest A."""
    if on_a:
        near = b[np.argsort(np.hypot(*(b - centre).T))[:4]]
        return near.mean(axis=0) - centre
    return centre - a[np.argsort(np.hypot(*(a - centre).T))[:4]].mean(axis=0)


def _interior(p: np.ndarray) -> np.ndarray:
    return p[(p > 30).all(axis=1) & (p < np.array(SHAPE) - 30).all(axis=1)]


def test_recovers_the_displacement_on_either_sublattice_with_a_third_of_the_b_columns_missed() -> None:
    rng = np.random.default_rng(0)
    a, b = perovskite(SHAPE, 24.0, np.array([0.5, -0.3]), seed=0)
    b = b + rng.normal(0.0, 0.3, b.shape)  # a polarisation that varies from cell to cell
    frame = render(SHAPE, a, b, noise=0.005)
    found_b = b[rng.random(len(b)) > 0.33]  # a finder that misses dim B columns ...
    columns = np.concatenate([a, found_b]) + rng.uniform(-0.8, 0.8, (len(a) + len(found_b), 2))  # ... coarsely
    centres = np.concatenate([_interior(a), _interior(found_b)])
    n_a = len(_interior(a))
    got = polarisation.b_displacement(frame, columns, centres + rng.uniform(-0.5, 0.5, centres.shape))
    assert got.on_a[:n_a].all() and not got.on_a[n_a:].any()
    assert got.ok.all()
    truth = np.array([_truth(a, b, c, i < n_a) for i, c in enumerate(centres)])
    assert np.abs(got.vector - truth).max() < 0.05
    assert np.corrcoef(got.vector[:, 0], truth[:, 0])[0, 1] > 0.99


def test_the_brighter_sublattice_is_a_wherever_the_walk_starts() -> None:
    a, b = perovskite(SHAPE, 24.0, 0.0, seed=1)
    frame = render(SHAPE, a, b, noise=0.005)
    for columns in (np.concatenate([a, b]), np.concatenate([b, a])):
        is_a, spacing = polarisation.a_sublattice(frame, columns)
        first_a = bool(np.all(a == columns[0], axis=1).any())
        assert is_a.sum() == len(a) and bool(is_a[0]) == first_a
        assert abs(spacing - 24.0) < 0.5


def test_the_figure_draws_one_arrow_per_sound_measurement(tmp_path: Path) -> None:
    a, b = perovskite(SHAPE, 24.0, np.array([0.4, 0.0]), seed=2)
    frame = render(SHAPE, a, b, noise=0.005)
    measured = polarisation.b_displacement(frame, np.concatenate([a, b]), _interior(a))
    fig = polarisation.displacement_figure(frame, _interior(a), measured, strips=2)
    arrows = [c for ax in fig.axes for c in ax.collections if type(c).__name__ == "Quiver"]
    assert len(arrows) == 2 and sum(len(q.U) for q in arrows) == int(measured.ok.sum()) > 0
    fig.savefig(tmp_path / "field.png")
    assert (tmp_path / "field.png").stat().st_size > 0


def test_neighbour_agreement_tells_a_smooth_field_from_noise() -> None:
    ys, xs = np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij")
    centres = np.stack([ys.ravel(), xs.ravel()], axis=1) * 24.0
    smooth = np.stack([np.sin(centres[:, 1] / 150.0), np.cos(centres[:, 0] / 120.0)], axis=1)
    noise = np.random.default_rng(0).normal(size=smooth.shape)
    assert min(polarisation.neighbour_agreement(centres, smooth, 30.0)) > 0.9
    assert max(np.abs(polarisation.neighbour_agreement(centres, noise, 30.0))) < 0.2


def _polar_scan(path: Path, seed: int) -> Path:
    """A perovskite whose B columns move by a smooth field of domains (±0.8 px, as the PbTiO₃ film's) and brighten
    down the frame (0.25 to 0.9 of A, as the film's A/B contrast changes), saved as one 2-D frame."""
    shape = (264, 336)
    a, b = perovskite(shape, 24.0, 0.0, seed=seed)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 2)
    field = 0.8 * np.stack([np.sin(b[:, 1] / 45 + phase[0]), np.cos(b[:, 0] / 35 + phase[1])], axis=1)
    contrast = 0.25 + 0.65 * b[:, 0] / shape[0]  # B as bright as A at the bottom: the film's changing A/B contrast
    np.save(path, render(shape, a, b + field, amp_b=contrast, noise=0.02, seed=seed))
    return path


def test_a_cells_run_s_z_explains_the_displacement_of_a_scan_it_never_saw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cells recipe (``atomstream train --atoms --atom-sublattice cells`` with its own defaults) trained on one
    rendered scan; on another, with other domains, a cross-validated linear readout of its z gives the measured
    B-column displacement (``polarisation.py --run``, which draws the two fields too). The recipe before (rotation
    latent, 2-D z, Bernoulli: ``--rotation --latent 2 --likelihood bernoulli --class-invariance model``) gives
    0.937 / 0.966 here, under the bar."""
    from atomstream.cli import main

    seen, unseen = _polar_scan(tmp_path / "seen.npy", 0), _polar_scan(tmp_path / "unseen.npy", 1)
    run = tmp_path / "run"
    argv = ["train", "--data", str(seen), "--atoms", "--atom-sublattice", "cells", "--patch", "10", "--classes", "2"]
    assert main([*argv, "--epochs", "150", "--seed", "0", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    assert polarisation.main(["--data", str(unseen), "--out", str(tmp_path / "f.png"), "--run", str(run)]) == 0
    said = capsys.readouterr().out
    found = re.search(r"(\d+) of (\d+) patch centres measured; z explains dy at R ([-\d.]+), dx at R ([-\d.]+)", said)
    assert found is not None, said
    measured, r_dy, r_dx = int(found[1]), float(found[3]), float(found[4])
    assert measured >= 100 and r_dy >= 0.98 and r_dx >= 0.98, said  # 0.997 / 0.997 measured (0.998 / 0.997 at dim z 3)
    assert (tmp_path / "f.png").stat().st_size > 0
