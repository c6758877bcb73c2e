"""Hot reload during a replay: no frame dropped, and every map names the model that made it.

A replay streams into a service whose first model sits behind a slow encoder (so frames are queued and in flight
when the reload lands); a ``reload`` of a second artifact is sent on the control socket mid-scan, and a failed reload
(an artifact with a tampered file) is tried too. Every frame must get exactly one ``maps``, ``model.sha256`` must
switch once, at a frame boundary (old model for every frame before some k, new one from k on), and each map must
equal the offline pipeline of the model it names on the same frame.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from artifact_factory import make_artifact
from slow_encoder import SlowEncoder

from sim.replay import replay
from streamer.maps.encoder import load
from streamer.maps.pipeline import Pipeline
from streamer.service.config import ServiceConfig
from streamer.service.facade import Service
from streamer.wire.client import ControlError, Controller, Subscriber

TIMEOUT_S = 30.0
N_FRAMES = 150


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    old = make_artifact(tmp_path_factory.mktemp("old"), seed=21, name="old", version="1")
    new = make_artifact(tmp_path_factory.mktemp("new"), seed=22, name="new", version="2")
    tampered = tmp_path_factory.mktemp("tampered") / "artifact"
    shutil.copytree(new, tampered)
    with (tampered / "encoder.onnx").open("ab") as f:
        f.write(b"\0")  # its sha256 no longer matches the manifest
    return old, new, tampered


def test_reload_mid_replay_drops_no_frame_and_switches_model_at_a_frame_boundary(
    artifacts: tuple[Path, Path, Path],
) -> None:
    old_dir, new_dir, tampered = artifacts
    old = load(old_dir, backend="onnx", device="cpu", batch_sizes=(1,))
    new = load(new_dir, backend="onnx", device="cpu", batch_sizes=(1,))
    rng = np.random.default_rng(0)
    frames = [rng.random((40, 40)).astype(np.float32) for _ in range(N_FRAMES)]
    cfg = ServiceConfig(
        ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", metrics_port=None,
        status_interval_s=0.05, device="cpu", queue_size=8, max_batch_patches=16, max_wait_ms=0.0,
        artifact_roots=[new_dir.parent, tampered.parent],
    )  # fmt: skip
    maps: dict[int, tuple[str, dict[str, np.ndarray]]] = {}
    errors: list[object] = []
    with (
        Service(cfg, encoder=SlowEncoder(old, 0.01)) as svc,
        Subscriber(svc.publish_endpoint, topics=("maps", "error", "scan_summary"), rcvhwm=0) as sub,
        Controller(svc.control_endpoint, timeout_ms=int(TIMEOUT_S * 1000)) as ctl,
    ):
        svc.wait_ready(TIMEOUT_S)
        sub.wait_connected(TIMEOUT_S)
        sent: list[int] = []
        producer = threading.Thread(
            target=lambda: sent.append(replay(frames, svc.ingest_endpoint, scan_id="reload", progress=False).frames),
            daemon=True,
        )
        producer.start()
        summary = None
        reloaded_at = failed_at = None
        deadline = time.monotonic() + TIMEOUT_S
        while summary is None and time.monotonic() < deadline:
            got = sub.recv(TIMEOUT_S)
            if got.topic == "maps":
                maps[got.msg.frame_id] = (got.msg.model.sha256, {k: np.array(v) for k, v in got.arrays.items()})
            elif got.topic == "error":
                errors.append(got.msg)
            else:
                summary = got.msg
            if failed_at is None and len(maps) >= 10:
                with pytest.raises(ControlError, match=r"sha256|hash|encoder\.onnx"):
                    ctl.reload(str(tampered))
                failed_at = len(maps)
            if reloaded_at is None and len(maps) >= 30:
                reply = ctl.reload(str(new_dir))  # frames are queued and in the encoder meanwhile
                assert reply.model["sha256"] == new.sha256
                reloaded_at = len(maps)
        producer.join(TIMEOUT_S)
    assert sent == [N_FRAMES] and summary is not None
    assert not errors, errors
    assert sorted(maps) == list(range(N_FRAMES)), "every frame has its maps"
    models = [maps[k][0] for k in range(N_FRAMES)]
    k_switch = models.index(new.sha256)
    assert models == [old.sha256] * k_switch + [new.sha256] * (N_FRAMES - k_switch), "one switch, at a frame boundary"
    assert reloaded_at is not None and 10 < k_switch < N_FRAMES, "the reload landed mid-scan"
    assert (summary.frames_received, summary.frames_published) == (N_FRAMES, N_FRAMES)
    offline = {old.sha256: Pipeline(old), new.sha256: Pipeline(new)}
    for k in (0, k_switch - 1, k_switch, N_FRAMES - 1):
        sha, arrays = maps[k]
        ref = offline[sha].process(frames[k])
        for name, value in arrays.items():
            np.testing.assert_allclose(value, ref.arrays[name], atol=1e-5, err_msg=f"frame {k} {name}")
    print(f"\nreload requested after {reloaded_at} maps; model switched at frame {k_switch} of {N_FRAMES}")
