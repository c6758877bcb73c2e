"""What the command line tells a user: replay reports the service's verdict on every frame, endpoints without a
transport get a hint, an RGB picture is read as grey frames, export will not overwrite an artifact by accident."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from artifact_factory import make_artifact
from zmq_helpers import TIMEOUT_S, service_config

from atomstream.cli import main
from sim.formats import read_scan
from streamer.service.facade import Service


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("feedback-artifact"), seed=1)


def _replay(capsys: pytest.CaptureFixture[str], path: Path, svc: Service) -> tuple[int, str, str]:
    code = main(
        ["replay", str(path), "--endpoint", svc.ingest_endpoint, "--publish", svc.publish_endpoint, "--no-progress"]
    )
    out, err = capsys.readouterr()
    return code, out, err


def test_replay_reports_rejected_frames_with_their_reasons(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = np.random.default_rng(0).random((5, 40, 48), dtype=np.float32)
    frames[1, 3, 4] = np.nan
    frames[3] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, frames)
    with Service(service_config(artifact=artifact)) as svc:
        svc.wait_ready(TIMEOUT_S)
        code, out, _ = _replay(capsys, path, svc)
        assert code == 1, out
        assert "sent 5 frames" in out
        assert "the service received 5, published 3, rejected 2, dropped 0" in out
        assert "non_finite ×2: frame 1:" in out

        np.save(path, frames[[0, 2, 4]])
        code, out, _ = _replay(capsys, path, svc)
        assert code == 0 and "published 3, rejected 0" in out


def test_replay_without_a_service_says_it_cannot_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "s.npy", np.zeros((1, 8, 8), np.float32))
    argv = ["replay", str(tmp_path / "s.npy"), "--endpoint", "tcp://127.0.0.1:1", "--publish", "tcp://127.0.0.1:1"]
    assert main([*argv, "--send-timeout-ms", "200", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no heartbeat from the service on --publish tcp://127.0.0.1:1" in err
    assert "is the service running?" in err and err.count("\n") == 2  # the warning and the one-line error


@pytest.mark.parametrize(
    ("endpoint", "hint"),
    [
        ("127.0.0.1:5555", "needs a transport, e.g. tcp://127.0.0.1:5555"),
        ("localhost", "needs a transport, e.g. tcp://127.0.0.1:5556"),
        ("udp://127.0.0.1:5555", "unknown transport 'udp'"),
        ("tcp://127.0.0.1", "a tcp endpoint is tcp://HOST:PORT"),
        ("tcp://127.0.0.1:99999", "port 99999 is out of range"),
    ],
)
def test_an_endpoint_that_zeromq_would_call_an_invalid_argument_gets_a_hint(
    endpoint: str, hint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "s.npy", np.zeros((1, 8, 8), np.float32))
    for argv in (["replay", str(tmp_path / "s.npy"), "--endpoint", endpoint], ["watch", "--endpoint", endpoint]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert hint in err and "--endpoint" in err and "\n" not in err


def test_an_rgb_picture_is_read_as_grey_frames_and_says_so(tmp_path: Path) -> None:
    rgb = np.zeros((64, 80, 3), np.uint8)
    rgb[..., 1] = 200
    np.save(tmp_path / "rgb.npy", rgb)
    scan = read_scan(tmp_path / "rgb.npy")
    assert scan.frames.shape == (1, 64, 80)
    np.testing.assert_allclose(scan.frames, 0.587 * 200, rtol=1e-6)
    assert "RGB image of shape (64, 80, 3)" in scan.meta["converted"]
    np.save(tmp_path / "rgba.npy", np.ones((3, 16, 20, 4), np.float32))
    assert read_scan(tmp_path / "rgba.npy").frames.shape == (3, 16, 20)
    np.save(tmp_path / "thin.npy", np.ones((3, 16, 20), np.float32))  # three grey frames stay three grey frames
    assert read_scan(tmp_path / "thin.npy").frames.shape == (3, 16, 20)


def test_export_refuses_a_non_empty_target_without_force(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    before = {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()}
    assert main(["export", str(run), "--out", str(artifact)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "manifest.json" in err
    assert {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()} == before
