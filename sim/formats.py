"""Readers for recorded scans: one call, :func:`read_scan`, whatever the file, giving frames N×H×W plus metadata.

Chosen by file extension:

* ``.npy`` — memory-mapped (``Scan.frames`` is a read-only ``np.memmap``), so a large recording is not read up front;
* ``.npz`` — ``dataset`` names the key; by default the only array, else ``frames``, else ``images``; an optional
  ``pixel_size`` (scalar) and ``unit`` (string) array are picked up as metadata;
* ``.tif``/``.tiff`` — tifffile; pixel size from ImageJ/resolution tags where present;
* ``.h5``/``.hdf5``/``.hdf`` — h5py; ``dataset`` is the path inside the file, by default the only dataset, else
  ``frames``/``images``/``data``; ``pixel_size``/``unit`` attributes of the dataset are picked up;
* ``.dm3``/``.dm4``/``.emd``/``.ser``/``.emi``/``.mrc``/``.blo``/``.hspy``/``.mib`` — RosettaSciIO, with ``dataset``
  selecting a signal by title or index when a file holds several.

Everything but ``.npy``/``.npz`` needs the ``formats`` extra; without it the error says so. The other readers load
the frames into memory. A 2-D image becomes a one-frame scan; anything that is not 2-D or 3-D real numbers is refused.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Scan", "ScanFormatError", "read_scan", "supported_extensions"]

_DEFAULT_KEYS = ("frames", "images", "data")
_RSCIIO = {
    ".dm3": "digitalmicrograph",
    ".dm4": "digitalmicrograph",
    ".emd": "emd",
    ".ser": "tia",
    ".emi": "tia",
    ".mrc": "mrc",
    ".blo": "blockfile",
    ".hspy": "hspy",
    ".mib": "quantumdetector",
}
_EXTRA_HINT = "pip install 'atomstream[formats]'"


class ScanFormatError(ValueError):
    """A recorded scan could not be read; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class Scan:
    """Frames (N, H, W) and metadata: ``source`` (reader), ``path``, ``pixel_size`` (float or None), ``unit``, and
    ``converted`` when the file held colour images that were read as grey (the note says how)."""

    frames: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def supported_extensions() -> tuple[str, ...]:
    return (".npy", ".npz", ".tif", ".tiff", ".h5", ".hdf5", ".hdf", *_RSCIIO)


def read_scan(path: str | PathLike[str], *, dataset: str | None = None) -> Scan:
    """Read a recorded scan; raises :class:`ScanFormatError` for a missing file, unknown format, missing dataset,
    or data that is not a real-valued 2-D image or 3-D stack."""
    p = Path(path)
    if not p.is_file():
        raise ScanFormatError(f"{p}: no such file")
    ext = p.suffix.lower()
    if ext == ".npy":
        frames, meta = _read_npy(p), {}
    elif ext == ".npz":
        frames, meta = _read_npz(p, dataset)
    elif ext in (".tif", ".tiff"):
        frames, meta = _read_tiff(p)
    elif ext in (".h5", ".hdf5", ".hdf"):
        frames, meta = _read_h5(p, dataset)
    elif ext in _RSCIIO:
        frames, meta = _read_rsciio(p, _RSCIIO[ext], dataset)
    else:
        known = ", ".join(supported_extensions())
        raise ScanFormatError(f"{p}: unknown scan format {ext or '(no extension)'!r}; known: {known}")
    meta = {"pixel_size": None, "unit": None, **meta, "source": meta.get("source", ext.lstrip(".")), "path": str(p)}
    stack, note = _as_stack(p, frames)
    if note:
        meta["converted"] = note
    return Scan(frames=stack, meta=meta)


#: ITU-R BT.601 luma weights: how an RGB picture of a grey-scale micrograph becomes grey again
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _rgb_to_grey(p: Path, data: np.ndarray) -> tuple[np.ndarray, str] | None:
    """An RGB(A) image (H, W, 3|4) or stack (N, H, W, 3|4) as grey frames, with a note saying so; else None.

    Read as they are, the channels of a (256, 256, 3) picture would become 256 frames of 256×3 pixels; no scan has
    frames three pixels wide, so a last axis of 3 or 4 behind a wider one is taken as colour.
    """
    rgb_image = data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[1] > 4
    rgb_stack = data.ndim == 4 and data.shape[-1] in (3, 4)
    if not (rgb_image or rgb_stack):
        return None
    grey = np.asarray(data[..., :3], dtype=np.float32) @ _LUMA
    what = "an RGB image" if data.shape[-1] == 3 else "an RGBA image"
    frames = "one grey frame" if rgb_image else f"{grey.shape[0]} grey frames"
    return grey, f"{what} of shape {data.shape}: read as {frames} (luminance 0.299 R + 0.587 G + 0.114 B)"


def _as_stack(p: Path, data: np.ndarray) -> tuple[np.ndarray, str | None]:
    if data.dtype.kind not in "uif":
        raise ScanFormatError(f"{p}: data type {data.dtype} is not a real number type (need int/uint/float)")
    converted = _rgb_to_grey(p, data)
    if converted is not None:
        return _stack(p, converted[0]), converted[1]
    return _stack(p, data), None


