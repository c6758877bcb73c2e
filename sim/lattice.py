"""Synthetic atomic-resolution scans with ground truth: STEM-like perovskite films and STM-like graphene.

A *sample* (columns, defects, polarisation) is drawn once from the seed; each *frame* views it through a drifting
window with fresh noise, so a scan of N frames is N looks at the same material — what a real instrument gives and
what the streaming service must handle. Everything is in pixels; positions are ``(y, x)`` with rows downwards.

Rendering: every column is a 2-D Gaussian evaluated exactly, but only inside a ±4σ window, as the outer product of
two 1-D Gaussians, and summed with one ``np.bincount``. Sub-pixel positions are therefore exact — the displacement
field is measurable by centre of mass — and a 1024² frame costs tens of milliseconds.

Physics, roughly: on the ``square`` (perovskite, ABO3 in projection) lattice the A columns sit on the corners and the
B column at the cell centre; the film (phase 1, above the interface line) has brighter A columns (Bi vs Sr) and its
B columns are displaced by a smooth polarisation field (BiFeO3-like). On ``hexagonal`` (graphene) the two sublattices
play A and B. Defects are vacancies (no column), bright substitutions (a heavy dopant, brighter than any column) and
dim ones. STM-like ripples are √3×√3 interference patterns (three cosines at 120°) decaying around each defect.
Noise: Poisson shot noise at ``dose`` counts per unit intensity, Gaussian read noise, per-row line jitter in x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DEFECT_KINDS",
    "LatticeConfig",
    "LatticeTruth",
    "stack_truths",
    "synth_frame",
    "synth_scan",
    "to_counts",
]

DEFECT_KINDS: tuple[str, ...] = ("vacancy", "bright", "dim")
_WINDOW_SIGMAS = 4.0


class LatticeConfig(BaseModel):
    """Every parameter of a synthetic scan; the defaults give a 512² STEM-like perovskite film on its substrate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, int] = (512, 512)
    kind: Literal["square", "hexagonal"] = "square"
    lattice_constant: float = Field(16.0, gt=2.0, description="px")
    orientation_deg: float = 0.0
    column_sigma: float = Field(2.0, gt=0.2, description="Gaussian σ of one column, px")
    intensity_a: float = Field(1.0, ge=0.0, description="substrate A (corner) columns")
    intensity_b: float = Field(0.6, ge=0.0, description="B (centre / second sublattice) columns")
    film_intensity_a: float = Field(1.3, ge=0.0, description="film A columns (heavier cation)")
    background: float = Field(0.05, ge=0.0)
    # defects
    n_defects: int = Field(10, ge=0)
    defect_kinds: tuple[Literal["vacancy", "bright", "dim"], ...] = DEFECT_KINDS
    bright_factor: float = Field(1.8, gt=1.0, description="bright column = factor × brightest regular column")
    dim_factor: float = Field(0.35, ge=0.0, lt=1.0, description="dim column = factor × its own intensity")
    # STM-like interference around defects
    ripples: bool = False
    ripple_amplitude: float = 0.25
    ripple_decay: float = Field(24.0, gt=0.0, description="px")
    # interface and polarisation
    interface: bool = True
    interface_row: float = Field(0.5, ge=0.0, le=1.0, description="fraction of height at the centre column")
    interface_tilt_deg: float = Field(0.0, gt=-60.0, lt=60.0)
    polarization_amplitude: float = Field(2.0, ge=0.0, description="max film B displacement, px")
    polarization_wavelength: float = Field(256.0, gt=0.0, description="px")
    # acquisition
    noise: bool = True
    dose: float = Field(200.0, gt=0.0, description="expected counts per unit intensity")
    read_noise: float = Field(2.0, ge=0.0, description="counts, Gaussian")
    line_jitter: float = Field(0.25, ge=0.0, description="per-row x offset σ, px")
    drift: tuple[float, float] = Field((0.3, 0.5), description="mean (dy, dx) per frame, px")
    drift_jitter: float = Field(0.05, ge=0.0, description="random-walk σ per frame, px")
    dtype: Literal["float32", "uint16"] = "float32"

    @field_validator("shape")
    @classmethod
    def _frame_big_enough(cls, shape: tuple[int, int]) -> tuple[int, int]:
        if min(shape) < 8:
            raise ValueError(f"frame shape {shape} is too small; need at least 8×8 pixels")
        return shape


