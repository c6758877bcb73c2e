"""Cards quality benchmark: j-trVAE against j-VAE (no rotation, no translation) at ±12°, ±60°, ±120°.

The paper's first result (PAPER.md): with K = 4 classes and dim z = 2, both models sort the suits at ±12°; at ±60°
and ±120° only j-trVAE does, and its two continuous latents come out as shear and scale. This script measures that
on cards the models never trained on (a test set drawn with another seed) with the same training budget for both.

Budget (defaults, chosen so the whole table fits a 2-core CPU in 30 minutes): 18×18 images, 2000 training and 1000
test cards per rotation range, 100 epochs, batch 32 (more updates for the same arithmetic), Adam lr 2e-3, the default
β annealing, MLP encoder 2×256 tanh for both models. j-trVAE's coordinate decoder is 3×64 tanh (the paper's is
3×256: it runs once per pixel per enumerated class, K·B·H·W rows, ~95 % of the cost, so its width is what the budget
buys). j-VAE is the paper's baseline as pyroVED builds it: no γ, no s, a dense 3×256 decoder from (z, y) to all
pixels (cheap: K·B rows). ``pyroVED-jVAE`` (when the ``bench`` extra is installed) is pyroVED's own j-VAE trained by
its documented recipe on the same cards, at ±12° only: a reference that tells whether a j-VAE miss is the method's
or our code's. Seeds are fixed (training cards ``seed``, test cards ``seed + 1``, the model ``seed``).
Measured while choosing the budget (docs/cards.md has the table): at 16×16, 100 epochs passed every j-trVAE target
with seed 0 but z~shear fell to 0.13 with seed 1 (a ±10° shear moves a 16-px card's edge by under a pixel); 18×18
held it at 0.95 and 0.92 on two draws of cards. 20×20 needs more epochs than the budget has (±60° 0.87–0.89), and
one 24×24 run put every card in one class.

Targets, on the test cards: j-trVAE accuracy ≥ 0.90 at ±60° and ≥ 0.25 above j-VAE there; both ≥ 0.85 at ±12°;
best-matched |Spearman| of z with shear and with scale ≥ 0.6 at ±12° (j-trVAE); ±120° is reported only.

    python benchmarks/quality_cards.py [--size 18 --n-train 2000 --n-test 1000 --epochs 100 --seed 0
                                        --rotations 12,60,120 --out results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyroved_import import import_pyroved

from models import plots
from models.config import Annealing, DataConfig, ModelConfig, RunConfig, TrainConfig
from models.evaluate import encode_images, evaluate_encodings, matched_class_names
from models.jtrvae import JTrVAE
from models.train import fit
from sim.cards import CLASS_NAMES, make_cards
from streamer.maps.preprocess import Preprocessing

VARIANTS = ("jtrVAE", "jVAE", "pyroVED-jVAE")
REFERENCE = "pyroVED-jVAE"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=18, help="image side in pixels")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--encoder-hidden", type=int, default=256, help="width of the 2 encoder layers")
    p.add_argument("--decoder-hidden", type=int, default=64, help="width of the decoder layers")
    p.add_argument("--decoder-layers", type=int, default=3, help="number of decoder layers")
    p.add_argument(
        "--jvae-decoder-hidden", type=int, default=256, help="width of the j-VAE's dense decoder layers (paper: 256)"
    )
    p.add_argument("--beta2-start", type=float, default=Annealing().beta2_start)
    p.add_argument("--beta3-start", type=float, default=Annealing().beta3_start)
    p.add_argument("--ramp", type=float, default=Annealing().ramp_fraction, help="share of epochs the βs fall over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotations", default="12,60,120", help="comma-separated rotation ranges in degrees")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument(
        "--reference-at", default="12", help=f"rotation ranges at which {REFERENCE} runs (it checks the j-VAE target)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    p.add_argument(
        "--figures",
        type=Path,
        default=None,
        help="save confusion matrices (every model) and, for j-trVAE, latent traversals and class- and "
        "angle-conditioned generation (full turn) here",
    )
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, variant: str) -> RunConfig:
    """j-trVAE with the coordinate decoder; j-VAE as the paper ran it: no γ, no s, a dense decoder (DenseDecoder)."""
    size = (args.size, args.size)
    joint_tr = variant == "jtrVAE"
    return RunConfig(
        model=ModelConfig(
            patch=size,
            n_classes=len(CLASS_NAMES),
            latent_dim=2,
            rotation=joint_tr,
            translation=joint_tr,
            decoder="mlp" if joint_tr else "dense",
            encoder_hidden=(args.encoder_hidden, args.encoder_hidden),
            decoder_hidden=(args.decoder_hidden if joint_tr else args.jvae_decoder_hidden,) * args.decoder_layers,
        ),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device="cpu",
            val_fraction=0.0,
            progress=False,
            likelihood_threads=torch.get_num_threads(),
            annealing=Annealing(beta2_start=args.beta2_start, beta3_start=args.beta3_start, ramp_fraction=args.ramp),
        ),
        data=DataConfig(source="sim.cards", kind="stack", patch=size, preprocessing=Preprocessing(frame_norm="none")),
        name=f"cards-{variant.lower()}",
    )


def fit_pyroved_jvae(args: argparse.Namespace, images: np.ndarray) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """pyroVED's own joint VAE (no invariances) trained by its documented recipe; returns its encoder.

    The recipe is the one in pyroVED's ``jiVAE`` docstring, scaled to ``args.epochs``: the continuous KL weight held
    at 40 for the first 5 % of the epochs, then falling linearly to 3 over the next 20 %; the discrete weight 3; Adam
    at 1e-3. Same data, batch size, epochs and network widths as our j-VAE: it tells whether a j-VAE miss is ours.
    """
    pv = import_pyroved()
    size = (args.size, args.size)
    vae = pv.models.jiVAE(
        size,
        latent_dim=2,
        discrete_dim=len(CLASS_NAMES),
        invariances=None,
        hidden_dim_e=[args.encoder_hidden] * 2,
        hidden_dim_d=[args.jvae_decoder_hidden] * args.decoder_layers,
        seed=args.seed,
        device="cpu",
    )
    loader = pv.utils.init_dataloader(torch.as_tensor(images), batch_size=args.batch_size)
    trainer = pv.trainers.SVItrainer(vae, lr=1e-3, enumerate_parallel=True)
    hold = max(1, round(0.05 * args.epochs))
    ramp = np.linspace(40.0, 3.0, max(1, round(0.2 * args.epochs)))
    for epoch in range(args.epochs):
        beta_z = 40.0 if epoch < hold else float(ramp[min(epoch - hold, ramp.size - 1)])
        trainer.step(loader, scale_factor=[beta_z, 3.0])

    def encode(x: np.ndarray) -> dict[str, np.ndarray]:
        z_loc, _, prob = vae.encode(torch.as_tensor(x), logits=True)
        return {"z": z_loc.numpy(), "class_prob": prob.numpy()}

    return encode


def save_generation_figures(model: JTrVAE, names: tuple[str, ...], stem: Path) -> None:
    """What the paper shows of a trained j-trVAE: z0 and z1 traversals per class, and every class drawn at 0…330°.

    Rows are named by the suit each class was matched to on the test cards, not by class index.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.model_copy(update={"class_names": names})
    for dim in range(cfg.latent_dim):
        plots.plot_traversals(model, cfg, f"{stem}-traversal-z{dim}.png", dim=dim)
    plots.plot_conditioned(model, cfg, f"{stem}-conditioned.png")


