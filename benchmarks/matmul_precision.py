"""Does training on bfloat16 decoder matmuls cost quality? float32 and bfloat16 side by side, same data and seed.

``atomstream train --classes 4 --seed S --decoder-matmul M`` (every other flag the CLI's default) on 2000 cards,
with ``--epochs`` fixed (does the arithmetic alone change the result?) or a ``--budget`` (does the faster step buy
back what the arithmetic costs?). Columns: epochs trained, the final held-out ELBO in nats (the validation split, always
scored in float32; lower is better), accuracy on 1000 cards drawn with another seed, and the training seconds. The
answer decided ``TrainConfig.decoder_matmul``'s default (docs/training.md).

``--networks paper`` trains the paper's networks (encoder 2×256, decoder 3×256, as ``train_speed.py`` times them)
instead of the CLI's 2×128 / 3×64: bfloat16 pays only on wide matmuls, so that is where its cost is worth knowing.

    python benchmarks/matmul_precision.py [--sizes 24,32] [--seeds 0,2] [--rotation 60] (--epochs 12 | --budget 90)
        [--networks cli|paper]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from robustness import _draw, train_with_cli

from models.evaluate import clustering_accuracy, encode_images
from models.fused_likelihood import native_bfloat16

PRECISIONS = ("full", "bfloat16")
#: the paper's networks, as ``atomstream train`` flags (``benchmarks/train_speed.py`` times the same)
PAPER_NETWORKS = ["--encoder-hidden", "256,256", "--decoder-hidden", "256,256,256"]


def train_once(images: np.ndarray, labels: np.ndarray, seed: int, matmul: str, length: list[str]) -> dict:
    flags = [*length, "--decoder-matmul", matmul, "--no-progress"]
    trained = train_with_cli(images, labels, seed, flags, f"{matmul} seed {seed}")
    return {"model": trained.model, "epochs": len(trained.history), "val_loss": trained.history[-1]["val_loss"],
            "seconds": sum(h["seconds"] for h in trained.history)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="24,32")
    ap.add_argument("--seeds", default="0,2")
    ap.add_argument("--rotation", type=float, default=60.0)
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None)
    length.add_argument("--budget", type=float, default=None, help="training seconds (default: --epochs 12)")
    ap.add_argument("--networks", choices=("cli", "paper"), default="cli", help="the CLI's widths or the paper's")
    args = ap.parse_args(argv)
    if not native_bfloat16():
        print("# this CPU has no native bfloat16: the bfloat16 rows are emulated (slow) and say nothing about speed")
    flags = ["--budget", f"{args.budget:g}"] if args.budget is not None else ["--epochs", str(args.epochs or 12)]
    flags += PAPER_NETWORKS if args.networks == "paper" else []
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
