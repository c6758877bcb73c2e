"""Wire protocol version 1: the message models and a pure ``encode``/``decode`` pair.

A message is a ZeroMQ multipart message::

    ingest / control:  [header, *buffers]
    publish:           [topic, header, *buffers]

``header`` is a UTF-8 JSON object carrying ``"v": 1`` and ``"kind"``; every array travels as its own raw frame
(C order, little-endian) described in the header — a ``frame`` by its ``dtype`` and ``shape`` fields, a ``maps``
message by its ``arrays`` list. No Python-object serialisation: any producer in any language can speak this.

``encode(msg, *arrays)`` and ``decode(frames)`` are exact inverses and touch no socket, so the whole format is
tested without ZeroMQ. ``encode`` sends contiguous little-endian arrays without copying (their memory is the
frame); ``decode`` returns ``np.frombuffer`` views on the received bytes. ``decode`` is the service's first line of
defence: any bad input raises ``ProtocolError`` with one of the reason codes (docs/architecture.md) and a message
naming the field and value, and nothing is allocated from a declared size before that size has been checked.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError, field_validator

__all__ = [
    "MAX_CONTROL_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_INT_DIGITS",
    "MAX_JSON_DEPTH",
    "PROTOCOL_VERSION",
    "PUBLISH_TOPICS",
    "REASONS",
    "SUPPORTED_DTYPES",
    "ArraySpec",
    "ControlReply",
    "ControlRequest",
    "Defect",
    "Defects",
    "Error",
    "Frame",
    "Maps",
    "Message",
    "ModelRef",
    "ProtocolError",
    "ReloadCommand",
    "ScanEnd",
    "ScanStart",
    "ScanSummary",
    "SetCommand",
    "Status",
    "StatusCommand",
    "decode",
    "decode_control",
    "decode_published",
    "encode",
    "encode_control",
    "encode_published",
    "frame_message",
]

PROTOCOL_VERSION: Final = 1
MAX_HEADER_BYTES: Final = 64 * 1024
#: Default frame limit: a 4096 x 4096 float32 frame, so a few queued frames still fit in memory (``max_frame_bytes``).
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
#: Default limit of one control request (``max_control_bytes``): commands are a few hundred bytes.
MAX_CONTROL_BYTES: Final = 64 * 1024
#: Nesting a header may have: protocol headers nest 3 deep; deeper input would only cost recursion (and crash it).
MAX_JSON_DEPTH: Final = 32
#: Digits an integer may have: int64 needs 19; refusing longer ones before converting them keeps every later
#: product and message cheap (Python refuses to print integers of over 4,300 digits, and that error killed the loop).
MAX_INT_DIGITS: Final = 40
_MAX_DETAIL_CHARS: Final = 1000
SUPPORTED_DTYPES: Final = ("uint8", "uint16", "int16", "int32", "float32", "float64")
PUBLISH_TOPICS: Final = ("maps", "defects", "error", "status", "scan_summary")

Reason = Literal[
    "bad_header",
    "bad_payload",
    "unsupported_dtype",
    "shape_mismatch",
    "non_finite",
    "frame_too_large",
    "overloaded",
    "internal",
]
REASONS: Final = Reason.__args__  # type: ignore[attr-defined]


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``reason`` is one of ``REASONS``.

    ``scan_id`` and ``frame_id`` are filled in whenever the header could be read far enough to name the frame, so the
    ``error`` message the service publishes says which frame was refused.
    """

    def __init__(self, reason: Reason, detail: str, *, scan_id: str | None = None, frame_id: int | None = None):
        if len(detail) > _MAX_DETAIL_CHARS:  # a reply must stay small whatever the header held
            detail = detail[: _MAX_DETAIL_CHARS - 1] + "…"
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail
        self.scan_id = scan_id
        self.frame_id = frame_id


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    v: Literal[1] = PROTOCOL_VERSION


# ---------------------------------------------------------------- ingest


class ScanStart(_Msg):
    kind: Literal["scan_start"] = "scan_start"
    scan_id: str
    meta: dict[str, Any] = Field(default_factory=dict)


#: An integer on the wire must be a JSON integer: ``true`` or ``3.0`` in a frame header is a client bug, and quietly
#: reading them as 1 and 3 would file the frame under a number its sender never meant.
WireInt = Annotated[int, Strict()]


