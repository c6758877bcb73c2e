"""The manifest schema: round trip, self-consistency, and refusals that name the file and the field."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from streamer.maps.manifest import (
    MANIFEST_NAME,
    OUTPUT_ORDER,
    ArtifactError,
    BackendParity,
    FileEntry,
    LatentLayout,
    Manifest,
    Parity,
    TensorSpec,
    Tiling,
    check_files,
    expected_outputs,
    read_manifest,
    sha256_file,
    write_manifest,
)
from streamer.maps.preprocess import Preprocessing


def _manifest(tmp: Path, *, n_classes: int = 3, rotation: bool = True, translation: bool = False) -> Manifest:
    """A consistent manifest for a 12×20 patch over two small real files written into ``tmp``."""
    (tmp / "encoder.onnx").write_bytes(b"onnx bytes" * 7)
    (tmp / "encoder.ts").write_bytes(b"torchscript")
    latent = LatentLayout(n_classes=n_classes, latent_dim=2, rotation=rotation, translation=translation)
    outputs = expected_outputs(latent)
    return Manifest(
        name="m",
        version="1.0",
        variant="jrVAE",
        created=datetime(2024, 1, 2, tzinfo=timezone.utc),
        files={
            name: FileEntry(sha256=sha256_file(tmp / name), size=(tmp / name).stat().st_size)
            for name in ("encoder.onnx", "encoder.ts")
        },
        patch=(12, 20),
        preprocessing=Preprocessing(fft="logmag", patch_norm="minmax"),
        tiling=Tiling(layout="grid", stride=(4, 6)),
        input=TensorSpec(name="patches", shape=("batch", 1, 12, 20)),
        outputs=outputs,
        latent=latent,
        class_names=tuple(f"c{k}" for k in range(n_classes)),
        defect_classes=(1,) if n_classes > 1 else (),
        onnx_opset=17,
        parity=Parity(
            n_patches=1024,
            data="test",
            backends=(
                BackendParity(
                    backend="onnx",
                    max_abs_diff={o.name: 1e-7 for o in outputs},
                    argmax_agreement=1.0 if n_classes else None,
                    tolerance=1e-4,
                    passed=True,
                ),
            ),
        ),
    )


def _edit(tmp: Path, change: Any) -> None:
    path = tmp / MANIFEST_NAME
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    m = _manifest(tmp_path, translation=True)
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back == m
    assert back.output_names == ("class_logits", "class_prob", "z_loc", "z_scale", "angle", "shift")
    assert back.preprocessing.fft == "logmag" and back.tiling.stride == (4, 6)
    check_files(tmp_path, back)


@pytest.mark.parametrize(
    ("n_classes", "rotation", "translation"), [(0, False, False), (4, False, True), (2, True, False)]
)
def test_expected_outputs_follow_the_fixed_order(n_classes: int, rotation: bool, translation: bool) -> None:
    specs = expected_outputs(
        LatentLayout(n_classes=n_classes, latent_dim=3, rotation=rotation, translation=translation)
    )
    names = [s.name for s in specs]
    assert names == [n for n in OUTPUT_ORDER if n in names]
    assert ("class_prob" in names) == (n_classes > 0)
    assert ("angle" in names) == rotation and ("shift" in names) == translation
    shapes = {s.name: s.shape for s in specs}
    assert shapes["z_loc"] == ("batch", 3)
    if rotation:
        assert shapes["angle"] == ("batch",)


def test_schema_is_the_model_and_forbids_unknown_fields(tmp_path: Path) -> None:
    schema = Manifest.model_json_schema()
    assert {"patch", "preprocessing", "tiling", "outputs", "latent", "files", "parity", "onnx_opset"} <= set(
        schema["properties"]
    )
    write_manifest(tmp_path, _manifest(tmp_path))
    _edit(tmp_path, lambda raw: raw.update(surprise=1))
    with pytest.raises(ArtifactError, match=r"manifest\.json: manifest invalid: field 'surprise'"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda raw: raw.update(patch=[16, 16]), "field 'input'"),
        (lambda raw: raw.update(class_names=["a"]), "field 'class_names'"),
        (lambda raw: raw.update(defect_classes=[7]), "field 'defect_classes'"),
        (lambda raw: raw["outputs"].pop(), "field 'outputs'"),
        (lambda raw: raw["latent"].update(translation=True), "field 'outputs'"),
        (lambda raw: raw.update(onnx_opset=11), "field 'onnx_opset'"),
        (lambda raw: raw["files"]["encoder.onnx"].update(sha256="xyz"), "field 'files.encoder.onnx.sha256'"),
        (lambda raw: raw["preprocessing"].update(fft="wavelet"), "field 'preprocessing.fft'"),
        (lambda raw: raw.pop("tiling"), "field 'tiling'"),
        (lambda raw: raw.update(format_version=2), "field 'format_version' is 2"),
        (lambda raw: raw.update(frame_stride=[4, 6]), "field 'frame_stride' is set exactly when"),
    ],
)
def test_inconsistent_manifest_is_refused_naming_the_field(tmp_path: Path, change: Any, field: str) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    _edit(tmp_path, change)
    with pytest.raises(ArtifactError) as info:
        read_manifest(tmp_path)
    message = str(info.value)
    assert str(tmp_path / MANIFEST_NAME) in message and field in message, message


def test_unreadable_or_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing file"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object"):
        read_manifest(tmp_path)


def test_check_files_names_the_file_and_the_fault(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    onnx, ts = tmp_path / "encoder.onnx", tmp_path / "encoder.ts"
    data = bytearray(onnx.read_bytes())
    data[3] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"encoder\.onnx: sha256 mismatch"):
        check_files(tmp_path, m)
    onnx.write_bytes(bytes(data[:-1]))
    with pytest.raises(ArtifactError, match=r"encoder\.onnx: size 69 bytes differs .* \(truncated or altered\)"):
        check_files(tmp_path, m)
    ts.unlink()
    with pytest.raises(ArtifactError, match=r"encoder\.ts: missing file"):
        check_files(tmp_path, m, names=("encoder.ts",))
    with pytest.raises(ArtifactError, match=r"has no entry for encoder\.fp16\.onnx"):
        check_files(tmp_path, m, names=("encoder.fp16.onnx",))
