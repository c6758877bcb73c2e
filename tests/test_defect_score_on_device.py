"""The defect score on torch tensors (the GPU path scores on the encoder's device) equals the numpy score the CPU path
publishes, for every kind and for the frame-calibrated fallback, on grid and atom-centred neighbours; on CUDA too
where there is one. Same float64 arithmetic, so the published float32 scores agree to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.maps.novelty import fit_novelty, grid_neighbours, novelty_score, point_neighbours, robust_scale

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _case(layout: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(7)
    if layout == "grid":
        neighbours = grid_neighbours((37, 41), 2, 2)  # edges and corners: every neighbour count from 3 to 16
    else:
        neighbours = point_neighbours(rng.uniform(0, 200, (900, 2)), 6)
    n = neighbours.shape[0]
    features = rng.normal(size=(n, 9))
    parts = {"reconstruction": rng.gamma(3.0, size=(n, 1)), "residual": rng.normal(size=(n, 16))}
    defects = rng.choice(n, 12, replace=False)  # a few, standing out in every family of features
    for a in (features, *parts.values()):
        a[defects] += 8.0
    return features, parts, neighbours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["grid", "points"])
@pytest.mark.parametrize("kind", [None, "contrast", "density", "combined", "joint", "residual"])
def test_tensor_score_equals_the_numpy_score(device: str, layout: str, kind: str | None) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    features, parts, neighbours = _case(layout)
    stats = None if kind is None else fit_novelty(features, neighbours, kind=kind, parts=parts)  # type: ignore[arg-type]
    want = novelty_score(features, neighbours, stats, parts)

    def on(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    got = novelty_score(on(features), on(neighbours), stats, {k: on(v) for k, v in parts.items()})
    assert isinstance(got, torch.Tensor) and got.device.type == device and got.dtype == torch.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=1e-6)
    assert (want > 0.5).sum() > 0  # the planted defects are scored as such: the comparison is not of zeros


def test_tensor_robust_scale_is_numpys_even_count() -> None:
    f = np.random.default_rng(1).normal(size=(10, 3))  # an even count: numpy's median is a mean of two
    assert np.array_equal(robust_scale(torch.from_numpy(f)).numpy(), robust_scale(f))
