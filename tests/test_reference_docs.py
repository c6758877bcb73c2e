"""The committed reference pages are what the code renders today (regenerate with `atomstream docs`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atomstream.reference import PAGES, config_reference, protocol_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("filename", sorted(PAGES))
def test_reference_page_is_in_sync_with_code(filename: str) -> None:
    rendered = {"protocol.md": protocol_reference, "configuration.md": config_reference}[filename]()
    committed = (DOCS / filename).read_text()
    assert committed == rendered, f"docs/{filename} is stale: run `atomstream docs` and commit the result"


def test_protocol_page_names_every_message_kind() -> None:
    page = protocol_reference()
    for kind in ("ScanStart", "Frame", "ScanEnd", "Maps", "Defects", "Error", "Status", "ScanSummary"):
        assert f"`{kind}`" in page


def _cells(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip())) - 2  # a row starts and ends with an unescaped |


@pytest.mark.parametrize("filename", sorted(PAGES))
def test_every_table_row_has_as_many_cells_as_its_header(filename: str) -> None:
    """GitHub renders a table only when the header, the separator and each row have the same number of cells."""
    rendered = {"protocol.md": protocol_reference, "configuration.md": config_reference}[filename]()
    tables = 0
    lines = rendered.splitlines()
    for k, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|( *-+ *\|)+", lines[k + 1]):
            tables += 1
            width = _cells(line)
            assert _cells(lines[k + 1]) == width, f"{filename}: separator under {line!r}"
            for row in lines[k + 2 :]:
                if not row.startswith("|"):
                    break
                assert _cells(row) == width, f"{filename}: {row!r} has {_cells(row)} cells, its header {width}"
    assert tables >= 3
