"""The model slot, the one holder of the pipeline being served: waits end on a model or on shutdown, a ``set`` is one
step, and the batching worker reads its model from it — before the first model, after it, and at a stop without one.

A real (small, untrained) ONNX encoder, real threads, a real ``FrameQueue``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from artifact_factory import make_artifact

from streamer.maps.encoder import load
from streamer.maps.pipeline import Pipeline, PipelineError
from streamer.service.batching import Batcher
from streamer.service.frame_queue import FrameQueue, FrameResult, QueuedFrame
from streamer.service.metrics import ServiceMetrics
from streamer.service.model_slot import ModelSlot

T = 30.0
FRAMES = [np.random.default_rng(k).random((24 + 8 * k, 40), dtype=np.float32) for k in range(3)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    encoder = load(make_artifact(tmp_path_factory.mktemp("slot"), seed=3), device="cpu", batch_sizes=(1,))
    return Pipeline(encoder, max_batch_patches=16)


def _waiter(slot: ModelSlot) -> tuple[threading.Thread, list[Pipeline | None]]:
    got: list[Pipeline | None] = []
    thread = threading.Thread(target=lambda: got.append(slot.wait(T)))
    thread.start()
    return thread, got


def test_a_waiter_gets_the_first_pipeline_installed(pipeline: Pipeline) -> None:
    slot = ModelSlot()
    assert slot.wait(0) is None and slot.pipeline is None and not slot.ready.is_set()
    thread, got = _waiter(slot)
    slot.install(pipeline)
    thread.join(T)
    assert got == [pipeline] and slot.pipeline is pipeline and slot.ready.is_set()


def test_close_ends_every_wait_at_once_with_or_without_a_model(pipeline: Pipeline) -> None:
    slot = ModelSlot()
    thread, got = _waiter(slot)
    slot.close()
    thread.join(T)
    assert got == [None] and not slot.ready.is_set()
    t0 = time.monotonic()
    assert slot.wait(T) is None and time.monotonic() - t0 < T / 2
    slot.install(pipeline)  # a load that finishes during shutdown is still served
    assert slot.wait(T) is pipeline and slot.ready.is_set()


def test_replace_is_one_step_and_a_failed_change_leaves_the_slot_as_it_was(pipeline: Pipeline) -> None:
    slot = ModelSlot()
    with pytest.raises(RuntimeError, match="no model is loaded yet"):
        slot.replace(lambda p: p)
    slot.install(pipeline)
    updated = slot.replace(lambda p: p.with_defects(classes=None, threshold=0.9))
    assert slot.pipeline is updated is not pipeline
    assert updated.rule.threshold == 0.9 and updated.encoder is pipeline.encoder
    with pytest.raises(PipelineError, match="'no-such' is not one of the model's classes"):
        slot.replace(lambda p: p.with_defects(classes=["no-such"], threshold=None))
    assert slot.pipeline is updated


def _run_batcher(slot: ModelSlot, *, install: Pipeline | None) -> list[FrameResult]:
    """Frames queued before the worker starts; then the model (if any) arrives, then the stop."""
    queue, got = FrameQueue(len(FRAMES), "block"), []
    batcher = Batcher(
        queue, slot, emit=got.append, on_take=lambda: None, metrics=ServiceMetrics(), max_batch_patches=16,
        max_wait_ms=1.0,
    )  # fmt: skip
    for i, frame in enumerate(FRAMES):
        queue.put(QueuedFrame("s", i, frame, None, 0, 0.0))
    worker = threading.Thread(target=batcher.run)
    worker.start()
    if install is not None:
        slot.install(install)
    queue.close()
    if install is None:
        slot.close()  # what the I/O thread does at stop; without it the worker would wait for a model forever
    worker.join(T)
    assert not worker.is_alive()
    return got


def test_frames_waiting_for_the_first_model_are_encoded_with_it(pipeline: Pipeline) -> None:
    got = _run_batcher(ModelSlot(), install=pipeline)
    assert [r.frame.frame_id for r in got] == [0, 1, 2]
    for r in got:
        assert r.maps is not None, r.detail
        want = pipeline.process(r.frame.array)
        for name, array in want.arrays.items():
            np.testing.assert_allclose(r.maps.arrays[name], array, atol=1e-5, err_msg=name)


def test_a_stop_before_any_model_answers_every_waiting_frame(pipeline: Pipeline) -> None:
    got = _run_batcher(ModelSlot(), install=None)
    assert [(r.frame.frame_id, r.reason) for r in got] == [(0, "internal"), (1, "internal"), (2, "internal")]
    assert all(r.detail == "the service stopped before a model loaded" for r in got)
