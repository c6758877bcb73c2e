"""The defect score's training statistics and calibration, computed from the training patches at export.

Serving scores a patch by how unlike its neighbours its outputs are — by default the decoder's redrawing of it
(kind ``joint``), or the encoder's outputs (``streamer.maps.novelty``); what "unlike" means — the features' spread,
their covariance, the calibrated thresholds — comes from here and travels in the manifest. The features are computed
from the inference wrapper's outputs, the very tensors the exported graph gives the server.

For grid patches the neighbourhood is chosen here too: the rings of cells ``step`` … ``step + span - 1`` out, ``step``
the nearest whose patches do not overlap (a defect must not be compared with patches that hold it too) and ``span``
1 to ``MAX_GRID_SPAN`` rings — the one under which **the training scan's outliers stand out most**: the 99.5 %
quantile of the interior cells' scores above their median, in robust sd (``_tail``; the unit the bars are set in).
The training scan holds defects too, and that is the quantity a bar at median + k robust sd acts on. A wider
neighbourhood costs locality (a defect next to another, the frame's edge), so it is taken only when its outliers
stand out ``_CLEARLY_WIDER`` (1.3×) more than with the one ring — not for the steadier median of more neighbours
alone (on i.i.d. features with planted outliers the four rings' ratio reached 1.22×). Measured: on the STM graphene
scan (48-px patches every 8 px) the residual's outliers stand out 4.1–4.3 robust sd with one ring and 7.6–8.1 with
four (three trainings); the lattice repeats at every ring there, a median of 32 neighbours lands on it, and the
marked defects rose above the clean patches' tail. On the demo lattice (16-px patches at a 16-px stride) one ring
is best at most trainings (10.9–14.5 against 5.0–10.4 with four: its defects sit a few cells apart, and the
film/substrate change is a few cells away; one of the benchmark's five took two rings). This replaced a rule that
took a farther step or two steps only when the training neighbours' median contrast fell under 0.8× (the lattice's
registration): it chose steps 6 and 7 on graphene, which rank the marks about as well (AUC 0.98–0.99 either way) but
leave them inside the clean patches' tail (docs/real-data.md).

The score's kind is chosen here by default (``kind="auto"``, what ``atomstream export`` does): ``joint`` — the larger
of the redrawing's likelihood part and its residual part — unless **the likelihood part flags more than
``_LIKELIHOOD_EXCESS`` (5×) as many training patches as the residual part** at the same bar (``_keeps_likelihood``),
then ``residual``. Both parts should flag the scan's defects; a part that flags several times more reacts to
something the scan has all over. Measured: on the STM graphene scan the likelihood part flags 5.5–18.7× the
residual's training patches (its scan-line streaks at the raster's line starts: the joint score published 14–17
points on the defect-free top of the scan at a bar that finds the marks), on the demo lattice 1.1–4.2× (there it adds
defects the residual misses; 4.1 and 4.2 at two trainings of eighteen), on MoS₂ 2.0×; 5 sits at about the geometric
middle of 4.2 and 5.5 — a thin margin at both ends, which the manifest's ``choice`` shows (the ratio) and
``--defect-score`` overrides. Each kind has its own bar (``default_k``): ``joint`` at 6 robust sd, ``residual`` at
4.5.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.data import DataError, PatchSet, patches_from_config
from models.jtrvae import JTrVAE
from streamer.maps.novelty import (
    MAX_GRID_SPAN,
    REDRAWN_PARTS,
    TRAIN_K,
    NoveltyKind,
    NoveltyStats,
    contrast,
    default_k,
    encoder_features,
    fit_novelty,
    grid_neighbours,
    part_features,
    point_neighbours,
    robust_scale,
    robust_stats,
)

__all__ = [
    "DEFAULT_KIND",
    "CalibratedKind",
    "calibrate_novelty",
    "encoder_outputs",
    "patch_neighbours",
    "score_features",
    "training_patches",
]

#: a served kind, or ``auto``: calibration chooses between ``joint`` and ``residual``
CalibratedKind = NoveltyKind | Literal["auto"]
#: what ``atomstream export`` calibrates by default: ``joint``, or ``residual`` where the likelihood part reacts to
#: the scan rather than to its defects (``_keeps_likelihood``); chosen by measurement (docs/real-data.md)
DEFAULT_KIND: CalibratedKind = "auto"
_POINT_NEIGHBOURS = 6
#: a wider neighbourhood only when the training outliers stand out this much more in it (``_grid_span``)
_CLEARLY_WIDER = 1.3
#: the quantile whose distance from the median measures how far the training scan's outliers stand out
_TAIL_Q = 0.995
#: a neighbourhood is judged only on enough interior cells for ``_TAIL_Q`` to be more than a handful of patches
_TAIL_MIN_PATCHES = 400
#: the likelihood part stays in the score unless it flags more than this many times the residual's training patches
_LIKELIHOOD_EXCESS = 5.0


def encoder_outputs(
    model: JTrVAE, images: np.ndarray, *, batch_size: int = 1024, reconstruction: bool = False
) -> dict[str, np.ndarray]:
    """The exported wrapper's outputs by manifest name for ``(N, H, W)`` encoder-ready patches (CPU, eval); with
    ``reconstruction`` also the decoder's redrawing (``recon_nll``, ``recon_residual``)."""
    from exporters.export import build_wrapper

    wrapper = build_wrapper(model, reconstruction=reconstruction)
    names = wrapper.output_names
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = torch.as_tensor(images[start : start + batch_size], dtype=torch.float32)[:, None]
            for name, value in zip(names, wrapper(batch), strict=True):
                parts[name].append(value.numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def patch_neighbours(
    patches: PatchSet, *, grid_step: int = 1, grid_span: int = 1, k: int = _POINT_NEIGHBOURS
) -> np.ndarray:
    """Each patch's neighbours within its own frame, as global indices (``-1`` none): grid cells ``grid_step`` (to
    ``grid_step + grid_span - 1``) away, or the ``k`` nearest atoms."""
    frames = patches.positions[:, 0]
    out: list[np.ndarray] = []
    for f in np.unique(frames):
        idx = np.nonzero(frames == f)[0]
        if patches.grid is not None:
            local = grid_neighbours(patches.grid, grid_step, grid_span)
        else:
            local = point_neighbours(patches.centres[idx], k)
        if local.shape[0] != idx.size:
            raise DataError(f"frame {int(f)} has {idx.size} patches but its layout has {local.shape[0]}")
        out.append(np.where(local >= 0, idx[np.clip(local, 0, None)], -1))
    return np.concatenate(out) if out else np.zeros((0, 8 * grid_span), np.int64)


def score_features(kind: NoveltyKind, features: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
    """``(N, F)``: what a score of ``kind`` compares with the neighbours — the redrawing's ``parts``
    (``part_features``) it reads for ``joint`` and ``residual``, the encoder's ``features`` otherwise — so the
    neighbour step is judged on what will be scored."""
    if kind not in REDRAWN_PARTS:
        return features
    missing = [source for source in REDRAWN_PARTS[kind] if source not in parts]
    if missing:
        raise ValueError(
            f"kind {kind!r} needs the redrawing's outputs {missing} (encoder_outputs(..., reconstruction=True))"
        )
    return np.concatenate([parts[source] for source in sorted(REDRAWN_PARTS[kind])], axis=1)


def _grid_span(patches: PatchSet, features: np.ndarray) -> tuple[int, int, float, float]:
    """``(step, span, tail, nearest tail)``: the rings of cells ``step`` … ``step + span - 1`` out (``step`` the first
    whose patches do not overlap) under which the training scan's outliers stand out most (module docstring), judged
    on the ``(N, F)`` features the score reads; ``tail`` is that neighbourhood's ``_tail`` and ``nearest tail`` the
    one ring's."""
    first = _first_step(patches)
    grid = patches.grid if patches.grid is not None else (0, 0)
    tails: dict[int, float] = {}
    scale = robust_scale(features)
    for span in range(1, MAX_GRID_SPAN + 1):
        if not _fits(grid, first, span):
            break
        neighbours = patch_neighbours(patches, grid_step=first, grid_span=span)
        interior = (neighbours >= 0).all(axis=1)  # an edge cell's one-sided median is another statistic
        if int(interior.sum()) < _TAIL_MIN_PATCHES:
            break
        tails[span] = _tail(contrast(features, neighbours, scale)[interior])
    if not tails:
        return first if _fits(grid, first, 1) else 1, 1, float("nan"), float("nan")
    best = max(tails, key=lambda s: tails[s])
    # a wider neighbourhood costs locality (a defect near another one, near the frame's edge): only when its
    # outliers clearly stand out more, not by the steadier median of more neighbours alone
    span = best if tails[best] >= _CLEARLY_WIDER * tails[1] else 1
    return first, span, tails[span], tails[1]


def _tail(scores: np.ndarray) -> float:
    """How far the training scan's outliers stand out: the ``_TAIL_Q`` quantile of the scores above their median,
    in robust standard deviations (the unit the bars are set in)."""
    med, sd = robust_stats(scores)
    return (float(np.quantile(scores, _TAIL_Q)) - med) / sd if sd > 0 else 0.0


def _keeps_likelihood(stats: NoveltyStats) -> tuple[bool, float]:
    """Whether the ``joint`` score's likelihood part belongs in the score, and the ratio it is judged by: how many
    more training patches it flags than the residual part at the same bar (counts + 1, so a clean scan's zeros
    compare as equals). Both parts should flag the scan's defects; a likelihood part that flags several times more
    reacts to something the scan has all over (module docstring)."""
    over = {p.source: p.train_share_over * stats.n_patches for p in stats.parts}
    ratio = (over["reconstruction"] + 1.0) / (over["residual"] + 1.0)
    return ratio <= _LIKELIHOOD_EXCESS, ratio


def _fits(grid: tuple[int, int], step: int, span: int) -> bool:
    """Whether the rings ``step`` … ``step + span - 1`` cells out fit the grid twice over (a cell in its middle has
    every neighbour on both sides)."""
    return 2 * (step + span - 1) < min(grid)


def _first_step(patches: PatchSet) -> int:
    """The nearest grid step, in cells, whose patches do not overlap the patch's own."""
    ph, pw = patches.images.shape[1:]
    sy, sx = patches.data.stride
    return max(1, math.ceil(max(ph / sy, pw / sx)))


def calibrate_novelty(
    model: JTrVAE,
    patches: PatchSet,
    *,
    kind: CalibratedKind = DEFAULT_KIND,
    k: float | None = None,
    span: int | None = None,
) -> NoveltyStats:
    """``NoveltyStats`` from the training ``patches`` (a scan's grid or atom-centred patches, frame structure kept).

    ``kind`` ``auto``: ``joint``, or ``residual`` when the likelihood part flags more than ``_LIKELIHOOD_EXCESS``
    times the residual's training patches (``NoveltyStats.choice`` says which and why). ``k``: the bars' robust sd
    count, by default the kind's (``default_k``). ``span`` (grid patches): the ``span`` nearest rings of cells whose
    patches do not overlap the patch's own, instead of the rings calibration chooses (``_grid_span``)."""
    if patches.data.kind == "stack":
        raise DataError("the defect score compares a patch with its neighbours in a scan; an image stack has none")
    if span is not None and not 1 <= span <= MAX_GRID_SPAN:
        raise ValueError(f"span={span} must be between 1 and {MAX_GRID_SPAN} rings of cells")
    outputs = encoder_outputs(model, patches.images, reconstruction=kind == "auto" or kind in REDRAWN_PARTS)
    features, parts = encoder_features(outputs), part_features(outputs)
    choice: list[str] = []
    if patches.grid is None:
        step, span = 1, 1
    elif span is not None:
        step = _first_step(patches)
        if not _fits(patches.grid, step, span):
            raise ValueError(
                f"a grid of {patches.grid[0]}×{patches.grid[1]} cells is too small to compare with {span} rings of "
                f"cells from {step} cells out: use a smaller span, or a larger scan"
            )
    else:
        # ``auto`` judges the rings on the residual: both kinds it may choose read it, and it is what they move
        step, span, tail, nearest = _grid_span(
            patches, score_features("residual" if kind == "auto" else kind, features, parts)
        )
        if span > 1:
            choice.append(
                f"{span} rings of cells from {step} out (outliers at {tail:.1f} robust sd, {nearest:.1f} with one)"
            )
    neighbours = patch_neighbours(patches, grid_step=step, grid_span=span)

    def fit(chosen: NoveltyKind, bar: float) -> NoveltyStats:
        return fit_novelty(
            features, neighbours, kind=chosen, k=bar, k_neighbours=_POINT_NEIGHBOURS, grid_step=step,
            grid_span=span, parts=parts, choice="; ".join(choice),
        )  # fmt: skip

    if kind != "auto":
        return fit(kind, default_k(kind) if k is None else k)
    joint = fit("joint", TRAIN_K)  # both parts at the same bar
    keeps, ratio = _keeps_likelihood(joint)
    chosen: NoveltyKind = "joint" if keeps else "residual"
    verdict = "kept" if keeps else f"left out (over {_LIKELIHOOD_EXCESS:g}×)"
    choice.insert(0, f"{chosen}: the likelihood part flags {ratio:.1f}× the residual's training patches, {verdict}")
    bar = default_k(chosen) if k is None else k
    if chosen == "joint" and bar == TRAIN_K:
        return joint.model_copy(update={"choice": "; ".join(choice)})
    return fit(chosen, bar)


def training_patches(source: str, patches_data: object) -> PatchSet | None:
    """The run's training scan re-cut as in training, or ``None`` when it is a stack or no longer on disk."""
    from models.config import DataConfig

    data = patches_data if isinstance(patches_data, DataConfig) else None
    if data is None or data.kind == "stack" or not source or not Path(source).is_file():
        return None
    return patches_from_config(source, data)