@dataclass(frozen=True)
class LatticeTruth:
    """What one frame shows, in that frame's pixel coordinates (drift included, line jitter not).

    ``atoms`` lists every column of the sample, in view or not (a scan's frames share the list; use
    :meth:`in_view`). ``displacement`` is the polarisation shift already included in ``atoms`` (zero except on film
    B columns). ``defects`` are positions of defect sites; ``defect_kinds`` index :data:`DEFECT_KINDS`.
    ``phase`` is 0 for substrate and 1 for film, per pixel.
    """

    atoms: np.ndarray  # (N, 2) float64
    sublattice: np.ndarray  # (N,) uint8: 0 = A, 1 = B
    atom_phase: np.ndarray  # (N,) uint8
    displacement: np.ndarray  # (N, 2) float64
    defects: np.ndarray  # (M, 2) float64
    defect_kinds: np.ndarray  # (M,) uint8
    defect_atoms: np.ndarray  # (M,) int64 index into atoms
    phase: np.ndarray  # (H, W) uint8
    drift: np.ndarray  # (2,) float64, this frame's offset of the sample
    line_offsets: np.ndarray  # (H,) float64, x offset of each row, px

    def in_view(self, margin: float = 0.0) -> np.ndarray:
        """Mask of atoms at least ``margin`` px inside the frame."""
        h, w = self.phase.shape
        y, x = self.atoms[:, 0], self.atoms[:, 1]
        return (y >= margin) & (y <= h - 1 - margin) & (x >= margin) & (x <= w - 1 - margin)


@dataclass(frozen=True)
class _Sample:
    pos: np.ndarray  # (N, 2) sample coordinates, displacement included
    sublattice: np.ndarray
    phase: np.ndarray
    intensity: np.ndarray
    displacement: np.ndarray
    defect_atoms: np.ndarray
    defect_kinds: np.ndarray


