"""The in-process pipeline against the encoder called by hand on the shared preprocessing: same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_factory import make_artifact

from sim.lattice import LatticeConfig, synth_frame
from streamer.maps.atoms import find_atoms
from streamer.maps.encoder import Encoder, load
from streamer.maps.pipeline import ARRAY_ORDER, FrameError, Pipeline, PipelineError
from streamer.maps.preprocess import Preprocessing, grid_patches, point_patches

ATOL = 1e-5


@pytest.fixture(scope="module")
def grid_encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    path = make_artifact(tmp_path_factory.mktemp("grid"), translation=True, origin=(3, 1), seed=1)
    return load(path, backend="onnx", device="cpu", batch_sizes=(1,))


@pytest.fixture(scope="module")
def points_encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    path = make_artifact(
        tmp_path_factory.mktemp("points"),
        layout="points",
        patch=(12, 12),
        n_classes=2,
        rotation=True,
        preprocessing=Preprocessing(fft="logmag", patch_norm="minmax"),
        seed=2,
    )
    return load(path, backend="onnx", device="cpu", batch_sizes=(1,))


def _frame(shape: tuple[int, int], seed: int, dtype: str = "float32") -> np.ndarray:
    """A small lattice frame with defects, in any wire dtype (integers scaled to a detector-like range)."""
    frame = synth_frame(LatticeConfig(shape=shape, lattice_constant=9.0, n_defects=3), seed=seed)[0]
    if np.dtype(dtype).kind in "iu":
        return np.round(frame / frame.max() * 250).astype(dtype)
    return frame.astype(dtype)


def test_grid_maps_have_the_grid_shape_in_design_order_and_class_is_the_argmax(grid_encoder: Encoder) -> None:
    frame = _frame((61, 47), seed=0)
    maps = Pipeline(grid_encoder).process(frame)
    gh, gw = (61 - 3 - 16) // 8 + 1, (47 - 1 - 16) // 8 + 1
    assert maps.layout == "grid" and maps.grid == (gh, gw) and maps.origin == (3, 1)
    assert list(maps.arrays) == [n for n in ARRAY_ORDER if n not in ("centers",)]
    shapes = {name: a.shape for name, a in maps.arrays.items()}
    assert shapes == {
        "class": (gh, gw),
        "class_prob": (gh, gw, 3),
        "z": (gh, gw, 2),
        "angle": (gh, gw),
        "shift": (gh, gw, 2),
        "defect_score": (gh, gw),
    }
    assert maps.arrays["class"].dtype == np.uint8
    assert all(a.dtype == np.float32 for n, a in maps.arrays.items() if n != "class")
    np.testing.assert_array_equal(maps.arrays["class"], maps.arrays["class_prob"].argmax(-1))
    np.testing.assert_allclose(maps.arrays["class_prob"].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "uint16", "float64"])
def test_grid_pipeline_equals_the_encoder_on_grid_patches(grid_encoder: Encoder, dtype: str) -> None:
    frame = _frame((50, 70), seed=3, dtype=dtype)
    m = grid_encoder.manifest
    patches, grid = grid_patches(
        torch.from_numpy(frame.astype(np.float64)), m.preprocessing, m.patch, m.tiling.stride, m.tiling.origin
    )
    direct = {k: v.numpy() for k, v in grid_encoder(patches.to(torch.float32)).items()}
    maps = Pipeline(grid_encoder).process(frame)
    assert maps.grid == grid
    np.testing.assert_allclose(maps.arrays["class_prob"].reshape(-1, 3), direct["class_prob"], atol=ATOL)
    np.testing.assert_allclose(maps.arrays["z"].reshape(-1, 2), direct["z_loc"], atol=ATOL)
    np.testing.assert_allclose(maps.arrays["angle"].reshape(-1), direct["angle"], atol=ATOL)
    np.testing.assert_allclose(maps.arrays["shift"].reshape(-1, 2), direct["shift"], atol=ATOL)


def test_points_layout_equals_the_encoder_on_atom_centred_patches(points_encoder: Encoder) -> None:
    frame = _frame((57, 66), seed=4)
    m = points_encoder.manifest
    t = torch.from_numpy(frame)
    found = find_atoms(
        t, sigma=m.tiling.atom_sigma, min_distance=m.tiling.atom_min_distance, threshold=m.tiling.atom_threshold
    )
    patches, kept = point_patches(t, m.preprocessing, found, m.patch)
    direct = {k: v.numpy() for k, v in points_encoder(patches).items()}
    maps = Pipeline(points_encoder).process(frame)
    n = kept.shape[0]
    assert n > 10 and maps.layout == "points" and maps.grid is None
    assert list(maps.arrays) == ["class", "class_prob", "z", "angle", "defect_score", "centers"]
    assert maps.arrays["class_prob"].shape == (n, 2) and maps.arrays["z"].shape == (n, 2)
    assert maps.arrays["class"].shape == maps.arrays["angle"].shape == maps.arrays["defect_score"].shape == (n,)
    np.testing.assert_allclose(maps.arrays["centers"], kept.numpy())
    np.testing.assert_allclose(maps.arrays["class_prob"], direct["class_prob"], atol=ATOL)
    np.testing.assert_allclose(maps.arrays["z"], direct["z_loc"], atol=ATOL)
    np.testing.assert_array_equal(maps.arrays["class"], direct["class_prob"].argmax(-1))


def test_a_frame_without_atoms_gives_empty_maps(points_encoder: Encoder) -> None:
    maps = Pipeline(points_encoder).process(np.full((40, 40), 7.0, np.float32))
    assert {a.shape[0] for a in maps.arrays.values()} == {0}
    assert maps.arrays["class_prob"].shape == (0, 2) and maps.arrays["centers"].shape == (0, 2)
    assert maps.defects == []


def test_cross_frame_batch_gives_each_frame_its_own_maps(grid_encoder: Encoder) -> None:
    """The service's path: prepare several frames, one encode over all patches, assemble each slice."""
    pipe = Pipeline(grid_encoder, max_batch_patches=7)  # forces several encoder calls that straddle frames
    frames = [_frame((40, 40), 5), _frame((33, 71), 6, "uint8"), _frame((64, 24), 7, "int16")]
    prepared = [pipe.prepare(f) for f in frames]
    calls: list[int] = []
    outputs = pipe.encode(np.concatenate([p.patches for p in prepared]), observe=lambda n, s: calls.append(n))
    assert sum(calls) == sum(p.n for p in prepared) and max(calls) == 7
    for frame, p, rows in zip(frames, prepared, pipe.split(outputs, prepared), strict=True):
        batched = pipe.assemble(p, rows)
        alone = pipe.process(frame)
        assert batched.arrays.keys() == alone.arrays.keys()
        for name in alone.arrays:
            np.testing.assert_allclose(batched.arrays[name], alone.arrays[name], atol=ATOL, err_msg=name)
    total, first = sum(p.n for p in prepared), prepared[0].n
    with pytest.raises(PipelineError, match=rf"outputs of \[{total}\] rows do not hold the {first} patches"):
        pipe.split(outputs, prepared[:1])


def test_defect_classes_by_name_set_the_score_to_their_probability_mass(grid_encoder: Encoder) -> None:
    frame = _frame((48, 48), seed=8)
    plain = Pipeline(grid_encoder).process(frame).arrays
    # The two classes this untrained model uses least, and a threshold at the median of their mass over the patches
    # of the third: some patches flagged and some not (every region published: max_share 1).
    top = int(np.bincount(plain["class"].ravel(), minlength=3).argmax())
    low, high = (k for k in range(3) if k != top)
    score = plain["class_prob"][..., low] + plain["class_prob"][..., high]
    threshold = float(np.median(score[plain["class"] == top]))
    pipe = Pipeline(grid_encoder, max_share=1.0).with_defects(classes=[f"class{high}", low], threshold=threshold)
    assert pipe.rule.classes == (low, high)
    maps = pipe.process(frame)
    np.testing.assert_allclose(maps.arrays["defect_score"], score, atol=1e-6)
    flagged = np.isin(maps.arrays["class"], (low, high)) | (maps.arrays["defect_score"] >= threshold)
    assert 0 < int(flagged.sum()) < flagged.size
    assert sum(d.area for d in maps.defects) == int(flagged.sum())
    with pytest.raises(PipelineError, match="'vacancy' is not one of the model's classes"):
        pipe.with_defects(classes=["vacancy"], threshold=None)
    with pytest.raises(PipelineError, match="index 3 is out of range"):
        Pipeline(grid_encoder, defect_classes=[3])


def test_frames_the_model_cannot_tile_raise_frame_error(grid_encoder: Encoder) -> None:
    pipe = Pipeline(grid_encoder)
    with pytest.raises(FrameError, match="10x40 frame"):
        pipe.prepare(np.zeros((10, 40), np.float32))
    with pytest.raises(FrameError, match="2-D"):
        pipe.prepare(np.zeros((2, 40, 40), np.float32))


def test_the_manifest_tiling_is_what_the_pipeline_uses(tmp_path: Path) -> None:
    enc = load(make_artifact(tmp_path, stride=(5, 7), patch=(8, 8), seed=3), device="cpu", batch_sizes=(1,))
    maps = Pipeline(enc).process(_frame((30, 30), seed=9))
    assert maps.stride == (5, 7) and maps.patch == (8, 8) and maps.grid == ((30 - 8) // 5 + 1, (30 - 8) // 7 + 1)


def test_a_pipeline_scores_frames_of_changing_sizes_as_a_fresh_one_does(grid_encoder: Encoder) -> None:
    # the neighbour index is kept per grid shape: a frame of another size must not be scored with the last one's
    shared = Pipeline(grid_encoder)
    for shape, seed in [((61, 47), 0), ((85, 93), 1), ((61, 47), 2), ((45, 45), 3), ((85, 93), 4)]:
        frame = _frame(shape, seed=seed)
        got, want = shared.process(frame).arrays, Pipeline(grid_encoder).process(frame).arrays
        np.testing.assert_array_equal(got["defect_score"], want["defect_score"])
