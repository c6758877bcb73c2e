"""Robustness of the default training recipe: `atomstream train` with no tuning, across sizes, rotations, drawings,
shape families and seeds, each beside trivial baselines computed on the same held-out images in the same run.

Every model here is trained by the CLI itself (``atomstream train --data X --classes 4 --out R --seed S``: nothing
else), so what the table shows is what a user gets. Cases:

* ``cards`` — ``sim.cards`` (suits from discs and polygons);
* ``glyph-suits`` — the same four suits drawn a second, independent way (font outlines, ``glyph_cards.py``);
* ``glyph-ranks`` — another shape family (the letters A, K, Q, J);
* ``demo`` — the demo lattice (film on substrate): phase accuracy of the demo's class map on held-out frames.

Per case: held-out accuracy (Hungarian-matched) and NMI, the collapse diagnosis, the time, and two baselines fitted on
the held-out images themselves: ``pca-gmm`` (PCA 10 + GMM 4 on pixels, the trivial method) and ``init`` (the invariant
clustering the default recipe starts from, ``models.warm_start``), so the table shows what training adds or loses.

    python benchmarks/robustness.py                       # the whole grid (hours on 2 cores: see --help to narrow)
    python benchmarks/robustness.py --families cards --sizes 24 --rotations 60 --seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from glyph_cards import make_glyph_cards

from atomstream.cli import main as cli
from models.checkpoint import load_diagnosis, load_run
from models.evaluate import clustering_accuracy, encode_images, normalized_mutual_info
from models.warm_start import cluster_classes
from sim.cards import make_cards

FAMILIES = ("cards", "glyph-suits", "glyph-ranks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from " + ", ".join(FAMILIES))
    p.add_argument("--sizes", default="16,24,32,48", help="image sides in pixels")
    p.add_argument("--rotations", default="12,60,120", help="rotation ranges ± degrees")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (the data is drawn anew for each)")
    p.add_argument("--glyph-rotations", default="60", help="rotation ranges for the glyph families")
    p.add_argument("--demo-seeds", default="0,1,2,3,4", help="demo lattice seeds ('' to skip)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument(
        "--train-flags",
        default="",
        help="extra `atomstream train` flags for every card training, for an ablation against the defaults (e.g. "
        "'--pixel-fraction 0.25 --budget 150'); the robustness table itself is measured with none",
    )
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _draw(family: str, n: int, size: int, rotation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if family == "cards":
        c = make_cards(n, size=size, rotation=rotation, seed=seed)
        return c.images, c.labels
    g = make_glyph_cards(n, size=size, rotation=rotation, family=family.removeprefix("glyph-"), seed=seed)
    return g.images, g.labels


def _pixel_baseline(images: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    flat = images.reshape(len(images), -1).astype(np.float64)
    reduced = PCA(10, random_state=seed).fit_transform(flat)
    return GaussianMixture(k, n_init=4, reg_covar=1e-3, random_state=seed).fit(reduced).predict(reduced)


def _invariant_clusters(images: np.ndarray, k: int, seed: int) -> np.ndarray:
    """What the default recipe starts from, fitted on these images: the invariant features' PCA + GMM clusters."""
    import torch

    from models.config import ModelConfig
    from models.train import invariant_features

    features = invariant_features(ModelConfig(patch=images.shape[1:]), torch.from_numpy(images)[:, None])
    return cluster_classes(features.numpy(), k, seed=seed).labels


@dataclass(frozen=True)
class Trained:
    """What one `atomstream train` run left: its model and config, diagnosis, per-epoch history, wall seconds."""

    model: Any
    cfg: Any
    diagnosis: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


def train_with_cli(images: np.ndarray, labels: np.ndarray, seed: int, flags: list[str], case: str) -> Trained:
    """``atomstream train --classes 4 --seed seed *flags`` on these cards, in a scratch directory, as a user runs it
    (its output kept quiet unless it fails: then the error names ``case`` and carries the output)."""
    with TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "train.npz", Path(tmp) / "run"
        np.savez(data, images=images, labels=labels)
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            argv = ["train", "--data", str(data), "--classes", "4", "--out", str(run), "--seed", str(seed)]
            code = cli(argv + flags)
        seconds = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"atomstream train failed on {case}:\n{log.getvalue()}")
        model, cfg = load_run(run)
        history = json.loads((run / "history.json").read_text())
        return Trained(model, cfg, load_diagnosis(run) or {}, history, seconds)


def run_cards(family: str, size: int, rotation: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    train_x, train_y = _draw(family, args.n_train, size, rotation, 1000 + seed)
    test_x, test_y = _draw(family, args.n_test, size, rotation, 2000 + seed)
    case = f"{family} {size}px ±{rotation}° seed {seed}"
    trained = train_with_cli(train_x, train_y, seed, shlex.split(args.train_flags), case)
    model, cfg, diagnosis, seconds = trained.model, trained.cfg, trained.diagnosis, trained.seconds
    pred = encode_images(model, test_x)["class_prob"].argmax(axis=1)
    init = _invariant_clusters(test_x, 4, seed)
    base = _pixel_baseline(test_x, 4, seed)
    return {
        "family": family,
        "size": size,
        "rotation": rotation,
        "seed": seed,
        "epochs": cfg.train.epochs,
        "accuracy": clustering_accuracy(pred, test_y),
        "nmi": normalized_mutual_info(pred, test_y),
        "usage": np.bincount(pred, minlength=4).tolist(),
        "collapsed": bool(diagnosis.get("collapsed")),
        "seconds": seconds,
        "init_accuracy": clustering_accuracy(init, test_y),
        "pca_gmm_accuracy": clustering_accuracy(base, test_y),
    }


def run_demo_seed(seed: int) -> dict[str, Any]:
    from atomstream.demo import DemoOptions, run_demo

    with TemporaryDirectory() as tmp:
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = run_demo(DemoOptions(out=Path(tmp), seed=seed, progress=False))
        seconds = time.perf_counter() - t0
    m = result.metrics
    return {
        "family": "demo",
        "size": DemoOptions.patch,
        "rotation": 0,
        "seed": seed,
        "accuracy": m.get("phase_accuracy_held_out"),
        "nmi": None,
        "collapsed": None,
        "seconds": seconds,
        "defect_recall": m.get("defect_recall"),
        "defect_precision": m.get("defect_precision"),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.0f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[dict[str, Any]] = []
    cols = ("family", "size", "rotation", "seed", "epochs", "accuracy", "nmi", "usage", "collapsed", "seconds",
            "init_accuracy", "pca_gmm_accuracy")  # fmt: skip
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    jobs: list[tuple[str, int, float, int]] = []
    for family in [f for f in args.families.split(",") if f]:
        rotations = _ints(args.rotations) if family == "cards" else _ints(args.glyph_rotations)
        sizes, seeds = _ints(args.sizes), _ints(args.seeds)
        jobs += [(family, s, float(r), seed) for s in sizes for r in rotations for seed in seeds]
    for family, size, rotation, seed in jobs:
        row = run_cards(family, size, rotation, seed, args)
        rows.append(row)
        print("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |", flush=True)
    for seed in _ints(args.demo_seeds):
        row = run_demo_seed(seed)
        rows.append(row)
        print("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
