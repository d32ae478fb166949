"""The sync client's own ZMTP (dbpool.zmtp, dbpool.client.direct) against libzmq peers.

The peer in each test is a standard ZeroMQ socket (pyzmq's ``ROUTER``), so
these show that the direct transport interoperates: handshakes, short and
long frames both ways, multipart messages, RFC 37 heartbeats, CURVE servers
it must refuse to talk to, and peers that are not ZeroMQ at all.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import zmq

from dbpool.client import Client
from dbpool.client._base import direct_address
from dbpool.client.direct import PeerClosed, ZmtpConnection
from dbpool.errors import ConnectionError
from dbpool.spin import LATE_YIELD, SLEEPS_AFTER_LATE_YIELD
from dbpool.wire import packb, unpackb
from dbpool.zmtp import Command, Decoder, HandshakeError, frame, greeting
from dbpool.zmtp import ready as ready_frame
from tests.client.conftest import WAIT, Router, _router, a_slow_reply_arrives


def _connected(port: int) -> ZmtpConnection:
    conn = ZmtpConnection("127.0.0.1", port)
    conn.connect(WAIT)
    return conn


def test_messages_both_ways_with_short_and_long_frames(
        router: Router) -> None:
    sock, port = router
    conn = _connected(port)
    try:
        for size in (0, 1, 255, 256, 70_000, 3_000_000):
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            conn.send(body)
            routing_id, got = sock.recv_multipart()
            assert got == body
            sock.send_multipart([routing_id, body[::-1]])
            assert conn.recv(time.monotonic() + WAIT) == body[::-1]
    finally:
        conn.close()


def test_a_multipart_message_gives_its_last_frame_and_the_next_message_follows(
        router: Router) -> None:
    sock, port = router
    conn = _connected(port)
    try:
        conn.send(b"hello")
        routing_id, _ = sock.recv_multipart()
        sock.send_multipart([routing_id, b"first", b"last"])
        sock.send_multipart([routing_id, b"next"])
        deadline = time.monotonic() + WAIT
        assert conn.recv(deadline) == b"last"
        assert conn.recv(deadline) == b"next"
    finally:
        conn.close()


def test_recv_returns_none_at_its_deadline(router: Router) -> None:
    _, port = router
    conn = _connected(port)
    try:
        started = time.monotonic()
        assert conn.recv(started + 0.2) is None
        assert 0.15 < time.monotonic() - started < 2.0
    finally:
        conn.close()


def test_heartbeats_are_answered_so_a_slow_reply_still_arrives(
        pinging_router: Router) -> None:
    # The reply comes after 600 ms: without PONGs the ROUTER has dropped us by then.
    sock, port = pinging_router
    conn = _connected(port)
    try:
        a_slow_reply_arrives(conn, sock)
    finally:
        conn.close()


def test_a_curve_server_ends_the_handshake(curve_router: Router) -> None:
    # libzmq closes at once on a NULL greeting, without a greeting of its own, so
    # all the client can say is that the handshake failed (the client's message then
    # asks whether the server requires CURVE: tests/server/test_curve.py).
    _, port = curve_router
    with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
        ZmtpConnection("127.0.0.1", port).connect(WAIT)


def test_a_peer_that_is_not_zeromq_is_refused() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 64)
            peer.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(HandshakeError, match="does not speak ZMTP"):
            ZmtpConnection("127.0.0.1", port).connect(WAIT)
    finally:
        thread.join(WAIT)
        listener.close()


def test_idle_check_sees_a_closed_connection(router: Router) -> None:
    sock, port = router
    conn = _connected(port)
    try:
        conn.idle_check()  # open and quiet: nothing to say
        sock.close(linger=0)
        deadline = time.monotonic() + WAIT
        while True:  # libzmq closes the connection in its I/O thread, soon
            try:
                conn.idle_check()
            except PeerClosed:
                break
            assert time.monotonic() < deadline, "the close never arrived"
            time.sleep(0.01)
    finally:
        conn.close()


def test_the_decoder_reads_a_stream_fed_one_byte_at_a_time() -> None:
    peer_greeting = greeting()
    ready = frame(b"\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER", command=True)
    stream = (peer_greeting + ready + frame(b"a", more=True) + frame(b"b" * 300)
              + frame(b"\x04PING\x00\x0aabc", command=True) + frame(b""))
    decoder = Decoder()
    events: list[list[bytes] | Command] = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        events.extend(decoder.events())
    assert events == [Command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x06ROUTER"),
                      [b"a", b"b" * 300], Command(b"PING", b"\x00\x0aabc"), [b""]]
    assert decoder.empty


@pytest.mark.parametrize(("endpoint", "address"), [
    ("tcp://127.0.0.1:7432", ("127.0.0.1", 7432)),
    ("tcp://db.example:1", ("db.example", 1)),
    ("tcp://[::1]:7432", ("::1", 7432)),
    ("tcp://*:7432", None),
    ("tcp://eth0;127.0.0.1:7432", None),
    ("ipc:///tmp/dbpool", None),
    ("tcp://127.0.0.1", None),
])
def test_which_endpoints_are_spoken_directly(endpoint: str,
                                             address: tuple[str, int] | None) -> None:
    assert direct_address(endpoint) == address


def test_the_client_fails_at_once_when_the_connection_closes_before_the_reply(
        router: Router) -> None:
    sock, port = router
    with Client(f"tcp://127.0.0.1:{port}", timeout=WAIT * 2) as client:
        assert client._ch.direct is not None

        def close_on_request() -> None:
            sock.recv_multipart()
            sock.close(linger=0)

        thread = threading.Thread(target=close_on_request)
        thread.start()
        started = time.monotonic()
        with pytest.raises(ConnectionError) as caught:
            client.ping()
        thread.join(WAIT)
        assert caught.value.reason == "timeout"
        assert "closed the connection before replying" in str(caught.value)
        assert time.monotonic() - started < WAIT


def test_the_client_answers_through_a_plain_router(
        router: Router) -> None:
    sock, port = router
    with Client(f"tcp://127.0.0.1:{port}", timeout=WAIT) as client:
        def answer() -> None:
            routing_id, body = sock.recv_multipart()
            request = unpackb(body)
            sock.send_multipart([routing_id, packb({"id": request["id"], "ok": "pong"})])

        thread = threading.Thread(target=answer)
        thread.start()
        assert client.ping() > 0
        thread.join(WAIT)


def test_a_ready_that_comes_with_the_greeting_completes_the_handshake() -> None:
    # A peer may send its greeting and READY in one write, before it has ours:
    # the READY then sits behind the greeting in the same read.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    peer_ready = frame(b"\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER", command=True)

    def serve() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.sendall(greeting() + peer_ready)
            peer.settimeout(WAIT)
            expected = greeting() + ready_frame() + frame(b"ping")  # nothing more till then
            received = b""
            while len(received) < len(expected):
                received += peer.recv(4096)
            assert received == expected
            peer.sendall(frame(b"pong"))
            peer.recv(4096)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = ZmtpConnection("127.0.0.1", port)
    try:
        conn.connect(2.0)
        conn.send(b"ping")
        assert conn.recv(time.monotonic() + WAIT) == b"pong"
    finally:
        conn.close()
        thread.join(WAIT)
        listener.close()


class _RecordingSocket:
    """A connection's socket that records the flags of each ``recv``: whether the
    read polled (``MSG_DONTWAIT``) or could sleep."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.reads: list[int] = []

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.reads.append(flags)
        return self._sock.recv(size, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _LateSocket(_RecordingSocket):
    """A recording socket whose next polling read is held up for ``hold`` seconds,
    as a thread's is when the CPU it yielded runs other threads meanwhile:
    after the reply came (``with_reply``), or before it can have."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.hold = 0.0
        self.with_reply = False

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.hold and flags & socket.MSG_DONTWAIT:
            if self.with_reply:
                select.select([self._sock], [], [], WAIT)
            time.sleep(self.hold)
            self.hold = 0.0
        return super().recv(size, flags)


@contextmanager
def _recording(port: int, spin: float,
               kind: type[_RecordingSocket] = _RecordingSocket,
               ) -> Iterator[tuple[ZmtpConnection, Any]]:
    """A connection with ``spin`` to the ROUTER on ``port``, and its recording socket."""
    conn = ZmtpConnection("127.0.0.1", port, spin=spin)
    conn.connect(WAIT)
    recording = kind(cast(socket.socket, conn._sock))
    conn._sock = cast(socket.socket, recording)
    try:
        yield conn, recording
    finally:
        conn.close()


def _exchange(conn: ZmtpConnection, sock: zmq.Socket[bytes], delay: float) -> None:
    """One round trip whose reply the ROUTER sends ``delay`` seconds after the request."""
    def answer() -> None:
        routing_id, body = sock.recv_multipart()
        time.sleep(delay)  # the peer's own slowness: the case under test
        sock.send_multipart([routing_id, body[::-1]])

    thread = threading.Thread(target=answer)
    thread.start()
    conn.send(b"ping")
    assert conn.recv(time.monotonic() + WAIT) == b"gnip"
    thread.join(WAIT)


def _slept(reads: list[int]) -> bool:
    return any(not flags & socket.MSG_DONTWAIT for flags in reads)


def test_a_reply_within_the_spin_is_polled_for_without_sleeping(router: Router) -> None:
    sock, port = router
    with _recording(port, spin=0.1) as (conn, recording):
        _exchange(conn, sock, delay=0.02)
    assert recording.reads and not _slept(recording.reads)
    assert len(recording.reads) > 1  # it polled more than once before the reply


def test_a_reply_later_than_the_polling_is_slept_for(router: Router) -> None:
    sock, port = router
    with _recording(port, spin=0.002) as (conn, recording):
        _exchange(conn, sock, delay=0.1)  # polled for 6 ms, then slept
    assert recording.reads[0] & socket.MSG_DONTWAIT
    assert _slept(recording.reads)


def test_after_a_slow_round_trip_a_thread_sleeps_at_once(router: Router) -> None:
    sock, port = router
    with _recording(port, spin=0.005) as (conn, recording):
        _exchange(conn, sock, delay=0.1)
        recording.reads.clear()
        _exchange(conn, sock, delay=0.0)
    assert not recording.reads[0] & socket.MSG_DONTWAIT


def test_spin_zero_never_polls(router: Router) -> None:
    sock, port = router
    with _recording(port, spin=0.0) as (conn, recording):
        for _ in range(3):
            _exchange(conn, sock, delay=0.0)
    assert not any(flags & socket.MSG_DONTWAIT for flags in recording.reads)


@pytest.mark.parametrize("spin", [-0.001, 2.0, "0.1", None])
def test_the_client_refuses_a_spin_out_of_range(spin: Any) -> None:
    with pytest.raises(ValueError, match="spin"):
        Client("tcp://127.0.0.1:1", spin=spin)


def test_the_clients_spin_reaches_its_connections(router: Router) -> None:
    _, port = router
    with Client(f"tcp://127.0.0.1:{port}", spin=0.01) as client:
        assert client._ch.direct is not None and client._ch.direct.spin == 0.01


@pytest.mark.parametrize("with_reply", [False, True], ids=["before the reply", "with the reply"])
def test_after_a_yield_that_came_back_late_the_next_replies_are_slept_for(
        router: Router, with_reply: bool) -> None:
    sock, port = router
    spin = 0.02
    with _recording(port, spin=spin, kind=_LateSocket) as (conn, late):
        late.hold, late.with_reply = LATE_YIELD * spin * 2, with_reply
        _exchange(conn, sock, delay=0.0 if with_reply else 0.05)
        assert late.reads[0] & socket.MSG_DONTWAIT  # it polled, and came back late
        late.reads.clear()
        for _ in range(SLEEPS_AFTER_LATE_YIELD):
            _exchange(conn, sock, delay=0.0)
        assert late.reads and not any(flags & socket.MSG_DONTWAIT for flags in late.reads)
        late.reads.clear()
        _exchange(conn, sock, delay=0.0)  # the CPU is its own again: it polls
        assert late.reads[0] & socket.MSG_DONTWAIT


def test_a_late_yield_while_another_thread_polls_keeps_the_polling(router: Router) -> None:
    # Threads of one process that poll side by side take the GIL from each other:
    # a yield that came back late says nothing of the CPU then.
    sock, port = router
    other_sock, other_port = next(other_router := _router())
    other_polls = threading.Event()

    class _Signalling(_RecordingSocket):
        def recv(self, size: int, flags: int = 0) -> bytes:
            if flags & socket.MSG_DONTWAIT:
                other_polls.set()
            return super().recv(size, flags)

    spin = 0.02
    try:
        with _recording(other_port, spin=0.5, kind=_Signalling) as (other, _), \
                _recording(port, spin=spin, kind=_LateSocket) as (conn, late):
            poller = threading.Thread(target=_exchange, args=(other, other_sock, 0.5))
            poller.start()
            assert other_polls.wait(WAIT)
            late.hold = LATE_YIELD * spin * 2
            _exchange(conn, sock, delay=0.0)
            late.reads.clear()
            _exchange(conn, sock, delay=0.0)
            assert late.reads[0] & socket.MSG_DONTWAIT  # it polls on
            poller.join(WAIT)
    finally:
        other_router.close()
