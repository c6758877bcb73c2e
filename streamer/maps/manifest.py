"""The artifact's manifest: everything serving needs to know about an exported encoder, and nothing it must guess.

An artifact is a directory holding ``encoder.onnx``, ``encoder.ts`` (optionally ``encoder.fp16.onnx``) and
``manifest.json``. The manifest is the only channel from training to serving (DESIGN.md), so it records the patch
size, the preprocessing and tiling that training used, the names, order and shapes of the encoder's outputs, the
latent layout, class names, the sha256 and size of every file, and the parity figures measured at export.

``Manifest`` *is* the schema (``Manifest.model_json_schema()`` for a JSON Schema): frozen, ``extra="forbid"``, and it
validates its own consistency — the outputs must be exactly those the latent layout implies, in the fixed order of
``OUTPUT_ORDER`` — so a hand-edited manifest that contradicts itself is refused on read, naming the field.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamer.maps.atoms import Sublattice
from streamer.maps.novelty import NoveltyStats
from streamer.maps.preprocess import Preprocessing

__all__ = [
    "FORMAT_VERSION",
    "FRAME_INPUT_NAME",
    "INPUT_NAME",
    "LOOSER_OUTPUTS",
    "MANIFEST_NAME",
    "MODEL_FILES",
    "OUTPUT_ORDER",
    "TS_METADATA",
    "ArtifactError",
    "BackendParity",
    "ClassHealth",
    "FileEntry",
    "LatentLayout",
    "Manifest",
    "Parity",
    "TensorSpec",
    "Tiling",
    "artifact_identity",
    "check_files",
    "check_parity",
    "expected_outputs",
    "output_bound",
    "read_manifest",
    "read_manifest_and_identity",
    "sha256_file",
    "write_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INPUT_NAME = "patches"
#: backend (or variant) -> file name inside the artifact directory
MODEL_FILES: dict[str, str] = {
    "onnx": "encoder.onnx",
    "torchscript": "encoder.ts",
    "onnx_fp16": "encoder.fp16.onnx",
    "onnx_frame": "encoder.frame.onnx",
}
#: The frame encoder's input (``exporters.frame_encoder``): the frame region a grid covers, ``(1, 1, H, W)``.
FRAME_INPUT_NAME = "frame"
#: JSON embedded in ``encoder.ts`` (``torch.jit.save(_extra_files=...)``): its input name, output names and patch.
TS_METADATA = "atomstream.json"
#: The fixed order of the encoder's outputs; a model without a latent omits its entries and keeps the rest in order.
OUTPUT_ORDER: tuple[str, ...] = (
    "class_logits",
    "class_prob",
    "z_loc",
    "z_scale",
    "angle",
    "shift",
    "recon_nll",
    "recon_residual",
)

#: Outputs compared at a multiple of the parity tolerance. The decoder's redrawing (``models.reconstruction``)
#: amplifies the angle's own rounding between backends (1e-4 rad) by the image's gradient — tens of nats per
#: radian summed over the pixels — so ``recon_nll`` is compared relative to its size and both at 10× the tolerance.
LOOSER_OUTPUTS: dict[str, float] = {"recon_nll": 10.0, "recon_residual": 10.0}


def output_bound(name: str, tolerance: float) -> float:
    """The largest difference output ``name`` may show at parity ``tolerance``: the exporter and the loader both ask."""
    return tolerance * LOOSER_OUTPUTS.get(name, 1.0)


_HASH_CHUNK = 1 << 20
#: A manifest is a few kilobytes; a "manifest" of gigabytes is an attack on the loader, refused before it is read.
MAX_MANIFEST_BYTES = 1 << 20


class ArtifactError(Exception):
    """An artifact that cannot be trusted: the message names the file (and field) and what is wrong with it."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TensorSpec(_Frozen):
    """A named tensor; ``shape`` uses ``"batch"`` for the dynamic leading axis, e.g. ``["batch", 4]``."""

    name: str = Field(min_length=1)
    shape: tuple[int | Literal["batch"], ...]
    dtype: Literal["float32"] = "float32"


