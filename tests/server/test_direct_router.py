"""The server's own ZMTP ROUTER (dbpool.server.direct_router) with libzmq clients.

Each test runs a :class:`DirectRouter` on a poll loop in a thread, with a
handler that answers as the test says, and talks to it with pyzmq's
``DEALER`` and ``REQ`` sockets: that it interoperates with standard ZeroMQ
peers is the point.  The whole server runs on it in every server test; here
are the cases a ROUTER of one's own must get right: routing ids, the REQ
envelope, heartbeats, oversized frames, junk, and a client that does not
read its replies; and CURVE: libzmq's clients served and identified, an
unknown key refused as libzmq refuses it, and a forged message dropped.
"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
import zmq.utils.monitor
from zmq.utils import z85

from dbpool import curve
from dbpool.server import direct_router
from dbpool.server.direct_router import DirectRouter, Origin, bindable
from dbpool.server.poller import Poller
from dbpool.zmtp import Command, Decoder, Handshake, HandshakeError, frame, greeting
from tests.support.compiled import replaces_methods

WAIT = 5.0

Reply = Callable[[list[bytes]], bytes | None]


class Harness:
    """A DirectRouter on a poll loop in a thread; ``reply(frames)`` answers each message."""

    def __init__(self, reply: Reply, *, max_size: int = 1 << 20,
                 output_limit: int | None = None,
                 handshake: Callable[[], Handshake] | None = None) -> None:
        self.reply = reply
        self.poller = Poller()
        self.connected: list[int] = []
        self.disconnected: list[int] = []
        self.requests: list[list[bytes]] = []
        #: Each request's ``User-Id``, as the front end reads it.
        self.users: list[str | None] = []
        self.changed = threading.Condition()
        kwargs: dict[str, Any] = {} if output_limit is None else {"output_limit": output_limit}
        self.router = DirectRouter("127.0.0.1", 0, self.poller, max_size, self._handle,
                                   self._on_connect, self._on_disconnect, handshake=handshake,
                                   **kwargs)
        self.endpoint = self.router.endpoint
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _handle(self, frames: list[bytes], origin: Origin) -> None:
        assert origin.get(zmq.SRCFD) == origin.fd
        with self.changed:
            self.users.append(origin.get("User-Id"))
            self.requests.append(frames)
            self.changed.notify_all()
        body = self.reply(frames)
        if body is not None:
            route = frames[:2] if len(frames) > 2 and not frames[1] else frames[:1]
            self.router.send(route, body)

    def _on_connect(self, fd: int) -> None:
        with self.changed:
            self.connected.append(fd)
            self.changed.notify_all()

    def _on_disconnect(self, fd: int) -> None:
        with self.changed:
            self.disconnected.append(fd)
            self.changed.notify_all()

    def _run(self) -> None:
        while not self._stop:
            for fd, mask in self.poller.poll(0.02):
                self.router.event(fd, mask)
            self.router.expire(time.monotonic())  # as the front end's tick does
            self.router.end_round()  # as the front end does before it polls

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, WAIT), what

    def close(self) -> None:
        self._stop = True
        self._thread.join(WAIT)
        self.router.close()


@pytest.fixture
def context() -> zmq.Context[zmq.Socket[bytes]]:
    return zmq.Context.instance()


def _socket(context: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str,
            options: dict[int, Any] | None = None) -> zmq.Socket[bytes]:
    """A connected libzmq socket, with ``options`` set before it connects."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    sock.connect(endpoint)
    return sock


@pytest.fixture
def echo() -> Iterator[Harness]:
    harness = Harness(lambda frames: frames[-1][::-1])
    yield harness
    harness.close()


def test_dealers_get_their_own_replies(echo: Harness,
                                       context: zmq.Context[zmq.Socket[bytes]]) -> None:
    dealers = [_socket(context, zmq.DEALER, echo.endpoint) for _ in range(3)]
    try:
        for round_ in range(20):
            for i, dealer in enumerate(dealers):
                dealer.send(f"{i}-{round_}".encode())
            for i, dealer in enumerate(dealers):
                assert dealer.recv() == f"{i}-{round_}".encode()[::-1]
        big = bytes(range(256)) * 4000
        dealers[0].send(big)
        assert dealers[0].recv() == big[::-1]
        echo.wait_for(lambda: len(echo.connected) == 3, "three connections")
        assert len({frames[0] for frames in echo.requests}) == 3  # a routing id each
    finally:
        for dealer in dealers:
            dealer.close(linger=0)


