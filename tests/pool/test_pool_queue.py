"""The checkout queue on real PostgreSQL: CoDel drops, timeouts, limits, fairness."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from dbpool.actors.listeners import ConnectionEvent
from dbpool.errors import ConnectionError
from dbpool.pool import Pool
from tests.support.events import Recorder, kind


def started(pg_dsn: str, pools: list[Pool], size: int = 1, **options: object) -> Pool:
    """A pool whose connections are all open."""
    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start(pg_dsn, pool_size=size, connection_listeners=[events], **options)
    pools.append(pool)
    events.wait_count(kind("connected"), size)
    return pool


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a pool gauge (nothing else announces a caller joining the queue)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def queue_length(pool: Pool) -> int:
    return int(pool.metrics()["checkout_queue_length"])


def waiters(pool: Pool, n: int, timeout: float) -> tuple[list[threading.Thread], Recorder[object]]:
    """Start ``n`` threads that each run one query; record each result or error."""
    outcomes: Recorder[object] = Recorder()

    def run() -> None:
        try:
            outcomes(pool.query("SELECT 1", timeout=timeout).rows)
        except ConnectionError as exc:
            outcomes(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def test_codel_drops_waiters_when_the_queue_stays_slow_and_the_pool_still_serves(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools, queue_target=0.02, queue_interval=0.1)
    with pool.checkout():  # the only connection, held until the waiters are shed
        threads, outcomes = waiters(pool, 5, timeout=30.0)
        errors = outcomes.wait_count(lambda o: isinstance(o, ConnectionError), 5, timeout=5.0)
        held_until = time.monotonic()
    for thread in threads:
        thread.join()
    assert all(isinstance(e, ConnectionError) and e.reason == "queue_timeout" for e in errors)
    message = str(errors[0])
    assert "dropped from queue after" in message and "pool_size" in message
    # They were shed long before their own 30 s timeout, while the holder held on.
    assert max(outcomes.times(lambda o: True)) <= held_until
    assert pool.metrics()["drops"] == 5
    assert pool.query("SELECT 42").rows == [(42,)]
    assert queue_length(pool) == 0


def test_a_queue_that_keeps_moving_is_not_shed(pg_dsn: str, pools: list[Pool]) -> None:
    # Waits of ~10 ms stay under a 50 ms target: everyone is served.
    pool = started(pg_dsn, pools, queue_target=0.05, queue_interval=0.1)
    threads, outcomes = waiters(pool, 8, timeout=30.0)
    for thread in threads:
        thread.join()
    assert outcomes.values() == [[(1,)]] * 8
    assert pool.metrics()["drops"] == 0


def test_ten_abandoned_waiters_leave_the_pool_serving_normally(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools, queue_interval=60.0)  # no CoDel drops: only timeouts
    with pool.checkout() as holder:
        pid = holder.backend_pid
        threads, outcomes = waiters(pool, 10, timeout=0.3)
        errors = outcomes.wait_count(lambda o: isinstance(o, ConnectionError), 10)
        assert {e.reason for e in errors if isinstance(e, ConnectionError)} == {"queue_timeout"}
        assert queue_length(pool) == 0
    for thread in threads:
        thread.join()
    # The connection went back to the idle set, not to a waiter that had left.
    assert pool.metrics()["ready_conn_count"] == 1
    for _ in range(10):
        with pool.checkout(timeout=1.0) as conn:
            assert conn.backend_pid == pid
            assert conn.query("SELECT 1").rows == [(1,)]


def test_queue_false_fails_at_once_when_nothing_is_idle(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools)
    with pool.checkout():
        began = time.monotonic()
        with pytest.raises(ConnectionError, match="queuing is disabled") as info:
            pool.query("SELECT 1", queue=False)
        assert time.monotonic() - began < 0.5
    assert info.value.reason == "queue_disabled"
    assert pool.query("SELECT 1", queue=False).rows == [(1,)]


def test_max_waiting_refuses_the_caller_past_the_limit(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools, max_waiting=2)
    with pool.checkout():
        threads, outcomes = waiters(pool, 2, timeout=30.0)
        wait_for(lambda: queue_length(pool) == 2)
        with pytest.raises(ConnectionError, match="queue is full") as info:
            pool.query("SELECT 1")
        assert info.value.reason == "queue_full"
    for thread in threads:
        thread.join()
    assert outcomes.values() == [[(1,)], [(1,)]]  # the two within the limit were served


def test_waiters_are_served_in_arrival_order(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools, queue_interval=60.0)
    order: list[int] = []
    threads = []
    with pool.checkout():
        for i in range(5):
            def run(i: int = i) -> None:
                with pool.checkout(timeout=30.0):
                    order.append(i)
            thread = threading.Thread(target=run)
            thread.start()
            threads.append(thread)
            wait_for(lambda i=i: queue_length(pool) == i + 1)  # type: ignore[misc]
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]


def test_idle_connections_are_lent_longest_idle_first(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools, size=3, idle_interval=60.0)
    with pool.checkout() as a, pool.checkout() as b, pool.checkout() as c:
        checkin_order = [c.index, b.index, a.index]  # a with-statement exits in reverse
    lent = []
    with pool.checkout() as first, pool.checkout() as second, pool.checkout() as third:
        lent = [first.index, second.index, third.index]
    assert lent == checkin_order
