"""``atomstream`` commands as real subprocesses for tests: started with this worktree's code, read line by line
with a timeout (never a hang), and stopped with Ctrl-C as a user would."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["read_line", "running"]

ROOT = Path(__file__).resolve().parents[1]
_CLI = [sys.executable, "-c", "import sys; from atomstream.cli import main; sys.exit(main())"]


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The next stdout line, or ``TimeoutError``; ``RuntimeError`` with stderr if the command exited first."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"{proc.args[3:]} printed nothing within {timeout_s} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args[3:]} exited {proc.wait()}: {proc.stderr.read() if proc.stderr else ''}")
    return line


@contextmanager
def running(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``atomstream ARGS`` in a subprocess; SIGINT (then kill) on exit, pipes closed."""
    # ahead of the caller's path, not instead of it: where the dependencies sit on PYTHONPATH (the GPU machine's
    # were installed that way) a replaced path made every CLI subprocess fail to import them
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(
        [*_CLI, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
