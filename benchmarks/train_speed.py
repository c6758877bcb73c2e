"""Training speed per image: our j-trVAE against pyroVED's joint invariant VAE, same architecture, data and batch.

Both sides run SVI with TraceEnum_ELBO (parallel enumeration of the K classes) and Adam, on the same batch of
cards (``sim.cards``; random binary images if that generator is missing) with MLP encoder 2×256 tanh, coordinate
decoder of three 256-wide tanh layers, K=4, D=2, rotation and translation. pyroVED calls that decoder
``hidden_dim_d=[256, 256]`` because its coordinate layer is counted apart; the matmul shapes are the same as ours
with ``decoder_hidden=(256, 256, 256)``.

pyroVED is the ``bench`` extra, imported through ``pyroved_import`` (it needs no torchvision that way). If pyroVED is
missing, the table says so and shows ours only.

    python benchmarks/train_speed.py [--size 48] [--batch 32] [--steps 3] [--warmup 1] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam
from pyroved_import import import_pyroved

from models.config import ModelConfig
from models.jtrvae import JTrVAE
from models.train import make_elbo

K, D = 4, 2
OURS, REF = "atomstream JTrVAE", "pyroVED jiVAE"


def make_data(n: int, size: int, seed: int) -> tuple[np.ndarray, str]:
    try:
        from sim.cards import make_cards
    except ImportError:
        rng = np.random.default_rng(seed)
        return (rng.random((n, size, size)) > 0.6).astype(np.float32), "random binary"
    return np.asarray(make_cards(n, size=size, rotation=60, seed=seed).images, dtype=np.float32), "cards ±60°"


def _fresh_store_step(step: Callable[[], float]) -> float:
    """One SVI step on an empty param store.

    Both models register a module called "decoder"; Pyro would hand one model's weights to the other when their
    steps are interleaved. Each ``pyro.module`` call re-registers the module's own tensors, and Adam's state is
    keyed by tensor, so clearing the store before every step changes nothing else.
    """
    pyro.clear_param_store()
    return step()


def ours_step(x: torch.Tensor, lr: float) -> Callable[[], float]:
    cfg = ModelConfig(patch=tuple(x.shape[-2:]), n_classes=K, latent_dim=D, rotation=True, translation=True)
    pyro.clear_param_store()
    # the decoder's likelihood chunks side by side on as many threads as torch has (what the library did itself
    # before it stopped touching torch's thread count; pyroVED's side keeps torch's intra-op threads)
    model = JTrVAE(cfg, likelihood_threads=torch.get_num_threads())
    svi = SVI(model.model, model.guide, Adam({"lr": lr}), loss=make_elbo(model))
    beta = (1.0, 1.0, 1.0)
    return lambda: _fresh_store_step(lambda: svi.step(x, beta))


def pyroved_step(x: torch.Tensor, lr: float) -> Callable[[], float]:
    pv = import_pyroved()
    size = tuple(x.shape[-2:])
    vae = pv.models.jiVAE(
        size,
        latent_dim=D,
        discrete_dim=K,
        invariances=["r", "t"],
        hidden_dim_e=[256, 256],
        hidden_dim_d=[256, 256],  # coordinate layer + 2 → three 256-wide tanh layers, as ours
        activation="tanh",
        sampler_d="bernoulli",
        device="cpu",
    )
    svi = SVI(
        vae.model,
        pyro.infer.config_enumerate(vae.guide, "parallel", expand=True),  # what pv.trainers.SVItrainer builds
        Adam({"lr": lr}),
        loss=TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False),
    )
    return lambda: _fresh_store_step(lambda: svi.step(x, scale_factor=[1.0, 1.0]))


def time_interleaved(steps: dict[str, Callable[[], float]], n: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each implementation, their steps interleaved so both see the same machine load."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--skip-pyroved", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    data, kind = make_data(args.batch, args.size, seed=0)
    x = torch.from_numpy(data)
    print(
        f"# {args.size}×{args.size} {kind}, batch {args.batch}, median of {args.steps} interleaved steps after "
        f"{args.warmup} warm-up; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={K}, D={D}, rotation+translation"
    )
    steps: dict[str, Callable[[], float]] = {}
    notes: dict[str, str] = {}
    pyro.set_rng_seed(0)
    steps[OURS] = ours_step(x, args.lr)
    if args.skip_pyroved:
        notes[REF] = "skipped (--skip-pyroved)"
    else:
        try:
            steps[REF] = pyroved_step(x, args.lr)
        except Exception as e:  # the baseline is optional: report why it did not run instead of failing
            notes[REF] = f"unavailable: {type(e).__name__}: {e}"
    measured = time_interleaved(steps, args.steps, args.warmup)
    rows = [(OURS, measured[OURS], ""), (REF, measured.get(REF), notes.get(REF, ""))]
    ref_time = rows[1][1]
    print(f"{'implementation':<20} {'s/step':>9} {'ms/image':>9} {'images/s':>9} {'speed-up':>9}")
    for name, t, note in rows:
        if t is None:
            print(f"{name:<20} {'-':>9} {'-':>9} {'-':>9} {'-':>9}  {note}")
            continue
        ratio = f"{ref_time / t:.2f}×" if ref_time else "-"
        print(f"{name:<20} {t:>9.3f} {1000 * t / args.batch:>9.1f} {args.batch / t:>9.1f} {ratio:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
