"""Defect scores and regions on hand-made maps, where the right answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from streamer.defects import (
    DefectRule,
    defect_mask,
    defect_score,
    grid_centres,
    grid_regions,
    point_regions,
    regions_to_defects,
)

PATCH, STRIDE, ORIGIN = (16, 16), (8, 8), (4, 2)


def _centre(i: int, j: int) -> tuple[float, float]:
    return ORIGIN[0] + i * STRIDE[0] + 7.5, ORIGIN[1] + j * STRIDE[1] + 7.5


def test_two_blobs_of_a_defect_class_give_two_regions_with_their_centroids_and_areas() -> None:
    cls = np.zeros((10, 12), np.uint8)
    cls[1:3, 1:4] = 2  # 6 patches
    cls[6:9, 8:10] = 2  # 6 patches
    cls[5, 0] = 1  # another class, not a defect
    score = np.full(cls.shape, 0.1, np.float32)  # below the threshold: only the class flags
    rule = DefectRule(classes=(2,), threshold=0.5, connectivity=8)
    labels, n = grid_regions(defect_mask(cls, score, rule), rule.connectivity)
    defects = regions_to_defects(labels, n, grid_centres(cls.shape, PATCH, STRIDE, ORIGIN), cls, score)

    assert n == 2
    a, b = sorted(defects, key=lambda d: d.y)
    assert (a.area, b.area) == (6, 6)
    assert (a.y, a.x) == pytest.approx((_centre(1, 1)[0] + 4.0, _centre(1, 2)[1]))  # rows 1-2, columns 1-3
    assert (b.y, b.x) == pytest.approx((_centre(7, 8)[0], _centre(7, 8)[1] + 4.0))  # rows 6-8, columns 8-9
    assert a.class_ == b.class_ == 2
    assert a.score == pytest.approx(0.1)


def test_centroid_is_score_weighted_and_the_region_reports_max_score_and_majority_class() -> None:
    cls = np.array([[1, 1, 2]], np.uint8)
    score = np.array([[0.6, 0.6, 0.9]], np.float32)
    rule = DefectRule(classes=(), threshold=0.5)
    labels, n = grid_regions(defect_mask(cls, score, rule), 8)
    (d,) = regions_to_defects(labels, n, grid_centres(cls.shape, PATCH, STRIDE, ORIGIN), cls, score)
    xs = [_centre(0, j)[1] for j in range(3)]
    assert d.x == pytest.approx((0.6 * xs[0] + 0.6 * xs[1] + 0.9 * xs[2]) / 2.1)
    assert d.area == 3 and d.class_ == 1 and d.score == pytest.approx(0.9)


def test_diagonal_neighbours_join_with_8_connectivity_only() -> None:
    mask = np.eye(4, dtype=bool)
    assert grid_regions(mask, 8)[1] == 1
    assert grid_regions(mask, 4)[1] == 4
    with pytest.raises(ValueError, match="connectivity"):
        grid_regions(mask, 6)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9).flatmap(
        lambda h: st.integers(1, 9).flatmap(
            lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
                lambda v: np.array(v, dtype=bool).reshape(h, w)
            )
        )
    ),
    st.sampled_from([4, 8]),
)
def test_grid_regions_partition_the_mask_like_scipy_label(mask: np.ndarray, connectivity: int) -> None:
    labels, n = grid_regions(mask, connectivity)  # type: ignore[arg-type]
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    reference, n_ref = ndimage.label(mask, structure=structure)
    assert n == n_ref
    assert ((labels >= 0) == mask).all()
    # the same partition: a one-to-one map between our labels and scipy's
    pairs = {(int(a), int(b)) for a, b in zip(labels[mask], reference[mask], strict=True)}
    assert len(pairs) == n


def test_scores_mass_on_defect_classes_or_normalised_entropy() -> None:
    prob = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
    np.testing.assert_allclose(defect_score(prob, (1, 2)), [2 / 3, 0.0, 0.8], atol=1e-6)
    entropy = defect_score(prob, ())
    expected = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)) / math.log(3)
    np.testing.assert_allclose(entropy, [1.0, 0.0, expected], atol=1e-6)
    assert defect_score(np.ones((4, 1), np.float32), ()).tolist() == [0.0] * 4  # one class: nothing is uncertain


def test_atom_regions_link_nearest_and_diagonal_neighbours_of_the_lattice() -> None:
    yy, xx = np.meshgrid(np.arange(8) * 10.0, np.arange(8) * 10.0, indexing="ij")
    centres = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32)
    flagged = np.zeros((8, 8), bool)
    flagged[1, 1] = flagged[2, 2] = True  # diagonal neighbours: one region
    flagged[6, 5] = flagged[6, 6] = flagged[5, 6] = True  # an L: one region
    flagged[4, 0] = True  # alone
    mask = flagged.ravel()
    labels, n = point_regions(mask, centres)
    assert n == 3
    cls = np.where(mask, 3, 0)
    defects = regions_to_defects(labels, n, centres, cls, np.where(mask, 1.0, 0.0))
    by_area = sorted(defects, key=lambda d: d.area)
    assert [d.area for d in by_area] == [1, 2, 3]
    assert (by_area[0].y, by_area[0].x) == pytest.approx((40.0, 0.0))
    assert (by_area[1].y, by_area[1].x) == pytest.approx((15.0, 15.0))
    assert all(d.class_ == 3 for d in defects)
    assert point_regions(np.zeros(0, bool), np.zeros((0, 2), np.float32))[1] == 0