class Frame(_Msg):
    """One scan frame; exactly one buffer of ``prod(shape) * itemsize`` bytes follows the header."""

    kind: Literal["frame"] = "frame"
    scan_id: str = Field(description="the scan this frame belongs to; maps and errors repeat it")
    frame_id: WireInt = Field(ge=0, description="the frame's number within the scan, from 0")
    dtype: str = Field(description="element type of the buffer, one of the supported dtypes")
    shape: list[WireInt] = Field(description="[H, W], positive; the buffer holds H*W*itemsize bytes, C order")
    t_acq_ns: WireInt | None = Field(None, description="acquisition time (ns since the epoch), for latency figures")
    meta: dict[str, Any] = Field(
        default_factory=dict,
        description="free-form (stage position, …); pixel_size (> 0) and pixel_unit (e.g. nm) calibrate the maps",
    )

    @field_validator("meta")
    @classmethod
    def _calibration(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """A pixel size the maps would carry must make sense; refusing it here makes it a ``bad_header`` error."""
        size, unit = meta.get("pixel_size"), meta.get("pixel_unit")
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size <= 0
        ):
            raise ValueError(f"meta.pixel_size must be a finite number > 0 (frame pixel size), got {size!r}")
        if unit is not None and (not isinstance(unit, str) or not unit.strip()):
            raise ValueError(f"meta.pixel_unit must be a non-empty string such as 'nm', got {unit!r}")
        return meta

    @property
    def pixel_size(self) -> float | None:
        size = self.meta.get("pixel_size")
        return None if size is None else float(size)

    @property
    def pixel_unit(self) -> str | None:
        unit = self.meta.get("pixel_unit")
        return None if unit is None else str(unit)


class ScanEnd(_Msg):
    kind: Literal["scan_end"] = "scan_end"
    scan_id: str
    n_frames: WireInt | None = Field(default=None, ge=0)


# ---------------------------------------------------------------- publish


class ArraySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: list[int]

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> ArraySpec:
        return cls(name=name, dtype=array.dtype.name, shape=list(array.shape))


class ModelRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    sha256: str


class Maps(_Msg):
    """Per-frame maps. Grid layout: leading dims ``gh×gw``; points layout: leading dim N plus a ``centers`` array."""

    kind: Literal["maps"] = "maps"
    scan_id: str
    frame_id: int = Field(ge=0)
    seq: int = Field(ge=0, description="messages on this topic since the service started, from 0: gaps show loss")
    layout: Literal["grid", "points"] = Field(description="grid: patches on a regular grid; points: atom-centred")
    grid: list[int] | None = Field(None, description="[gh, gw] for the grid layout")
    patch: list[int] = Field(description="[ph, pw] patch size in frame pixels")
    stride: list[int] = Field(description="[sy, sx]: patch (i, j) starts at row y0+i*sy, column x0+j*sx")
    origin: list[int] = Field(description="[y0, x0] of patch (0, 0)")
    n_classes: int = Field(ge=0)
    latent_dim: int = Field(ge=0)
    class_names: list[str]
    model: ModelRef = Field(description="the model that made these maps (changes after a reload)")
    t_acq_ns: int | None = Field(None, description="copied from the frame")
    t_recv_ns: int = Field(description="when the service received the frame (ns since the epoch)")
    t_pub_ns: int = Field(description="when the service published these maps (ns since the epoch)")
    arrays: list[ArraySpec] = Field(
        description="one buffer follows per entry, in order: class (uint8), class_prob, z, angle, shift, "
        "defect_score, centers (points layout)"
    )
    pixel_size: float | None = Field(None, gt=0, description="frame pixel size in pixel_unit (the frame's meta)")
    pixel_unit: str | None = Field(None, description="unit of pixel_size, e.g. nm (the frame's meta)")


