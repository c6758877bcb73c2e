"""Endpoint checks shared by the commands: a ZeroMQ address is ``transport://address``, and a bare ``host:port``
gives ZeroMQ's unhelpful ``Invalid argument``; say what is wrong and what to write instead, before any socket."""

from __future__ import annotations

import re

from atomstream.cli import CommandError

__all__ = ["checked_endpoint"]

_TRANSPORTS = ("tcp", "ipc", "inproc")
_TCP = re.compile(r"^tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+|[A-Za-z0-9_.\-]+;[A-Za-z0-9_.\-]+):(\*|\d{1,5})$")


def checked_endpoint(text: str, flag: str) -> str:
    """``text`` if it is a usable ZeroMQ endpoint, else a ``CommandError`` naming ``flag`` with the fix."""
    value = text.strip()
    if "://" not in value:
        hint = f"tcp://{value}" if re.fullmatch(r"[\w.\-*]+:\d+", value) else "tcp://127.0.0.1:5556"
        raise CommandError(f"{flag} {text!r} is not a ZeroMQ endpoint: it needs a transport, e.g. {hint}")
    transport = value.split("://", 1)[0]
    if transport not in _TRANSPORTS:
        raise CommandError(f"{flag} {text!r}: unknown transport {transport!r}; use one of {', '.join(_TRANSPORTS)}")
    if transport == "tcp":
        m = _TCP.match(value)
        if m is None:
            raise CommandError(f"{flag} {text!r}: a tcp endpoint is tcp://HOST:PORT, e.g. tcp://127.0.0.1:5556")
        if m.group(2) != "*" and not 0 <= int(m.group(2)) <= 65535:
            raise CommandError(f"{flag} {text!r}: port {m.group(2)} is out of range 0..65535")
    return value