def _stack(p: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 2:
        return data[None]
    if data.ndim == 3:
        if 0 in data.shape:
            raise ScanFormatError(f"{p}: empty stack of shape {data.shape}")
        return data
    raise ScanFormatError(f"{p}: data of shape {data.shape} is {data.ndim}-D; need a 2-D frame or a 3-D stack")


def _require(module: str, p: Path) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ScanFormatError(f"{p}: reading this format needs {module.split('.')[0]}: {_EXTRA_HINT}") from exc


def _read_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ScanFormatError(f"{p}: not a plain numeric .npy array ({exc})") from exc


def _pick(p: Path, keys: list[str], dataset: str | None, what: str) -> str:
    if dataset is not None:
        if dataset not in keys:
            raise ScanFormatError(f"{p}: no {what} {dataset!r}; the file holds {keys}")
        return dataset
    if len(keys) == 1:
        return keys[0]
    for k in _DEFAULT_KEYS:
        hits = [key for key in keys if key.rsplit("/", 1)[-1] == k]  # "entry/scan/frames" counts as frames
        if len(hits) == 1:
            return hits[0]
    raise ScanFormatError(f"{p}: several {what}s {keys} and none is called frames/images/data; pass dataset=")


def _read_npz(p: Path, dataset: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ScanFormatError(f"{p}: not a readable .npz archive ({exc})") from exc
    with z:
        meta_keys = {"pixel_size", "unit"}
        keys = [k for k in z.files if k not in meta_keys or k == dataset]
        try:
            data = z[_pick(p, keys, dataset, "array")]
        except ValueError as exc:
            raise ScanFormatError(f"{p}: array {dataset!r} is not plain numeric data ({exc})") from exc
        meta: dict[str, Any] = {}
        if "pixel_size" in z.files and z["pixel_size"].size == 1:
            meta["pixel_size"] = float(z["pixel_size"])
        if "unit" in z.files and z["unit"].size == 1:
            meta["unit"] = str(z["unit"])
    return data, meta


def _read_tiff(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    tifffile = _require("tifffile", p)
    try:
        with tifffile.TiffFile(p) as tif:
            series = tif.series[0]
            if "S" in series.axes:
                raise ScanFormatError(f"{p}: colour/multi-sample TIFF (axes {series.axes}); need greyscale frames")
            data = series.asarray()
            meta: dict[str, Any] = {}
            ij = tif.imagej_metadata or {}
            page = tif.pages.first
            res = page.tags.get("XResolution")
            if res is not None:
                num, den = res.value
                if num > 0 and den > 0 and (num, den) != (1, 1):
                    meta["pixel_size"] = den / num
            if "unit" in ij:
                meta["unit"] = str(ij["unit"])
    except tifffile.TiffFileError as exc:
        raise ScanFormatError(f"{p}: not a readable TIFF ({exc})") from exc
    return data, meta


def _read_h5(p: Path, dataset: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    h5py = _require("h5py", p)
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise ScanFormatError(f"{p}: not a readable HDF5 file ({exc})") from exc
    with f:
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        if dataset is not None:
            dataset = dataset.strip("/")
        key = _pick(p, names, dataset, "dataset")
        ds = f[key]
        data = ds[()]
        meta: dict[str, Any] = {"dataset": key}
        if "pixel_size" in ds.attrs:
            meta["pixel_size"] = float(np.asarray(ds.attrs["pixel_size"]).ravel()[0])
        if "unit" in ds.attrs:
            unit = ds.attrs["unit"]
            meta["unit"] = unit.decode() if isinstance(unit, bytes) else str(unit)
    if not isinstance(data, np.ndarray):
        raise ScanFormatError(f"{p}: dataset {key!r} is a scalar, not an image or stack")
    return data, meta


def _read_rsciio(p: Path, module: str, dataset: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    reader = _require(f"rsciio.{module}", p)
    try:
        signals = reader.file_reader(str(p))
    except Exception as exc:  # rsciio raises a variety of exception types for corrupt files
        raise ScanFormatError(f"{p}: RosettaSciIO ({module}) could not read it: {exc}") from exc
    titles = [str(s.get("metadata", {}).get("General", {}).get("title", "")) for s in signals]
    if dataset is not None:
        if dataset in titles:
            sig = signals[titles.index(dataset)]
        elif dataset.isdigit() and int(dataset) < len(signals):
            sig = signals[int(dataset)]
        else:
            raise ScanFormatError(f"{p}: no signal {dataset!r}; titles {titles} or an index < {len(signals)}")
    else:
        images = [s for s in signals if np.ndim(s["data"]) in (2, 3)]
        if not images:
            shapes = [np.shape(s["data"]) for s in signals]
            raise ScanFormatError(f"{p}: no 2-D or 3-D signal; shapes {shapes}")
        sig = images[0]
    data = np.asarray(sig["data"])
    meta: dict[str, Any] = {"source": module, "title": titles[signals.index(sig)] if titles else ""}
    axes = sig.get("axes") or []
    if axes:
        last = axes[-1]
        scale, units = last.get("scale"), last.get("units")
        if scale is not None:
            meta["pixel_size"] = float(scale)
        if units and str(units) not in ("<undefined>", ""):
            meta["unit"] = str(units)
    return data, meta
