"""Serving-side encoder: an exported artifact behind one call, ``patches -> {output name: tensor}``.

``load`` trusts nothing it has not checked: the manifest must validate, every file must have its recorded size and
sha256, the export's parity check for the chosen file must have passed, and the model itself must agree with the
manifest (input patch size, output names and order, output shapes
at every warm-up batch size). Anything else is an ``ArtifactError`` naming the file and what is wrong, because a
silently mismatched encoder produces plausible-looking but wrong maps.

Two backends: ONNX Runtime (CUDA provider with IOBinding when present, so device tensors never leave the GPU; the
CPU provider otherwise) and TorchScript. Neither needs Pyro or the training code. ONNX Runtime on the CPU needs no
torch either: it takes and returns numpy arrays, and torch is imported only for TorchScript or a CUDA device
(``streamer.maps.arrays.require_torch``, which says what to install when it is missing).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from streamer.maps.arrays import Array, is_floating, is_tensor, require_torch, to_host, zeros
from streamer.maps.manifest import (
    FRAME_INPUT_NAME,
    INPUT_NAME,
    MODEL_FILES,
    TS_METADATA,
    ArtifactError,
    Manifest,
    TensorSpec,
    check_files,
    check_parity,
    read_manifest_and_identity,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ArtifactError", "Backend", "Encoder", "EncoderError", "load"]

Backend = Literal["onnx", "torchscript"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
_MAX_DEFAULT_THREADS = 4


class EncoderError(ValueError):
    """A bad argument to ``load`` or a bad input batch (wrong shape or dtype, device not available)."""


class _Runner(Protocol):
    def __call__(self, x: Array) -> list[Array]: ...


def _shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    return tuple(batch if d == "batch" else int(d) for d in spec.shape)


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is deprecated upstream and says so on every call; the artifact format still uses it.

    torch < 2.14 says it with a DeprecationWarning, 2.14 with a FutureWarning.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        yield


def _session_options(intra_op_threads: int) -> Any:
    """The service's ONNX Runtime session options: its own thread count, sequential, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads burn the cores the service's ingest and publish threads need on a small box.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _ort_session(path: Path, options: Any, providers: list[Any]) -> Any:
    """An ONNX Runtime session of ``path``; an unreadable model is an ``ArtifactError`` naming the file."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
        raise ArtifactError(f"{path}: ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None


def _check_output_names(path: Path, session: Any, manifest: Manifest) -> None:
    """The model's outputs must be the manifest's, in its order: the maps are named by position."""
    names = [o.name for o in session.get_outputs()]
    if names != list(manifest.output_names):
        raise ArtifactError(
            f"{path}: output names in the model {names} differ from the manifest's field 'outputs' "
            f"{list(manifest.output_names)}"
        )


class _OrtRunner:
    """ONNX Runtime session; on CUDA, inputs and outputs are bound to torch device memory (no host round trip)."""

    def __init__(self, path: Path, manifest: Manifest, *, cuda: bool, device_id: int, intra_op_threads: int) -> None:
        options = _session_options(intra_op_threads)
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if cuda:
            # TF32 matmuls would trade the fp32 parity measured at export (1e-4) for speed; the fp16 file is for that.
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": str(device_id), "use_tf32": "0"}))
        self.session = _ort_session(path, options, providers)
        self.providers = tuple(self.session.get_providers())
        self.cuda = cuda and self.providers[0] == "CUDAExecutionProvider"
        self.device_id = device_id
        self.outputs = manifest.outputs
        self._check_io(path, manifest)

    def _check_io(self, path: Path, manifest: Manifest) -> None:
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise ArtifactError(
                f"{path}: model inputs {[i.name for i in inputs]} differ from the manifest's ['patches']"
            )
        dims = list(inputs[0].shape)
        want = [1, *manifest.patch]
        if len(dims) != 4 or dims[1:] != want:
            raise ArtifactError(
                f"{path}: patch size differs: the model takes {dims[1:]} (channels, height, width) but the "
                f"manifest's field 'patch' says {list(manifest.patch)}"
            )
        _check_output_names(path, self.session, manifest)

    def __call__(self, x: Array) -> list[Array]:
        """numpy in, numpy out (no torch); a tensor in, tensors out (on CUDA bound to device memory: no host copy)."""
        if self.cuda and is_tensor(x):
            return self._run_bound(x)
        feed = {INPUT_NAME: np.ascontiguousarray(to_host(x), dtype=np.float32)}
        outs = [np.ascontiguousarray(a) for a in self.session.run(None, feed)]
        return [sys.modules["torch"].from_numpy(a) for a in outs] if is_tensor(x) else outs

    def _run_bound(self, x: torch.Tensor) -> list[torch.Tensor]:
        torch = sys.modules["torch"]
        device = torch.device("cuda", self.device_id)
        x = x.detach().to(device, torch.float32).contiguous()
        batch = int(x.shape[0])
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", self.device_id, np.float32, tuple(x.shape), x.data_ptr())
        outs = [torch.empty(_shape(spec, batch), device=device, dtype=torch.float32) for spec in self.outputs]
        for spec, out in zip(self.outputs, outs, strict=True):
            binding.bind_output(spec.name, "cuda", self.device_id, np.float32, tuple(out.shape), out.data_ptr())
        # ORT runs on its own stream: the input must be fully written by torch's stream before ORT reads it.
        torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs


class _OrtFrameRunner:
    """``encoder.frame.onnx`` on ONNX Runtime's CPU provider: a normalised frame region in, every grid patch's
    outputs out (``exporters.frame_encoder``). Host numpy only: the GPU path keeps its device patches."""

    def __init__(self, path: Path, manifest: Manifest, *, intra_op_threads: int) -> None:
        self.session = _ort_session(path, _session_options(intra_op_threads), ["CPUExecutionProvider"])
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [FRAME_INPUT_NAME]:
            raise ArtifactError(f"{path}: model inputs {inputs} differ from the frame encoder's ['frame']")
        _check_output_names(path, self.session, manifest)

    def __call__(self, region: np.ndarray) -> list[np.ndarray]:
        feed = {FRAME_INPUT_NAME: np.ascontiguousarray(region, dtype=np.float32)[None, None]}
        return [np.ascontiguousarray(a) for a in self.session.run(None, feed)]


class _TorchScriptRunner:
    def __init__(self, path: Path, manifest: Manifest, device: Literal["cpu", "cuda"], device_id: int) -> None:
        torch = require_torch("the TorchScript backend")
        extra = {TS_METADATA: ""}
        try:
            with _quiet_jit():
                location = _torch_device(device, device_id)
                self.module = torch.jit.load(str(path), map_location=location, _extra_files=extra)
        except Exception as exc:  # torch.jit raises RuntimeError/ValueError variants for bad archives
            raise ArtifactError(f"{path}: TorchScript cannot load the module: {str(exc).splitlines()[0]}") from None
        self.module.eval()
        self.device = _torch_device(device, device_id)
        try:
            meta = json.loads(extra[TS_METADATA] or "null")
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict):
            raise ArtifactError(f"{path}: the module carries no {TS_METADATA} I/O description; re-export the artifact")
        if meta.get("outputs") != list(manifest.output_names):
            raise ArtifactError(
                f"{path}: output names in the model {meta.get('outputs')} differ from the manifest's "
                f"field 'outputs' {list(manifest.output_names)}"
            )
        if meta.get("patch") != list(manifest.patch):
            raise ArtifactError(
                f"{path}: patch size differs: the model takes {meta.get('patch')} but the manifest's "
                f"field 'patch' says {list(manifest.patch)}"
            )
        self.providers: tuple[str, ...] = ()

    def __call__(self, x: Array) -> list[Array]:
        """A tensor in, tensors out on the module's device; numpy in, numpy out."""
        torch = sys.modules["torch"]
        host = not is_tensor(x)
        if self.device.type == "cuda":
            # the service calls from its worker thread, where no CUDA context is current yet: torch.cuda.device()
            # skips setting an index that already reads as current, and cuBLAS then warned of a missing context
            # (H200, torch 2.11); set_device makes the primary context current on this thread
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            out = self.module((torch.from_numpy(x) if host else x.detach()).to(self.device, torch.float32).contiguous())
        outs = list(out) if isinstance(out, tuple | list) else [out]
        return [to_host(o) for o in outs] if host else outs