class Tiling(_Frozen):
    """Default tiling of live frames: a regular grid, or patches centred on atoms found with these parameters."""

    layout: Literal["grid", "points"] = "grid"
    stride: tuple[int, int] = (8, 8)
    origin: tuple[int, int] = (0, 0)
    atom_sigma: float = Field(1.5, ge=0)
    atom_min_distance: int = Field(5, ge=1)
    atom_threshold: float = Field(0.2, ge=0, le=1)
    atom_sublattice: Sublattice = "all"

    @model_validator(mode="after")
    def _check(self) -> Tiling:
        if min(self.stride) < 1:
            raise ValueError(f"stride {self.stride} must be at least 1 pixel in each direction")
        if min(self.origin) < 0:
            raise ValueError(f"origin {self.origin} must be non-negative")
        return self


class LatentLayout(_Frozen):
    n_classes: int = Field(ge=0, le=64)
    latent_dim: int = Field(ge=1, le=64)
    rotation: bool
    translation: bool
    reconstruction_pixels: int = Field(
        0,
        ge=0,
        description="0, or how many values of the patch the graph redraws from the posterior means — every pixel "
        "of a small patch, about 64 block means of a larger one (models.reconstruction.REDRAW_PIXELS) — returning "
        "recon_nll (B,) and recon_residual (B, pixels) for the defect score (models.reconstruction)",
    )


class BackendParity(_Frozen):
    """How far one exported backend is from the Pyro guide's posterior means, per output (max |Δ|).

    ``angle`` is compared on the circle (the wrapped difference), so ±π count as equal.
    """

    backend: Literal["onnx", "torchscript", "onnx_fp16", "onnx_frame"]
    max_abs_diff: dict[str, float]
    argmax_agreement: float | None = Field(None, ge=0, le=1)  # fraction of patches with the same class argmax
    tolerance: float = Field(gt=0)
    passed: bool

    def bound(self, name: str) -> float:
        return output_bound(name, self.tolerance)


class Parity(_Frozen):
    reference: str = "JTrVAE.encode (posterior means of the Pyro guide, eager PyTorch)"
    n_patches: int = Field(ge=1)
    data: str = Field(min_length=1)  # which patches: a file and how they were cut, or a plain "random ..." fallback
    backends: tuple[BackendParity, ...]


def expected_outputs(latent: LatentLayout) -> tuple[TensorSpec, ...]:
    """The outputs a model with this latent layout has, in ``OUTPUT_ORDER`` — shared by exporter and manifest."""
    k, d = latent.n_classes, latent.latent_dim
    specs: list[TensorSpec] = []
    if k > 0:
        specs += [
            TensorSpec(name="class_logits", shape=("batch", k)),
            TensorSpec(name="class_prob", shape=("batch", k)),
        ]
    specs += [TensorSpec(name="z_loc", shape=("batch", d)), TensorSpec(name="z_scale", shape=("batch", d))]
    if latent.rotation:
        specs.append(TensorSpec(name="angle", shape=("batch",)))
    if latent.translation:
        specs.append(TensorSpec(name="shift", shape=("batch", 2)))
    if latent.reconstruction_pixels:
        specs += [
            TensorSpec(name="recon_nll", shape=("batch",)),
            TensorSpec(name="recon_residual", shape=("batch", latent.reconstruction_pixels)),
        ]
    return tuple(specs)


class ClassHealth(_Frozen):
    """The class-collapse diagnosis of the trained model (``models.evaluate.diagnose_classes``), as exported.

    Carried so that whoever serves the artifact can see whether its class map means anything: a collapsed model
    is refused by ``atomstream export`` unless forced, and then this says so.
    """

    collapsed: bool
    reason: str = ""
    mutual_information: float = Field(ge=0)  # I(x; y) in nats on the training patches
    information_ratio: float = Field(ge=0)  # I(x; y) / log K
    mean_max_prob: float = Field(ge=0, le=1)
    usage: tuple[float, ...]  # argmax share of each class on the training patches


