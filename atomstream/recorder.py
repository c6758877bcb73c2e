"""``atomstream record``'s writer: what the service publishes, into one HDF5 file a microscopist opens later.

Layout (docs/recording.md has the full table)::

    /                               attrs: format="atomstream-record", format_version, endpoint, created, software
    /models/<k>                     one group per model seen (a reload adds one): attrs name, version, sha256,
                                    class_names, n_classes, latent_dim, and manifest (JSON) when --artifact matches
    /scans/<scan_id>/               attrs: scan_id, layout, patch, stride, origin, class_names, pixel_size, pixel_unit,
                                    and the service's scan_summary counts once it arrives
        frame_id, seq, t_acq_ns, t_recv_ns, t_pub_ns, model   (N,) one row per recorded frame, in arrival order
        class, class_prob, z, angle, shift, defect_score      (N, gh, gw[, C]) maps, as published
        y, x                        (gh,), (gw,) patch centres in frame pixels: dimension scales of the maps
        y_calibrated, x_calibrated  the same times pixel_size (in pixel_unit), when the frames carried one
        defects                     (M,) compound: frame_id, y, x, y_calibrated, x_calibrated, class, score, area
    /errors                         (E,) compound: scan_id, frame_id (-1: none), reason, detail

Maps are appended frame by frame into chunked, resizable datasets (one chunk per frame), so a long recording never
sits in memory and a file cut short by a crash still holds every flushed frame. The points layout (atom-centred
patches, a different N per frame) is stored flat with ``offsets`` (N+1,) into the first axis, and ``centers``.
A frame whose grid or array set differs from its scan's first frame (the frame size changed mid-scan) starts a new
group ``<scan_id>~<k>``: arrays of different shapes cannot share a dataset.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

__all__ = ["FORMAT", "FORMAT_VERSION", "Recorder", "RecorderError"]

FORMAT = "atomstream-record"
FORMAT_VERSION = 1
_PER_FRAME = ("frame_id", "seq", "t_acq_ns", "t_recv_ns", "t_pub_ns", "model")
_UNITS = {"angle": "rad", "defect_score": "1", "class_prob": "1", "z": "latent units", "shift": "px"}


class RecorderError(RuntimeError):
    """The file cannot be written as asked (exists without overwrite, not HDF5); the message says which."""


def _str_dtype() -> Any:
    import h5py

    return h5py.string_dtype()


class _ScanGroup:
    """One scan's datasets, grown a frame at a time."""

    def __init__(self, group: Any, msg: Any, arrays: dict[str, np.ndarray]) -> None:
        self.g = group
        self.layout = msg.layout
        self.signature = (msg.layout, tuple(msg.grid or ()), tuple(sorted(arrays)))
        self.n = 0
        self.n_points = 0
        g = group
        g.attrs.update(
            {
                "scan_id": msg.scan_id,
                "layout": msg.layout,
                "patch": msg.patch,
                "stride": msg.stride,
                "origin": msg.origin,
                "class_names": list(msg.class_names),
                "pixel_unit": msg.pixel_unit or "",
                "pixel_size": np.nan if msg.pixel_size is None else msg.pixel_size,
            }
        )
        for name in _PER_FRAME:
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int64", chunks=(1024,))
        for name, a in arrays.items():
            shape = (0, *a.shape) if self.layout == "grid" else (0, *a.shape[1:])
            chunks = (1, *a.shape) if self.layout == "grid" else (max(1, a.shape[0]) * 4, *a.shape[1:])
            ds = g.create_dataset(
                name, shape=shape, maxshape=(None, *shape[1:]), dtype=a.dtype, chunks=chunks, compression="gzip"
            )
            ds.attrs["units"] = _UNITS.get(name, "")
        if self.layout == "points":
            g.create_dataset("offsets", data=np.zeros(1, dtype="int64"), maxshape=(None,), chunks=(1024,))
        defect_dtype = np.dtype(
            [
                ("frame_id", "i8"),
                ("y", "f8"),
                ("x", "f8"),
                ("y_calibrated", "f8"),
                ("x_calibrated", "f8"),
                ("class", "i4"),
                ("score", "f4"),
                ("area", "i4"),
            ]
        )
        g.create_dataset("defects", shape=(0,), maxshape=(None,), dtype=defect_dtype, chunks=(1024,))
        if self.layout == "grid" and msg.grid:
            self._axes(msg, arrays)

    def _axes(self, msg: Any, arrays: dict[str, np.ndarray]) -> None:
        """Patch-centre coordinates as HDF5 dimension scales, so readers (h5py, HyperSpy users) get real axes."""
        (gh, gw), (ph, pw), (sy, sx), (y0, x0) = msg.grid, msg.patch, msg.stride, msg.origin
        axes = {"y": y0 + np.arange(gh) * sy + (ph - 1) / 2, "x": x0 + np.arange(gw) * sx + (pw - 1) / 2}
        scales = {}
        for name, values in axes.items():
            scales[name] = self.g.create_dataset(name, data=values)
            scales[name].attrs["units"] = "px"
            scales[name].make_scale(f"{name} (frame pixels)")
            if msg.pixel_size is not None:
                cal = self.g.create_dataset(f"{name}_calibrated", data=values * msg.pixel_size)
                cal.attrs["units"] = msg.pixel_unit or ""
                cal.make_scale(f"{name} ({msg.pixel_unit or 'calibrated'})")
                scales[f"{name}_calibrated"] = cal
        frame_scale = self.g["frame_id"]
        frame_scale.make_scale("frame_id")
        for name in arrays:
            ds = self.g[name]
            ds.dims[0].label = "frame"
            ds.dims[0].attach_scale(frame_scale)
            for dim, axis in ((1, "y"), (2, "x")):
                ds.dims[dim].label = axis
                for key in (axis, f"{axis}_calibrated"):
                    if key in scales:
                        ds.dims[dim].attach_scale(scales[key])
            if ds.ndim == 4:
                ds.dims[3].label = {"class_prob": "class", "z": "latent", "shift": "dy, dx"}.get(name, "channel")

    def append(self, msg: Any, arrays: dict[str, np.ndarray], model_index: int) -> None:
        k = self.n
        row = (msg.frame_id, msg.seq, -1 if msg.t_acq_ns is None else msg.t_acq_ns, msg.t_recv_ns, msg.t_pub_ns)
        for name, value in zip(_PER_FRAME, (*row, model_index), strict=True):
            ds = self.g[name]
            ds.resize((k + 1,))
            ds[k] = value
        if self.layout == "grid":
            for name, a in arrays.items():
                ds = self.g[name]
                ds.resize((k + 1, *ds.shape[1:]))
                ds[k] = a
        else:
            m = next(iter(arrays.values())).shape[0]
            for name, a in arrays.items():
                ds = self.g[name]
                ds.resize((self.n_points + m, *ds.shape[1:]))
                ds[self.n_points :] = a
            self.n_points += m
            offsets = self.g["offsets"]
            offsets.resize((k + 2,))
            offsets[k + 1] = self.n_points
        self.n = k + 1

    def add_defects(self, msg: Any) -> None:
        if not msg.defects:
            return
        size = np.nan if msg.pixel_size is None else msg.pixel_size
        rows = np.array(
            [(msg.frame_id, d.y, d.x, d.y * size, d.x * size, d.class_, d.score, d.area) for d in msg.defects],
            dtype=self.g["defects"].dtype,
        )
        ds = self.g["defects"]
        start = ds.shape[0]
        ds.resize((start + len(rows),))
        ds[start:] = rows


