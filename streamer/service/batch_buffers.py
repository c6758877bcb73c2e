"""The encode stage's batch buffers and what fills them: the service's half of batching across frames.

``Pipeline`` (``streamer.maps.pipeline``) is the reference and knows nothing of buffers: it cuts a frame's patches
into a new tensor. The service instead writes the patches of a whole batch — several small frames, or a slice of a
huge one — straight into a buffer it reuses from encoder call to encoder call (``batch_buffer``), so cutting a patch
out of its frame, its patch-level transforms (FFT …) and the batching across frames are one copy, the only one a
patch gets. ``PatchWriter`` walks the frames of a batch in order and fills one buffer's worth at a time
(``PreparedFrame.write`` does the per-frame work), timing each frame's share for the ``fft`` stage metric.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from streamer.maps.arrays import Array, dtype_name, is_tensor, require_torch, sync
from streamer.maps.pipeline import Pipeline, PreparedFrame

__all__ = ["PatchWriter", "batch_buffer", "fits"]


def batch_buffer(pipeline: Pipeline) -> Array:
    """An encoder input buffer for ``pipeline``: one call's worth of patches (``max_batch_patches``), on its device
    (numpy on the CPU, which needs no torch)."""
    shape = (pipeline.max_batch_patches, 1, *pipeline.patch)
    if pipeline.device == "cpu":
        return np.empty(shape, np.float32)
    torch = require_torch("a CUDA device")
    return torch.empty(shape, dtype=torch.float32, device=pipeline.device)


def fits(buffer: Array, pipeline: Pipeline) -> bool:
    """Whether ``buffer`` is what ``batch_buffer(pipeline)`` would make (shape, float32, numpy or on the device)."""
    if tuple(buffer.shape) != (pipeline.max_batch_patches, 1, *pipeline.patch) or dtype_name(buffer) != "float32":
        return False
    return not is_tensor(buffer) if pipeline.device == "cpu" else is_tensor(buffer) and buffer.device == pipeline.device


class PatchWriter:
    """The patches of a batch's prepared frames, in order, written chunk by chunk into batch buffers.

    ``seconds[i]`` accumulates the time spent writing frame ``i``'s patches (the service's ``fft`` stage: cutting
    the patches and their patch-level transforms).
    """

    def __init__(self, frames: Sequence[PreparedFrame]) -> None:
        self.frames = list(frames)
        self.total = sum(frame.n for frame in self.frames)
        self.written = 0
        self.seconds = [0.0] * len(self.frames)
        self._index = 0  # the next patch: frame index, and patch within that frame
        self._offset = 0

    def write(self, out: Array) -> None:
        """The next ``out.shape[0]`` patches into ``out``; the work is finished on the device when this returns."""
        size = int(out.shape[0])
        if size > self.total - self.written:
            raise ValueError(f"asked for {size} patches but only {self.total - self.written} are left to write")
        filled = 0
        while filled < size:
            frame = self.frames[self._index]
            take = min(frame.n - self._offset, size - filled)
            if take > 0:
                t0 = time.perf_counter()
                frame.write(self._offset, self._offset + take, out[filled : filled + take])
                sync(out)  # on CUDA, else the fft stage's timing would be of kernel launches only
                self.seconds[self._index] += time.perf_counter() - t0
            filled += take
            self._offset += take
            if self._offset == frame.n:
                self._index, self._offset = self._index + 1, 0
        self.written += size
