"""``pool.metrics()`` and the checkout/checkin telemetry on real PostgreSQL.

The gauge tests follow DBConnection's ``integration_test/connection_pool/
metrics_test.exs``: ``ready_conn_count`` and ``checkout_queue_length`` when
ready, when busy, when callers queue and after they are served, and around
the idle pings.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent
from dbpool.errors import ConnectionError
from dbpool.pool import Pool
from dbpool.pool.metrics import DEFAULT_BUCKETS
from tests.support.events import Recorder, kind

Telemetry = tuple[str, dict[str, float], dict[str, Any]]


def started(
    pg_dsn: str, pools: list[Pool], size: int, **options: Any
) -> tuple[Pool, Recorder[ConnectionEvent]]:
    """A pool whose connections are all open and idle, and its connection events."""
    events: Recorder[ConnectionEvent] = Recorder()
    # No idle ping unless asked for: one would take a connection out of the
    # queue for a moment, and the tests read the gauges at exact points.
    options.setdefault("idle_interval", 30.0)
    pool = Pool.start(pg_dsn, pool_size=size, connection_listeners=[events], **options)
    pools.append(pool)
    events.wait_count(kind("connected"), size)
    # "connected" is announced just before the actor hands the slot to the queue.
    wait_for(lambda: gauges(pool) == (size, 0))
    return pool, events


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a pool gauge: nothing else announces a caller joining the queue."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def gauges(pool: Pool) -> tuple[int, int]:
    """``(ready_conn_count, checkout_queue_length)``."""
    m = pool.metrics()
    return m["ready_conn_count"], m["checkout_queue_length"]


class Holder:
    """A thread that checks out a connection and holds it until released."""

    def __init__(self, pool: Pool, name: str, got: Recorder[str], timeout: float = 10.0) -> None:
        self.release = threading.Event()
        self.error: BaseException | None = None
        self._pool, self._name, self._got, self._timeout = pool, name, got, timeout
        self.thread = threading.Thread(target=self._run, name=f"holder-{name}")
        self.thread.start()

    def _run(self) -> None:
        try:
            with self._pool.checkout(timeout=self._timeout):
                self._got(self._name)
                self.release.wait(10)
        except BaseException as exc:
            self.error = exc
            self._got(f"{self._name}-failed")

    def finish(self) -> None:
        """Release the connection and wait until it is checked in."""
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive() and self.error is None, self.error


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    """Holders still holding at teardown are released, so no thread outlives the test."""
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.release.set()
        holder.thread.join(10)


@pytest.fixture
def recorded() -> Iterator[Callable[[str, list[str]], Recorder[Telemetry]]]:
    """``attach(pool_name, events)``: record telemetry of that pool; detached at teardown."""
    ids: list[str] = []

    def attach(pool_name: str, events: list[str]) -> Recorder[Telemetry]:
        record: Recorder[Telemetry] = Recorder()

        def handler(event: str, measurements: Mapping[str, float],
                    metadata: Mapping[str, Any]) -> None:
            if metadata.get("pool") == pool_name:
                record((event, dict(measurements), dict(metadata)))

        handler_id = f"test-pool-metrics-{pool_name}-{len(ids)}"
        telemetry.attach(handler_id, events, handler)
        ids.append(handler_id)
        return record

    try:
        yield attach
    finally:
        for handler_id in ids:
            telemetry.detach(handler_id)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def last_queries(pg_dsn: str, pids: set[int]) -> dict[int, str]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
        ).fetchall()
    return dict(rows)


# -- gauges, as DBConnection's metrics tests check them -----------------------


def test_gauges_follow_a_checkout_and_its_checkin(pg_dsn: str, pools: list[Pool]) -> None:
    pool, _ = started(pg_dsn, pools, 1)
    assert gauges(pool) == (1, 0)
    with pool.checkout() as conn:
        assert gauges(pool) == (0, 0)
        conn.query("SELECT 1")
        assert gauges(pool) == (0, 0)
    assert gauges(pool) == (1, 0)


def test_gauges_when_busy_queued_and_served(
    pg_dsn: str, pools: list[Pool], holders: list[Holder]
) -> None:
    pool, _ = started(pg_dsn, pools, 2)
    got: Recorder[str] = Recorder()
    assert gauges(pool) == (2, 0)

    holders.append(first := Holder(pool, "first", got))
    got.wait_count(lambda n: n == "first", 1)
    assert gauges(pool) == (1, 0)

    holders.append(second := Holder(pool, "second", got))
    got.wait_count(lambda n: n == "second", 1)
    assert gauges(pool) == (0, 0)

    holders.append(third := Holder(pool, "third", got))
    wait_for(lambda: gauges(pool)[1] == 1)
    assert gauges(pool) == (0, 1)
    assert "third" not in got.values()

    first.finish()  # its connection goes straight to the waiter
    got.wait_count(lambda n: n == "third", 1)
    assert gauges(pool) == (0, 0)

    second.finish()
    assert gauges(pool) == (1, 0)
    third.finish()
    assert gauges(pool) == (2, 0)

    m = pool.metrics()
    assert (m["checkouts"], m["queue_waits"]) == (3, 1)
    assert m["queue_wait"]["count"] == 3 and m["usage"]["count"] == 3


def test_gauges_with_several_callers_queued(
    pg_dsn: str, pools: list[Pool], holders: list[Holder]
) -> None:
    pool, _ = started(pg_dsn, pools, 2)
    got: Recorder[str] = Recorder()
    with pool.checkout(), pool.checkout():
        assert gauges(pool) == (0, 0)
        for i in range(3):
            holders.append(Holder(pool, f"waiter-{i}", got))
        wait_for(lambda: gauges(pool)[1] == 3)
        assert gauges(pool) == (0, 3)
        assert got.values() == []
    # Both connections went to the two oldest waiters.
    got.wait_count(lambda n: True, 2)
    assert gauges(pool) == (0, 1)
    for holder in holders:
        holder.release.set()
    for holder in holders:
        holder.finish()
    assert sorted(got.values()) == ["waiter-0", "waiter-1", "waiter-2"]
    assert gauges(pool) == (2, 0)
    assert pool.metrics()["queue_waits"] == 3


def test_gauges_come_back_to_full_after_idle_pings(pg_dsn: str, pools: list[Pool]) -> None:
    # The idle sweep takes idle connections out of the queue to ping them.
    pool, events = started(pg_dsn, pools, 2, idle_interval=0.05)
    with pool.checkout() as a, pool.checkout() as b:
        a.query("SELECT 'dbpool-metrics-marker'")
        b.query("SELECT 'dbpool-metrics-marker'")
        pids = {a.backend_pid, b.backend_pid}
    assert None not in pids
    pids_int = {p for p in pids if p is not None}
    # Each was pinged ("SELECT 1") after the marker, on the same server session.
    deadline = time.monotonic() + 5
    while set(last_queries(pg_dsn, pids_int).values()) != {"SELECT 1"}:
        assert time.monotonic() < deadline, last_queries(pg_dsn, pids_int)
        time.sleep(0.01)
    wait_for(lambda: gauges(pool) == (2, 0))
    with pool.checkout() as a, pool.checkout() as b:
        assert {a.backend_pid, b.backend_pid} == pids
    assert [e.kind for e in events.values()] == ["connected", "connected"]
    assert pool.metrics()["disconnects"] == 0


# -- counters -----------------------------------------------------------------


def test_every_checkout_counts_and_idle_ones_wait_zero(pg_dsn: str, pools: list[Pool]) -> None:
    pool, _ = started(pg_dsn, pools, 1)
    for _ in range(3):
        assert pool.query("SELECT 1").rows == [(1,)]
    m = pool.metrics()
    assert m["checkouts"] == 3 and m["queue_waits"] == 0
    # A connection that was idle is lent with a wait of 0.
    assert m["queue_wait"]["count"] == 3 and m["queue_wait"]["sum"] == 0.0
    assert m["queue_wait"]["buckets"][DEFAULT_BUCKETS[0]] == 3
    assert m["usage"]["count"] == 3


def test_a_caller_that_waited_counts_in_queue_waits_and_its_wait_is_observed(
    pg_dsn: str, pools: list[Pool], holders: list[Holder]
) -> None:
    pool, _ = started(pg_dsn, pools, 1)
    got: Recorder[str] = Recorder()
    with pool.checkout():
        holders.append(waiter := Holder(pool, "waiter", got))
        wait_for(lambda: gauges(pool)[1] == 1)
        queued_by = time.monotonic()
        time.sleep(0.05)  # the wait being measured, not synchronisation
        held_until = time.monotonic()
    got.wait_count(lambda n: n == "waiter", 1)
    waiter.finish()
    m = pool.metrics()
    assert m["checkouts"] == 2 and m["queue_waits"] == 1
    assert m["queue_wait"]["count"] == m["checkouts"]
    assert m["queue_wait"]["sum"] >= held_until - queued_by
    assert m["usage"]["count"] == 2


def test_queue_timeouts_and_deadlines_count_as_timeouts(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = started(pg_dsn, pools, 1)
    with pool.checkout():
        started_at = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            pool.query("SELECT 1", timeout=0.1)
        assert time.monotonic() - started_at >= 0.1
    assert info.value.reason == "queue_timeout"
    m = pool.metrics()
    assert (m["queue_timeouts"], m["deadlines"], m["timeouts"]) == (1, 0, 1)
    assert m["queue_waits"] == 1 and m["checkouts"] == 1
    assert gauges(pool) == (1, 0)

    # Holding past the checkout's deadline revokes the loan: a deadline.
    with pool.checkout(timeout=0.2) as conn:
        events.wait_count(kind("disconnected"), 1)
        with pytest.raises(ConnectionError) as revoked:
            conn.query("SELECT 1")
    assert revoked.value.reason == "deadline"
    m = pool.metrics()
    assert (m["queue_timeouts"], m["deadlines"], m["timeouts"]) == (1, 1, 2)


def test_queue_false_with_nothing_idle_counts_queue_disabled(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, _ = started(pg_dsn, pools, 1)
    assert pool.query("SELECT 1", queue=False).rows == [(1,)]  # idle: no queue needed
    with pool.checkout(), pytest.raises(ConnectionError) as info:
        pool.query("SELECT 1", queue=False)
    assert info.value.reason == "queue_disabled"
    m = pool.metrics()
    assert m["queue_disabled"] == 1
    assert m["queue_waits"] == 0 and m["queue_timeouts"] == 0 and m["checkouts"] == 2


def test_a_waiter_past_max_waiting_counts_queue_full(
    pg_dsn: str, pools: list[Pool], holders: list[Holder]
) -> None:
    pool, _ = started(pg_dsn, pools, 1, max_waiting=1)
    got: Recorder[str] = Recorder()
    with pool.checkout():
        holders.append(waiter := Holder(pool, "waiter", got))
        wait_for(lambda: gauges(pool)[1] == 1)
        with pytest.raises(ConnectionError) as info:
            pool.query("SELECT 1", timeout=5)
        assert info.value.reason == "queue_full"
        assert gauges(pool) == (0, 1)
    got.wait_count(lambda n: n == "waiter", 1)
    waiter.finish()
    m = pool.metrics()
    assert m["queue_full"] == 1 and m["queue_waits"] == 1 and m["checkouts"] == 2


def test_connects_count_every_connection_opened(pg_dsn: str, pools: list[Pool]) -> None:
    pool, _ = started(pg_dsn, pools, 3)
    m = pool.metrics()
    assert (m["connects"], m["connect_errors"], m["disconnects"], m["recycled"]) == (3, 0, 0, 0)


def test_connect_errors_count_failed_attempts_to_a_closed_port(
    pg_dsn: str, pools: list[Pool], recorded: Callable[[str, list[str]], Recorder[Telemetry]]
) -> None:
    failures = recorded("metrics-refused", ["connection_error"])
    pool = Pool.start(
        make_conninfo(pg_dsn, port=free_port(), connect_timeout=2),
        pool_size=1,
        name="metrics-refused",
        backoff_type="exp",
        backoff_min=0.02,
        backoff_max=0.02,
    )
    pools.append(pool)
    failures.wait_count(lambda t: "index" in t[2], 3)
    m = pool.metrics()
    assert m["connect_errors"] >= 3
    assert m["connects"] == 0 and m["ready_conn_count"] == 0
    # Nothing can connect: the circuit is open, so the call fails at once.
    with pytest.raises(ConnectionError) as info:
        pool.query("SELECT 1", timeout=5)
    assert info.value.reason == "unavailable"
    assert pool.metrics()["unavailable"] >= 1 and pool.health in ("open", "half_open")


def test_disconnect_all_then_a_checkout_cycle_counts_recycled_and_disconnects(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = started(pg_dsn, pools, 1)
    (first,) = pool.query("SELECT pg_backend_pid()").rows[0]
    pool.disconnect_all(0)
    assert pool.metrics()["disconnects"] == 0  # nothing happens before a checkin
    assert pool.query("SELECT pg_backend_pid()").rows == [(first,)]  # the old one, then recycled
    events.wait_count(kind("disconnected"), 1)
    events.wait_count(kind("connected"), 2)
    m = pool.metrics()
    assert (m["recycled"], m["disconnects"], m["connects"]) == (1, 1, 2)
    (second,) = pool.query("SELECT pg_backend_pid()").rows[0]
    assert second != first


# -- histograms ---------------------------------------------------------------


def test_usage_histogram_counts_checkins_and_buckets_a_long_hold(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, _ = started(pg_dsn, pools, 1)
    for _ in range(3):
        with pool.checkout():
            pass
    before = time.monotonic()
    with pool.checkout():
        time.sleep(0.2)  # the duration being measured, not synchronisation
    held = time.monotonic() - before
    usage = pool.metrics()["usage"]
    assert usage["count"] == 4
    assert 0.2 <= usage["sum"] <= held + 0.05
    buckets = usage["buckets"]
    assert list(buckets) == list(DEFAULT_BUCKETS)
    assert buckets[float("inf")] == 4
    assert buckets[0.1] == 3  # the three quick ones, not the long one
    # The long hold lands in the first bucket whose bound is >= its duration.
    bounds = list(DEFAULT_BUCKETS)
    first_full = next(i for i, b in enumerate(bounds) if buckets[b] == 4)
    assert bounds[first_full] >= 0.2 and bounds[first_full - 1] < held
    counts = [buckets[b] for b in bounds]
    assert counts == sorted(counts)  # cumulative


def test_queue_wait_histogram_counts_every_checkout(
    pg_dsn: str, pools: list[Pool], holders: list[Holder]
) -> None:
    pool, _ = started(pg_dsn, pools, 1)
    got: Recorder[str] = Recorder()
    pool.query("SELECT 1")
    with pool.checkout():
        holders.extend(Holder(pool, f"w{i}", got) for i in range(2))
        wait_for(lambda: gauges(pool)[1] == 2)
    got.wait_count(lambda n: True, 1)
    for holder in holders:
        holder.release.set()
    for holder in holders:
        holder.finish()
    m = pool.metrics()
    assert m["checkouts"] == 4
    assert m["queue_wait"]["count"] == m["checkouts"]
    assert m["queue_wait"]["buckets"][float("inf")] == 4
    assert m["usage"]["count"] == 4


# -- telemetry ----------------------------------------------------------------


def test_checkout_and_checkin_telemetry(
    pg_dsn: str, pools: list[Pool], holders: list[Holder],
    recorded: Callable[[str, list[str]], Recorder[Telemetry]],
) -> None:
    pool, _ = started(pg_dsn, pools, 2, name="metrics-telemetry")
    record = recorded("metrics-telemetry", ["checkout", "checkin"])
    with pool.checkout() as a, pool.checkout() as b:
        indices = {a.index, b.index}
    assert indices == {0, 1}
    seen = record.wait_count(lambda t: True, 4)
    checkouts = [t for t in seen if t[0] == "checkout"]
    checkins = [t for t in seen if t[0] == "checkin"]
    assert {t[2]["index"] for t in checkouts} == indices
    assert {t[2]["index"] for t in checkins} == indices
    assert all(t[2]["pool"] == "metrics-telemetry" for t in seen)
    assert all(t[1]["queue_time"] >= 0 for t in checkouts)
    assert all(t[1]["usage_time"] >= 0 for t in checkins)

    # A waiter's queue_time covers its wait; the holders' usage_time their hold.
    got: Recorder[str] = Recorder()
    with pool.checkout(), pool.checkout():
        holders.append(waiter := Holder(pool, "waiter", got))
        wait_for(lambda: gauges(pool)[1] == 1)
        time.sleep(0.1)  # the wait being measured, not synchronisation
    got.wait_count(lambda n: n == "waiter", 1)
    waiter.finish()
    later = record.wait_count(lambda t: True, 10)[4:]
    assert [t[0] for t in later].count("checkout") == 3
    assert [t[0] for t in later].count("checkin") == 3
    waiter_checkout = [t for t in later if t[0] == "checkout"][-1]
    assert waiter_checkout[1]["queue_time"] >= 0.1
    usage = sorted(t[1]["usage_time"] for t in later if t[0] == "checkin")
    assert usage[1] >= 0.1 and usage[2] >= 0.1  # the two holders


def test_a_raising_telemetry_handler_is_logged_and_checkout_still_works(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    pool, _ = started(pg_dsn, pools, 1, name="metrics-raising")
    calls: Recorder[str] = Recorder()

    def broken(event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
        if metadata.get("pool") == "metrics-raising":
            calls(event)
            raise RuntimeError(f"handler broke on {event}")

    telemetry.attach("test-pool-metrics-raising", ["checkout", "checkin"], broken)
    try:
        with caplog.at_level(logging.ERROR, logger="dbpool.telemetry"):
            with pool.checkout() as conn:
                assert conn.query("SELECT 42").rows == [(42,)]
            assert pool.query("SELECT 43").rows == [(43,)]
    finally:
        telemetry.detach("test-pool-metrics-raising")
    assert calls.values() == ["checkout", "checkin", "checkout", "checkin"]
    messages = [r.getMessage() for r in caplog.records if r.name == "dbpool.telemetry"]
    assert sum("raised on checkout" in m for m in messages) == 2
    assert sum("raised on checkin" in m for m in messages) == 2
    assert all(r.exc_info is not None for r in caplog.records if r.name == "dbpool.telemetry")
    m = pool.metrics()
    assert m["checkouts"] == 2 and m["usage"]["count"] == 2
    assert gauges(pool) == (1, 0)


def test_a_connection_lent_at_stop_is_announced_as_disconnected_at_checkin(pg_dsn: str) -> None:
    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start(pg_dsn, pool_size=1, connection_listeners=[events])
    events.wait_count(kind("connected"), 1)
    with pool.checkout():
        pool.stop()
        assert not [e for e in events.values() if e.kind == "disconnected"]
    events.wait_count(kind("disconnected"), 1)
    assert pool.metrics()["disconnects"] == 1
