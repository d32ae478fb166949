"""The sync client's direct connection: ZMTP spoken on a TCP socket in the
caller's thread (the protocol itself is :mod:`dbpool.zmtp`).

Why: libzmq moves every message through an I/O thread of its own.  For a
client that sends one request and waits for its reply, that is two thread
wake-ups per round trip in the client alone, and on a 2-core machine each
costs about as much as the query (``docs/performance.md``).  Here the
caller's thread writes the request and reads the reply itself, as a
``DEALER`` with the ``NULL`` mechanism, or CURVE (:mod:`dbpool.curve`):
the server's ``ROUTER`` (or any ZeroMQ peer) cannot tell it from a libzmq
``DEALER``.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from dbpool.spin import LATE_YIELD, POLL_TIMES, SLEEPS_AFTER_LATE_YIELD, moving_average
from dbpool.zmtp import (
    Command,
    Decoder,
    Handshake,
    HandshakeError,
    NullHandshake,
    frame,
    greeting,
)

__all__ = ["PeerClosed", "ZmtpConnection"]

logger = logging.getLogger("dbpool.client.direct")

_monotonic = time.monotonic

#: Bytes read per ``recv``: a reply of a ``SELECT`` fits many times over.
_READ_SIZE = 1 << 16


#: The connections whose threads poll for a reply now (set.add and discard are
#: atomic under the GIL).
_POLLING: Final[set[ZmtpConnection]] = set()


class PeerClosed(Exception):
    """The peer closed the connection."""


class ZmtpConnection:
    """One ZMTP connection, as a ``DEALER``, on a blocking TCP socket.

    Not thread-safe: one thread uses it (the sync client keeps one per
    thread).  :meth:`close` may come from another thread; the owner's
    pending call then fails with :class:`PeerClosed` or ``OSError``.
    ``handshake`` makes each connection's security mechanism (``NULL`` by
    default; :class:`dbpool.curve.CurveClient` for CURVE).  ``spin`` (seconds,
    0 for never) is the round trip below which :meth:`recv` polls for its reply
    rather than sleep: see :meth:`_poll`.
    """

    def __init__(self, host: str, port: int,
                 handshake: Callable[[], Handshake] = NullHandshake,
                 spin: float = 0.0) -> None:
        self.host = host
        self.port = port
        self._handshake = handshake
        self.spin = spin
        #: When the last message went out, and the recent round trips' moving average
        #: (0 at first: the first reply is polled for).
        self._sent_at = 0.0
        self._round_trip = 0.0
        #: Replies still to be slept for, not polled for, since a yield came back late.
        self._sleeps_left = 0
        self._sock: socket.socket | None = None
        self._decoder = Decoder()
        #: How a frame goes out: plain, or sealed by the mechanism (CURVE).
        self._frame: Callable[..., bytes] = frame
        #: What the decoder gave and nobody took yet: messages, and the handshake's
        #: commands (PING and PONG are answered and dropped as they come).
        self._events: deque[list[bytes] | Command] = deque()
        self._timeout: float | None = None
        #: Polls the socket for :meth:`idle_check`: a ``poll`` that finds nothing costs
        #: a third of a ``recv`` that fails with ``EAGAIN`` (measured), on every request.
        self._idle_poll: select.poll | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, timeout: float) -> None:
        """Connect and shake hands within ``timeout`` seconds.

        Raises ``OSError`` (refused, unreachable, timed out) or
        :class:`HandshakeError`; the connection is then closed again.
        """
        deadline = _monotonic() + timeout
        sock = socket.create_connection((self.host, self.port), timeout=max(timeout, 0.001))
        heard = False  # any byte of the peer's greeting
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            self._sock = sock
            self._idle_poll = idle_poll = select.poll()
            idle_poll.register(sock, select.POLLIN)
            handshake = self._handshake()
            self._decoder = decoder = Decoder(mechanism=handshake.mechanism)
            self._frame = frame
            self._events.clear()
            self._timeout = None
            # Our first command only once the peer's greeting names our mechanism: a
            # server that wants another then closes cleanly, having read all we sent,
            # where unread bytes would make its close a reset that hides its greeting.
            sock.sendall(greeting(handshake.mechanism, handshake.as_server))
            while not decoder.greeted():
                data = self._read(sock, deadline)
                if data is None:
                    raise TimeoutError(f"no ZMTP greeting from {self.host}:{self.port} "
                                       f"within {timeout:g} s")
                heard = True
                decoder.feed(data)
            sock.sendall(handshake.first())
            # What came with the greeting first (the peer's READY, perhaps), then reads.
            while not self._shake(sock, handshake):
                data = self._read(sock, deadline)
                if data is None:
                    raise TimeoutError(f"no ZMTP handshake from {self.host}:{self.port} "
                                       f"within {timeout:g} s")
                decoder.feed(data)
        except PeerClosed as exc:
            self.close()
            raise HandshakeError(f"the peer closed the connection during the handshake "
                                 f"({exc})", silent=not heard) from None
        except BaseException:
            self.close()
            raise

    def _shake(self, sock: socket.socket, handshake: Handshake) -> bool:
        """Take the handshake's commands the decoder holds, answering each; whether the
        handshake is done.  The moment it is, the decoder unseals what follows in the
        same read (a plain frame there is refused, never taken as a reply)."""
        for event in self._decoder.events():
            if handshake.done:
                self._keep(event)
                continue
            if not isinstance(event, Command):
                raise HandshakeError("the peer sent a message before its READY")
            answer = handshake.step(event)
            if answer:
                sock.sendall(answer)
            if handshake.done and handshake.box is not None:
                self._decoder.unseal = handshake.box.unseal
                self._frame = handshake.box.seal
        return handshake.done

    def send(self, body: bytes) -> None:
        """Send one single-frame message (blocks while the kernel's buffer is full)."""
        sock = self._sock
        if sock is None:
            raise PeerClosed("not connected")
        sock.sendall(self._frame(body))
        self._sent_at = _monotonic()

    def recv(self, deadline: float) -> bytes | None:
        """The body of the next message, or None if none came by ``deadline``
        (:func:`time.monotonic`).  A message of several frames gives its last."""
        sock = self._sock
        if not self._events and sock is not None and self._decoder.empty:
            # The common case: one read brings exactly one reply (Decoder.single).
            data = None
            if self._round_trip < self.spin:
                if self._sleeps_left:
                    self._sleeps_left -= 1
                else:
                    data = self._poll(sock, deadline)
            if data is None:
                data = self._read(sock, deadline)
                if data is None:
                    return None
            self._round_trip = moving_average(self._round_trip, _monotonic() - self._sent_at)
            try:
                body = self._decoder.single(data)
            except HandshakeError as error:  # a frame that does not unseal
                self.close()
                raise PeerClosed(f"the server broke the protocol: {error}") from None
            if body is not None:
                return body
            self._pump(b"")
        while True:
            event = self._next(deadline)
            if event is None:
                return None
            if not isinstance(event, Command):  # a command after the handshake: nothing
                return event[-1]

    def idle_check(self) -> None:
        """Before a request: raise :class:`PeerClosed` if the peer has closed the
        connection since the last reply, and answer any PING it sent meanwhile.

        A stale reply (to a request given up on) is kept for :meth:`recv`,
        whose caller drops replies to other requests.
        """
        sock = self._sock
        if sock is None:
            raise PeerClosed("not connected")
        idle_poll = self._idle_poll
        if idle_poll is not None and not idle_poll.poll(0):
            return  # nothing came: no reply, no PING, no close (POLLHUP and POLLERR show too)
        try:
            data = sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as error:
            raise PeerClosed(str(error)) from None
        if not data:
            raise PeerClosed("the server closed the connection")
        self._pump(data)

    def _next(self, deadline: float) -> list[bytes] | Command | None:
        """The next message or command, read for until ``deadline`` (None)."""
        sock = self._sock
        if sock is None:
            raise PeerClosed("not connected")
        events = self._events
        while not events:
            data = self._read(sock, deadline)
            if data is None:
                return None
            self._pump(data)
        return events.popleft()

    def _read(self, sock: socket.socket, deadline: float) -> bytes | None:
        """One read of what has arrived, waiting until ``deadline`` at most (None)."""
        wait = deadline - _monotonic()
        if wait <= 0:
            return None
        self._set_timeout(sock, wait)
        try:
            data = sock.recv(_READ_SIZE)
        except (BlockingIOError, TimeoutError):
            return None
        except OSError as error:
            raise PeerClosed(str(error)) from None
        if not data:
            raise PeerClosed("the server closed the connection")
        return data

    def _poll(self, sock: socket.socket, deadline: float) -> bytes | None:
        """What has arrived, polled for without sleeping for up to ``POLL_TIMES``
        :attr:`spin` (at most until ``deadline``), the CPU yielded between polls;
        None if nothing came.

        Why: waking a thread that sleeps in ``recv`` costs the sender (the
        server, for every reply) a wake-up, which on a VM costs about as much
        as a query, and costs the woken thread its latency.  A thread that
        polls is awake when its reply lands.  It polls only while the recent
        round trips were shorter than :attr:`spin`: a busy server answers
        later than that, and polling would then take the CPU from it.

        A yield that comes back late (after :data:`~dbpool.spin.LATE_YIELD`
        times :attr:`spin`) ends the polling, and the next
        :data:`~dbpool.spin.SLEEPS_AFTER_LATE_YIELD` replies are slept for:
        the CPU had more threads to run than it could, and a thread that polls
        among them only queues, taking turns from the server.  Unless another
        thread of this process polls too: then the yield may have waited for
        that thread's hold of the GIL, and polling side by side still pays
        (16 threads of one process did 7% fewer queries a second sleeping).
        """
        spin = self.spin
        began = _monotonic()  # of the last read, and of the yield before it
        until = min(deadline, began + POLL_TIMES * spin)
        late = LATE_YIELD * spin
        recv, dontwait, yield_cpu = sock.recv, socket.MSG_DONTWAIT, os.sched_yield
        polling = _POLLING
        polling.add(self)
        try:
            while True:
                try:
                    data = recv(_READ_SIZE, dontwait)
                except BlockingIOError:
                    now = _monotonic()
                    if now >= until:
                        return None
                    if now - began > late and len(polling) == 1:
                        self._sleeps_left = SLEEPS_AFTER_LATE_YIELD
                        return None
                    began = now
                    yield_cpu()
                    continue
                except OSError as error:
                    raise PeerClosed(str(error)) from None
                if not data:
                    raise PeerClosed("the server closed the connection")
                if _monotonic() - began > late and len(polling) == 1:
                    self._sleeps_left = SLEEPS_AFTER_LATE_YIELD
                return data
        finally:
            polling.discard(self)

    def _pump(self, data: bytes) -> None:
        """Decode what was read into :attr:`_events`, answering PINGs (RFC 37)."""
        decoder = self._decoder
        decoder.feed(data)
        try:
            for event in decoder.events():
                self._keep(event)
        except HandshakeError as error:  # after the handshake: a frame that does not unseal
            self.close()
            raise PeerClosed(f"the server broke the protocol: {error}") from None

    def _keep(self, event: list[bytes] | Command) -> None:
        """Queue ``event`` for :meth:`recv`, or answer it (PING) or drop it (PONG)."""
        if isinstance(event, Command) and event.name in (b"PING", b"PONG"):
            if event.name == b"PING" and self._sock is not None:
                context = event.data[2:18]  # after the 2-octet TTL, at most 16 octets
                self._sock.sendall(self._frame(b"\x04PONG" + context, command=True))
            return
        self._events.append(event)

    def _set_timeout(self, sock: socket.socket, seconds: float) -> None:
        """Bound the next blocking ``recv`` by the kernel's ``SO_RCVTIMEO``: unlike
        ``settimeout``, it costs no extra ``poll`` per read, and a call only when the
        bound moves by more than a millisecond."""
        current = self._timeout
        if current is not None and abs(current - seconds) < 0.001:
            return
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", whole, max(1, int((seconds - whole) * 1e6))))
        self._timeout = seconds

    def close(self) -> None:
        """Close the socket at once (pending data is dropped, as with ``LINGER=0``)."""
        sock, self._sock = self._sock, None
        self._idle_poll = None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "closed"
        return f"<ZmtpConnection {self.host}:{self.port} {state} pid={os.getpid()}>"
