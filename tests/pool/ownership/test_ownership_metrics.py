"""``connection_metrics()`` and ``disconnect_all`` of an ownership pool on real PostgreSQL:
ports of db_connection's ``integration_test/ownership/metrics_test.exs`` and
``disconnect_all_test.exs``.

The scripted driver's ``receive :continue`` is a :class:`~tests.support.ownership.Gate`:
the statement waits on an advisory lock until the test opens it.  The
driver's record (``connect: [_]`` and no more) is the pool's connection
events: one ``connected`` and no reconnect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from dbpool.actors.listeners import ConnectionEvent
from dbpool.pool import Pool
from tests.support.events import Recorder
from tests.support.ownership import (
    Gate,
    PeerFactory,
    events_of,
    gauges,
    start_pool,
    wait_for,
)

GateFactory = Callable[[], Gate]


@pytest.fixture
def gates(pg_dsn: str) -> Iterator[GateFactory]:
    """``make() -> Gate``: closed gates, all opened and closed at teardown."""
    made: list[Gate] = []

    def make() -> Gate:
        made.append(Gate(pg_dsn))
        return made[-1]

    try:
        yield make
    finally:
        for g in made:
            g.close()


def poll(pool: Pool, expected: list[tuple[str, int, int]]) -> None:
    """The Elixir tests' ``poll``: wait until the metrics are ``(source, ready, queued)``."""
    try:
        wait_for(lambda: gauges(pool) == expected)
    except AssertionError:
        assert gauges(pool) == expected  # show the difference
        raise


def one_connect(events: Recorder[ConnectionEvent]) -> None:
    """``assert [connect: [_], ...] = A.record(agent)``: no connection was replaced."""
    assert [e.kind for e in events.values()] == ["connected"]


IDLE = [("pool", 1, 0)]
OWNED_IDLE = [("pool", 0, 0), ("proxy", 1, 0)]
OWNED_BUSY = [("pool", 0, 0), ("proxy", 0, 0)]


def test_starts_without_proxy_entries(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports metrics_test.exs: 'starts without proxy processes'."""
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto", name="metrics")
    poll(pool, IDLE)
    assert pool.connection_metrics() == [
        {"source": ("pool", "metrics"), "ready_conn_count": 1, "checkout_queue_length": 0}]
    one_connect(events)


# -- ownership_mode="manual" ----------------------------------------------------


def test_manual_mode_considers_a_manual_checkin_and_checkout(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports metrics_test.exs (manual mode): 'considers a manual checkin and checkout'."""
    pool, events = start_pool(pg_dsn, pools)
    poll(pool, IDLE)
    assert pool.ownership_checkout() == "ok"
    poll(pool, OWNED_IDLE)
    [proxy] = pool.connection_metrics()[1:]
    assert proxy["owner"].startswith("thread 'MainThread'")
    assert pool.ownership_checkin() == "ok"
    poll(pool, IDLE)
    one_connect(events)


def test_manual_mode_considers_a_query_in_progress(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory, gates: GateFactory
) -> None:
    """Ports metrics_test.exs (manual mode): 'considers a query in progress'."""
    pool, events = start_pool(pg_dsn, pools)
    gate = gates()
    poll(pool, IDLE)
    assert pool.ownership_checkout() == "ok"
    parent = threading.current_thread()

    query = peers("query").send(lambda: pool.query(gate.sql, caller=parent))
    poll(pool, OWNED_BUSY)
    gate.open()  # :continue
    query.result(10)
    poll(pool, OWNED_IDLE)
    assert pool.ownership_checkin() == "ok"
    poll(pool, IDLE)
    one_connect(events)


# -- ownership_mode="auto" --------------------------------------------------------


def test_auto_mode_implicitly_checks_out_and_considers_a_manual_checkin(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory, gates: GateFactory
) -> None:
    """Ports metrics_test.exs (auto mode): 'implicitly checkouts and considers a manual
    checkin'."""
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")
    gate = gates()
    poll(pool, IDLE)

    def query_then_checkin() -> str:
        pool.query(gate.sql)
        return pool.ownership_checkin()

    query = peers("query").send(query_then_checkin)
    poll(pool, OWNED_BUSY)
    gate.open()
    assert query.result(10) == "ok"
    poll(pool, IDLE)
    one_connect(events)


def test_auto_mode_implicitly_checks_out_and_checks_in_when_the_owner_exits(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory, gates: GateFactory
) -> None:
    """Ports metrics_test.exs (auto mode): 'implicitly checkouts and checkins in case the
    proxy dies' (its owner, the querying thread, ends)."""
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")
    gate = gates()
    poll(pool, IDLE)

    query = peers("query")
    running = query.send(lambda: pool.query(gate.sql))
    poll(pool, OWNED_BUSY)
    gate.open()
    running.result(10)
    poll(pool, OWNED_IDLE)  # the thread still lives: it keeps its connection
    query.exit()
    poll(pool, IDLE)
    one_connect(events)


def test_auto_mode_implicitly_checks_out_and_enqueues_when_the_proxy_is_busy(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory, gates: GateFactory
) -> None:
    """Ports metrics_test.exs (auto mode): 'implicitly checkouts and enqueues in case the
    proxy is busy'."""
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")
    gate_1, gate_2 = gates(), gates()
    poll(pool, IDLE)
    parent = threading.current_thread()

    query_1 = peers("query_1").send(lambda: pool.query(gate_1.sql, caller=parent))
    poll(pool, OWNED_BUSY)
    query_2 = peers("query_2").send(lambda: pool.query(gate_2.sql, caller=parent))
    poll(pool, [("pool", 0, 0), ("proxy", 0, 1)])

    gate_1.open()
    query_1.result(10)
    poll(pool, OWNED_BUSY)  # query_2 has the connection now
    wait_for(gate_2.waiting)
    gate_2.open()
    query_2.result(10)
    poll(pool, OWNED_IDLE)

    # Both ran on the parent's connection: it is the parent's to check in.
    assert pool.ownership_checkin() == "ok"
    poll(pool, IDLE)
    one_connect(events)


# -- disconnect_all_test.exs ------------------------------------------------------


def test_disconnect_all_disconnects_on_checkin(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports disconnect_all_test.exs: 'disconnect on checkin'.

    An owned connection outlives ``disconnect_all`` until its owner checks
    it in; then it is replaced, with a disconnect_all reason.
    """
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")

    def pid() -> int:
        value: int = pool.query("SELECT pg_backend_pid()").rows[0][0]
        return value

    first = pid()
    pool.disconnect_all(0)
    assert pid() == first
    assert pid() == first

    assert pool.ownership_checkin() == "ok"
    second = pid()
    assert second != first
    assert pid() == second

    [disconnected] = events_of(events, "disconnected")
    assert disconnected.backend_pid == first
    assert "disconnect_all" in (disconnected.reason or "")
    assert [(e.kind, e.backend_pid) for e in events.values()] == [
        ("connected", first), ("disconnected", first), ("connected", second)]