class Defect(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    y: float = Field(description="score-weighted centroid of the defect's patches (one score peak), frame pixels")
    x: float = Field(description="score-weighted centroid of the defect's patches (one score peak), frame pixels")
    class_: int = Field(alias="class", description="majority class of the defect's patches")
    score: float = Field(description="largest defect score of its patches (the peak)")
    area: int = Field(description="patches in the defect: those flagged around its score peak")
    kind: Literal["class", "contrast", "density", "combined", "joint", "residual"] = Field(
        "class",
        description="what the score is: the defect classes' probability, or the calibrated novelty score "
        "(streamer.maps.novelty) of that kind (joint: the decoder's redrawing of the patch against the "
        "neighbours'; residual: its residual only); 0.5 is its calibrated threshold",
    )


class Defects(_Msg):
    kind: Literal["defects"] = "defects"
    scan_id: str
    frame_id: int = Field(ge=0)
    seq: int = Field(ge=0)
    defects: list[Defect]
    note: str | None = Field(None, description="why regions were withheld (over the frame share a defect may cover)")
    pixel_size: float | None = Field(None, gt=0, description="frame pixel size in pixel_unit: y, x times this")
    pixel_unit: str | None = Field(None, description="unit of pixel_size, e.g. nm")


class Error(_Msg):
    kind: Literal["error"] = "error"
    scan_id: str | None = None
    frame_id: int | None = None
    seq: int = Field(0, ge=0)
    reason: Reason = Field(description="short machine-readable code")
    detail: str = Field(description="what was wrong, naming the field and value")


class ScanSummary(_Msg):
    kind: Literal["scan_summary"] = "scan_summary"
    scan_id: str
    seq: int = Field(0, ge=0)
    n_frames: int | None = None
    frames_received: int
    frames_published: int
    frames_rejected: int
    frames_dropped: int


class Status(_Msg):
    kind: Literal["status"] = "status"
    seq: int = Field(0, ge=0)
    uptime_s: float
    frames_received: int
    frames_published: int
    frames_rejected: int
    frames_dropped: int
    queue_depth: int
    model: ModelRef | None
    backend: str
    device: str
    scan_summary: ScanSummary | None = Field(
        None,
        description="the last scan_summary published, repeated on every heartbeat until the next scan starts: a "
        "subscriber that lost the message itself still learns the totals",
    )


Message = Annotated[
    Union[ScanStart, Frame, ScanEnd, Maps, Defects, Error, Status, ScanSummary],  # noqa: UP007
    Field(discriminator="kind"),
]
_MESSAGE: TypeAdapter[Any] = TypeAdapter(Message)
_KINDS: Final = ("scan_start", "frame", "scan_end", "maps", "defects", "error", "status", "scan_summary")

# ---------------------------------------------------------------- control


class StatusCommand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    cmd: Literal["status"] = "status"


class ReloadCommand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    cmd: Literal["reload"] = "reload"
    artifact: str = Field(max_length=4096, description="artifact directory, under one of the service's artifact_roots")


class SetCommand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    cmd: Literal["set"] = "set"
    defect_classes: list[str | int] | None = Field(default=None, max_length=1024)
    defect_threshold: float | None = Field(default=None, ge=0, le=1)


class ControlReply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")
    ok: bool
    detail: str = ""


ControlRequest = Annotated[Union[StatusCommand, ReloadCommand, SetCommand], Field(discriminator="cmd")]  # noqa: UP007
_CONTROL: TypeAdapter[Any] = TypeAdapter(ControlRequest)

# ---------------------------------------------------------------- codec


def _wire_dtype(name: str, field: str, ids: dict[str, Any]) -> np.dtype:
    if name not in SUPPORTED_DTYPES:
        raise ProtocolError(
            "unsupported_dtype",
            f"{field}={name!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}",
            **ids,
        )
    return np.dtype(name).newbyteorder("<")


def _wire_array(array: np.ndarray) -> np.ndarray:
    """The same values, C-contiguous and little-endian; no copy when the array already is."""
    wire = np.dtype(array.dtype.name).newbyteorder("<")
    if array.dtype.name not in SUPPORTED_DTYPES:
        raise ProtocolError("unsupported_dtype", f"array dtype {array.dtype} is not one of {SUPPORTED_DTYPES}")
    if array.dtype != wire and array.dtype.itemsize > 1:
        array = array.astype(wire)
    return np.ascontiguousarray(array)


def _array_specs(msg: BaseModel) -> list[tuple[str, str, list[int]]]:
    if isinstance(msg, Frame):
        return [("frame", msg.dtype, msg.shape)]
    if isinstance(msg, Maps):
        return [(a.name, a.dtype, a.shape) for a in msg.arrays]
    return []


def encode(msg: BaseModel, *arrays: np.ndarray) -> list[bytes | memoryview]:
    """``[header, *buffers]`` for ``msg``; the arrays must match what the header declares.

    Contiguous little-endian arrays go out as memoryviews of their own memory (zero copy with
    ``send_multipart(..., copy=False)``); big-endian or strided arrays are converted first, so any array is sent
    correctly.
    """
    specs = _array_specs(msg)
    if len(arrays) != len(specs):
        raise ValueError(f"{type(msg).__name__} declares {len(specs)} array(s) but {len(arrays)} were given")
    frames: list[bytes | memoryview] = [msg.model_dump_json(by_alias=True, exclude_none=False).encode()]
    for (name, dtype, shape), array in zip(specs, arrays, strict=True):
        array = np.asarray(array)
        if array.dtype.name != dtype or list(array.shape) != list(shape):
            raise ValueError(
                f"array {name!r} is {array.dtype.name}{list(array.shape)} but the header declares {dtype}{shape}"
            )
        frames.append(memoryview(_wire_array(array).reshape(-1).view(np.uint8)))
    return frames


def _best_effort_ids(obj: Any) -> dict[str, Any]:
    """scan_id / frame_id from a header that failed validation, so the error can still name the frame."""
    ids: dict[str, Any] = {}
    if isinstance(obj, dict):
        if isinstance(obj.get("scan_id"), str):
            ids["scan_id"] = obj["scan_id"][:200]
        fid = obj.get("frame_id")
        if isinstance(fid, int) and not isinstance(fid, bool) and 0 <= fid < 2**63:
            ids["frame_id"] = fid
    return ids


def _as_buffer(frame: Any) -> memoryview:
    view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)  # zmq.Frame has .buffer
    if view.nbytes == 0:
        return memoryview(b"")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_unicode(obj: Any, raw: bytes) -> None:
    """JSON may carry lone UTF-16 surrogates (``"\\ud800"``) that no reply could echo back: refuse them here.

    Valid UTF-8 cannot encode a surrogate, so only a ``\\uD8..``-``\\uDF..`` escape in ``raw`` can make one; the
    (costly) re-encoding runs only then.
    """
    if raw.find(b"\\") < 0 or _SURROGATE_ESCAPE.search(raw) is None:
        return
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("bad_header", "header holds a string that is not valid Unicode (lone surrogate)") from None


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN_CODES = (ord("["), ord("{"))


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of JSON text nest, counted without parsing it (brackets outside strings).

    Linear time and no recursion, so a 64 KiB header of ``[`` costs about a millisecond; on text that is not JSON
    the count is an overestimate at worst, which only refuses it sooner.
    """
    brackets = np.frombuffer(_JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS), np.uint8)
    steps = np.where((brackets == _OPEN_CODES[0]) | (brackets == _OPEN_CODES[1]), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


def _deeper_than(raw: bytes, limit: int) -> int | None:
    """``json_depth(raw)`` if it exceeds ``limit``, else ``None``; free for the usual header, which opens fewer
    brackets in all than the limit (one ``bytes.translate``)."""
    if len(raw.translate(None, _NOT_BRACKETS)) <= limit:  # brackets inside strings counted too: an upper bound
        return None
    depth = json_depth(raw)
    return depth if depth > limit else None


class _StrictJSONError(ValueError):
    """Raised from inside ``json.loads`` for input this protocol refuses before converting it."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _StrictJSONError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(text: str) -> float:
    raise _StrictJSONError(f"{text} (not JSON: numbers must be finite)")


def load_json(raw: Any, *, what: str, max_bytes: int) -> Any:
    """The JSON value of ``raw`` with every limit checked *before* the parser runs: size, nesting depth, then
    integer length during parsing. Any failure is ``ProtocolError("bad_header")`` naming ``what`` was wrong."""
    buf = _as_buffer(raw)
    if buf.nbytes > max_bytes:
        raise ProtocolError("bad_header", f"{what} is {buf.nbytes} bytes; the limit is {max_bytes}")
    data = bytes(buf)
    depth = _deeper_than(data, MAX_JSON_DEPTH)
    if depth is not None:
        raise ProtocolError("bad_header", f"{what} nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        obj = json.loads(data.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_header", f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_header", f"{what} is not JSON ({exc.msg} at position {exc.pos})") from None
    except _StrictJSONError as exc:
        raise ProtocolError("bad_header", f"{what} holds {exc}") from None
    except (ValueError, RecursionError) as exc:  # belt and braces: the limits above should make these unreachable
        raise ProtocolError("bad_header", f"{what} cannot be read ({type(exc).__name__})") from None
    _check_unicode(obj, data)
    return obj


def _parse_header(raw: Any) -> dict[str, Any]:
    obj = load_json(raw, what="header", max_bytes=MAX_HEADER_BYTES)
    if not isinstance(obj, dict):
        raise ProtocolError("bad_header", f"header must be a JSON object, got {type(obj).__name__}")
    ids = _best_effort_ids(obj)
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_header", f"field 'v'={_short(obj.get('v'))}: only protocol version {PROTOCOL_VERSION} is spoken", **ids
        )
    if obj.get("kind") not in _KINDS:
        raise ProtocolError(
            "bad_header", f"field 'kind'={_short(obj.get('kind'))} is not one of {', '.join(_KINDS)}", **ids
        )
    return obj


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validate(adapter: TypeAdapter[Any], obj: dict[str, Any], ids: dict[str, Any]) -> Any:
    try:
        return adapter.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:] or first["loc"])
        value = first.get("input")
        shown = _short(value) if not isinstance(value, dict) else "{...}"
        raise ProtocolError("bad_header", f"field {_short(where)}={shown}: {first['msg']}", **ids) from None


