"""``atomstream record`` against a real service fed by ``replay``: the HDF5 file holds every frame's maps equal to
the offline pipeline's, the defects in pixels and calibrated units, the model identity and the provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from artifact_factory import make_artifact
from cli_process import read_line, running
from zmq_helpers import TIMEOUT_S, service_config

from atomstream.cli import main
from sim.lattice import LatticeConfig, synth_frame
from sim.replay import replay
from streamer.maps.encoder import load
from streamer.maps.pipeline import Pipeline
from streamer.service.facade import Service

CLASS_NAMES = ("substrate", "film", "edge")
PIXEL_NM = 0.0195


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("record-artifact"), seed=3, class_names=CLASS_NAMES)


def _frames() -> np.ndarray:
    cfg = LatticeConfig(shape=(72, 88), lattice_constant=9.0, n_defects=4)
    return np.stack([synth_frame(cfg, seed=k)[0] for k in range(5)]).astype(np.float32)


def test_a_recorded_scan_reads_back_with_maps_defects_units_and_provenance(artifact: Path, tmp_path: Path) -> None:
    frames, out = _frames(), tmp_path / "scan.h5"
    with Service(service_config(artifact=artifact)) as svc:
        svc.wait_ready(TIMEOUT_S)
        args = ("record", str(out), "--endpoint", svc.publish_endpoint, "--scans", "1", "--artifact", str(artifact))
        with running(*args) as proc:
            assert read_line(proc, 60.0).startswith("recording from")
            meta = {"pixel_size": PIXEL_NM, "unit": "nm"}
            replay(frames, svc.ingest_endpoint, scan_id="sto-1", meta=meta, progress=False)
            assert proc.wait(timeout=TIMEOUT_S) == 0, proc.stderr.read() if proc.stderr else ""
            assert "recorded 5 frame(s)" in read_line(proc, 5.0)

    pipeline = Pipeline(load(artifact, backend="onnx", device="cpu"))
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "atomstream-record" and f.attrs["endpoint"].startswith("tcp://")
        model = f["models/0"]
        assert list(model.attrs["class_names"]) == list(CLASS_NAMES)
        manifest = json.loads(model.attrs["manifest"])
        assert model.attrs["sha256"] == hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
        assert manifest == json.loads((artifact / "manifest.json").read_text())
        scan = f["scans/sto-1"]
        assert scan.attrs["pixel_unit"] == "nm" and scan.attrs["pixel_size"] == pytest.approx(PIXEL_NM)
        assert (scan.attrs["frames_received"], scan.attrs["frames_published"], scan.attrs["frames_rejected"]) == (
            5,
            5,
            0,
        )
        np.testing.assert_array_equal(scan["frame_id"][:], np.arange(5))
        np.testing.assert_array_equal(scan["model"][:], np.zeros(5))
        assert np.all(scan["t_pub_ns"][:] >= scan["t_recv_ns"][:])
        # axes: patch centres in pixels and in nm, attached to the maps as dimension scales
        cls = scan["class"]
        assert [d.label for d in cls.dims] == ["frame", "y", "x"]
        y_px, y_nm = cls.dims[1][0], cls.dims[1][1]
        np.testing.assert_allclose(y_nm[:], y_px[:] * PIXEL_NM)
        assert y_nm.attrs["units"] == "nm" and scan["angle"].attrs["units"] == "rad"
        defects = scan["defects"][:]
        for k, frame in enumerate(frames):
            ref = pipeline.process(frame)
            np.testing.assert_array_equal(cls[k], ref.arrays["class"])
            np.testing.assert_allclose(scan["z"][k], ref.arrays["z"], atol=1e-5)
            np.testing.assert_allclose(scan["defect_score"][k], ref.arrays["defect_score"], atol=1e-5)
            mine = defects[defects["frame_id"] == k]
            assert len(mine) == len(ref.defects)
            np.testing.assert_allclose(mine["y"], [d.y for d in ref.defects], atol=1e-4)
            np.testing.assert_allclose(mine["x_calibrated"], mine["x"] * PIXEL_NM)
        assert f["errors"].shape == (0,)


def test_record_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken.h5"
    out.write_bytes(b"precious")
    assert main(["record", str(out), "--endpoint", "tcp://127.0.0.1:1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_a_frame_with_a_nonsense_pixel_size_is_refused_by_name() -> None:
    from streamer.wire.protocol import Frame

    with pytest.raises(ValueError, match="pixel_size"):
        Frame(scan_id="s", frame_id=0, dtype="float32", shape=[4, 4], meta={"pixel_size": -1})
    ok = Frame(scan_id="s", frame_id=0, dtype="float32", shape=[4, 4], meta={"pixel_size": 0.02, "pixel_unit": "nm"})
    assert (ok.pixel_size, ok.pixel_unit) == (0.02, "nm")


def test_atom_centred_maps_are_stored_flat_with_offsets(tmp_path: Path) -> None:
    """Points layout: a different number of patches per frame, rows of frame k at offsets[k]:offsets[k+1]."""
    from atomstream.recorder import Recorder
    from sim.replay import Replayer
    from streamer.wire.client import Subscriber

    artifact = make_artifact(tmp_path / "points-artifact", layout="points", seed=2, class_names=CLASS_NAMES)
    frames = _frames()[:3]
    pipeline = Pipeline(load(artifact, backend="onnx", device="cpu"))
    out = tmp_path / "points.h5"
    with (
        Service(service_config(artifact=artifact)) as svc,
        Subscriber(svc.publish_endpoint, ("maps", "defects", "error", "scan_summary")) as sub,
        Recorder(out, endpoint=svc.publish_endpoint) as recorder,
    ):
        svc.wait_ready(TIMEOUT_S)
        sub.wait_connected(TIMEOUT_S)
        with Replayer(svc.ingest_endpoint, scan_id="atoms", progress=False) as producer:
            producer.send_scan(frames)
        while recorder.summaries < 1:
            recorder.add(sub.recv(TIMEOUT_S))
    with h5py.File(out, "r") as f:
        scan = f["scans/atoms"]
        offsets = scan["offsets"][:]
        assert len(offsets) == len(frames) + 1 and offsets[0] == 0 and offsets[-1] == scan["class"].shape[0]
        for k, frame in enumerate(frames):
            ref = pipeline.process(frame)
            rows = slice(offsets[k], offsets[k + 1])
            np.testing.assert_array_equal(scan["class"][rows], ref.arrays["class"])
            np.testing.assert_allclose(scan["centers"][rows], ref.arrays["centers"], atol=1e-5)
        assert scan.attrs["layout"] == "points" and np.isnan(scan.attrs["pixel_size"])