def _torch_device(device: Literal["cpu", "cuda"], device_id: int) -> torch.device:
    torch = require_torch(f"a torch device ({device})")
    return torch.device("cuda", device_id) if device == "cuda" else torch.device("cpu")


class Encoder:
    """A loaded, verified artifact. Call it on ``(B, 1, ph, pw)`` float patches (already preprocessed): a numpy array
    (the CPU path, no torch needed with ONNX Runtime) or a torch tensor.

    Returns ``{name: array}`` with the manifest's output names, of the input's kind: numpy for numpy, tensors on
    ``torch_device`` for a tensor. Safe to call from one thread at a time per encoder (ONNX Runtime sessions are
    thread-safe, TorchScript modules are not guaranteed to be).
    """

    def __init__(
        self,
        *,
        manifest: Manifest,
        backend: Backend,
        device: Literal["cpu", "cuda"],
        device_id: int = 0,
        providers: tuple[str, ...],
        sha256: str,
        path: Path,
        file_sha256: str = "",
        runner: _Runner,
        intra_op_threads: int | None = None,
        frame_runner: _OrtFrameRunner | None = None,
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.device = device
        self.device_id = device_id
        self.providers = providers
        #: the model's identity: sha256 of manifest.json, which pins every file and setting (``artifact_identity``)
        self.sha256 = sha256
        #: sha256 of the model file this encoder runs (one of the files the identity pins)
        self.file_sha256 = file_sha256
        self.path = path
        self._runner = runner
        #: ONNX Runtime's CPU threads for this session (``None``: TorchScript, which uses torch's)
        self.intra_op_threads = intra_op_threads
        self._frame_runner = frame_runner

    @property
    def torch_device(self) -> torch.device:
        """The torch device the encoder runs on (imports torch: for the GPU path and TorchScript)."""
        return _torch_device(self.device, self.device_id)

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.manifest.output_names

    @property
    def patch(self) -> tuple[int, int]:
        return self.manifest.patch

    def __repr__(self) -> str:
        m = self.manifest
        return f"Encoder({m.name} {m.version}, {self.backend} on {self.device}, patch {m.patch[0]}x{m.patch[1]})"

    def __call__(self, patches: Array) -> dict[str, Array]:
        ph, pw = self.manifest.patch
        if not (isinstance(patches, np.ndarray) or is_tensor(patches)):
            raise EncoderError(f"patches must be a numpy array or a torch.Tensor, got {type(patches).__name__}")
        if patches.ndim != 4 or tuple(patches.shape[1:]) != (1, ph, pw):
            raise EncoderError(f"patches must have shape (B, 1, {ph}, {pw}), got {tuple(patches.shape)}")
        if not is_floating(patches):
            raise EncoderError(f"patches must be float (preprocessed to [0, 1]), got {patches.dtype}")
        batch = int(patches.shape[0])
        if batch == 0:
            like: Any = patches.to(self.torch_device) if is_tensor(patches) else patches
            return {s.name: zeros(_shape(s, 0), "float32", like=like) for s in self.manifest.outputs}
        outs = self._runner(patches)
        if len(outs) != len(self.manifest.outputs):
            raise ArtifactError(
                f"{self.path}: the model returns {len(outs)} outputs but the manifest's field 'outputs' lists "
                f"{list(self.manifest.output_names)}"
            )
        return dict(zip(self.manifest.output_names, outs, strict=True))

    @property
    def frame_stride(self) -> tuple[int, int] | None:
        """The grid stride ``encode_frame`` serves (the manifest's ``frame_stride``); None: no frame encoder."""
        return self.manifest.frame_stride if self._frame_runner is not None else None

    def encode_frame(self, region: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs of every grid patch of ``region`` (2-D, normalised, starting at a patch's corner; patches at
        ``frame_stride``), row-major — what ``__call__`` gives for those patches cut out — without cutting them."""
        if self._frame_runner is None:
            raise EncoderError("this encoder has no frame encoder (encoder.frame.onnx, ONNX Runtime on the CPU)")
        ph, pw = self.manifest.patch
        if region.ndim != 2 or region.shape[0] < ph or region.shape[1] < pw:
            raise EncoderError(f"a frame region must be 2-D and hold one {ph}x{pw} patch, got {tuple(region.shape)}")
        outs = self._frame_runner(region)
        return dict(zip(self.manifest.output_names, outs, strict=True))

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once (allocations, kernel selection) and check the output shapes on the way."""
        ph, pw = self.manifest.patch
        for b in batch_sizes:
            if b < 1:
                raise EncoderError(f"warm-up batch size {b} must be at least 1")
            x: Any = np.zeros((b, 1, ph, pw), np.float32)
            if self.device == "cuda":  # the GPU path hands the encoder device tensors
                x = require_torch("a CUDA device").from_numpy(x).to(self.torch_device)
            out = self(x)
            for spec in self.manifest.outputs:
                got = tuple(out[spec.name].shape)
                if got != _shape(spec, b):
                    raise ArtifactError(
                        f"{self.path}: output {spec.name!r} has shape {list(got)} at batch {b}, but the manifest's "
                        f"field 'outputs' says {list(spec.shape)}"
                    )
        stride = self.frame_stride
        if stride is not None:  # a 3×2 grid of patches
            out = self.encode_frame(np.zeros((ph + 2 * stride[0], pw + stride[1]), np.float32))
            for spec in self.manifest.outputs:
                if tuple(out[spec.name].shape) != _shape(spec, 6):
                    raise ArtifactError(
                        f"{self.path.parent / MODEL_FILES['onnx_frame']}: output {spec.name!r} has shape "
                        f"{list(out[spec.name].shape)} for a 3x2 grid, but the manifest says {list(spec.shape)}"
                    )


def _usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count, where the platform says)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _cuda_for(backend: Backend, device: DeviceChoice) -> bool:
    """Whether to run on CUDA; ``device="cuda"`` without a usable GPU is an error, ``"auto"`` falls back.

    Asked in the order that imports torch last: with ONNX Runtime lacking its CUDA provider (the ``serve`` install)
    the answer is the CPU without torch ever being imported; the GPU path itself needs torch (device tensors).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise EncoderError(f"device {device!r} is not one of 'auto', 'cpu', 'cuda'")
    if device == "cpu":
        return False
    have, reason = True, ""
    if backend == "onnx":
        import onnxruntime as ort

        have = "CUDAExecutionProvider" in ort.get_available_providers()
        reason = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu: pip install 'atomstream[gpu]')"
    if have:
        if device == "auto" and importlib.util.find_spec("torch") is None:
            return False
        have, reason = require_torch("device 'cuda'").cuda.is_available(), "torch sees no CUDA device"
    if device == "cuda" and not have:
        raise EncoderError(f"device 'cuda' requested but {reason}; use device='cpu' or 'auto'")
    return have


def load(
    artifact_dir: str | Path,
    backend: Backend = "onnx",
    device: DeviceChoice = "auto",
    batch_sizes: Sequence[int] = (1, 256),
    *,
    intra_op_threads: int | None = None,
    fp16: bool = False,
    max_bytes: int | None = None,
    frame_encoder: bool = True,
) -> Encoder:
    """Load and verify an artifact; warm it up at ``batch_sizes`` (the sizes the caller will use).

    ``intra_op_threads`` sets ONNX Runtime's CPU threads (default ``min(4, CPUs this process may run on)``,
    spinning off). All the cores is right on a machine of its own: the service's other threads mostly sleep, and its
    preprocessing overlaps the encoder. On a machine shared with other busy processes fewer threads can be faster
    (measured on 2 cores with one kept busy elsewhere: 1 thread 140k patches/s, 2 threads 130k).
    ``fp16=True`` selects ``encoder.fp16.onnx`` (ONNX only; meant for GPUs). ``max_bytes`` refuses an artifact
    whose files add up to more, before reading them. ``frame_encoder``: also load ``encoder.frame.onnx`` when the
    artifact has it and the encoder runs ONNX Runtime (float32) on the CPU, so grid frames encode without cutting
    their patches (``Encoder.encode_frame``; its export parity is checked like the others').
    """
    if backend not in ("onnx", "torchscript"):
        raise EncoderError(f"backend {backend!r} is not one of 'onnx', 'torchscript'")
    if fp16 and backend != "onnx":
        raise EncoderError("fp16=True needs backend='onnx' (the fp16 variant is an ONNX file)")
    if intra_op_threads is not None and intra_op_threads < 1:
        raise EncoderError(f"intra_op_threads={intra_op_threads} must be at least 1")
    root = Path(artifact_dir)
    manifest, identity = read_manifest_and_identity(root)
    file_name = MODEL_FILES["onnx_fp16" if fp16 else backend]
    if file_name not in manifest.files:
        raise ArtifactError(
            f"{root / 'manifest.json'}: field 'files' lists no {file_name}; choose another backend or re-export"
            + (" with the fp16 variant" if fp16 else "")
        )
    check_parity(root, manifest, file_name)
    check_files(root, manifest, max_bytes=max_bytes)
    path = root / file_name
    cuda = _cuda_for(backend, device)
    device_id = int(require_torch("device 'cuda'").cuda.current_device()) if cuda else 0
    runner: _Runner
    threads: int | None = None
    if backend == "onnx":
        threads = intra_op_threads or max(1, min(_MAX_DEFAULT_THREADS, _usable_cpus()))
        ort_runner = _OrtRunner(path, manifest, cuda=cuda, device_id=device_id, intra_op_threads=threads)
        if device == "cuda" and not ort_runner.cuda:
            raise EncoderError(f"device 'cuda' requested but ONNX Runtime fell back to {ort_runner.providers[0]}")
        cuda, runner, providers = ort_runner.cuda, ort_runner, ort_runner.providers
    else:
        runner = _TorchScriptRunner(path, manifest, "cuda" if cuda else "cpu", device_id)
        providers = ()
    frame_runner = None
    frame_file = MODEL_FILES["onnx_frame"]
    if frame_encoder and backend == "onnx" and not fp16 and not cuda and frame_file in manifest.files:
        check_parity(root, manifest, frame_file)
        frame_runner = _OrtFrameRunner(root / frame_file, manifest, intra_op_threads=threads or 1)
    encoder = Encoder(
        manifest=manifest,
        backend=backend,
        device="cuda" if cuda else "cpu",
        device_id=device_id,
        providers=providers,
        sha256=identity,
        path=path,
        file_sha256=manifest.files[file_name].sha256,
        runner=runner,
        intra_op_threads=threads,
        frame_runner=frame_runner,
    )
    encoder.warm_up(batch_sizes)
    return encoder
