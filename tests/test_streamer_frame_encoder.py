"""The frame encoder: every grid patch's outputs from the frame itself, equal to the patch encoder's on the patches
cut out — in eager torch for every kind of MLP encoder, and served (ONNX Runtime) against the cut-patch path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_factory import make_artifact

from exporters.export import build_wrapper
from exporters.frame_encoder import FrameEncoder, FrameEncoderError, frame_region
from models.config import ModelConfig
from models.jtrvae import JTrVAE
from sim.lattice import LatticeConfig, synth_frame
from streamer.maps.encoder import load
from streamer.maps.manifest import MANIFEST_NAME, ArtifactError, read_manifest
from streamer.maps.pipeline import Pipeline
from streamer.maps.preprocess import Preprocessing
from streamer.maps.tiling import tile_grid


def _lattice(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A lattice frame with defects, normalised to [0, 1] as the pipeline's frame normalisation leaves it."""
    frame = synth_frame(LatticeConfig(shape=shape, lattice_constant=9.0, n_defects=4), seed=seed)[0]
    return ((frame - frame.min()) / (frame.max() - frame.min())).astype(np.float32)


@pytest.mark.parametrize(
    ("patch", "stride", "rotation", "translation", "moments", "invariance"),
    [
        ((32, 32), (8, 8), True, True, 6, "model"),  # the grid default: ring harmonics of the spectrum, six moments
        ((24, 16), (6, 4), True, True, 4, "model"),  # neither square nor square-strided
        ((20, 20), (5, 7), True, False, 6, "model"),  # rings of the pixels
        ((17, 15), (4, 4), False, True, 2, "model"),  # the whole spectrum, odd sides
        ((12, 12), (3, 3), False, False, 0, "model"),  # no invariance: the class reads the trunk
        ((16, 16), (4, 4), False, True, 6, "rotation"),  # rings for the class, no angle output
        ((14, 14), (7, 7), False, False, 6, "rotation"),  # rings of the pixels, the cells recipe's class head
    ],
)
def test_the_frame_encoder_equals_the_patch_encoder_on_every_grid_patch(
    patch: tuple[int, int], stride: tuple[int, int], rotation: bool, translation: bool, moments: int, invariance: str
) -> None:
    cfg = ModelConfig(
        patch=patch, n_classes=3, latent_dim=2, rotation=rotation, translation=translation, class_moments=moments,
        class_invariance=invariance, encoder_hidden=(64, 32), decoder_hidden=(16, 16),
    )  # fmt: skip
    torch.manual_seed(0)
    model = JTrVAE(cfg).eval()
    frame = torch.from_numpy(_lattice((97, 83), seed=1))
    tiles = tile_grid(frame, patch, stride)
    grid = (int(tiles.shape[0]), int(tiles.shape[1]))
    patches = tiles.reshape(-1, 1, *patch).contiguous()
    if model.encoder.class_head is not None:  # standardised as after training, so the class logits mean something
        model.encoder.class_head.features.calibrate(patches)
    wrapper = build_wrapper(model, reconstruction=True)
    with torch.no_grad():
        want = wrapper(patches)
        got = FrameEncoder(wrapper, stride).eval()(frame_region(frame, patch, stride, grid))
    for name, a, b in zip(wrapper.output_names, got, want, strict=True):
        assert a.shape == b.shape, name
        scale = float(b.abs().max()) if name == "recon_nll" else 1.0  # a sum over the patch: relative
        delta = torch.remainder(a - b + torch.pi, 2 * torch.pi) - torch.pi if name == "angle" else a - b
        assert float(delta.abs().max()) <= 2e-5 * max(scale, 1.0), name
    if "class_prob" in wrapper.output_names:
        assert torch.equal(got[1].argmax(-1), want[1].argmax(-1))


def test_encoders_the_frame_formulation_does_not_cover_are_refused_by_name() -> None:
    conv = JTrVAE(ModelConfig(patch=(16, 16), n_classes=2, encoder="conv")).eval()
    with pytest.raises(FrameEncoderError, match="MLP encoder"):
        FrameEncoder(build_wrapper(conv), (4, 4))
    sorted_values = JTrVAE(ModelConfig(patch=(16, 16), n_classes=2, class_quantiles=8)).eval()
    with pytest.raises(FrameEncoderError, match="quantiles"):
        FrameEncoder(build_wrapper(sorted_values), (4, 4))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grid artifact with the joint defect score (the redrawing in the graph), as `atomstream export` makes it."""
    frames = np.stack([_lattice((96, 96), seed=s) for s in range(3)])
    return make_artifact(
        tmp_path_factory.mktemp("frame"), patch=(16, 16), stride=(4, 4), translation=True, calibrate_on=frames
    )


def test_a_served_grid_frame_encoded_whole_gives_the_maps_of_its_cut_patches(calibrated: Path) -> None:
    manifest = read_manifest(calibrated)
    assert manifest.frame_stride == (4, 4) and (calibrated / "encoder.frame.onnx").is_file()
    whole = Pipeline(load(calibrated, device="cpu", batch_sizes=(1,)), max_batch_patches=64)
    cut = Pipeline(load(calibrated, device="cpu", batch_sizes=(1,), frame_encoder=False), max_batch_patches=64)
    frame = _lattice((123, 101), seed=7) * 900.0 + 40.0  # raw detector-like values: the pipeline normalises them
    prepared = whole.prepare(frame)
    assert whole.encodes_whole(prepared) and not cut.encodes_whole(cut.prepare(frame))
    assert len(whole.bands(prepared)) > 1  # several calls, each whole grid rows
    a, b = whole.process(frame), cut.process(frame)
    assert a.grid == b.grid and list(a.arrays) == list(b.arrays)
    np.testing.assert_array_equal(a.arrays["class"], b.arrays["class"])
    for name in a.arrays:
        np.testing.assert_allclose(a.arrays[name], b.arrays[name], atol=1e-5, err_msg=name)
    # the same defects: areas exactly, centres (score-weighted) as close as the scores are
    assert [d.area for d in a.defects] == [d.area for d in b.defects]
    np.testing.assert_allclose([(d.y, d.x) for d in a.defects], [(d.y, d.x) for d in b.defects], atol=1e-4)


def test_small_frames_are_still_cut_and_batched_across_frames(calibrated: Path) -> None:
    pipe = Pipeline(load(calibrated, device="cpu", batch_sizes=(1,)), max_batch_patches=4096)
    assert pipe.frames_whole and not pipe.encodes_whole(pipe.prepare(_lattice((64, 64), seed=2)))


def test_per_patch_steps_and_atom_centred_patches_export_no_frame_encoder(tmp_path: Path) -> None:
    fft = make_artifact(tmp_path / "fft", preprocessing=Preprocessing(fft="logmag", patch_norm="minmax"))
    points = make_artifact(tmp_path / "points", layout="points", patch=(12, 12))
    for artifact in (fft, points):
        assert read_manifest(artifact).frame_stride is None and not (artifact / "encoder.frame.onnx").exists()
        assert not Pipeline(load(artifact, device="cpu", batch_sizes=(1,))).frames_whole


def test_a_frame_stride_other_than_the_grid_s_is_refused(calibrated: Path, tmp_path: Path) -> None:
    copy = tmp_path / "edited"
    copy.mkdir()
    for f in calibrated.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["frame_stride"] = [8, 8]
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="field 'frame_stride'"):
        read_manifest(copy)
