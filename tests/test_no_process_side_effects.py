"""Library code changes no process-wide state: plot backend, torch thread counts and signal handlers are the CLI's.

A notebook user who calls ``fit`` must keep their matplotlib backend, their torch threads and their Ctrl-C. The check
reads the source (every call, wherever it sits, including inside functions), so it needs nothing installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("exporters", "models", "sim", "streamer")
#: (module, attribute) calls that change the whole process
FORBIDDEN = {
    ("matplotlib", "use"),
    ("torch", "set_num_threads"),
    ("torch", "set_num_interop_threads"),
    ("signal", "signal"),
}
#: Files whose side effect another change removes (issue 14: plots on Figure objects, replay's SIGINT to the CLI).
#: Listed so this test holds everything else now; an entry may go stale (clean) without failing.
PENDING = {"models/plots.py": {("matplotlib", "use")}, "sim/replay.py": {("signal", "signal")}}


def _calls(path: Path) -> set[tuple[str, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and (owner.id, node.func.attr) in FORBIDDEN:
                found.add((owner.id, node.func.attr))
    return found


def test_the_scan_sees_a_call(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef f():\n    torch.set_num_threads(1)\n")
    assert _calls(probe) == {("torch", "set_num_threads")}


def test_library_code_changes_no_process_state() -> None:
    offenders = {}
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            bad = _calls(path) - PENDING.get(rel, set())
            if bad:
                offenders[rel] = sorted(f"{m}.{a}" for m, a in bad)
    assert not offenders, f"process-wide side effects outside atomstream/ (move them to the CLI): {offenders}"
