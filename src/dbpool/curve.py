"""CURVE, ZeroMQ's authenticated and encrypted mechanism (RFC 26, CurveZMQ), without I/O.

Why here and not only in libzmq: the direct transports (:mod:`dbpool.zmtp`)
keep libzmq's I/O thread off each request, and a server with CURVE keys
deserves the same path; with libzmq in between, CURVE cost a third of the
service's throughput (``docs/performance.md``).  What both ends speak is
exactly libzmq's CURVE, so a libzmq client in any language talks to
``dbpool serve`` and dbpool's clients talk to a libzmq server.

The handshake, after greetings that name ``CURVE``:

- the client sends ``HELLO``: its short-term public key ``C'`` and a box
  only the server's long-term key opens;
- the server answers ``WELCOME``: its short-term key ``S'`` and a cookie,
  ``C'`` and ``s'`` sealed with a key only the server knows;
- the client sends ``INITIATE``: the cookie back, its long-term key ``C``,
  a *vouch* (``C'`` and ``S`` boxed from ``C`` to ``S'``: proof that the
  holder of ``c`` made ``C'``), and its metadata;
- the server checks all of it, asks whether ``C`` may connect, and answers
  ``READY`` with its own metadata, or ``ERROR`` with a ZAP status (``400``).

Then every frame travels as a ``MESSAGE``: a nonce that only goes up, and
the frame's flags and body boxed with the short-term keys (:class:`Box`).

The cryptography is libsodium's, through PyNaCl (the ``curve`` extra):
:data:`AVAILABLE` says whether it is installed.  The handshake goes through
PyNaCl's bindings; each frame after it calls libsodium through PyNaCl's own
cffi module, into a buffer the connection keeps (see :class:`Box`).  Without it the clients and
the server use libzmq for CURVE, as before.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, Final

from zmq.utils import z85

from dbpool.zmtp import (
    COMMAND,
    LONG,
    MORE,
    Command,
    HandshakeError,
    error_reason,
    frame,
    metadata,
    properties,
)

try:
    from nacl import bindings as _sodium
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib
    from nacl.exceptions import CryptoError as _CryptoError
except ImportError:  # the ``curve`` extra is not installed: libzmq does CURVE
    AVAILABLE = False
else:
    AVAILABLE = True
    # Looked up once: an attribute of cffi's ``lib`` costs about a quarter of the
    # call itself (measured), and every frame makes two such calls.  Final, so that
    # the compiled build reads them as constants, not from the module's dict.
    _seal_into: Final = _lib.crypto_box_easy_afternm
    _open_into: Final = _lib.crypto_box_open_easy_afternm
    _unpack: Final = _ffi.unpack
    _from_buffer: Final = _ffi.from_buffer

#: A ``MESSAGE`` body below this size is unsealed from a copy of its box; a larger one
#: in place, through a cffi view of it, which costs more than copying a small one.
_COPY_BELOW: Final = 2048

__all__ = ["AVAILABLE", "MECHANISM", "OVERHEAD", "Box", "CurveClient", "CurveServer"]

MECHANISM = b"CURVE"
#: Bytes a frame grows by as a ``MESSAGE``: its name, the nonce, the MAC, the flags.
OVERHEAD: Final = 8 + 8 + 16 + 1
#: The ZAP status a server answers a key it does not authorize with (libzmq's).
UNAUTHORIZED = b"400"

#: A sealed frame's flags are libzmq's message flags, not the wire's (zmtp.MORE and
#: zmtp.COMMAND): a PING sealed with the wire's COMMAND bit reads as a message.
_SEALED_MORE: Final = 0x01
_SEALED_COMMAND: Final = 0x02
#: The flags byte of a sealed frame, by value.
_FLAGS: Final = [bytes((flags,)) for flags in range(4)]
_pack_size: Final = struct.Struct(">BQ").pack
_MESSAGE: Final = b"\x07MESSAGE"
#: A short ``MESSAGE`` frame's header and name, by the frame's size (built once: a
#: ``bytes((0, size))`` per frame cost a tenth of :meth:`Box.seal`, measured).
_SHORT_HEADS: Final = [bytes((0, size)) + _MESSAGE for size in range(256)]


def _head(size: int) -> bytes:
    """The frame header and name of a ``MESSAGE`` of ``size`` bytes (as
    :func:`dbpool.zmtp.frame` makes a header)."""
    return _SHORT_HEADS[size] if size <= 255 else _pack_size(LONG, size) + _MESSAGE

_HELLO_SIZE = 194  # after "\x05HELLO": version, padding, C', nonce, signature box
_WELCOME_SIZE = 160  # after "\x07WELCOME": nonce, box [S' + cookie]
_INITIATE_MIN = 248  # after "\x08INITIATE": cookie, nonce, box [C + vouch], no metadata


def _check_keys(*keys: bytes) -> None:
    if any(len(key) != 32 for key in keys):
        raise ValueError("a CURVE key is 32 bytes (40 characters of Z85)")


def _open(box: bytes, nonce: bytes, public: bytes, secret: bytes, what: str) -> bytes:
    try:
        return bytes(_sodium.crypto_box_open(box, nonce, public, secret))
    except _CryptoError:
        raise HandshakeError(f"CURVE: the peer's {what} does not open") from None


class Box:
    """A connection's two directions after the handshake: :meth:`seal` a frame to
    send, :meth:`unseal` one that came (a :class:`dbpool.zmtp.Decoder`'s
    ``unseal``).  Each side counts its nonces up from where the handshake left
    them; a nonce that does not go up is refused, so no ``MESSAGE`` can be
    replayed."""

    __slots__ = ("_buffer", "_key", "_nonce", "_peer_nonce", "_room_size", "_seal_prefix",
                 "_unseal_prefix")

    def __init__(self, key: bytes, nonce: int, peer_nonce: int, client: bool) -> None:
        self._key = key
        self._nonce = nonce
        #: The peer's last nonce as sent: 8 bytes, big-endian, so that comparing them
        #: compares the numbers, with no conversion per frame.
        self._peer_nonce = peer_nonce.to_bytes(8, "big")
        self._seal_prefix = b"CurveZMQMESSAGEC" if client else b"CurveZMQMESSAGES"
        self._unseal_prefix = b"CurveZMQMESSAGES" if client else b"CurveZMQMESSAGEC"
        #: Where libsodium writes, reused: a connection seals and unseals one frame at
        #: a time, and PyNaCl's bindings would allocate and check on every call (half
        #: of a request's cost of CURVE, measured).
        self._buffer = _ffi.new("char[]", 4096)
        #: The buffer's size, kept beside it: ``len`` of a cffi array is a call, on
        #: every frame, where this is a field read in the compiled build.
        self._room_size = 4096

    def _room(self, size: int) -> Any:
        """The buffer, grown to ``size`` bytes if it is smaller."""
        if self._room_size < size:
            self._buffer = _ffi.new("char[]", size)
            self._room_size = size
        return self._buffer

    def seal(self, body: bytes, *, more: bool = False, command: bool = False) -> bytes:
        """``body`` as one ``MESSAGE`` frame, ready to write (as
        :func:`dbpool.zmtp.frame` makes a plain one)."""
        nonce = self._nonce = self._nonce + 1
        short = nonce.to_bytes(8, "big")
        plain = _FLAGS[(_SEALED_MORE if more else 0) | (_SEALED_COMMAND if command else 0)] + body
        size = len(plain) + 16
        buffer = self._room(size)
        _seal_into(buffer, plain, size - 16, self._seal_prefix + short, self._key)
        return b"".join((_head(size + 16), short, _unpack(buffer, size)))

    def unseal(self, body: bytes) -> tuple[int, bytes]:
        """The flags (as a plain frame's: :data:`dbpool.zmtp.MORE`,
        :data:`dbpool.zmtp.COMMAND`) and body a ``MESSAGE`` frame carries.

        Raises :class:`~dbpool.zmtp.HandshakeError` for anything else: another
        frame, a nonce that does not go up, a box that does not open.
        """
        if len(body) < OVERHEAD or body[:8] != _MESSAGE:
            raise HandshakeError("CURVE: a frame that is not a MESSAGE")
        short = body[8:16]
        if short <= self._peer_nonce:
            raise HandshakeError("CURVE: a MESSAGE nonce that does not go up (a replay?)")
        size = len(body) - 16
        buffer = self._room(size)
        # A large box is read in place, and the body copied out once: a reply may be large.
        box = body[16:] if size < _COPY_BELOW else _from_buffer(body) + 16
        if _open_into(buffer, box, size, self._unseal_prefix + short, self._key) != 0:
            raise HandshakeError("CURVE: a MESSAGE that does not open")
        self._peer_nonce = short
        plain: bytes = _unpack(buffer, size - 16)
        sealed_flags = plain[0]
        if not sealed_flags:
            return 0, plain[1:]
        flags = ((MORE if sealed_flags & _SEALED_MORE else 0)
                 | (COMMAND if sealed_flags & _SEALED_COMMAND else 0))
        return flags, plain[1:]


class CurveClient:
    """The client's side of a handshake with the server whose public key is
    ``server_key``, as the holder of ``public``/``secret`` (raw 32-byte keys).

    :meth:`hello` is the first command to send; :meth:`step` takes each
    command the server sends and returns what to send back (``b""`` when
    nothing).  Once :attr:`box` is set the handshake is done.
    """

    mechanism = MECHANISM
    as_server = False
    overhead = OVERHEAD

    def __init__(self, server_key: bytes, public: bytes, secret: bytes,
                 socket_type: bytes = b"DEALER") -> None:
        if not AVAILABLE:
            raise RuntimeError("CURVE without libzmq needs PyNaCl: pip install 'dbpool[curve]'")
        _check_keys(server_key, public, secret)
        self._server = server_key
        self._public = public
        self._secret = secret
        self._socket_type = socket_type
        self._short_public, self._short_secret = _sodium.crypto_box_keypair()
        self._nonce = 0
        self._key = b""  # precomputed from S' and c', after WELCOME
        self.box: Box | None = None
        self.user_id: str | None = None  # the server's is not reported
        self.properties: dict[bytes, bytes] = {}

    @property
    def done(self) -> bool:
        return self.box is not None

    def _next_nonce(self) -> bytes:
        self._nonce += 1
        return self._nonce.to_bytes(8, "big")

    def first(self) -> bytes:
        """``HELLO``: ``C'``, and 64 zeros boxed from ``C'`` to ``S`` (the padding
        makes it as long as the ``WELCOME`` it asks for: no amplification)."""
        short = self._next_nonce()
        signature = _sodium.crypto_box(bytes(64), b"CurveZMQHELLO---" + short,
                                       self._server, self._short_secret)
        return frame(b"\x05HELLO\x01\x00" + bytes(72) + self._short_public + short + signature,
                     command=True)

    def step(self, command: Command) -> bytes:
        name, data = command.name, command.data
        if name == b"ERROR":
            reason = error_reason(data)
            raise HandshakeError(f"the peer refused the handshake: {reason}", status=reason)
        if name == b"WELCOME" and not self._key:
            return self._initiate(data)
        if name == b"READY" and self._key and self.box is None:
            self._ready(data)
            return b""
        raise HandshakeError(f"CURVE: an unexpected {name.decode('ascii', 'replace')} "
                             "command in the handshake")

    def _initiate(self, data: bytes) -> bytes:
        if len(data) != _WELCOME_SIZE:
            raise HandshakeError("CURVE: a WELCOME of the wrong size")
        plain = _open(data[16:], b"WELCOME-" + data[:16], self._server, self._short_secret,
                      "WELCOME (is server_key the server's public key?)")
        server_short, cookie = plain[:32], plain[32:128]
        self._key = bytes(_sodium.crypto_box_beforenm(server_short, self._short_secret))
        vouch_nonce = os.urandom(16)
        vouch = _sodium.crypto_box(self._short_public + self._server, b"VOUCH---" + vouch_nonce,
                                   server_short, self._secret)
        short = self._next_nonce()
        sealed = _sodium.crypto_box_easy_afternm(
            self._public + vouch_nonce + vouch + metadata(self._socket_type),
            b"CurveZMQINITIATE" + short, self._key)
        return frame(b"\x08INITIATE" + cookie + short + sealed, command=True)

    def _ready(self, data: bytes) -> None:
        if len(data) < 8 + 16:
            raise HandshakeError("CURVE: a READY cut short")
        try:
            plain = _sodium.crypto_box_open_easy_afternm(
                data[8:], b"CurveZMQREADY---" + data[:8], self._key)
        except _CryptoError:
            raise HandshakeError("CURVE: the server's READY does not open") from None
        self.properties = properties(bytes(plain))
        self.box = Box(self._key, self._nonce, int.from_bytes(data[:8], "big"), client=True)


class CurveServer:
    """The server's side of one connection's handshake, as the holder of
    ``public``/``secret`` (raw 32-byte keys), admitting the clients whose
    long-term public key ``authorize`` accepts.

    :meth:`step` takes each command the client sends and returns what to send
    back.  A client ``authorize`` refuses raises
    :class:`~dbpool.zmtp.HandshakeError` with ``status="400"``: send it
    :func:`dbpool.zmtp.error_command` of that status, then close.  Once :attr:`box`
    is set the handshake is done; :attr:`user_id` is then the client's
    long-term public key as Z85 text (libzmq's ``User-Id``) and
    :attr:`properties` its metadata.
    """

    mechanism = MECHANISM
    as_server = True
    overhead = OVERHEAD

    def __init__(self, public: bytes, secret: bytes, authorize: Callable[[bytes], bool],
                 socket_type: bytes = b"ROUTER") -> None:
        if not AVAILABLE:
            raise RuntimeError("CURVE without libzmq needs PyNaCl: pip install 'dbpool[curve]'")
        _check_keys(public, secret)
        self._public = public
        self._secret = secret
        self._authorize = authorize
        self._socket_type = socket_type
        self._client_short = b""  # C', from HELLO
        self._short_public = b""  # S' and s': made for this connection at WELCOME
        self._short_secret = b""
        self._cookie_key = b""
        self._nonce = 0
        self._peer_nonce = 0
        self.box: Box | None = None
        self.user_id: str | None = None
        self.properties: dict[bytes, bytes] = {}

    @property
    def done(self) -> bool:
        return self.box is not None

    def first(self) -> bytes:
        """Nothing: the client speaks first (``HELLO``)."""
        return b""

    def step(self, command: Command) -> bytes:
        name, data = command.name, command.data
        if name == b"HELLO" and not self._client_short:
            return self._welcome(data)
        if name == b"INITIATE" and self._client_short and self.box is None:
            return self._ready(data)
        if name == b"ERROR":
            raise HandshakeError(f"the client sent ERROR: {error_reason(data)}")
        raise HandshakeError(f"CURVE: an unexpected {name.decode('ascii', 'replace')} "
                             "command in the handshake")

    def _welcome(self, data: bytes) -> bytes:
        if len(data) != _HELLO_SIZE:
            raise HandshakeError("CURVE: a HELLO of the wrong size")
        if data[:2] != b"\x01\x00":
            raise HandshakeError(f"CURVE: a HELLO of version {data[0]}.{data[1]}, not 1.0")
        client_short, short = data[74:106], data[106:114]
        _open(data[114:], b"CurveZMQHELLO---" + short, client_short, self._secret,
              "HELLO (does it have this server's public key?)")
        self._client_short = client_short
        self._peer_nonce = int.from_bytes(short, "big")
        self._short_public, self._short_secret = _sodium.crypto_box_keypair()
        self._cookie_key = os.urandom(32)
        cookie_nonce = os.urandom(16)
        cookie = _sodium.crypto_secretbox(client_short + self._short_secret,
                                          b"COOKIE--" + cookie_nonce, self._cookie_key)
        welcome_nonce = os.urandom(16)
        sealed = _sodium.crypto_box(self._short_public + cookie_nonce + cookie,
                                    b"WELCOME-" + welcome_nonce, client_short, self._secret)
        return frame(b"\x07WELCOME" + welcome_nonce + sealed, command=True)

    def _ready(self, data: bytes) -> bytes:
        if len(data) < _INITIATE_MIN:
            raise HandshakeError("CURVE: an INITIATE cut short")
        try:
            cookie = _sodium.crypto_secretbox_open(data[16:96], b"COOKIE--" + data[:16],
                                                   self._cookie_key)
        except _CryptoError:
            raise HandshakeError("CURVE: the INITIATE's cookie does not open") from None
        if cookie != self._client_short + self._short_secret:
            raise HandshakeError("CURVE: the INITIATE's cookie is not this connection's")
        short = data[96:104]
        nonce = int.from_bytes(short, "big")
        if nonce <= self._peer_nonce:
            raise HandshakeError("CURVE: an INITIATE nonce that does not go up")
        key = bytes(_sodium.crypto_box_beforenm(self._client_short, self._short_secret))
        try:
            plain = bytes(_sodium.crypto_box_open_easy_afternm(
                data[104:], b"CurveZMQINITIATE" + short, key))
        except _CryptoError:
            raise HandshakeError("CURVE: the INITIATE does not open") from None
        client_key, vouch_nonce, vouch = plain[:32], plain[32:48], plain[48:128]
        vouched = _open(vouch, b"VOUCH---" + vouch_nonce, client_key, self._short_secret,
                        "vouch")
        if vouched != self._client_short + self._public:
            raise HandshakeError("CURVE: the vouch is not for this connection")
        found = properties(plain[128:])
        if not self._authorize(client_key):
            raise HandshakeError("CURVE: the client's key is not authorized",
                                 status=UNAUTHORIZED.decode())
        self.user_id = z85.encode(client_key).decode()
        self.properties = found
        ready_short = (self._nonce + 1).to_bytes(8, "big")
        sealed = _sodium.crypto_box_easy_afternm(metadata(self._socket_type),
                                                 b"CurveZMQREADY---" + ready_short, key)
        self.box = Box(key, self._nonce + 1, nonce, client=False)
        self._short_secret = self._cookie_key = b""  # of no more use: not kept in memory
        return frame(b"\x05READY" + ready_short + sealed, command=True)
