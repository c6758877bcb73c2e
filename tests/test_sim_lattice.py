"""Lattice scans agree with their own ground truth: defects, phases, displacement field and drift."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from atomstream.cli import main
from sim.lattice import DEFECT_KINDS, LatticeConfig, stack_truths, synth_frame, synth_scan

CLEAN = LatticeConfig(shape=(160, 224), noise=False, n_defects=12)  # awkward, non-square shape on purpose


def _com(frame: np.ndarray, yx: np.ndarray, radius: int, iterations: int = 4) -> np.ndarray:
    """Background-subtracted centre of mass in a disc, re-centred a few times (how columns are found in practice)."""
    h, w = frame.shape
    c = np.asarray(yx, dtype=np.float64)
    for _ in range(iterations):
        y0, x0 = np.floor(c).astype(int)
        ys, xs = np.mgrid[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        inside = (np.hypot(ys - c[0], xs - c[1]) <= radius) & (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        vals = frame[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)] * inside
        vals = np.clip(vals - vals[inside].min(), 0, None) * inside
        c = np.array([(vals * ys).sum(), (vals * xs).sum()]) / vals.sum()
    return c


def test_config_is_frozen_and_strict() -> None:
    cfg = LatticeConfig()
    assert cfg.shape == (512, 512) and cfg.kind == "square" and cfg.interface and cfg.n_defects == 10
    with pytest.raises(ValidationError):
        LatticeConfig(lattice_konstant=10)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        cfg.n_defects = 3  # type: ignore[misc]


def test_deterministic_by_seed() -> None:
    cfg = LatticeConfig(shape=(96, 128))
    a, ta = synth_scan(cfg, 3, seed=1)
    b, tb = synth_scan(cfg, 3, seed=1)
    c, _ = synth_scan(cfg, 3, seed=2)
    assert a.shape == (3, 96, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta[2].atoms, tb[2].atoms)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(synth_frame(cfg, seed=1)[0], a[0])


def test_defects_are_where_the_truth_says() -> None:
    frame, truth = synth_frame(CLEAN, seed=3)
    assert len(truth.defects) == 12 and set(truth.defect_kinds.tolist()) <= set(range(len(DEFECT_KINDS)))
    np.testing.assert_allclose(truth.atoms[truth.defect_atoms], truth.defects)
    regular = np.setdiff1d(np.flatnonzero(truth.in_view(3)), truth.defect_atoms)

    def peak(yx: np.ndarray) -> float:
        y, x = np.rint(yx).astype(int)
        return float(frame[y, x])

    regular_peaks = {s: np.median([peak(truth.atoms[i]) for i in regular if truth.sublattice[i] == s]) for s in (0, 1)}
    brightest = max(peak(truth.atoms[i]) for i in regular)
    for yx, kind, idx in zip(truth.defects, truth.defect_kinds, truth.defect_atoms, strict=True):
        y, x = np.rint(yx).astype(int)
        name = DEFECT_KINDS[kind]
        if name == "vacancy":
            assert peak(yx) < 0.2 * regular_peaks[truth.sublattice[idx]]
        elif name == "bright":
            win = frame[max(y - 4, 0) : y + 5, max(x - 4, 0) : x + 5]
            assert peak(yx) == win.max() and peak(yx) > 1.3 * brightest
        else:
            assert peak(yx) < 0.6 * regular_peaks[truth.sublattice[idx]]


def test_phase_map_follows_the_interface() -> None:
    cfg = CLEAN.model_copy(update={"interface_row": 0.4, "interface_tilt_deg": 20.0})
    _, truth = synth_frame(cfg, seed=0)
    h, w = cfg.shape
    yy, xx = np.mgrid[0:h, 0:w]
    line = 0.4 * h + np.tan(np.deg2rad(20)) * (xx - w / 2)
    np.testing.assert_array_equal(truth.phase, (yy < line).astype(np.uint8))
    view = truth.in_view()
    pix = np.floor(truth.atoms[view] - truth.displacement[view]).astype(int)
    near_line = np.abs(pix[:, 0] - (0.4 * h + np.tan(np.deg2rad(20)) * (pix[:, 1] - w / 2))) < 1.5
    agree = truth.phase[pix[:, 0], pix[:, 1]] == truth.atom_phase[view]
    assert agree[~near_line].all()
    off = synth_frame(cfg.model_copy(update={"interface": False}), seed=0)[1]
    assert off.phase.max() == 0 and not off.displacement.any()


def test_film_displacement_is_measurable_by_centre_of_mass() -> None:
    cfg = CLEAN.model_copy(update={"n_defects": 0, "polarization_amplitude": 2.0, "polarization_wavelength": 120.0})
    frame, truth = synth_frame(cfg, seed=4)
    film_b = np.flatnonzero(truth.in_view(8) & (truth.sublattice == 1) & (truth.atom_phase == 1))
    sub_b = np.flatnonzero(truth.in_view(8) & (truth.sublattice == 1) & (truth.atom_phase == 0))
    assert len(film_b) > 20 and len(sub_b) > 20
    assert not truth.displacement[sub_b].any()
    nominal = truth.atoms - truth.displacement
    measured = np.array([_com(frame, nominal[i], radius=4) for i in film_b]) - nominal[film_b]
    true = truth.displacement[film_b]
    assert np.abs(true).max() > 0.8  # a real field, not a rounding error
    np.testing.assert_allclose(measured, true, atol=0.15)


def test_drift_moves_the_whole_sample_between_frames() -> None:
    cfg = CLEAN.model_copy(update={"drift": (1.5, -2.5), "drift_jitter": 0.1, "n_defects": 0})
    frames, truths = synth_scan(cfg, 4, seed=0)
    for k in range(1, 4):
        np.testing.assert_allclose(
            truths[k].atoms - truths[0].atoms, np.broadcast_to(truths[k].drift, (len(truths[0].atoms), 2))
        )
        assert not np.array_equal(frames[k], frames[0])
        i = np.flatnonzero(truths[k].in_view(10) & truths[0].in_view(10) & (truths[0].sublattice == 0))[0]
        moved = _com(frames[k], truths[k].atoms[i], 4) - _com(frames[0], truths[0].atoms[i], 4)
        np.testing.assert_allclose(moved, truths[k].drift, atol=0.05)
    np.testing.assert_allclose(truths[0].drift, 0.0)


def test_noise_and_detector_counts() -> None:
    clean, _ = synth_frame(LatticeConfig(shape=(128, 128), noise=False), seed=0)
    noisy, truth = synth_frame(LatticeConfig(shape=(128, 128)), seed=0)
    counts, _ = synth_frame(LatticeConfig(shape=(128, 128), dtype="uint16"), seed=0)
    assert counts.dtype == np.uint16 and noisy.dtype == np.float32
    assert noisy.mean() == pytest.approx(clean.mean(), rel=0.05)
    resid = noisy - clean
    assert 2.0 < resid.std() < 30.0  # shot + read noise, at ~200 counts per unit intensity
    assert truth.line_offsets.std() > 0.1


def test_hexagonal_lattice_and_ripples() -> None:
    cfg = LatticeConfig(
        shape=(128, 160),
        kind="hexagonal",
        lattice_constant=12.0,
        interface=False,
        noise=False,
        n_defects=2,
        defect_kinds=("vacancy",),
    )
    plain, truth = synth_frame(cfg, seed=0)
    rippled, truth_r = synth_frame(cfg.model_copy(update={"ripples": True}), seed=0)
    atoms = truth.atoms[truth.in_view()]
    d = np.linalg.norm(atoms[:, None] - atoms[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(axis=1), 12.0 / np.sqrt(3), rtol=1e-6)
    diff = np.abs(rippled - plain)
    y, x = np.round(truth_r.defects[0]).astype(int)
    near = diff[max(y - 10, 0) : y + 11, max(x - 10, 0) : x + 11].mean()
    assert near > 2.5 * diff.mean() > 0  # the ripples sit around the defects


def test_big_frame_renders_fast() -> None:
    t0 = time.perf_counter()
    frame, _ = synth_frame(LatticeConfig(shape=(1024, 1024)), seed=0)
    assert time.perf_counter() - t0 < 2.0 and frame.shape == (1024, 1024)


def test_cli_writes_frames_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "scan.npy"
    argv = ["synth", "lattice", "--size", "64", "--frames", "3", "--seed", "0", "--out", str(out), "--defects", "4"]
    assert main(argv) == 0
    frames = np.load(out)
    assert frames.shape == (3, 64, 64) and frames.dtype == np.float32
    with np.load(tmp_path / "scan.truth.npz", allow_pickle=False) as z:
        assert z["atoms"].shape[0] == 3 and z["phase"].shape == (3, 64, 64) and z["defects"].shape[:2] == (3, 4)
        cfg = LatticeConfig(**json.loads(str(z["config"])))
    frames2, truths = synth_scan(cfg, 3, seed=0)
    np.testing.assert_array_equal(frames, frames2)
    assert set(stack_truths(truths)) >= {"atoms", "defects", "defect_kinds", "phase", "displacement", "drift"}
    assert main(["synth", "lattice", "--size", "64", "--out", str(tmp_path / "scan.tif")]) == 2
