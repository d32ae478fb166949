"""ZeroMQ's wire protocol, ZMTP 3.1 (RFC 23, with RFC 37's PING and PONG), without I/O.

Both ends of ``dbpool serve`` can speak it themselves on a TCP socket
instead of going through libzmq, whose I/O thread costs two thread wake-ups
per message on each side (``docs/performance.md``): the sync client
(:mod:`dbpool.client.direct`) and the server's request socket
(:mod:`dbpool.server.direct_router`).  The ``NULL`` mechanism is all here;
CURVE (RFC 26) is :mod:`dbpool.curve`, which the decoder takes as its
:attr:`Decoder.unseal` once the handshake is done.

:class:`Decoder` turns bytes into messages and commands; :func:`frame`,
:func:`greeting` and :func:`ready` make the bytes to send.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "COMMAND",
    "GREETING_SIZE",
    "LONG",
    "MORE",
    "Command",
    "Decoder",
    "Handshake",
    "HandshakeError",
    "NullHandshake",
    "Sealer",
    "TooLarge",
    "error_command",
    "error_reason",
    "frame",
    "greeting",
    "metadata",
    "properties",
    "ready",
]

#: Signature (with the padding libzmq sends) and version 3.1.
_SIGNATURE = b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f" + bytes((3, 1))
GREETING_SIZE = 64

MORE = 0x01
LONG = 0x02
COMMAND = 0x04
_pack_size = struct.Struct(">Q").pack
_unpack_size = struct.Struct(">Q").unpack_from
_pack_length = struct.Struct(">I").pack
_unpack_length = struct.Struct(">I").unpack_from


class HandshakeError(Exception):
    """The peer does not speak ZMTP 3 with our mechanism, broke its rules, or
    refused us (its ERROR's reason).

    :attr:`mismatch` is True when the peer speaks ZMTP with another security
    mechanism (a server that requires CURVE, or one without it).
    """

    def __init__(self, message: str, *, mismatch: bool = False, silent: bool = False,
                 status: str | None = None) -> None:
        super().__init__(message)
        self.mismatch = mismatch
        #: The peer closed without a byte of greeting: a server that refuses our
        #: mechanism may do that, and so may one that is going away.
        self.silent = silent
        #: The reason of the peer's ERROR command (a ZAP status such as ``"400"``
        #: when a CURVE server did not authorize our key), or None.
        self.status = status


def greeting(mechanism: bytes = b"NULL", as_server: bool = False) -> bytes:
    """This side's greeting: ZMTP 3.1 with ``mechanism`` (``NULL``'s handshake
    ignores the as-server bit, so both of its ends send the same)."""
    return (_SIGNATURE + mechanism.ljust(20, b"\x00") + (b"\x01" if as_server else b"\x00")
            + bytes(31))


def error_command(reason: bytes) -> bytes:
    """The ``ERROR`` command refusing a handshake for ``reason`` (at most 255 bytes)."""
    reason = reason[:255]
    return frame(b"\x05ERROR" + bytes((len(reason),)) + reason, command=True)


def error_reason(data: bytes) -> str:
    """The reason an ``ERROR`` command's body (after its name) gives."""
    return data[1:1 + data[0]].decode("utf-8", "replace") if data else ""


def frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    """``body`` as one frame: flags, size (1 octet, or 8 when over 255), body."""
    flags = (MORE if more else 0) | (COMMAND if command else 0)
    size = len(body)
    if size > 255:
        return bytes((flags | LONG,)) + _pack_size(size) + body
    return bytes((flags, size)) + body


def metadata(socket_type: bytes) -> bytes:
    """A handshake's metadata (RFC 23): our ``Socket-Type`` property."""
    name = b"Socket-Type"
    return bytes((len(name),)) + name + _pack_length(len(socket_type)) + socket_type


def ready(socket_type: bytes = b"DEALER") -> bytes:
    """The ``READY`` command of the NULL mechanism, with our ``Socket-Type``."""
    return frame(b"\x05READY" + metadata(socket_type), command=True)


