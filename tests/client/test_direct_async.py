"""The asyncio client's own ZMTP (dbpool.client.direct_async) against libzmq peers.

As ``test_direct.py`` for the sync client: the peer is a standard ZeroMQ
``ROUTER`` (pyzmq), so these show that the asyncio transport interoperates,
and that :class:`~dbpool.client.AsyncClient` uses it, coalesces what its tasks
send in one turn of the loop, and fails at once when the connection closes.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import tracemalloc

import pytest
import zmq

from dbpool.client import AsyncClient
from dbpool.client.aio import _Channel, _DirectChannel
from dbpool.client.direct_async import AsyncZmtpConnection
from dbpool.errors import ConnectionError
from dbpool.wire import packb, unpackb
from dbpool.zmtp import HandshakeError, frame, greeting, ready
from tests.client.conftest import WAIT, Router

pytestmark = pytest.mark.asyncio


class _Inbox:
    """What a connection hands on: its messages, and whether (why) it was lost."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.lost: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future())

    def on_lost(self, error: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(error)

    async def next(self) -> bytes:
        return await asyncio.wait_for(self.messages.get(), WAIT)


async def _open(port: int) -> tuple[AsyncZmtpConnection, _Inbox]:
    inbox = _Inbox()
    conn = await asyncio.wait_for(AsyncZmtpConnection.open(
        "127.0.0.1", port, inbox.messages.put_nowait, inbox.on_lost), WAIT)
    return conn, inbox


async def test_messages_both_ways_with_short_and_long_frames(
        router: Router) -> None:
    sock, port = router
    conn, inbox = await _open(port)
    try:
        for size in (0, 1, 255, 256, 70_000, 3_000_000):
            body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            assert conn.send(body)
            routing_id, got = await asyncio.to_thread(sock.recv_multipart)
            assert got == body
            sock.send_multipart([routing_id, body[::-1]])
            assert await inbox.next() == body[::-1]
        # A multipart message gives its last frame, and the next one follows.
        conn.send(b"hello")
        routing_id, _ = await asyncio.to_thread(sock.recv_multipart)
        sock.send_multipart([routing_id, b"first", b"last"])
        sock.send_multipart([routing_id, b"next"])
        assert [await inbox.next(), await inbox.next()] == [b"last", b"next"]
    finally:
        conn.close()


async def test_a_short_reply_is_read_without_a_large_allocation(router: Router) -> None:
    # asyncio's plain Protocol reads 256 KiB at a time, which glibc serves with an
    # mmap per read: every reply paid three system calls and fresh pages.
    sock, port = router
    conn, inbox = await _open(port)
    try:
        conn.send(b"warm")
        routing_id, _ = await asyncio.to_thread(sock.recv_multipart)
        sock.send_multipart([routing_id, b"up"])
        assert await inbox.next() == b"up"
        tracemalloc.start()
        try:
            for i in range(20):
                sock.send_multipart([routing_id, b"%02d" % i])
                assert await inbox.next() == b"%02d" % i
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 32 * 1024, f"{peak} bytes allocated at once for 2-byte replies"
    finally:
        conn.close()


async def test_what_is_sent_in_one_turn_of_the_loop_leaves_in_one_write() -> None:
    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []

        def write(self, data: bytes | bytearray | memoryview) -> None:
            self.writes.append(bytes(data))

        def abort(self) -> None:
            pass

    inbox = _Inbox()
    conn = AsyncZmtpConnection(inbox.messages.put_nowait, inbox.on_lost)
    transport = Transport()
    conn.connection_made(transport)
    peer_ready = frame(b"\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER", command=True)
    conn.data_received(greeting() + peer_ready)
    assert transport.writes == [greeting(), ready()]
    for body in (b"a", b"b" * 300, b"c"):
        assert conn.send(body)
    assert len(transport.writes) == 2  # nothing yet: at the end of this turn
    await asyncio.sleep(0)
    assert transport.writes[2:] == [frame(b"a") + frame(b"b" * 300) + frame(b"c")]
    # Replies that come together are all handed on, in order.
    conn.data_received(frame(b"x") + frame(b"y" * 300) + frame(b"z"))
    assert [inbox.messages.get_nowait() for _ in range(3)] == [b"x", b"y" * 300, b"z"]


async def test_heartbeats_are_answered_so_a_slow_reply_still_arrives(
        pinging_router: Router) -> None:
    sock, port = pinging_router
    conn, inbox = await _open(port)
    try:
        conn.send(b"slow")
        routing_id, _ = await asyncio.to_thread(sock.recv_multipart)
        await asyncio.sleep(0.6)  # 30 pings; unanswered, the ROUTER would have dropped us
        sock.send_multipart([routing_id, b"done"])
        assert await inbox.next() == b"done"
        assert not inbox.lost.done()
    finally:
        conn.close()


async def test_a_curve_server_ends_the_handshake(curve_router: Router) -> None:
    _, port = curve_router
    # libzmq closes on a NULL greeting, with or without a part of its own.
    with pytest.raises(HandshakeError,
                       match=r"closed the connection during the handshake|CURVE"):
        await _open(port)


async def test_the_client_speaks_directly_and_answers_through_a_plain_router(
        router: Router) -> None:
    sock, port = router

    def answer() -> None:
        for _ in range(20):
            routing_id, body = sock.recv_multipart()
            request = unpackb(body)
            sock.send_multipart([routing_id, packb({"id": request["id"], "ok": "pong"})])

    thread = threading.Thread(target=answer)
    thread.start()
    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=WAIT) as client:
        pings = await asyncio.gather(*(client.ping() for _ in range(10)))
        assert all(ping > 0 for ping in pings)
        assert isinstance(client._chan, _DirectChannel)
    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=WAIT, direct=False) as client:
        assert all(ping > 0 for ping in await asyncio.gather(
            *(client.ping() for _ in range(10))))
        assert isinstance(client._chan, _Channel)
    thread.join(WAIT)


