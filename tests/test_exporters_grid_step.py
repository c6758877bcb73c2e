"""The neighbourhood calibration picks — the nearest rings of cells whose patches do not overlap, more of them when
the training scan's outliers clearly stand out more — and which parts of the redrawing the default score keeps."""

from __future__ import annotations

import numpy as np
import pytest

from exporters.calibrate import (
    _LIKELIHOOD_EXCESS,
    _grid_span,
    _keeps_likelihood,
    _tail,
    patch_neighbours,
    score_features,
)
from models.baselines import roc_auc
from models.config import DataConfig
from models.data import PatchSet
from streamer.maps.novelty import (
    NoveltyStats,
    contrast,
    encoder_features,
    fit_novelty,
    part_features,
    robust_scale,
)

GRID = (48, 48)


def _grid_patches(patch: int = 16, stride: int = 4) -> PatchSet:
    gh, gw = GRID
    iy, ix = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    positions = np.stack([np.zeros(gh * gw, np.int64), iy.ravel() * stride, ix.ravel() * stride], axis=1)
    data = DataConfig(kind="grid", patch=(patch, patch), stride=(stride, stride))
    images = np.zeros((gh * gw, patch, patch), np.float32)
    return PatchSet(images=images, positions=positions, data=data, grid=GRID)


def _planted(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``features`` with 1 % of the patches shifted by 3 (the training scan's defects), and which."""
    rng = np.random.default_rng(seed)
    out = np.zeros(features.shape[0], bool)
    out[rng.choice(features.shape[0], features.shape[0] // 100, replace=False)] = True
    f = features.copy()
    f[out] += 3.0
    return f, out


def test_wider_rings_only_when_the_training_outliers_clearly_stand_out_more_in_them() -> None:
    """A registration every 8 cells puts the first ring (4 cells out) on the opposite phase: each patch differs from
    all 8 of its neighbours and the planted outliers drown; the rings 4–7 together hold patches in phase, and the
    rule takes them. Without a registration more rings are only a steadier median: the one ring stays."""
    patches = _grid_patches()  # 16-px patches every 4 px: step 4 is the first that does not overlap
    n = GRID[0] * GRID[1]
    rng = np.random.default_rng(1)
    iy, ix = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    lattice = np.stack([np.cos(2 * np.pi * iy.ravel() / 8), np.sin(2 * np.pi * ix.ravel() / 8)], axis=1)
    features, outliers = _planted(lattice + 0.3 * rng.standard_normal((n, 2)))
    step, span, tail, nearest = _grid_span(patches, features)
    assert (step, span) == (4, 4) and tail >= 1.3 * nearest

    def auc(span: int) -> float:
        neighbours = patch_neighbours(patches, grid_step=4, grid_span=span)
        return roc_auc(contrast(features, neighbours, robust_scale(features)), outliers)

    assert auc(4) > auc(1) + 0.02  # what the rule reads off the training scores is what finds the outliers
    iid, _ = _planted(rng.standard_normal((n, 64)))  # 64 values, as the redrawing's residual
    assert _grid_span(patches, iid)[:2] == (4, 1)
    assert _tail(np.concatenate([np.zeros(10), np.ones(10)])) > 0 and _tail(np.ones(50)) == 0.0  # no spread: 0


def test_the_joint_score_is_judged_on_the_redrawing_and_the_others_on_the_encoder() -> None:
    n = GRID[0] * GRID[1]
    rng = np.random.default_rng(2)
    outputs = {
        "z_loc": rng.standard_normal((n, 2)),
        "z_scale": np.exp(rng.standard_normal((n, 2))),
        "recon_nll": rng.standard_normal(n),
        "recon_residual": rng.standard_normal((n, 2, 2)),
    }
    features, parts = encoder_features(outputs), part_features(outputs)
    joint = score_features("joint", features, parts)
    assert joint.shape == (n, 5)  # the likelihood and the 4 residual values; nothing of the encoder's
    np.testing.assert_array_equal(joint[:, 1:], outputs["recon_residual"].reshape(n, 4))
    assert score_features("contrast", features, parts).shape == (n, 4)  # z and log z-scale
    with pytest.raises(ValueError, match="redrawing"):
        score_features("joint", features, {})


def test_the_likelihood_part_is_left_out_when_it_flags_several_times_the_residuals_training_patches() -> None:
    """``auto``: both parts should flag the scan's defects; a likelihood part flagging 5× more reacts to something
    the scan has all over (the STM scan's line streaks) and the score becomes ``residual``."""
    patches = _grid_patches()
    n = GRID[0] * GRID[1]
    rng = np.random.default_rng(3)
    residual, defects = _planted(rng.standard_normal((n, 4)))
    residual[defects] += 3.0  # clear defects: over the bar in either part
    neighbours = patch_neighbours(patches, grid_step=4)
    features = rng.standard_normal((n, 2))

    def stats(likelihood: np.ndarray) -> NoveltyStats:
        parts = {"residual": residual, "reconstruction": likelihood[:, None]}
        return fit_novelty(features, neighbours, kind="joint", grid_step=4, parts=parts)

    agrees = rng.standard_normal(n) + 12.0 * defects  # it flags the same defects
    keeps, ratio = _keeps_likelihood(stats(agrees))
    assert keeps and ratio < 2
    streaks = agrees.copy()
    streaks[iy_rows(patches, 0, 3)] += 12.0  # and three whole rows of streaks
    keeps, ratio = _keeps_likelihood(stats(streaks))
    assert not keeps and ratio > _LIKELIHOOD_EXCESS


def iy_rows(patches: PatchSet, first: int, last: int) -> np.ndarray:
    """The patches of grid rows ``first`` … ``last``."""
    rows = patches.positions[:, 1] // patches.data.stride[0]
    return (rows >= first) & (rows <= last)


def test_a_given_span_takes_the_nearest_non_overlapping_rings_and_the_served_index_follows() -> None:
    """``atomstream export --defect-span N``: the N rings of cells from the first step whose patches do not overlap,
    whatever calibration would have chosen; the pipeline serves the same neighbours (the manifest says which)."""
    import torch

    from exporters.calibrate import calibrate_novelty
    from models.config import ModelConfig
    from models.data import scan_patches
    from models.jtrvae import JTrVAE
    from sim.lattice import LatticeConfig, synth_scan
    from streamer.maps.novelty import RESIDUAL_K, TRAIN_K, default_k, grid_neighbours

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
    # auto (the export's default): the joint score unless its likelihood part floods, and each kind's own bar
    auto, joint = calibrate_novelty(model, patches), calibrate_novelty(model, patches, kind="joint")
    keeps, ratio = _keeps_likelihood(joint)
    assert auto.kind == ("joint" if keeps else "residual") and auto.k == default_k(auto.kind)
    assert auto.choice.startswith(f"{auto.kind}: the likelihood part flags {ratio:.1f}×") and joint.choice == ""
    assert (joint.k, calibrate_novelty(model, patches, kind="residual").k) == (TRAIN_K, RESIDUAL_K)
    with pytest.raises(ValueError, match="span=5"):
        calibrate_novelty(model, patches, span=5)
    small = scan_patches(np.ascontiguousarray(frames[:, :64, :64]), data)  # 7×7 cells: rings 2-5 do not fit
    with pytest.raises(ValueError, match="7×7 cells is too small to compare with 4 rings"):
        calibrate_novelty(model, small, span=4)
