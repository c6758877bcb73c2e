"""Wire protocol v1: round trips without sockets, and every malformed input gets the right reason code."""

from __future__ import annotations

import json

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streamer.wire.protocol import (
    REASONS,
    SUPPORTED_DTYPES,
    ArraySpec,
    ControlReply,
    Defect,
    Defects,
    Error,
    Frame,
    Maps,
    ModelRef,
    ProtocolError,
    ReloadCommand,
    ScanEnd,
    ScanStart,
    ScanSummary,
    SetCommand,
    Status,
    StatusCommand,
    decode,
    decode_control,
    decode_published,
    encode,
    encode_control,
    encode_published,
    frame_message,
)

DTYPES = [np.dtype(d) for d in SUPPORTED_DTYPES]


def _header(frames: list) -> dict:
    return json.loads(bytes(frames[0]))


def _reason(frames: list, **options) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, **options)
    assert info.value.reason in REASONS
    return info.value.reason


@st.composite
def any_array(draw: st.DrawFn) -> np.ndarray:
    """Arrays as a caller might hold them: any supported dtype, either byte order, strided or not."""
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        dtype = dtype.newbyteorder(">")
    shape = draw(
        st.sampled_from([(1, 1), (1, 7), (3, 1025), (5, 3), (1, 1)])
        | hnp.array_shapes(min_dims=2, max_dims=2, max_side=40)
    )
    limit = float(np.finfo(np.float32).max) if dtype.kind == "f" else None  # the encoder computes in float32
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False, min_value=limit and -limit, max_value=limit)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    if draw(st.booleans()) and array.shape[1] > 1:
        array = array[:, ::2]  # non-contiguous view
    if draw(st.booleans()):
        array = np.asfortranarray(array)
    return array


@settings(max_examples=150, deadline=None)
@given(array=any_array(), frame_id=st.integers(0, 2**62), t_acq=st.none() | st.integers(0, 2**62))
def test_frame_round_trip_any_dtype_order_and_layout(array: np.ndarray, frame_id: int, t_acq: int | None) -> None:
    msg = frame_message("scan-α", frame_id, array, t_acq_ns=t_acq, meta={"pixel_size": 0.1})
    frames = encode(msg, array)
    header = _header(frames)
    assert header["v"] == 1 and header["kind"] == "frame"
    assert header["dtype"] == array.dtype.name and header["shape"] == list(array.shape)
    assert len(frames[1]) == array.size * array.dtype.itemsize
    got_msg, (got,) = decode([bytes(f) for f in frames])
    assert got_msg == msg
    assert got.dtype == np.dtype(array.dtype.name).newbyteorder("<")
    np.testing.assert_array_equal(got, array)


def test_encode_is_zero_copy_for_contiguous_little_endian() -> None:
    array = np.arange(12, dtype="<u2").reshape(3, 4)
    frames = encode(frame_message("s", 0, array), array)
    assert np.shares_memory(np.frombuffer(frames[1], dtype="<u2"), array)


def test_decode_returns_views_on_the_received_buffer() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    payload = bytearray(array.tobytes())
    _, (got,) = decode([encode(frame_message("s", 1, array), array)[0], payload])
    payload[0:4] = np.float32(42).tobytes()
    assert got[0, 0] == 42


@pytest.mark.parametrize("shape", [(1, 1), (1, 513), (3, 1025), (1025, 3), (2, 2)])
def test_awkward_shapes_round_trip(shape: tuple[int, int]) -> None:
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    _, (got,) = decode(encode(frame_message("s", 0, array), array))
    np.testing.assert_array_equal(got, array)


def _maps_msg(arrays: dict[str, np.ndarray]) -> Maps:
    return Maps(
        scan_id="s",
        frame_id=3,
        seq=7,
        layout="grid",
        grid=[2, 3],
        patch=[32, 32],
        stride=[8, 8],
        origin=[0, 0],
        n_classes=3,
        latent_dim=2,
        class_names=["a", "b", "c"],
        model=ModelRef(name="m", version="1", sha256="0" * 64),
        t_recv_ns=1,
        t_pub_ns=2,
        arrays=[ArraySpec.of(k, v) for k, v in arrays.items()],
    )


def test_published_maps_round_trip_with_several_arrays_including_empty() -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "class": rng.integers(0, 3, (2, 3)).astype(np.uint8),
        "class_prob": rng.random((2, 3, 3)).astype(np.float32),
        "z": rng.standard_normal((2, 3, 2)).astype(np.float32),
        "centers": np.zeros((0, 2), np.float32),
    }
    msg = _maps_msg(arrays)
    frames = encode_published(msg, *arrays.values())
    assert bytes(frames[0]) == b"maps"
    got, got_arrays = decode_published(frames)
    assert got == msg
    for want, have in zip(arrays.values(), got_arrays, strict=True):
        np.testing.assert_array_equal(want, have)


@pytest.mark.parametrize(
    "msg",
    [
        ScanStart(scan_id="s", meta={"instrument": "STEM"}),
        ScanEnd(scan_id="s", n_frames=3),
        Defects(scan_id="s", frame_id=0, seq=0, defects=[Defect(y=1.5, x=2.0, class_=2, score=0.9, area=3)]),
        Error(scan_id="s", frame_id=4, reason="non_finite", detail="NaN"),
        Status(
            uptime_s=1.0,
            frames_received=1,
            frames_published=1,
            frames_rejected=0,
            frames_dropped=0,
            queue_depth=0,
            model=None,
            backend="onnx",
            device="cpu",
        ),
        ScanSummary(scan_id="s", frames_received=2, frames_published=1, frames_rejected=1, frames_dropped=0),
    ],
)
def test_header_only_messages_round_trip(msg) -> None:
    got, arrays = decode(encode(msg))
    assert got == msg and arrays == []