async def test_the_client_fails_at_once_when_the_connection_closes_before_the_reply(
        router: Router) -> None:
    sock, port = router
    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=WAIT * 2) as client:
        started = time.monotonic()
        pings = [asyncio.ensure_future(client.ping()) for _ in range(3)]
        for _ in range(3):
            await asyncio.to_thread(sock.recv_multipart)
        sock.close(linger=0)
        results = await asyncio.gather(*pings, return_exceptions=True)
        assert time.monotonic() - started < WAIT
        for result in results:
            assert isinstance(result, ConnectionError), result
            assert result.reason == "timeout"
            assert "closed the connection before replying" in str(result)


async def test_a_request_given_up_while_connecting_is_never_sent_later() -> None:
    with socket.socket() as probe:  # a free port, with nothing listening yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=WAIT) as client:
        # A ping that waits on, which keeps the connection being made...
        answered = asyncio.ensure_future(client.ping())
        # ...and a request that gives up meanwhile: it must never go out.
        with pytest.raises(ConnectionError):
            await client.execute("SELECT 'given up'", timeout=0.3)
        ctx = zmq.Context.instance()
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{port}")
        try:
            routing_id, body = await asyncio.to_thread(sock.recv_multipart)
            request = unpackb(body)
            assert request["op"] == "ping"
            sock.send_multipart([routing_id, packb({"id": request["id"], "ok": "pong"})])
            assert await answered > 0
            assert not sock.poll(300), unpackb(sock.recv_multipart()[1])
        finally:
            sock.close(linger=0)


async def test_closing_the_client_while_it_connects_fails_the_request_plainly() -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never greets
    port = listener.getsockname()[1]
    try:
        client = AsyncClient(f"tcp://127.0.0.1:{port}", timeout=WAIT)
        request = asyncio.ensure_future(client.ping())
        await asyncio.sleep(0.2)
        await client.close()
        with pytest.raises(ConnectionError):
            await request
    finally:
        listener.close()
