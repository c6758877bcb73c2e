"""Does training on bfloat16 decoder matmuls cost quality? float32 and bfloat16 side by side, same data and seed.

``atomstream train --classes 4 --seed S --decoder-matmul M`` (every other flag the CLI's default) on 2000 cards,
with ``--epochs`` fixed (does the arithmetic alone change the result?) or a ``--budget`` (does the faster step buy
back what the arithmetic costs?). Columns: epochs trained, the final held-out ELBO in nats (the validation split, always
scored in float32; lower is better), accuracy on 1000 cards drawn with another seed, and the training seconds. The
answer decided ``TrainConfig.decoder_matmul``'s default (docs/training.md).

    python benchmarks/matmul_precision.py [--sizes 24,32] [--seeds 0,2] [--rotation 60] (--epochs 12 | --budget 90)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from robustness import _draw

from atomstream.cli import main as cli
from models.checkpoint import load_run
from models.evaluate import clustering_accuracy, encode_images
from models.fused_likelihood import native_bfloat16

PRECISIONS = ("full", "bfloat16")


def train_once(images: np.ndarray, labels: np.ndarray, seed: int, matmul: str, length: list[str]) -> dict:
    with TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "train.npz", Path(tmp) / "run"
        np.savez(data, images=images, labels=labels)
        log = io.StringIO()
        argv = ["train", "--data", str(data), "--classes", "4", "--out", str(run), "--seed", str(seed)]
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = cli([*argv, *length, "--decoder-matmul", matmul, "--no-progress"])
        if code != 0:
            raise RuntimeError(f"atomstream train failed:\n{log.getvalue()}")
        history = json.loads((run / "history.json").read_text())
        model, _ = load_run(run)
    return {"model": model, "epochs": len(history), "val_loss": history[-1]["val_loss"],
            "seconds": sum(h["seconds"] for h in history)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="24,32")
    ap.add_argument("--seeds", default="0,2")
    ap.add_argument("--rotation", type=float, default=60.0)
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None)
    length.add_argument("--budget", type=float, default=None, help="training seconds (default: --epochs 12)")
    args = ap.parse_args(argv)
    if not native_bfloat16():
        print("# this CPU has no native bfloat16: the bfloat16 rows are emulated (slow) and say nothing about speed")
    flags = ["--budget", f"{args.budget:g}"] if args.budget is not None else ["--epochs", str(args.epochs or 12)]
    print(f"# cards ±{args.rotation:g}°, 2000 training / 1000 held-out, atomstream train defaults + {' '.join(flags)}")
    print(f"{'size':>4} {'seed':>4} {'matmul':>8} {'epochs':>6} {'val ELBO':>9} {'accuracy':>8} {'seconds':>8}")
    for size in [int(s) for s in args.sizes.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            train_x, train_y = _draw("cards", 2000, size, args.rotation, 1000 + seed)
            test_x, test_y = _draw("cards", 1000, size, args.rotation, 2000 + seed)
            for matmul in PRECISIONS:
                t0 = time.perf_counter()
                r = train_once(train_x, train_y, seed, matmul, flags)
                pred = encode_images(r["model"], test_x)["class_prob"].argmax(axis=1)
                acc = clustering_accuracy(pred, test_y)
                print(f"{size:>4} {seed:>4} {matmul:>8} {r['epochs']:>6} {r['val_loss']:>9.2f} {acc:>8.3f} "
                      f"{r['seconds']:>8.1f}  ({time.perf_counter() - t0:.0f} s wall)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
