"""Parity: exported backends against the Pyro guide's posterior means, on real patches, before a manifest exists.

The reference is the eager model: its encoder network and ``models.nets.posterior_means`` (what ``JTrVAE.encode``
returns), in the model's own dtype. Each backend — ONNX Runtime on the CPU provider, TorchScript, optionally the fp16
ONNX — runs on the same patches in chunks of deliberately uneven sizes (1, 3, 252, then 256s), which also proves the
batch axis is really dynamic. fp32 must agree to ``PARITY_TOLERANCE`` on every output and give the identical class
argmax on every patch whose class the reference decides by more than twice the tolerance (closer is a tie: either
answer is within the tolerance); the fp16 variant is held to ``FP16_TOLERANCE`` and at least
``FP16_MIN_ARGMAX_AGREEMENT`` of those patches.

``angle`` is compared on the circle. Its error is the network's rounding divided by the length of the concentration
vector, so a model that is unsure of the angle (a short vector, typical before training) shows the largest Δ there.
"""

from __future__ import annotations

import copy
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from exporters.quiet import quiet_export_warnings
from exporters.wrapper import ParityReference
from models.config import RunConfig
from models.data import DataError, patches_from_config
from streamer.maps.manifest import (
    FRAME_INPUT_NAME,
    INPUT_NAME,
    BackendParity,
    LatentLayout,
    Parity,
    expected_outputs,
    output_bound,
)

__all__ = [
    "FP16_MIN_ARGMAX_AGREEMENT",
    "FP16_TOLERANCE",
    "MAX_PARITY_PATCHES",
    "MIN_PARITY_PATCHES",
    "PARITY_TOLERANCE",
    "ParityError",
    "check_frame_parity",
    "check_parity",
    "parity_mosaic",
    "parity_patches",
    "run_onnx",
    "run_torchscript",
]

PARITY_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2
FP16_MIN_ARGMAX_AGREEMENT = 0.99
MIN_PARITY_PATCHES = 1024
MAX_PARITY_PATCHES = 4096  # more real patches than this are subsampled evenly: parity time stays bounded
_FIRST_CHUNKS = (1, 3, 252)
_CHUNK = 256


class ParityError(Exception):
    """An exported backend disagrees with the eager guide; the message names the worst backend, output and Δ."""


def _chunks(n: int) -> list[slice]:
    out, start = [], 0
    sizes = iter(_FIRST_CHUNKS)
    while start < n:
        step = next(sizes, _CHUNK)
        out.append(slice(start, min(n, start + step)))
        start += step
    return out


def run_onnx(path: str | Path, patches: Tensor, *, threads: int = 2) -> list[Tensor]:
    """Outputs of an ONNX file on ONNX Runtime's CPU provider, in the file's output order."""
    session = _cpu_session(path, threads)
    x = patches.detach().to("cpu", torch.float32).contiguous().numpy()
    parts = [session.run(None, {INPUT_NAME: x[s]}) for s in _chunks(x.shape[0])]
    return [torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in range(len(parts[0]))]


def run_torchscript(path: str | Path, patches: Tensor) -> list[Tensor]:
    """Outputs of a TorchScript file on the CPU."""
    with quiet_export_warnings():
        module = torch.jit.load(str(path), map_location="cpu")
    x = patches.detach().to("cpu", torch.float32).contiguous()
    with torch.inference_mode():
        parts = [module(x[s]) for s in _chunks(x.shape[0])]
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def _max_abs_diff(name: str, got: Tensor, want: Tensor) -> float:
    if got.shape != want.shape:
        return math.inf
    diff = got.to(torch.float64) - want.to(torch.float64)
    if name == "angle":
        diff = torch.remainder(diff + math.pi, 2 * math.pi) - math.pi
    if name == "recon_nll":  # a sum over every pixel, hundreds of nats: relative to its size (manifest.LOOSER_OUTPUTS)
        diff = diff / want.to(torch.float64).abs().clamp_min(1.0)
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return float(diff.abs().max()) if diff.numel() else 0.0


def _compare(
    backend: str, names: list[str], got: list[Tensor], ref: dict[str, Tensor], tolerance: float, min_agreement: float
) -> BackendParity:
    if len(got) != len(names):
        raise ParityError(f"parity failed: {backend} returns {len(got)} outputs, expected {names}")
    diffs = {name: _max_abs_diff(name, g, ref[name]) for name, g in zip(names, got, strict=True)}
    agreement = None
    if "class_prob" in ref:
        g, want = got[names.index("class_prob")], ref["class_prob"]
        # a class the reference decides by less than the tolerance allows either way (twice the bound: each of the
        # two top probabilities may move by it) is a tie to this check: the backend may pick either without being
        # wrong (a training of the real-data benchmark failed its export on 1 such patch of 4096)
        top2 = want.to(torch.float64).topk(min(2, want.shape[-1]), dim=-1).values
        margin = top2[..., 0] - top2[..., -1] if want.shape[-1] > 1 else torch.full_like(top2[..., 0], math.inf)
        decided = margin > 2 * output_bound("class_prob", tolerance)
        same = (g.argmax(dim=-1) == want.argmax(dim=-1))[decided]
        agreement = float(same.to(torch.float64).mean()) if same.numel() else 1.0
    within = all(d <= output_bound(name, tolerance) for name, d in diffs.items())
    passed = within and (agreement is None or agreement >= min_agreement)
    return BackendParity(
        backend=backend,  # type: ignore[arg-type]
        max_abs_diff=diffs,
        argmax_agreement=agreement,
        tolerance=tolerance,
        passed=passed,
    )


