"""Figures: decoded grids have the documented layout, PNGs are written and record their panel grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.config import ModelConfig
from models.jtrvae import JTrVAE
from models.plots import (
    conditioned_images,
    latent_grid,
    manifold_images,
    plot_conditioned,
    plot_confusion,
    plot_manifolds,
    plot_real_space_maps,
    plot_traversals,
    traversal_images,
)


def _model(n_classes: int = 3, latent_dim: int = 2) -> tuple[JTrVAE, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        patch=(10, 12), n_classes=n_classes, latent_dim=latent_dim, encoder_hidden=(16,), decoder_hidden=(16, 16)
    )
    return JTrVAE(cfg), cfg


def _panels(path: Path) -> str:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        return im.text["Description"]


def test_latent_grid_is_gaussian_quantiles() -> None:
    g = latent_grid(5)
    np.testing.assert_allclose(g, -g[::-1], atol=1e-12)
    assert g[2] == pytest.approx(0.0) and g[-1] == pytest.approx(1.6448536, rel=1e-6)


def test_traversal_has_one_row_per_class(tmp_path: Path) -> None:
    model, cfg = _model(3)
    before = [p.clone() for p in model.parameters()]
    images = traversal_images(model, cfg, dim=1, n_steps=5)
    assert images.shape == (3, 5, 10, 12) and images.min() >= 0 and images.max() <= 1
    assert not np.allclose(images[:, 0], images[:, -1])  # the sweep changes the image
    path = plot_traversals(model, cfg, tmp_path / "t.png", dim=1, n_steps=5)
    assert _panels(path) == "panels 3x5"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="latent_dim=2"):
        traversal_images(model, cfg, dim=2)


def test_traversal_without_classes_has_one_row(tmp_path: Path) -> None:
    model, cfg = _model(0, 1)
    assert traversal_images(model, cfg, dim=0, n_steps=4).shape == (1, 4, 10, 12)
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        manifold_images(model, cfg)


def test_manifold_and_conditioned_layouts(tmp_path: Path) -> None:
    model, cfg = _model(2)
    grids = manifold_images(model, cfg, n=4)
    assert grids.shape == (2, 4, 4, 10, 12)
    assert _panels(plot_manifolds(model, cfg, tmp_path / "m.png", n=4)) == "panels 1x2"
    images, angles = conditioned_images(model, cfg)
    assert images.shape == (2, 12, 10, 12) and angles[0] == 0 and angles[-1] == 330
    np.testing.assert_allclose(
        images[:, 0], conditioned_images(model, cfg, angles_deg=np.array([360.0]))[0][:, 0], atol=1e-5
    )
    assert (
        _panels(plot_conditioned(model, cfg, tmp_path / "c.png", angles_deg=np.array([0.0, 90.0, 180.0])))
        == "panels 2x3"
    )


def test_confusion_and_real_space_maps(tmp_path: Path) -> None:
    assert (
        _panels(plot_confusion(np.array([[5, 1], [0, 4]]), tmp_path / "conf.png", class_names=("a", "b")))
        == "panels 1x1"
    )
    gy, gx = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    centres = np.stack([4 + 8 * gy.ravel(), 4 + 8 * gx.ravel()], axis=1)
    prob = np.eye(2)[(gy.ravel() + gx.ravel()) % 2]
    z = np.random.default_rng(0).normal(size=(12, 2))
    path = plot_real_space_maps(centres, tmp_path / "map.png", frame_shape=(24, 32), class_prob=prob, z=z, grid=(3, 4))
    assert _panels(path) == "panels 1x3"
    path = plot_real_space_maps(centres, tmp_path / "pts.png", frame_shape=(24, 32), z=z, frame=np.zeros((24, 32)))
    assert _panels(path) == "panels 1x2"
