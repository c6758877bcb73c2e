"""An NVIDIA Triton model-repository entry for an exported artifact (the optional remote-encoding backend).

Layout: ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/model.onnx`` (a copy of ``encoder.onnx``). The config uses
the ONNX Runtime backend, the manifest's I/O names, and dims *without* the batch dim, since ``max_batch_size > 0``
makes Triton own that axis. An output that is only the batch axis (``angle``, shape ``["batch"]``) is declared as
``dims: [ 1 ]`` with ``reshape: { shape: [ ] }`` — Triton's documented way to serve a per-item scalar. Dynamic
batching lets many small requests (one frame's patches each) share one GPU call.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from streamer.maps.manifest import MODEL_FILES, Manifest, TensorSpec

__all__ = ["TritonError", "config_pbtxt", "triton_model_name", "write_triton_model"]

DEFAULT_MAX_BATCH = 4096
DEFAULT_PREFERRED = (256, 1024)
DEFAULT_QUEUE_DELAY_US = 500


class TritonError(Exception):
    """A Triton layout that cannot be written (bad model name, batch sizes, or a missing ONNX file)."""


def triton_model_name(name: str) -> str:
    """Triton names a model by its directory: keep letters, digits, ``-``, ``_`` and ``.``; the rest become ``_``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".")
    if not safe:
        raise TritonError(f"model name {name!r} leaves nothing usable as a Triton model directory; rename the run")
    return safe


def _tensor(spec: TensorSpec) -> str:
    dims = [int(d) for d in spec.shape[1:]]
    lines = [f'    name: "{spec.name}"', "    data_type: TYPE_FP32"]
    if dims:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    else:
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_pbtxt(
    manifest: Manifest,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> str:
    """The text of ``config.pbtxt`` for the artifact described by ``manifest``."""
    if max_batch_size < 1:
        raise TritonError(f"max_batch_size={max_batch_size} must be at least 1")
    preferred = [b for b in preferred_batch_sizes if b <= max_batch_size]
    if any(b < 1 for b in preferred):
        raise TritonError(f"preferred batch sizes {list(preferred_batch_sizes)} must be positive")
    batching = "dynamic_batching {\n"
    if preferred:
        batching += f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
    batching += f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
    outputs = ",\n".join(_tensor(o) for o in manifest.outputs)
    return (
        f'name: "{triton_model_name(manifest.name)}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{_tensor(manifest.input)}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"{batching}"
    )


def write_triton_model(
    repo_dir: str | Path,
    artifact_dir: str | Path,
    manifest: Manifest,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> Path:
    """Write ``repo_dir/<name>/config.pbtxt`` and ``repo_dir/<name>/1/model.onnx``; return the model directory."""
    source = Path(artifact_dir) / MODEL_FILES["onnx"]
    if not source.is_file():
        raise TritonError(f"{source} does not exist; a Triton entry needs the artifact's ONNX file")
    text = config_pbtxt(
        manifest,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
    )
    model_dir = Path(repo_dir) / triton_model_name(manifest.name)
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir
