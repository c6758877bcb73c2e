"""Soak: many small frames, a fraction of them bad, through a real ``atomstream serve`` — and not one unaccounted for.

Every frame sent must end as exactly one ``maps`` or one ``error`` (DESIGN.md), so three independent counts must agree
with what the producer sent: the service's ``scan_summary``, its Prometheus ``/metrics`` (scraped over HTTP), and a
subscriber counting what it received, frame id by frame id. A bad frame whose header cannot be read (not JSON) names
no scan, so the scan's summary cannot count it; the global counters do. ``lost`` is the number of frame ids sent that
came back neither as maps nor as an error; the run fails (exit 1) unless it is 0 and every count agrees.

The throughput column compares the live service with the in-process ``Pipeline`` on the same frames (the baseline,
one frame per call, no sockets) in the same run.

    python benchmarks/soak.py --frames 10000 --bad-fraction 0.05 [--shape 64 64] [--seed 0] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from streamer.wire.client import Subscriber
from streamer.wire.protocol import ScanEnd, ScanStart, encode, frame_message

__all__ = ["BAD_KINDS", "SoakResult", "bad_message", "make_frames", "run_soak", "scrape_counts"]

ROOT = Path(__file__).resolve().parents[1]

#: kind of bad frame -> the reason the service must give; ``not_json`` cannot name its scan or frame
BAD_KINDS: dict[str, str] = {
    "short_payload": "shape_mismatch",
    "nan": "non_finite",
    "bool_dtype": "unsupported_dtype",
    "huge_shape": "frame_too_large",
    "no_payload": "bad_payload",
    "version_2": "bad_header",
    "too_small_for_a_patch": "shape_mismatch",
    "not_json": "bad_header",
}
ANONYMOUS = frozenset({"not_json"})


def make_frames(n: int, shape: tuple[int, int], seed: int) -> list[np.ndarray]:
    """``n`` distinct float32 frames (a noisy lattice-like pattern), cycled by the producer."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    frames = []
    for _ in range(n):
        phase = rng.uniform(0, 2 * np.pi, 2)
        lattice = np.cos(2 * np.pi * y / 8 + phase[0]) * np.cos(2 * np.pi * x / 8 + phase[1])
        frames.append((lattice + 0.3 * rng.normal(size=shape)).astype(np.float32))
    return frames


def bad_message(kind: str, scan_id: str, frame_id: int, frame: np.ndarray) -> list[bytes]:
    """One bad ``frame`` message of the given kind (see ``BAD_KINDS``)."""
    header: dict[str, Any] = frame_message(scan_id, frame_id, frame).model_dump(mode="json")
    payload = frame.tobytes()
    if kind == "short_payload":
        return [json.dumps(header).encode(), payload[:-4]]
    if kind == "nan":
        bad = frame.copy()
        bad[0, 0] = np.nan
        return [json.dumps(header).encode(), bad.tobytes()]
    if kind == "bool_dtype":
        return [json.dumps({**header, "dtype": "bool"}).encode(), payload]
    if kind == "huge_shape":
        return [json.dumps({**header, "shape": [10**9, 10**9]}).encode(), payload[:16]]
    if kind == "no_payload":
        return [json.dumps(header).encode()]
    if kind == "version_2":
        return [json.dumps({**header, "v": 2}).encode(), payload]
    if kind == "too_small_for_a_patch":
        tiny = np.ascontiguousarray(frame[:4, :4])
        return [bytes(part) for part in encode(frame_message(scan_id, frame_id, tiny), tiny)]
    if kind == "not_json":
        return [b'{"v": 1, "kind": "frame", "scan_id": ' + scan_id.encode() + b", oops", payload]
    raise ValueError(f"bad frame kind {kind!r} is not one of {', '.join(BAD_KINDS)}")


def scrape_counts(metrics_url: str) -> dict[str, float]:
    """``received``, ``published``, ``rejected``, ``dropped`` (summed over reasons) from ``/metrics``."""
    with urllib.request.urlopen(metrics_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        for name in ("received", "published", "rejected", "dropped"):
            metric = f"atomstream_frames_{name}_total"
            if line.startswith(metric + " ") or line.startswith(metric + "{"):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


@dataclass
class SoakResult:
    """Every count of one soak run; ``lost`` and ``misreported`` must be empty for a clean run."""

    sent: int
    bad_sent: Counter[str]  # by expected reason
    anonymous_bad: int
    maps: set[int]
    errors: dict[int, str]  # frame id -> reason, for errors that name a frame
    anonymous_errors: Counter[str]
    summary: Any
    metrics: dict[str, float]
    gaps: int
    restarts: int
    seconds: float
    lost: list[int] = field(default_factory=list)
    misreported: dict[int, tuple[str, str]] = field(default_factory=dict)  # frame id -> (expected, got)

    @property
    def fps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        s, m = self.summary, self.metrics
        errors = len(self.errors) + sum(self.anonymous_errors.values())
        n_bad = sum(self.bad_sent.values())
        rows = [
            ("producer (sent)", self.sent, self.sent - n_bad, n_bad, "", ""),
            ("scan_summary", s.frames_received, s.frames_published, s.frames_rejected + s.frames_dropped,
             s.frames_rejected, s.frames_dropped),
            ("/metrics", int(m["received"]), int(m["published"]), int(m["rejected"] + m["dropped"]),
             int(m["rejected"]), int(m["dropped"])),
            ("subscriber", len(self.maps) + errors, len(self.maps), errors, "", ""),
        ]  # fmt: skip
        lines = [f"{'source':<18}{'received':>10}{'maps':>10}{'errors':>10}{'rejected':>10}{'dropped':>10}"]
        lines += [f"{r[0]:<18}" + "".join(f"{v!s:>10}" for v in r[1:]) for r in rows]
        lines.append(
            f"unnamed bad frames (not JSON, no scan to count them in): {self.anonymous_bad}; "
            f"subscriber seq gaps: {self.gaps}, restarts: {self.restarts}"
        )
        lines.append(f"lost = {len(self.lost)}   misreported = {len(self.misreported)}")
        return "\n".join(lines)

    def problems(self) -> list[str]:
        """Every way this run breaks "received = maps + errors, nothing lost"; empty when clean."""
        s, m = self.summary, self.metrics
        named_sent = self.sent - self.anonymous_bad
        n_errors = len(self.errors) + sum(self.anonymous_errors.values())
        checks = {
            "lost frames": not self.lost,
            "misreported reasons": not self.misreported,
            "subscriber: maps + errors == sent": len(self.maps) + n_errors == self.sent,
            "scan_summary: received == named frames sent": s.frames_received == named_sent,
            "scan_summary: received == published + rejected + dropped": s.frames_received
            == s.frames_published + s.frames_rejected + s.frames_dropped,
            "scan_summary: published == maps seen": s.frames_published == len(self.maps),
            "/metrics: received == sent": m.get("received") == self.sent,
            "/metrics: received == published + rejected + dropped": m.get("received")
            == m.get("published", 0) + m.get("rejected", 0) + m.get("dropped", 0),
            "/metrics: published == maps seen": m.get("published") == len(self.maps),
            "no seq gaps": self.gaps == 0,
        }
        return [name for name, ok in checks.items() if not ok]


def _listen(sub: Subscriber, scan_id: str, out: dict[str, Any], done: threading.Event, timeout_s: float) -> None:
    maps: set[int] = set()
    errors: dict[int, str] = {}
    anonymous: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                got = sub.recv(1.0)
            except TimeoutError:
                continue
            msg = got.msg
            if got.topic == "maps" and msg.scan_id == scan_id:
                maps.add(msg.frame_id)
            elif got.topic == "error":
                if msg.frame_id is None:
                    anonymous[msg.reason] += 1
                else:
                    errors[msg.frame_id] = msg.reason
            elif got.topic == "scan_summary" and msg.scan_id == scan_id:
                out["summary"] = msg
                break
    finally:
        out.update(maps=maps, errors=errors, anonymous=anonymous)
        done.set()


def run_soak(
    *,
    ingest: str,
    publish: str,
    metrics_url: str,
    frames: int,
    bad_fraction: float,
    shape: tuple[int, int] = (64, 64),
    seed: int = 0,
    scan_id: str = "soak",
    timeout_s: float = 600.0,
) -> SoakResult:
    """Send ``frames`` frames (``bad_fraction`` of them bad, kinds in turn) as one scan and count what comes back."""
    if not 0 <= bad_fraction <= 1:
        raise ValueError(f"bad_fraction={bad_fraction} must be in [0, 1]")
    rng = np.random.default_rng(seed)
    pool = make_frames(16, shape, seed)
    n_bad = round(frames * bad_fraction)
    chosen = sorted(int(i) for i in rng.choice(frames, n_bad, replace=False))
    bad_ids = dict(zip(chosen, _cycle(n_bad), strict=True))
    out: dict[str, Any] = {}
    done = threading.Event()
    with Subscriber(publish, topics=("maps", "error", "scan_summary"), rcvhwm=0) as sub:
        sub.wait_connected(30.0)
        listener = threading.Thread(target=_listen, args=(sub, scan_id, out, done, timeout_s), daemon=True)
        listener.start()
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.setsockopt(zmq.SNDTIMEO, 60_000)  # block policy: a full service pushes back, it never drops
        push.connect(ingest)
        t0 = time.perf_counter()
        try:
            push.send_multipart(encode(ScanStart(scan_id=scan_id)))
            for k in range(frames):
                frame = pool[k % len(pool)]
                if k in bad_ids:
                    push.send_multipart(bad_message(bad_ids[k], scan_id, k, frame))
                else:
                    push.send_multipart(encode(frame_message(scan_id, k, frame), frame), copy=False)
            push.send_multipart(encode(ScanEnd(scan_id=scan_id, n_frames=frames)))
            done.wait(timeout_s)
            seconds = time.perf_counter() - t0
        finally:
            push.close()
            ctx.term()
        listener.join(5.0)
        gaps, restarts = sub.stats.n_gaps, sub.stats.n_restarts
    if "summary" not in out:
        raise TimeoutError(f"no scan_summary for {scan_id!r} within {timeout_s} s")
    result = SoakResult(
        sent=frames,
        bad_sent=Counter(BAD_KINDS[kind] for kind in bad_ids.values()),
        anonymous_bad=sum(kind in ANONYMOUS for kind in bad_ids.values()),
        maps=out["maps"],
        errors=out["errors"],
        anonymous_errors=out["anonymous"],
        summary=out["summary"],
        metrics=scrape_counts(metrics_url),
        gaps=gaps,
        restarts=restarts,
        seconds=seconds,
    )
    for k in range(frames):
        kind = bad_ids.get(k)
        if kind in ANONYMOUS:
            continue  # counted by reason below: it cannot name its frame
        got = "maps" if k in result.maps else result.errors.get(k)
        expected = "maps" if kind is None else BAD_KINDS[kind]
        if got is None:
            result.lost.append(k)
        elif got != expected:
            result.misreported[k] = (expected, got)
    anonymous_expected = Counter(BAD_KINDS[k] for k in bad_ids.values() if k in ANONYMOUS)
    if result.anonymous_errors != anonymous_expected:
        result.misreported[-1] = (str(dict(anonymous_expected)), str(dict(result.anonymous_errors)))
    return result


def _cycle(n: int) -> list[str]:
    kinds = list(BAD_KINDS)
    return [kinds[i % len(kinds)] for i in range(n)]


# ---------------------------------------------------------------------------------------------- command line


def _make_artifact(out: Path) -> Path:
    """An untrained (speed and accounting do not depend on weights) 16x16 model, exported for real."""
    import torch

    from exporters.export import export_model
    from exporters.verify import parity_patches
    from models.config import DataConfig, ModelConfig, RunConfig
    from models.jtrvae import JTrVAE

    model_cfg = ModelConfig(patch=(16, 16), n_classes=3, latent_dim=2, rotation=True, translation=False)
    run = RunConfig(model=model_cfg, data=DataConfig(kind="grid", patch=(16, 16), stride=(8, 8)), name="soak")
    torch.manual_seed(0)
    model = JTrVAE(model_cfg).eval()
    patches, described, _ = parity_patches(run, seed=0)
    export_model(model, run, out, parity_patches=patches, parity_data=described)
    return out


def _offline_fps(artifact: Path, frames: list[np.ndarray], n: int) -> float:
    from streamer.maps.encoder import load
    from streamer.maps.pipeline import Pipeline

    pipeline = Pipeline(load(artifact, backend="onnx", device="cpu", batch_sizes=(1,)))
    pipeline.process(frames[0])
    t0 = time.perf_counter()
    for k in range(n):
        pipeline.process(frames[k % len(frames)])
    return n / (time.perf_counter() - t0)


def start_service(artifact: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``atomstream serve`` on CPU with free loopback ports (``extra``: more flags) and its ready line."""
    argv = [
        sys.executable, "-c", "import sys; from atomstream.cli import main; sys.exit(main())", "serve",
        "--artifact", str(artifact), "--device", "cpu", "--ingest", "tcp://127.0.0.1:0",
        "--publish", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--metrics-port", "0",
        "--status-interval-s", "0.2", "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise RuntimeError("atomstream serve did not become ready within 120 s")
    return proc, json.loads(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--shape", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", type=Path, default=None, help="default: an untrained 16x16 model, exported now")
    args = parser.parse_args(argv)
    shape = (args.shape[0], args.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or _make_artifact(Path(tmp) / "artifact")
        baseline = _offline_fps(artifact, make_frames(16, shape, args.seed), 300)
        proc, ready = start_service(artifact)
        try:
            result = run_soak(
                ingest=ready["ingest"],
                publish=ready["publish"],
                metrics_url=ready["metrics"],
                frames=args.frames,
                bad_fraction=args.bad_fraction,
                shape=shape,
                seed=args.seed,
            )
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"soak: {args.frames} frames of {shape[0]}x{shape[1]}, {args.bad_fraction:.1%} bad (seed {args.seed})\n")
    print(result.table())
    print(f"\nbad frames by reason: {dict(result.bad_sent)}")
    print(f"\n{'throughput':<34}{'frames/s':>10}{'ratio':>8}")
    print(f"{'in-process Pipeline (baseline)':<34}{baseline:>10.0f}{1.0:>8.2f}")
    print(f"{'live service (subprocess)':<34}{result.fps:>10.0f}{result.fps / baseline:>8.2f}")
    problems = result.problems()
    if problems:
        print(f"\nFAILED: {'; '.join(problems)}; lost ids (first 20): {result.lost[:20]}")
        return 1
    print("\nOK: every frame accounted for (received = maps + errors in scan_summary, /metrics and the subscriber)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
