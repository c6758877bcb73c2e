"""Training speed per image: our j-trVAE against pyroVED's joint invariant VAE, same architecture, data and batch.

Both sides run SVI with TraceEnum_ELBO (parallel enumeration of the K classes) and Adam, on the same batch of
cards (``sim.cards``; random binary images if that generator is missing) with MLP encoder 2×256 tanh, coordinate
decoder of three 256-wide tanh layers, K=4, D=2, rotation and translation. pyroVED calls that decoder
``hidden_dim_d=[256, 256]`` because its coordinate layer is counted apart; the matmul shapes are the same as ours
with ``decoder_hidden=(256, 256, 256)``.

pyroVED is the ``bench`` extra, imported through ``pyroved_import`` (it needs no torchvision that way). If pyroVED is
missing, the table says so and shows ours only.

``--devices cpu,cuda`` adds a row of ours per device, each with the likelihood its device selects
(``models.likelihood_path``: the fused kernel on the CPU, plain autograd on CUDA); a device that is not there is
skipped with a line saying so. ``--parity`` checks, on the same weights and inputs, the decoder's summed
log-likelihood and its gradients on every path against the CPU fused kernel (always including the autograd
expression on the CPU), and exits 1 when one differs by more than ``--parity-tol`` (relative to the largest value).

``--matmul full,bfloat16`` gives our CPU row once per precision of the fused kernel's matmul operands
(``TrainConfig.decoder_matmul``; bfloat16 only where the CPU has it natively). ``--profile`` adds where each of those
steps' time goes: the decoder's likelihood alone against the whole step, and its matmul GFLOP/s against the limit of
this CPU on the same matmul shape and threads (what the ≥ 3× target has left to win, and where).

    python benchmarks/train_speed.py [--size 48] [--batch 32] [--steps 3] [--warmup 1] [--threads N]
        [--matmul full,bfloat16] [--profile]
        [--devices cpu,cuda] [--parity] [--skip-pyroved]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam
from pyroved_import import import_pyroved

from models.config import ModelConfig
from models.coords import direction, pixel_grid, rotate_shift_grid
from models.fused_likelihood import CHUNK_ROWS, MatmulPrecision, native_bfloat16, pixel_log_likelihood
from models.jtrvae import JTrVAE
from models.likelihood_path import likelihood_path
from models.nets import CoordDecoder
from models.train import make_elbo

K, D = 4, 2
#: the paper's networks, as pyroVED builds them: encoder 2×256, coordinate decoder 3×256 (all tanh)
ENCODER, DECODER = (256, 256), (256, 256, 256)
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


def ours_step(x: torch.Tensor, lr: float, device: str = "cpu", matmul: MatmulPrecision = "full") -> Callable[[], float]:
    cfg = ModelConfig(
        patch=tuple(x.shape[-2:]),
        n_classes=K,
        latent_dim=D,
        rotation=True,
        translation=True,
        encoder_hidden=ENCODER,
        decoder_hidden=DECODER,
    )
    pyro.clear_param_store()
    threads = torch.get_num_threads()
    model = JTrVAE(cfg, likelihood_threads=threads).to(device)
    model.likelihood_matmul = matmul  # what fit sets from TrainConfig.decoder_matmul
    x = x.to(device)
    svi = SVI(model.model, model.guide, Adam({"lr": lr}), loss=make_elbo(model))
    beta = (1.0, 1.0, 1.0)
    return lambda: _fresh_store_step(lambda: as_the_cli(lambda: svi.step(x, beta)))


def as_the_cli(run: Callable[[], Any]) -> Any:
    """``run`` with torch at one intra-op thread, as ``atomstream train`` sets it (``training_threads``): the
    decoder's chunks then go side by side on ``likelihood_threads`` threads, each op single-threaded. Without this
    every chunk's op would also fork torch's intra-op threads: 2 × 2 threads on 2 cores, which is not how the CLI
    trains. pyroVED's side keeps torch's intra-op threads, as pyroVED runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


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


