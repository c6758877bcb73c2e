"""Hostile input: whatever arrives on the ingest (or control) socket, the service answers it and keeps serving.

Two layers. ``decode`` is fuzzed without sockets against a *reference classifier* written here from DESIGN.md (not
from ``protocol.py``): for every generated message it predicts the reason code, or acceptance, and the frame the
error must name. Then the same generator drives a live service over loopback, one message at a time: each bad
message must come back as exactly one ``error`` with the predicted reason and ids, each good one as ``maps``; after
the fuzz a plain good frame still gets its maps and the counts add up. Memory: a header declaring a huge frame with a
tiny payload is refused without allocating anything of the declared size (tracemalloc peak and peak RSS).

The tests after the 'bugs found' line pin the bugs this fuzzing found (each crashed or misled the service before
its fix), so they cannot come back.
"""

from __future__ import annotations

import json
import math
import resource
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq_helpers import Sockets, control, service_config, sockets, subscribe

from streamer.maps.encoder import Encoder, load
from streamer.service.config import ServiceConfig
from streamer.service.facade import Service
from streamer.wire.protocol import (
    REASONS,
    SUPPORTED_DTYPES,
    ArraySpec,
    Maps,
    ModelRef,
    ProtocolError,
    Status,
    decode,
    decode_control,
    decode_published,
    encode,
    frame_message,
)

TIMEOUT_S = 10.0
MAX_FRAME_BYTES = 1 << 20  # the fuzzed service's limit: small, so "too large" is reachable with modest shapes
PATCH = 16  # the test artifact's patch: smaller frames are valid input the model cannot tile (shape_mismatch)
MISSING = object()  # a header field left out
BAD_DTYPES = ("bool", "int8", "uint32", "int64", "uint64", "float16", "complex64", "object", ">f4", "<f4", "f", "")
_KNOWN_KINDS = ("scan_start", "frame", "scan_end", "maps", "defects", "error", "status", "scan_summary")
_FRAME_FIELDS = {"v", "kind", "scan_id", "frame_id", "dtype", "shape", "t_acq_ns", "meta"}


# ---------------------------------------------------------------------------------------------- reference classifier


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Verdict:
    """What the protocol must do with a message: ``reason`` None means accepted; the ids the error must carry."""

    reason: str | None
    scan_id: str | None
    frame_id: int | None


