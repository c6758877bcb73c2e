"""CurveZMQ encryption and client authorisation for the service's sockets.

Why CURVE and not TLS in front: ZeroMQ's own CURVE handshake authenticates both ends with long-term keypairs and
encrypts every frame, and ZAP lets the server refuse any client whose public key is not in an allow-list, on every
socket type (PULL ingest, PUB maps, REP control) at once. A refused client never completes the handshake, so it can
neither inject a frame, nor read a map, nor send a command.

Roles: each socket has its own ZAP domain — ``ingest`` (producers), ``publish`` (viewers: the PUB and the reliable
XPUB) and ``control`` (operators) — and each domain its own allow-list, so a viewer's key opens the maps and nothing
else. ``authorized_keys_dir`` is the older single list and still works: its keys hold every role (a key in it and in
no role folder may inject, read and command, as before).

Setting it up (keys are plain ``zmq.auth`` certificate files):

1. ``atomstream keys --out keys/server --name server`` makes ``server.key`` (public) and ``server.key_secret``.
2. For each client (producer, viewer, controller): ``atomstream keys --out keys/clients --name viewer``; give the client
   its ``viewer.key_secret`` and the server's ``server.key``. Copy every *public* client key (``*.key``) into the
   directory the service reads as ``authorized_keys_dir`` (secret files stay elsewhere:
   only public keys are loaded from it).
3. Serve with ``curve: {server_secret_file: keys/server/server.key_secret, producers_dir: keys/producers,
   viewers_dir: keys/viewers, operators_dir: keys/operators}`` (public keys copied into the folder of each role the
   client may play), or ``authorized_keys_dir: keys/authorized`` for one list of clients that may do everything.

Adding or revoking a client is adding or removing a public-key file and restarting the service. Secret-key files
must be private to their owner (mode 600, as `atomstream keys` writes them): a group- or world-readable one is
refused, because anyone who can read it can impersonate its owner.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
from pydantic import BaseModel, ConfigDict, Field, model_validator
from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "ROLES",
    "ClientCurve",
    "CurveConfig",
    "Role",
    "SecurityError",
    "generate_keys",
    "is_loopback",
    "secure_client_socket",
    "secure_server_socket",
    "server_auth",
]


class SecurityError(ValueError):
    """A key file or key directory is missing or unusable."""


Role = Literal["ingest", "publish", "control"]
#: ZAP domain of each socket role; ``CurveConfig`` field naming the folder of the keys allowed in it.
ROLES: dict[Role, str] = {"ingest": "producers_dir", "publish": "viewers_dir", "control": "operators_dir"}


class CurveConfig(BaseModel):
    """Where the service finds its secret key and the public keys of the clients it lets in, per role."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server_secret_file: Path = Field(
        description="the service's secret key (zmq.auth certificate with a secret, made by `atomstream keys`; mode 600)"
    )
    authorized_keys_dir: Path | None = Field(
        None,
        description="public keys (*.key) of clients allowed every role: inject, read and command (the single list "
        "of earlier versions); null: use only the role folders",
    )
    producers_dir: Path | None = Field(None, description="public keys of clients that may send frames (ingest)")
    viewers_dir: Path | None = Field(None, description="public keys of clients that may read maps (publish)")
    operators_dir: Path | None = Field(None, description="public keys of clients that may send commands (control)")

    @model_validator(mode="after")
    def _some_keys(self) -> CurveConfig:
        if self.authorized_keys_dir is None and all(getattr(self, f) is None for f in ROLES.values()):
            raise ValueError(
                "curve needs at least one folder of client public keys: producers_dir, viewers_dir, operators_dir "
                "(or authorized_keys_dir for clients allowed everything)"
            )
        return self

    def key_dirs(self, role: Role) -> list[Path]:
        """The folders whose public keys may play ``role``."""
        dirs = [self.authorized_keys_dir, getattr(self, ROLES[role])]
        return [Path(d) for d in dirs if d is not None]


class ClientCurve(BaseModel):
    """A client's side of CURVE: its own secret key and the public key of the server it trusts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_secret_file: Path = Field(
        description="this client's '*.key_secret' (its public key is in the server's authorized_keys_dir)"
    )
    server_public_file: Path = Field(description="the service's public key file ('server.key')")

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE client with these keys; call before ``connect``."""
        secure_client_socket(
            socket, client_secret_file=self.client_secret_file, server_public_file=self.server_public_file
        )