def _check_shape(shape: list[int], field: str, ids: dict[str, Any], *, is_frame: bool) -> None:
    """Frames are 2-D with positive sizes; map arrays may be empty (a frame where no atom was found)."""
    if is_frame and len(shape) != 2:
        raise ProtocolError("bad_header", f"field {field!r}={_short(shape)} must have 2 dimensions (H, W)", **ids)
    smallest = 1 if is_frame else 0
    if any(n < smallest for n in shape):
        raise ProtocolError("bad_header", f"field {field!r}={_short(shape)} must have sizes >= {smallest}", **ids)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """``prod(shape) * itemsize``, or ``None`` as soon as the running product passes ``limit`` (sizes are >= 0):
    a declared size is never multiplied out further than the limit, however many digits its factors have."""
    total = itemsize
    for n in shape:
        total *= n
        if total > limit:
            return None
    return total


def decode(
    frames: Sequence[Any],
    *,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    check_finite: bool = True,
) -> tuple[Any, list[np.ndarray]]:
    """``(message, arrays)`` from ``[header, *buffers]``; raises ``ProtocolError`` on anything malformed.

    Checks run cheapest first and sizes are checked as numbers before any buffer is looked at, so a hostile header
    declaring a terabyte frame costs nothing. Arrays are read-only views on the received buffers. Total: whatever
    the bytes are, the only exception that leaves is ``ProtocolError`` (an unforeseen one becomes ``bad_header``),
    because the caller is a loop serving everyone else.
    """
    try:
        return _decode(frames, max_frame_bytes=max_frame_bytes, check_finite=check_finite)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError("bad_header", f"message cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _decode(frames: Sequence[Any], *, max_frame_bytes: int, check_finite: bool) -> tuple[Any, list[np.ndarray]]:
    if len(frames) == 0:
        raise ProtocolError("bad_header", "empty message: expected [header, *buffers]")
    obj = _parse_header(frames[0])
    ids = _best_effort_ids(obj)
    msg = _validate(_MESSAGE, obj, ids)
    specs = _array_specs(msg)
    sizes: list[int] = []
    for name, dtype, shape in specs:
        is_frame = isinstance(msg, Frame)
        item = _wire_dtype(dtype, "dtype" if is_frame else f"arrays[{name}].dtype", ids).itemsize
        _check_shape(shape, "shape" if is_frame else f"arrays[{name}].shape", ids, is_frame=is_frame)
        nbytes = _nbytes(shape, item, max_frame_bytes)
        if nbytes is None:
            raise ProtocolError(
                "frame_too_large",
                f"array {_short(name)} declares {dtype}{_short(shape)}, more than {max_frame_bytes} bytes "
                "(raise max_frame_bytes in the config if this is intended)",
                **ids,
            )
        sizes.append(nbytes)
    buffers = frames[1:]
    if len(buffers) != len(specs):
        raise ProtocolError(
            "bad_payload", f"{msg.kind} header declares {len(specs)} buffer(s) but {len(buffers)} followed", **ids
        )
    arrays: list[np.ndarray] = []
    for (name, dtype, shape), expected, raw in zip(specs, sizes, buffers, strict=True):
        buf = _as_buffer(raw)
        if buf.nbytes != expected:
            raise ProtocolError(
                "shape_mismatch",
                f"array {_short(name)}: payload has {buf.nbytes} bytes but {dtype}{_short(shape)} needs {expected}",
                **ids,
            )
        array = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
        if check_finite and array.dtype.kind == "f":
            _check_finite(name, array, ids)
        arrays.append(array)
    return msg, arrays


_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)