def properties(data: bytes) -> dict[bytes, bytes]:
    """The metadata of a ``READY`` command's body (after its name), by lower-case name.

    Raises :class:`HandshakeError` if it is cut short.
    """
    found: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        length = data[pos]
        name_end = pos + 1 + length
        if name_end + 4 > end:
            raise HandshakeError("a READY command's metadata is cut short")
        size = _unpack_length(data, name_end)[0]
        value_end = name_end + 4 + size
        if value_end > end:
            raise HandshakeError("a READY command's metadata is cut short")
        found[bytes(data[pos + 1:name_end]).lower()] = bytes(data[name_end + 4:value_end])
        pos = value_end
    return found


class TooLarge(Exception):
    """A frame larger than the decoder's ``max_size``."""


@dataclass(frozen=True)
class Command:
    """A command frame: its name and the rest of its body."""

    name: bytes
    data: bytes


class Decoder:
    """Frames out of a byte stream, after the peer's greeting.

    :meth:`feed` takes what was read; :meth:`events` yields each complete
    message (``list[bytes]``, its frames) and each :class:`Command`, in
    order.  The greeting is checked first: anything but ZMTP 3 with
    ``mechanism`` raises :class:`HandshakeError`.
    """

    def __init__(self, max_size: int | None = None, mechanism: bytes = b"NULL") -> None:
        #: The largest frame taken; a larger one raises :class:`TooLarge` as soon as
        #: its size is read, before its body is buffered.  The frames of one
        #: message may not add up to more either.
        self.max_size = max_size
        self.mechanism = mechanism
        #: Once a secure mechanism's handshake is done: what turns each frame that
        #: came into the ``(flags, body)`` it carries (CURVE's ``MESSAGE``,
        #: :meth:`dbpool.curve.Box.unseal`).
        self.unseal: Callable[[bytes], tuple[int, bytes]] | None = None
        self._buffer = bytearray()
        self._pos = 0
        self._greeted = False
        self._parts: list[bytes] = []
        #: What :meth:`single` unsealed that :meth:`events` is to take: (flags, body).
        self._held: list[tuple[int, bytes]] = []

    @property
    def empty(self) -> bool:
        """Whether nothing is buffered: the greeting was read and no frame is part-read."""
        return (self._greeted and len(self._buffer) == self._pos and not self._parts
                and not self._held)

    def single(self, data: bytes) -> bytes | None:
        """The message ``data`` is when it is exactly one whole frame ending a message and
        nothing is buffered: the usual reply, taken without :meth:`feed` and
        :meth:`events`.  Otherwise None, and ``data`` waits for :meth:`events`, as does
        a sealed frame that turned out to be a command or part of a message."""
        if self.empty and (self.unseal is not None or self.mechanism == b"NULL"):
            size = len(data)
            body: bytes | None = None
            if size >= 2 and data[0] == 0 and data[1] == size - 2:
                body = data[2:]
            elif size >= 9 and data[0] == LONG and _unpack_size(data, 1)[0] == size - 9:
                body = data[9:]
            if body is not None and (self.max_size is None or len(body) <= self.max_size):
                if self.unseal is None:
                    return body
                flags, body = self.unseal(body)
                if not flags:
                    return body
                self._held.append((flags, body))
                return None
        self.feed(data)
        return None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def greeted(self) -> bool:
        """Whether the peer's greeting was read (and found good): HandshakeError if bad."""
        if not self._greeted:
            buffer = self._buffer
            if len(buffer) - self._pos < GREETING_SIZE:
                return False
            self._check_greeting(bytes(buffer[self._pos:self._pos + GREETING_SIZE]))
            self._pos += GREETING_SIZE
            self._greeted = True
        return True

    def events(self) -> Iterator[list[bytes] | Command]:
        if not self.greeted():
            return
        held, self._held = self._held, []
        for flags, body in held:
            event = self._take(flags, body)
            if event is not None:
                yield event
        buffer = self._buffer
        while True:
            pos, end = self._pos, len(buffer)
            if end - pos < 2:
                break
            flags = buffer[pos]
            if flags & LONG:
                if end - pos < 9:
                    break
                size = _unpack_size(buffer, pos + 1)[0]
                start = pos + 9
            else:
                size = buffer[pos + 1]
                start = pos + 2
            if self.max_size is not None and size > self.max_size:
                raise TooLarge(f"a frame of {size} bytes is over the limit of "
                               f"{self.max_size}")
            if end - start < size:
                break
            body = bytes(buffer[start:start + size])
            self._pos = start + size
            if self.unseal is not None:
                flags, body = self.unseal(body)
            elif not flags & COMMAND and self.mechanism != b"NULL":
                # Before a secure handshake ends only its commands may come: a frame
                # kept now would reach the application unauthenticated.
                raise HandshakeError("a message frame before the security handshake ended")
            event = self._take(flags, body)
            if event is not None:
                yield event
        if self._pos:  # keep what is left unparsed at the front
            del buffer[:self._pos]
            self._pos = 0

    def _take(self, flags: int, body: bytes) -> list[bytes] | Command | None:
        """What a frame completes: a command, a message, or nothing yet (a part)."""
        if flags & COMMAND:
            length = body[0] if body else 0
            return Command(body[1:1 + length], body[1 + length:])
        parts = self._parts
        if flags & MORE:
            parts.append(body)
            if self.max_size is not None and sum(len(part) for part in parts) > self.max_size:
                raise TooLarge(f"a message of {len(parts)} frames is over the limit "
                               f"of {self.max_size} bytes")
            return None
        self._parts = []
        parts.append(body)
        return parts

    def _check_greeting(self, data: bytes) -> None:
        if data[0] != 0xFF or data[9] != 0x7F:
            raise HandshakeError("the peer does not speak ZMTP (no ZeroMQ signature)")
        if data[10] < 3:
            raise HandshakeError(f"the peer speaks ZMTP {data[10]}.{data[11]}, not 3")
        mechanism = data[12:32].rstrip(b"\x00")
        if mechanism != self.mechanism:
            raise HandshakeError(f"the peer wants the {mechanism.decode('ascii', 'replace')} "
                                 "security mechanism", mismatch=True)


