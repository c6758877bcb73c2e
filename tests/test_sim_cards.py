"""The cards set: deterministic, in range, and every stored transform parameter is visible in the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atomstream.cli import main
from sim.cards import CLASS_NAMES, load_cards, make_cards, save_npz

DIAMOND = CLASS_NAMES.index("diamonds")


def _moments(img: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mass, centroid (y, x) and second-moment matrix of an image, in pixels."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    m = img.sum()
    cy, cx = (img * yy).sum() / m, (img * xx).sum() / m
    dy, dx = yy - cy, xx - cx
    cov = np.array([[(img * dy * dy).sum(), (img * dy * dx).sum()], [(img * dy * dx).sum(), (img * dx * dx).sum()]])
    return float(m), np.array([cy, cx]), cov / m


def test_shapes_range_and_determinism() -> None:
    a = make_cards(40, size=24, rotation=120, seed=3)
    b = make_cards(40, size=24, rotation=120, seed=3)
    c = make_cards(40, size=24, rotation=120, seed=4)
    assert a.images.shape == (40, 24, 24) and a.images.dtype == np.float32
    assert a.images.min() >= 0.0 and a.images.max() <= 1.0
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(a.labels, minlength=4).tolist() == [10, 10, 10, 10]
    assert np.all(np.abs(a.angle) <= 120) and np.all(np.abs(a.shear) <= 10)
    assert np.all((a.scale >= 1) & (a.scale <= 1.2)) and np.all(np.abs(a.shift) <= 0.1 * 24)
    np.testing.assert_array_equal(a.shift_y, a.shift[:, 0])


@pytest.mark.parametrize("size", [24, 48])
def test_classes_are_distinguishable(size: int) -> None:
    """Class means differ clearly, and a nearest-mean classifier on fresh (unshifted) images recovers the labels."""
    train = make_cards(400, size=size, rotation=12, max_shift=0, seed=0)
    test = make_cards(200, size=size, rotation=12, max_shift=0, seed=1)
    means = np.stack([train.images[train.labels == k].mean(axis=0) for k in range(4)])
    dist = np.linalg.norm((means[:, None] - means[None]).reshape(4, 4, -1), axis=-1)
    assert dist[~np.eye(4, dtype=bool)].min() > 0.05 * size
    pred = np.argmin(np.linalg.norm(test.images[:, None] - means[None], axis=(2, 3)), axis=1)
    assert (pred == test.labels).mean() > 0.9


def test_diamond_orientation_matches_true_angle() -> None:
    """The diamond is taller than wide: its major axis sits at 90° + angle (counter-clockwise as displayed)."""
    cards = make_cards(200, size=48, rotation=60, shear=0, seed=5)
    for img, ang in zip(cards.images[cards.labels == DIAMOND], cards.angle[cards.labels == DIAMOND], strict=True):
        _, _, cov = _moments(img)
        evecs = np.linalg.eigh(cov)[1]
        vy, vx = evecs[:, 1]
        measured = np.degrees(np.arctan2(-vy, vx)) % 180  # y up for display angles
        assert abs(measured - (90 + ang)) < 2.0


def test_scale_and_shift_show_in_area_and_centroid() -> None:
    """Area grows as scale² (shear keeps area); the centroid moves by the stored shift, in pixels."""
    ref = make_cards(4, size=48, rotation=0, shear=0, max_shift=0, scale=(1, 1), seed=0)
    cards = make_cards(80, size=48, rotation=0, shear=10, scale=(1, 1.2), seed=7)
    ref_m = {int(k): _moments(im)[:2] for k, im in zip(ref.labels, ref.images, strict=True)}
    for img, k, s in zip(cards.images, cards.labels, cards.scale, strict=True):
        assert _moments(img)[0] / ref_m[int(k)][0] == pytest.approx(s**2, rel=0.02)
    moved = make_cards(80, size=48, rotation=0, shear=0, scale=(1, 1), seed=8)
    for img, k, shift in zip(moved.images, moved.labels, moved.shift, strict=True):
        np.testing.assert_allclose(_moments(img)[1] - ref_m[int(k)][1], shift, atol=0.05)


def test_cards_stay_inside_the_image() -> None:
    cards = make_cards(400, size=48, rotation=180, seed=2)
    border = np.concatenate([cards.images[:, 0], cards.images[:, -1], cards.images[:, :, 0], cards.images[:, :, -1]])
    assert border.max() < 0.5


def test_club_keeps_three_fold_lobes() -> None:
    """Rotating an upright club by 120° about its lobe centre maps it onto itself, stem aside."""
    img = make_cards(4, size=96, rotation=0, shear=0, max_shift=0, scale=(1, 1), seed=0, supersample=4)
    club = img.images[img.labels == CLASS_NAMES.index("clubs")][0]
    half, fill = 48.0, 0.62
    cy, cx = half - 0.12 * fill * half, half  # lobe centre in pixels (shape units v = 0.12)
    yy, xx = np.mgrid[0:96, 0:96] + 0.5
    th = np.deg2rad(120)
    ry = cy + (yy - cy) * np.cos(th) - (xx - cx) * np.sin(th)
    rx = cx + (yy - cy) * np.sin(th) + (xx - cx) * np.cos(th)
    rotated = club[np.clip(ry.astype(int), 0, 95), np.clip(rx.astype(int), 0, 95)]
    near = np.hypot(yy - cy, xx - cx) < 0.8 * fill * half

    def stem(y: np.ndarray, x: np.ndarray) -> np.ndarray:  # the sector below the centre that holds the stem
        return np.abs(np.degrees(np.arctan2(-(y - cy), x - cx)) + 90) < 30

    near &= ~stem(yy, xx) & ~stem(ry, rx)
    assert np.abs(rotated - club)[near].mean() < 0.03


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cards = make_cards(12, size=24, seed=0)
    save_npz(tmp_path / "c.npz", cards)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert set(z.files) == {"images", "labels", "angle", "shear", "scale", "shift", "class_names"}
        assert z["class_names"].tolist() == list(CLASS_NAMES)
    back = load_cards(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.images, cards.images)
    np.testing.assert_array_equal(back.shift, cards.shift)
    assert back.class_names == CLASS_NAMES


def test_cli_writes_cards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cards.npz"
    assert (
        main(["synth", "cards", "--rotation", "60", "--n", "20", "--size", "24", "--seed", "0", "--out", str(out)]) == 0
    )
    cards = load_cards(out)
    assert cards.images.shape == (20, 24, 24)
    np.testing.assert_array_equal(cards.images, make_cards(20, size=24, rotation=60, seed=0).images)
    assert main(["synth", "cards", "--out", str(tmp_path / "cards.png")]) == 2
    assert "npz" in capsys.readouterr().err
