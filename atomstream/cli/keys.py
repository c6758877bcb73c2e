"""``atomstream keys``: make a CurveZMQ keypair for the service or one of its clients.

Run it once for the server and once per client; see ``streamer.wire.security`` for where each file goes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atomstream.cli import CommandError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="make a CurveZMQ keypair (NAME.key public, NAME.key_secret secret)",
        description="Make a CurveZMQ keypair. Server: pass NAME.key_secret as curve.server_secret_file and give "
        "clients NAME.key. Client: keep NAME.key_secret, copy NAME.key into the folder of each role it plays "
        "(curve.producers_dir, viewers_dir, operators_dir; authorized_keys_dir: every role).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write the two key files into")
    parser.add_argument("--name", required=True, help="base name of the files, e.g. server, viewer, detector")
    parser.set_defaults(func=_keys)


def _keys(args: argparse.Namespace) -> int:
    from streamer.wire.security import SecurityError, generate_keys

    try:
        public, secret = generate_keys(args.out, args.name)
    except SecurityError as exc:
        raise CommandError(str(exc)) from None
    print(
        f"public key: {public}  (give to peers; for a client, copy into the service's folder of each role it plays: "
        "producers_dir, viewers_dir, operators_dir — or authorized_keys_dir for every role)"
    )
    print(f"secret key: {secret}  (keep private: server_secret_file for the service, or this client's own key)")
    return 0
