"""The request socket without libzmq: a ZMTP ``ROUTER`` driven by the front end's loop.

Why: a libzmq socket hands every message to and from an I/O thread of its
own, two thread wake-ups per request on top of the front end's, and on a
2-core machine each costs about as much as a ``SELECT 1``
(``docs/performance.md``).  Here the front end's thread accepts the
connections, reads the requests and writes the replies itself, on sockets
in its own ``poll`` set.  It speaks ZeroMQ's protocol (:mod:`dbpool.zmtp`)
with the ``NULL`` mechanism or CURVE (:mod:`dbpool.curve`), so any ZeroMQ
``DEALER`` or ``REQ``, in any language, talks to it as to a libzmq
``ROUTER``.  With CURVE, a client whose key is not authorized gets
libzmq's ``ERROR`` (ZAP status ``400``) and is disconnected, and each
request carries its connection's ``User-Id`` (the client's public key, Z85)
as libzmq's would.

What a libzmq ``ROUTER`` does that clients rely on, it does too:

- each connection gets a routing id (the peer's ``Identity`` if it sent one
  not in use, else a new one), prepended to its messages as their first
  frame; a reply to an unknown routing id is dropped;
- a frame over ``max_message_size`` closes its connection (``MAXMSGSIZE``);
- ZMTP heartbeats (``PING``) are answered.

What it does differently, for isolation: a client that does not read its
replies is disconnected once :data:`OUTPUT_LIMIT` bytes wait for it (where
libzmq would drop replies past its high-water mark without a word), so one
slow reader holds neither memory nor anyone else's replies.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import zmq

from dbpool.zmtp import (
    Command,
    Decoder,
    Handshake,
    HandshakeError,
    NullHandshake,
    TooLarge,
    error_command,
    error_reason,
    frame,
    greeting,
)

from .poller import Poller

__all__ = ["HANDSHAKE_TIMEOUT", "OUTPUT_LIMIT", "DirectRouter", "Origin", "bindable"]

logger = logging.getLogger("dbpool.server.direct_router")

#: Bytes of replies that may wait for one client before it is disconnected.
OUTPUT_LIMIT = 64 << 20
#: Seconds a connection may take to finish its handshake (libzmq's HANDSHAKE_IVL):
#: one that does not is closed, so that it holds no descriptor for ever.
HANDSHAKE_TIMEOUT = 30.0
#: The largest frame before the handshake is done: its commands are small, and an
#: unauthenticated peer gets no large buffer.
_HANDSHAKE_FRAME = 8192
#: Bytes read from one connection per readable event: one recv serves many
#: pipelined requests, and a busy client cannot keep the loop from the others.
#: They are read into one buffer the router keeps: ``recv(_READ_SIZE)`` would
#: allocate that much per read, above glibc's threshold for ``mmap``, so that
#: every request cost an ``mmap``, an ``mremap`` and a ``munmap`` (and the page
#: faults) until glibc happened to raise its threshold: a new server served four
#: client processes 30% slower until the first of them disconnected (measured).
_READ_SIZE = 1 << 18
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_SRCFD = int(zmq.SRCFD)
#: The socket types a ROUTER talks to (RFC 28's compatibility table).
_PEERS = frozenset({b"DEALER", b"REQ", b"ROUTER"})
#: Routing ids: libzmq's form, a zero byte then a 32-bit counter.
_ROUTING_IDS = itertools.count(1)

Handler = Callable[[list[bytes], "Origin"], None]


class Origin:
    """A request's connection, as the front end reads a libzmq message's properties:
    ``get(zmq.SRCFD)`` is its descriptor, ``get("User-Id")`` the public key (Z85)
    its CURVE handshake authenticated, None without CURVE."""

    __slots__ = ("fd", "user_id")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.user_id: str | None = None

    def get(self, name: Any) -> Any:
        if name == _SRCFD:
            return self.fd
        return self.user_id if name == "User-Id" else None


class _Peer:
    __slots__ = ("accepted", "decoder", "fd", "frame", "handshake", "origin", "out",
                 "ready", "routing_id", "sent", "sock")

    def __init__(self, sock: socket.socket, handshake: Handshake, accepted: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.handshake = handshake
        self.accepted = accepted
        self.decoder = Decoder(_HANDSHAKE_FRAME, handshake.mechanism)
        #: How a frame goes out: plain, or sealed by the mechanism (CURVE).
        self.frame: Callable[..., bytes] = frame
        self.origin = Origin(self.fd)
        self.out = bytearray()
        self.ready = False
        self.routing_id = b""
        #: Whether a reply went straight out to it this round (see DirectRouter.send).
        self.sent = False


def bindable(endpoint: str) -> tuple[str, int] | None:
    """``(host, port)`` to bind for a ``tcp://`` endpoint :class:`DirectRouter` serves
    (``*`` is every IPv4 address, as for libzmq), else None (leave it to libzmq)."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[6:].rpartition(":")
    if port == "*":  # libzmq's "any free port"
        port = "0"
    if not sep or not port.isdigit() or ";" in host:
        return None
    host = "0.0.0.0" if host == "*" else host.strip("[]")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                           flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):  # a name or an interface: libzmq's to resolve
        return None
    return host, int(port)


