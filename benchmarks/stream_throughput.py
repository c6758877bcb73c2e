"""End-to-end streaming throughput: producer → ZeroMQ → service → subscriber, against the bare encoder in the same run.

For each frame size, one in-process service (its own I/O and worker threads, real loopback TCP sockets) receives
``--frames`` frames from a ``sim.replay`` producer thread sending as fast as the service takes them, and a
``streamer.client.Subscriber`` on the main thread collects the maps. Figures:

* **e2e frames/s, patches/s** — frames from the first send to the last map received;
* **latency p50/p99** — producer timestamp (``t_acq_ns``) → map received by the subscriber. The producer is
  unpaced, so this is latency *under saturation* (it includes time queued behind other frames), an upper bound;
* **encoder patches/s** — the bare encoder (``streamer.encoder.load``, same backend and device) on patches already
  on the device, at the service's batch size (``--batch``), measured in the same process just before;
* **ratio** — e2e patches/s ÷ encoder patches/s: the share of the encoder's speed the whole chain keeps (aim ≥ 80 %).

The model is the paper's architecture (MLP encoder 2×256, K=4 classes, D=2, rotation and translation), untrained —
speed does not depend on the weights — exported through ``exporters`` unless ``--artifact`` is given. Patches are
32×32 with stride 8 (a 512² frame is 61² = 3721 patches, a 1024² frame 125² = 15625).

    python benchmarks/stream_throughput.py [--frames 20] [--sizes 512,1024] [--backend onnx] [--device auto]
        [--batch 4096] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from exporters.export import export_model
from exporters.verify import parity_patches
from models.config import DataConfig, ModelConfig, RunConfig
from models.jtrvae import JTrVAE
from sim.replay import Replayer
from streamer.client import Subscriber
from streamer.config import ServiceConfig
from streamer.encoder import load
from streamer.service import Service

PATCH, STRIDE = 32, 8


def build_artifact(out: Path) -> Path:
    cfg = ModelConfig(
        patch=(PATCH, PATCH), n_classes=4, latent_dim=2, rotation=True, translation=True, encoder_hidden=(256, 256)
    )
    run = RunConfig(model=cfg, data=DataConfig(patch=(PATCH, PATCH), stride=(STRIDE, STRIDE)), name="bench-stream")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = JTrVAE(cfg).eval()
    x, desc, _ = parity_patches(run)
    export_model(model, run, out, parity_patches=x, parity_data=desc)
    return out


def encoder_rate(artifact: Path, *, backend: str, device: str, batch: int, repeats: int) -> tuple[float, str]:
    """Patches per second of the bare encoder at ``batch`` (median of ``repeats`` calls after two warm-ups)."""
    enc = load(artifact, backend=backend, device=device, batch_sizes=(batch,))  # type: ignore[arg-type]
    x = torch.rand(batch, 1, PATCH, PATCH, device=enc.torch_device)
    times = []
    for k in range(repeats + 2):
        t0 = time.perf_counter()
        enc(x)
        if enc.torch_device.type == "cuda":
            torch.cuda.synchronize(enc.torch_device)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times), enc.device


def stream(artifact: Path, size: int, *, frames: int, backend: str, device: str, batch: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    data = rng.random((frames, size, size), dtype=np.float32)
    cfg = ServiceConfig(
        artifact=artifact,
        backend=backend,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
        ingest="tcp://127.0.0.1:0",
        publish="tcp://127.0.0.1:0",
        control="tcp://127.0.0.1:0",
        metrics_port=None,
        max_batch_patches=batch,
        status_interval_s=0.2,
        linger_ms=0,
    )
    with Service(cfg) as service, Subscriber(service.publish_endpoint, ("maps", "error")) as sub:
        service.wait_ready(300)
        sub.wait_connected(30)
        with Replayer(service.ingest_endpoint, progress=False, scan_id="warm") as r:  # warm-up, not timed
            r.send_scan(data[:2])
        for _ in range(2):
            sub.recv(300)
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                with Replayer(service.ingest_endpoint, progress=False, scan_id="bench", send_timeout_ms=300_000) as r:
                    r.send_scan(data)
            except BaseException as exc:
                errors.append(exc)

        producer = threading.Thread(target=produce)
        t0 = time.perf_counter()
        producer.start()
        latencies, patches, n_err = [], 0, 0
        while len(latencies) + n_err < frames:
            got = sub.recv(300)
            if got.topic == "error":
                n_err += 1
                continue
            latencies.append((got.t_local_ns - got.msg.t_acq_ns) / 1e6)
            patches += int(got.arrays["class"].size)
        seconds = time.perf_counter() - t0
        producer.join()
        if errors:
            raise errors[0]
    return {
        "fps": len(latencies) / seconds,
        "patches_s": patches / seconds,
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "errors": n_err,
        "gaps": sub.stats.n_gaps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--backend", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch", type=int, default=4096, help="service max_batch_patches = encoder batch size")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of the bare encoder")
    parser.add_argument("--artifact", type=Path, default=None, help="exported artifact (default: build one)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or build_artifact(Path(tmp) / "artifact")
        enc_rate, dev = encoder_rate(
            artifact, backend=args.backend, device=args.device, batch=args.batch, repeats=args.repeats
        )
        print(f"backend {args.backend}  device {dev}  batch {args.batch}  patch {PATCH} stride {STRIDE}  "
              f"frames {args.frames}  torch threads {torch.get_num_threads()}")  # fmt: skip
        print(f"{'frame':>9} {'patches/fr':>10} {'e2e fr/s':>9} {'e2e patch/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'encoder patch/s':>16} {'ratio':>6} {'errors':>6}")  # fmt: skip
        for size in sizes:
            r = stream(artifact, size, frames=args.frames, backend=args.backend, device=args.device, batch=args.batch)
            per_frame = ((size - PATCH) // STRIDE + 1) ** 2
            ratio = r["patches_s"] / enc_rate
            print(f"{size:>4}x{size:<4} {per_frame:>10d} {r['fps']:>9.2f} {r['patches_s']:>12.0f} {r['p50']:>8.1f} "
                  f"{r['p99']:>8.1f} {enc_rate:>16.0f} {ratio:>6.0%} {int(r['errors']):>6d}")  # fmt: skip


if __name__ == "__main__":
    main()