def random_poses(b: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder inputs for ``b`` images of ``size``²: coordinates under random rotations and shifts, a random z, and
    the K one-hot classes enumerated ``(K, 1, K)``."""
    angle, shift = torch.rand(b, generator=gen) * 6.283, 0.1 * torch.randn(b, 2, generator=gen)
    coords = rotate_shift_grid(pixel_grid(size, size), direction(angle), shift)
    return coords, torch.randn(b, D, generator=gen), torch.eye(K).reshape(K, 1, K)


def path_name(device: str, matmul: MatmulPrecision = "full", *, written_out: bool = False) -> str:
    """``cpu fused``, ``cpu fused bf16``, ``cpu autograd``, ``cuda autograd``: one name per likelihood path."""
    path = "autograd" if written_out else likelihood_path(device)
    return f"{device} {path}{' bf16' if matmul == 'bfloat16' else ''}"


def likelihood_parity(size: int, devices: list[str], precisions: list[str], *, seed: int = 0) -> dict[str, float]:
    """Largest relative difference, over the summed log-likelihood per (class, image) and its gradient for every
    decoder weight, between each path and the CPU fused kernel, on the same weights and inputs (8 images of
    ``size``², K classes enumerated, random rotations and shifts). ``cpu autograd`` is always among them; so is the
    CPU kernel on bfloat16 matmul operands when asked (an approximation, judged at its own tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    decoder = CoordDecoder(latent_dim=D, n_classes=K, hidden=DECODER)
    images, _ = make_data(8, size, seed)
    x = torch.from_numpy(images).reshape(8, -1)
    coords, z, y = random_poses(8, size, gen)

    def run(device: str, written_out: bool, matmul: MatmulPrecision = "full") -> list[torch.Tensor]:
        dec = copy.deepcopy(decoder).to(device)
        args = [t.to(device) for t in (coords, z, y, x)]
        if written_out:  # the autograd expression the decoder runs off the CPU, written out so the CPU runs it too
            ll = pixel_log_likelihood(dec(*args[:3]), args[3], "bernoulli", 0.2).sum(-1)
        else:  # what training runs on that device: the path likelihood_path selects
            ll = dec.log_likelihood(*args, likelihood="bernoulli", gaussian_scale=0.2, matmul=matmul)
        grads = torch.autograd.grad(ll.sum(), list(dec.parameters()))
        return [t.detach().cpu() for t in (ll, *grads)]

    want = run("cpu", written_out=False)
    paths: list[tuple[str, bool, MatmulPrecision]] = [("cpu", True, "full")]
    paths += [(d, False, "full") for d in devices if d != "cpu"] + [
        ("cpu", False, m) for m in precisions if m != "full"
    ]
    out: dict[str, float] = {}
    for device, written_out, matmul in paths:
        got = run(device, written_out, matmul)
        out[path_name(device, matmul, written_out=written_out)] = max(
            float((g - w).abs().max() / w.abs().max().clamp_min(1e-30)) for g, w in zip(got, want, strict=True)
        )
    return out


def matmul_limit(threads: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """GFLOP/s of this CPU on the kernel's own matmul shape (a ``CHUNK_ROWS``×256 block times 256×256), one block
    per thread side by side as the kernel runs them: the ceiling a decoder step could reach in its matmuls."""
    blocks = [(torch.randn(CHUNK_ROWS, 256).to(dtype), torch.randn(256, 256).to(dtype)) for _ in range(threads)]

    def one(i: int) -> None:
        with torch.no_grad():
            for _ in range(repeats):
                torch.mm(*blocks[i])

    def both() -> float:  # best of 3 rounds: on a shared machine the ceiling is the least disturbed round
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, range(threads)))  # warm-up
            rounds = []
            for _ in range(3):
                t0 = time.perf_counter()
                list(pool.map(one, range(threads)))
                rounds.append(time.perf_counter() - t0)
            return min(rounds)

    seconds = as_the_cli(both)
    return 2 * CHUNK_ROWS * 256 * 256 * repeats * threads / seconds / 1e9


def decoder_seconds(x: torch.Tensor, matmul: MatmulPrecision, repeats: int = 2) -> float:
    """Seconds of the decoder's likelihood alone (forward and backward, K classes enumerated, random transforms):
    the share of a step the fused kernel takes; the rest is encoder, Pyro's bookkeeping and Adam."""
    b, size = x.shape[0], x.shape[-1]
    decoder = CoordDecoder(latent_dim=D, n_classes=K, hidden=DECODER)
    coords, z, y = random_poses(b, size, torch.Generator().manual_seed(0))
    z.requires_grad_()
    flat, threads = x.reshape(b, -1), torch.get_num_threads()  # the chunks' threads, read before as_the_cli sets 1

    def step() -> None:
        ll = decoder.log_likelihood(
            coords,
            z,
            y,
            flat,
            likelihood="bernoulli",
            gaussian_scale=0.2,
            threads=threads,
            matmul=matmul,
        )
        ll.sum().backward()

    def timed() -> float:
        step()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - t0) / repeats

    return as_the_cli(timed)


def decoder_gflop(b: int, size: int) -> float:
    """Matmul GFLOP of one step's decoder: every hidden H×H layer at K·B·P rows, three times (forward, the input's
    gradient, the weight's gradient); the 2-wide coordinate layer and the 1-wide output are left out (< 1 %)."""
    rows = K * b * size * size
    return 3 * 2 * rows * sum(a * c for a, c in zip(DECODER[1:], DECODER[:-1], strict=True)) / 1e9


def print_profile(
    x: torch.Tensor, measured: dict[str, float], variants: dict[str, tuple[str, MatmulPrecision]]
) -> None:
    """Where a step's time goes, and how far its matmuls are from the CPU's limit on the same shapes."""
    threads = torch.get_num_threads()
    gflop = decoder_gflop(x.shape[0], x.shape[-1])
    print(
        f"# profile: decoder matmuls {gflop:.0f} GFLOP per step; limit = the same matmul shape on {threads} thread(s)"
    )
    print(
        f"{'our row':<32} {'step s':>7} {'decoder s':>9} {'decoder %':>9} {'GFLOP/s':>8} {'limit':>8} {'of limit':>8}"
    )
    for name, matmul in ((n, m) for n, (device, m) in variants.items() if device == "cpu"):
        step_s, dec_s = measured[name], decoder_seconds(x, matmul)
        limit = matmul_limit(threads, torch.bfloat16 if matmul == "bfloat16" else torch.float32)
        achieved = gflop / dec_s
        print(
            f"{name:<32} {step_s:>7.3f} {dec_s:>9.3f} {100 * dec_s / step_s:>8.0f}% {achieved:>8.0f} {limit:>8.0f} "
            f"{100 * achieved / limit:>7.0f}%"
        )