class DirectRouter:
    """A listening ``ROUTER`` on ``host:port`` whose sockets live in ``poller``.

    The front end calls :meth:`event` for each of :attr:`fds` that polls
    ready; requests go to ``handle(frames, origin)`` with the routing id as
    the first frame, as from a libzmq ``ROUTER``; :meth:`send` queues a
    reply.  ``on_connect(fd)`` and ``on_disconnect(fd)`` report each client
    connection that completed its handshake and each that closed.
    ``output_limit`` is the bytes of replies that may wait for one client
    (see the module docstring).  ``handshake`` makes each connection's
    security mechanism: ``NULL`` when None, or a
    :class:`dbpool.curve.CurveServer` that authorizes the client's key.
    """

    def __init__(self, host: str, port: int, poller: Poller, max_size: int,
                 handle: Handler, on_connect: Callable[[int], None],
                 on_disconnect: Callable[[int], None], *,
                 output_limit: int = OUTPUT_LIMIT,
                 handshake: Callable[[], Handshake] | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1024)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._listener_fd = listener.fileno()
        bound = listener.getsockname()
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        #: The endpoint bound, as libzmq's ``LAST_ENDPOINT`` says it.
        self.endpoint = f"tcp://{shown}:{bound[1]}"
        self._poller = poller
        self._max_size = max_size
        self._output_limit = output_limit
        self._handle = handle
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._handshake = handshake or (lambda: NullHandshake(b"ROUTER"))
        self._peers: dict[int, _Peer] = {}
        self._by_id: dict[bytes, _Peer] = {}
        #: This round's peers that were sent a reply, and those with replies held
        #: for the round's end (see send and end_round).
        self._sent: list[_Peer] = []
        self._held: list[_Peer] = []
        #: Where every read lands (the loop reads one connection at a time).
        self._read_buffer = bytearray(_READ_SIZE)
        self._read_view = memoryview(self._read_buffer)
        poller.register(self._listener_fd, _POLLIN)

    def owns(self, fd: int) -> bool:
        return fd == self._listener_fd or fd in self._peers

    def event(self, fd: int, mask: int) -> None:
        """Serve what ``poll`` said of ``fd``: accept, read and handle, or write."""
        if fd == self._listener_fd:
            self._accept()
            return
        peer = self._peers.get(fd)
        if peer is None:
            return
        if mask & _POLLOUT:
            self._flush(peer)
        if mask & ~_POLLOUT and fd in self._peers:
            self._read(peer)

    def send(self, route: list[bytes], body: bytes) -> None:
        """Queue ``body`` for the connection ``route[0]`` names, after the rest of the
        route (a ``REQ``'s empty delimiter); dropped if that connection is gone.

        A connection's first reply in a round of the front end's loop goes out at
        once; the replies that follow it in the same round wait for
        :meth:`end_round` and leave in one write.  So a client that sends one
        request at a time waits for nothing, and one that pipelines many (an
        ``AsyncClient`` of many tasks) costs one ``send`` per round, not one per
        reply: on loopback each ``send`` runs the receiver's TCP path and may
        wake it.
        """
        peer = self._by_id.get(route[0])
        if peer is None:
            return
        seal = peer.frame
        data = seal(body)
        if len(route) > 1:
            data = b"".join([seal(part, more=True) for part in route[1:]]) + data
        out = peer.out
        if not out and not peer.sent:  # the common case: straight out, with no copy
            peer.sent = True
            self._sent.append(peer)
            sent = self._send_some(peer, data)
            if sent is None or sent == len(data):
                return
            out += memoryview(data)[sent:]
            self._poller.modify(peer.fd, _POLLIN | _POLLOUT)
            return
        if not out:  # a second reply this round: held for the round's end
            self._held.append(peer)
        out += data
        if len(out) > self._output_limit:
            self._drop(peer, f"{len(out)} bytes of replies wait for it (it does not read "
                             f"them): over the limit of {self._output_limit}")

    def end_round(self) -> None:
        """Write the replies held this round, one write per connection (the front end
        calls it before it polls); the next reply to each goes out at once again."""
        held = self._held
        if held:
            peers = self._peers
            for peer in held:
                # Skipped if written meanwhile, or dropped; the rest when the socket takes it.
                if peer.out and peers.get(peer.fd) is peer and self._write_out(peer):
                    self._poller.modify(peer.fd, _POLLIN | _POLLOUT)
            held.clear()
        sent_to = self._sent
        if sent_to:
            for peer in sent_to:
                peer.sent = False
            sent_to.clear()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors, say: serve who is here
                logger.warning("direct router: accept failed: %s", error)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake = self._handshake()
            peer = _Peer(sock, handshake, time.monotonic())
            self._peers[peer.fd] = peer
            self._poller.register(peer.fd, _POLLIN)
            # Greeting and READY at once for NULL, which needs nothing of the client's
            # first; CURVE waits for the client's HELLO.
            peer.out += greeting(handshake.mechanism, as_server=True) + handshake.first()
            self._flush(peer)

    def _read(self, peer: _Peer) -> None:
        try:
            size = peer.sock.recv_into(self._read_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._drop(peer, f"read failed: {error}")
            return
        if not size:
            self._drop(peer, None)
            return
        data = self._read_view[:size].tobytes()
        decoder = peer.decoder
        try:
            if peer.ready:
                # The common case: one read holds exactly one request (Decoder.single);
                # anything else it keeps for events().
                body = decoder.single(data)
                if body is not None:
                    self._handle([peer.routing_id, body], peer.origin)
                    return
            else:
                decoder.feed(data)
            for event in decoder.events():
                if isinstance(event, Command):
                    self._command(peer, event)
                elif not peer.ready:
                    raise HandshakeError("a message before the READY command")
                else:
                    event.insert(0, peer.routing_id)
                    self._handle(event, peer.origin)
                if peer.fd not in self._peers:  # dropped on the way (a failed write)
                    return
        except HandshakeError as failure:
            if failure.status is not None and not peer.ready:  # refused: say so, as libzmq
                self._write(peer, error_command(failure.status.encode()))
            self._drop(peer, str(failure))
        except TooLarge as too_large:
            self._drop(peer, str(too_large))

    def _command(self, peer: _Peer, command: Command) -> None:
        name = command.name
        if not peer.ready:
            handshake = peer.handshake
            answer = handshake.step(command)
            if answer:
                self._write(peer, answer)
                if peer.fd not in self._peers:  # the write failed: it is gone
                    return
            if handshake.done:
                self._connected(peer, handshake)
        elif name == b"PING":
            self._write(peer, peer.frame(b"\x04PONG" + command.data[2:18], command=True))
        elif name == b"ERROR":
            raise HandshakeError("the client sent ERROR: " + error_reason(command.data))
        elif name != b"PONG":
            logger.debug("direct router: command %r ignored", name)

    def _connected(self, peer: _Peer, handshake: Handshake) -> None:
        """``peer``'s handshake is done: give it a routing id and take its requests."""
        found = handshake.properties
        kind = found.get(b"socket-type", b"")
        if kind not in _PEERS:
            raise HandshakeError(f"a {kind.decode('ascii', 'replace') or 'nameless'} "
                                 "socket cannot talk to a ROUTER")
        wanted = found.get(b"identity", b"")
        # libzmq's rule: a peer's own id if it has one that is free (ids that
        # start with a zero byte are libzmq's to make).
        if wanted and wanted[0] != 0 and wanted not in self._by_id:
            peer.routing_id = wanted
        else:
            peer.routing_id = b"\x00" + struct.pack(">I", next(_ROUTING_IDS) & 0xFFFFFFFF)
        self._by_id[peer.routing_id] = peer
        peer.decoder.max_size = self._max_size + handshake.overhead
        box = handshake.box
        if box is not None:
            peer.decoder.unseal = box.unseal
            peer.frame = box.seal
            peer.origin.user_id = handshake.user_id
        peer.ready = True
        self._on_connect(peer.fd)

    def _write(self, peer: _Peer, data: bytes) -> None:
        peer.out += data
        self._flush(peer)

    def _flush(self, peer: _Peer) -> None:
        left = self._write_out(peer) if peer.out else False
        if left is not None:
            self._poller.modify(peer.fd, _POLLIN | _POLLOUT if left else _POLLIN)

    def _write_out(self, peer: _Peer) -> bool | None:
        """Write what the socket takes of ``peer``'s waiting bytes: whether some are
        left, or None if the connection failed (and was dropped)."""
        out = peer.out
        sent = self._send_some(peer, out)
        if sent is None:
            return None
        del out[:sent]
        return bool(out)

    def _send_some(self, peer: _Peer, data: bytes | bytearray) -> int | None:
        """Write what the socket takes of ``data`` now: the bytes written, or None if
        the connection failed (and was dropped)."""
        try:
            return peer.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as error:
            self._drop(peer, f"write failed: {error}")
            return None

    def _drop(self, peer: _Peer, why: str | None) -> None:
        """Close ``peer``'s connection (``why`` is logged; None: it closed by itself)."""
        if self._peers.pop(peer.fd, None) is None:
            return
        if why is not None:
            logger.warning("direct router: disconnected a client: %s", why)
        if peer.ready:
            self._by_id.pop(peer.routing_id, None)
        try:
            self._poller.unregister(peer.fd)
        except KeyError:
            pass
        fd = peer.fd
        try:
            peer.sock.close()
        except OSError as error:
            if error.errno != errno.EBADF:
                raise
        if peer.ready:
            self._on_disconnect(fd)

    def expire(self, now: float) -> None:
        """Close the connections that have not finished their handshake within
        :data:`HANDSHAKE_TIMEOUT` of ``now`` (the front end calls it every tick)."""
        late = now - HANDSHAKE_TIMEOUT
        for peer in [p for p in self._peers.values() if not p.ready and p.accepted < late]:
            self._drop(peer, f"no handshake within {HANDSHAKE_TIMEOUT:g} s")

    def close(self) -> None:
        """Write the replies held, then close every connection and the listener."""
        self.end_round()
        for peer in list(self._peers.values()):
            self._drop(peer, None)
        try:
            self._poller.unregister(self._listener_fd)
        except KeyError:
            pass
        self._listener.close()
