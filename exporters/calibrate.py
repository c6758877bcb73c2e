"""The defect score's training statistics and calibration, computed from the training patches at export.

Serving scores a patch by how unlike its neighbours its outputs are — by default the decoder's redrawing of it
(kind ``joint``), or the encoder's outputs (``streamer.maps.novelty``); what "unlike" means — the features' spread,
their covariance, the calibrated thresholds — comes from here and travels in the manifest. The features are computed
from the inference wrapper's outputs, the very tensors the exported graph gives the server.

For grid patches the neighbour distance (``grid_step``, in grid cells) is chosen here too: the smallest step whose
patches do not overlap (a defect must not be compared with patches that hold it too), or up to three cells more when
that makes training neighbours clearly more alike (median contrast under 0.8× — the step that lands on the lattice's
registration). The neighbours of two adjacent steps together (``grid_span`` 2) are candidates too, judged the same
way: a lattice period is rarely a whole number of cells, and each step alone is then off the registration by part
of a cell, one way or the other, where the median of both sets straddles it; and a median of 16 neighbours is
steadier than one of 8. Around a whole-cell period the pair that holds it costs little (the median of 16 with 8 on
the registration stays near theirs).
"Alike" is judged on the features the score reads: for ``joint`` the redrawing's parts, not the encoder's outputs.
The encoder's outputs are nearly blind to the registration (its shift latent absorbs it), the residual of a
redrawing is not: on the STM graphene scan (real-space 48 px patches) the encoder's median contrast moved by 0.89×
over steps 4–7 and kept step 4, where the residual's fell to 0.72× at step 7, and the residual's defect AUC is 0.876
at step 4 against 0.946 at step 7 (one model; docs/real-data.md); steps 6 and 7 together rank them at 0.986.
"""

from __future__ import annotations

import math
from pathlib import Path

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
    encoder_features,
    fit_novelty,
    grid_neighbours,
    part_features,
    point_neighbours,
    robust_scale,
)

__all__ = [
    "DEFAULT_KIND",
    "calibrate_novelty",
    "encoder_outputs",
    "patch_neighbours",
    "score_features",
    "training_patches",
]

#: chosen by measurement (benchmarks/real_data.py; docs/real-data.md has the table)
DEFAULT_KIND: NoveltyKind = "joint"
_POINT_NEIGHBOURS = 6
_CLEARLY_BETTER = 0.8


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


def _grid_step(patches: PatchSet, features: np.ndarray) -> tuple[int, int]:
    """The neighbour distance in grid cells and its span (module docstring), judged on the ``(N, F)`` features the
    score reads: ``(step, 1)`` for the cells ``step`` away, ``(step, 2)`` for those ``step`` and ``step + 1`` away."""
    first = _first_step(patches)
    gh, gw = patches.grid if patches.grid is not None else (0, 0)
    candidates = [(s, n) for s in range(first, first + 4) for n in (1, 2) if s + n - 1 < first + 4]
    candidates = [(s, n) for s, n in candidates if _fits((gh, gw), s, n)] or [(1, 1)]
    scale = robust_scale(features)
    medians = [
        float(np.median(contrast(features, patch_neighbours(patches, grid_step=s, grid_span=n), scale)))
        for s, n in candidates
    ]
    best = int(np.argmin(medians))
    # a farther or wider neighbourhood only when clearly better (it lands on the lattice's registration), not by
    # noise or by the steadier median of more neighbours alone: nearer neighbours keep the score local
    return candidates[best] if medians[best] < _CLEARLY_BETTER * medians[0] else candidates[0]


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
    kind: NoveltyKind = DEFAULT_KIND,
    k: float = TRAIN_K,
    span: int | None = None,
) -> NoveltyStats:
    """``NoveltyStats`` from the training ``patches`` (a scan's grid or atom-centred patches, frame structure kept).

    ``span`` (grid patches): instead of the chosen neighbourhood, the ``span`` nearest rings of cells whose patches
    do not overlap the patch's own (steps ``first`` … ``first + span - 1``): a wider neighbourhood, whose median is
    steadier where the lattice repeats at every ring (docs/real-data.md, the STM graphene scan)."""
    if patches.data.kind == "stack":
        raise DataError("the defect score compares a patch with its neighbours in a scan; an image stack has none")
    if span is not None and not 1 <= span <= MAX_GRID_SPAN:
        raise ValueError(f"span={span} must be between 1 and {MAX_GRID_SPAN} rings of cells")
    outputs = encoder_outputs(model, patches.images, reconstruction=kind in REDRAWN_PARTS)
    features, parts = encoder_features(outputs), part_features(outputs)
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
        step, span = _grid_step(patches, score_features(kind, features, parts))
    neighbours = patch_neighbours(patches, grid_step=step, grid_span=span)
    return fit_novelty(
        features, neighbours, kind=kind, k=k, k_neighbours=_POINT_NEIGHBOURS, grid_step=step, grid_span=span,
        parts=parts,
    )  # fmt: skip


def training_patches(source: str, patches_data: object) -> PatchSet | None:
    """The run's training scan re-cut as in training, or ``None`` when it is a stack or no longer on disk."""
    from models.config import DataConfig

    data = patches_data if isinstance(patches_data, DataConfig) else None
    if data is None or data.kind == "stack" or not source or not Path(source).is_file():
        return None
    return patches_from_config(source, data)
