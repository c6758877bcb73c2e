"""Which model the service serves: loading artifacts off the I/O thread, building pipelines, swapping them in.

A load (at start, and on the control command ``reload``) runs on a short-lived loader thread, so a slow load never
stalls ingest; the I/O thread answers the ``reload`` request once the job is done (REP allows one request at a time
anyway), or once ``reload_timeout_s`` has passed — then the job is abandoned (its result, if it ever comes, is thrown
away) and no other reload starts until its thread has ended. A reload may only name a directory under
``artifact_roots`` (resolved, symlinks followed, before anything is opened); its refusal says so whether or not the
path exists, so the control socket cannot be used to probe the filesystem. Files adding up to more than
``max_artifact_bytes`` are refused before they are read.

Installing a pipeline puts it in the model slot (``streamer.service.model_slot``), which the batcher reads from its
next batch on: frames in flight finish on the old model. ``set`` (defect classes and threshold) builds a new pipeline
on the same encoder, no reload.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamer.maps.pipeline import EncoderLike, Pipeline
from streamer.service.config import ServiceConfig
from streamer.service.metrics import ServiceMetrics
from streamer.service.model_slot import ModelSlot

__all__ = ["ModelLoader", "ReloadJob", "ReloadRefusedError", "under_roots"]


class ReloadRefusedError(ValueError):
    """A reload that is not started: outside the artifact roots, or another one still running."""


@dataclass
class ReloadJob:
    """A reload in progress on a loader thread; the I/O thread replies once ``done`` is set or ``deadline`` passed."""

    artifact: str
    deadline: float = float("inf")  # time.monotonic()
    done: threading.Event = field(default_factory=threading.Event)
    pipeline: Pipeline | None = None
    error: BaseException | None = None


def under_roots(artifact: str, roots: Sequence[Path]) -> Path:
    """``artifact`` resolved, if it lies under one of ``roots``; else ``ReloadRefusedError``, worded the same whether
    or not the path exists."""
    resolved = Path(os.path.realpath(artifact))
    for root in roots:
        if resolved.is_relative_to(os.path.realpath(root)):
            return resolved
    if not roots:
        raise ReloadRefusedError(
            "reload is off: the service was given no artifact path, so no artifact_roots were derived; set "
            "artifact_roots in the serve config to the directories reload may load from"
        )
    raise ReloadRefusedError(
        f"artifact {artifact[:200]!r} is not under the artifact_roots {[str(r) for r in roots]}; copy it there or "
        "add its directory to artifact_roots in the serve config"
    )


class ModelLoader:
    """Builds, loads and installs pipelines for the service; ``backend``/``device`` describe the model serving now."""

    def __init__(
        self,
        cfg: ServiceConfig,
        *,
        slot: ModelSlot,
        metrics: ServiceMetrics,
        backend: str,
        device: str,
        on_done: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.slot = slot
        self.metrics = metrics
        self.backend, self.device = backend, device
        self.on_done = on_done  # a reload finished: wake the I/O thread
        self.defect_classes: list[str | int] | None = cfg.defect_classes
        self.roots: list[Path] = list(cfg.artifact_roots or ([cfg.artifact.parent] if cfg.artifact else []))
        self._last: ReloadJob | None = None  # still not done when the next reload comes: it was abandoned

    def build(self, encoder: EncoderLike) -> Pipeline:
        """A pipeline on ``encoder`` with the service's defect and batching settings (those ``set`` changed last)."""
        current = self.slot.pipeline
        return Pipeline(
            encoder,
            defect_classes=self.defect_classes,
            defect_threshold=current.rule.threshold if current is not None else self.cfg.defect_threshold,
            connectivity=self.cfg.connectivity,
            max_share=self.cfg.defect_max_share,
            max_batch_patches=self.cfg.max_batch_patches,
        )

    def load(self, artifact: str) -> EncoderLike:
        from streamer.maps.encoder import load

        return load(
            artifact,
            backend=self.cfg.backend,
            device=self.cfg.device,
            batch_sizes=(1, self.cfg.max_batch_patches),
            intra_op_threads=self.cfg.intra_op_threads,
            max_bytes=self.cfg.max_artifact_bytes,
            frame_encoder=self.cfg.frame_encoder,
        )

    def load_configured(self) -> None:
        """Load ``cfg.artifact`` and serve it (the loader thread at start)."""
        if self.cfg.artifact is None:
            raise ValueError("no artifact configured to load")
        self.install(self.build(self.load(str(self.cfg.artifact))))

    def install(self, pipeline: Pipeline) -> None:
        self.backend, self.device = pipeline.encoder.backend, pipeline.encoder.device
        self.metrics.set_model(pipeline.model, backend=self.backend, device=self.device)
        self.slot.install(pipeline)

    def start_reload(self, artifact: str) -> ReloadJob:
        """Load ``artifact`` on a loader thread; the job says when it is done and what came of it.

        ``ReloadRefusedError`` (nothing started) for a path outside the roots, or while an abandoned reload still runs.
        """
        path = under_roots(artifact, self.roots)
        if self._last is not None and not self._last.done.is_set():
            raise ReloadRefusedError("a previous reload is still running (it timed out); try again once it has ended")
        job = self._last = ReloadJob(str(path), deadline=time.monotonic() + self.cfg.reload_timeout_s)
        threading.Thread(target=self._reload, args=(job,), name="atomstream-reload", daemon=True).start()
        return job

    def _reload(self, job: ReloadJob) -> None:
        try:
            job.pipeline = self.build(self.load(job.artifact))
        except Exception as exc:
            job.error = exc
        finally:
            job.done.set()
            self.on_done()

    def set_defects(self, *, classes: Sequence[str | int] | None, threshold: float | None) -> Pipeline:
        """Serve the current model with new defect settings (``PipelineError`` for unknown classes)."""
        updated = self.slot.replace(lambda current: current.with_defects(classes=classes, threshold=threshold))
        if classes is not None:
            self.defect_classes = list(classes)
        return updated
