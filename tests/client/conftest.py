"""Fixtures of the client's tests: standard ZeroMQ peers (libzmq ``ROUTER``s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import zmq

#: Seconds a test waits for its peer.
WAIT = 5.0

Router = tuple[zmq.Socket[bytes], int]

if TYPE_CHECKING:
    from dbpool.client.direct import ZmtpConnection


def a_slow_reply_arrives(conn: ZmtpConnection, sock: zmq.Socket[bytes]) -> None:
    """Send a request on ``conn`` and have ``sock`` (a ROUTER that pings and drops peers
    that do not answer in 150 ms) reply 600 ms later: the reply arrives only if ``conn``
    answered the PINGs meanwhile."""
    conn.send(b"slow")
    routing_id = sock.recv_multipart()[0]
    timer = threading.Timer(0.6, lambda: sock.send_multipart([routing_id, b"done"]))
    timer.start()
    try:
        assert conn.recv(time.monotonic() + WAIT) == b"done"
    finally:
        timer.join()


def _router(**options: Any) -> Iterator[Router]:
    ctx = zmq.Context.instance()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
    for name, value in options.items():
        setattr(sock, name, value)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, port
    sock.close(linger=0)


@pytest.fixture
def router() -> Iterator[Router]:
    """A ``ROUTER`` bound to a free loopback port, and the port; receives time out
    after :data:`WAIT`."""
    yield from _router()


@pytest.fixture
def pinging_router() -> Iterator[Router]:
    """A ``ROUTER`` that pings every 20 ms and drops a peer that has not answered
    within 150 ms (ZMTP heartbeats, RFC 37)."""
    yield from _router(heartbeat_ivl=20, heartbeat_timeout=150)


@pytest.fixture
def curve_router() -> Iterator[Router]:
    """A ``ROUTER`` that requires CURVE."""
    _, secret = zmq.curve_keypair()
    yield from _router(curve_server=True, curve_secretkey=secret)
