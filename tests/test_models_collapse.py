"""A collapsed class latent is diagnosed from the posteriors, reported by `train`, refused by `export` unless forced.

Both directions are checked on real training runs: a deliberately collapsing one (no class structure in the data,
the plain random start) and a healthy one on two distinct shapes, so the refusal cannot be a blanket refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atomstream.cli import main


def _stack(path: Path, *, structured: bool) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    images = np.full((60, 12, 12), 0.3, np.float32)
    if structured:
        images[labels == 0, 2:10, 5:7] = 1.0  # a vertical bar
        images[labels == 1, 5:7, 2:10] = 1.0  # a horizontal bar
    images += rng.uniform(0, 0.02, images.shape).astype(np.float32)
    np.savez(path, images=np.clip(images, 0, 1), labels=labels)
    return path


def _train(data: Path, out: Path, *extra: str) -> None:
    argv = ["train", "--data", str(data), "--out", str(out), "--classes", "2", "--epochs", "3", "--hidden", "16"]
    assert main([*argv, "--no-progress", "--no-rotation", "--no-translation", *extra]) == 0


def test_a_collapsed_run_is_reported_and_export_refuses_it_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _train(_stack(tmp_path / "flat.npz", structured=False), run, "--class-init", "random")
    out = capsys.readouterr()
    assert "COLLAPSED" in out.out and "refuses this run unless --force" in out.err
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert diagnosis["collapsed"] and diagnosis["information_ratio"] < 0.05

    assert main(["export", str(run), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "collapsed class latent" in err and "--force" in err
    assert not (tmp_path / "a" / "manifest.json").exists()

    assert main(["export", str(run), "--out", str(tmp_path / "b"), "--force"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["class_health"]["collapsed"] is True


def test_a_run_whose_classes_carry_the_shapes_exports_with_its_health_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _train(_stack(tmp_path / "bars.npz", structured=True), run)
    assert "classes in use" in capsys.readouterr().out
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert not diagnosis["collapsed"] and diagnosis["information_ratio"] > 0.5
    assert diagnosis["nmi_with_initial_clusters"] > 0.9
    assert main(["export", str(run), "--out", str(tmp_path / "a")]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["class_health"]["collapsed"] is False


def test_a_run_saved_before_the_invariant_class_head_loads_as_a_pixel_head(tmp_path: Path) -> None:
    import torch

    from models.checkpoint import load_run, save_run
    from models.config import ModelConfig, RunConfig
    from models.jtrvae import JTrVAE

    cfg = RunConfig(model=ModelConfig(patch=(8, 8), n_classes=2, class_head="pixels", decoder_hidden=(8,)))
    save_run(tmp_path, JTrVAE(cfg.model), cfg, epoch=1, history=[])
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["class_head"]  # what a run from before the field was written looks like
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model, loaded = load_run(tmp_path)
    assert loaded.model.class_head == "pixels" and model.encoder.class_head is None
    x = torch.rand(3, 1, 8, 8)
    assert model.encode(x)["class_prob"].shape == (3, 2)