def _check_finite(name: str, array: np.ndarray, ids: dict[str, Any]) -> None:
    """NaN/Inf, and float64 values that would overflow the float32 the encoder computes in, are refused.

    One pass in the common case: the largest magnitude is NaN, Inf or too large exactly when something is wrong.
    """
    if array.size == 0 or float(np.abs(array).max()) <= _FLOAT32_MAX:
        return
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ProtocolError("non_finite", f"array {name!r} holds {bad} NaN/Inf value(s)", **ids)
    raise ProtocolError(
        "non_finite", f"array {name!r} holds values beyond the float32 range (|x| > {_FLOAT32_MAX:.3g})", **ids
    )


def frame_message(scan_id: str, frame_id: int, array: np.ndarray, **fields: Any) -> Frame:
    """The ``Frame`` header that describes ``array`` (dtype and shape filled in).

    ``frame_id`` may be any integer type (a numpy counter too): the header is strict about JSON integers, not about
    which Python integer a caller counts with.
    """
    fid = operator.index(frame_id)
    return Frame(scan_id=scan_id, frame_id=fid, dtype=array.dtype.name, shape=list(array.shape), **fields)


def encode_published(msg: BaseModel, *arrays: np.ndarray) -> list[bytes | memoryview]:
    """``[topic, header, *buffers]``: the topic is the message kind, so subscribers filter by kind."""
    kind = getattr(msg, "kind", None)
    if kind not in PUBLISH_TOPICS:
        raise ValueError(f"{type(msg).__name__} is not a published message kind ({', '.join(PUBLISH_TOPICS)})")
    return [kind.encode("ascii"), *encode(msg, *arrays)]


