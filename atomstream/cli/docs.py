"""`atomstream docs`: regenerate the reference pages from the code."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("docs", help="regenerate docs/protocol.md and docs/configuration.md from the code")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder to write into (default: docs)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from atomstream.reference import write_reference

    for path in write_reference(args.out):
        print(f"wrote {path}")
    return 0
