"""Every reader round-trips a real file written here, and every bad input gets a ScanFormatError naming it."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from sim.formats import Scan, ScanFormatError, read_scan

STACK = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)  # awkward shape on purpose


def _check(scan: Scan, expected: np.ndarray, source: str) -> None:
    assert isinstance(scan.frames, np.ndarray) and scan.frames.ndim == 3
    np.testing.assert_array_equal(scan.frames, expected if expected.ndim == 3 else expected[None])
    assert scan.frames.dtype == expected.dtype
    assert scan.meta["source"] == source and len(scan) == scan.frames.shape[0]


def test_npy_stack_and_single_frame(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", STACK)
    np.save(tmp_path / "one.npy", STACK[0].astype(np.uint16))
    scan = read_scan(tmp_path / "s.npy")
    _check(scan, STACK, "npy")
    assert isinstance(scan.frames, np.memmap)  # large recordings are not read up front
    assert scan.meta["pixel_size"] is None and scan.meta["path"] == str(tmp_path / "s.npy")
    _check(read_scan(tmp_path / "one.npy"), STACK[0].astype(np.uint16), "npy")


def test_npz_keys_and_metadata(tmp_path: Path) -> None:
    np.savez(tmp_path / "single.npz", whatever=STACK)
    _check(read_scan(tmp_path / "single.npz"), STACK, "npz")
    np.savez(tmp_path / "many.npz", labels=np.arange(3), frames=STACK, pixel_size=np.float64(0.2), unit=np.str_("nm"))
    scan = read_scan(tmp_path / "many.npz")
    _check(scan, STACK, "npz")
    assert scan.meta["pixel_size"] == pytest.approx(0.2) and scan.meta["unit"] == "nm"
    _check(read_scan(tmp_path / "many.npz", dataset="frames"), STACK, "npz")
    np.savez(tmp_path / "ambiguous.npz", a=STACK, b=STACK)
    with pytest.raises(ScanFormatError, match=r"ambiguous\.npz.*pass dataset="):
        read_scan(tmp_path / "ambiguous.npz")
    with pytest.raises(ScanFormatError, match=r"no array 'c'.*\['a', 'b'\]"):
        read_scan(tmp_path / "ambiguous.npz", dataset="c")


def test_tiff_stack_with_pixel_size(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "s.tif", STACK, imagej=True, resolution=(1 / 0.25, 1 / 0.25), metadata={"unit": "nm"})
    scan = read_scan(tmp_path / "s.tif")
    _check(scan, STACK, "tif")
    assert scan.meta["pixel_size"] == pytest.approx(0.25) and scan.meta["unit"] == "nm"
    tifffile.imwrite(tmp_path / "one.tiff", STACK[0].astype(np.uint16))
    _check(read_scan(tmp_path / "one.tiff"), STACK[0].astype(np.uint16), "tiff")


def test_hdf5_dataset_paths_and_attributes(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "s.h5", "w") as f:
        ds = f.create_dataset("entry/scan/frames", data=STACK)
        ds.attrs["pixel_size"] = 0.5
        ds.attrs["unit"] = "Å"
        f.create_dataset("entry/scan/dark", data=STACK[0])
    scan = read_scan(tmp_path / "s.h5")  # several datasets, one called frames
    _check(scan, STACK, "h5")
    assert scan.meta["pixel_size"] == 0.5 and scan.meta["unit"] == "Å" and scan.meta["dataset"] == "entry/scan/frames"
    _check(read_scan(tmp_path / "s.h5", dataset="/entry/scan/dark"), STACK[0], "h5")
    with pytest.raises(ScanFormatError, match=r"s\.h5: no dataset 'entry/nope'"):
        read_scan(tmp_path / "s.h5", dataset="entry/nope")


def test_emd_through_rosettasciio(tmp_path: Path) -> None:
    emd = pytest.importorskip("rsciio.emd", reason="the formats extra (rosettasciio) is not installed")
    axes = [
        {"name": "t", "units": "", "index_in_array": 0, "size": 3, "offset": 0.0, "scale": 1.0, "navigate": True},
        {"name": "y", "units": "nm", "index_in_array": 1, "size": 5, "offset": 0.0, "scale": 0.1, "navigate": False},
        {"name": "x", "units": "nm", "index_in_array": 2, "size": 7, "offset": 0.0, "scale": 0.1, "navigate": False},
    ]
    signal = {
        "data": STACK,
        "axes": axes,
        "metadata": {"General": {"title": "scan"}, "Signal": {}},
        "original_metadata": {},
    }
    emd.file_writer(str(tmp_path / "s.emd"), signal)
    scan = read_scan(tmp_path / "s.emd")
    _check(scan, STACK, "emd")
    assert scan.meta["pixel_size"] == pytest.approx(0.1) and scan.meta["unit"] == "nm"
    _check(read_scan(tmp_path / "s.emd", dataset="scan"), STACK, "emd")


def test_missing_extra_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.dm4").write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", None)  # import now raises ImportError
    with pytest.raises(ScanFormatError, match=r"s\.dm4: .*pip install 'atomstream\[formats\]'"):
        read_scan(tmp_path / "s.dm4")
    tifffile.imwrite(tmp_path / "s.tif", STACK, photometric="minisblack")
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(ScanFormatError, match=r"needs tifffile: pip install 'atomstream\[formats\]'"):
        read_scan(tmp_path / "s.tif")


@pytest.mark.parametrize(
    ("name", "writer", "match"),
    [
        ("absent.npy", None, "no such file"),
        ("s.xyz", lambda p: p.write_bytes(b"data"), "unknown scan format '.xyz'"),
        ("s.npy", lambda p: np.save(p, np.zeros((2, 3, 4, 5))), r"shape \(2, 3, 4, 5\) is 4-D"),
        ("s.npy", lambda p: np.save(p, np.zeros(5)), "is 1-D"),
        ("s.npy", lambda p: np.save(p, np.zeros((2, 3), complex)), "complex128 is not a real number type"),
        ("s.npy", lambda p: np.save(p, np.array([{"a": 1}]), allow_pickle=True), "not a plain numeric"),
        ("s.npy", lambda p: np.save(p, np.zeros((0, 3, 4))), "empty stack"),
        ("s.h5", lambda p: p.write_bytes(b"not hdf5 at all"), "not a readable HDF5"),
        ("s.tif", lambda p: p.write_bytes(b"not a tiff"), "not a readable TIFF"),
        ("s.tif", lambda p: tifffile.imwrite(p, np.zeros((4, 5, 3), np.uint8), photometric="rgb"), "colour"),
        ("s.npz", lambda p: p.write_bytes(b"PK garbage"), "not a readable .npz"),
    ],
)
def test_bad_inputs_are_named(tmp_path: Path, name: str, writer: object, match: str) -> None:
    path = tmp_path / name
    if callable(writer):
        writer(path)
    with pytest.raises(ScanFormatError, match=match) as info:
        read_scan(path)
    assert str(path) in str(info.value)
