"""``streamer.maps.median_network``: the defect score's neighbour median by a sorting network equals numpy's median
exactly, for every neighbour count the score meets (1–16), with ties and pad slots; and the grid/point residuals it
feeds are unchanged against a plain per-row median."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.maps.median_network import median_of, network
from streamer.maps.novelty import _residuals, grid_neighbours, point_neighbours


@pytest.mark.parametrize("n", range(1, 17))
def test_median_of_equals_numpy_with_ties(n: int) -> None:
    rng = np.random.default_rng(n)
    slabs = [rng.integers(0, 4, size=(300, 5)).astype(np.float64) for _ in range(n)]  # many ties
    assert np.array_equal(median_of(slabs), np.median(np.stack(slabs), axis=0))
    slabs = [rng.normal(size=(300, 5)) for _ in range(n)]
    assert np.array_equal(median_of(slabs), np.median(np.stack(slabs), axis=0))


def test_network_keeps_only_what_the_middle_needs() -> None:
    assert network(1) == () and network(2) == ((0, 1),)
    full16 = 63  # Batcher's odd-even merge sort of 16 inputs
    assert 0 < len(network(16)) < full16
    with pytest.raises(ValueError, match="at least one value"):
        network(0)


@pytest.mark.parametrize(
    "neighbours",
    [
        grid_neighbours((23, 31), 1),
        grid_neighbours((23, 31), 2, 2),
        point_neighbours(np.random.default_rng(3).uniform(0, 80, (400, 2)), 6),
    ],
    ids=["grid", "grid-span-2", "points"],
)
def test_residuals_match_a_per_row_median(neighbours: np.ndarray) -> None:
    f = np.random.default_rng(4).normal(size=(neighbours.shape[0], 7))
    r, has = _residuals(f, neighbours)
    for i in range(0, len(f), 17):
        idx = neighbours[i][neighbours[i] >= 0]
        want = f[i] - np.median(f[idx], axis=0) if len(idx) else np.zeros(7)
        assert has[i] == bool(len(idx))
        assert np.array_equal(r[i], want)
