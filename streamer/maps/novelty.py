"""How unlike the usual a patch is — a defect score that does not need a defect class.

A model's classes may come out as anything (film/substrate, a sublattice, one collapsed class), so the score must not
depend on them. Two families of features per patch, each compared with the patch's neighbours (grid: the 8 cells
``step`` cells away, ``step`` the nearest whose patches do not overlap, or the 8 of each of up to four rings from
there — ``exporters.calibrate`` chooses; atom-centred patches: the ``k`` nearest atoms):

* **joint** (what an export writes unless its likelihood part floods: ``exporters.calibrate``): the decoder's
  redrawing of the patch from its own posterior means (``models.reconstruction``) — the patch's negative
  log-likelihood under the model, and its residual per redrawn value (each pixel of a small patch, each block mean
  of a larger one).
  A defect is what the model did not learn to draw, and comparing with the neighbours cancels what the model draws
  badly everywhere (a registration it never learnt, a dose gradient). The two parts are calibrated separately and
  the larger normalised score is published. **residual** is the residual part alone: on the STM graphene scan the
  likelihood part ranks the marked defects at 0.59–0.66 and flags the raster's line starts (it flags 5.5–18.7× the
  residual's training patches there, which is how calibration tells: the residual alone ranks the marks at 0.98),
  where on the demo lattice it adds what the residual misses (joint 0.992–1.000 over five seeds; docs/real-data.md).
* **contrast / density / combined**: the encoder's outputs only — ``z_loc``, ``log z_scale``, the class logits less
  their mean, ``(cos, sin)`` of the angle, the shift. ``contrast`` against the neighbours, ``density`` as the
  Mahalanobis distance from the training encodings, ``combined`` the larger. Cheaper (no decoder at serving time).

**contrast** of features ``f`` is ``‖(f − median of the neighbours' f) / scale‖`` with ``scale`` the training
patches' robust spread (1.4826 · MAD) of each feature. (Whitening the residual by its training covariance instead
was tried: with a few hundred training patches the estimated covariance flagged clean patches of an untrained
encoder that the per-feature scale left alone.) A slow change (the film/substrate interface, drift, a gradient in
dose) does not stand out against its neighbours; a defect does. A patch at the frame's edge has fewer neighbours,
so their median is noisier (its variance ≈ π/2m of one patch's for m neighbours); its contrast is scaled down by
``√((1 + π/2m) / (1 + π/2M))`` (M the full count) so edges are not flagged for being edges.

Every score is **calibrated** on the training patches: ``threshold`` is their median + ``k`` (``default_k``:
``TRAIN_K`` = 6, ``RESIDUAL_K`` = 4.5 for the residual kind) robust standard deviations (1.4826 · MAD). Robust,
because the training scan holds defects too: a quantile would put the threshold among them (a 99.9 % quantile of a
scan with 3 % defect patches flags nothing), while the median and MAD do not move for a few per cent of outliers.
``train_share_over`` records which share of the training patches the threshold flags. The published score is
``s / (1 + s)`` with ``s = raw / threshold``: in [0, 1), monotone in the raw score, and 0.5 exactly at the calibrated
threshold (the service's default ``defect_threshold``). ``NoveltyStats`` carries all of it in the manifest
(``Manifest.novelty``); the exporter computes it from the training patches (``exporters.calibrate``).

Why joint leaves the encoder's outputs out: they carry the patch's pose (shift, angle), which moves with the
scan's drift — on defect-free demo scans of a second sample the encoder contrast flagged 39–51 patches of 768 at
two of three seeds, the redrawing none. Measured (benchmarks/real_data.py, docs/real-data.md has the table).
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.spatial import cKDTree

from streamer.maps.arrays import (
    Array,
    argsort_stable,
    asarray_like,
    astype,
    copy,
    einsum,
    flatnonzero,
    maximum,
    median,
    sqrt,
    std,
    take_along_axis,
    unique,
    where,
    zeros,
)
from streamer.maps.median_network import median_of

__all__ = [
    "FRAME_K",
    "FRAME_MIN_PATCHES",
    "MAX_GRID_SPAN",
    "REDRAWN_PARTS",
    "RESIDUAL_K",
    "TRAIN_K",
    "NoveltyKind",
    "NoveltyStats",
    "PartStats",
    "contrast",
    "default_k",
    "density",
    "encoder_features",
    "fit_novelty",
    "grid_neighbours",
    "novelty_score",
    "part_features",
    "point_neighbours",
    "robust_scale",
    "robust_stats",
]

NoveltyKind = Literal["contrast", "density", "combined", "joint", "residual"]
PartSource = Literal["reconstruction", "residual"]
#: the exported outputs each part reads (``models.reconstruction``), as ``(N, F)`` features
_PART_OUTPUT: dict[str, str] = {"reconstruction": "recon_nll", "residual": "recon_residual"}
#: the kinds that read the decoder's redrawing, and the reconstruction parts each takes the larger of
REDRAWN_PARTS: dict[str, tuple[str, ...]] = {"joint": tuple(_PART_OUTPUT), "residual": ("residual",)}
#: a frame's own bar without training statistics (with them, the manifest's ``k``)
FRAME_K = 6.0
#: the widest grid neighbourhood, in rings of cells (``NoveltyStats.grid_span``)
MAX_GRID_SPAN = 4
#: a frame's own bar (``novelty_score``) needs enough patches for its median and MAD to mean something
FRAME_MIN_PATCHES = 64
TRAIN_K = 6.0
#: the residual kind's bar: a single part, where ``joint`` publishes the larger of two (each part's clean tail
#: adds to the other's); at 6 the STM graphene scan's marked defects stay under it (docs/real-data.md)
RESIDUAL_K = 4.5
_MAD_TO_SIGMA = 1.4826
_FLOOR = 1e-6


def default_k(kind: NoveltyKind) -> float:
    """The bars' robust sd count a calibration of ``kind`` takes unless told otherwise."""
    return RESIDUAL_K if kind == "residual" else TRAIN_K