def _check_private(path: Path, *, role: str) -> None:
    """A secret key readable by others is a key others hold: refuse it (POSIX permission bits)."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecurityError(
            f"{role} secret key file {str(path)!r} has mode {mode:04o}: group or others may read it, so it may no "
            f"longer be secret; run `chmod 600 {path}` (or make a new keypair with `atomstream keys` if it leaked)"
        )


def _load_secret(path: Path, *, role: str) -> tuple[bytes, bytes]:
    """Both halves of a keypair from a secret-key file, with an error that says which file and how to make one."""
    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"{role} secret key file {str(path)!r} does not exist; make one with `atomstream keys`")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise SecurityError(
            f"{role} key file {str(path)!r} holds only a public key; pass the '*.key_secret' file made by"
            " `atomstream keys`"
        )
    _check_private(path, role=role)
    return public, secret


def _load_public(path: Path, *, role: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"{role} public key file {str(path)!r} does not exist; make one with `atomstream keys`")
    public, _ = zmq.auth.load_certificate(path)
    return public


class _RoleKeys:
    """ZAP credentials provider: the z85 public keys allowed in each domain (role)."""

    def __init__(self, keys: Mapping[str, frozenset[bytes]]) -> None:
        self.keys = dict(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys.get(domain, frozenset())


def _role_keys(cfg: CurveConfig) -> dict[str, frozenset[bytes]]:
    keys: dict[str, frozenset[bytes]] = {}
    for role in ROLES:
        allowed: set[bytes] = set()
        for keys_dir in cfg.key_dirs(role):
            if not keys_dir.is_dir():
                raise SecurityError(
                    f"key folder {str(keys_dir)!r} (for {role}) is not a directory; create it and copy the clients' "
                    "public '*.key' files into it"
                )
            allowed |= {k if isinstance(k, bytes) else k.encode() for k in zmq.auth.load_certificates(str(keys_dir))}
        keys[role] = frozenset(allowed)
    return keys


def server_auth(context: zmq.Context, cfg: CurveConfig) -> ThreadAuthenticator:
    """Start a ZAP authenticator on ``context`` that admits, on each socket, only the public keys of its role.

    The authenticator must exist before the server sockets bind, and it covers every socket of the context; the
    caller stops it (``auth.stop()``) after closing those sockets. Each socket names its role as its ZAP domain
    (``secure_server_socket``); a socket without one is refused to everyone.
    """
    provider = _RoleKeys(_role_keys(cfg))  # fail here, before a thread is started
    _load_secret(cfg.server_secret_file, role="server")
    auth = ThreadAuthenticator(context)
    auth.start()
    try:
        for role in ROLES:
            auth.configure_curve_callback(domain=role, credentials_provider=provider)
    except BaseException:
        auth.stop()
        raise
    return auth


def secure_server_socket(socket: zmq.Socket, cfg: CurveConfig, role: Role) -> None:
    """Make ``socket`` a CURVE server with the service's keypair, admitting the keys of ``role``; before ``bind``."""
    public, secret = _load_secret(cfg.server_secret_file, role="server")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    socket.zap_domain = role.encode()


def secure_client_socket(socket: zmq.Socket, *, client_secret_file: Path, server_public_file: Path) -> None:
    """Make ``socket`` a CURVE client that trusts only the given server key; call before ``connect``."""
    public, secret = _load_secret(client_secret_file, role="client")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = _load_public(server_public_file, role="server")


def is_loopback(endpoint: str) -> bool:
    """Whether an endpoint can only be reached from this machine: ``ipc``/``inproc``, or TCP on a loopback address
    (``127.0.0.0/8``, ``::1``, ``localhost``). ``*``, ``0.0.0.0``, interface names and other addresses are not."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def generate_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a new keypair ``{name}.key`` (public) and ``{name}.key_secret`` into ``directory``; returns both paths.

    Refuses to overwrite an existing keypair, because replacing a key silently locks out every peer that trusted it.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise SecurityError(f"key name {name!r} must be a plain file name such as 'server' or 'viewer'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        existing = directory / f"{name}{suffix}"
        if existing.exists():
            raise SecurityError(f"{str(existing)!r} already exists; choose another --name or remove the old keypair")
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)
