"""CURVE keys: the server's and the clients', as pyzmq's certificate files.

``dbpool serve`` and its clients authenticate and encrypt with ZeroMQ's
CURVE mechanism.  A key pair is two files in pyzmq's ``zmq.auth`` format,
written by ``dbpool keygen NAME`` (:func:`write_key_pair`): ``NAME.key``
holds the public key (give it to the other side) and ``NAME.key_secret``
the public and the secret key (keep it private; it is written mode 0600).
Wherever a key is asked for, it may be the path of such a file or the key
itself as its 40 characters of Z85 text.

A refused handshake is told apart from a server that is down by the request
socket's monitor events (:func:`handshake_failure`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .errors import ConfigurationError, ConnectionError

__all__ = [
    "HANDSHAKE_EVENTS",
    "ClientKeys",
    "KeyPair",
    "client_keys",
    "handshake_failure",
    "load_key_pair",
    "load_public_key",
    "write_key_pair",
]

#: Z85 text of a 32-byte key.
_Z85_LENGTH = 40
#: libzmq's code for a handshake between different mechanisms (CURVE and NULL).
MECHANISM_MISMATCH = 0x11000002
#: The monitor events that end a handshake in failure.
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class KeyPair:
    """A public key and its secret key, each as Z85 bytes."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never the secret
        return f"KeyPair(public={self.public.decode()!r})"


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs for CURVE: the server's public key and its own pair."""

    server: bytes
    client: KeyPair

    def apply(self, sock: zmq.Socket[object]) -> None:
        """Make ``sock`` a CURVE client of the server (before it connects)."""
        sock.curve_serverkey = self.server
        sock.curve_publickey = self.client.public
        sock.curve_secretkey = self.client.secret


def _is_z85_key(text: str) -> bool:
    if len(text) != _Z85_LENGTH:
        return False
    try:
        return len(zmq.utils.z85.decode(text)) == 32
    except (ValueError, KeyError):
        return False


def load_public_key(spec: str, what: str) -> bytes:
    """A public key from ``spec``: a certificate file (``.key`` or ``.key_secret``)
    or Z85 text.  ``what`` names it in the error of a key that cannot be read."""
    if _is_z85_key(spec):
        return spec.encode()
    public, _ = _read(spec, what)
    return public


def load_key_pair(spec: str, what: str) -> KeyPair:
    """A key pair from ``spec``: a secret certificate file (``.key_secret``) or the
    secret key as Z85 text (its public key is derived from it)."""
    if _is_z85_key(spec):
        secret = spec.encode()
        return KeyPair(zmq.curve_public(secret), secret)
    public, maybe_secret = _read(spec, what)
    if maybe_secret is None:
        raise ConfigurationError(
            f"{what}: {spec} holds no secret key (give the NAME.key_secret file that "
            "`dbpool keygen` wrote, not NAME.key)")
    return KeyPair(public, maybe_secret)


def _read(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, IndexError):
        raise ConfigurationError(
            f"{what}: {path} is not a key file (`dbpool keygen` writes them), nor a key "
            "in Z85 text") from None
    if public is None:
        raise ConfigurationError(f"{what}: {path} holds no public key")
    return public, secret


def client_keys(server_key: str | None, client_key: str | None,
                environ: os._Environ[str] | dict[str, str] | None = None) -> ClientKeys | None:
    """The keys of a client, from its arguments or else ``DBPOOL_SERVER_KEY`` and
    ``DBPOOL_CLIENT_KEY``; None when neither is given (a server without CURVE).

    Raises :class:`~dbpool.errors.ConfigurationError` when only one is given, or
    one cannot be read.
    """
    env = os.environ if environ is None else environ
    server_key = server_key or env.get("DBPOOL_SERVER_KEY") or None
    client_key = client_key or env.get("DBPOOL_CLIENT_KEY") or None
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        missing = "server_key (DBPOOL_SERVER_KEY)" if server_key is None \
            else "client_key (DBPOOL_CLIENT_KEY)"
        raise ConfigurationError(f"CURVE needs both the server's public key and the "
                                 f"client's key pair: {missing} is missing")
    return ClientKeys(load_public_key(server_key, "server_key"),
                      load_key_pair(client_key, "client_key"))


def write_key_pair(name: str, directory: str | Path = ".") -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` into ``directory``; return their paths.

    Refuses (:class:`~dbpool.errors.ConfigurationError`) to overwrite an existing
    pair or to use a name that is not a plain file stem.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name \
            or name.startswith("."):
        raise ConfigurationError(f"a key name is a plain file name, not {name!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigurationError(f"{path} exists: not overwriting a key")
    old_umask = os.umask(0o077)  # the secret file is never readable by others
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old_umask)
    public.chmod(0o644)
    secret.chmod(0o600)
    return public, secret


def handshake_failure(event: int, value: int, endpoint: str,
                      keyed: bool) -> ConnectionError | None:
    """The error a request socket's monitor event means, or None if it is no failure.

    ``keyed`` says whether the client has CURVE keys.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        text = (f"{endpoint} refused this client's key (status {value}): it is not among "
                "the server's authorized keys")
    elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == MECHANISM_MISMATCH:
        text = (f"{endpoint} does not use CURVE; connect without server_key and client_key"
                if keyed else
                f"{endpoint} requires CURVE: give server_key and client_key "
                "(DBPOOL_SERVER_KEY, DBPOOL_CLIENT_KEY)")
    elif event & HANDSHAKE_EVENTS:
        text = (f"the CURVE handshake with {endpoint} failed: is server_key the server's "
                "public key?" if keyed else
                f"the handshake with {endpoint} failed: does it require CURVE? (give "
                "server_key and client_key: DBPOOL_SERVER_KEY, DBPOOL_CLIENT_KEY)")
    else:
        return None
    return ConnectionError(text, reason="unauthorized")
