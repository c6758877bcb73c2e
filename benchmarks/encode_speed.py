"""Encoding speed: the exported artifact (ONNX Runtime, TorchScript) against the eager model, patches per second.

The baseline is ``JTrVAE.encode`` in eager PyTorch — the Pyro guide's posterior means computed straight from the
encoder network, what ``atomstream encode`` runs. A second reference row, ``pyro guide trace``, runs the guide
itself under ``poutine.trace`` (samples every latent site; the cost of going through Pyro at inference).
Every backend gets the same float32 patches already in memory; the exported backends go through
``streamer.maps.encoder.load`` exactly as the service calls them (for ONNX on the CPU that includes the
tensor→numpy→tensor hand-over). When CUDA is present the same backends run on the GPU (ONNX Runtime's CUDA provider with
IOBinding, if installed), with inputs already on the device.

The model is the paper's architecture (MLP encoder 2×256 tanh, K=4, D=2, rotation and translation) and *untrained*:
speed does not depend on the weights. Each cell is the median of ``--repeats`` timed calls after two warm-up calls.

    python benchmarks/encode_speed.py [--patch 48] [--batches 1,64,1024,4096] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pyro import poutine

from exporters.export import export_model
from exporters.verify import parity_patches
from models.config import DataConfig, ModelConfig, RunConfig
from models.jtrvae import JTrVAE
from streamer.maps.encoder import load

Runner = Callable[[torch.Tensor], object]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(","))


def build_artifact(patch: int, hidden: tuple[int, ...], out: Path) -> JTrVAE:
    cfg = ModelConfig(
        patch=(patch, patch), n_classes=4, latent_dim=2, rotation=True, translation=True, encoder_hidden=hidden
    )
    run = RunConfig(model=cfg, data=DataConfig(patch=(patch, patch)), name="bench")
    torch.manual_seed(0)
    model = JTrVAE(cfg).eval()
    x, desc, _ = parity_patches(run)
    export_model(model, run, out, parity_patches=x, parity_data=desc)
    return model


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
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=48, help="patch side (paper: 48 or 32)")
    ap.add_argument("--batches", type=_ints, default=(1, 64, 1024, 4096), help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per cell (median reported)")
    ap.add_argument("--hidden", type=_ints, default=(256, 256), help="encoder widths (paper: 256,256)")
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime CPU threads (0: their defaults)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        model = build_artifact(args.patch, args.hidden, Path(tmp))
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
