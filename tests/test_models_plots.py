"""Figures: decoded grids have the documented layout; the drawn figures have what a reader needs (class legends
with names, colour bars with units, traversals over every latent, titles inside the picture); PNGs are written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colorbar import Colorbar
from PIL import Image

from models.config import ModelConfig
from models.jtrvae import JTrVAE
from models.plots import (
    class_colours,
    conditioned_images,
    grid_extent,
    latent_grid,
    manifold_images,
    manifolds_figure,
    plot_conditioned,
    plot_confusion,
    plot_manifolds,
    plot_real_space_maps,
    plot_traversals,
    real_space_maps_figure,
    traversal_images,
    traversals_figure,
)


def _model(n_classes: int = 3, latent_dim: int = 2) -> tuple[JTrVAE, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        patch=(10, 12), n_classes=n_classes, latent_dim=latent_dim, encoder_hidden=(16,), decoder_hidden=(16, 16)
    )
    return JTrVAE(cfg), cfg


def _png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _texts_inside(fig: Any) -> None:
    """Every title, label and legend entry lies inside the figure once laid out (nothing cut off)."""
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for text in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent")):
        if not text.get_text() or not text.get_visible():
            continue
        ext = text.get_window_extent(renderer)
        assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, f"{text.get_text()!r} runs off the figure sideways"
        assert box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, f"{text.get_text()!r} runs off the figure vertically"


def _colorbar_labels(fig: Any) -> list[str]:
    return [a.get_ylabel() for a in fig.axes if isinstance(getattr(a, "_colorbar", None), Colorbar)]


def test_latent_grid_is_gaussian_quantiles() -> None:
    g = latent_grid(5)
    np.testing.assert_allclose(g, -g[::-1], atol=1e-12)
    assert g[2] == pytest.approx(0.0) and g[-1] == pytest.approx(1.6448536, rel=1e-6)


def test_traversal_has_one_row_per_class_and_leaves_the_model_alone() -> None:
    model, cfg = _model(3)
    before = [p.clone() for p in model.parameters()]
    images = traversal_images(model, cfg, dim=1, n_steps=5)
    assert images.shape == (3, 5, 10, 12) and images.min() >= 0 and images.max() <= 1
    assert not np.allclose(images[:, 0], images[:, -1])  # the sweep changes the image
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="latent_dim=2"):
        traversal_images(model, cfg, dim=2)


def test_the_traversal_figure_sweeps_every_latent_with_classes_named(tmp_path: Path) -> None:
    model, cfg = _model(3)
    fig = traversals_figure(model, cfg, n_steps=5)
    assert len(fig.axes) == 2 * 3 * 5  # both latents, a row per class
    assert sorted(s.get_suptitle() for s in fig.subfigs) == ["z0 swept (others 0)", "z1 swept (others 0)"]
    assert [a.get_ylabel() for a in fig.axes if a.get_ylabel()][:3] == list(cfg.names_of_classes())
    _texts_inside(fig)
    both = _png(plot_traversals(model, cfg, tmp_path / "both.png", n_steps=5))
    one = _png(plot_traversals(model, cfg, tmp_path / "one.png", dim=1, n_steps=5))
    assert both[0] > 1.6 * one[0] and both[1] == pytest.approx(one[1], rel=0.1)


def test_traversal_without_classes_has_one_row() -> None:
    model, cfg = _model(0, 1)
    assert traversal_images(model, cfg, dim=0, n_steps=4).shape == (1, 4, 10, 12)
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        manifold_images(model, cfg)


def test_manifold_and_conditioned_layouts(tmp_path: Path) -> None:
    model, cfg = _model(2)
    grids = manifold_images(model, cfg, n=4)
    assert grids.shape == (2, 4, 4, 10, 12)
    fig = manifolds_figure(model, cfg, n=4)
    assert [a.get_title() for a in fig.axes] == list(cfg.names_of_classes())
    assert all(a.get_xlabel() == "z0" and a.get_ylabel() == "z1" for a in fig.axes)
    _texts_inside(fig)
    _png(plot_manifolds(model, cfg, tmp_path / "m.png", n=4))
    images, angles = conditioned_images(model, cfg)
    assert images.shape == (2, 12, 10, 12) and angles[0] == 0 and angles[-1] == 330
    np.testing.assert_allclose(
        images[:, 0], conditioned_images(model, cfg, angles_deg=np.array([360.0]))[0][:, 0], atol=1e-5
    )
    _png(plot_conditioned(model, cfg, tmp_path / "c.png", angles_deg=np.array([0.0, 90.0, 180.0])))


def test_real_space_maps_have_a_class_legend_and_colour_bars_with_units(tmp_path: Path) -> None:
    gy, gx = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    centres = np.stack([4 + 8 * gy.ravel(), 4 + 8 * gx.ravel()], axis=1)
    prob = np.eye(3)[(gy.ravel() + gx.ravel()) % 3]
    rng = np.random.default_rng(0)
    z, angle, score = rng.normal(size=(12, 2)), rng.uniform(-4, 4, 12), rng.uniform(0, 1, 12)
    names = ("substrate", "film", "interface")
    fig = real_space_maps_figure(
        centres, frame_shape=(24, 32), class_prob=prob, z=z, angle=angle, defect_score=score, grid=(3, 4),
        class_names=names,
    )  # fmt: skip
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles == ["class", "latent z0", "latent z1", "rotation", "defect score"]
    legend = fig.axes[0].get_legend()
    assert [t.get_text().split(" (")[0] for t in legend.get_texts()] == list(names)
    assert [tuple(p.get_facecolor()) for p in legend.get_patches()] == class_colours(3)
    labels = _colorbar_labels(fig)  # four continuous maps, none for the classes
    assert labels == ["latent units (posterior mean)"] * 2 + ["rotation (degrees)", "defect score (0–1)"]
    rotation = next(a for a in fig.axes if a.get_title() == "rotation").images[0].get_array()
    assert np.all(np.abs(rotation) <= 180.0)
    _texts_inside(fig)
    _png(plot_real_space_maps(centres, tmp_path / "pts.png", frame_shape=(24, 32), z=z, frame=np.zeros((24, 32))))


def test_confusion_is_written(tmp_path: Path) -> None:
    _png(plot_confusion(np.array([[5, 1], [0, 4]]), tmp_path / "conf.png", class_names=("a", "b")))


def test_grid_extent_centres_cells_on_their_patches() -> None:
    left, right, bottom, top = grid_extent((3, 4), (16, 16), (8, 8), (2, 0))
    assert (left + 4, top + 4) == (7.5, 9.5)  # cell (0, 0) centred on (y0 + 7.5, x0 + 7.5)
    assert (right - left, bottom - top) == (32, 24)
