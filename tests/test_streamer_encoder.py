"""``streamer.maps.encoder.load``: real exported artifacts, both backends, and every way an artifact can be refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from artifact_factory import make_artifact

from streamer.maps.encoder import ArtifactError, Encoder, EncoderError, load
from streamer.maps.manifest import MANIFEST_NAME, read_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("artifact"), patch=(12, 20), translation=True)


@pytest.fixture
def copy_of(artifact: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def _patches(n: int, patch: tuple[int, int] = (12, 20), seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, *patch), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_load_returns_named_outputs_on_cpu(artifact: Path, backend: Any) -> None:
    enc = load(artifact, backend=backend, device="cpu", batch_sizes=(1, 5))
    assert isinstance(enc, Encoder)
    assert (enc.backend, enc.device, enc.torch_device) == (backend, "cpu", torch.device("cpu"))
    file = "encoder.onnx" if backend == "onnx" else "encoder.ts"
    assert enc.file_sha256 == sha256_file(artifact / file) == enc.manifest.files[file].sha256
    assert enc.sha256 == sha256_file(artifact / "manifest.json")  # the identity pins every file through the manifest
    assert enc.providers == (("CPUExecutionProvider",) if backend == "onnx" else ())
    out = enc(_patches(7))
    assert list(out) == ["class_logits", "class_prob", "z_loc", "z_scale", "angle", "shift"]
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "class_logits": (7, 3),
        "class_prob": (7, 3),
        "z_loc": (7, 2),
        "z_scale": (7, 2),
        "angle": (7,),
        "shift": (7, 2),
    }
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in out.values())
    assert torch.allclose(out["class_prob"].sum(-1), torch.ones(7), atol=1e-6)
    assert bool((out["z_scale"] > 0).all()) and bool((out["angle"].abs() <= torch.pi).all())


def test_backends_agree_with_each_other(artifact: Path) -> None:
    x = _patches(300, seed=5)
    a = load(artifact, backend="onnx", device="cpu", batch_sizes=(1,))(x)
    b = {k: v.cpu() for k, v in load(artifact, backend="torchscript", device="auto", batch_sizes=(1,))(x).items()}
    for name in a:
        diff = a[name] - b[name]
        if name == "angle":
            diff = torch.remainder(diff + torch.pi, 2 * torch.pi) - torch.pi
        assert float(diff.abs().max()) <= 1e-4, name
    assert torch.equal(a["class_prob"].argmax(-1), b["class_prob"].argmax(-1))


def test_call_checks_its_input(artifact: Path) -> None:
    enc = load(artifact, device="cpu", batch_sizes=(1,))
    with pytest.raises(EncoderError, match=r"shape \(B, 1, 12, 20\), got \(2, 1, 20, 12\)"):
        enc(torch.zeros(2, 1, 20, 12))
    with pytest.raises(EncoderError, match="must be float"):
        enc(torch.zeros(2, 1, 12, 20, dtype=torch.uint8))
    empty = enc(torch.zeros(0, 1, 12, 20))
    assert empty["class_prob"].shape == (0, 3) and empty["angle"].shape == (0,)
    x = _patches(3)
    assert torch.equal(enc(x.double())["z_loc"], enc(x)["z_loc"])


def test_bad_arguments(artifact: Path) -> None:
    with pytest.raises(EncoderError, match="backend 'tensorrt'"):
        load(artifact, backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(EncoderError, match="intra_op_threads=0"):
        load(artifact, intra_op_threads=0)
    with pytest.raises(ArtifactError, match=r"lists no encoder\.fp16\.onnx"):
        load(artifact, fp16=True)
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="device 'cuda' requested"):
            load(artifact, device="cuda")


def test_flipped_byte_in_onnx_is_refused(copy_of: Path) -> None:
    path = copy_of / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    for backend in ("onnx", "torchscript"):  # a damaged artifact is refused whole, whichever file is used
        with pytest.raises(ArtifactError, match=rf"{path}: sha256 mismatch"):
            load(copy_of, backend=backend)  # type: ignore[arg-type]


def test_truncated_and_missing_files_are_refused(copy_of: Path) -> None:
    ts = copy_of / "encoder.ts"
    ts.write_bytes(ts.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"encoder\.ts: size .* \(truncated or altered\)"):
        load(copy_of, backend="torchscript")
    ts.unlink()
    with pytest.raises(ArtifactError, match=r"encoder\.ts: missing file"):
        load(copy_of)


def _edit(root: Path, change: Any) -> None:
    path = root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_edited_manifest_hash_is_refused(copy_of: Path) -> None:
    _edit(copy_of, lambda raw: raw["files"]["encoder.onnx"].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match=r"encoder\.onnx: sha256 mismatch.*manifest says 0000"):
        load(copy_of)


def test_changed_patch_size_is_refused_naming_the_field(copy_of: Path) -> None:
    _edit(copy_of, lambda raw: raw.update(patch=[16, 16]))
    with pytest.raises(
        ArtifactError, match=r"manifest\.json: manifest invalid: field 'input'.*field 'patch' \[16, 16\]"
    ):
        load(copy_of)

    def consistent(raw: dict) -> None:  # the manifest agrees with itself, but not with the model files
        raw["patch"] = [16, 16]
        raw["input"]["shape"] = ["batch", 1, 16, 16]

    _edit(copy_of, consistent)
    with pytest.raises(
        ArtifactError, match=r"encoder\.onnx: patch size differs.*\[1, 12, 20\].*'patch' says \[16, 16\]"
    ):
        load(copy_of, backend="onnx")
    with pytest.raises(ArtifactError, match=r"encoder\.ts: patch size differs.*\[12, 20\].*'patch' says \[16, 16\]"):
        load(copy_of, backend="torchscript")


def test_output_names_differing_from_the_model_are_refused(copy_of: Path) -> None:
    def no_shift(raw: dict) -> None:
        raw["latent"]["translation"] = False
        raw["outputs"] = [o for o in raw["outputs"] if o["name"] != "shift"]
        for b in raw["parity"]["backends"]:
            b["max_abs_diff"].pop("shift")

    _edit(copy_of, no_shift)
    read_manifest(copy_of)  # valid on its own
    for backend, file in (("onnx", "encoder.onnx"), ("torchscript", "encoder.ts")):
        with pytest.raises(ArtifactError, match=rf"{file}: output names in the model .*'shift'.* differ"):
            load(copy_of, backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_classes=0, rotation=False, translation=False), dict(n_classes=2, rotation=False, translation=True)],
)
def test_other_variants_export_and_load(tmp_path: Path, kwargs: dict) -> None:
    root = make_artifact(tmp_path, patch=(8, 8), layout="points", **kwargs)
    enc = load(root, backend="onnx", device="cpu", batch_sizes=(2,))
    names = list(enc(torch.rand(4, 1, 8, 8)))
    assert names == list(enc.manifest.output_names)
    assert ("class_prob" in names) == (kwargs["n_classes"] > 0) and ("angle" in names) is False
    assert enc.manifest.tiling.layout == "points"


def test_make_artifact_is_deterministic(artifact: Path, tmp_path: Path) -> None:
    again = make_artifact(tmp_path, patch=(12, 20), translation=True)
    assert sha256_file(again / "encoder.onnx") == sha256_file(artifact / "encoder.onnx")
    x = _patches(16, seed=9)
    a, b = load(artifact, backend="torchscript")(x), load(again, backend="torchscript")(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_needs_no_pyro_nor_training_code(artifact: Path) -> None:
    code = (
        "import sys\n"
        "for m in ('pyro', 'models', 'exporters', 'onnx'):\n"
        "    sys.modules[m] = None\n"
        "import torch\n"
        "from streamer.maps.encoder import load\n"
        f"enc = load({str(artifact)!r}, backend='onnx', device='cpu')\n"
        "out = enc(torch.rand(3, 1, 12, 20))\n"
        f"enc2 = load({str(artifact)!r}, backend='torchscript', device='cpu')\n"
        "print(sorted(out), tuple(enc2(torch.rand(2, 1, 12, 20))['z_loc'].shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'class_prob'" in result.stdout and "(2, 2)" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_cuda_backends_match_cpu(artifact: Path, backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "onnx":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    gpu = load(artifact, backend=backend, device="cuda", batch_sizes=(1, 64))  # type: ignore[arg-type]
    cpu = load(artifact, backend=backend, device="cpu", batch_sizes=(1,))  # type: ignore[arg-type]
    assert gpu.device == "cuda" and gpu.torch_device.type == "cuda"
    x = _patches(300, seed=11)
    got, want = gpu(x.cuda()), cpu(x)
    for name in want:
        assert got[name].device.type == "cuda"
        diff = got[name].cpu() - want[name]
        if name == "angle":
            diff = torch.remainder(diff + torch.pi, 2 * torch.pi) - torch.pi
        assert float(diff.abs().max()) <= 1e-4, name