# ---------------------------------------------------------------- sample
def _interface_film(cfg: LatticeConfig, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """True where the film is: above (smaller row than) the tilted interface line through the centre column."""
    if not cfg.interface:
        return np.zeros(np.broadcast(y, x).shape, dtype=bool)
    h, w = cfg.shape
    y0 = cfg.interface_row * h + np.tan(np.deg2rad(cfg.interface_tilt_deg)) * (x - w / 2.0)
    return y < y0


def _polarization(cfg: LatticeConfig, rng: np.random.Generator, pos: np.ndarray) -> np.ndarray:
    """A smooth random vector field: three plane waves per component, scaled to the configured amplitude."""
    k = 2 * np.pi / cfg.polarization_wavelength
    out = np.zeros_like(pos)
    for comp in range(2):
        dirs = rng.uniform(0, 2 * np.pi, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        ky, kx = k * np.sin(dirs), k * np.cos(dirs)
        waves = np.cos(pos[:, :1] * ky + pos[:, 1:] * kx + phases)  # (N, 3)
        out[:, comp] = waves.sum(axis=1) / 3.0
    return out * cfg.polarization_amplitude


def _lattice_sites(cfg: LatticeConfig, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All sites (y, x) and sublattice ids inside the box [lo, hi), for the configured lattice and orientation.

    The lattice origin is the first frame's centre, and sites come in the order of their lattice indices, so the
    same site gets the same random draws whatever box (i.e. however many frames of drift) is requested.
    """
    a = cfg.lattice_constant
    th = np.deg2rad(cfg.orientation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])  # acts on (x, y)
    if cfg.kind == "square":
        vecs = np.array([[a, 0.0], [0.0, a]])
        basis = np.array([[0.0, 0.0], [a / 2, a / 2]])
    else:
        vecs = np.array([[a, 0.0], [a / 2, a * np.sqrt(3) / 2]])
        basis = np.array([[0.0, 0.0], [a / 2, a / (2 * np.sqrt(3))]])
    vecs, basis = vecs @ rot.T, basis @ rot.T
    origin = np.asarray(cfg.shape, dtype=np.float64) / 2.0  # (y, x)
    radius = float(np.max(np.hypot(*np.abs(np.stack([lo - origin, hi - origin])).max(axis=0))))
    nmax = int(np.ceil(radius / (a * 0.5))) + 2  # generous for the hexagonal cell's short height
    i, j = np.meshgrid(np.arange(-nmax, nmax + 1), np.arange(-nmax, nmax + 1), indexing="ij")
    cells = i.reshape(-1, 1) * vecs[0] + j.reshape(-1, 1) * vecs[1]  # (C, 2) as (x, y)
    xy = (cells[:, None, :] + basis[None, :, :]).reshape(-1, 2)
    sub = np.tile(np.arange(2, dtype=np.uint8), cells.shape[0])
    yx = xy[:, ::-1] + origin
    keep = np.all((yx >= lo) & (yx < hi), axis=1)
    order = np.lexsort((sub, j.ravel().repeat(2), i.ravel().repeat(2)))  # canonical (i, j, basis) order
    keep_sorted = order[keep[order]]
    return yx[keep_sorted], sub[keep_sorted]


def _make_sample(cfg: LatticeConfig, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> _Sample:
    pos, sub = _lattice_sites(cfg, lo, hi)
    film = _interface_film(cfg, pos[:, 0], pos[:, 1])
    phase = film.astype(np.uint8)
    intensity = np.where(sub == 0, np.where(film, cfg.film_intensity_a, cfg.intensity_a), cfg.intensity_b)
    disp = np.zeros_like(pos)
    if cfg.interface and cfg.polarization_amplitude > 0:
        field = _polarization(cfg, rng, pos)
        moved = film & (sub == 1)
        disp[moved] = field[moved]
    pos = pos + disp
    # defects only where the first frame can see them, away from its edges
    h, w = cfg.shape
    m = 2 * cfg.column_sigma
    visible = np.flatnonzero((pos[:, 0] >= m) & (pos[:, 0] <= h - 1 - m) & (pos[:, 1] >= m) & (pos[:, 1] <= w - 1 - m))
    n_def = min(cfg.n_defects, visible.size)
    idx = np.sort(rng.choice(visible, n_def, replace=False)) if n_def else np.zeros(0, dtype=np.int64)
    kind_ids = np.array([DEFECT_KINDS.index(k) for k in cfg.defect_kinds], dtype=np.uint8)
    kinds = rng.choice(kind_ids, n_def) if n_def and kind_ids.size else np.zeros(n_def, dtype=np.uint8)
    brightest = max(cfg.intensity_a, cfg.intensity_b, cfg.film_intensity_a if cfg.interface else 0.0)
    intensity = intensity.copy()
    for i, k in zip(idx, kinds, strict=True):
        name = DEFECT_KINDS[int(k)]
        if name == "vacancy":
            intensity[i] = 0.0
        elif name == "bright":
            intensity[i] = cfg.bright_factor * brightest
        else:
            intensity[i] *= cfg.dim_factor
    return _Sample(pos, sub, phase, intensity, disp, idx.astype(np.int64), kinds.astype(np.uint8))


# ---------------------------------------------------------------- rendering
def _render_columns(shape: tuple[int, int], pos: np.ndarray, amp: np.ndarray, sigma: float) -> np.ndarray:
    """Sum of Gaussians, each evaluated exactly in its ±4σ window; out-of-frame parts are dropped."""
    h, w = shape
    r = int(np.ceil(_WINDOW_SIGMAS * sigma))
    off = np.arange(-r, r + 1)
    keep = (amp != 0) & (pos[:, 0] > -r - 1) & (pos[:, 0] < h + r) & (pos[:, 1] > -r - 1) & (pos[:, 1] < w + r)
    pos, amp = pos[keep], amp[keep]
    base = np.floor(pos).astype(np.int64)
    iy = base[:, :1] + off  # (N, K)
    ix = base[:, 1:] + off
    gy = np.exp(-((iy - pos[:, :1]) ** 2) / (2 * sigma**2)) * amp[:, None]
    gx = np.exp(-((ix - pos[:, 1:]) ** 2) / (2 * sigma**2))
    gy = np.where((iy >= 0) & (iy < h), gy, 0.0)
    gx = np.where((ix >= 0) & (ix < w), gx, 0.0)
    vals = gy[:, :, None] * gx[:, None, :]
    flat = np.clip(iy, 0, h - 1)[:, :, None] * w + np.clip(ix, 0, w - 1)[:, None, :]
    return np.bincount(flat.ravel(), weights=vals.ravel(), minlength=h * w).reshape(h, w)


def _ripples(cfg: LatticeConfig, shape: tuple[int, int], centres: np.ndarray) -> np.ndarray:
    """√3×√3 interference: three cosines at 120° with period √3·a·(√3/2), decaying as exp(-r/decay)."""
    h, w = shape
    out = np.zeros(shape)
    if centres.size == 0:
        return out
    a = cfg.lattice_constant
    kmag = 4 * np.pi / (3 * a)  # reciprocal vector of the √3a triangular superlattice
    th0 = np.deg2rad(cfg.orientation_deg)
    r = int(np.ceil(4 * cfg.ripple_decay))
    for cy, cx in centres:
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1)[:, None] - cy
        dx = np.arange(x0, x1)[None, :] - cx
        wave = sum(
            np.cos(kmag * (np.cos(th0 + t) * dx + np.sin(th0 + t) * dy)) for t in (0, 2 * np.pi / 3, 4 * np.pi / 3)
        )
        out[y0:y1, x0:x1] += wave / 3.0 * np.exp(-np.hypot(dy, dx) / cfg.ripple_decay)
    return out * cfg.ripple_amplitude


def _jitter_rows(img: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Shift each row by its x offset (content moves right for positive offsets), linear interpolation."""
    w = img.shape[1]
    src = np.arange(w)[None, :] - offsets[:, None]
    i0 = np.clip(np.floor(src).astype(np.int64), 0, w - 1)
    i1 = np.clip(i0 + 1, 0, w - 1)
    f = np.clip(src - np.floor(src), 0.0, 1.0)
    return np.take_along_axis(img, i0, 1) * (1 - f) + np.take_along_axis(img, i1, 1) * f


def _frame(
    cfg: LatticeConfig, sample: _Sample, drift: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, LatticeTruth]:
    h, w = cfg.shape
    pos = sample.pos + drift
    img = _render_columns(cfg.shape, pos, sample.intensity, cfg.column_sigma) + cfg.background
    defects = pos[sample.defect_atoms]
    if cfg.ripples:
        img = img + _ripples(cfg, cfg.shape, defects)
    yy, xx = np.mgrid[0:h, 0:w]
    phase = _interface_film(cfg, yy - drift[0], xx - drift[1]).astype(np.uint8)
    img = np.clip(img, 0.0, None) * cfg.dose
    offsets = np.zeros(h)
    if cfg.noise:
        offsets = rng.normal(0.0, cfg.line_jitter, h) if cfg.line_jitter > 0 else offsets
        img = _jitter_rows(img, offsets)
        img = rng.poisson(img).astype(np.float64) + rng.normal(0.0, cfg.read_noise, img.shape)
    truth = LatticeTruth(
        atoms=pos,
        sublattice=sample.sublattice,
        atom_phase=sample.phase,
        displacement=sample.displacement,
        defects=defects,
        defect_kinds=sample.defect_kinds,
        defect_atoms=sample.defect_atoms,
        phase=phase,
        drift=np.asarray(drift, dtype=np.float64),
        line_offsets=offsets,
    )
    frame = to_counts(img) if cfg.dtype == "uint16" else img.astype(np.float32)
    return frame, truth


def to_counts(frame: np.ndarray) -> np.ndarray:
    """Round and clip to a 16-bit detector's counts."""
    return np.clip(np.rint(frame), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _drift_path(cfg: LatticeConfig, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    steps = np.asarray(cfg.drift, dtype=np.float64)[None, :] + rng.normal(0.0, cfg.drift_jitter, (n_frames, 2))
    steps[0] = 0.0  # the first frame is the reference
    return np.cumsum(steps, axis=0)


def synth_scan(cfg: LatticeConfig, n_frames: int, seed: int = 0) -> tuple[np.ndarray, list[LatticeTruth]]:
    """``n_frames`` views of one sample: frame k is offset by the drift path and carries its own noise.

    Returns frames (N, H, W) in ``cfg.dtype`` and one truth per frame. Deterministic in ``seed``.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    # independent streams: the sample and frame k do not depend on how many frames are requested
    sample_seq, drift_seq, noise_seq = np.random.SeedSequence(seed).spawn(3)
    path = _drift_path(cfg, n_frames, np.random.default_rng(drift_seq))
    pad = 2 * cfg.lattice_constant + _WINDOW_SIGMAS * cfg.column_sigma
    lo = -path.max(axis=0) - pad
    hi = np.asarray(cfg.shape, dtype=np.float64) - path.min(axis=0) + pad
    sample = _make_sample(cfg, np.random.default_rng(sample_seq), lo, hi)
    frames = np.empty((n_frames, *cfg.shape), dtype=np.dtype(cfg.dtype))
    truths = []
    for k, frame_seq in enumerate(noise_seq.spawn(n_frames)):
        frames[k], t = _frame(cfg, sample, path[k], np.random.default_rng(frame_seq))
        truths.append(t)
    return frames, truths


def synth_frame(cfg: LatticeConfig, seed: int = 0) -> tuple[np.ndarray, LatticeTruth]:
    """One frame (H, W) and its truth; its pixels equal the first frame of ``synth_scan(cfg, n, seed)`` for any n."""
    frames, truths = synth_scan(cfg, 1, seed)
    return frames[0], truths[0]


def stack_truths(truths: list[LatticeTruth]) -> dict[str, np.ndarray]:
    """Arrays for ``np.savez``: per-frame fields stacked on a leading frame axis, sample fields stored once."""
    out: dict[str, np.ndarray] = {
        "atoms": np.stack([t.atoms for t in truths]),
        "defects": np.stack([t.defects for t in truths]),
        "phase": np.stack([t.phase for t in truths]),
        "drift": np.stack([t.drift for t in truths]),
        "line_offsets": np.stack([t.line_offsets for t in truths]),
    }
    first = truths[0]
    out.update(
        sublattice=first.sublattice,
        atom_phase=first.atom_phase,
        displacement=first.displacement,
        defect_kinds=first.defect_kinds,
        defect_atoms=first.defect_atoms,
        defect_kind_names=np.array(DEFECT_KINDS, dtype=np.str_),
    )
    return out
