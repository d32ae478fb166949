"""Who may talk to ``dbpool serve``: CURVE authentication.

With ``curve_secret_key`` and ``authorized_keys`` set, the server's request
(ROUTER) and event (PUB) sockets are CURVE servers, and every handshake is
decided against the authorized keys: the public-key files (``NAME.key``) in
the ``authorized_keys`` folder.  libzmq's sockets ask through ZAP (pyzmq's
authenticator); the front end's own ROUTER, which speaks CURVE itself when
PyNaCl is installed (:mod:`dbpool.curve`), asks :meth:`Authority.callback`
directly (:meth:`Authority.handshake`).  A
client's name is its file's stem.  A client whose key is not there never
completes a handshake: it gets no reply and no event, and its socket's
monitor tells it why at once (see :func:`dbpool.keys.handshake_failure`).

ZAP decides only at the handshake, so a connection stays open after its
key is removed.  Every request therefore carries the key its connection
authenticated with (ZeroMQ's ``User-Id`` metadata), and the front end asks
:meth:`Authority.name_of` for its name before serving it: a key removed by
:meth:`Authority.reload` (``SIGHUP``) is refused on its next request, on a
connection it opened before too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dbpool.curve import CurveServer
from dbpool.errors import ConfigurationError
from dbpool.keys import KeyPair, load_key_pair, load_public_key

__all__ = ["DOMAIN", "Authority", "read_authorized_keys"]

logger = logging.getLogger("dbpool.server.auth")

#: The ZAP domain of dbpool's sockets.
DOMAIN = "dbpool"


def read_authorized_keys(folder: str) -> dict[bytes, str]:
    """The client names by public key (Z85) of the ``*.key`` files in ``folder``.

    Raises :class:`~dbpool.errors.ConfigurationError` if the folder cannot be
    read, a file is not a key, or two files hold the same key.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ConfigurationError(f"authorized_keys: {folder} is not a folder")
    names: dict[bytes, str] = {}
    for file in sorted(path.glob("*.key")):
        key = load_public_key(str(file), f"authorized_keys: {file.name}")
        other = names.get(key)
        if other is not None:
            raise ConfigurationError(
                f"authorized_keys: {file.name} holds the same key as {other}.key")
        names[key] = file.stem
    return names


class _CallbackAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP authenticator on its thread, asking an :class:`Authority`."""

    def __init__(self, context: zmq.Context[Any], authority: Authority) -> None:
        super().__init__(context, log=logging.getLogger("dbpool.server.zap"))
        self._authority = authority

    def curve_user_id(self, client_public_key: bytes) -> str:
        # The key itself: a request maps it to a name when it arrives, so a
        # key removed or renamed by a reload takes effect at once.
        return zmq.utils.z85.encode(client_public_key).decode()


class Authority:
    """The server's key pair, the authorized client keys, and the ZAP handler.

    :meth:`start` before the sockets bind; :meth:`secure` each socket;
    :meth:`stop` after they closed.
    """

    def __init__(self, secret_key: str, authorized_keys: str) -> None:
        self.keys: KeyPair = load_key_pair(secret_key, "curve_secret_key")
        self.folder = authorized_keys
        self._names = read_authorized_keys(authorized_keys)
        self._zap: _CallbackAuthenticator | None = None

    @property
    def clients(self) -> list[str]:
        """The names of the authorized clients."""
        return sorted(self._names.values())

    def start(self, context: zmq.Context[Any]) -> None:
        """Start answering ZAP requests in ``context`` (one handler per context)."""
        zap = _CallbackAuthenticator(context, self)
        zap.start()
        zap.configure_curve_callback(DOMAIN, self)
        self._zap = zap
        logger.info("CURVE: %d authorized client key(s) in %s", len(self._names), self.folder)

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server that ZAP authorizes (before it binds)."""
        sock.curve_server = True
        sock.curve_publickey = self.keys.public
        sock.curve_secretkey = self.keys.secret
        sock.zap_domain = DOMAIN.encode()

    def handshake(self) -> CurveServer:
        """The CURVE handshake of one connection to the front end's own ROUTER
        (:mod:`dbpool.server.direct_router`), authorized as ZAP authorizes libzmq's."""
        return CurveServer(z85.decode(self.keys.public), z85.decode(self.keys.secret),
                           lambda key: self.callback(DOMAIN, z85.encode(key)))

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question (on its thread): may the holder of ``key`` (Z85) connect?"""
        allowed = key in self._names
        if not allowed:
            logger.info("CURVE: refused a client with an unknown key %s", key.decode())
        return allowed

    def name_of(self, user_id: str | None) -> str | None:
        """The name of the client whose connection authenticated with ``user_id`` (its
        Z85 public key), or None if that key is no longer authorized."""
        if user_id is None:
            return None
        return self._names.get(user_id.encode())

    def reload(self) -> tuple[list[str], list[str]]:
        """Read the authorized keys again; return the names added and removed.

        A folder that cannot be read keeps the keys as they were, and raises.
        """
        names = read_authorized_keys(self.folder)
        before, after = set(self._names.values()), set(names.values())
        self._names = names  # one reference swap: ZAP's thread sees old or new
        added, removed = sorted(after - before), sorted(before - after)
        logger.info("CURVE: authorized keys reloaded: %d key(s); added %s, removed %s",
                    len(names), ", ".join(added) or "none", ", ".join(removed) or "none")
        return added, removed

    def stop(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