def reference_verdict(frames: list[bytes], *, max_frame_bytes: int) -> Verdict:
    """DESIGN.md's ingest rules for ``frame`` messages, cheapest check first, written independently of the codec."""
    try:
        obj = json.loads(frames[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return Verdict("bad_header", None, None)
    if not isinstance(obj, dict):
        return Verdict("bad_header", None, None)
    sid = obj.get("scan_id")
    fid = obj.get("frame_id")
    ids = Verdict(None, sid[:200] if isinstance(sid, str) else None, fid if _is_int(fid) and fid >= 0 else None)
    header_error = Verdict("bad_header", ids.scan_id, ids.frame_id)
    shape, dtype = obj.get("shape"), obj.get("dtype")
    fields_ok = (
        obj.get("v") == 1
        and obj.get("kind") == "frame"
        and set(obj) <= _FRAME_FIELDS
        and isinstance(sid, str)
        and _is_int(fid)
        and fid >= 0
        and isinstance(dtype, str)
        and isinstance(shape, list)
        and all(_is_int(n) for n in shape)
        and (obj.get("t_acq_ns") is None or _is_int(obj.get("t_acq_ns")))
        and isinstance(obj.get("meta", {}), dict)
    )
    if not fields_ok:
        return header_error
    if dtype not in SUPPORTED_DTYPES:
        return Verdict("unsupported_dtype", ids.scan_id, ids.frame_id)
    if len(shape) != 2 or min(shape) < 1:
        return header_error
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > max_frame_bytes:
        return Verdict("frame_too_large", ids.scan_id, ids.frame_id)
    if len(frames) != 2:
        return Verdict("bad_payload", ids.scan_id, ids.frame_id)
    if len(frames[1]) != nbytes:
        return Verdict("shape_mismatch", ids.scan_id, ids.frame_id)
    values = np.frombuffer(frames[1], dtype=np.dtype(dtype).newbyteorder("<"))
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        return Verdict("non_finite", ids.scan_id, ids.frame_id)
    return ids


# ---------------------------------------------------------------------------------------------- message generator


def _field(draw: st.DrawFn, valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any], p_bad: int = 12) -> Any:
    """Mostly a valid value, about one time in ``p_bad`` an invalid one (or the field left out)."""
    if draw(st.integers(0, p_bad - 1)) == 0:
        return draw(st.one_of(invalid, st.just(MISSING)))
    return draw(valid)


_small_shape = st.lists(st.integers(1, 24), min_size=2, max_size=2)
_bad_shape = st.one_of(
    st.lists(st.integers(1, 24), min_size=0, max_size=4).filter(lambda s: len(s) != 2),  # wrong number of dims
    st.tuples(st.integers(-(2**40), 0), st.integers(-5, 24)).map(list),  # zero or negative
    st.tuples(st.integers(1, 24), st.integers(-(2**40), 0)).map(list),
    st.tuples(st.integers(2**11, 2**80), st.integers(2**11, 2**80)).map(list),  # declared far beyond the limit
    st.sampled_from(["16x16", [16, "x"], None, {"h": 16}]),
)


@st.composite
def frame_messages(draw: st.DrawFn) -> list[bytes]:
    """A ``frame`` message, valid or broken in one or several ways at once (header, buffer count, size, values)."""
    if draw(st.integers(0, 14)) == 0:  # not even JSON
        header = draw(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
        return [header, *draw(st.lists(st.binary(max_size=64), max_size=2))]
    obj: dict[str, Any] = {
        "v": _field(draw, st.just(1), st.sampled_from([0, 2, "1", None, 1.5])),
        "kind": _field(draw, st.just("frame"), st.sampled_from(["frames", "", "FRAME", "maps", "status", "scan_end"])),
        "scan_id": _field(draw, st.text(max_size=24), st.one_of(st.integers(), st.none(), st.lists(st.integers()))),
        "frame_id": _field(
            draw, st.integers(0, 2**62), st.one_of(st.integers(max_value=-1), st.sampled_from(["x", "", "ten"]))
        ),
        "dtype": _field(
            draw, st.sampled_from(SUPPORTED_DTYPES), st.one_of(st.sampled_from(BAD_DTYPES), st.integers()), 6
        ),
        "shape": _field(draw, _small_shape, _bad_shape, p_bad=5),
        "t_acq_ns": _field(draw, st.one_of(st.none(), st.integers(0, 2**62)), st.sampled_from(["now", [1]]), 20),
        "meta": _field(draw, st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), st.just([1, 2]), 20),
    }
    if draw(st.integers(0, 19)) == 0:
        obj["colour"] = "red"  # an unknown field
    obj = {k: v for k, v in obj.items() if v is not MISSING}
    header = json.dumps(obj).encode()
    if draw(st.integers(0, 24)) == 0:
        header = header[: draw(st.integers(0, len(header) - 1))]  # truncated JSON
    elif draw(st.integers(0, 24)) == 0:
        header = b"\xff\xfe" + header  # not UTF-8

    shape, dtype = obj.get("shape"), obj.get("dtype")
    declared = (
        isinstance(shape, list)
        and len(shape) == 2
        and all(_is_int(n) and n >= 1 for n in shape)
        and dtype in SUPPORTED_DTYPES
        and math.prod(shape) * np.dtype(dtype).itemsize <= MAX_FRAME_BYTES
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if declared:
        assert isinstance(dtype, str) and isinstance(shape, list)
        values = rng.normal(100.0, 30.0, size=shape).clip(0, 250).astype(dtype)
        if values.dtype.kind == "f" and draw(st.integers(0, 5)) == 0:
            values.reshape(-1)[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        payload = values.tobytes()
        cut = draw(st.sampled_from([0] * 10 + [1, 3, -1, -8]))  # sometimes short or long by a few bytes
        payload = payload[:-cut] if cut > 0 else payload + b"\0" * -cut
    else:
        payload = rng.bytes(draw(st.integers(0, 64)))
    n_buffers = draw(st.sampled_from([1] * 12 + [0, 2, 3]))
    return [header, *([payload] * n_buffers)]


# ---------------------------------------------------------------------------------------------- decode, no sockets


@settings(max_examples=600, deadline=None, database=None, derandomize=True)
@given(frame_messages())
def test_decode_classifies_hostile_frames_as_the_reference_does(frames: list[bytes]) -> None:
    verdict = reference_verdict(frames, max_frame_bytes=MAX_FRAME_BYTES)
    if verdict.reason is None:
        msg, arrays = decode(frames, max_frame_bytes=MAX_FRAME_BYTES)
        assert (msg.scan_id, msg.frame_id) == (verdict.scan_id, verdict.frame_id)
        assert arrays[0].shape == tuple(msg.shape) and arrays[0].tobytes() == frames[1]
        return
    with pytest.raises(ProtocolError) as info:
        decode(frames, max_frame_bytes=MAX_FRAME_BYTES)
    err = info.value
    assert (err.reason, err.scan_id, err.frame_id) == (verdict.reason, verdict.scan_id, verdict.frame_id), err.detail
    assert err.detail


@st.composite
def mutated_messages(draw: st.DrawFn) -> list[bytes]:
    """A valid encoded frame with bytes flipped, cut or inserted anywhere (header and payload)."""
    array = np.arange(20 * 18, dtype=np.float32).reshape(20, 18)
    frames = [bytearray(bytes(f)) for f in encode(frame_message("s", 3, array), array)]
    for _ in range(draw(st.integers(1, 4))):
        part = frames[draw(st.integers(0, len(frames) - 1))]
        if not part:
            continue
        at = draw(st.integers(0, len(part) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            part[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del part[at:]
        else:
            part[at:at] = draw(st.binary(min_size=1, max_size=8))
    return [bytes(f) for f in frames]


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(st.one_of(mutated_messages(), st.lists(st.binary(max_size=300), max_size=5)))
def test_decode_of_random_or_mutated_bytes_raises_only_protocol_errors(frames: list[bytes]) -> None:
    for call in (
        lambda: decode(frames, max_frame_bytes=MAX_FRAME_BYTES),
        lambda: decode_published([b"maps", *frames]),
        lambda: decode_control(frames[0] if frames else b""),
    ):
        try:
            call()
        except ProtocolError as exc:
            assert exc.reason in REASONS and exc.detail


# ---------------------------------------------------------------------------------------------- the live service


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    artifact = make_artifact(tmp_path_factory.mktemp("fuzzed"), patch=(PATCH, PATCH), seed=5)
    return load(artifact, backend="onnx", device="cpu", batch_sizes=(1,))


def _config(**fields: Any) -> ServiceConfig:
    return service_config(**{"metrics_port": None, "max_wait_ms": 0.0, "max_frame_bytes": MAX_FRAME_BYTES, **fields})


@dataclass
class Live:
    """A running service and a producer, a subscriber and a control client connected to it."""

    svc: Service
    push: zmq.Socket[bytes]
    sub: zmq.Socket[bytes]
    req: zmq.Socket[bytes]

    def next_event(self) -> tuple[Any, list[np.ndarray]]:
        """The next published message that is not a heartbeat; fails at once (``ServiceError``) if the service died."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            self.svc.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing but heartbeats for {TIMEOUT_S} s")
            if not self.sub.poll(100, zmq.POLLIN):
                continue
            msg, arrays = decode_published(self.sub.recv_multipart())
            if msg.kind != "status":
                return msg, arrays

    def outcome(self, frames: list[bytes]) -> Any:
        """Send one message and return what it became: its ``error``, or its ``maps`` (its ``defects`` consumed)."""
        self.push.send_multipart(frames)
        msg, _ = self.next_event()
        if msg.kind == "maps":
            defects, _ = self.next_event()
            assert (defects.kind, defects.frame_id) == ("defects", msg.frame_id)
        return msg

    def good_frame_gets_maps(self, frame_id: int) -> None:
        array = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
        msg = self.outcome(list(encode(frame_message("after", frame_id, array), array)))
        assert (msg.kind, msg.scan_id, msg.frame_id) == ("maps", "after", frame_id)


@pytest.fixture
def live(encoder: Encoder) -> Iterator[Live]:
    with sockets() as zs, Service(_config(), encoder=encoder) as svc:
        svc.wait_ready(TIMEOUT_S)
        yield _connect(zs, svc)


def _connect(zs: Sockets, svc: Service) -> Live:
    sub = subscribe(zs, svc.publish_endpoint)
    push = zs.socket(zmq.PUSH)
    push.connect(svc.ingest_endpoint)
    req = zs.socket(zmq.REQ)
    req.connect(svc.control_endpoint)
    return Live(svc, push, sub, req)


def _expected_outcome(frames: list[bytes]) -> tuple[str, str | None, int | None]:
    """(kind or error reason, scan_id, frame_id) the service must publish for this message."""
    verdict = reference_verdict(frames, max_frame_bytes=MAX_FRAME_BYTES)
    if verdict.reason is not None:
        return verdict.reason, verdict.scan_id, verdict.frame_id
    shape = json.loads(frames[0])["shape"]
    too_small = min(shape) < PATCH  # accepted by the protocol, but the model cannot tile it
    return ("shape_mismatch" if too_small else "maps"), verdict.scan_id, verdict.frame_id


def test_the_service_answers_every_fuzzed_message_with_the_right_reason_and_goes_on(live: Live) -> None:
    seen: dict[str, int] = {}

    @settings(
        max_examples=500,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(frame_messages())
    def one_message(frames: list[bytes]) -> None:
        kind, scan_id, frame_id = _expected_outcome(frames)
        msg = live.outcome(frames)
        got = msg.kind if msg.kind == "maps" else msg.reason
        assert (got, msg.scan_id, msg.frame_id) == (kind, scan_id, frame_id), getattr(msg, "detail", "")
        seen[kind] = seen.get(kind, 0) + 1

    one_message()
    live.good_frame_gets_maps(0)
    status = control(live.req, {"cmd": "status"})
    total = sum(seen.values()) + 1
    assert status["frames_received"] == total
    assert status["frames_published"] + status["frames_rejected"] + status["frames_dropped"] == total
    assert status["frames_published"] == seen.get("maps", 0) + 1
    assert {"bad_header", "unsupported_dtype", "frame_too_large", "bad_payload", "shape_mismatch"} <= set(seen)
    assert seen.get("non_finite", 0) > 0 and seen.get("maps", 0) > 0, seen
    live.svc.check()


def _frame_header(**fields: Any) -> bytes:
    base: dict[str, Any] = {"v": 1, "kind": "frame", "scan_id": "t", "frame_id": 7, "dtype": "float32"}
    return json.dumps({**base, "shape": [20, 20], **fields}).encode()


def _maps_header() -> bytes:
    spec = ArraySpec(name="class", dtype="uint8", shape=[2, 2])
    maps = Maps(
        scan_id="t", frame_id=7, seq=0, layout="grid", grid=[2, 2], patch=[16, 16], stride=[8, 8], origin=[0, 0],
        n_classes=1, latent_dim=1, class_names=["a"], model=ModelRef(name="m", version="1", sha256="0"),
        t_recv_ns=0, t_pub_ns=0, arrays=[spec],
    )  # fmt: skip
    return bytes(encode(maps, np.zeros((2, 2), np.uint8))[0])


def _hostile_table() -> dict[str, tuple[list[bytes], str, str | None, int | None]]:
    """name -> (message, expected reason or "maps", scan_id and frame_id the answer must name)."""
    ok = np.full((20, 20), 5.0, np.float32).tobytes()
    table: dict[str, tuple[list[bytes], str, str | None, int | None]] = {
        "empty frame": ([b""], "bad_header", None, None),
        "random bytes": ([np.random.default_rng(0).bytes(300)], "bad_header", None, None),
        "non-UTF-8 header": ([b"\xc3\x28" + _frame_header(), ok], "bad_header", None, None),
        "JSON array header": ([b"[1, 2, 3]", ok], "bad_header", None, None),
        "header over 64 KiB": ([_frame_header(meta={"pad": "x" * 70_000}), ok], "bad_header", None, None),
        "version 2": ([_frame_header(v=2), ok], "bad_header", "t", 7),
        "no version": ([json.dumps({"kind": "frame", "scan_id": "t", "frame_id": 7}).encode(), ok],
                       "bad_header", "t", 7),
        "unknown kind": ([_frame_header(kind="frame2"), ok], "bad_header", "t", 7),
        "maps sent to ingest": ([_maps_header(), b"\0" * 4], "bad_header", "t", 7),
        "status sent to ingest": (
            [Status(uptime_s=1, frames_received=0, frames_published=0, frames_rejected=0, frames_dropped=0,
                    queue_depth=0, model=None, backend="x", device="y").model_dump_json().encode()],
            "bad_header", None, None,
        ),
        "negative frame id": ([_frame_header(frame_id=-1), ok], "bad_header", "t", None),
        "negative shape": ([_frame_header(shape=[-20, -20]), ok], "bad_header", "t", 7),
        "zero shape": ([_frame_header(shape=[0, 20]), b""], "bad_header", "t", 7),
        "3-D shape": ([_frame_header(shape=[20, 20, 1]), ok], "bad_header", "t", 7),
        "shape of strings": ([_frame_header(shape=["20", "x"]), ok], "bad_header", "t", 7),
        "huge shape, tiny payload": ([_frame_header(shape=[10**9, 10**9], dtype="float64"), b"\0" * 8],
                                     "frame_too_large", "t", 7),
        "shape past int64": ([_frame_header(shape=[2**80, 2**80]), ok], "frame_too_large", "t", 7),
        "header only": ([_frame_header()], "bad_payload", "t", 7),
        "two payloads": ([_frame_header(), ok, ok], "bad_payload", "t", 7),
        "payload one byte short": ([_frame_header(), ok[:-1]], "shape_mismatch", "t", 7),
        "payload one byte long": ([_frame_header(), ok + b"\0"], "shape_mismatch", "t", 7),
        "empty payload": ([_frame_header(), b""], "shape_mismatch", "t", 7),
        "too small for a patch": ([_frame_header(shape=[8, 40]), b"\0" * 8 * 40 * 4], "shape_mismatch", "t", 7),
        "unknown field": ([_frame_header(colour="red"), ok], "bad_header", "t", 7),
    }  # fmt: skip
    for dtype in BAD_DTYPES:
        table[f"dtype {dtype!r}"] = ([_frame_header(dtype=dtype), ok], "unsupported_dtype", "t", 7)
    for dtype in SUPPORTED_DTYPES:
        good = (np.arange(400) % 200).astype(dtype).reshape(20, 20)
        table[f"good {dtype}"] = ([_frame_header(dtype=dtype), good.tobytes()], "maps", "t", 7)
        if np.dtype(dtype).kind == "f":
            for bad in (np.nan, np.inf, -np.inf):
                values = good.copy()
                values[19, 19] = bad
                table[f"{bad} in {dtype}"] = ([_frame_header(dtype=dtype), values.tobytes()], "non_finite", "t", 7)
    return table


def test_each_named_kind_of_hostile_input_gets_its_reason(live: Live) -> None:
    table = _hostile_table()
    wrong = {}
    for name, (frames, expected, scan_id, frame_id) in table.items():
        msg = live.outcome(frames)
        got = (msg.kind if msg.kind == "maps" else msg.reason, msg.scan_id, msg.frame_id)
        if got != (expected, scan_id, frame_id):
            wrong[name] = (got, getattr(msg, "detail", ""))
    assert not wrong
    live.good_frame_gets_maps(1)
    counts = control(live.req, {"cmd": "status"})  # answered by the I/O thread, after its last publish
    assert counts["frames_received"] == len(table) + 1
    assert counts["frames_received"] == counts["frames_published"] + counts["frames_rejected"]
    assert counts["frames_published"] == sum(expected == "maps" for _, expected, _, _ in table.values()) + 1


def test_garbage_on_the_control_socket_gets_a_refusal_not_a_crash(live: Live) -> None:
    @settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @given(st.one_of(st.binary(max_size=200), st.dictionaries(st.text(max_size=6), st.integers(), max_size=3)))
    def one_request(raw: bytes | dict[str, int]) -> None:
        live.req.send(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
        reply = json.loads(live.req.recv())
        assert reply["ok"] is False and reply["detail"]

    one_request()
    assert control(live.req, {"cmd": "status"})["ok"]
    live.good_frame_gets_maps(0)
    live.svc.check()


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) for this process; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def test_a_huge_declared_frame_is_refused_without_allocating_it(encoder: Encoder) -> None:
    limit = 256 * 1024 * 1024  # the default limit: 4096 x 8192 float64 is exactly allowed, so only the payload check
    # stands between that header and a 256 MiB allocation
    cases = [
        ([_frame_header(shape=[10**9, 10**9], dtype="float64"), b"\0" * 64], "frame_too_large"),
        ([_frame_header(shape=[4096, 8192], dtype="float64"), b"\0" * 64], "shape_mismatch"),
        ([_frame_header(shape=[4096, 8192], dtype="float64")], "bad_payload"),
    ]
    with sockets() as zs, Service(_config(max_frame_bytes=limit), encoder=encoder) as svc:
        svc.wait_ready(TIMEOUT_S)
        live = _connect(zs, svc)
        live.good_frame_gets_maps(0)  # everything warmed up before measuring
        rss_before = _vm_kib("VmRSS")
        exact_peak = _reset_peak_rss()
        peak_before = _vm_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        try:
            for _ in range(10):
                for frames, reason in cases:
                    msg = live.outcome(frames)
                    assert (msg.kind, msg.reason) == ("error", reason)
            _, traced_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peak_after = _vm_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        live.good_frame_gets_maps(1)
    assert traced_peak < 8 * 1024 * 1024, f"Python allocations peaked at {traced_peak / 2**20:.1f} MiB"
    grew_kib = peak_after - max(peak_before, rss_before)
    assert grew_kib < 64 * 1024, f"peak RSS grew by {grew_kib / 1024:.0f} MiB while refusing {len(cases) * 10} frames"


# ---------------------------------------------------------------------------------------------- bugs found (fixed)


def _survives(live: Live, frames: list[bytes], expected: str, scan_id: str | None) -> None:
    """The message gets its error (or maps), the service stays up and a good frame still gets maps."""
    msg = live.outcome(frames)
    got = msg.kind if msg.kind == "maps" else msg.reason
    assert (got, msg.scan_id) == (expected, scan_id)
    live.good_frame_gets_maps(1)
    live.svc.check()


def test_a_deeply_nested_json_header_is_a_bad_header_not_a_crash(live: Live) -> None:
    _survives(live, [b"[" * 60_000, b""], "bad_header", None)


def test_a_lone_surrogate_in_scan_id_is_a_bad_header_not_a_crash(live: Live) -> None:
    header = b'{"v": 1, "kind": "frame", "scan_id": "\\ud800", "frame_id": 7, "dtype": "uint8", "shape": [20, 20]}'
    _survives(live, [header, b"\0" * 400], "bad_header", None)


def test_a_multipart_control_request_is_refused_not_a_crash(live: Live) -> None:
    live.req.send_multipart([b'{"cmd": "status"}', b"extra"])
    while not live.req.poll(100, zmq.POLLIN):
        live.svc.check()
    reply = json.loads(live.req.recv())
    assert reply["ok"] is False
    live.good_frame_gets_maps(1)
    live.svc.check()


def test_float64_values_beyond_float32_range_do_not_become_silent_nan_maps(live: Live) -> None:
    values = np.full((20, 20), 1e300)
    values[::2] = -1e300
    live.push.send_multipart([_frame_header(dtype="float64"), values.tobytes()])
    msg, arrays = live.next_event()
    if msg.kind == "error":
        assert msg.reason == "non_finite"
    else:
        assert msg.kind == "maps"
        assert all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"), "NaN/Inf in the published maps"


# ---------------------------------------------------------------------------------------------- numbers, depth, size


def _nest(depth: int, leaf: Any = 1) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf} if depth % 2 else [leaf]
    return leaf


@st.composite
def extreme_headers(draw: st.DrawFn) -> tuple[list[bytes], str | None]:
    """A frame header, written as text, with one extreme: an integer of up to 6,000 digits in any numeric field, nesting
    up to 3,000 deep in ``meta``, or a header around the 64 KiB limit. Returns the message and the reason the protocol
    must give (None: accepted): past a limit ``bad_header``, within all of them whatever the reference classifier
    says (which can then parse the header itself)."""
    fields = {"v": "1", "frame_id": "1", "t_acq_ns": "null", "meta": "{}", "h": "4", "w": "4"}
    which = draw(st.sampled_from(["int", "depth", "size"]))
    beyond = False
    if which == "int":
        digits = draw(st.one_of(st.integers(1, 60), st.integers(60, 6000)))
        number = draw(st.sampled_from(["", "-"])) + "9" * digits
        field = draw(st.sampled_from(["v", "frame_id", "t_acq_ns", "meta", "h", "w"]))
        fields[field] = f'{{"k": {number}}}' if field == "meta" else number
        beyond = digits > 40
    elif which == "depth":
        depth = draw(st.integers(1, 3000))
        fields["meta"] = '{"a": ' * depth + "1" + "}" * depth
        beyond = depth + 1 > 32  # the header object is one level more
    else:
        fields["meta"] = '{"pad": "' + "x" * draw(st.integers(65_300, 65_700)) + '"}'
    header = (
        '{{"v": {v}, "kind": "frame", "scan_id": "x", "frame_id": {frame_id}, "dtype": "uint8", '
        '"shape": [{h}, {w}], "t_acq_ns": {t_acq_ns}, "meta": {meta}}}'.format(**fields)
    ).encode()
    frames = [header, b"\0" * 16]
    if beyond or len(header) > 64 * 1024:
        return frames, "bad_header"
    return frames, reference_verdict(frames, max_frame_bytes=MAX_FRAME_BYTES).reason


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(extreme_headers())
def test_numbers_depth_and_size_extremes_are_refused_before_they_cost_anything(case: tuple[list[bytes], Any]) -> None:
    frames, reason = case
    t0 = time.perf_counter()
    try:
        decode(frames, max_frame_bytes=MAX_FRAME_BYTES)
        got = None
    except ProtocolError as exc:
        got = exc.reason
        assert len(exc.detail) <= 1000
    assert time.perf_counter() - t0 < 0.5
    assert got == reason


def _nest(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(
    st.one_of(
        st.integers(1, 6000).map(lambda n: b'{"cmd": "set", "defect_threshold": ' + b"9" * n + b"}"),
        st.integers(1, 3000).map(lambda d: b'{"cmd": "status", "x": ' + _nest(d) + b"}"),
        st.integers(0, 70_000).map(lambda n: b'{"cmd": "reload", "artifact": "' + b"a" * n + b'"}'),
    )
)
def test_control_extremes_raise_only_protocol_errors(raw: bytes) -> None:
    try:
        decode_control(raw)
    except ProtocolError as exc:
        assert exc.reason == "bad_header" and exc.detail
