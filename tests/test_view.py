"""``atomstream view``: the snapshot codec, and the page in a real headless Chromium against a real service fed by
``replay`` — the maps must reach the browser and be drawn."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from artifact_factory import make_artifact
from browser import CHROMIUM, dump_dom, screenshot
from cli_process import read_line, running
from zmq_helpers import TIMEOUT_S, service_config

from atomstream.view.snapshot import decode_snapshot, encode_snapshot
from sim.lattice import LatticeConfig, synth_frame
from sim.replay import replay
from streamer.service.facade import Service

CLASS_NAMES = ("substrate", "film", "edge")
N_FRAMES = 6


def test_snapshot_round_trips_arrays_of_awkward_sizes() -> None:
    arrays = {
        "class": np.arange(7 * 5, dtype=np.uint8).reshape(7, 5),
        "z0": np.linspace(-1, 1, 3 * 11, dtype=np.float32).reshape(3, 11),
        "frame": np.full((1, 3), 9, dtype=np.uint8),
    }
    header, back = decode_snapshot(encode_snapshot({"n_maps": 3, "text": "é"}, arrays))
    assert header == {"n_maps": 3, "text": "é"}
    assert set(back) == set(arrays)
    for name, a in arrays.items():
        np.testing.assert_array_equal(back[name], a)
        assert back[name].dtype == a.dtype


def test_snapshot_refuses_a_dtype_the_page_cannot_read() -> None:
    with pytest.raises(ValueError, match="int64"):
        encode_snapshot({}, {"bad": np.zeros(3, dtype=np.int64)})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("view-artifact"), seed=5, class_names=CLASS_NAMES)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = LatticeConfig(shape=(96, 128), lattice_constant=9.0, n_defects=3)
    frames = np.stack([synth_frame(cfg, seed=k)[0] for k in range(N_FRAMES)]).astype(np.float32)
    path = tmp_path_factory.mktemp("view-scan") / "lattice.npy"
    np.save(path, frames)
    return path


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S + 10) as r:
        data = json.loads(r.read())
    assert isinstance(data, dict)
    return data


@pytest.fixture
def live_view(artifact: Path, scan: Path) -> Iterator[tuple[str, Service]]:
    """A service, and ``atomstream view`` subscribed to it (connected: it has seen a heartbeat)."""
    with Service(service_config(artifact=artifact)) as svc:
        svc.wait_ready(TIMEOUT_S)
        with running("view", "--port", "0", "--endpoint", svc.publish_endpoint, "--frame-file", str(scan)) as proc:
            url = re.search(r"http://\S+", read_line(proc, 60.0)).group(0)  # type: ignore[union-attr]
            assert _get_json(f"{url}state?connected=1&timeout={TIMEOUT_S}")["connected"]
            yield url, svc


def test_the_view_serves_the_replayed_maps(live_view: tuple[str, Service], scan: Path) -> None:
    url, svc = live_view
    meta = {"pixel_size": 0.0195, "unit": "nm"}
    replay(np.load(scan), svc.ingest_endpoint, scan_id="viewed", meta=meta, progress=False)
    state = _get_json(f"{url}state?min_frames={N_FRAMES}&timeout={TIMEOUT_S}")
    assert state["n_maps"] == state["n_frames"] == N_FRAMES and state["error"] is None
    with urllib.request.urlopen(f"{url}snapshot", timeout=TIMEOUT_S) as r:
        header, arrays = decode_snapshot(r.read())
    assert header["frame"]["frame_id"] == N_FRAMES - 1 and header["frame"]["class_names"] == list(CLASS_NAMES)
    assert (header["frame"]["pixel_size"], header["frame"]["pixel_unit"]) == (0.0195, "nm")
    assert {"class", "defect_score", "z0", "z1", "angle", "frame"} <= set(arrays)
    gh, gw = header["frame"]["grid"]
    assert arrays["class"].shape == arrays["z1"].shape == (gh, gw)
    assert arrays["frame"].shape == (96, 128)
    assert np.all(np.abs(arrays["angle"]) <= 180.0)
    assert len(header["history"]["fractions"]) == N_FRAMES
    np.testing.assert_allclose(np.sum(header["history"]["fractions"], axis=1), 1.0, atol=1e-3)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium; .ci/run does)")
def test_a_headless_browser_draws_the_live_maps(live_view: tuple[str, Service], scan: Path, tmp_path: Path) -> None:
    url, svc = live_view
    replay(
        np.load(scan), svc.ingest_endpoint, scan_id="viewed", meta={"pixel_size": 0.0195, "unit": "nm"}, progress=False
    )
    assert _get_json(f"{url}state?min_frames={N_FRAMES}&timeout={TIMEOUT_S}")["n_frames"] == N_FRAMES

    dom = dump_dom(url)
    drawn = re.search(r'data-frames-drawn="(\d+)"', dom)
    assert drawn is not None and int(drawn.group(1)) >= 1, dom[:2000]
    assert f'data-frame-id="{N_FRAMES - 1}"' in dom
    assert f"<title>atomstream view · {N_FRAMES} maps</title>" in dom
    assert f"frame {N_FRAMES - 1} · pixel 0.0195 nm" in dom
    for name in CLASS_NAMES:  # the legend names every class
        assert re.search(rf"</span>{name} \d+\.\d%</li>", dom), name

    from PIL import Image

    picture = Image.open(screenshot(url, tmp_path / "view.png")).convert("RGB")
    assert picture.size == (1240, 1000)
    colours = np.asarray(picture).reshape(-1, 3)
    tab10 = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44]])  # the first class colours, blended over grey
    assert len(np.unique(colours, axis=0)) > 500  # maps, not an empty page
    assert np.sum(np.all(colours == tab10[0], axis=1)) + np.sum(np.all(colours == tab10[2], axis=1)) > 0
