"""Patches for training: positions agree with the frames, and transforms are exactly the serving path's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import DataError, build_patches, patches_from_config
from streamer.maps.atoms import find_atoms
from streamer.maps.preprocess import prepare_frame
from streamer.maps.spectral import log_magnitude


def _scan(path: Path, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    frames = np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)
    np.save(path, frames)
    return frames


def _lattice_scan(path: Path, n_frames: int = 2) -> np.ndarray:
    yy, xx = np.mgrid[0:70, 0:77]
    frames = np.zeros((n_frames, 70, 77), np.float32)
    rng = np.random.default_rng(5)
    for f in range(n_frames):
        for cy in np.arange(5.0, 66, 9):
            for cx in np.arange(6.0, 72, 9):
                cy2, cx2 = cy + rng.uniform(-0.4, 0.4), cx + rng.uniform(-0.4, 0.4)
                frames[f] += np.exp(-((yy - cy2) ** 2 + (xx - cx2) ** 2) / 3.0).astype(np.float32)
    np.save(path, frames)
    return frames


def test_grid_patch_equals_frame_slice_at_its_position(tmp_path: Path) -> None:
    frames = _scan(tmp_path / "s.npy", (2, 45, 53))
    ps = build_patches(tmp_path / "s.npy", patch=12, stride=5)
    gh, gw = (45 - 12) // 5 + 1, (53 - 12) // 5 + 1
    assert ps.grid == (gh, gw) and ps.images.shape == (2 * gh * gw, 12, 12)
    assert ps.data.kind == "grid" and ps.data.patch == (12, 12) and ps.data.stride == (5, 5)
    assert ps.positions.dtype == np.int64 and ps.frame_shape == (45, 53)
    for f in range(2):  # before preprocessing, the patch is the raw slice; after, the frame-normalised slice
        norm = prepare_frame(torch.from_numpy(frames[f]), ps.data.preprocessing).numpy()
        for i in np.flatnonzero(ps.positions[:, 0] == f)[::7]:
            _, y, x = ps.positions[i]
            np.testing.assert_array_equal(ps.images[i], norm[y : y + 12, x : x + 12])
    assert ps.images.min() >= 0.0 and ps.images.max() <= 1.0
    # frame-major, then row-major: position k of frame 1 is grid cell (k // gw, k % gw)
    k = gh * gw + gw + 2
    assert tuple(ps.positions[k]) == (1, 5, 10)


def test_fft_patches_are_the_spectral_module_output(tmp_path: Path) -> None:
    frames = _scan(tmp_path / "s.npy", (1, 40, 40))
    ps = build_patches(tmp_path / "s.npy", patch=16, stride=8, fft=True)
    assert ps.data.preprocessing.fft == "logmag" and ps.data.preprocessing.patch_norm == "minmax"
    norm = prepare_frame(torch.from_numpy(frames[0]), ps.data.preprocessing)
    _, y, x = ps.positions[4]
    spec = log_magnitude(norm[y : y + 16, x : x + 16]).numpy()
    spec = (spec - spec.min()) / (spec.max() - spec.min())
    np.testing.assert_allclose(ps.images[4], spec, atol=1e-5)


def test_atom_patches_are_centred_on_atoms(tmp_path: Path) -> None:
    frames = _lattice_scan(tmp_path / "lat.npy")
    ps = build_patches(tmp_path / "lat.npy", patch=9, atoms=True, atom_sigma=1.0, atom_min_distance=3)
    assert ps.data.kind == "atoms" and ps.grid is None
    atoms0 = find_atoms(torch.from_numpy(frames[0]), sigma=1.0, min_distance=3, threshold=0.2).numpy()
    centres = ps.centres[ps.positions[:, 0] == 0]
    assert 0 < len(centres) <= len(atoms0)
    # each patch's centre is an atom's sub-pixel centre (not rounded), and its brightest pixel is (within 1 px) the
    # middle
    assert np.abs(centres[:, None] - atoms0[None]).sum(-1).min(axis=1).max() < 1e-5
    assert np.abs(centres - np.round(centres)).max() > 0.05
    for i in range(len(ps))[::5]:
        peak = np.unravel_index(np.argmax(ps.images[i]), (9, 9))
        assert abs(peak[0] - 4) <= 1 and abs(peak[1] - 4) <= 1


def test_stack_keeps_labels_factors_and_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (10, 8, 8))
    np.savez(
        tmp_path / "st.npz",
        images=images,
        labels=np.arange(10) % 3,
        shear=rng.normal(size=10),
        shift=rng.normal(size=(10, 2)),
        class_names=np.array(["a", "b", "c"]),
    )
    ps = build_patches(tmp_path / "st.npz")
    assert ps.images.dtype == np.float32 and ps.images.shape == (10, 8, 8)
    assert ps.images.min() == 0.0 and ps.images.max() == 1.0
    assert ps.data.kind == "stack" and ps.data.preprocessing.frame_norm == "fixed"
    np.testing.assert_array_equal(ps.labels, np.arange(10) % 3)
    assert set(ps.factors) == {"shear", "shift"} and ps.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(ps.positions[:, 0], np.arange(10))
    again = patches_from_config(tmp_path / "st.npz", ps.data)  # what encode does with a run's config
    np.testing.assert_array_equal(again.images, ps.images)


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("missing.npy", {}, "does not exist"),
        ("st.npz", {"atoms": True}, "atom-centred patches need a scan"),
        ("st.npz", {"patch": 16}, "does not match"),
        ("st.npz", {"stride": 4}, "stride=4 applies to scans"),
        ("s.npy", {"patch": 64}, "larger than"),
        ("s.npy", {"patch": 8, "atoms": True, "atom_threshold": 2.0}, "atom_threshold"),
        ("bad.npz", {}, "no 'images'"),
        ("bad.npy", {}, "shape"),
    ],
)
def test_bad_inputs_raise_data_error(tmp_path: Path, name: str, kw: dict, match: str) -> None:
    np.savez(tmp_path / "st.npz", images=np.zeros((3, 8, 8)) + np.arange(8))
    np.savez(tmp_path / "bad.npz", frames=np.zeros((3, 8, 8)))
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5)))
    _scan(tmp_path / "s.npy", (1, 30, 40))
    with pytest.raises(DataError, match=match):
        build_patches(tmp_path / name, **kw)


@pytest.mark.parametrize("window", ["none", "hann"])
def test_spectrum_of_an_empty_batch_is_empty_not_an_fft_error(window: str) -> None:
    """A points-layout frame may keep no atom in bounds; its (0, ph, pw) batch must pass through, not crash MKL."""
    out = log_magnitude(torch.zeros(0, 8, 8), window)  # type: ignore[arg-type]
    assert out.shape == (0, 8, 8) and out.dtype == torch.float32
