"""Live equals offline: maps from sim → ZeroMQ → service → Subscriber equal ``Pipeline.process`` on the same frames,
on loopback with random ports, for awkward frame shapes and dtypes, in the grid and the atom-centred layouts."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
from artifact_factory import make_artifact

from sim.lattice import LatticeConfig, synth_frame
from sim.replay import Replayer
from streamer.maps.encoder import load
from streamer.maps.pipeline import Pipeline
from streamer.service.config import ServiceConfig
from streamer.service.facade import Service
from streamer.wire.client import Subscriber

T = 20.0
ATOL = 1e-5


def scan() -> list[np.ndarray]:
    """Odd shapes on purpose (not multiples of the patch or stride), and every common detector dtype."""
    a, _ = synth_frame(LatticeConfig(shape=(97, 130), n_defects=3), seed=1)
    b, _ = synth_frame(LatticeConfig(shape=(130, 97), n_defects=1, kind="hexagonal"), seed=2)
    c, _ = synth_frame(LatticeConfig(shape=(64, 65), n_defects=0), seed=3)
    scaled = (a - a.min()) / (np.ptp(a) or 1.0)
    return [
        a.astype(np.float32),
        (scaled * 60000).astype(np.uint16),
        b.astype(np.float64),
        (c * 100).astype(np.int32),
    ]


@pytest.mark.parametrize("layout", ["grid", "points"])
def test_live_maps_equal_the_in_process_pipeline(
    tmp_path_factory: pytest.TempPathFactory, layout: Literal["grid", "points"]
) -> None:
    artifact = make_artifact(
        tmp_path_factory.mktemp(layout), layout=layout, translation=True, stride=(7, 9), seed=4, defect_classes=(2,)
    )
    frames = scan()
    offline = Pipeline(load(artifact, backend="onnx", device="cpu"), defect_threshold=0.3)
    expected = [offline.process(f) for f in frames]
    cfg = ServiceConfig(
        artifact=artifact,
        backend="onnx",
        device="cpu",
        ingest="tcp://127.0.0.1:0",
        publish="tcp://127.0.0.1:0",
        control="tcp://127.0.0.1:0",
        metrics_port=None,
        status_interval_s=0.05,
        defect_threshold=0.3,
        max_batch_patches=64,  # several frames per batch and several batches per frame: batching must not matter
        linger_ms=0,
    )
    with Service(cfg) as service, Subscriber(service.publish_endpoint, ("maps", "defects", "scan_summary")) as sub:
        service.wait_ready(T)
        sub.wait_connected(T)
        with Replayer(service.ingest_endpoint, progress=False, scan_id=f"live-{layout}") as producer:
            producer.send_scan(frames)
        maps, defects = {}, {}
        while True:
            got = sub.recv(T)
            if got.topic == "scan_summary":
                break
            (maps if got.topic == "maps" else defects)[got.msg.frame_id] = got
    assert sorted(maps) == sorted(defects) == list(range(len(frames)))
    assert got.msg.frames_published == len(frames) and got.msg.frames_rejected == 0
    assert sub.stats.n_gaps == 0
    for k, want in enumerate(expected):
        live = maps[k]
        assert live.msg.layout == want.layout == layout
        assert live.msg.grid == (list(want.grid) if want.grid is not None else None)
        assert (live.msg.patch, live.msg.stride, live.msg.origin) == (
            list(want.patch),
            list(want.stride),
            list(want.origin),
        )
        assert list(live.arrays) == list(want.arrays)
        for name, array in want.arrays.items():
            got_array = live.arrays[name]
            assert got_array.shape == array.shape and got_array.dtype == array.dtype, name
            if name == "class":
                np.testing.assert_array_equal(got_array, array)
            else:
                np.testing.assert_allclose(got_array, array, atol=ATOL, err_msg=f"frame {k} {name}")
        live_defects = [(d.y, d.x, d.class_, d.area) for d in defects[k].msg.defects]
        assert live_defects == [(d.y, d.x, d.class_, d.area) for d in want.defects]
        np.testing.assert_allclose(
            [d.score for d in defects[k].msg.defects], [d.score for d in want.defects], atol=ATOL
        )
    if layout == "points":
        assert all(len(maps[k].arrays["centers"]) > 0 for k in maps)  # atoms were found in every frame