def encoder_features(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """``(N, F)`` float64 features from the encoder outputs by manifest name (those the model has)."""
    z = _rows(outputs["z_loc"])
    n = z.shape[0]
    parts: list[np.ndarray] = [z]
    if "z_scale" in outputs:
        parts.append(np.log(np.clip(_rows(outputs["z_scale"]), 1e-12, None)))
    if "class_logits" in outputs:
        logits = _rows(outputs["class_logits"])
        if logits.shape[1] > 1:
            parts.append(logits - logits.mean(axis=1, keepdims=True))
    if "angle" in outputs:
        angle = np.asarray(outputs["angle"], np.float64).reshape(n)
        parts.append(np.stack([np.cos(angle), np.sin(angle)], axis=1))
    if "shift" in outputs:
        parts.append(_rows(outputs["shift"]))
    return np.concatenate(parts, axis=1)


def part_features(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reconstruction parts' ``(N, F)`` features from the outputs that have them (``{}`` for an encoder-only
    artifact): the patch's negative log-likelihood under the decoder, and its per-pixel residual. In the encoder's
    float32 (or float64), not converted: the contrast's neighbour median only selects values, so it gathers and
    sorts them in their own precision and scores in float64 (``_residuals``) — half the memory traffic of the
    64 redrawn values a patch, the largest array a frame's score reads."""
    return {src: _rows(outputs[name], keep_float=True) for src, name in _PART_OUTPUT.items() if name in outputs}


def _rows(a: np.ndarray, *, keep_float: bool = False) -> np.ndarray:
    """``(N, ...)`` → ``(N, F)`` float64 (float32 kept with ``keep_float``), also for N = 0."""
    a = np.asarray(a)
    if not (keep_float and a.dtype in (np.float32, np.float64)):
        a = a.astype(np.float64)
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))


