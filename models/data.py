"""Training data: image stacks and patches cut from scans, with each patch's position and the config that made it.

Scans are cut and transformed by ``streamer.maps.preprocess`` (grid or atom-centred patches, optional log-magnitude
FFT), the very functions serving runs on live frames, and the ``DataConfig`` returned with the patches records every
choice, so ``config.json`` of a run tells the exporter — and ``patches_from_config`` on new data — exactly what training
saw.

Positions: ``PatchSet.positions[i] = (frame, y, x)`` is the **top-left corner** of patch ``i`` in frame pixels, for
every kind of data, so ``frames[f, y:y+ph, x:x+pw]`` is always the raw region the patch came from. Atom-centred
patches are interpolated so the sub-pixel atom centre sits on pixel ``(ph // 2, pw // 2)``; their positions hold the
rounded corner and ``PatchSet.centres`` the exact centres. A stack image
is its own "frame": its position is ``(i, 0, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
from pydantic import ValidationError

from models.config import DataConfig
from streamer.maps.atoms import find_atoms
from streamer.maps.preprocess import Preprocessing, grid_patches, point_patches, prepare_frame, prepare_patches
from streamer.maps.tiling import TilingError, grid_shape

__all__ = [
    "DataError",
    "PatchSet",
    "build_patches",
    "check_frames",
    "default_patch_norm",
    "load_frames",
    "load_stack",
    "patches_from_config",
    "scan_patches",
    "stack_patches",
]


class DataError(ValueError):
    """A data file or a patching option that does not fit the data; the message names the value and the fix."""


@dataclass(frozen=True)
class PatchSet:
    """Encoder-ready patches (values in [0, 1]) and where each came from."""

    images: np.ndarray  # (N, H, W) float32
    positions: np.ndarray  # (N, 3) int64: frame, y, x of the top-left corner
    data: DataConfig
    grid: tuple[int, int] | None = None  # (gh, gw) per frame for grid patches, frame-major then row-major order
    labels: np.ndarray | None = None  # (N,) int64 ground-truth classes, evaluation only
    factors: dict[str, np.ndarray] = field(default_factory=dict)  # true factors of variation, evaluation only
    frame_shape: tuple[int, int] | None = None  # (H, W) of the scan frames; None for stacks
    class_names: tuple[str, ...] | None = None  # names of the label values 0..K-1, when the data file has them
    point_centres: np.ndarray | None = None  # (N, 2) float: sub-pixel atom centres (y, x) of atom-centred patches

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def centres(self) -> np.ndarray:
        """(N, 2) float: patch centres in frame pixels: the sub-pixel atom centre of an atom-centred patch (the
        patch is interpolated so the atom sits on its pixel ``(ph // 2, pw // 2)``), else ``top-left + patch // 2``."""
        if self.point_centres is not None:
            return self.point_centres
        ph, pw = self.images.shape[1], self.images.shape[2]
        return self.positions[:, 1:].astype(np.float64) + np.array([ph // 2, pw // 2], dtype=np.float64)

    def subset(self, index: np.ndarray) -> PatchSet:
        """The patches at ``index`` (the grid layout no longer holds, so ``grid`` is dropped)."""
        idx = np.asarray(index)
        return replace(
            self,
            images=self.images[idx],
            positions=self.positions[idx],
            grid=None,
            labels=None if self.labels is None else self.labels[idx],
            point_centres=None if self.point_centres is None else self.point_centres[idx],
            factors={k: v[idx] for k, v in self.factors.items()},
        )


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; give the path of an .npz stack or .npy scan")
    if not path.is_file():
        raise DataError(f"data path {str(path)!r} is not a file; give an .npz stack or .npy scan")


def load_stack(
    path: str | Path,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], tuple[str, ...] | None]:
    """``(images (N, H, W), labels | None, factors, class_names | None)`` from an ``.npz`` with ``images``.

    Every other array whose first dimension is N is kept as a factor (the cards' angle, shear, scale, shift), for
    evaluation; nothing of it reaches training.
    """
    p = Path(path)
    _check_exists(p)
    try:
        archive = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {str(p)!r} as .npz: {exc}") from None
    with archive:
        if "images" not in archive.files:
            raise DataError(f"{str(p)!r} has no 'images' array (it has {sorted(archive.files)}); save images=N×H×W")
        images = np.asarray(archive["images"])
        if images.ndim != 3 or min(images.shape) < 1:
            raise DataError(f"'images' in {str(p)!r} has shape {images.shape}; it must be N×H×W")
        if not np.issubdtype(images.dtype, np.number) or np.issubdtype(images.dtype, np.complexfloating):
            raise DataError(f"'images' in {str(p)!r} has dtype {images.dtype}; it must be real numbers")
        if not np.isfinite(images).all():
            raise DataError(f"'images' in {str(p)!r} contains NaN or infinite values; clean it first")
        n = images.shape[0]
        labels = None
        factors: dict[str, np.ndarray] = {}
        class_names = None
        for name in archive.files:
            if name == "images":
                continue
            if name == "class_names":
                names = np.asarray(archive[name])
                if names.ndim == 1 and names.dtype.kind == "U":
                    class_names = tuple(str(c) for c in names)
                continue
            arr = np.asarray(archive[name])
            if arr.ndim == 0 or arr.shape[0] != n or not np.issubdtype(arr.dtype, np.number):
                continue
            if name == "labels":
                labels = arr.astype(np.int64).reshape(n)
            else:
                factors[name] = arr
    return images, labels, factors, class_names


def load_frames(path: str | Path) -> np.ndarray:
    """A scan from an ``.npy`` file as ``(F, H, W)`` (H×W becomes one frame).

    Other formats (TIFF, HDF5, vendor files) are read by ``sim.formats.read_scan``, which ``models`` may not import
    (DESIGN.md); the CLI reads them and passes the frames to ``build_patches(..., frames=...)``.
    """
    p = Path(path)
    _check_exists(p)
    if p.suffix.lower() != ".npy":
        raise DataError(f"cannot read scan {str(p)!r} here: give an .npy file (H×W or F×H×W)")
    try:
        frames = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {str(p)!r} as .npy: {exc}") from None
    return check_frames(frames, str(p))


def check_frames(frames: np.ndarray, source: str) -> np.ndarray:
    """Frames as a real-valued, finite ``(F, H, W)`` array, or a ``DataError`` naming what is wrong."""
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or min(frames.shape) < 1:
        raise DataError(f"scan {source!r} has shape {frames.shape}; it must be H×W or F×H×W")
    if not np.issubdtype(frames.dtype, np.number) or np.issubdtype(frames.dtype, np.complexfloating):
        raise DataError(f"scan {source!r} has dtype {frames.dtype}; it must be real numbers")
    if not np.isfinite(frames).all():
        raise DataError(f"scan {source!r} contains NaN or infinite values; clean it first")
    return frames


def _stack_preprocessing(images: np.ndarray, fft: bool) -> Preprocessing:
    """Already in [0, 1]: leave it; otherwise map the stack's own (min, max) to [0, 1] with a recorded fixed range."""
    lo, hi = float(images.min()), float(images.max())
    fft_kw = {"fft": "logmag", "patch_norm": default_patch_norm(fft=True, atom_sublattice=None)} if fft else {}
    if lo >= 0.0 and hi <= 1.0:
        return Preprocessing(frame_norm="none", **fft_kw)
    if hi <= lo:
        raise DataError(f"every image value is {lo}; a constant stack has nothing to learn")
    return Preprocessing(frame_norm="fixed", fixed_range=(lo, hi), **fft_kw)


def stack_patches(
    images: np.ndarray,
    data: DataConfig,
    *,
    labels: np.ndarray | None = None,
    factors: dict[str, np.ndarray] | None = None,
    class_names: tuple[str, ...] | None = None,
) -> PatchSet:
    """A stack through the data's preprocessing (frame normalisation, optional FFT) — each image is one patch."""
    if not np.isfinite(images).all():
        raise DataError("the image stack contains NaN or infinite values; clean it first")
    if tuple(images.shape[1:]) != tuple(data.patch):
        raise DataError(
            f"images are {images.shape[1]}×{images.shape[2]} but the run expects {data.patch[0]}×{data.patch[1]}; "
            "resize the stack or use a run trained on this size"
        )
    # numpy, as the CPU serving path runs: the same functions on the same kind of array, so the same values
    x = prepare_patches(prepare_frame(images, data.preprocessing), data.preprocessing)[:, 0]
    n = images.shape[0]
    positions = np.zeros((n, 3), dtype=np.int64)
    positions[:, 0] = np.arange(n)
    return PatchSet(
        images=x,
        positions=positions,
        data=data,
        labels=labels,
        factors=dict(factors or {}),
        class_names=class_names,
    )


def scan_patches(frames: np.ndarray, data: DataConfig) -> PatchSet:
    """Grid or atom-centred patches of every frame of a scan (``data.kind`` says which), frame-major order."""
    if data.kind == "stack":
        raise DataError("scan_patches needs data.kind 'grid' or 'atoms'; a stack is one patch per image")
    f, h, w = frames.shape
    ph, pw = data.patch
    if ph > h or pw > w:
        raise DataError(f"patch={ph}×{pw} is larger than the {h}×{w} frame; use patch={min(h, w)} or less")
    chunks: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    exact: list[np.ndarray] = []
    grid: tuple[int, int] | None = None
    for k in range(f):
        frame = frames[k]  # numpy, as the CPU serving path cuts it (streamer.maps.pipeline)
        if data.kind == "grid":
            try:
                patches, grid = grid_patches(frame, data.preprocessing, data.patch, data.stride, data.origin)
            except TilingError as exc:
                raise DataError(str(exc)) from None
            gy, gx = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
            ys = data.origin[0] + gy.reshape(-1) * data.stride[0]
            xs = data.origin[1] + gx.reshape(-1) * data.stride[1]
        else:
            centres = find_atoms(
                frame.astype(np.float32),
                sigma=data.atom_sigma,
                min_distance=data.atom_min_distance,
                threshold=data.atom_threshold,
                sublattice=data.atom_sublattice,
            )
            patches, kept = point_patches(frame, data.preprocessing, centres, data.patch)
            exact.append(kept.astype(np.float64))
            rounded = np.round(kept).astype(np.int64)
            ys, xs = rounded[:, 0] - ph // 2, rounded[:, 1] - pw // 2
        chunks.append(patches[:, 0])
        positions.append(np.stack([np.full(len(ys), k), ys, xs], axis=1).astype(np.int64))
    images = np.concatenate(chunks) if chunks else np.zeros((0, ph, pw), np.float32)
    if images.shape[0] == 0:
        cells = (
            "; unit cells need a square-like lattice of the bright columns (a hexagonal one has none)"
            if data.atom_sublattice == "cells"
            else ""
        )
        raise DataError(
            f"no atom-centred {ph}×{pw} patch fits in the scan (threshold {data.atom_threshold}, "
            f"min distance {data.atom_min_distance}); lower the threshold or use a smaller patch{cells}"
        )
    return PatchSet(
        images=images,
        positions=np.concatenate(positions),
        data=data,
        grid=grid if data.kind == "grid" else None,
        frame_shape=(h, w),
        point_centres=np.concatenate(exact) if exact else None,
    )


def _data_config(**fields: Any) -> DataConfig:
    """A ``DataConfig`` of the fields given (None: the config's default); a bad value is a one-line ``DataError``."""
    try:
        return DataConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        raise DataError(f"{where}={err.get('input')!r}: {err['msg']}") from None


def patches_from_config(path: str | Path, data: DataConfig, *, frames: np.ndarray | None = None) -> PatchSet:
    """New data cut and transformed exactly as a run's ``DataConfig`` says (what ``encode`` and ``evaluate`` use).

    ``frames`` are the scan's frames when the caller has already read them (formats other than ``.npy``).
    """
    p = Path(path)
    if data.kind == "stack":
        if p.suffix.lower() != ".npz":
            raise DataError(f"this run was trained on an image stack; give an .npz stack, not {str(p)!r}")
        images, labels, factors, names = load_stack(p)
        return stack_patches(images, data, labels=labels, factors=factors, class_names=names)
    if p.suffix.lower() == ".npz":
        raise DataError(f"this run was trained on scan patches ({data.kind}); give a scan, not the stack {str(p)!r}")
    return scan_patches(load_frames(p) if frames is None else check_frames(frames, str(p)), data)


def default_patch_norm(*, fft: bool, atom_sublattice: str | None) -> str:
    """Min-max per patch for FFT magnitudes (their scale is the patch's contrast, not its content) and for unit-cell
    patches: a cell patch holds one column, and on the PbTiO₃/SrRuO₃ scan that column's brightness follows the
    film's changing A/B contrast — min-max scaled, its position is what varies most (three principal components hold
    the displacement; docs/real-data.md). Everything else keeps the frame's own scale, which the classes read."""
    return "minmax" if fft or atom_sublattice == "cells" else "none"


def build_patches(
    path: str | Path,
    *,
    frames: np.ndarray | None = None,
    patch: int | None = None,
    stride: int | None = None,
    origin: tuple[int, int] = (0, 0),
    fft: bool = False,
    atoms: bool = False,
    atom_sigma: float | None = None,
    atom_min_distance: int | None = None,
    atom_threshold: float | None = None,
    atom_sublattice: str | None = None,
    patch_norm: str | None = None,
) -> PatchSet:
    """Training patches from a file, and the ``DataConfig`` that records how (in ``PatchSet.data``).

    ``.npz`` is a stack (each image one patch; ``patch`` if given must equal the image size; no ``stride`` or
    ``atoms``). Anything else is a scan (``frames`` if the caller read it, else an ``.npy``): patches on a grid
    (``patch``, ``stride``, default ``DataConfig.patch`` and patch // 4) or, with ``atoms``, centred on the atoms
    ``streamer.maps.atoms.find_atoms`` finds (``atom_*`` None: ``DataConfig``'s defaults). ``fft`` turns each patch into
    its centred log-magnitude spectrum, min-max scaled.

    ``patch_norm`` ("none" / "minmax"; None: ``default_patch_norm``) rescales each patch to [0, 1].
    """
    p = Path(path)
    if frames is None:
        _check_exists(p)
    if patch is not None and patch < 4:
        raise DataError(f"patch={patch} is too small; use at least 4 pixels")
    if stride is not None and stride < 1:
        raise DataError(f"stride={stride} must be at least 1 pixel")
    if frames is None and p.suffix.lower() == ".npz":
        if atoms:
            raise DataError(f"atom-centred patches need a scan, but {str(p)!r} is an image stack (.npz)")
        if stride is not None:
            raise DataError(f"stride={stride} applies to scans, but {str(p)!r} is an image stack (.npz); leave it out")
        if patch_norm is not None:
            raise DataError(f"patch_norm applies to scans, but {str(p)!r} is an image stack (.npz); leave it out")
        images, labels, factors, names = load_stack(p)
        if patch is not None and (images.shape[1], images.shape[2]) != (patch, patch):
            raise DataError(
                f"patch={patch} does not match the {images.shape[1]}×{images.shape[2]} images of {str(p)!r}; "
                "leave it out for a stack"
            )
        data = _data_config(
            source=str(p),
            kind="stack",
            patch=(int(images.shape[1]), int(images.shape[2])),
            preprocessing=_stack_preprocessing(images, fft),
        )
        return stack_patches(images, data, labels=labels, factors=factors, class_names=names)
    frames = load_frames(p) if frames is None else check_frames(frames, str(p))
    size = DataConfig.model_fields["patch"].default[0] if patch is None else patch
    step = max(1, size // 4) if stride is None else stride
    h, w = frames.shape[1:]
    if size > h or size > w:
        raise DataError(f"patch={size} is larger than the {h}×{w} frames of {str(p)!r}; use patch={min(h, w)} or less")
    if not atoms:
        try:
            grid_shape((h, w), size, step, origin)
        except TilingError as exc:
            raise DataError(str(exc)) from None
    norms = get_args(Preprocessing.model_fields["patch_norm"].annotation)
    if patch_norm is not None and patch_norm not in norms:
        raise DataError(f"patch_norm={patch_norm!r} must be {' or '.join(map(repr, norms))}")
    norm = (
        default_patch_norm(fft=fft, atom_sublattice=atom_sublattice if atoms else None)
        if patch_norm is None
        else patch_norm
    )
    spec = Preprocessing(fft="logmag" if fft else "none", patch_norm=norm)  # type: ignore[arg-type]
    data = _data_config(
        source=str(p),
        kind="atoms" if atoms else "grid",
        patch=(size, size),
        stride=(step, step),
        origin=origin,
        preprocessing=spec,
        atom_sigma=atom_sigma,
        atom_min_distance=atom_min_distance,
        atom_threshold=atom_threshold,
        atom_sublattice=atom_sublattice,
    )
    return scan_patches(frames, data)
