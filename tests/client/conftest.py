"""Fixtures of the client's tests: standard ZeroMQ peers (libzmq ``ROUTER``s)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq

#: Seconds a test waits for its peer.
WAIT = 5.0

Router = tuple[zmq.Socket[bytes], int]


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