def grid_neighbours(grid: tuple[int, int], step: int, span: int = 1) -> np.ndarray:
    """``(gh·gw, 8·span)`` row-major indices of the cells ``step``, ..., ``step + span - 1`` cells away in the 8
    directions; ``-1`` off the grid. ``span`` 2 is for a lattice whose period falls between two whole steps: each
    step alone compares with neighbours off the registration by half a cell one way or the other, both together
    give a median between them (``NoveltyStats.grid_span``)."""
    gh, gw = grid
    iy, ix = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    out = []
    for d in range(step, step + span):
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                y, x = iy + dy, ix + dx
                inside = (y >= 0) & (y < gh) & (x >= 0) & (x < gw)
                out.append(np.where(inside, y * gw + x, -1).reshape(-1))
    return np.stack(out, axis=1) if gh * gw else np.zeros((0, 8 * span), np.int64)


def point_neighbours(centres: np.ndarray, k: int) -> np.ndarray:
    """``(N, k)`` indices of each point's ``k`` nearest other points (``-1`` where there are fewer)."""
    pts = np.asarray(centres, np.float64).reshape(-1, 2)
    n = pts.shape[0]
    if n < 2 or k < 1:
        return np.full((n, max(k, 0)), -1, np.int64)
    _, idx = cKDTree(pts).query(pts, k=min(k + 1, n))
    idx = np.asarray(idx, np.int64).reshape(n, -1)[:, 1:]
    if idx.shape[1] < k:
        idx = np.concatenate([idx, np.full((n, k - idx.shape[1]), -1, np.int64)], axis=1)
    return idx


def contrast(features: Array, neighbours: Array, scale: Array) -> Array:
    """``(N,)`` distance of each patch's features from the median of its neighbours', per feature in units of
    ``scale``, corrected for the neighbour count (module docstring). No neighbour: 0. numpy arrays, or tensors on one
    device (the GPU path scores where it encodes), with the same float64 arithmetic."""
    r, has = _residuals(features, neighbours)
    d = sqrt(((r / maximum(asarray_like(scale, r), _FLOOR)) ** 2).sum(axis=1))
    m = maximum(astype((neighbours >= 0).sum(axis=1), "float64"), 1.0)
    full = max(int(neighbours.shape[1]) if neighbours.ndim == 2 else 1, 1)
    d = d / sqrt((1 + np.pi / (2 * m)) / (1 + np.pi / (2 * full)))
    return where(has, d, 0.0)


def _residuals(features: Array, neighbours: Array) -> tuple[Array, Array]:
    """Each patch's features minus the median of its neighbours' (rows without a neighbour: 0), and which have one.

    The medians are gathered and sorted in ``features``' own precision (a float32 value is the same number in
    float64, and min/max only select), then averaged and subtracted in float64: the same result as from float64
    features, bit for bit."""
    f = astype(features, "float64")
    if f.shape[0] == 0:
        return copy(f), zeros((0,), "bool", like=f)
    valid = neighbours >= 0
    counts = valid.sum(axis=1)
    has = counts > 0
    med = copy(f)
    # Rows grouped by how many neighbours they have (a grid's interior, edges and corners; a point with fewer
    # atoms near it); each group's median by a sorting network over one (rows, F) slab per neighbour
    # (streamer.maps.median_network: the same values; a third of the grouped sort's time on encoder features).
    full = neighbours.shape[1] if neighbours.ndim == 2 else 0
    for m in unique(counts[has]).tolist():
        rows = flatnonzero(counts == m)
        idx = neighbours[rows]
        if m < full:  # the valid neighbours first, in their order
            idx = take_along_axis(idx, argsort_stable(~valid[rows], axis=1)[:, :m], axis=1)
        med[rows] = median_of([features[idx[:, j]] for j in range(m)], dtype="float64")
    return f - med, has