def decode_published(frames: Sequence[Any], **options: Any) -> tuple[Any, list[np.ndarray]]:
    """Inverse of ``encode_published``; the topic must agree with the header's kind."""
    if len(frames) < 2:
        raise ProtocolError("bad_header", "published message needs [topic, header, *buffers]")
    topic = bytes(_as_buffer(frames[0])).decode("ascii", errors="replace")
    msg, arrays = decode(frames[1:], **options)
    if msg.kind != topic:
        raise ProtocolError("bad_header", f"topic {topic!r} does not match header kind {msg.kind!r}")
    return msg, arrays


def encode_control(msg: BaseModel) -> bytes:
    return msg.model_dump_json().encode()


def decode_control(raw: Any, *, max_bytes: int = MAX_CONTROL_BYTES) -> StatusCommand | ReloadCommand | SetCommand:
    """A control request; anything else (too large, too deep, not JSON, an unknown command, an unforeseen failure)
    raises ``ProtocolError("bad_header", ...)`` — never another exception, so the control loop always answers."""
    try:
        obj = load_json(raw, what="control request", max_bytes=max_bytes)
        if not isinstance(obj, dict):
            raise ProtocolError("bad_header", 'control request must be a JSON object like {"cmd": "status"}')
        return _validate(_CONTROL, obj, {})  # type: ignore[no-any-return]
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError("bad_header", f"control request cannot be decoded ({type(exc).__name__})") from exc
