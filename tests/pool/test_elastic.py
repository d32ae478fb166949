"""Elastic sizing (``min_size``/``max_size``/``max_idle``; dbpool.pool.elastic).

The decision alone (``next_size``), then a real pool on real PostgreSQL: it
grows under a burst, is back at ``min_size`` within ``max_idle`` + 1 s after
it, reports every change as an event and in its metrics, and does not grow
against a database it cannot reach.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from dbpool.actors.listeners import ResizeEvent
from dbpool.errors import ConfigurationError, ConnectionError
from dbpool.pool import Pool
from dbpool.pool.elastic import IdleWindow, Sizing, next_size
from tests.support.events import Recorder

BASE = Sizing(size=4, min_size=2, max_size=6, up=4, healthy=True, longest_wait=0.0,
              queue_target=0.05, unused=0)


def sized(**changes: Any) -> int:
    return next_size(Sizing(**{**{f: getattr(BASE, f) for f in Sizing.__slots__}, **changes}))


def test_it_grows_by_one_while_a_checkout_waits_longer_than_the_target() -> None:
    assert sized(longest_wait=0.06) == 5
    assert sized(longest_wait=0.04) == 4  # waiting, but not long: no change either way
    assert sized(longest_wait=0.06, size=6, up=6) == 6  # at max_size
    assert sized(longest_wait=0.06, up=3) == 4  # the last one grown is not up yet
    assert sized(longest_wait=0.06, healthy=False) == 4  # circuit open, or paused


def test_it_shrinks_by_the_unused_down_to_min_size_while_nobody_waits() -> None:
    assert sized(unused=1) == 3
    assert sized(unused=4) == 2
    assert sized(unused=4, longest_wait=0.01) == 4
    assert sized() == 4


def test_the_window_keeps_the_fewest_idle_over_its_whole_span() -> None:
    window = IdleWindow(1.0, now=0.0)
    for t, idle in [(0.0, 5), (0.3, 2), (0.6, 4), (0.9, 3)]:
        window.sample(t, idle)
    assert window.low(0.9) == 0  # it has not covered a whole second yet
    window.sample(1.1, 4)
    assert window.low(1.1) == 2  # 0.3 s: 2 idle, within the last second
    window.sample(1.4, 4)
    assert window.low(1.4) == 3  # the 2 has left the window; 0.9 s: 3
    window.sample(1.5, 0)  # a moment when every connection was in use
    assert window.low(1.5) == 0
    window.restart(1.5)
    window.sample(2.0, 6)
    assert window.low(2.0) == 0  # judged afresh since the restart
    window.sample(2.6, 6)
    assert window.low(2.6) == 6


def test_bounds_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        Pool.start("host=127.0.0.1 port=9", min_size=5, max_size=3)
    with pytest.raises(ConfigurationError):
        Pool.start("host=127.0.0.1 port=9", min_size=0, max_size=3)
    with pytest.raises(ConfigurationError):
        Pool.start("host=127.0.0.1 port=9", min_size=2, max_size=4, pool_size=5)
    with pytest.raises(ConfigurationError):
        Pool.start("host=127.0.0.1 port=9", min_size=2, max_size=4, max_idle=0)


def _backends(dsn: str, app: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                            [app]).fetchone()
    assert row is not None
    return int(row[0])


def test_a_pool_grows_under_a_burst_and_is_back_at_min_size_within_max_idle(
        pg_dsn: str) -> None:
    app = f"dbpool-elastic-{time.monotonic_ns()}"
    max_idle = 1.0
    events: Recorder[Any] = Recorder()
    with Pool.start(pg_dsn, min_size=2, max_size=10, max_idle=max_idle,
                    connection_listeners=[events],
                    connect_kwargs={"application_name": app}) as pool:
        events.wait_count(lambda e: e.kind == "connected", 2)
        assert pool.metrics()["pool_size"] == 2
        stop = threading.Event()

        def burst() -> None:
            while not stop.is_set():
                pool.query("SELECT pg_sleep(0.02)")

        workers = [threading.Thread(target=burst) for _ in range(16)]
        for worker in workers:
            worker.start()
        try:
            grown = events.wait_count(lambda e: e.kind == "resize", 3, timeout=20)
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
        ended = time.monotonic()
        assert all(e.reason == "grow" and e.size == e.previous + 1 for e in grown)
        peak = pool.metrics()["pool_size"]
        assert 5 <= peak <= 10
        # Back at min_size within max_idle + 1 s of the burst's end, on the server too.
        deadline = ended + max_idle + 1
        while (pool.metrics()["pool_size"] > 2 or _backends(pg_dsn, app) > 2) \
                and time.monotonic() < deadline + 2:
            time.sleep(0.02)
        back = time.monotonic()
        assert pool.metrics()["pool_size"] == 2 and _backends(pg_dsn, app) == 2
        assert back <= deadline, f"back at 2 after {back - ended:.2f} s"
        resizes = [e for e in events.values() if isinstance(e, ResizeEvent)]
        metrics = pool.metrics()
        assert metrics["grown"] == sum(1 for e in resizes if e.reason == "grow")
        assert metrics["shrunk"] == sum(e.previous - e.size for e in resizes
                                        if e.reason == "shrink")
        assert metrics["grown"] - metrics["shrunk"] == 0
        assert (metrics["min_size"], metrics["max_size"]) == (2, 10)
        assert pool.query("SELECT 1").rows == [(1,)]


def test_a_pool_does_not_grow_against_a_database_it_cannot_reach() -> None:
    with Pool.start("host=127.0.0.1 port=9 user=postgres connect_timeout=1", min_size=1,
                    max_size=5, backoff_min=0.05, backoff_max=0.1) as pool:
        def wait() -> None:
            try:
                pool.query("SELECT 1", timeout=1.0)
            except ConnectionError:
                pass

        waiters = [threading.Thread(target=wait) for _ in range(4)]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join(10)
        metrics = pool.metrics()
        assert metrics["pool_size"] == 1 and metrics["grown"] == 0


def test_resize_by_hand_fixes_the_size(pg_dsn: str) -> None:
    with Pool.start(pg_dsn, min_size=1, max_size=4, max_idle=0.2) as pool:
        pool.resize(3)
        metrics = pool.metrics()
        assert (metrics["pool_size"], metrics["min_size"], metrics["max_size"]) == (3, 3, 3)
        time.sleep(0.5)  # past max_idle: a fixed pool does not shrink
        assert pool.metrics()["pool_size"] == 3