class Recorder:
    """Writes published messages (``streamer.wire.client.Received``) into one HDF5 file; a context manager."""

    def __init__(
        self,
        path: str | Path,
        *,
        endpoint: str = "",
        overwrite: bool = False,
        manifest: dict[str, Any] | None = None,
        manifest_sha256: str | None = None,
    ) -> None:
        try:
            import h5py
        except ImportError:
            raise RecorderError("recording needs h5py: pip install 'atomstream[formats]'") from None
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise RecorderError(f"{self.path} exists; pass --force (overwrite=True) to replace it, or pick a new name")
        self._manifest = manifest
        self._manifest_sha256 = manifest_sha256  # the model identity maps carry (sha256 of manifest.json)
        self._h5 = h5py.File(self.path, "w")
        self._h5.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "endpoint": endpoint,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "software": f"atomstream {_version()}",
            }
        )
        self._models: dict[tuple[str, str, str], int] = {}
        self._scans: dict[str, list[_ScanGroup]] = {}
        self._errors = self._h5.create_dataset(
            "errors",
            shape=(0,),
            maxshape=(None,),
            chunks=(256,),
            dtype=np.dtype(
                [("scan_id", _str_dtype()), ("frame_id", "i8"), ("reason", _str_dtype()), ("detail", _str_dtype())]
            ),
        )
        self.frames = 0
        self.defects = 0
        self.errors = 0
        self.summaries = 0
        self.unmatched_manifest = False

    # ------------------------------------------------------------------ writing
    def _model(self, msg: Any) -> int:
        key = (msg.model.name, msg.model.version, msg.model.sha256)
        if key not in self._models:
            k = len(self._models)
            g = self._h5.require_group("models").create_group(str(k))
            g.attrs.update(
                {
                    "name": key[0],
                    "version": key[1],
                    "sha256": key[2],
                    "class_names": list(msg.class_names),
                    "n_classes": msg.n_classes,
                    "latent_dim": msg.latent_dim,
                }
            )
            if self._manifest is not None:
                shas = {f.get("sha256") for f in self._manifest.get("files", {}).values() if isinstance(f, dict)}
                if key[2] == self._manifest_sha256 or key[2] in shas:  # identity now; a file hash from older services
                    g.attrs["manifest"] = json.dumps(self._manifest)
                else:
                    self.unmatched_manifest = True
            self._models[key] = k
        return self._models[key]

    def _group_for(self, msg: Any, arrays: dict[str, np.ndarray]) -> _ScanGroup:
        groups = self._scans.setdefault(msg.scan_id, [])
        signature = (msg.layout, tuple(msg.grid or ()), tuple(sorted(arrays)))
        for group in groups:
            if group.signature == signature:
                return group
        name = msg.scan_id if not groups else f"{msg.scan_id}~{len(groups)}"
        group = _ScanGroup(self._h5.require_group("scans").create_group(name.replace("/", "_")), msg, arrays)
        groups.append(group)
        return group

    def add(self, received: Any) -> None:
        """Record one message: maps, defects, errors and scan summaries; other topics are ignored."""
        topic, msg = received.topic, received.msg
        if topic == "maps":
            arrays = {name: np.asarray(a) for name, a in received.arrays.items()}
            self._group_for(msg, arrays).append(msg, arrays, self._model(msg))
            self.frames += 1
        elif topic == "defects":
            groups = self._scans.get(msg.scan_id)
            if groups:
                groups[-1].add_defects(msg)
                self.defects += len(msg.defects)
        elif topic == "error":
            k = self._errors.shape[0]
            self._errors.resize((k + 1,))
            fid = -1 if msg.frame_id is None else msg.frame_id
            self._errors[k] = (msg.scan_id or "", fid, msg.reason, msg.detail)
            self.errors += 1
        elif topic == "scan_summary":
            for group in self._scans.get(msg.scan_id, []):
                group.g.attrs.update(
                    {
                        "frames_received": msg.frames_received,
                        "frames_published": msg.frames_published,
                        "frames_rejected": msg.frames_rejected,
                        "frames_dropped": msg.frames_dropped,
                        "n_frames": -1 if msg.n_frames is None else msg.n_frames,
                    }
                )
            self.summaries += 1
            self._h5.flush()

    def flush(self) -> None:
        self._h5.flush()

    def close(self) -> None:
        if self._h5.id.valid:
            self._h5.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _version() -> str:
    from atomstream import __version__

    return str(__version__)
