"""The clients' own CURVE (dbpool.curve) against libzmq's: a ``ROUTER`` with CURVE whose
handshakes pyzmq's ZAP authenticator decides, as any ZeroMQ server in any language.

Both direct transports (sync and asyncio) shake hands, exchange short, long
and multipart messages sealed, answer sealed heartbeats, are identified by
their key (libzmq's ``User-Id``), and tell a refused key (ZAP status 400)
from a wrong server key.  Without PyNaCl a client with keys keeps libzmq.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from nacl import bindings as nacl_bindings
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dbpool import curve
from dbpool.client import AsyncClient, Client
from dbpool.client._base import direct_handshake
from dbpool.client.direct import ZmtpConnection
from dbpool.client.direct_async import AsyncZmtpConnection
from dbpool.errors import ConnectionError
from dbpool.keys import ClientKeys, KeyPair
from dbpool.wire import packb, unpackb
from dbpool.zmtp import Command, Decoder, HandshakeError, frame, greeting
from tests.client.conftest import WAIT, a_slow_reply_arrives

pytestmark = pytest.mark.skipif(not (curve.AVAILABLE and zmq.has("curve")),
                                reason="PyNaCl or libzmq's CURVE missing")


class CurveRouter:
    """A libzmq ``ROUTER`` with CURVE on a free loopback port, admitting :attr:`client`."""

    def __init__(self, **options: Any) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.server = KeyPair(*zmq.curve_keypair())
        self.client = KeyPair(*zmq.curve_keypair())
        self.auth = ThreadAuthenticator(self.context)
        self.auth.start()
        self.auth.configure_curve_callback("test", self)
        sock: zmq.Socket[bytes] = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.server.public, self.server.secret
        sock.zap_domain = b"test"
        for name, value in options.items():
            setattr(sock, name, value)
        self.sock = sock
        self.port = sock.bind_to_random_port("tcp://127.0.0.1")

    def callback(self, domain: str, key: bytes) -> bool:  # ZAP's question, on its thread
        return key == self.client.public

    def handshake(self, client: KeyPair | None = None,
                  server_key: bytes | None = None) -> curve.CurveClient:
        client = client or self.client
        return curve.CurveClient(z85.decode(server_key or self.server.public),
                                 z85.decode(client.public), z85.decode(client.secret))

    def recv(self) -> tuple[bytes, list[zmq.Frame]]:
        """The next message: its routing id, and its frames (with their properties)."""
        frames = self.sock.recv_multipart(copy=False)
        return frames[0].bytes, frames[1:]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.auth.stop()
        self.context.term()


@pytest.fixture
def server() -> Iterator[CurveRouter]:
    router = CurveRouter()
    yield router
    router.close()


@pytest.fixture
def pinging_server() -> Iterator[CurveRouter]:
    """Pings every 20 ms; drops a peer that has not answered in 150 ms (RFC 37)."""
    router = CurveRouter(heartbeat_ivl=20, heartbeat_timeout=150)
    yield router
    router.close()


def _body(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"x" * (size % 256)


def test_the_sync_connection_exchanges_sealed_messages_as_its_key(server: CurveRouter) -> None:
    conn = ZmtpConnection("127.0.0.1", server.port, server.handshake)
    conn.connect(WAIT)
    try:
        for size in (0, 1, 255, 256, 70_000, 3_000_000):
            body = _body(size)
            conn.send(body)
            routing_id, frames = server.recv()
            assert [f.bytes for f in frames] == [body]
            assert frames[0].get("User-Id") == server.client.public.decode()
            server.sock.send_multipart([routing_id, body[::-1]])
            assert conn.recv(time.monotonic() + WAIT) == body[::-1]
        conn.send(b"several")
        routing_id, _ = server.recv()
        server.sock.send_multipart([routing_id, b"first", b"last"])  # MORE, sealed
        server.sock.send_multipart([routing_id, b"next"])
        deadline = time.monotonic() + WAIT
        assert conn.recv(deadline) == b"last"
        assert conn.recv(deadline) == b"next"
    finally:
        conn.close()


def test_sealed_heartbeats_are_answered_so_a_slow_reply_still_arrives(
        pinging_server: CurveRouter) -> None:
    # The reply comes after 600 ms: without sealed PONGs the ROUTER has dropped us.
    conn = ZmtpConnection("127.0.0.1", pinging_server.port, pinging_server.handshake)
    conn.connect(WAIT)
    try:
        a_slow_reply_arrives(conn, pinging_server.sock)
    finally:
        conn.close()


def test_an_unknown_key_is_refused_with_the_zap_status(server: CurveRouter) -> None:
    stranger = KeyPair(*zmq.curve_keypair())
    conn = ZmtpConnection("127.0.0.1", server.port, lambda: server.handshake(stranger))
    with pytest.raises(HandshakeError) as caught:
        conn.connect(WAIT)
    assert caught.value.status == "400"


def test_a_wrong_server_key_ends_the_handshake(server: CurveRouter) -> None:
    # libzmq cannot open our HELLO and closes without a word.
    other = KeyPair(*zmq.curve_keypair())
    conn = ZmtpConnection("127.0.0.1", server.port,
                          lambda: server.handshake(server_key=other.public))
    with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
        conn.connect(WAIT)


def test_the_clients_say_which_refusal_it_was(server: CurveRouter) -> None:
    endpoint = f"tcp://127.0.0.1:{server.port}"
    stranger = KeyPair(*zmq.curve_keypair())
    with Client(endpoint, timeout=WAIT, server_key=server.server.public.decode(),
                client_key=stranger.secret.decode()) as client:
        with pytest.raises(ConnectionError, match="refused this client's key") as caught:
            client.query("SELECT 1")
        assert caught.value.reason == "unauthorized"
    other = KeyPair(*zmq.curve_keypair())
    with Client(endpoint, timeout=WAIT, server_key=other.public.decode(),
                client_key=server.client.secret.decode()) as client, \
            pytest.raises(ConnectionError, match="is server_key the server's public key"):
        client.query("SELECT 1")


async def _async_round_trips(server: CurveRouter) -> None:
    messages: asyncio.Queue[bytes] = asyncio.Queue()
    conn = await asyncio.wait_for(AsyncZmtpConnection.open(
        "127.0.0.1", server.port, messages.put_nowait, lambda error: None,
        server.handshake()), WAIT)
    loop = asyncio.get_running_loop()
    try:
        for size in (0, 1, 255, 256, 70_000, 3_000_000):
            body = _body(size)
            assert conn.send(body)
            routing_id, frames = await loop.run_in_executor(None, server.recv)
            assert [f.bytes for f in frames] == [body]
            assert frames[0].get("User-Id") == server.client.public.decode()
            server.sock.send_multipart([routing_id, b"first", body[::-1]])
            assert await asyncio.wait_for(messages.get(), WAIT) == body[::-1]
    finally:
        conn.close()


def test_the_asyncio_connection_exchanges_sealed_messages(server: CurveRouter) -> None:
    asyncio.run(_async_round_trips(server))


def test_the_asyncio_client_is_refused_with_the_zap_status(server: CurveRouter) -> None:
    stranger = KeyPair(*zmq.curve_keypair())

    async def main() -> None:
        async with AsyncClient(f"tcp://127.0.0.1:{server.port}", timeout=WAIT,
                               server_key=server.server.public.decode(),
                               client_key=stranger.secret.decode()) as client:
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="refused this client's key") as caught:
                await client.query("SELECT 1")
            assert caught.value.reason == "unauthorized"
            assert time.monotonic() - started < 2.0

    asyncio.run(main())


def test_a_client_with_keys_speaks_curve_itself(server: CurveRouter) -> None:
    # The request reaches the libzmq server authenticated, through the direct transport.
    with Client(f"tcp://127.0.0.1:{server.port}", timeout=WAIT,
                server_key=server.server.public.decode(),
                client_key=server.client.secret.decode()) as client:
        users: list[str] = []

        def answer() -> None:
            routing_id, frames = server.recv()
            users.append(frames[-1].get("User-Id"))
            request = unpackb(frames[-1].bytes)
            server.sock.send_multipart([routing_id, packb({"id": request["id"], "ok": "pong"})])

        thread = threading.Thread(target=answer)
        thread.start()
        assert client.ping() > 0
        thread.join(WAIT)
        assert users == [server.client.public.decode()]
        assert [type(sock) for sock in client._sockets] == [ZmtpConnection]


def test_without_pynacl_a_client_with_keys_keeps_libzmq(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ClientKeys(KeyPair(*zmq.curve_keypair()).public, KeyPair(*zmq.curve_keypair()))
    assert isinstance(direct_handshake(keys)(), curve.CurveClient)  # type: ignore[misc]
    monkeypatch.setattr(curve, "AVAILABLE", False)
    assert direct_handshake(keys) is None
    assert direct_handshake(None) is not None  # NULL needs no PyNaCl


def _forging_server(extra: bytes) -> tuple[int, threading.Thread]:
    """A CURVE server (dbpool.curve's) that sends ``extra`` in the same write as its READY,
    as an attacker on the path could append to it."""
    listener = socket.create_server(("127.0.0.1", 0))
    server, client = KeyPair(*zmq.curve_keypair()), KeyPair(*zmq.curve_keypair())
    keys = (z85.decode(server.public), z85.decode(client.public), z85.decode(client.secret))

    def serve() -> None:
        sock, _ = listener.accept()
        listener.close()
        handshake = curve.CurveServer(keys[0], z85.decode(server.secret), lambda key: True)
        decoder = Decoder(mechanism=curve.MECHANISM)
        with sock:
            sock.sendall(greeting(curve.MECHANISM, as_server=True))
            while not handshake.done:
                data = sock.recv(4096)
                if not data:
                    return
                decoder.feed(data)
                for event in decoder.events():
                    assert isinstance(event, Command)
                    answer = handshake.step(event)
                    sock.sendall(answer + extra if handshake.done else answer)
            sock.recv(4096)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    _forging_server.keys = keys  # type: ignore[attr-defined]
    return listener.getsockname()[1], thread


@pytest.mark.parametrize("transport", ["sync", "asyncio"])
def test_a_plain_frame_that_comes_with_the_ready_is_refused(transport: str) -> None:
    port, thread = _forging_server(frame(b"a forged reply"))
    server_key, public, secret = _forging_server.keys  # type: ignore[attr-defined]

    def handshake() -> curve.CurveClient:
        return curve.CurveClient(server_key, public, secret)

    if transport == "sync":
        conn = ZmtpConnection("127.0.0.1", port, handshake)
        with pytest.raises(HandshakeError, match="not a MESSAGE"):
            conn.connect(WAIT)
    else:  # READY and the frame come in one read: READY completes, the frame ends it
        async def main() -> None:
            messages: list[bytes] = []
            lost: asyncio.Future[BaseException | None] = (
                asyncio.get_running_loop().create_future())
            try:
                conn = await asyncio.wait_for(AsyncZmtpConnection.open(
                    "127.0.0.1", port, messages.append, lost.set_result, handshake()), WAIT)
            except HandshakeError as error:  # (or the frame came in a read of its own)
                assert "not a MESSAGE" in str(error)
                return
            error = await asyncio.wait_for(lost, WAIT)
            assert isinstance(error, HandshakeError) and "not a MESSAGE" in str(error)
            assert messages == [] and not conn.send(b"request")  # closed, nothing taken

        asyncio.run(main())
    thread.join(WAIT)


def test_a_sealed_frame_taken_whole_that_is_no_reply_waits_for_events() -> None:
    # Decoder.single unseals a frame that a read brought whole; a command (a PING
    # to answer) or the first part of a message goes on to events(), in order.
    server_public, server_secret = nacl_bindings.crypto_box_keypair()
    client_public, client_secret = nacl_bindings.crypto_box_keypair()
    server = curve.Box(nacl_bindings.crypto_box_beforenm(client_public, server_secret), 0, 0,
                       client=False)
    client = curve.Box(nacl_bindings.crypto_box_beforenm(server_public, client_secret), 0, 0,
                       client=True)
    decoder = Decoder(mechanism=curve.MECHANISM)
    decoder.feed(greeting(curve.MECHANISM, as_server=True))
    assert decoder.greeted()
    decoder.unseal = client.unseal
    assert decoder.single(server.seal(b"reply")) == b"reply"
    assert decoder.single(server.seal(b"\x04PING\x00\x00", command=True)) is None
    assert decoder.single(server.seal(b"first", more=True)) is None
    decoder.feed(server.seal(b"last"))
    assert list(decoder.events()) == [Command(b"PING", b"\x00\x00"), [b"first", b"last"]]
    assert decoder.empty
