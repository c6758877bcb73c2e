"""CurveZMQ encryption and client authorisation for the service's sockets.

Why CURVE and not TLS in front: ZeroMQ's own CURVE handshake authenticates both ends with long-term keypairs and
encrypts every frame, and ZAP lets the server refuse any client whose public key is not in an allow-list, on every
socket type (PULL ingest, PUB maps, REP control) at once. A refused client never completes the handshake, so it can
neither inject a frame, nor read a map, nor send a command.

Setting it up (keys are plain ``zmq.auth`` certificate files):

1. ``atomstream keys --out keys/server --name server`` makes ``server.key`` (public) and ``server.key_secret``.
2. For each client (producer, viewer, controller): ``atomstream keys --out keys/clients --name viewer``; give the client
   its ``viewer.key_secret`` and the server's ``server.key``. Copy every *public* client key (``*.key``) into the
   directory the service reads as ``authorized_keys_dir`` (secret files stay elsewhere:
   only public keys are loaded from it).
3. Serve with ``curve: {server_secret_file: keys/server/server.key_secret, authorized_keys_dir: keys/authorized}``.

Adding or revoking a client is adding or removing a public-key file and restarting the service.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from pydantic import BaseModel, ConfigDict, Field
from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "ClientCurve",
    "CurveConfig",
    "SecurityError",
    "generate_keys",
    "secure_client_socket",
    "secure_server_socket",
    "server_auth",
]


class SecurityError(ValueError):
    """A key file or key directory is missing or unusable."""


class CurveConfig(BaseModel):
    """Where the service finds its secret key and the public keys of the clients it lets in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    server_secret_file: Path = Field(
        description="the service's secret key (zmq.auth certificate with a secret, made by `atomstream keys`)"
    )
    authorized_keys_dir: Path = Field(
        description="directory of public keys (*.key) of the allowed clients: producers, subscribers, controllers"
    )


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
    return public, secret


def _load_public(path: Path, *, role: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"{role} public key file {str(path)!r} does not exist; make one with `atomstream keys`")
    public, _ = zmq.auth.load_certificate(path)
    return public


def server_auth(context: zmq.Context, cfg: CurveConfig) -> ThreadAuthenticator:
    """Start a ZAP authenticator on ``context`` that admits only the public keys in ``cfg.authorized_keys_dir``.

    The authenticator must exist before the server sockets bind, and it covers every socket of the context; the
    caller stops it (``auth.stop()``) after closing those sockets. Any domain is accepted: the key is the identity.
    """
    keys_dir = Path(cfg.authorized_keys_dir)
    if not keys_dir.is_dir():
        raise SecurityError(
            f"authorized_keys_dir {str(keys_dir)!r} is not a directory; create it and copy the clients' public"
            " '*.key' files into it"
        )
    _load_secret(cfg.server_secret_file, role="server")  # fail here, before a thread is started
    auth = ThreadAuthenticator(context)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(keys_dir))
    except BaseException:
        auth.stop()
        raise
    return auth


def secure_server_socket(socket: zmq.Socket, cfg: CurveConfig) -> None:
    """Make ``socket`` a CURVE server with the service's keypair; call before ``bind``."""
    public, secret = _load_secret(cfg.server_secret_file, role="server")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def secure_client_socket(socket: zmq.Socket, *, client_secret_file: Path, server_public_file: Path) -> None:
    """Make ``socket`` a CURVE client that trusts only the given server key; call before ``connect``."""
    public, secret = _load_secret(client_secret_file, role="client")
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = _load_public(server_public_file, role="server")


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