def usable_devices(asked: list[str]) -> tuple[list[str], list[str]]:
    """The asked devices that are here, and a line for each that is not."""
    here, notes = [], []
    for device in asked:
        if device == "cuda" and not torch.cuda.is_available():
            notes.append("# cuda: skipped (torch sees no CUDA device); no GPU figure is reported")
        else:
            here.append(device)
    return here, notes


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
    ap.add_argument("--devices", default="cpu", help="comma-separated devices for our rows: cpu, cuda")
    ap.add_argument(
        "--matmul",
        default="full,bfloat16",
        help="comma-separated precisions of the fused kernel's matmuls for our CPU rows: full, bfloat16 (TrainConfig."
        "decoder_matmul; bfloat16 is skipped on a CPU without it natively)",
    )
    ap.add_argument("--profile", action="store_true", help="also print where our CPU steps' time goes")
    ap.add_argument("--parity", action="store_true", help="check every likelihood path against the CPU kernel")
    ap.add_argument("--parity-tol", type=float, default=1e-4, help="largest relative difference that passes")
    ap.add_argument("--parity-tol-bf16", type=float, default=3e-2, help="the same for the bfloat16 matmul path")
    args = ap.parse_args(argv)
    devices, skipped = usable_devices([d.strip() for d in args.devices.split(",") if d.strip()])
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    data, kind = make_data(args.batch, args.size, seed=0)
    x = torch.from_numpy(data)
    print(
        f"# {args.size}×{args.size} {kind}, batch {args.batch}, median of {args.steps} interleaved steps after "
        f"{args.warmup} warm-up; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={K}, D={D}, rotation+translation, "
        f"encoder {'×'.join(map(str, ENCODER))}, decoder {'×'.join(map(str, DECODER))}"
    )
    for line in skipped:
        print(line)
    steps: dict[str, Callable[[], float]] = {}
    notes: dict[str, str] = {}
    precisions = [m.strip() for m in args.matmul.split(",") if m.strip()]
    if "bfloat16" in precisions and not native_bfloat16():
        print("# bfloat16: skipped (this CPU has no native bfloat16; oneDNN would emulate it)")
        precisions.remove("bfloat16")
    variants: dict[str, tuple[str, MatmulPrecision]] = {
        f"{OURS} {path_name(d, m)}": (d, m)
        for d in devices
        for m in (precisions if likelihood_path(d) == "fused" else ["full"])
    }
    ours = list(variants)
    for name, (device, matmul) in variants.items():
        pyro.set_rng_seed(0)
        steps[name] = ours_step(x, args.lr, device, matmul)
    if args.skip_pyroved:
        notes[REF] = "skipped (--skip-pyroved)"
    else:
        try:
            steps[REF] = pyroved_step(x, args.lr)
        except Exception as e:  # the baseline is optional: report why it did not run instead of failing
            notes[REF] = f"unavailable: {type(e).__name__}: {e}"
    measured = time_interleaved(steps, args.steps, args.warmup)
    rows = [(name, measured[name], "") for name in ours] + [(REF, measured.get(REF), notes.get(REF, ""))]
    base = REF if measured.get(REF) else ours[0]  # speed-up against pyroVED, or against our first device
    ref_time = measured.get(base)
    print(f"{'implementation':<32} {'s/step':>9} {'ms/image':>9} {'images/s':>9} {'speed-up':>9}  (× {base})")
    for name, t, note in rows:
        if t is None:
            print(f"{name:<32} {'-':>9} {'-':>9} {'-':>9} {'-':>9}  {note}")
            continue
        ratio = f"{ref_time / t:.2f}×" if ref_time else "-"
        print(f"{name:<32} {t:>9.3f} {1000 * t / args.batch:>9.1f} {args.batch / t:>9.1f} {ratio:>9}")
    if args.profile:
        print_profile(x, measured, variants)
    if not args.parity:
        return 0
    diffs = likelihood_parity(args.size, devices, precisions)
    bad = {p: d for p, d in diffs.items() if not d <= (args.parity_tol_bf16 if p.endswith("bf16") else args.parity_tol)}
    cells = ", ".join(f"{path} {d:.1e}" for path, d in diffs.items())
    print(f"# parity, decoder log-likelihood and its gradients against the CPU fused kernel (largest relative "
          f"difference, tolerance {args.parity_tol:g}, bf16 {args.parity_tol_bf16:g}): {cells} -> "
          f"{'FAILED' if bad else 'ok'}")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
