"""The neighbour step calibration picks: the nearest non-overlapping one, or a farther one that lands on the
lattice's registration — judged on the features the published score reads."""

from __future__ import annotations

import numpy as np
import pytest

from exporters.calibrate import _grid_step, patch_neighbours, score_features
from models.config import DataConfig
from models.data import PatchSet
from streamer.maps.novelty import contrast, encoder_features, part_features, robust_scale

GRID = (40, 40)


def _grid_patches(patch: int = 16, stride: int = 4) -> PatchSet:
    gh, gw = GRID
    iy, ix = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    positions = np.stack([np.zeros(gh * gw, np.int64), iy.ravel() * stride, ix.ravel() * stride], axis=1)
    data = DataConfig(kind="grid", patch=(patch, patch), stride=(stride, stride))
    images = np.zeros((gh * gw, patch, patch), np.float32)
    return PatchSet(images=images, positions=positions, data=data, grid=GRID)


def _periodic_features(period: float, noise: float, seed: int = 0) -> np.ndarray:
    """Features that repeat every ``period`` grid cells (a registration), with a little noise."""
    iy, ix = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    phase = [2 * np.pi * iy.ravel() / period, 2 * np.pi * ix.ravel() / period]
    f = np.stack([g(p) for p in phase for g in (np.cos, np.sin)], axis=1)
    return f + noise * np.random.default_rng(seed).standard_normal(f.shape)


def test_a_step_on_the_registration_wins_and_without_one_the_nearest_non_overlapping_step_stays() -> None:
    patches = _grid_patches()  # 16-px patches every 4 px: step 4 is the first that does not overlap
    assert _grid_step(patches, _periodic_features(6, noise=0.05)) == (6, 1)
    assert _grid_step(patches, _periodic_features(5, noise=0.05)) == (5, 1)
    iid = np.random.default_rng(1).standard_normal((GRID[0] * GRID[1], 4))
    assert _grid_step(patches, iid) == (4, 1)  # more neighbours alone (a steadier median) is not "clearly better"


def test_a_period_between_two_whole_steps_compares_with_both() -> None:
    """A registration every 6.5 cells: steps 6 and 7 are each half a cell off it, both together straddle it."""
    patches = _grid_patches()
    features = _periodic_features(6.5, noise=0.05)
    assert _grid_step(patches, features) == (6, 2)
    scale = robust_scale(features)

    def median(step: int, span: int) -> float:
        return float(np.median(contrast(features, patch_neighbours(patches, grid_step=step, grid_span=span), scale)))

    assert median(6, 2) < 0.5 * min(median(6, 1), median(7, 1))


def test_the_joint_score_is_judged_on_the_redrawing_and_the_others_on_the_encoder() -> None:
    n = GRID[0] * GRID[1]
    rng = np.random.default_rng(2)
    outputs = {
        "z_loc": rng.standard_normal((n, 2)),
        "z_scale": np.exp(rng.standard_normal((n, 2))),
        "recon_nll": rng.standard_normal(n),
        "recon_residual": _periodic_features(6, noise=0.05).reshape(n, 2, 2),
    }
    features, parts = encoder_features(outputs), part_features(outputs)
    joint = score_features("joint", features, parts)
    assert joint.shape == (n, 5)  # the likelihood and the 4 residual values; nothing of the encoder's
    np.testing.assert_array_equal(joint[:, 1:], outputs["recon_residual"].reshape(n, 4))
    assert score_features("contrast", features, parts).shape == (n, 4)  # z and log z-scale
    # the residual here lands on a 6-cell registration that the encoder's outputs do not have
    patches = _grid_patches()
    assert _grid_step(patches, joint) in {(5, 2), (6, 1), (6, 2)}  # step 6, alone or with a neighbour step
    assert _grid_step(patches, score_features("contrast", features, parts)) == (4, 1)
    with pytest.raises(ValueError, match="redrawing"):
        score_features("joint", features, {})


def test_a_given_span_takes_the_nearest_non_overlapping_rings_and_the_served_index_follows() -> None:
    """``atomstream export --defect-span N``: the N rings of cells from the first step whose patches do not overlap,
    whatever calibration would have chosen; the pipeline serves the same neighbours (the manifest says which)."""
    import torch

    from exporters.calibrate import calibrate_novelty
    from models.config import ModelConfig
    from models.data import scan_patches
    from models.jtrvae import JTrVAE
    from sim.lattice import LatticeConfig, synth_scan
    from streamer.maps.novelty import grid_neighbours

    frames, _ = synth_scan(LatticeConfig(shape=(96, 96), n_defects=0), 1, seed=0)
    data = DataConfig(kind="grid", patch=(16, 16), stride=(8, 8))
    patches = scan_patches(frames, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = JTrVAE(ModelConfig(patch=(16, 16), encoder_hidden=(16,), decoder_hidden=(16,))).eval()
    stats = calibrate_novelty(model, patches, kind="residual", k=4.5, span=3)
    assert (stats.grid_step, stats.grid_span, stats.k) == (2, 3, 4.5)  # 16-px patches every 8 px: step 2 first
    ring = grid_neighbours(patches.grid, 2, 3)
    assert ring.shape[1] == 24
    centre = 5 * patches.grid[1] + 5  # an interior cell: its neighbours lie 2, 3 and 4 cells away, in 8 directions
    rows, cols = np.divmod(ring[centre], patches.grid[1])
    assert sorted(set(np.maximum(np.abs(rows - 5), np.abs(cols - 5)).tolist())) == [2, 3, 4]
    with pytest.raises(ValueError, match="span=5"):
        calibrate_novelty(model, patches, span=5)
    small = scan_patches(np.ascontiguousarray(frames[:, :64, :64]), data)  # 7×7 cells: rings 2-5 do not fit
    with pytest.raises(ValueError, match="7×7 cells is too small to compare with 4 rings"):
        calibrate_novelty(model, small, span=4)
