"""The asyncio client's direct connection: ZMTP spoken on the event loop's own TCP
transport (the protocol itself is :mod:`dbpool.zmtp`).

Why: a ``zmq.asyncio`` socket moves every message through libzmq's I/O
thread, which cost the asyncio client about 11 µs of CPU per request on top
of its own 18 µs (``docs/performance.md``).  Here the loop writes the
requests and reads the replies itself, as a ``DEALER`` with the ``NULL``
mechanism or CURVE (:mod:`dbpool.curve`), which the server's ``ROUTER`` (or
any ZeroMQ peer) cannot tell from a libzmq ``DEALER``.  It is
:mod:`dbpool.client.direct` for asyncio.

Requests written in one turn of the loop leave in one ``send``: with many
tasks, many requests share a system call.  Replies are read into a buffer
the connection keeps (a :class:`asyncio.BufferedProtocol`): with a plain
``Protocol`` the loop would allocate 256 KiB per read, above glibc's
threshold for ``mmap``, so every reply cost an ``mmap``, an ``mremap`` and
a ``munmap`` (seen with ``strace``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dbpool.zmtp import (
    Command,
    Decoder,
    Handshake,
    HandshakeError,
    NullHandshake,
    frame,
    greeting,
)

__all__ = ["AsyncZmtpConnection"]

#: Bytes read per ``recv``: a reply of a ``SELECT`` fits many times over.
_READ_SIZE = 1 << 16


class AsyncZmtpConnection(asyncio.BufferedProtocol):
    """One ZMTP connection, as a ``DEALER``, on an asyncio transport.

    Open it with :meth:`open`.  Each message that comes after the handshake
    goes to ``on_message`` (its last frame); ``on_lost(error)`` is called once
    if the connection ends after the handshake, unless :meth:`close` ended it.
    ``handshake`` is its security mechanism (``NULL`` when None).
    """

    def __init__(self, on_message: Callable[[bytes], object],
                 on_lost: Callable[[BaseException | None], object],
                 handshake: Handshake | None = None) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._handshake = handshake = handshake or NullHandshake()
        self._decoder = Decoder(mechanism=handshake.mechanism)
        #: How a frame goes out: plain, or sealed by the mechanism (CURVE).
        self._frame: Callable[..., bytes] = frame
        self._sealed = False
        self._transport: asyncio.Transport | None = None
        self._greeted = False
        #: Whether any byte came from the peer: a close before one is *silent*.
        self._heard = False
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._out: list[bytes] = []
        self._closed = False
        self._read_view = memoryview(bytearray(_READ_SIZE))

    @classmethod
    async def open(cls, host: str, port: int, on_message: Callable[[bytes], object],
                   on_lost: Callable[[BaseException | None], object],
                   handshake: Handshake | None = None) -> AsyncZmtpConnection:
        """Connect to ``host:port`` and shake hands.

        Raises ``OSError`` (refused, unreachable) or :class:`HandshakeError`
        (its ``silent`` set if the peer closed without a byte of greeting);
        cancel it to give up.
        """
        conn = cls(on_message, on_lost, handshake)
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: conn, host, port)
            await conn._ready
        except BaseException:
            conn.close()
            raise
        return conn

    # -- sending ----------------------------------------------------------------------

    def send(self, body: bytes) -> bool:
        """Queue one single-frame message; False if the connection is closed.  What is
        queued in one turn of the loop goes out at the end of it, in one write."""
        if self._closed:
            return False
        out = self._out
        if not out:
            asyncio.get_running_loop().call_soon(self._flush)
        out.append(self._frame(body))
        return True

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self._transport
        if transport is not None and not self._closed and out:
            transport.write(b"".join(out) if len(out) > 1 else out[0])

    def close(self) -> None:
        """Close at once (what is unsent is dropped, as with ``LINGER=0``)."""
        self._closed = True
        self._out.clear()
        if not self._ready.done():
            self._ready.cancel()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()

    # -- asyncio.BufferedProtocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._closed:
            transport.abort()
            return
        self._transport = transport
        # Our first command only once the peer's greeting names our mechanism (see
        # dbpool.client.direct: a server that wants another then closes cleanly).
        handshake = self._handshake
        transport.write(greeting(handshake.mechanism, handshake.as_server))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Take in ``data`` as it came from the peer."""
        self._heard = True
        decoder = self._decoder
        if self._ready.done() and decoder.empty and not self._sealed:
            # The common case, without the decoder: whole short single-frame replies.
            pos, end = 0, len(data)
            on_message = self._on_message
            while end - pos >= 2 and data[pos] == 0:
                stop = pos + 2 + data[pos + 1]
                if stop > end:
                    break
                on_message(data[pos + 2:stop])
                pos = stop
            if pos == end:
                return
            data = data[pos:]
        decoder.feed(data)
        try:
            if not self._greeted:
                if not decoder.greeted():
                    return
                self._greeted = True
                assert self._transport is not None
                self._transport.write(self._handshake.first())
            for event in decoder.events():
                if isinstance(event, Command):
                    self._command(event)
                elif self._ready.done():
                    self._on_message(event[-1])
                else:
                    raise HandshakeError("the peer sent a message before its READY")
        except HandshakeError as exc:
            self._fail(exc)

    def _command(self, command: Command) -> None:
        if not self._ready.done():
            handshake = self._handshake
            answer = handshake.step(command)
            if answer and self._transport is not None:
                self._transport.write(answer)
            if handshake.done:
                box = handshake.box
                if box is not None:
                    self._decoder.unseal = box.unseal
                    self._frame, self._sealed = box.seal, True
                self._ready.set_result(None)
        elif command.name == b"PING" and self._transport is not None:
            context = command.data[2:18]  # after the 2-octet TTL, at most 16 octets
            self._transport.write(self._frame(b"\x04PONG" + context, command=True))

    def _fail(self, error: HandshakeError) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self.close()
            return
        lost = not self._closed  # after the handshake: a frame that does not unseal
        self.close()
        if lost:
            self._on_lost(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._ready.done():
            self._ready.set_exception(HandshakeError(
                f"the peer closed the connection during the handshake ({exc or 'EOF'})",
                silent=not self._heard))
            return
        if not self._closed:
            self._closed = True
            self._on_lost(exc)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AsyncZmtpConnection {state}>"

