"""When ``dbpool serve``'s loop spins for what it waits for rather than sleeps.

The loop polls without sleeping, yielding the CPU between polls, only while
an answer is due soon: a client's next request, or a short statement's
answer.  Not through a long statement or a large result, which would have
it spin after every read of the result for nothing (``FrontEnd._spin``).

With real PostgreSQL and the front end on a thread of the test, the loop's
yields are counted, each with how long the request in flight had run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dbpool.client import Client
from dbpool.pool import Pool
from dbpool.server.frontend import FrontEnd
from tests.support.frontend import front_end

SPIN = 0.001
LARGE = "SELECT g, md5(g::text) FROM generate_series(1, 100000) g"


@pytest.fixture
def pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=2) as started:
        yield started


@dataclass
class Yields:
    """The loop thread's ``os.sched_yield`` calls."""

    all: int = 0
    #: Those made while a request in flight had run for over three spins: a spin
    #: starts only within one, and lasts one at most.
    late: int = 0


def _counted(front: FrontEnd, monkeypatch: pytest.MonkeyPatch) -> Yields:
    yields = Yields()
    real = os.sched_yield

    def counted() -> None:
        if threading.current_thread().name == "front-end":
            yields.all += 1
            now = time.monotonic()
            if any(pipe.requests and now - pipe.progress > 3 * SPIN
                   for pipe in list(front._pipes.values())):
                yields.late += 1
        real()

    monkeypatch.setattr(os, "sched_yield", counted)
    return yields


def test_the_loop_spins_for_short_answers_but_not_through_a_large_result(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    with front_end(pool, spin=SPIN) as front, \
            Client(front.endpoint, timeout=30, spin=0) as client:
        client.query("SELECT 1")
        yields = _counted(front, monkeypatch)
        for _ in range(20):
            assert client.query("SELECT 1").rows == [(1,)]
        assert yields.all > 0, "the loop did not spin for short answers"
        assert client.query(LARGE).rowcount == 100000
        # Before, the loop spun after each read of the result: hundreds of reads.
        assert yields.late == 0, f"{yields.late} yields while a long request ran"
