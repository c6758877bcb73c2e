"""One binary message per update: a JSON header, then raw little-endian arrays, each 8-byte aligned.

Layout (what ``static/view.js`` reads)::

    uint32 LE   n           length of the JSON header in bytes
    n bytes     header      UTF-8 JSON; header["arrays"] = [{"name", "dtype", "shape", "offset"}, ...]
    padding                 zeros up to a multiple of 8
    buffers                 array k starts ``offset`` bytes after the end of the padding

Maps of a 64×64 grid are 4 kB (class) or 16 kB (float32) each, so a whole update is tens of kB: far less than the
PNGs or JSON number lists the browser would otherwise be sent, and a ``Float32Array`` view costs the page no parsing.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

__all__ = ["SNAPSHOT_DTYPES", "decode_snapshot", "encode_snapshot"]

SNAPSHOT_DTYPES = ("uint8", "float32")


def _pad(n: int) -> int:
    return (-n) % 8


def encode_snapshot(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """``header`` plus ``arrays`` (uint8 or float32, any shape) as one message; see the module docstring."""
    specs, buffers, offset = [], [], 0
    for name, array in arrays.items():
        a = np.ascontiguousarray(array)
        if a.dtype.name not in SNAPSHOT_DTYPES:
            raise ValueError(f"array {name!r} has dtype {a.dtype.name}; the page reads {', '.join(SNAPSHOT_DTYPES)}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        specs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset})
        raw = a.tobytes()
        buffers.append(raw + b"\0" * _pad(len(raw)))
        offset += len(raw) + _pad(len(raw))
    text = json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode()
    head = struct.pack("<I", len(text)) + text
    return head + b"\0" * _pad(len(head)) + b"".join(buffers)


def decode_snapshot(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The exact inverse of :func:`encode_snapshot` (for tests and Python consumers)."""
    (n,) = struct.unpack_from("<I", data, 0)
    header = json.loads(data[4 : 4 + n].decode())
    start = 4 + n + _pad(4 + n)
    arrays = {}
    for spec in header.pop("arrays"):
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        count = int(np.prod(spec["shape"], dtype=np.int64))
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=start + spec["offset"])
        arrays[spec["name"]] = flat.reshape(spec["shape"])
    return header, arrays