def _failure(results: list[BackendParity], n: int, data: str) -> str:
    worst: tuple[float, str] = (-1.0, "")
    for r in results:
        for name, d in r.max_abs_diff.items():
            bound = r.bound(name)
            if d / bound > 1 and d / bound > worst[0]:
                worst = (d / bound, f"{r.backend} output {name!r} max |Δ| = {d:.3g} > {bound:g}")
    if not worst[1]:
        r = next(r for r in results if not r.passed)
        bad = round((1 - (r.argmax_agreement or 0.0)) * n)
        worst = (0.0, f"{r.backend} class argmax differs from the reference on {bad} of {n} patches")
    return f"parity failed: {worst[1]} (against JTrVAE.encode on {n} patches: {data})"


def check_parity(
    model: torch.nn.Module,
    latent: LatentLayout,
    files: dict[str, Path],
    patches: Tensor,
    *,
    data: str,
) -> Parity:
    """Run every exported file in ``files`` (backend -> path) against the reference; ``ParityError`` on failure."""
    if patches.ndim != 4 or patches.shape[1] != 1:
        raise ParityError(f"parity patches must be (N, 1, ph, pw), got {tuple(patches.shape)}")
    if patches.shape[0] < MIN_PARITY_PATCHES:
        raise ParityError(f"parity needs at least {MIN_PARITY_PATCHES} patches, got {patches.shape[0]}")
    names = [s.name for s in expected_outputs(latent)]
    x = patches.detach().to("cpu", torch.float32).contiguous()
    if x.shape[0] > MAX_PARITY_PATCHES:
        x = x[torch.linspace(0, x.shape[0] - 1, MAX_PARITY_PATCHES).round().long()].contiguous()
        data = f"{data}; {MAX_PARITY_PATCHES} of them evenly spaced"
    model = _reference_model(model)
    ref_parts = [ParityReference(model, latent)(x[s]) for s in _chunks(x.shape[0])]
    ref = {k: torch.cat([p[k] for p in ref_parts]) for k in names}
    results: list[BackendParity] = []
    for backend, path in files.items():
        got = run_torchscript(path, x) if backend == "torchscript" else run_onnx(path, x)
        fp16 = backend == "onnx_fp16"
        tol = FP16_TOLERANCE if fp16 else PARITY_TOLERANCE
        results.append(_compare(backend, names, got, ref, tol, FP16_MIN_ARGMAX_AGREEMENT if fp16 else 1.0))
    if not all(r.passed for r in results):
        raise ParityError(_failure(results, x.shape[0], data))
    return Parity(n_patches=int(x.shape[0]), data=data, backends=tuple(results))


def parity_mosaic(patches: Tensor, max_side: int = 16) -> Tensor:
    """A frame ``(k·ph, k·pw)`` of the first ``k²`` patches side by side (``k`` at most ``max_side``): real
    intensities for the frame encoder's parity, whose grid then also cuts patches that straddle two of them."""
    k = max(1, min(max_side, math.isqrt(int(patches.shape[0]))))
    ph, pw = int(patches.shape[-2]), int(patches.shape[-1])
    tiles = patches[: k * k, 0].reshape(k, k, ph, pw)
    return tiles.permute(0, 2, 1, 3).reshape(k * ph, k * pw).contiguous()