def density(features: Array, mean: Array, precision: Array) -> Array:
    """``(N,)`` Mahalanobis distance of each patch's features from the training distribution."""
    f = astype(features, "float64")
    d = f - asarray_like(mean, f)
    return sqrt(maximum(einsum("ij,jk,ik->i", d, asarray_like(precision, f), d), 0.0))


class PartStats(BaseModel):
    """A reconstruction part of the ``joint`` score: the robust spread of its features and its calibrated threshold
    on their contrast (median + k robust standard deviations of the training patches', as for the encoder's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: PartSource
    scale: tuple[float, ...]
    threshold: float = Field(gt=0)
    median: float = Field(ge=0)
    sd: float = Field(ge=0)
    train_share_over: float = Field(ge=0, le=1)

    def normalised(self, features: Array, neighbours: Array) -> Array:
        if features.shape[1] != len(self.scale):
            raise ValueError(
                f"the encoder's {self.source} part has {features.shape[1]} features but the manifest's statistics "
                f"have {len(self.scale)}; re-export the artifact"
            )
        return contrast(features, neighbours, np.asarray(self.scale)) / self.threshold


class NoveltyStats(BaseModel):
    """What the defect score needs from training, and its calibration (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: NoveltyKind = "contrast"
    n_features: int = Field(ge=1)
    mean: tuple[float, ...]
    precision: tuple[tuple[float, ...], ...]  # inverse covariance of the features, F×F
    scale: tuple[float, ...]  # robust spread of each feature
    neighbours: int = Field(6, ge=1, description="atom-centred patches: nearest atoms compared with")
    grid_step: int = Field(1, ge=1, description="grid patches: neighbour distance in grid cells (one lattice period)")
    grid_span: int = Field(
        1,
        ge=1,
        le=MAX_GRID_SPAN,
        description="grid patches: the neighbours at grid_step, ..., grid_step + grid_span - 1 cells (calibration "
        "chooses the rings under which the training scan's outliers stand out most; `atomstream export "
        "--defect-span` sets them)",
    )
    k: float = Field(
        TRAIN_K,
        gt=0,
        description="threshold: median + k robust standard deviations of the training scores (6; 4.5 for kind "
        "'residual'; `atomstream export --defect-k`); a frame's own bar takes the same k",
    )
    contrast_threshold: float = Field(gt=0)
    density_threshold: float = Field(gt=0)
    # the training scores' median and robust sd behind each threshold (threshold = median + k·sd)
    contrast_median: float = Field(0.0, ge=0)
    contrast_sd: float = Field(0.0, ge=0)
    density_median: float = Field(0.0, ge=0)
    density_sd: float = Field(0.0, ge=0)
    n_patches: int = Field(ge=1, description="training patches the statistics come from")
    train_share_over: dict[str, float] = Field(
        default_factory=dict, description="share of the training patches over the threshold, per kind"
    )
    parts: tuple[PartStats, ...] = Field(
        (),
        description="kinds 'joint' and 'residual': the reconstruction parts, each compared with the neighbours like "
        "the encoder's",
    )
    choice: str = Field(
        "",
        description="what calibration chose and why (the kind, when `atomstream export --defect-score auto`; a "
        "neighbourhood wider than one ring); empty when nothing was chosen",
    )

    @model_validator(mode="after")
    def _check(self) -> NoveltyStats:
        f = self.n_features
        if len(self.mean) != f or len(self.scale) != f or len(self.precision) != f:
            raise ValueError(f"mean, scale and precision must each have n_features={f} entries")
        if any(len(row) != f for row in self.precision):
            raise ValueError(f"precision must be {f}×{f}")
        wanted = REDRAWN_PARTS.get(self.kind)
        if wanted is not None and tuple(p.source for p in self.parts) != wanted:
            raise ValueError(
                f"kind {self.kind!r} needs the statistics of the reconstruction parts {list(wanted)} (field 'parts'), "
                f"got {[p.source for p in self.parts]}"
            )
        return self

    @property
    def needs_reconstruction(self) -> bool:
        """Whether the score reads the decoder's redrawing, so the exported graph must return it."""
        return self.kind in REDRAWN_PARTS

    def normalised(self, features: Array, neighbours: Array, parts: dict[str, Array] | None = None) -> Array:
        """``(N,)`` raw score over its threshold (1 = the calibrated threshold), of this ``kind``; ``parts`` are the
        reconstruction parts' features (``part_features``), which kinds ``joint`` and ``residual`` need."""
        if features.shape[1] != self.n_features:
            raise ValueError(
                f"the encoder gives {features.shape[1]} features but the manifest's novelty statistics have "
                f"{self.n_features}; re-export the artifact"
            )
        if self.kind in REDRAWN_PARTS:
            missing = [p.source for p in self.parts if p.source not in (parts or {})]
            if missing:
                raise ValueError(
                    f"the defect score needs the encoder's {missing} outputs (a graph exported with the decoder's "
                    "redrawing); re-export the artifact"
                )
            assert parts is not None
            return functools.reduce(maximum, [part.normalised(parts[part.source], neighbours) for part in self.parts])
        # each kind computes only what it reads: this runs on every frame the service scores
        c = d = None
        if self.kind in ("contrast", "combined"):
            c = contrast(features, neighbours, np.asarray(self.scale)) / self.contrast_threshold
        if self.kind in ("density", "combined"):
            d = density(features, np.asarray(self.mean), np.asarray(self.precision)) / self.density_threshold
        if c is None or d is None:
            return c if d is None else d
        return maximum(c, d)


def robust_stats(values: Array) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 · MAD) of the training scores."""
    if values.shape[0] == 0:
        return 0.0, 0.0
    med = float(median(values))
    return med, _MAD_TO_SIGMA * float(median(abs(values - med)))


def _threshold(median: float, sd: float, k: float) -> float:
    v = median + k * sd
    return v if np.isfinite(v) and v > _FLOOR else _FLOOR


def fit_novelty(
    features: np.ndarray,
    neighbours: np.ndarray,
    *,
    kind: NoveltyKind = "contrast",
    k: float = TRAIN_K,
    k_neighbours: int = 6,
    grid_step: int = 1,
    grid_span: int = 1,
    parts: dict[str, np.ndarray] | None = None,
    choice: str = "",
) -> NoveltyStats:
    """Statistics and thresholds from the training patches' ``features`` and their ``neighbours`` index; kind
    ``joint`` and ``residual`` also from the reconstruction ``parts`` (``part_features`` of the same patches)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"novelty statistics need at least 2 patches of features, got shape {f.shape}")
    mean = f.mean(axis=0)
    cov = np.atleast_2d(np.cov(f, rowvar=False))
    cov += np.eye(cov.shape[0]) * (1e-6 + 1e-6 * float(np.trace(cov)) / cov.shape[0])
    precision = np.linalg.pinv(cov)
    scale, c, (cm, cs, tc) = _calibrated_contrast(f, neighbours, k)
    d = density(f, mean, precision)
    dm, ds = robust_stats(d)
    td = _threshold(dm, ds, k)
    over = {
        "contrast": float(np.mean(c >= tc)),
        "density": float(np.mean(d >= td)),
        "combined": float(np.mean((c >= tc) | (d >= td))),
    }
    fitted: list[PartStats] = []
    if kind in REDRAWN_PARTS:
        missing = sorted(set(REDRAWN_PARTS[kind]) - set(parts or {}))
        if missing:
            raise ValueError(f"kind {kind!r} needs the reconstruction parts {missing} of the training patches")
        assert parts is not None
        flagged = np.zeros(f.shape[0], bool)
        for source in REDRAWN_PARTS[kind]:
            p_scale, pc, (pm, ps, pt) = _calibrated_contrast(np.asarray(parts[source], np.float64), neighbours, k)
            flagged |= pc >= pt
            fitted.append(
                PartStats(
                    source=source,  # type: ignore[arg-type]
                    scale=tuple(float(v) for v in p_scale),
                    threshold=pt,
                    median=pm,
                    sd=ps,
                    train_share_over=float(np.mean(pc >= pt)),
                )
            )
        over[kind] = float(np.mean(flagged))
    return NoveltyStats(
        kind=kind,
        n_features=f.shape[1],
        mean=tuple(float(v) for v in mean),
        precision=tuple(tuple(float(v) for v in row) for row in precision),
        scale=tuple(float(v) for v in scale),
        neighbours=k_neighbours,
        grid_step=grid_step,
        grid_span=grid_span,
        k=k,
        contrast_threshold=tc,
        density_threshold=td,
        contrast_median=cm,
        contrast_sd=cs,
        density_median=dm,
        density_sd=ds,
        n_patches=f.shape[0],
        train_share_over=over,
        parts=tuple(fitted),
        choice=choice,
    )


