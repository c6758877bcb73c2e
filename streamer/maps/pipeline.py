"""Frame → maps in-process, no sockets: the reference the live service must reproduce exactly.

The work is split in three so the service can batch **across frames** (one encoder call for the patches of many
small frames, several calls for one huge frame):

1. ``prepare(frame)`` — move the frame to the encoder's device once, normalise it and lay the patch grid over it
   (views, no copy; atom-centred patches are gathered): a ``PreparedFrame`` that knows where each patch comes from,
   and writes any run of its patches, encoder-ready, wherever it is told (``PreparedFrame.write``).
2. ``encode(patches)`` — the encoder in calls of at most ``max_batch_patches`` (``call_encoder``), outputs back on
   the host once, as numpy, and joined in order (``join``).
3. ``assemble(prepared, outputs)`` — one frame's rows of the outputs (``split`` cuts a cross-frame batch's outputs
   into them) → ``FrameMaps``: the arrays of DESIGN.md in their published order and the defects
   (``streamer.maps.defects`` documents the score, the regions and their peaks).

``process(frame)`` chains them for one frame, cutting the patches the plain way (``PreparedFrame.patches``). The
service runs the same methods — ``prepare``, ``call_encoder`` per chunk, ``join``, ``split``, ``assemble`` — with
the patches of several frames written into its reused batch buffers (``streamer.service.batch_buffers``) instead of
cut one frame at a time, so the published maps are checked against ``process``. Preprocessing goes through the same
``streamer.maps.preprocess`` and ``streamer.maps.atoms`` functions training used, with the parameters the manifest
recorded, so nothing is re-guessed here. A ``Pipeline`` is immutable: ``with_defects`` returns a new one sharing the
encoder, which lets the service swap settings (or a reloaded model) between batches without locks.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, cast

import numpy as np

from streamer.maps.arrays import Array, astype, is_tensor, require_torch, sync, to_host, zeros
from streamer.maps.atoms import find_atoms
from streamer.maps.defects import (
    DEFAULT_MAX_SHARE,
    Connectivity,
    DefectRule,
    class_score,
    defect_mask,
    grid_centres,
    grid_peaks,
    grid_regions,
    point_peaks,
    point_regions,
    publishable,
    regions_to_defects,
)
from streamer.maps.manifest import Manifest
from streamer.maps.novelty import encoder_features, grid_neighbours, novelty_score, part_features, point_neighbours
from streamer.maps.preprocess import Preprocessing, prepare_frame, prepare_patches
from streamer.maps.tiling import TilingError, gather_points, patch_range, tile_grid
from streamer.wire.protocol import ArraySpec, Defect, Defects, Maps, ModelRef

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARRAY_ORDER",
    "EncoderLike",
    "FrameEncoderLike",
    "FrameError",
    "FrameMaps",
    "Pipeline",
    "PipelineError",
    "PreparedFrame",
    "resolve_classes",
    "slice_outputs",
]

#: grid shapes whose neighbour index a pipeline keeps (a scan sends one or two frame sizes)
_NEIGHBOUR_CACHE = 4
#: The order of the published arrays (DESIGN.md); absent ones are skipped.
ARRAY_ORDER: tuple[str, ...] = ("class", "class_prob", "z", "angle", "shift", "defect_score", "centers")


class PipelineError(ValueError):
    """A setting the pipeline cannot use (unknown defect class, bad batch size); the message names it."""


class FrameError(PipelineError):
    """A frame this model cannot tile (not 2-D, smaller than a patch): a problem of the input, not the service."""


class EncoderLike(Protocol):
    """What the pipeline needs from ``streamer.maps.encoder.Encoder`` (a wrapper, e.g. one adding a delay, will do)."""

    manifest: Manifest
    backend: str
    device: str
    torch_device: torch.device  # read only when ``device`` is not "cpu" (the GPU path)
    sha256: str

    def __call__(self, patches: Array) -> dict[str, Array]: ...


class FrameEncoderLike(Protocol):
    """What ``Pipeline.call_frame`` needs besides: an encoder that also reads whole grid frames (``Encoder`` loaded
    with ``frame_encoder=True`` on an artifact with ``encoder.frame.onnx``)."""

    frame_stride: tuple[int, int] | None

    def encode_frame(self, region: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class PreparedFrame:
    """One frame made ready for the encoder: its normalised patches as views (``tiles``) and their layout.

    ``tiles`` is ``(gh, gw, ph, pw)`` for the grid layout (strided views of the normalised frame) or ``(N, ph, pw)``
    for atom-centred patches. The patch-level steps run when the patches are written for the encoder (``write``), so
    they run once per patch, into the encoder's batch buffer. ``tile_s`` is the time ``prepare`` took.
    """

    tiles: Array
    spec: Preprocessing
    grid: tuple[int, int] | None
    centers: np.ndarray | None
    frame_shape: tuple[int, int]
    tile_s: float
    #: the normalised frame the grid's ``tiles`` view (grid layout), for a frame encoder to read whole
    frame: Array | None = None

    @property
    def n(self) -> int:
        return int(self.tiles.shape[0] * self.tiles.shape[1]) if self.tiles.ndim == 4 else int(self.tiles.shape[0])

    @property
    def n_columns(self) -> int:
        """Patches per grid row (1 for atom-centred patches)."""
        return self.grid[1] if self.grid is not None else 1

    @property
    def patches(self) -> Array:
        """All patches, encoder-ready ``(n, 1, ph, pw)``, in a new array (the unbuffered path)."""
        ph, pw = int(self.tiles.shape[-2]), int(self.tiles.shape[-1])
        if self.n == 0:  # no atom found: the FFT refuses empty batches
            return zeros((0, 1, ph, pw), "float32", like=self.tiles)
        return prepare_patches(self.tiles, self.spec)

    def write(self, start: int, stop: int, out: Array) -> None:
        """Patches ``start:stop`` (row-major), encoder-ready, into ``out`` (``(stop - start, 1, ph, pw)``)."""
        offset = 0
        for piece in patch_range(self.tiles, start, stop):
            k = math.prod(piece.shape[:-2])
            prepare_patches(piece, self.spec, out=out[offset : offset + k])
            offset += k


@dataclass(frozen=True)
class FrameMaps:
    """One frame's maps (numpy, DESIGN.md order) and defects, with everything a ``maps`` header needs."""

    layout: Literal["grid", "points"]
    grid: tuple[int, int] | None
    patch: tuple[int, int]
    stride: tuple[int, int]
    origin: tuple[int, int]
    n_classes: int
    latent_dim: int
    class_names: tuple[str, ...]
    model: ModelRef
    arrays: dict[str, np.ndarray]
    defects: list[Defect]
    defects_note: str | None = None

    def maps_message(
        self,
        *,
        scan_id: str,
        frame_id: int,
        seq: int,
        t_acq_ns: int | None,
        t_recv_ns: int,
        t_pub_ns: int,
        pixel_size: float | None = None,
        pixel_unit: str | None = None,
    ) -> Maps:
        return Maps(
            scan_id=scan_id,
            frame_id=frame_id,
            seq=seq,
            layout=self.layout,
            grid=list(self.grid) if self.grid is not None else None,
            patch=list(self.patch),
            stride=list(self.stride),
            origin=list(self.origin),
            n_classes=self.n_classes,
            latent_dim=self.latent_dim,
            class_names=list(self.class_names),
            model=self.model,
            t_acq_ns=t_acq_ns,
            t_recv_ns=t_recv_ns,
            t_pub_ns=t_pub_ns,
            arrays=[ArraySpec.of(name, a) for name, a in self.arrays.items()],
            pixel_size=pixel_size,
            pixel_unit=pixel_unit,
        )

    def defects_message(
        self, *, scan_id: str, frame_id: int, seq: int, pixel_size: float | None = None, pixel_unit: str | None = None
    ) -> Defects:
        return Defects(
            scan_id=scan_id,
            frame_id=frame_id,
            seq=seq,
            defects=self.defects,
            note=self.defects_note,
            pixel_size=pixel_size,
            pixel_unit=pixel_unit,
        )

    def buffers(self) -> list[np.ndarray]:
        return list(self.arrays.values())


