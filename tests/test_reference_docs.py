"""The committed reference pages are what the code renders today (regenerate with `atomstream docs`)."""

from __future__ import annotations

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
