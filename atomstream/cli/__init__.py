"""The `atomstream` command line.

The CLI is the only place that reaches across the packages (DESIGN.md), so every command lives in its own module
here and imports its package *inside* the command: `atomstream serve` must work on an install without Pyro.
Each module in this folder exposes ``register(subparsers)``; commands are discovered, not listed, so adding one
never touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

__all__ = ["CommandError", "build_parser", "main"]


class CommandError(Exception):
    """A user mistake (bad path, contradictory option): printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from atomstream import __version__

    parser = argparse.ArgumentParser(prog="atomstream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"atomstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from atomstream.cli._flags import check_flags

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    check_flags(parser, argv)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except CommandError as exc:
        print(f"atomstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"atomstream {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