def measure(args: argparse.Namespace, rotation_deg: float, variant: str) -> dict[str, Any]:
    train = make_cards(args.n_train, size=args.size, rotation=rotation_deg, seed=args.seed)
    test = make_cards(args.n_test, size=args.size, rotation=rotation_deg, seed=args.seed + 1)
    t0 = time.perf_counter()
    if variant == REFERENCE:
        enc = fit_pyroved_jvae(args, train.images)(test.images)
        seconds = time.perf_counter() - t0
    else:
        result = fit(run_config(args, variant), train.images, None)
        seconds = time.perf_counter() - t0
        enc = encode_images(result.model, test.images, batch_size=1000)
        if args.figures is not None and variant == "jtrVAE":
            pred = enc["class_prob"].argmax(axis=1)
            names = matched_class_names(pred, test.labels, CLASS_NAMES, len(CLASS_NAMES))
            save_generation_figures(result.model, names, args.figures / f"{variant}-{rotation_deg:g}")
    ev = evaluate_encodings(enc, labels=test.labels, factors={"shear": test.shear, "scale": test.scale})
    if args.figures is not None and ev.confusion is not None:
        plots.plot_confusion(
            ev.confusion, args.figures / f"{variant}-{rotation_deg:g}-confusion.png", class_names=CLASS_NAMES
        )
    return {
        "rotation": rotation_deg,
        "variant": variant,
        "accuracy": ev.accuracy,
        "nmi": ev.nmi,
        "rho_shear": ev.spearman["shear"][1],
        "rho_scale": ev.spearman["scale"][1],
        "confusion": ev.confusion.tolist() if ev.confusion is not None else None,
        "train_seconds": seconds,
    }


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, float | None, str, bool | None]]:
    """(description, measured, threshold text, passed) for each target whose rows were measured."""
    by = {(r["rotation"], r["variant"]): r for r in rows}
    out: list[tuple[str, float | None, str, bool | None]] = []

    def get(rot: float, var: str, key: str) -> float | None:
        row = by.get((rot, var))
        return None if row is None else row[key]

    def add(desc: str, value: float | None, threshold: float) -> None:
        out.append((desc, value, f">= {threshold}", None if value is None else value >= threshold))

    add("jtrVAE accuracy at ±60°", get(60.0, "jtrVAE", "accuracy"), 0.90)
    a, b = get(60.0, "jtrVAE", "accuracy"), get(60.0, "jVAE", "accuracy")
    add("jtrVAE − jVAE accuracy at ±60°", None if a is None or b is None else a - b, 0.25)
    add("jtrVAE accuracy at ±12°", get(12.0, "jtrVAE", "accuracy"), 0.85)
    add("jVAE accuracy at ±12°", get(12.0, "jVAE", "accuracy"), 0.85)
    reference = get(12.0, REFERENCE, "accuracy")
    if reference is not None:  # no target of ours: it tells whether a j-VAE miss is the method's or our code's
        out.append((f"{REFERENCE} accuracy at ±12°", reference, "reported", None))
    add("jtrVAE |ρ| z~shear at ±12°", get(12.0, "jtrVAE", "rho_shear"), 0.6)
    add("jtrVAE |ρ| z~scale at ±12°", get(12.0, "jtrVAE", "rho_scale"), 0.6)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rotations = [float(r) for r in args.rotations.split(",") if r.strip()]
    reference_at = {float(r) for r in args.reference_at.split(",") if r.strip()}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if REFERENCE in variants and importlib.util.find_spec("pyroved") is None:
        print(f"pyroVED is not installed (pip install -e '.[bench]'): the {REFERENCE} rows are left out", flush=True)
        variants.remove(REFERENCE)
    print(
        f"cards {args.size}x{args.size}, K=4, dim z=2; {args.n_train} training / {args.n_test} held-out test cards per "
        f"range; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, encoder 2×{args.encoder_hidden}, "
        f"decoder {args.decoder_layers}×{args.decoder_hidden} (j-VAE: dense {args.decoder_layers}×"
        f"{args.jvae_decoder_hidden}), "
        f"β2 start {args.beta2_start}, β3 start {args.beta3_start}, ramp {args.ramp}; seed {args.seed}; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    t_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    header = (
        f"{'rotation':>8s} {'model':>12s} {'accuracy':>8s} {'NMI':>6s} {'|ρ|shear':>8s} {'|ρ|scale':>8s} "
        f"{'train s':>8s}"
    )
    print(header, flush=True)
    for rot in rotations:
        for var in variants:
            if var == REFERENCE and rot not in reference_at:
                continue
            r = measure(args, rot, var)
            rows.append(r)
            print(
                f"{f'±{rot:g}°':>8s} {var:>12s} {r['accuracy']:8.3f} {r['nmi']:6.3f} {r['rho_shear']:8.3f} "
                f"{r['rho_scale']:8.3f} {r['train_seconds']:8.1f}",
                flush=True,
            )
    wall = time.perf_counter() - t_all
    print("\ntargets (held-out cards):")
    results = targets(rows)
    for desc, value, thr, ok in results:
        shown = "   n/a" if value is None else f"{value:6.3f}"
        verdict = ("" if thr == "reported" else "n/a") if ok is None else ("PASS" if ok else "MISS")
        print(f"  {desc:<34s} {shown} {thr:<8s} {verdict}")
    print(f"wall time {wall:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "rows": rows,
                    "targets": [{"target": d, "value": v, "threshold": t, "pass": ok} for d, v, t, ok in results],
                    "wall_seconds": wall,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
