"""Unit-cell-centred patches (``--atom-sublattice cells``, the paper's polarisation case) from the CLI to the service:
the run records the layout and its min-max patches, the export carries both into the manifest, and the service cuts
the very patches training saw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from perovskite_image import perovskite, render

from atomstream.cli import main
from models.config import RunConfig
from models.data import DataError, build_patches, patches_from_config
from streamer.maps.encoder import load
from streamer.maps.pipeline import Pipeline


def _scan(tmp_path: Path) -> tuple[Path, np.ndarray]:
    a, b = perovskite((150, 170), 24.0, 0.0, seed=0)
    b = b + np.random.default_rng(1).uniform(-0.8, 0.8, b.shape)
    frame = render((150, 170), a, b, noise=0.02, seed=0).astype(np.float32)
    scan = tmp_path / "scan.npy"
    np.save(scan, frame[None])
    return scan, frame


def test_a_cells_run_is_served_on_the_patches_it_was_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scan, frame = _scan(tmp_path)
    run = tmp_path / "run"
    argv = ["train", "--data", str(scan), "--atoms", "--atom-sublattice", "cells", "--patch", "10", "--classes", "2"]
    assert main([*argv, "--hidden", "16", "--epochs", "1", "--no-progress", "--out", str(run)]) == 0
    said = capsys.readouterr().out
    assert re.search(r"unit cells: 30, spacing 2[34]\.\d px; patch 10 px = 0\.4\d spacings\n", said)  # no hint
    config = RunConfig.model_validate_json((run / "config.json").read_text())
    data, model = config.data, config.model
    assert data.atom_sublattice == "cells" and data.preprocessing.patch_norm == "minmax"
    assert (model.rotation, model.latent_dim, model.likelihood, model.class_invariance) == (
        False,
        4,
        "gaussian",
        "rotation",
    )  # the polarisation recipe (atomstream.cli.train.CELL_MODEL), exported and served below
    trained = patches_from_config(scan, data)
    assert len(trained) == 5 * 6  # the cells of a 6 × 7 A lattice
    assert trained.images.min() == 0.0 and np.allclose(trained.images.max(axis=(1, 2)), 1.0)

    capsys.readouterr()
    assert main(["plot", str(run), "--data", str(scan), "--out", str(tmp_path / "fig")]) == 0
    assert str(tmp_path / "fig" / "atoms_frame0.png") in capsys.readouterr().out  # the cell centres, for a look

    artifact = tmp_path / "artifact"
    assert main(["export", str(run), "--out", str(artifact)]) == 0
    capsys.readouterr()
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["tiling"]["atom_sublattice"] == "cells"
    assert manifest["preprocessing"]["patch_norm"] == "minmax"
    prepared = Pipeline(load(artifact, backend="onnx", device="cpu")).prepare(torch.from_numpy(frame))
    served = np.asarray(prepared.patches)[:, 0]
    np.testing.assert_allclose(served, trained.images, atol=1e-6)


def test_a_cell_patch_that_reaches_the_corner_columns_gets_a_hint(tmp_path: Path) -> None:
    from atomstream.cli.train import cells_line

    scan, _ = _scan(tmp_path)
    wide = build_patches(scan, patch=20, atoms=True, atom_sublattice="cells")
    line = cells_line(wide.centres, 20)
    assert line.startswith("unit cells: ") and "reaches the cell's corner columns" in line
    assert "--patch about 10" in line


def test_patch_norm_can_be_chosen_and_a_wrong_one_is_named(tmp_path: Path) -> None:
    scan, _ = _scan(tmp_path)
    kept = build_patches(scan, patch=10, atoms=True, atom_sublattice="cells", patch_norm="none")
    assert kept.data.preprocessing.patch_norm == "none" and kept.images.max() < 0.9  # the frame's own scale
    assert build_patches(scan, patch=10, atoms=True).data.preprocessing.patch_norm == "none"
    with pytest.raises(DataError, match="patch_norm='zscore'"):
        build_patches(scan, patch=10, atoms=True, patch_norm="zscore")
    stack = tmp_path / "stack.npz"
    np.savez(stack, images=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(DataError, match="patch_norm applies to scans"):
        build_patches(stack, patch_norm="minmax")


def test_a_hexagonal_scan_has_no_cells_and_the_error_says_why(tmp_path: Path) -> None:
    from sim.lattice import LatticeConfig, synth_frame

    frame = synth_frame(LatticeConfig(shape=(96, 96), kind="hexagonal", lattice_constant=12.0, n_defects=0), seed=0)[0]
    scan = tmp_path / "hex.npy"
    np.save(scan, frame.astype(np.float32)[None])
    assert len(build_patches(scan, patch=6, atoms=True, atom_min_distance=3)) > 10  # its columns are there
    with pytest.raises(DataError, match="square-like lattice"):
        build_patches(scan, patch=6, atoms=True, atom_sublattice="cells", atom_min_distance=3)