def _calibrated_contrast(
    f: np.ndarray, neighbours: np.ndarray, k: float
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One feature family's contrast calibration on the training patches: its per-feature scale, the training
    contrasts, and their (median, robust sd, threshold) — the same for the encoder's features and each part."""
    scale = robust_scale(f)
    c = contrast(f, neighbours, scale)
    med, sd = robust_stats(c)
    return scale, c, (med, sd, _threshold(med, sd, k))


def robust_scale(f: Array) -> Array:
    """Each feature's robust spread (1.4826 · MAD), floored at a tenth of its standard deviation."""
    scale = _MAD_TO_SIGMA * median(abs(f - median(f, axis=0)), axis=0)
    return maximum(scale, maximum(std(f, axis=0) * 0.1, _FLOOR))


def novelty_score(
    features: Array,
    neighbours: Array,
    stats: NoveltyStats | None,
    parts: dict[str, Array] | None = None,
) -> Array:
    """``(N,)`` float32 published defect score in [0, 1): 0.5 at the calibrated threshold.

    With training statistics the threshold is the calibrated one **or the frame's own bar, whichever is higher**:
    the frame's median + ``stats.k`` robust standard deviations of its calibrated scores (frames of at least
    ``FRAME_MIN_PATCHES`` patches). On a frame like the training scan that bar sits at about the calibrated
    threshold, by construction; on a frame unlike it — another region of the sample, a change of contrast — the
    scores rise everywhere and the bar with them, so the controller gets the patches that stand out in *this* frame
    rather than a flood. Measured: the STM graphene right half (trained on the left) flagged 927 of 6440 patches
    without it, 238 with it; on the demo lattice the published precision rose and the recall fell (docs/real-data.md).

    ``stats=None`` (an artifact exported without training statistics) falls back to contrast calibrated on the frame
    itself: features scaled by the frame's own robust spread, threshold the frame's median + ``FRAME_K`` robust
    standard deviations of that contrast. Weaker than a training calibration (a frame full of defects raises its
    own bar) but never worse than chance, and a uniform frame flags almost nothing.
    """
    f = astype(features, "float64")
    if stats is not None:
        s = stats.normalised(f, neighbours, parts)
        if s.shape[0] >= FRAME_MIN_PATCHES:
            s = s / max(1.0, _frame_bar(s, stats.k))
    elif f.shape[0] == 0:
        s = zeros((0,), "float64", like=f)
    else:
        c = contrast(f, neighbours, robust_scale(f))
        s = c / max(_frame_bar(c), _FLOOR)
    return astype(s / (1.0 + s), "float32")


def _frame_bar(scores: Array, k: float = FRAME_K) -> float:
    """The frame's own bar: its median + ``k`` robust standard deviations of ``scores`` — the training statistics'
    ``k`` when there are some, so an artifact exported at another ``k`` moves both bars together."""
    med, sd = robust_stats(scores)
    return med + k * sd