def check_frame_parity(
    model: torch.nn.Module, latent: LatentLayout, path: Path, patches: Tensor, stride: tuple[int, int]
) -> BackendParity:
    """``encoder.frame.onnx`` against the reference on the grid patches of a mosaic of the parity patches: the whole
    mosaic, then a crop of it with a different grid (proving the frame's height and width are really dynamic)."""
    from streamer.maps.tiling import tile_grid

    frame = parity_mosaic(patches.detach().to("cpu", torch.float32))
    ph, pw = int(patches.shape[-2]), int(patches.shape[-1])
    crop = frame[: max(ph, frame.shape[0] - 3 * stride[0]), : max(pw, frame.shape[1] - 5 * stride[1])]
    session = _cpu_session(path, 2)
    model = _reference_model(model)
    names = [s.name for s in expected_outputs(latent)]
    got_parts, ref_parts = [], []
    for region in (frame, crop):
        cut = tile_grid(region, (ph, pw), stride)
        x = cut.reshape(-1, 1, ph, pw).contiguous()
        ref_parts.append(ParityReference(model, latent)(x))
        got_parts.append(session.run(None, {FRAME_INPUT_NAME: region[None, None].numpy()}))
    ref = {k: torch.cat([p[k] for p in ref_parts]) for k in names}
    got = [torch.cat([torch.from_numpy(p[i]) for p in got_parts]) for i in range(len(names))]
    result = _compare("onnx_frame", names, got, ref, PARITY_TOLERANCE, 1.0)
    if not result.passed:
        n = int(ref[names[0]].shape[0])
        raise ParityError(_failure([result], n, f"the grid patches of a {tuple(frame.shape)} mosaic and a crop"))
    return result


def _reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or an eval-mode CPU copy of it when it is elsewhere or training (the caller's is left as it is)."""
    if next(model.parameters()).device.type != "cpu" or model.training:
        return copy.deepcopy(model).to("cpu").eval()
    return model


def _cpu_session(path: str | Path, threads: int) -> Any:
    """An ONNX Runtime session of ``path`` on the CPU provider, quiet, with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _read_patch_npz(path: Path, patch: tuple[int, int]) -> Tensor | None:
    """An ``.npz`` holding ``patches`` (already preprocessed, N×ph×pw or N×1×ph×pw); None if it has none."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "patches" not in archive.files:
                return None
            arr = np.asarray(archive["patches"], dtype=np.float32)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {str(path)!r} as .npz: {exc}") from None
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1:] != (1, *patch):
        raise DataError(f"'patches' in {str(path)!r} has shape {arr.shape}; expected N×{patch[0]}×{patch[1]}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def parity_patches(
    run: RunConfig, *, parity_data: str | Path | None = None, seed: int = 0
) -> tuple[Tensor, str, list[str]]:
    """Patches to check parity on, a description of them, and notes (each a line the caller should print).

    Order of preference: ``parity_data`` (an ``.npz`` with preprocessed ``patches``, or any file the run's
    ``DataConfig`` can cut, via ``models.data.patches_from_config``); else the run's own data source if it is still
    readable; else — the documented fallback, never silent — uniform random patches in [0, 1] (seeded). Real
    patches short of ``MIN_PARITY_PATCHES`` are topped up with such random patches, and the description says so.
    """
    patch = tuple(run.model.patch)
    notes: list[str] = []
    real: Tensor | None = None
    desc = ""
    if parity_data is not None:
        p = Path(parity_data)
        real = _read_patch_npz(p, patch) if p.suffix.lower() == ".npz" and p.is_file() else None  # type: ignore[arg-type]
        if real is not None:
            desc = f"preprocessed patches from {p}"
        else:
            real = torch.from_numpy(patches_from_config(p, run.data).images[:, None])
            desc = f"{p} cut as the run's data ({run.data.kind})"
    elif run.data.source:
        try:
            real = torch.from_numpy(patches_from_config(run.data.source, run.data).images[:, None])
            desc = f"the run's data {run.data.source} ({run.data.kind})"
        except DataError as exc:
            notes.append(f"cannot re-read the run's data source: {exc}")
    else:
        notes.append("the run records no data source and no parity_data was given")
    gen = torch.Generator().manual_seed(seed)
    if real is not None and tuple(real.shape[-2:]) != patch:
        raise DataError(f"parity patches are {tuple(real.shape[-2:])} but the model takes {patch}")
    if real is not None and real.shape[0] > MAX_PARITY_PATCHES:
        index = torch.linspace(0, real.shape[0] - 1, MAX_PARITY_PATCHES).round().long()
        desc += f", {MAX_PARITY_PATCHES} of {real.shape[0]} patches evenly spaced"
        real = real[index]
    n_real = 0 if real is None else int(real.shape[0])
    if n_real >= MIN_PARITY_PATCHES:
        return real.contiguous(), desc, notes  # type: ignore[union-attr]
    n_random = MIN_PARITY_PATCHES - n_real
    noise = torch.rand((n_random, 1, *patch), generator=gen)
    random_desc = f"{n_random} uniform random [0, 1] patches (seed {seed})"
    if real is None:
        desc = f"{random_desc} — FALLBACK, no real data"
        notes.append(f"parity is checked on {random_desc} only; give parity_data (real patches) to check on them")
    else:
        desc = f"{n_real} real patches ({desc}) + {random_desc} to reach {MIN_PARITY_PATCHES}"
        notes.append(f"only {n_real} real patches; topped up with {random_desc}")
        noise = torch.cat([real, noise])
    return noise.contiguous(), desc, notes
