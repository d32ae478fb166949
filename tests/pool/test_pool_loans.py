"""Deadlines and abandoned checkouts, on real PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from dbpool.errors import ConnectionError
from dbpool.pool import Pool
from dbpool.pool.connection import Connection
from tests.support.events import Recorder, kind
from tests.support.pools import start_named
from tests.support.server import backends, running_after


class LogRecorder(logging.Handler):
    """Records the messages of one logger, so that tests can wait for a line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: Recorder[str] = Recorder()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages(record.getMessage())


@pytest.fixture
def pool_log() -> Iterator[Recorder[str]]:
    handler = LogRecorder()
    logger = logging.getLogger("dbpool.pool")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def test_a_deadline_passed_mid_query_cancels_it_and_replaces_the_connection(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-deadline")
    began = time.monotonic()
    with (
        pytest.raises(ConnectionError, match=r"longer than its 0\.5s timeout") as info,
        pool.checkout(timeout=0.5) as conn,
    ):
        old_pid = conn.backend_pid
        conn.query("SELECT pg_sleep(30)")
    assert info.value.reason == "deadline"
    assert time.monotonic() - began < 5
    # The cancel follows the holder's wake-up (see Checkin.revoke): the server ends it.
    assert running_after(pg_dsn, "dbpool-deadline", "pg_sleep") == []
    events.wait_count(kind("connected"), 2)  # the slot got a fresh connection
    with pool.checkout() as conn:
        assert conn.backend_pid != old_pid
    assert old_pid not in backends(pg_dsn, "dbpool-deadline")  # the old session is gone
    assert pool.metrics()["deadlines"] == 1


def test_a_holder_past_its_deadline_loses_the_connection_to_others(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-overdue")
    with pool.checkout(timeout=0.3) as overdue:
        old_pid = overdue.backend_pid
        events.wait_count(kind("disconnected"), 1)  # revoked at its deadline
        # The one connection of the pool serves someone else meanwhile.
        with pool.checkout(timeout=5) as other:
            assert other.backend_pid not in (None, old_pid)
        with pytest.raises(ConnectionError) as info:
            overdue.query("SELECT 1")
        assert info.value.reason == "deadline"
        assert old_pid not in backends(pg_dsn, "dbpool-overdue")  # closed by that call
    assert pool.query("SELECT 1").rows == [(1,)]


def test_status_after_a_revoke_is_error_and_a_late_mark_does_not_reach_the_new_connection(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-late-mark")
    with pool.checkout(timeout=0.3) as overdue:
        events.wait_count(kind("connected"), 2)  # revoked; the slot has a new connection
        # As DBConnection's status: "error" for a connection lost, not an exception.
        assert overdue.status() == "error"
        # The overdue holder finds its connection unusable and marks it, late: the
        # slot's new connection, which another caller now holds, must not be the one
        # replaced at checkin.
        with pool.checkout(timeout=5) as other:
            new_pid = other.backend_pid
            overdue.mark_broken(RuntimeError("found broken after the revoke"))
        assert pool.query("SELECT pg_backend_pid()").rows == [(new_pid,)]
    assert pool.metrics()["disconnects"] == 1  # the revoked one only


def test_a_holder_blocked_on_a_silent_network_raises_at_its_deadline(
    pg_dsn: str, pools: list[Pool], fault_proxy: Any
) -> None:
    target = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    proxy = fault_proxy(str(target.get("host", "127.0.0.1")), int(target.get("port", 5432)))
    pool, _ = start_named(proxy.wrap_conninfo(pg_dsn), pools, "dbpool-blackholed")
    with pool.checkout(timeout=1.0) as conn:
        assert conn.query("SELECT 1").rows == [(1,)]
        proxy.blackhole(True)  # the query goes out; its answer never comes
        began = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            conn.query("SELECT 2")
        waited = time.monotonic() - began
    assert info.value.reason == "deadline"
    assert waited < 1.5, f"the holder was woken {waited:.2f}s into a 1s deadline"
    proxy.blackhole(False)
    assert pool.query("SELECT 3", timeout=10).rows == [(3,)]


def test_a_checkout_within_its_deadline_is_untouched(pg_dsn: str, pools: list[Pool]) -> None:
    pool, _ = start_named(pg_dsn, pools, "dbpool-in-time")
    with pool.checkout(timeout=2.0) as conn:
        assert conn.query("SELECT pg_sleep(0.3)").rowcount == 1
    assert pool.metrics()["deadlines"] == 0


def test_set_deadline_none_lets_a_holder_keep_its_connection_past_the_timeout(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, _ = start_named(pg_dsn, pools, "dbpool-kept")
    with pool.checkout(timeout=0.2) as conn:
        conn.set_deadline(None)  # a DB-API connection's hold: until it is checked in
        assert conn.query("SELECT pg_sleep(0.6)").rowcount == 1
        assert conn.query("SELECT 1").rows == [(1,)]
    assert pool.metrics()["deadlines"] == 0


def test_set_deadline_sooner_than_the_checkouts_wakes_the_watcher(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # The watcher's own sweeps are far apart: only the new deadline can wake it in time
    # to revoke a holder that sits idle (a running query would notice by itself).
    pool, events = start_named(pg_dsn, pools, "dbpool-sooner", idle_interval=30)
    with pool.checkout(timeout=60) as conn:
        watcher = conn._core.watcher
        swept = threading.Event()
        while watcher.wake_at == float("inf"):  # until it has seen the 60s loan
            swept.wait(0.01)
        conn.set_deadline(0.3)
        events.wait_count(kind("disconnected"), 1, timeout=5)  # revoked, replaced
        with pytest.raises(ConnectionError) as info:
            conn.query("SELECT 1")
    assert info.value.reason == "deadline"
    assert pool.metrics()["deadlines"] == 1


def test_a_garbage_collected_checkout_is_rolled_back_reclaimed_and_logged(
    pg_dsn: str, pools: list[Pool], pool_log: Recorder[str]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-gc")
    pool.query("CREATE TABLE IF NOT EXISTS dbpool_gc_leak (n int)")
    pool.query("TRUNCATE dbpool_gc_leak")

    def leak() -> int | None:
        conn = pool.checkout().__enter__()  # never exited
        conn.query("BEGIN")
        conn.query("INSERT INTO dbpool_gc_leak VALUES (1)")
        return conn.backend_pid

    leak_line = leak.__code__.co_firstlineno + 1
    pid = leak()  # the Connection is garbage now
    line = pool_log.wait_count(lambda m: "never checked in" in m, 1)[0]
    assert f"test_pool_loans.py:{leak_line} in leak()" in line
    assert "garbage-collected" in line
    with pool.checkout(timeout=2) as conn:
        assert conn.backend_pid == pid  # rolled back and reused, not replaced
        assert conn.status() == "idle"
        assert conn.query("SELECT count(*) FROM dbpool_gc_leak").rows == [(0,)]
    assert pool.metrics()["reclaimed"] == 1
    assert not [e for e in events.values() if e.kind == "disconnected"]


def test_a_checkout_whose_thread_ended_is_reclaimed(
    pg_dsn: str, pools: list[Pool], pool_log: Recorder[str]
) -> None:
    pool, _ = start_named(pg_dsn, pools, "dbpool-thread", idle_interval=0.1)
    kept: list[Connection] = []  # keeps the Connection alive: only the thread dies

    def worker() -> None:
        kept.append(pool.checkout().__enter__())

    thread = threading.Thread(target=worker, name="leaky-worker")
    thread.start()
    thread.join()
    line = pool_log.wait_count(lambda m: "never checked in" in m, 1)[0]
    assert "'leaky-worker'" in line and "its thread ended" in line
    assert f"test_pool_loans.py:{worker.__code__.co_firstlineno + 1} in worker()" in line
    assert pool.query("SELECT 1", timeout=2).rows == [(1,)]
    with pytest.raises(ConnectionError, match="outdated"):
        kept[0].query("SELECT 1")


def test_an_abandoned_checkout_whose_driver_state_was_taken_is_replaced(
    pg_dsn: str, pools: list[Pool], pool_log: Recorder[str]
) -> None:
    # A framework (SQLAlchemy, Django) drives the psycopg connection itself: what it
    # changed (autocommit, cursor class, adapters, SET...) is unknown to the pool.
    pool, events = start_named(pg_dsn, pools, "dbpool-exposed", idle_interval=0.1)
    kept: list[Connection] = []

    def worker() -> None:
        conn = pool.checkout().__enter__()
        kept.append(conn)
        raw = conn.driver_state.conn
        raw.autocommit = False
        raw.execute("SET application_name = 'changed-by-the-holder'")

    thread = threading.Thread(target=worker, name="framework-worker")
    thread.start()
    thread.join()
    old_pid = kept[0].backend_pid
    pool_log.wait_count(lambda m: "never checked in" in m and "replacing it" in m, 1)
    events.wait_count(kind("connected"), 2)
    with pool.checkout(timeout=2) as conn:
        assert conn.backend_pid != old_pid
        assert conn.driver_state.conn.autocommit is True
        assert conn.query("SHOW application_name").rows == [("dbpool-exposed",)]


def test_a_reclaimed_connection_that_cannot_roll_back_is_replaced(
    pg_dsn: str, pools: list[Pool], pool_log: Recorder[str]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-gc-broken")

    def leak() -> int | None:
        conn = pool.checkout().__enter__()
        pid = conn.backend_pid
        conn.query("BEGIN")
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return pid

    pid = leak()
    pool_log.wait_count(lambda m: "never checked in" in m and "replacing it" in m, 1)
    events.wait_count(kind("connected"), 2)
    with pool.checkout(timeout=2) as conn:
        assert conn.backend_pid != pid
