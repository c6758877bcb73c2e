"""`atomstream plot` on an atom-centred run draws the centres its finder picks on the frame (one sublattice), and
`atomstream export` calibrates the defect score on the run's own scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from atomstream.cli import main
from sim.lattice import LatticeConfig, synth_frame


def test_plot_draws_the_atom_centres_of_an_atom_centred_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = synth_frame(LatticeConfig(shape=(72, 200), lattice_constant=12.0, n_defects=0, column_sigma=1.5), seed=0)[0]
    scan = tmp_path / "scan.npy"
    np.save(scan, frame.astype(np.float32))
    run = tmp_path / "run"
    train = ["train", "--data", str(scan), "--atoms", "--patch", "12", "--atom-min-distance", "3", "--classes", "2"]
    small = ["--hidden", "16", "--epochs", "1", "--no-progress", "--out", str(run)]
    assert main(train + small) == 0
    config = (run / "config.json").read_text()
    assert '"atom_sublattice": "brightest"' in config
    capsys.readouterr()
    assert main(["plot", str(run), "--data", str(scan), "--out", str(tmp_path / "fig")]) == 0
    figure = tmp_path / "fig" / "atoms_frame0.png"
    assert str(figure) in capsys.readouterr().out
    image = imread(figure)
    assert image.shape[1] > 600 and image.shape[0] > 400  # the frame and its zoom, readable

    artifact = tmp_path / "artifact"
    assert main(["export", str(run), "--out", str(artifact), "--defect-score", "combined"]) == 0
    assert "defect score: combined, calibrated on" in capsys.readouterr().out
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["novelty"]["kind"] == "combined" and manifest["tiling"]["atom_sublattice"] == "brightest"
