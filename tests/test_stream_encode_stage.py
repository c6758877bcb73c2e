"""The buffered encode path and the encoder thread: same outputs as the plain path, every frame out once, in order.

A real (small, untrained) ONNX encoder throughout; wrappers only add a gate or a failure to it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_factory import make_artifact

from streamer.maps.encoder import Encoder, load
from streamer.maps.pipeline import Pipeline, PreparedFrame
from streamer.service.batch_buffers import PatchWriter, batch_buffer, fits
from streamer.service.encode_stage import EncodeStage
from streamer.service.frame_queue import FrameResult, QueuedFrame
from streamer.service.metrics import ServiceMetrics

TIMEOUT_S = 30.0
FRAMES = [
    np.random.default_rng(0).random((40, 40), dtype=np.float32),  # 16 patches
    (np.random.default_rng(1).random((33, 71)) * 250).astype(np.uint8),  # 21
    (np.random.default_rng(2).random((24, 64)) * 900).astype(np.int16),  # 14
    np.random.default_rng(3).random((16, 16), dtype=np.float32),  # 1
]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return load(make_artifact(tmp_path_factory.mktemp("stage"), seed=4), device="cpu", batch_sizes=(1,))


class Wrapped:
    """The encoder with a gate (calls wait for it) and an optional failing call."""

    def __init__(self, inner: Encoder, *, fail_call: int | None = None) -> None:
        self.inner, self.fail_call = inner, fail_call
        self.manifest, self.backend, self.device = inner.manifest, inner.backend, inner.device
        self.torch_device, self.sha256 = inner.torch_device, inner.sha256
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.calls = 0

    def __call__(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.entered.set()
        if not self.gate.wait(TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")
        if self.calls == self.fail_call:
            raise RuntimeError("device lost")
        return self.inner(patches)


def _queued(i: int) -> QueuedFrame:
    return QueuedFrame("s", i, FRAMES[i % len(FRAMES)], None, 0, 0.0)


def _batch(pipe: Pipeline, ids: list[int]) -> list[tuple[QueuedFrame, PreparedFrame]]:
    return [(_queued(i), pipe.prepare(FRAMES[i % len(FRAMES)])) for i in ids]


def test_patches_written_through_reused_buffers_equal_the_cut_patches_bit_for_bit(encoder: Encoder) -> None:
    """The service's one-copy path (``PatchWriter`` into a reused ``batch_buffer``, chunks straddling frames) gives
    the encoder exactly the patches ``Pipeline.process`` cuts, so its outputs, joined, are ``Pipeline.encode``'s."""
    pipe = Pipeline(encoder, max_batch_patches=7)
    prepared = [pipe.prepare(f) for f in FRAMES]
    cut = np.concatenate([p.patches for p in prepared])  # the CPU path: numpy, no torch
    want = pipe.encode(cut)
    buffer = batch_buffer(pipe)
    assert isinstance(buffer, np.ndarray) and buffer.shape == (7, 1, 16, 16) and fits(buffer, pipe)
    assert not fits(torch.from_numpy(buffer), pipe) and not fits(buffer[:6], pipe)
    sizes: list[int] = []
    for _ in range(2):  # the second pass reuses the buffer the first one filled
        writer, calls = PatchWriter(prepared), []
        sizes.clear()
        while writer.written < writer.total:
            chunk = buffer[: min(7, writer.total - writer.written)]
            writer.write(chunk)
            assert np.array_equal(chunk, cut[writer.written - len(chunk) : writer.written])
            calls.append(pipe.call_encoder(chunk, observe=lambda n, s: sizes.append(n)))
        got = pipe.join(calls)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        assert sum(sizes) == len(cut) == 52 and max(sizes) == 7
        assert len(writer.seconds) == len(FRAMES) and all(s > 0 for s in writer.seconds)
    with pytest.raises(ValueError, match="asked for 7 patches but only 0 are left"):
        writer.write(buffer)


