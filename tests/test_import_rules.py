"""DESIGN.md's import rules, checked on the source: the serving half never pulls in Pyro or the training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "streamer": {"pyro", "models", "exporters", "sim", "atomstream"},
    "sim": {"pyro", "torch", "models", "exporters", "atomstream"},
    "models": {"exporters", "sim", "atomstream"},
    "exporters": {"sim", "atomstream"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_rules(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package}/ imports what DESIGN.md forbids: {offenders}"


def test_models_nets_are_pure_torch() -> None:
    nets = ROOT / "models" / "nets.py"
    if not nets.exists():
        pytest.skip("models/nets.py not written yet")
    assert "pyro" not in _imports(nets)


def test_streamer_imports_without_pyro_installed() -> None:
    """The serving install has no Pyro: every streamer module must import with pyro made unimportable."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "streamer").rglob("*.py")
        if p.stem != "__init__"
    )
    code = "import sys\nsys.modules['pyro'] = None\n" + "".join(f"import {m}\n" for m in modules)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
