"""The front end's poller (server/poller.py), with epoll and with poll, on socket pairs.

Both kinds must keep the one contract the front end and the direct router are
written against: timeouts in seconds, register twice to change the events,
``KeyError`` to unregister what is not watched, only ready descriptors reported.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from dbpool.server.poller import Poller

KINDS = [pytest.param(True, id="epoll",
                      marks=pytest.mark.skipif(not hasattr(select, "epoll"),
                                               reason="no epoll here")),
         pytest.param(False, id="poll")]


@pytest.fixture(params=KINDS)
def poller(request: pytest.FixtureRequest) -> Iterator[Poller]:
    poller = Poller(epoll=request.param)
    yield poller
    poller.close()


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(50)]
    yield made
    for a, b in made:
        a.close()
        b.close()


def test_the_kind_asked_for_is_used() -> None:
    poller = Poller(epoll=False)
    assert poller._epoll is None
    poller.close()
    if hasattr(select, "epoll"):
        poller = Poller()
        assert poller._epoll is not None
        poller.close()


def test_only_ready_descriptors_are_reported(
        poller: Poller, pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for ours, _ in pairs:
        poller.register(ours.fileno(), select.POLLIN)
    assert poller.poll(0) == []
    pairs[7][1].send(b"x")
    pairs[31][1].send(b"y")
    ready = dict(poller.poll(1.0))
    assert set(ready) == {pairs[7][0].fileno(), pairs[31][0].fileno()}
    assert all(mask & select.POLLIN for mask in ready.values())


def test_the_timeout_is_in_seconds(poller: Poller,
                                   pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poller.register(pairs[0][0].fileno(), select.POLLIN)
    started = time.monotonic()
    assert poller.poll(0.05) == []
    waited = time.monotonic() - started
    # Milliseconds taken for seconds would wait 50 s, and 0.05 taken for ms would not wait.
    assert 0.04 <= waited < 5.0


def test_register_again_and_modify_change_the_events(
        poller: Poller, pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    fd = pairs[0][0].fileno()
    poller.register(fd, select.POLLIN)
    assert poller.poll(0) == []  # nothing to read
    poller.register(fd, select.POLLIN | select.POLLOUT)  # again: now writability too
    assert dict(poller.poll(0))[fd] & select.POLLOUT
    poller.modify(fd, select.POLLIN)
    assert poller.poll(0) == []


def test_unregister_stops_watching_and_refuses_the_unknown(
        poller: Poller, pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    ours, theirs = pairs[0]
    poller.register(ours.fileno(), select.POLLIN)
    poller.unregister(ours.fileno())
    theirs.send(b"x")
    assert poller.poll(0.01) == []
    with pytest.raises(KeyError):
        poller.unregister(ours.fileno())
    with pytest.raises(KeyError):
        poller.unregister(pairs[1][0].fileno())