class Sealer(Protocol):
    """What a secure mechanism does to each frame after its handshake
    (:class:`dbpool.curve.Box`)."""

    def seal(self, body: bytes, *, more: bool = False, command: bool = False) -> bytes: ...

    def unseal(self, body: bytes) -> tuple[int, bytes]: ...


class Handshake(Protocol):
    """One side of a security mechanism's handshake, after the greetings.

    :meth:`first` is what to send once the peer's greeting is read; :meth:`step`
    takes each command the peer sends and returns what to send back (``b""``
    for nothing), raising :class:`HandshakeError` when the peer fails or
    refuses it.  When :attr:`done`, :attr:`properties` is the peer's metadata
    and :attr:`box` (None for ``NULL``) seals and unseals every frame.
    """

    mechanism: bytes
    as_server: bool
    #: Bytes the mechanism adds to each frame (a decoder's size limit allows them).
    overhead: int
    properties: dict[bytes, bytes]
    #: Who the peer proved to be (a CURVE server's client key, Z85), or None.
    user_id: str | None

    @property
    def done(self) -> bool: ...

    @property
    def box(self) -> Sealer | None: ...

    def first(self) -> bytes: ...

    def step(self, command: Command) -> bytes: ...


class NullHandshake:
    """``NULL`` (RFC 23): each side sends ``READY`` with its ``Socket-Type``; done
    on the peer's."""

    mechanism = b"NULL"
    as_server = False
    overhead = 0

    def __init__(self, socket_type: bytes = b"DEALER") -> None:
        self._socket_type = socket_type
        # Set here, not as class defaults: a compiled (mypyc) class would not have them.
        self.box: Sealer | None = None
        self.user_id: str | None = None
        self.done = False
        self.properties: dict[bytes, bytes] = {}

    def first(self) -> bytes:
        return ready(self._socket_type)

    def step(self, command: Command) -> bytes:
        if command.name == b"READY" and not self.done:
            self.properties = properties(command.data)
            self.done = True
            return b""
        if command.name == b"ERROR":
            reason = error_reason(command.data)
            raise HandshakeError(f"the peer refused the handshake: {reason}", status=reason)
        if command.name in (b"PING", b"PONG"):
            return b""
        raise HandshakeError(f"an unexpected {command.name.decode('ascii', 'replace')} "
                             "command in the handshake")