class Manifest(_Frozen):
    """``manifest.json`` of an artifact (see the module docstring)."""

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    variant: str = Field(min_length=1)  # the paper's name: jtrVAE, jrVAE, rVAE, ...
    created: datetime
    files: dict[str, FileEntry]
    patch: tuple[int, int]
    preprocessing: Preprocessing
    tiling: Tiling
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    latent: LatentLayout
    class_names: tuple[str, ...]
    defect_classes: tuple[int, ...] = ()  # class indices the service flags as defects by default
    # the class-free defect score's training statistics and calibration (streamer.maps.novelty); None: not calibrated
    novelty: NoveltyStats | None = None
    onnx_opset: int = Field(ge=17)
    parity: Parity
    class_health: ClassHealth | None = None  # None for models without classes or from before the diagnosis
    frame_stride: tuple[int, int] | None = Field(
        None,
        description="the grid stride encoder.frame.onnx was built for (exporters.frame_encoder: every grid patch's "
        "outputs from the normalised frame, without cutting the patches); set exactly when that file is listed",
    )

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        ph, pw = self.patch
        if ph < 4 or pw < 4:
            raise ValueError(f"field 'patch' {list(self.patch)} is too small: each side needs at least 4 pixels")
        want_input = TensorSpec(name=INPUT_NAME, shape=("batch", 1, ph, pw))
        if self.input != want_input:
            raise ValueError(
                f"field 'input' is {self.input.name!r} {list(self.input.shape)}, but field 'patch' {list(self.patch)} "
                f"needs {INPUT_NAME!r} {list(want_input.shape)}"
            )
        want = expected_outputs(self.latent)
        if self.outputs != want:
            raise ValueError(
                f"field 'outputs' {[(o.name, list(o.shape)) for o in self.outputs]} does not match field 'latent', "
                f"which implies {[(o.name, list(o.shape)) for o in want]}"
            )
        if len(self.class_names) != self.latent.n_classes:
            raise ValueError(
                f"field 'class_names' has {len(self.class_names)} names but latent.n_classes={self.latent.n_classes}"
            )
        bad = [c for c in self.defect_classes if not 0 <= c < self.latent.n_classes]
        if bad:
            raise ValueError(f"field 'defect_classes' has {bad}, not class indices 0..{self.latent.n_classes - 1}")
        unknown = sorted(set(self.files) - set(MODEL_FILES.values()))
        if unknown:
            raise ValueError(
                f"field 'files' lists {unknown}, which are not artifact files {sorted(MODEL_FILES.values())}"
            )
        if not {MODEL_FILES["onnx"], MODEL_FILES["torchscript"]} & set(self.files):
            raise ValueError("field 'files' lists neither encoder.onnx nor encoder.ts: the artifact has no model")
        self._check_frame_encoder()
        return self

    def _check_frame_encoder(self) -> None:
        listed = MODEL_FILES["onnx_frame"] in self.files
        if listed != (self.frame_stride is not None):
            raise ValueError(
                "field 'frame_stride' is set exactly when field 'files' lists encoder.frame.onnx: "
                f"frame_stride={self.frame_stride}, listed={listed}"
            )
        if self.frame_stride is None:
            return
        if self.tiling.layout != "grid" or tuple(self.frame_stride) != tuple(self.tiling.stride):
            raise ValueError(
                f"field 'frame_stride' {list(self.frame_stride)} must be the grid's stride "
                f"{list(self.tiling.stride)} (tiling.layout={self.tiling.layout!r})"
            )
        p = self.preprocessing
        if p.fft != "none" or p.patch_norm != "none":
            raise ValueError("a frame encoder reads the normalised frame: preprocessing must have no per-patch steps")

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(artifact_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` (indented, stable key order) and return its path."""
    path = Path(artifact_dir) / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"field {where!r}: {msg}" if where else msg)
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json``; ``ArtifactError`` names the file and the offending field."""
    return read_manifest_and_identity(artifact_dir)[0]


def artifact_identity(manifest_bytes: bytes) -> str:
    """The model's identity: the sha256 of ``manifest.json`` as stored.

    The manifest records the sha256 and size of every file of the artifact (each checked at load) and every setting
    serving uses — class names, stride, preprocessing, defect classes, parity — so this one digest changes when
    anything of the artifact does. It is what maps and ``model_info`` publish as ``model.sha256``.
    """
    return hashlib.sha256(manifest_bytes).hexdigest()


def read_manifest_and_identity(artifact_dir: str | Path) -> tuple[Manifest, str]:
    """``read_manifest`` plus ``artifact_identity`` of the very bytes validated (read once: no swap in between)."""
    path = Path(artifact_dir) / MANIFEST_NAME
    if not Path(artifact_dir).is_dir():
        raise ArtifactError(
            f"artifact directory {str(artifact_dir)!r} does not exist; export one with atomstream export"
        )
    if not path.is_file():
        raise ArtifactError(f"{path}: missing file; an artifact needs manifest.json next to the encoder files")
    with open(path, "rb") as fh:
        data = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: manifest invalid: larger than {MAX_MANIFEST_BYTES} bytes; re-export the artifact")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: manifest invalid: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: manifest invalid: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: manifest invalid: field 'format_version' is {raw.get('format_version')!r}, this atomstream "
            f"reads version {FORMAT_VERSION}; re-export the artifact"
        )
    try:
        return Manifest.model_validate(raw), artifact_identity(data)
    except ValidationError as exc:
        raise ArtifactError(f"{path}: manifest invalid: {_describe(exc)}") from None


#: The parity entry that vouches for each model file.
PARITY_OF_FILE = {file: backend for backend, file in MODEL_FILES.items()}


def check_parity(artifact_dir: str | Path, manifest: Manifest, file_name: str) -> None:
    """The export measured ``file_name`` against the reference and it passed; otherwise the artifact is refused.

    An exporter never writes a manifest for a failed export, so ``passed: false`` or a difference beyond the recorded
    tolerance means a hand-edited or half-made artifact: its maps would be plausible and wrong.
    """
    backend = PARITY_OF_FILE.get(file_name)
    where = Path(artifact_dir) / MANIFEST_NAME
    entries = [b for b in manifest.parity.backends if b.backend == backend]
    if not entries:
        raise ArtifactError(f"{where}: field 'parity' has no entry for {backend} ({file_name}); re-export the artifact")
    for entry in entries:
        over = {k: v for k, v in entry.max_abs_diff.items() if not v <= entry.bound(k)}
        if not entry.passed or over:
            detail = f"differences {over} exceed tolerance {entry.tolerance}" if over else "passed is false"
            raise ArtifactError(
                f"{where}: field 'parity' for {backend}: the export did not pass its parity check ({detail}); "
                "this artifact's outputs are not trusted — re-export it"
            )


def check_files(
    artifact_dir: str | Path,
    manifest: Manifest,
    names: tuple[str, ...] | None = None,
    *,
    max_bytes: int | None = None,
) -> None:
    """Each listed file exists, has the recorded size (else: truncated or grown) and the recorded sha256.

    ``max_bytes``: refuse, before hashing anything, an artifact whose files add up to more (hashing 20 GB is half a
    minute of a loader thread and of the disk).
    """
    root = Path(artifact_dir)
    names = names if names is not None else tuple(manifest.files)
    if max_bytes is not None:
        total = sum(manifest.files[n].size for n in names if n in manifest.files)
        if total > max_bytes:
            raise ArtifactError(
                f"{root / MANIFEST_NAME}: the artifact's files add up to {total} bytes, over the limit of {max_bytes} "
                "(max_artifact_bytes in the serve config)"
            )
    for name in names:
        entry = manifest.files.get(name)
        path = root / name
        if entry is None:
            raise ArtifactError(
                f"{root / MANIFEST_NAME}: field 'files' has no entry for {name}; re-export the artifact"
            )
        if not path.is_file():
            raise ArtifactError(f"{path}: missing file listed in the manifest; copy the whole artifact directory")
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(
                f"{path}: size {size} bytes differs from the manifest's {entry.size} (truncated or altered); "
                "copy the artifact again"
            )
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ArtifactError(
                f"{path}: sha256 mismatch: file has {digest[:16]}…, manifest says {entry.sha256[:16]}… "
                "(corrupt or altered); copy the artifact again"
            )