def test_defect_class_field_is_spelled_class_on_the_wire() -> None:
    msg = Defects(scan_id="s", frame_id=0, seq=0, defects=[Defect(y=1, x=2, class_=1, score=0.5, area=1)])
    assert _header(encode(msg))["defects"][0]["class"] == 1


def test_control_round_trip() -> None:
    for cmd in (
        StatusCommand(),
        ReloadCommand(artifact="/a"),
        SetCommand(defect_classes=["vacancy"], defect_threshold=0.5),
    ):
        assert decode_control(encode_control(cmd)) == cmd
    assert ControlReply(ok=True, detail="x", extra=1).model_dump()["extra"] == 1


# ------------------------------------------------------------------ malformed input


def _frame_frames(array: np.ndarray | None = None, **header) -> list[bytes]:
    array = np.zeros((4, 5), np.uint16) if array is None else array
    base = {
        "v": 1,
        "kind": "frame",
        "scan_id": "s",
        "frame_id": 9,
        "dtype": array.dtype.name,
        "shape": list(array.shape),
    }
    base.update(header)
    return [json.dumps(base).encode(), array.tobytes()]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([], "bad_header"),
        ([b"\xff\xfe\x00"], "bad_header"),
        ([b"{not json"], "bad_header"),
        ([b"[1, 2]"], "bad_header"),
        ([json.dumps({"v": 2, "kind": "frame"}).encode()], "bad_header"),
        ([json.dumps({"v": 1, "kind": "telepathy"}).encode()], "bad_header"),
        (_frame_frames(frame_id=-1), "bad_header"),
        (_frame_frames(surprise=1), "bad_header"),
        (_frame_frames(shape=[0, 5]), "bad_header"),
        (_frame_frames(shape=[-4, 5]), "bad_header"),
        (_frame_frames(shape=[4, 5, 1]), "bad_header"),
        (_frame_frames(frame_id=True), "bad_header"),
        (_frame_frames(frame_id=9.0), "bad_header"),
        (_frame_frames(frame_id="9"), "bad_header"),
        (_frame_frames(shape=[1.0, 2]), "bad_header"),
        (_frame_frames(t_acq_ns=1.5e18), "bad_header"),
        (_frame_frames(dtype="complex64"), "unsupported_dtype"),
        (_frame_frames(dtype="object"), "unsupported_dtype"),
        (_frame_frames(shape=[10**9, 10**9]), "frame_too_large"),
        (_frame_frames(shape=[5, 5]), "shape_mismatch"),
        (_frame_frames()[:1], "bad_payload"),
        ([*_frame_frames(), b"extra"], "bad_payload"),
        (_frame_frames(np.array([[1.0, np.nan]], np.float32)), "non_finite"),
        (_frame_frames(np.array([[np.inf, 1.0]])), "non_finite"),
        (_frame_frames(np.array([[1e300, 1.0]])), "non_finite"),
        ([b"[" * 60000], "bad_header"),
        ([b'{"v": 1, "kind": "scan_start", "scan_id": "\\ud800"}'], "bad_header"),
        ([b"x" * 70_000], "bad_header"),
    ],
)
def test_malformed_frames_get_the_right_reason(frames: list[bytes], reason: str) -> None:
    assert _reason(frames) == reason


def test_error_names_the_frame_and_the_field() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(_frame_frames(shape=[5, 5]))
    assert info.value.scan_id == "s" and info.value.frame_id == 9
    with pytest.raises(ProtocolError) as info:
        decode(_frame_frames(dtype="complex64"))
    assert "complex64" in info.value.detail and info.value.frame_id == 9
    with pytest.raises(ProtocolError) as info:
        decode(_frame_frames(frame_id="nine"))
    assert "frame_id" in info.value.detail and "nine" in info.value.detail


def test_declared_size_limit_is_configurable() -> None:
    assert _reason(_frame_frames(np.zeros((64, 64), np.uint8)), max_frame_bytes=1000) == "frame_too_large"
    msg, _ = decode(_frame_frames(np.zeros((64, 64), np.uint8)), max_frame_bytes=4096)
    assert isinstance(msg, Frame)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_bytes_never_escape_as_anything_but_protocol_error(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError as exc:
        assert exc.reason in REASONS


def test_encode_refuses_arrays_that_disagree_with_the_header() -> None:
    array = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="declares"):
        encode(Frame(scan_id="s", frame_id=0, dtype="float32", shape=[3, 2]), array)
    with pytest.raises(ValueError, match="array"):
        encode(Frame(scan_id="s", frame_id=0, dtype="float32", shape=[2, 2]))


def test_published_topic_must_match_kind() -> None:
    frames = encode_published(Error(reason="internal", detail="x"))
    frames[0] = b"maps"
    with pytest.raises(ProtocolError, match="topic"):
        decode_published(frames)


def test_bad_control_requests() -> None:
    for raw in (b"\xff", b"[]", b'{"cmd": "explode"}', b'{"cmd": "reload"}', b'{"cmd": "set", "defect_threshold": 2}'):
        with pytest.raises(ProtocolError):
            decode_control(raw)


def test_frame_message_takes_a_numpy_counter_but_the_wire_takes_only_json_integers() -> None:
    array = np.zeros((2, 3), np.float32)
    assert frame_message("s", np.int64(4), array).frame_id == 4
    with pytest.raises(ValidationError):
        Frame(scan_id="s", frame_id=4.0, dtype="float32", shape=[2, 3])
