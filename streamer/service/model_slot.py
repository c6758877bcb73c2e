"""The model slot: the one place that holds the pipeline the service serves now.

Three threads care about it: the loader threads put a pipeline in (at start, on ``reload``), the I/O thread replaces
it (``set``) and reads it (``status``), and the batching worker reads it at the start of every batch and after every
frame it takes (a frame accepted after a reload must not join a batch of the old model). Before the slot, the
pipeline lived in the batcher, the loader swapped it there under the frame queue's condition, and ``wait_ready``
polled it every 50 ms; now the slot alone holds it, behind its own lock, and says when the first one arrived with its
``ready`` event.

``Pipeline`` is immutable, so a reader keeps the one it read for as long as it likes (a batch finishes on the model
it started with) and nothing needs locking beyond the swap itself. ``close`` is for shutdown: waiters stop waiting
for a model that will not come.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from streamer.maps.pipeline import Pipeline

__all__ = ["ModelSlot"]


class ModelSlot:
    """Holds the current ``Pipeline``; ``ready`` is set once the first one is installed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pipeline: Pipeline | None = None
        self._closed = False
        self.ready = threading.Event()

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline serving now (``None`` before the first load)."""
        with self._lock:
            return self._pipeline

    def install(self, pipeline: Pipeline) -> None:
        """Serve ``pipeline`` from the next batch on (a batch being collected keeps the one it started with)."""
        with self._changed:
            self._pipeline = pipeline
            self.ready.set()
            self._changed.notify_all()

    def replace(self, change: Callable[[Pipeline], Pipeline]) -> Pipeline:
        """Install ``change(current)`` in one step, so no other install comes between the read and the write;
        ``RuntimeError`` before the first model. Whatever ``change`` raises leaves the slot as it was."""
        with self._changed:
            if self._pipeline is None:
                raise RuntimeError("no model is loaded yet")
            self._pipeline = change(self._pipeline)
            self._changed.notify_all()
            return self._pipeline

    def wait(self, timeout: float | None = None) -> Pipeline | None:
        """The pipeline, once there is one; ``None`` if ``timeout`` passed or the slot was closed before one came."""
        with self._changed:
            self._changed.wait_for(lambda: self._pipeline is not None or self._closed, timeout)
            return self._pipeline

    def close(self) -> None:
        """The service is stopping (or failed): ``wait`` returns at once from now on, with or without a model."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
