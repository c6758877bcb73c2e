"""The import rules, held as an allow-list read from the package table of docs/architecture.md.

For every package the table names (``atomstream/`` may import everything), each import in its source — at the top
of a module or inside a function — must be the standard library, the package's own code, or something its row names
in backticks in the "may import" column. So a new arrow between packages, or a new dependency, fails here until the
table says it may exist; the table, not this file, is where a rule changes. (The table lives in the repository, not
in ../shared/DESIGN.md, because CI clones only the repository.)
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE_PAGE = ROOT / "docs" / "architecture.md"
TABLE_HEADING = "## Packages and what each may import"
PROJECT = ("atomstream", "exporters", "models", "sim", "streamer")
#: distribution names (as the table writes them) whose import name differs
IMPORT_NAMES = {"pyyaml": "yaml", "pyro_ppl": "pyro", "scikit_learn": "sklearn", "rosettasciio": "rsciio"}
EVERYTHING = None


def _import_name(word: str) -> str:
    """A table word → what ``import`` names: project modules as written, distributions normalised."""
    if word.split(".")[0] in PROJECT:
        return word
    name = word.lower().replace("-", "_")
    return IMPORT_NAMES.get(name, name)


def allow_list(page: str) -> dict[str, set[str] | None]:
    """Package (dotted: ``streamer.wire``, ``streamer.proxy``) → the names its row allows; ``None``: everything."""
    if TABLE_HEADING not in page:
        raise AssertionError(f"docs/architecture.md lost its {TABLE_HEADING!r} section, which holds the import rules")
    section = page.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str] | None] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        package = cells[0].strip("`").removesuffix("/").removesuffix(".py").replace("/", ".")
        allowed = cells[-1]
        words = re.findall(r"`([^`]+)`", allowed)
        table[package] = EVERYTHING if allowed == "everything" else {_import_name(w) for w in words}
    return table


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str) -> Iterator[tuple[int, str]]:
    """``(line, imported name)`` for every import in ``source``, function bodies included. Project imports name what
    they take (``from streamer.wire import client`` → ``streamer.wire.client``); relative ones are resolved."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package (or its parents)
                package = module.split(".")[: -node.level]
                base = ".".join([*package, base] if base else package)
            if base.split(".")[0] in PROJECT:
                yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)
            else:
                yield node.lineno, base


def allowed(name: str, own: str, allow: set[str]) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or _within(name, own):
        return True
    if top in PROJECT:
        return any(_within(name, a) for a in allow if a.split(".")[0] in PROJECT)
    return top in allow


def violations(source: str, module: str, own: str, allow: set[str]) -> list[str]:
    return [f"line {line}: {name}" for line, name in imports(source, module) if not allowed(name, own, allow)]


def _files(package: str) -> list[Path]:
    path = ROOT / package.replace(".", "/")
    return [path.with_suffix(".py")] if path.with_suffix(".py").is_file() else sorted(path.rglob("*.py"))


TABLE = allow_list(TABLE_PAGE.read_text())
CHECKED = sorted(p for p, allow in TABLE.items() if allow is not EVERYTHING)


def test_the_table_names_every_room_and_maps_distribution_names() -> None:
    rooms = ["streamer.wire", "streamer.maps", "streamer.service", "streamer.proxy", "models", "exporters", "sim"]
    assert sorted(rooms) == CHECKED
    assert TABLE["atomstream"] is EVERYTHING
    service, maps = TABLE["streamer.service"], TABLE["streamer.maps"]
    assert service is not None and {"pydantic_settings", "prometheus_client", "yaml", "streamer.maps"} <= service
    assert maps is not None and "streamer.wire.protocol" in maps and "streamer.wire" not in maps


def test_every_module_of_the_project_falls_under_a_row() -> None:
    covered = {path for package in TABLE for path in _files(package)}
    stray = [
        str(p.relative_to(ROOT))
        for package in PROJECT
        for p in sorted((ROOT / package).rglob("*.py"))
        if p not in covered and p != ROOT / "streamer" / "__init__.py"
    ]
    assert not stray, f"modules no row of docs/architecture.md's table governs (add a row or move them): {stray}"


def test_the_checker_catches_a_forbidden_arrow_even_inside_a_function() -> None:
    source = (
        "import numpy as np\nimport json\nfrom streamer.wire.protocol import Maps\nfrom . import tiling\n"
        "from streamer.wire import sockets\nimport zmq.auth\n\n"
        "def later():\n    from streamer.service.facade import Service\n    import pyro\n"
    )
    maps = TABLE["streamer.maps"]
    assert maps is not None
    assert violations(source, "streamer.maps.pipeline", "streamer.maps", maps) == [
        "line 5: streamer.wire.sockets",
        "line 6: zmq.auth",
        "line 9: streamer.service.facade.Service",
        "line 10: pyro",
    ]


@pytest.mark.parametrize("package", CHECKED)
def test_package_imports_only_what_the_table_allows(package: str) -> None:
    allow = TABLE[package]
    assert allow is not None
    found = {
        str(path.relative_to(ROOT)): bad
        for path in _files(package)
        if (bad := violations(path.read_text(), _module_of(path), package, allow))
    }
    assert not found, (
        f"{package} imports what docs/architecture.md's table does not allow it: {found}; remove the import, or add "
        "it to the package's 'may import' cell (in backticks) if the arrow belongs in the design"
    )


def test_models_nets_are_pure_torch() -> None:
    names = [name for _, name in imports((ROOT / "models" / "nets.py").read_text(), "models.nets")]
    assert names and not [n for n in names if n.split(".")[0] == "pyro"]


def test_streamer_imports_without_pyro_installed() -> None:
    """The serving install has no Pyro: every streamer module must import with pyro made unimportable."""
    modules = sorted(_module_of(p) for p in (ROOT / "streamer").rglob("*.py") if p.stem != "__init__")
    code = "import sys\nsys.modules['pyro'] = None\n" + "".join(f"import {m}\n" for m in modules)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