def _run_stage(stage: EncodeStage, work: list[object], pipe: Pipeline) -> None:
    stage.start()
    try:
        for item in work:
            if isinstance(item, FrameResult):
                stage.pass_through(item)
            else:
                stage.submit(pipe, _batch(pipe, item))  # type: ignore[arg-type]
    finally:
        stage.close()


def test_every_frame_leaves_once_in_the_order_submitted_with_the_maps_of_the_pipeline(encoder: Encoder) -> None:
    pipe = Pipeline(encoder, max_batch_patches=10)
    got: list[FrameResult] = []
    stage = EncodeStage(emit=got.append, metrics=ServiceMetrics())
    rejected = FrameResult(_queued(3), reason="shape_mismatch", detail="too small")
    _run_stage(stage, [[0, 1], rejected, [2], [4, 5, 6, 7]], pipe)
    assert [r.frame.frame_id for r in got] == [0, 1, 3, 2, 4, 5, 6, 7]
    assert got[2] is rejected
    for r in got[:2] + got[3:]:
        assert r.maps is not None
        want = pipe.process(r.frame.array)
        for name, array in want.arrays.items():
            np.testing.assert_allclose(r.maps.arrays[name], array, atol=1e-5, err_msg=name)


def test_a_failed_encoder_call_fails_its_batch_only(encoder: Encoder) -> None:
    wrapped = Wrapped(encoder, fail_call=2)
    pipe = Pipeline(wrapped, max_batch_patches=10)
    got: list[FrameResult] = []
    _run_stage(EncodeStage(emit=got.append, metrics=ServiceMetrics()), [[0], [1, 2], [3]], pipe)
    # calls: frame 0 → 1, 2 (16 patches); frames 1+2 → 3..6 (35); frame 3 → 7
    assert [(r.frame.frame_id, r.reason) for r in got] == [(0, "internal"), (1, None), (2, None), (3, None)]
    assert "device lost" in got[0].detail and "16 patches" in got[0].detail


def test_a_failure_of_the_thread_itself_surfaces_on_close(encoder: Encoder) -> None:
    def emit(result: FrameResult) -> None:
        raise OSError("outbox gone")

    stage = EncodeStage(emit=emit, metrics=ServiceMetrics()).start()
    stage.pass_through(FrameResult(_queued(0), reason="internal"))
    with pytest.raises(OSError, match="outbox gone"):
        stage.close()


def test_wait_idle_waits_for_the_encoder_to_finish(encoder: Encoder) -> None:
    wrapped = Wrapped(encoder)
    wrapped.gate.clear()
    pipe = Pipeline(wrapped, max_batch_patches=64)
    got: list[FrameResult] = []
    stage = EncodeStage(emit=got.append, metrics=ServiceMetrics()).start()
    idle = threading.Event()
    try:
        stage.submit(pipe, _batch(pipe, [0]))
        assert wrapped.entered.wait(TIMEOUT_S)
        waiter = threading.Thread(target=lambda: (stage.wait_idle(), idle.set()))
        waiter.start()
        assert not idle.wait(0.2)  # the encoder is inside its (gated) call
        wrapped.gate.set()
        assert idle.wait(TIMEOUT_S)
        waiter.join()
    finally:
        wrapped.gate.set()
        stage.close()
    assert [r.frame.frame_id for r in got] == [0]


def test_a_new_patch_size_gets_new_buffers(encoder: Encoder, tmp_path: Path) -> None:
    small = load(make_artifact(tmp_path, patch=(8, 8), stride=(4, 4), seed=5), device="cpu", batch_sizes=(1,))
    big_pipe, small_pipe = Pipeline(encoder, max_batch_patches=9), Pipeline(small, max_batch_patches=9)
    got: list[FrameResult] = []
    stage = EncodeStage(emit=got.append, metrics=ServiceMetrics()).start()
    try:
        stage.submit(big_pipe, _batch(big_pipe, [0]))
        stage.submit(small_pipe, _batch(small_pipe, [1]))
    finally:
        stage.close()
    assert [r.maps.patch if r.maps else r.detail for r in got] == [(16, 16), (8, 8)]
