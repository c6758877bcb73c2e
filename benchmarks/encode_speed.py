"""Encoding speed: the exported artifact (ONNX Runtime, TorchScript) against the eager model, patches per second.

The baseline is ``JTrVAE.encode`` in eager PyTorch — the Pyro guide's posterior means computed straight from the
encoder network, what ``atomstream encode`` runs. A second reference row, ``pyro guide trace``, runs the guide
itself under ``poutine.trace`` (samples every latent site; the cost of going through Pyro at inference).
Every backend gets the same float32 patches already in memory; the exported backends go through
``streamer.maps.encoder.load`` exactly as the service calls them (for ONNX on the CPU that includes the
tensor→numpy→tensor hand-over). When CUDA is present the same backends run on the GPU (ONNX Runtime's CUDA provider with
IOBinding, if installed), with inputs already on the device, and so does ONNX Runtime's TensorRT execution provider
when this onnxruntime has it (fp32, engines built per batch size during the warm-up calls, outputs bound to torch
memory). ``--devices cpu,cuda`` names the devices; one that is missing is skipped with a line saying so. ``--parity``
compares every backend's outputs on each device with the eager model's on the CPU, on the export's own parity
patches, and exits 1 when one differs by more than ``--parity-tol`` (the export's 1e-4 by default).

The model is the paper's architecture (MLP encoder 2×256 tanh, K=4, D=2, rotation and translation) and *untrained*:
speed does not depend on the weights. Each cell is the median of ``--repeats`` timed calls after two warm-up calls.

    python benchmarks/encode_speed.py [--patch 48] [--batches 1,64,1024,4096] [--repeats 20] [--threads N]
        [--devices auto|cpu,cuda] [--parity]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from parity import compare, parity_line
from pyro import poutine

from exporters.export import export_model
from exporters.verify import PARITY_TOLERANCE, parity_patches
from models.config import DataConfig, ModelConfig, RunConfig
from models.jtrvae import JTrVAE
from streamer.maps.encoder import load
from streamer.maps.manifest import INPUT_NAME, MODEL_FILES, read_manifest

Runner = Callable[[torch.Tensor], object]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(","))


def build_artifact(patch: int, hidden: tuple[int, ...], out: Path) -> tuple[JTrVAE, torch.Tensor]:
    """An untrained paper-architecture model exported to ``out``, and the parity patches its export was checked on."""
    cfg = ModelConfig(
        patch=(patch, patch), n_classes=4, latent_dim=2, rotation=True, translation=True, encoder_hidden=hidden
    )
    run = RunConfig(model=cfg, data=DataConfig(patch=(patch, patch)), name="bench")
    torch.manual_seed(0)
    model = JTrVAE(cfg).eval()
    x, desc, _ = parity_patches(run)
    # no frame encoder: this benchmark times the patch encoders, and an untrained model's frame export can miss the
    # angle's parity on a patch whose concentration vector is nearly zero (2.4e-4 rad at 48 px, seed 0)
    export_model(model, run, out, parity_patches=x, parity_data=desc, frame_encoder=False)
    return model, x


def time_calls(fns: dict[str, Runner], x: torch.Tensor, repeats: int, cuda: bool) -> dict[str, float]:
    """Median seconds per call of each function, after two warm-up calls each.

    Calls are interleaved (one of each backend per round), so a burst of load from another process on the machine
    slows every backend alike instead of whichever happened to be running. CUDA work is synchronised inside the
    timed region.
    """
    for fn in fns.values():
        for _ in range(2):
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


class TensorRTRunner:
    """The artifact's ONNX file on ONNX Runtime's TensorRT execution provider (CUDA provider behind it for any node
    TensorRT does not take), with inputs and outputs bound to torch CUDA memory as the service's CUDA runner binds
    them. fp32 (no fp16, no TF32), so its parity is held to the same tolerance as every other backend."""

    def __init__(self, artifact: Path, cache_dir: Path) -> None:
        import onnxruntime as ort

        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("this onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu with TensorRT libs)")
        trt = {"device_id": "0", "trt_fp16_enable": "False", "trt_engine_cache_enable": "True",
               "trt_engine_cache_path": str(cache_dir)}  # fmt: skip
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(artifact / MODEL_FILES["onnx"]),
            sess_options=options,
            providers=[("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"use_tf32": "0"})],
        )
        if self.session.get_providers()[0] != "TensorrtExecutionProvider":
            raise RuntimeError(f"ONNX Runtime fell back to {self.session.get_providers()[0]}")
        self.outputs = read_manifest(artifact).outputs

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.detach().to("cuda", torch.float32).contiguous()
        b = int(x.shape[0])
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
        outs = {}
        for spec in self.outputs:
            out = torch.empty([b if d == "batch" else int(d) for d in spec.shape], device="cuda")
            binding.bind_output(spec.name, "cuda", 0, np.float32, tuple(out.shape), out.data_ptr())
            outs[spec.name] = out
        torch.cuda.current_stream().synchronize()  # ORT runs on its own stream: the input must be written first
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs


def runners(
    model: JTrVAE, artifact: Path, device: str, batches: tuple[int, ...], threads: int | None
) -> dict[str, Runner | str]:
    """name -> callable, or a string saying why that backend is unavailable on this device."""
    m = model.to(device)

    def guide_trace(x: torch.Tensor) -> object:
        with torch.no_grad():
            return poutine.trace(m.guide).get_trace(x)

    out: dict[str, Runner | str] = {"eager JTrVAE.encode": m.encode, "pyro guide trace": guide_trace}
    for backend in ("onnx", "torchscript"):
        try:
            enc = load(artifact, backend=backend, device=device, batch_sizes=batches, intra_op_threads=threads)  # type: ignore[arg-type]
            out[f"{backend} ({'+'.join(p.replace('ExecutionProvider', '') for p in enc.providers) or 'torch'})"] = enc
        except Exception as exc:  # an optional backend missing on this machine is reported, not fatal
            out[backend] = f"unavailable: {str(exc).splitlines()[0]}"
    if device == "cuda":
        try:
            out["onnx (TensorRT)"] = TensorRTRunner(artifact, artifact / "trt-cache")
        except Exception as exc:  # TensorRT is optional: say why it did not run
            out["tensorrt"] = f"unavailable: {str(exc).splitlines()[0]}"
    return out


def check_parity(table: dict[str, Runner | str], x: torch.Tensor, want: dict[str, torch.Tensor], device: str,
                 tolerance: float) -> bool:  # fmt: skip
    """Every backend's outputs on ``device`` against the eager model's on the CPU (``z`` is ``z_loc`` in artifacts)."""
    passed = True
    for name, fn in table.items():
        if isinstance(fn, str) or name == "pyro guide trace":  # the guide samples: nothing deterministic to compare
            continue
        got = dict(fn(x.to(device)))  # type: ignore[call-overload]
        if "z" in got:
            got["z_loc"] = got.pop("z")
        passed &= parity_line(f"{device} {name} vs cpu eager ({x.shape[0]} patches)", compare(got, want), tolerance)
    return passed


def pick_devices(text: str) -> list[str]:
    """``auto``: the CPU and CUDA if present; otherwise the devices named, with a line for each one missing."""
    if text == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if "cuda" in devices and not torch.cuda.is_available():
        print("# cuda: skipped (torch sees no CUDA device); no GPU figure is reported")
        devices.remove("cuda")
    return devices


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=48, help="patch side (paper: 48 or 32)")
    ap.add_argument("--batches", type=_ints, default=(1, 64, 1024, 4096), help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per cell (median reported)")
    ap.add_argument("--hidden", type=_ints, default=(256, 256), help="encoder widths (paper: 256,256)")
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime CPU threads (0: their defaults)")
    ap.add_argument("--devices", default="auto", help="auto (cpu, and cuda if present) or a list: cpu,cuda")
    ap.add_argument("--parity", action="store_true", help="check every backend against the eager model on the CPU")
    ap.add_argument("--parity-tol", type=float, default=PARITY_TOLERANCE, help="largest |Δ| that passes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = pick_devices(args.devices)
    passed = True
    with tempfile.TemporaryDirectory() as tmp:
        model, parity_x = build_artifact(args.patch, args.hidden, Path(tmp))
        want = model.encode(parity_x)  # the reference: the eager model on the CPU
        want["z_loc"] = want.pop("z")
        print(
            f"# {args.patch}×{args.patch} patches, encoder MLP {'×'.join(map(str, args.hidden))} tanh, K=4, D=2, "
            f"rotation+translation, untrained; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{os.cpu_count()} CPUs; median of {args.repeats} calls; patches/s (× eager JTrVAE.encode on that device)"
        )
        for device in devices:
            table = runners(model, Path(tmp), device, args.batches, args.threads or None)
            names = list(table)
            print(f"\n## {device}")
            print(f"{'batch':>6} " + " ".join(f"{n:>26}" for n in names))
            for b in args.batches:
                x = torch.rand((b, 1, args.patch, args.patch), generator=torch.Generator().manual_seed(b)).to(device)
                usable = {n: fn for n, fn in table.items() if not isinstance(fn, str)}
                rates = {n: b / t for n, t in time_calls(usable, x, args.repeats, device == "cuda").items()}
                base = rates["eager JTrVAE.encode"]
                cells = [
                    f"{rates[n]:>15,.0f} ({rates[n] / base:>5.2f}×)  " if n in rates else f"{'-':>26}" for n in names
                ]
                print(f"{b:>6} " + " ".join(f"{c:>26}" for c in cells))
            for name, fn in table.items():
                if isinstance(fn, str):
                    print(f"# {name}: {fn}")
            if args.parity:
                passed &= check_parity(table, parity_x, want, device, args.parity_tol)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