def resolve_classes(classes: Sequence[str | int], class_names: Sequence[str]) -> tuple[int, ...]:
    """Defect classes given by name or index → sorted unique indices; unknown ones raise ``PipelineError``."""
    out: set[int] = set()
    for c in classes:
        if isinstance(c, bool):
            raise PipelineError(f"defect class {c!r} is neither a class name nor an index")
        if isinstance(c, int):
            if not 0 <= c < len(class_names):
                raise PipelineError(
                    f"defect class index {c} is out of range: the model has {len(class_names)} classes "
                    f"(0..{len(class_names) - 1})"
                )
            out.add(c)
        elif c in class_names:
            out.add(list(class_names).index(c))
        else:
            raise PipelineError(f"defect class {c!r} is not one of the model's classes {list(class_names)}")
    return tuple(sorted(out))


def slice_outputs(outputs: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """The rows ``start:stop`` of every output: one frame's share of a cross-frame batch."""
    return {name: value[start:stop] for name, value in outputs.items()}


def _to_device(frame: Array, device: torch.device) -> torch.Tensor:
    """A frame (or the defect score's arrays) on the device (the GPU path), moved once. Read-only buffers (views on
    received messages) are copied on the host first because torch cannot wrap them; uint16 widens to int32, which
    every torch op supports."""
    torch = require_torch("a CUDA device")
    if is_tensor(frame):
        return frame.to(device, non_blocking=True)
    array = np.asarray(frame)
    if array.dtype == np.uint16:
        array = array.astype(np.int32)
    elif not array.flags.writeable or not array.flags.c_contiguous or not array.dtype.isnative:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        if not array.flags.writeable:
            array = array.copy()
    return torch.from_numpy(array).to(device, non_blocking=True)


class Pipeline:
    """An encoder plus the manifest's preprocessing and tiling, and the defect rule; immutable."""

    def __init__(
        self,
        encoder: EncoderLike,
        *,
        defect_classes: Sequence[str | int] | None = None,
        defect_threshold: float = 0.5,
        connectivity: Connectivity = 8,
        max_share: float = DEFAULT_MAX_SHARE,
        max_batch_patches: int = 1024,
    ) -> None:
        if max_batch_patches < 1:
            raise PipelineError(f"max_batch_patches={max_batch_patches} must be at least 1")
        if not 0.0 <= defect_threshold <= 1.0:
            raise PipelineError(f"defect_threshold={defect_threshold} must be in [0, 1] (scores are probabilities)")
        if connectivity not in (4, 8):
            raise PipelineError(f"connectivity={connectivity!r} must be 4 or 8")
        if not 0.0 < max_share <= 1.0:
            raise PipelineError(f"max_share={max_share} must be in (0, 1]: largest share of a frame one region covers")
        m = encoder.manifest
        self.encoder = encoder
        self.manifest = m
        self.max_batch_patches = max_batch_patches
        self._neighbour_cache: dict[tuple[int, int], Array] = {}
        self.model = ModelRef(name=m.name, version=m.version, sha256=encoder.sha256)
        #: where frames are prepared: "cpu" (numpy, no torch needed) or the encoder's torch device (the GPU path)
        self.device: torch.device | Literal["cpu"] = "cpu" if encoder.device == "cpu" else encoder.torch_device
        self.layout: Literal["grid", "points"] = m.tiling.layout
        self.patch: tuple[int, int] = (int(m.patch[0]), int(m.patch[1]))
        self.stride: tuple[int, int] = m.tiling.stride if self.layout == "grid" else (0, 0)
        self.origin: tuple[int, int] = m.tiling.origin if self.layout == "grid" else (0, 0)
        self.n_classes = m.latent.n_classes
        self.latent_dim = m.latent.latent_dim
        self.class_names: tuple[str, ...] = tuple(m.class_names)
        classes = resolve_classes(defect_classes, self.class_names) if defect_classes is not None else None
        stride = getattr(encoder, "frame_stride", None)
        whole = self.layout == "grid" and stride is not None and tuple(stride) == tuple(self.stride)
        #: the encoder of whole frames, when grid frames are encoded whole (in bands of whole grid rows), not cut
        self.frame_encoder: FrameEncoderLike | None = cast(FrameEncoderLike, encoder) if whole else None
        self.rule = DefectRule(
            classes=classes if classes is not None else tuple(m.defect_classes),
            threshold=float(defect_threshold),
            connectivity=connectivity,
            max_share=float(max_share),
        )

    def with_defects(self, *, classes: Sequence[str | int] | None, threshold: float | None) -> Pipeline:
        """A copy with new defect settings (``None`` keeps the current value); same encoder, no reload."""
        return Pipeline(
            self.encoder,
            defect_classes=classes if classes is not None else self.rule.classes,
            defect_threshold=threshold if threshold is not None else self.rule.threshold,
            connectivity=self.rule.connectivity,
            max_share=self.rule.max_share,
            max_batch_patches=self.max_batch_patches,
        )

    # ------------------------------------------------------------------ stages
    def prepare(self, frame: Array) -> PreparedFrame:
        """Frame → normalised frame on the encoder's device and its patches as views (grid or atom-centred)."""
        if frame.ndim != 2:
            raise FrameError(f"frame must be 2-D (H, W), got shape {tuple(frame.shape)}")
        h, w = int(frame.shape[0]), int(frame.shape[1])
        spec, tiling = self.manifest.preprocessing, self.manifest.tiling
        t0 = time.perf_counter()
        centers: np.ndarray | None = None
        grid: tuple[int, int] | None = None
        try:
            normalised = None
            if self.device == "cpu":
                x = to_host(frame)  # a numpy frame (a read-only view on the message, as received) is used as it is
            elif self.layout == "grid" and not is_tensor(frame):
                # a received frame for the GPU is normalised on the host, then uploaded: the same float32 values
                # (prepare_frame's two paths agree), and on an H200 the device's percentile selection (topk and its
                # syncs) took 16 ms of a 1024² frame where numpy takes a few
                x = frame
                normalised = _to_device(prepare_frame(frame, spec), self.device)
            else:
                x = _to_device(frame, self.device)
            if self.layout == "grid":
                if normalised is None:
                    normalised = prepare_frame(x, spec)
                tiles = tile_grid(normalised, self.patch, self.stride, self.origin)
                grid = (int(tiles.shape[0]), int(tiles.shape[1]))
            else:
                found = find_atoms(
                    astype(x, "float32"),
                    sigma=tiling.atom_sigma,
                    min_distance=tiling.atom_min_distance,
                    threshold=tiling.atom_threshold,
                    sublattice=tiling.atom_sublattice,
                )
                tiles, kept = gather_points(prepare_frame(x, spec), found, self.patch)
                centers = to_host(astype(found[kept], "float32"))
        except TilingError as exc:
            raise FrameError(f"a {h}x{w} frame cannot be cut for this model: {exc}") from None
        sync(tiles)
        return PreparedFrame(
            tiles=tiles,
            spec=spec,
            grid=grid,
            centers=centers,
            frame_shape=(h, w),
            tile_s=time.perf_counter() - t0,
            frame=normalised,
        )

    def encode(self, patches: Array, *, observe: Callable[[int, float], None] | None = None) -> dict[str, np.ndarray]:
        """Encoder outputs for ``(N, 1, ph, pw)`` patches, as host numpy arrays, in chunks of ``max_batch_patches``.

        ``observe(batch_size, seconds)`` is called after every encoder call (the service's metrics).
        """
        step = self.max_batch_patches
        chunks = [patches[i : i + step] for i in range(0, len(patches), step)]
        return self.join([self.call_encoder(chunk, observe=observe) for chunk in chunks])

    def call_encoder(
        self, patches: Array, *, observe: Callable[[int, float], None] | None = None
    ) -> dict[str, np.ndarray]:
        """One encoder call on ``patches``; its outputs on the host, as numpy."""
        t0 = time.perf_counter()
        out = self.encoder(patches)
        host = {name: to_host(value) for name, value in out.items()}
        if observe is not None:
            observe(int(patches.shape[0]), time.perf_counter() - t0)
        return host

    @property
    def frames_whole(self) -> bool:
        """Whether grid frames may be encoded whole: the encoder reads frames at this grid's stride."""
        return self.frame_encoder is not None

    def encodes_whole(self, prepared: PreparedFrame) -> bool:
        """Whether this frame's patches are encoded from the frame (``call_frame``) rather than cut: with a frame
        encoder, a grid frame of at least half a batch of patches. Smaller frames are cut and batched with others,
        where one encoder call for several frames saves more than not cutting their few patches."""
        return self.frames_whole and prepared.grid is not None and 2 * prepared.n >= self.max_batch_patches

    def bands(self, prepared: PreparedFrame) -> list[tuple[int, int]]:
        """A grid frame's rows of patches in bands of about ``max_batch_patches`` patches (whole rows, at least
        one): what one ``call_frame`` encodes."""
        if prepared.grid is None:
            raise PipelineError("only a grid frame is encoded in bands of rows")
        gh, gw = prepared.grid
        rows = max(1, self.max_batch_patches // max(gw, 1))
        return [(r, min(gh, r + rows)) for r in range(0, gh, rows)]

    def call_frame(
        self, prepared: PreparedFrame, rows: tuple[int, int], *, observe: Callable[[int, float], None] | None = None
    ) -> dict[str, np.ndarray]:
        """One frame-encoder call on the grid rows ``rows`` of a prepared grid frame: the outputs of its patches in
        row-major order, as ``call_encoder`` on those patches cut out gives them."""
        if prepared.frame is None or prepared.grid is None or self.frame_encoder is None:
            raise PipelineError("call_frame needs a prepared grid frame and an encoder of whole frames")
        (r0, r1), (ph, pw), (sy, sx), (y0, x0) = rows, self.patch, self.stride, self.origin
        gw = prepared.grid[1]
        region = prepared.frame[y0 + r0 * sy : y0 + (r1 - 1) * sy + ph, x0 : x0 + (gw - 1) * sx + pw]
        t0 = time.perf_counter()
        out = self.frame_encoder.encode_frame(to_host(region))
        if observe is not None:
            observe((r1 - r0) * gw, time.perf_counter() - t0)
        return out

    def join(self, calls: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The outputs of consecutive encoder calls as one batch's, in order (empty arrays for no call at all).

        Joined into new arrays, never reused: a frame's maps are views into them.
        """
        if not calls:
            return self.empty_outputs()
        return {name: np.concatenate([c[name] for c in calls]) for name in calls[0]}

    def split(self, outputs: dict[str, np.ndarray], frames: Sequence[PreparedFrame]) -> list[dict[str, np.ndarray]]:
        """A cross-frame batch's outputs → each frame's rows, in order (views)."""
        total = sum(f.n for f in frames)
        rows = {len(v) for v in outputs.values()}
        if rows != {total}:
            raise PipelineError(f"outputs of {sorted(rows)} rows do not hold the {total} patches of these frames")
        ends = np.cumsum([0] + [f.n for f in frames]).tolist()
        return [slice_outputs(outputs, a, b) for a, b in itertools.pairwise(ends)]

    def empty_outputs(self) -> dict[str, np.ndarray]:
        k, d = self.n_classes, self.latent_dim
        out = {"z_loc": np.zeros((0, d), np.float32), "z_scale": np.zeros((0, d), np.float32)}
        if k > 0:
            out["class_logits"] = np.zeros((0, k), np.float32)
            out["class_prob"] = np.zeros((0, k), np.float32)
        if self.manifest.latent.rotation:
            out["angle"] = np.zeros((0,), np.float32)
        if self.manifest.latent.translation:
            out["shift"] = np.zeros((0, 2), np.float32)
        if self.manifest.latent.reconstruction_pixels:
            out["recon_nll"] = np.zeros((0,), np.float32)
            out["recon_residual"] = np.zeros((0, self.manifest.latent.reconstruction_pixels), np.float32)
        return out

    def assemble(self, prepared: PreparedFrame, outputs: dict[str, np.ndarray]) -> FrameMaps:
        """One frame's outputs (``prepared.n`` rows) → maps in DESIGN.md's order and defect regions."""
        n, k, d = prepared.n, self.n_classes, self.latent_dim
        lead: tuple[int, ...] = prepared.grid if prepared.grid is not None else (n,)
        if math.prod(lead) != n:
            raise PipelineError(f"layout {lead} does not hold the frame's {n} patches")
        if k > 0:
            prob = np.asarray(outputs["class_prob"], dtype=np.float32).reshape(n, k)
            cls = prob.argmax(axis=-1).astype(np.uint8)
        else:
            prob = np.zeros((n, 0), np.float32)
            cls = np.zeros(n, np.uint8)
        if prepared.grid is not None:
            centres = grid_centres(prepared.grid, self.patch, self.stride, self.origin)
        else:
            centres = prepared.centers if prepared.centers is not None else np.zeros((0, 2), np.float32)
        score, kind = self.score(outputs, prob, prepared.grid, centres)
        arrays: dict[str, np.ndarray] = {
            "class": cls.reshape(lead),
            "class_prob": prob.reshape((*lead, k)),
            "z": np.asarray(outputs["z_loc"], dtype=np.float32).reshape((*lead, d)),
        }
        if self.manifest.latent.rotation:
            arrays["angle"] = np.asarray(outputs["angle"], dtype=np.float32).reshape(lead)
        if self.manifest.latent.translation:
            arrays["shift"] = np.asarray(outputs["shift"], dtype=np.float32).reshape((*lead, 2))
        arrays["defect_score"] = score.reshape(lead)
        rule = self.rule
        mask = defect_mask(cls, score, rule)
        # withheld or not by the whole connected region; published one defect per score peak in it
        if prepared.grid is not None:
            regions = grid_regions(mask.reshape(prepared.grid), rule.connectivity)
            keep, note = publishable(regions, rule.max_share)
            peaks = grid_peaks(
                regions,
                score.reshape(lead),
                centres,
                patch=self.patch,
                threshold=rule.threshold,
                connectivity=rule.connectivity,
                split=keep,
            )
        else:
            regions = point_regions(mask, centres)
            keep, note = publishable(regions, rule.max_share)
            peaks = point_peaks(regions, score, centres, patch=self.patch, threshold=rule.threshold, split=keep)
            arrays["centers"] = centres.astype(np.float32)
        defects = regions_to_defects(
            peaks,
            centres,
            cls.reshape(lead),
            score.reshape(lead),
            kind=kind,
            keep=keep[peaks.region],
            threshold=rule.threshold,
        )
        return FrameMaps(
            layout=self.layout,
            grid=prepared.grid,
            patch=self.patch,
            stride=self.stride,
            origin=self.origin,
            n_classes=k,
            latent_dim=d,
            class_names=self.class_names,
            model=self.model,
            arrays={name: np.ascontiguousarray(arrays[name]) for name in ARRAY_ORDER if name in arrays},
            defects=defects,
            defects_note=note,
        )

    def _grid_neighbours(self, grid: tuple[int, int]) -> Array:
        """The neighbour index of a grid, on the scoring device, built once per grid shape: a scan sends frames of
        one size, and rebuilding (and, on a GPU, uploading) the same index every frame was a per-frame cost."""
        cached = self._neighbour_cache.get(grid)
        if cached is None:
            stats = self.manifest.novelty
            index = grid_neighbours(grid, stats.grid_step, stats.grid_span) if stats else grid_neighbours(grid, 1)
            index.setflags(write=False)  # shared by every frame of this shape: nobody may write to it
            cached = index if self.device == "cpu" else _to_device(index, self.device)
            if len(self._neighbour_cache) >= _NEIGHBOUR_CACHE:
                self._neighbour_cache.pop(next(iter(self._neighbour_cache)))
            self._neighbour_cache[grid] = cached
        return cached

    def score(
        self, outputs: dict[str, np.ndarray], prob: np.ndarray, grid: tuple[int, int] | None, centres: np.ndarray
    ) -> tuple[np.ndarray, str]:
        """``(defect score (n,), its kind)``: the defect classes' probability when classes are designated, else the
        manifest's calibrated novelty score (``streamer.maps.novelty``; self-calibrated contrast without statistics)."""
        if self.rule.classes:
            return class_score(prob, self.rule.classes), "class"
        stats = self.manifest.novelty
        features, parts = encoder_features(outputs), part_features(outputs)
        neighbours: Array = (
            self._grid_neighbours(grid)
            if grid is not None
            else point_neighbours(centres, stats.neighbours if stats is not None else 6)
        )
        if self.device != "cpu":
            # scored on the encoder's device, in the same float64 arithmetic: on an H200 the host's per-frame
            # medians were 80 % of the encoder thread's time and held the stream to 6 % of the bare encoder
            features = _to_device(features, self.device)
            if grid is None:
                neighbours = _to_device(neighbours, self.device)
            parts = {name: _to_device(a, self.device) for name, a in parts.items()}
        score = to_host(novelty_score(features, neighbours, stats, parts))
        return score, stats.kind if stats is not None else "contrast"

    def process(self, frame: Array) -> FrameMaps:
        """One frame, all stages: the offline reference for the service."""
        prepared = self.prepare(frame)
        if self.encodes_whole(prepared):
            return self.assemble(prepared, self.join([self.call_frame(prepared, b) for b in self.bands(prepared)]))
        return self.assemble(prepared, self.encode(prepared.patches))