def test_a_short_request_is_read_without_a_large_allocation(
        echo: Harness, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    # recv(256 KiB) per read: glibc served each with an mmap, so every request paid
    # three system calls and fresh pages until its threshold happened to rise.
    dealer = _socket(context, zmq.DEALER, echo.endpoint)
    try:
        dealer.send(b"warm")
        assert dealer.recv() == b"mraw"
        tracemalloc.start()
        try:
            for i in range(20):
                dealer.send(b"%02d" % i)
                assert dealer.recv() == (b"%02d" % i)[::-1]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 32 * 1024, f"{peak} bytes allocated at once for 2-byte requests"
    finally:
        dealer.close(linger=0)


@replaces_methods
def test_replies_to_pipelined_requests_leave_together(
        echo: Harness, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """A connection's first reply in a round goes out at once, the rest at the round's
    end in one write: 200 pipelined requests cost a few writes, not 200."""
    writes: list[int] = []
    send_some = echo.router._send_some

    def counted(peer: Any, data: bytes | bytearray) -> int | None:
        writes.append(len(data))
        return send_some(peer, data)

    echo.router._send_some = counted  # type: ignore[method-assign]
    dealer = _socket(context, zmq.DEALER, echo.endpoint)
    try:
        dealer.send(b"warm")
        assert dealer.recv() == b"mraw"
        writes.clear()
        for i in range(200):  # libzmq writes queued messages in batches
            dealer.send(b"%03d" % i)
        assert [dealer.recv() for _ in range(200)] == [(b"%03d" % i)[::-1]
                                                       for i in range(200)]
        assert len(writes) < 50, f"{len(writes)} writes for 200 replies"
    finally:
        dealer.close(linger=0)


def test_a_req_socket_gets_its_envelope_back(echo: Harness,
                                             context: zmq.Context[zmq.Socket[bytes]]) -> None:
    req = _socket(context, zmq.REQ, echo.endpoint)
    try:
        req.send(b"hello")
        assert req.recv() == b"olleh"
        assert echo.requests[0][1:] == [b"", b"hello"]  # the REQ's empty delimiter
    finally:
        req.close(linger=0)


def test_a_peer_identity_is_its_routing_id(echo: Harness,
                                          context: zmq.Context[zmq.Socket[bytes]]) -> None:
    dealer = _socket(context, zmq.DEALER, echo.endpoint, {zmq.ROUTING_ID: b"worker-7"})
    try:
        dealer.send(b"x")
        assert dealer.recv() == b"x"
        assert echo.requests[0][0] == b"worker-7"
        assert echo.users == [None]  # no User-Id without CURVE
    finally:
        dealer.close(linger=0)


def test_client_heartbeats_are_answered(echo: Harness,
                                        context: zmq.Context[zmq.Socket[bytes]]) -> None:
    # The DEALER pings every 20 ms and drops a silent peer after 150 ms.
    dealer = _socket(context, zmq.DEALER, echo.endpoint,
                     {zmq.HEARTBEAT_IVL: 20, zmq.HEARTBEAT_TIMEOUT: 150})
    try:
        dealer.send(b"a")
        assert dealer.recv() == b"a"
        time.sleep(0.6)  # the heartbeats' time to fail, if unanswered
        dealer.send(b"b")
        assert dealer.recv() == b"b"
        assert len(echo.connected) == 1 and not echo.disconnected  # one connection all along
    finally:
        dealer.close(linger=0)


def test_an_oversized_frame_closes_only_its_connection(
        context: zmq.Context[zmq.Socket[bytes]]) -> None:
    harness = Harness(lambda frames: frames[-1], max_size=1000)
    big = _socket(context, zmq.DEALER, harness.endpoint)
    small = _socket(context, zmq.DEALER, harness.endpoint)
    try:
        small.send(b"before")
        assert small.recv() == b"before"
        big.send(b"x" * 1001)
        harness.wait_for(lambda: len(harness.disconnected) == 1, "the big sender dropped")
        small.send(b"after")
        assert small.recv() == b"after"
        assert all(len(frames[-1]) <= 1000 for frames in harness.requests)
    finally:
        big.close(linger=0)
        small.close(linger=0)
        harness.close()


def test_junk_is_dropped_and_the_others_are_served(
        echo: Harness, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    dealer = _socket(context, zmq.DEALER, echo.endpoint)
    host, port = echo.endpoint[6:].rsplit(":", 1)
    try:
        dealer.send(b"one")
        assert dealer.recv() == b"eno"
        with socket.create_connection((host, int(port)), timeout=WAIT) as junk:
            junk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 100)
            junk.settimeout(WAIT)
            received = b""
            while chunk := junk.recv(4096):  # the server's greeting, then its close
                received += chunk
        assert received.startswith(b"\xff")
        dealer.send(b"two")
        assert dealer.recv() == b"owt"
        assert not echo.disconnected  # the junk never completed a handshake
    finally:
        dealer.close(linger=0)


def test_a_client_that_does_not_read_is_disconnected_and_others_are_served(
        context: zmq.Context[zmq.Socket[bytes]]) -> None:
    harness = Harness(lambda frames: b"r" * 200_000, output_limit=2_000_000)
    slow = _socket(context, zmq.DEALER, harness.endpoint)
    slow.setsockopt(zmq.RCVHWM, 1)  # libzmq would read ahead for it otherwise
    slow.setsockopt(zmq.RCVBUF, 4096)
    fast = _socket(context, zmq.DEALER, harness.endpoint)
    try:
        for _ in range(200):  # 40 MB of replies it never reads
            slow.send(b"give")
        harness.wait_for(lambda: len(harness.disconnected) == 1, "the slow reader dropped")
        fast.send(b"still there?")
        assert len(fast.recv()) == 200_000
    finally:
        slow.close(linger=0)
        fast.close(linger=0)
        harness.close()


@pytest.mark.parametrize(("endpoint", "address"), [
    ("tcp://127.0.0.1:7432", ("127.0.0.1", 7432)),
    ("tcp://127.0.0.1:*", ("127.0.0.1", 0)),
    ("tcp://*:7432", ("0.0.0.0", 7432)),
    ("tcp://[::1]:7432", ("::1", 7432)),
    ("tcp://eth0:7432", None),
    ("tcp://localhost:7432", None),
    ("ipc:///tmp/dbpool.sock", None),
])
def test_which_binds_are_served_directly(endpoint: str, address: tuple[str, int] | None) -> None:
    assert bindable(endpoint) == address


# -- CURVE (dbpool.curve) ---------------------------------------------------------------

needs_curve = pytest.mark.skipif(not (curve.AVAILABLE and zmq.has("curve")),
                                 reason="PyNaCl or libzmq's CURVE missing")


class Curve:
    """A server key pair and one authorized client pair, as libzmq makes them (Z85)."""

    def __init__(self) -> None:
        self.server_public, self.server_secret = zmq.curve_keypair()
        self.client_public, self.client_secret = zmq.curve_keypair()

    def handshake(self) -> curve.CurveServer:
        return curve.CurveServer(z85.decode(self.server_public), z85.decode(self.server_secret),
                                 lambda key: key == z85.decode(self.client_public))

    def client_options(self, public: bytes | None = None,
                       secret: bytes | None = None) -> dict[int, Any]:
        return {zmq.CURVE_SERVERKEY: self.server_public,
                zmq.CURVE_PUBLICKEY: public or self.client_public,
                zmq.CURVE_SECRETKEY: secret or self.client_secret}


@pytest.fixture
def curve_echo() -> Iterator[tuple[Harness, Curve]]:
    keys = Curve()
    harness = Harness(lambda frames: frames[-1][::-1], handshake=keys.handshake)
    yield harness, keys
    harness.close()


@needs_curve
def test_libzmq_curve_dealers_are_served_and_carry_their_key(
        curve_echo: tuple[Harness, Curve], context: zmq.Context[zmq.Socket[bytes]]) -> None:
    harness, keys = curve_echo
    dealer = _socket(context, zmq.DEALER, harness.endpoint, keys.client_options())
    try:
        for size in (0, 1, 255, 256, 70_000, 900_000):
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            dealer.send(body)
            assert dealer.recv() == body[::-1]
        dealer.send_multipart([b"first", b"last"])  # MORE travels sealed
        assert dealer.recv() == b"tsal"
        assert harness.requests[-1][1:] == [b"first", b"last"]
        assert set(harness.users) == {keys.client_public.decode()}
    finally:
        dealer.close(linger=0)


@needs_curve
def test_an_unknown_key_gets_libzmqs_refusal_and_the_others_are_served(
        curve_echo: tuple[Harness, Curve], context: zmq.Context[zmq.Socket[bytes]]) -> None:
    harness, keys = curve_echo
    stranger = context.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    for option, value in keys.client_options(*zmq.curve_keypair()).items():
        stranger.setsockopt(option, value)
    monitor = stranger.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    monitor.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
    friend = _socket(context, zmq.DEALER, harness.endpoint, keys.client_options())
    try:
        stranger.connect(harness.endpoint)
        stranger.send(b"let me in", zmq.NOBLOCK)
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        assert (event["event"], event["value"]) == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
        friend.send(b"hello")
        assert friend.recv() == b"olleh"
        assert [frames[-1] for frames in harness.requests] == [b"hello"]
    finally:
        stranger.disable_monitor()
        monitor.close(linger=0)
        stranger.close(linger=0)
        friend.close(linger=0)


@needs_curve
def test_curve_heartbeats_are_answered_sealed(
        curve_echo: tuple[Harness, Curve], context: zmq.Context[zmq.Socket[bytes]]) -> None:
    harness, keys = curve_echo
    dealer = _socket(context, zmq.DEALER, harness.endpoint,
                     {**keys.client_options(), zmq.HEARTBEAT_IVL: 20, zmq.HEARTBEAT_TIMEOUT: 150})
    try:
        dealer.send(b"a")
        assert dealer.recv() == b"a"
        time.sleep(0.6)  # the heartbeats' time to fail, if unanswered or unreadable
        dealer.send(b"b")
        assert dealer.recv() == b"b"
        assert len(harness.connected) == 1 and not harness.disconnected
    finally:
        dealer.close(linger=0)


def _curve_connection(harness: Harness, keys: Curve) -> tuple[socket.socket, curve.Box]:
    """A raw socket through the CURVE handshake, and its box: to send what libzmq never
    would."""
    host, port = harness.endpoint[6:].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    client = curve.CurveClient(z85.decode(keys.server_public), z85.decode(keys.client_public),
                               z85.decode(keys.client_secret))
    decoder = Decoder(mechanism=curve.MECHANISM)
    sock.sendall(greeting(curve.MECHANISM))
    while not decoder.greeted():
        decoder.feed(sock.recv(4096))
    sock.sendall(client.first())
    while not client.done:
        events = list(decoder.events())
        if not events:
            data = sock.recv(4096)
            if not data:
                raise ConnectionResetError("the server closed the connection")
            decoder.feed(data)
        for event in events:
            assert isinstance(event, Command)
            sock.sendall(client.step(event))
    assert client.box is not None
    return sock, client.box


@needs_curve
@pytest.mark.parametrize("attack", ["replayed", "tampered", "plain"])
def test_a_forged_message_closes_only_its_connection(
        curve_echo: tuple[Harness, Curve], context: zmq.Context[zmq.Socket[bytes]],
        attack: str) -> None:
    harness, keys = curve_echo
    friend = _socket(context, zmq.DEALER, harness.endpoint, keys.client_options())
    sock, box = _curve_connection(harness, keys)
    try:
        sealed = box.seal(b"genuine")
        sock.sendall(sealed)
        harness.wait_for(lambda: len(harness.requests) == 1, "the genuine message served")
        if attack == "replayed":
            forged = sealed
        elif attack == "tampered":
            forged = bytearray(box.seal(b"genuine"))
            forged[-1] ^= 1
        else:
            forged = frame(b"not sealed")
        sock.sendall(bytes(forged))
        harness.wait_for(lambda: len(harness.disconnected) == 1, "the forger dropped")
        assert [frames[-1] for frames in harness.requests] == [b"genuine"]
        friend.send(b"still served")
        assert friend.recv() == b"devres llits"
    finally:
        sock.close()
        friend.close(linger=0)


def _closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes ``sock`` (True) or :data:`WAIT` passes (False)."""
    sock.settimeout(WAIT)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@needs_curve
@pytest.mark.parametrize("smuggled", ["a frame of a message", "the first of several frames"])
def test_no_message_frame_is_taken_before_the_curve_handshake_ends(
        curve_echo: tuple[Harness, Curve], context: zmq.Context[zmq.Socket[bytes]],
        smuggled: str) -> None:
    # Kept, a frame sent before HELLO would be glued to the first authenticated
    # message (or, with MORE, pile up unauthenticated without end).
    harness, keys = curve_echo
    host, port = harness.endpoint[6:].rsplit(":", 1)
    client = curve.CurveClient(z85.decode(keys.server_public), z85.decode(keys.client_public),
                               z85.decode(keys.client_secret))
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.sendall(greeting(curve.MECHANISM)
                     + frame(b"INJECTED", more=smuggled != "a frame of a message")
                     + client.first())
        assert _closed_by_server(sock)
    friend = _socket(context, zmq.DEALER, harness.endpoint, keys.client_options())
    try:
        friend.send(b"served")
        assert friend.recv() == b"devres"
        assert harness.requests == [[harness.requests[0][0], b"served"]]
    finally:
        friend.close(linger=0)


def test_a_message_of_many_frames_is_held_to_the_size_limit(
        context: zmq.Context[zmq.Socket[bytes]]) -> None:
    harness = Harness(lambda frames: frames[-1], max_size=100_000)
    flooder = _socket(context, zmq.DEALER, harness.endpoint)
    try:
        flooder.send_multipart([b"x" * 60_000] * 3)  # each frame fits, together they do not
        harness.wait_for(lambda: len(harness.disconnected) == 1, "the flooder dropped")
        assert harness.requests == []
    finally:
        flooder.close(linger=0)
        harness.close()


def test_a_connection_that_never_shakes_hands_is_closed_and_the_others_stay(
        monkeypatch: pytest.MonkeyPatch, echo: Harness,
        context: zmq.Context[zmq.Socket[bytes]]) -> None:
    monkeypatch.setattr(direct_router, "HANDSHAKE_TIMEOUT", 0.3)
    dealer = _socket(context, zmq.DEALER, echo.endpoint)
    host, port = echo.endpoint[6:].rsplit(":", 1)
    try:
        dealer.send(b"first")
        assert dealer.recv() == b"tsrif"
        with socket.create_connection((host, int(port)), timeout=WAIT) as silent:
            started = time.monotonic()
            assert _closed_by_server(silent)  # greeted, then closed: it never answered
            assert time.monotonic() - started >= 0.25
        time.sleep(0.4)  # past the timeout: the DEALER's finished handshake keeps it
        dealer.send(b"second")
        assert dealer.recv() == b"dnoces"
        assert len(echo.connected) == 1 and not echo.disconnected
    finally:
        dealer.close(linger=0)


@replaces_methods
@needs_curve
def test_a_peer_whose_ready_cannot_be_written_is_never_connected(
        curve_echo: tuple[Harness, Curve]) -> None:
    harness, keys = curve_echo
    router = harness.router
    write = router._send_some

    def failing_ready(peer: Any, data: bytes | bytearray) -> int | None:
        if b"\x05READY" in bytes(data[:20]):  # as a connection reset just then
            router._drop(peer, "write failed: reset")
            return None
        return write(peer, data)

    router._send_some = failing_ready  # type: ignore[method-assign]
    with pytest.raises((OSError, HandshakeError)):
        _curve_connection(harness, keys)
    time.sleep(0.3)  # a negative check: nothing connects
    assert harness.connected == [] and harness.disconnected == []
    assert router._by_id == {} and router._peers == {}
