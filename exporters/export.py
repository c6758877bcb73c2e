"""Export a trained run as an artifact: ``encoder.ts``, ``encoder.onnx`` (+ ``encoder.fp16.onnx``), ``manifest.json``.

Order matters: the model files are written first, parity is measured on them, and only then is the manifest written
— an export that fails parity leaves no manifest (and removes the files it wrote), so nothing half-checked can be
loaded by the server. The manifest copies the run's preprocessing and tiling from ``RunConfig.data``, which is how
serving cuts and transforms live frames exactly as training did.

TorchScript is produced by tracing (the wrapper is pure tensor code with no data-dependent control flow; parity on
uneven batch sizes proves the batch axis stayed dynamic). ONNX uses the TorchScript-based exporter
(``dynamo=False``): it needs no network, takes milliseconds, and handles every op the encoders use.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from exporters.frame_encoder import FrameEncoder, frame_encoder_for
from exporters.quiet import quiet_export_warnings
from exporters.verify import check_frame_parity, check_parity
from exporters.wrapper import InferenceWrapper, redraw_of
from models.config import ModelConfig, RunConfig
from models.jtrvae import JTrVAE
from models.reconstruction import redrawn_values
from streamer.maps.manifest import (
    FRAME_INPUT_NAME,
    INPUT_NAME,
    MANIFEST_NAME,
    MODEL_FILES,
    TS_METADATA,
    ClassHealth,
    FileEntry,
    LatentLayout,
    Manifest,
    TensorSpec,
    Tiling,
    sha256_file,
    write_manifest,
)
from streamer.maps.novelty import NoveltyStats

__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "ExportError",
    "build_wrapper",
    "export_frame_onnx",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "latent_layout",
]

DEFAULT_OPSET = 17
MAX_OPSET = 20  # the newest opset torch's TorchScript-based ONNX exporter writes
_EXAMPLE_BATCH = 2


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ExportError(Exception):
    """An export that cannot be made as asked (bad opset, bad defect classes, unwritable directory)."""


def latent_layout(cfg: ModelConfig, *, reconstruction: bool = False) -> LatentLayout:
    return LatentLayout(
        n_classes=cfg.n_classes,
        latent_dim=cfg.latent_dim,
        rotation=cfg.rotation,
        translation=cfg.translation,
        reconstruction_pixels=redrawn_values((int(cfg.patch[0]), int(cfg.patch[1]))) if reconstruction else 0,
    )


def build_wrapper(model: JTrVAE, *, fp16: bool = False, reconstruction: bool = False) -> InferenceWrapper:
    """A CPU, eval-mode copy of the model's encoder network (and, with ``reconstruction``, its decoder), wrapped;
    the model itself is left untouched. The decoder stays float32 in an fp16 export (``models.reconstruction``)."""
    encoder = _frozen_cpu_copy(model.encoder, torch.float16 if fp16 else torch.float32)
    redraw = _frozen_cpu_copy(redraw_of(model), torch.float32) if reconstruction else None
    layout = latent_layout(model.cfg, reconstruction=reconstruction)
    return InferenceWrapper(encoder, layout, tuple(model.cfg.patch), fp16=fp16, redraw=redraw).eval()


def _frame_encoder(wrapper: InferenceWrapper, run: RunConfig) -> FrameEncoder | None:
    """The frame encoder for this export, or None where the grid's patches must be cut (points, per-patch steps,
    an encoder the frame formulation does not cover)."""
    spec = run.data.preprocessing
    if run.data.kind == "atoms" or spec.fft != "none" or spec.patch_norm != "none":
        return None
    return frame_encoder_for(wrapper, (int(run.data.stride[0]), int(run.data.stride[1])))


def _frozen_cpu_copy(module: ModuleT, dtype: torch.dtype) -> ModuleT:
    """An eval-mode CPU copy in ``dtype`` with no gradients, leaving ``module`` as it was."""
    out = copy.deepcopy(module).to("cpu", dtype).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _example(wrapper: InferenceWrapper) -> Tensor:
    return torch.rand((_EXAMPLE_BATCH, 1, *wrapper.patch), generator=torch.Generator().manual_seed(0))


def export_torchscript(wrapper: InferenceWrapper, path: str | Path) -> Path:
    """Trace and save, embedding the I/O description (``TS_METADATA``) that ``streamer.maps.encoder`` checks."""
    meta = {"input": INPUT_NAME, "outputs": list(wrapper.output_names), "patch": list(wrapper.patch)}
    with quiet_export_warnings(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (_example(wrapper),), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TS_METADATA: json.dumps(meta)})
    return Path(path)


def export_onnx(wrapper: InferenceWrapper, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """ONNX with a dynamic ``batch`` axis on the input and on every output; checked with ``onnx.checker``."""
    names = list(wrapper.output_names)
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]}
    return _write_onnx(wrapper, _example(wrapper), path, INPUT_NAME, names, axes, opset=opset)


def export_frame_onnx(frame: FrameEncoder, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """``encoder.frame.onnx``: input ``frame`` ``(1, 1, H, W)`` with dynamic H and W, outputs over ``batch`` patches
    (as ``encoder.onnx``'s, in its order); checked with ``onnx.checker``."""
    (ph, pw), (sy, sx) = frame.patch, frame.stride
    example = torch.rand((1, 1, ph + 3 * sy, pw + 2 * sx), generator=torch.Generator().manual_seed(0))
    names = list(frame.wrapper.output_names)
    axes: dict[str, dict[int, str]] = {FRAME_INPUT_NAME: {2: "height", 3: "width"}}
    axes.update({name: {0: "batch"} for name in names})
    with warnings.catch_warnings():
        # the box sums' strided slices read a running sum, which is no constant: nothing to fold, nothing lost
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        return _write_onnx(frame, example, path, FRAME_INPUT_NAME, names, axes, opset=opset)


def _write_onnx(
    module: nn.Module,
    example: Tensor,
    path: str | Path,
    input_name: str,
    names: list[str],
    axes: dict[str, dict[int, str]],
    *,
    opset: int,
) -> Path:
    """Trace ``module`` on ``example`` to an ONNX file and check it; a failure is an ``ExportError`` naming it."""
    import onnx

    try:
        with quiet_export_warnings(), torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        onnx.checker.check_model(str(path))
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export at opset {opset} failed: {first}; try opset={DEFAULT_OPSET}") from exc
    return Path(path)


def _tiling(run: RunConfig) -> Tiling:
    d = run.data
    return Tiling(
        layout="points" if d.kind == "atoms" else "grid",
        stride=d.stride,
        origin=d.origin,
        atom_sigma=d.atom_sigma,
        atom_min_distance=d.atom_min_distance,
        atom_threshold=d.atom_threshold,
        atom_sublattice=d.atom_sublattice,
    )


def export_model(
    model: JTrVAE,
    run: RunConfig,
    out_dir: str | Path,
    *,
    parity_patches: Tensor,
    parity_data: str,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    defect_classes: Sequence[int] = (),
    novelty: NoveltyStats | None = None,
    class_health: dict | None = None,
    frame_encoder: bool = True,
) -> Manifest:
    """Write the artifact for ``model`` (trained with ``run``) to ``out_dir`` and return its manifest.

    ``parity_patches`` ``(N >= 1024, 1, ph, pw)`` are encoder-ready patches and ``parity_data`` says what they are
    (it is recorded in the manifest). ``novelty`` is the defect score's training statistics and calibration
    (``exporters.calibrate.calibrate_novelty``); without it the server calibrates on each frame.
    Raises ``exporters.verify.ParityError`` when a backend disagrees.
    ``class_health`` is the run's class diagnosis (``models.checkpoint.load_diagnosis``), copied into the manifest;
    refusing a collapsed model is the caller's decision (``atomstream export`` refuses unless ``--force``).
    ``frame_encoder``: also write ``encoder.frame.onnx`` (``exporters.frame_encoder``) where the model and its
    tiling allow it — a grid, no per-patch preprocessing, the MLP encoder — so a server encodes grid frames
    without cutting the patches; it is held to the same parity as the others.
    """
    if not DEFAULT_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset={opset} is outside {DEFAULT_OPSET}..{MAX_OPSET}; use opset={DEFAULT_OPSET}")
    if model.cfg != run.model:
        raise ExportError("the model was built from a different ModelConfig than run.model; export the run's own model")
    bad = [c for c in defect_classes if not 0 <= c < run.model.n_classes]
    if bad:
        raise ExportError(f"defect classes {bad} are not class indices 0..{run.model.n_classes - 1}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A stale manifest must never vouch for new files, nor a stale model file outlive the export that replaces it.
    for stale in (MANIFEST_NAME, *MODEL_FILES.values()):
        (out / stale).unlink(missing_ok=True)
    files: dict[str, Path] = {
        "onnx": out / MODEL_FILES["onnx"],
        "torchscript": out / MODEL_FILES["torchscript"],
    }
    reconstruction = novelty is not None and novelty.needs_reconstruction
    wrapper = build_wrapper(model, reconstruction=reconstruction)
    frame = _frame_encoder(wrapper, run) if frame_encoder else None
    try:
        export_torchscript(wrapper, files["torchscript"])
        export_onnx(wrapper, files["onnx"], opset=opset)
        if fp16:
            files["onnx_fp16"] = out / MODEL_FILES["onnx_fp16"]
            export_onnx(build_wrapper(model, fp16=True, reconstruction=reconstruction), files["onnx_fp16"], opset=opset)
        parity = check_parity(model, wrapper.latent, files, parity_patches, data=parity_data)
        if frame is not None:
            files["onnx_frame"] = export_frame_onnx(frame, out / MODEL_FILES["onnx_frame"], opset=opset)
            frame_parity = check_frame_parity(model, wrapper.latent, files["onnx_frame"], parity_patches, frame.stride)
            parity = parity.model_copy(update={"backends": (*parity.backends, frame_parity)})
    except BaseException:
        for path in files.values():
            path.unlink(missing_ok=True)
        raise
    m = run.model
    manifest = Manifest(
        name=run.name,
        version=run.version,
        variant=m.variant,
        created=datetime.now(timezone.utc),
        files={p.name: FileEntry(sha256=sha256_file(p), size=p.stat().st_size) for p in files.values()},
        patch=tuple(m.patch),
        preprocessing=run.data.preprocessing,
        tiling=_tiling(run),
        input=TensorSpec(name=INPUT_NAME, shape=("batch", 1, *m.patch)),
        outputs=wrapper.outputs,
        latent=wrapper.latent,
        class_names=m.names_of_classes(),
        defect_classes=tuple(defect_classes),
        novelty=novelty,
        onnx_opset=opset,
        parity=parity,
        class_health=None
        if class_health is None
        else ClassHealth.model_validate({k: v for k, v in class_health.items() if k in ClassHealth.model_fields}),
        frame_stride=frame.stride if frame is not None else None,
    )
    write_manifest(out, manifest)
    return manifest
