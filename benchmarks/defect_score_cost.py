"""What the ``joint`` defect score costs at serving time: patches/s with the decoder's redrawing in the exported graph
against the same encoder exported without it (the ``contrast`` score), both through ``Pipeline`` as the service runs
them (ONNX Runtime, CPU), encode and assemble (defect score, regions) together. The redrawing is measured twice: on
the blocks the exporter redraws (``models.reconstruction.redraw_step``: about ``REDRAW_PIXELS`` block means a patch)
and on every pixel of the patch (what the exporter did before), so the table shows what the blocks save.

The model is the CLI's default architecture (encoder 2×256, decoder 3×64, K classes, rotation and translation) and
untrained: speed does not depend on the weights. Both artifacts are calibrated on the same synthetic lattice patches.
Each cell is the median of ``--repeats`` timed frames after one warm-up frame.

    python benchmarks/defect_score_cost.py [--patches 16,32,48] [--classes 3] [--frame 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import models.reconstruction as reconstruction  # noqa: E402
from exporters.calibrate import calibrate_novelty  # noqa: E402
from exporters.export import export_model  # noqa: E402
from exporters.verify import parity_patches  # noqa: E402
from models.config import DataConfig, ModelConfig, RunConfig  # noqa: E402
from models.data import scan_patches  # noqa: E402
from models.jtrvae import JTrVAE  # noqa: E402
from sim.lattice import LatticeConfig, synth_scan  # noqa: E402
from streamer.maps.encoder import load  # noqa: E402
from streamer.maps.pipeline import Pipeline  # noqa: E402


def frame_seconds(pipeline: Pipeline, frames: np.ndarray, repeats: int) -> float:
    pipeline.process(frames[0])
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        pipeline.process(frames[i % len(frames)])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", default="16,32,48", help="patch sides (comma-separated)")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--frame", type=int, default=512, help="frame side in pixels; grid stride = patch / 2")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    frames, _ = synth_scan(LatticeConfig(shape=(args.frame, args.frame), n_defects=8), 3, seed=0)
    print(
        "| patch | patches/frame | contrast (encoder only) ms | joint, whole patch ms | joint, blocks ms "
        "| redrawn values | joint patches/s | cost of joint | blocks save |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    default_pixels = reconstruction.REDRAW_PIXELS
    for side in (int(v) for v in args.patches.split(",")):
        data = DataConfig(source="bench", kind="grid", patch=(side, side), stride=(side // 2, side // 2))
        cfg = ModelConfig(patch=(side, side), n_classes=args.classes, latent_dim=2)
        run = RunConfig(model=cfg, data=data, name="bench")
        torch.manual_seed(0)
        model = JTrVAE(cfg).eval()
        train = scan_patches(frames[:2], data)
        x, desc, _ = parity_patches(run)
        row: dict[str, float] = {}
        n = 0
        with tempfile.TemporaryDirectory() as tmp:
            for label, kind, pixels in (
                ("contrast", "contrast", default_pixels),
                ("whole", "joint", side * side),
                ("joint", "joint", default_pixels),
            ):
                reconstruction.REDRAW_PIXELS = pixels  # read when the redrawing is built (calibration and export)
                stats = calibrate_novelty(model, train, kind=kind)  # type: ignore[arg-type]
                out = Path(tmp) / label
                export_model(model, run, out, parity_patches=x, parity_data=desc, novelty=stats)
                pipeline = Pipeline(load(out, backend="onnx", device="cpu", batch_sizes=(1024,)))
                n = pipeline.prepare(frames[0]).n
                row[label] = frame_seconds(pipeline, frames, args.repeats)
            reconstruction.REDRAW_PIXELS = default_pixels
            m = pipeline.manifest.latent.reconstruction_pixels
        c, w, j = row["contrast"], row["whole"], row["joint"]
        print(
            f"| {side} | {n} | {c * 1e3:.1f} | {w * 1e3:.1f} | {j * 1e3:.1f} | {m} of {side * side} | {n / j:,.0f} "
            f"| {j / c:.1f}× | {w / j:.1f}× |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
