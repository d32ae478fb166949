"""Owned connections that end under their clients, and the manager's life with its pool,
on real PostgreSQL: ports of db_connection's ``integration_test/ownership/owner_test.exs``
and ``shutdown_test.exs``.

The Elixir tests read the scripted driver's record (connect, disconnect,
connect); these read the pool's connection events and ``pg_backend_pid()``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable

import pytest

from dbpool.errors import ConnectionError, PoolStoppedError
from dbpool.pool import Pool
from tests.support.ownership import (
    Gate,
    PeerFactory,
    assert_checked_out,
    backend_alive,
    events_of,
    kind,
    proxies,
    refute_checked_out,
    start_pool,
    terminate_backend,
    wait_for,
)


def test_reconnects_when_owner_exits_during_a_client_checkout(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Ports owner_test.exs: 'reconnects when owner exits during a client checkout'.

    The client's connection is taken from it and replaced; the log names the
    owner that exited, the client still using the connection and where it
    checked it out.
    """
    caplog.set_level(logging.DEBUG, logger="dbpool.ownership")
    caplog.set_level(logging.WARNING, logger="dbpool.pool")
    pool, events = start_pool(pg_dsn, pools)
    parent = threading.current_thread()
    owner = peers("owner")
    assert owner.call(pool.ownership_checkout) == "ok"
    assert owner.call(lambda: pool.ownership_allow(owner.thread, parent)) == "ok"

    with pool.checkout() as conn:
        pid = conn.backend_pid
        owner.exit()
        events.wait_count(kind("connected"), 2)  # :reconnected
        with pytest.raises(ConnectionError, match="exited"):
            conn.query("SELECT 1")

    assert re.search(rf"owner thread 'owner' \({owner.thread.ident}\) exited", caplog.text)
    assert ("the connection was taken from its client, thread 'MainThread', checked out at "
            f"{__file__}:") in caplog.text
    assert "still using it at:" in caplog.text
    assert [(e.kind, e.backend_pid) for e in events.values()][:2] == [
        ("connected", pid), ("disconnected", pid)]
    wait_for(lambda: not backend_alive(pg_dsn, pid or 0))


def test_reconnects_when_ownership_times_out(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Ports owner_test.exs: 'reconnects when ownership times out'.

    The owner's connection is disconnected while it uses it, the log says
    where it was checked out, and another caller (auto mode) gets the new one.
    """
    caplog.set_level(logging.WARNING, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")
    worker = peers("worker")

    checkout_line = sys._getframe().f_lineno + 1
    assert pool.ownership_checkout(ownership_timeout=0.3) == "ok"
    with pool.checkout() as conn:
        pid = conn.backend_pid
        events.wait_count(kind("connected"), 2)  # :reconnected
        assert worker.call(lambda: pool.query("SELECT 'result'").rows) == [("result",)]
        with pytest.raises(ConnectionError, match="timed out"):
            conn.query("SELECT 1")

    assert re.search(
        r"owner thread 'MainThread' \(\d+\) timed out because it owned the connection for "
        r"longer than 0.3s \(set via the ownership_timeout option\); it was checked out at "
        + re.escape(f"{__file__}:{checkout_line} in test_reconnects_when_ownership_times_out"),
        caplog.text)
    assert [(e.kind, e.backend_pid) for e in events.values()][:2] == [
        ("connected", pid), ("disconnected", pid)]


def test_ownership_timeout_disconnects_even_without_a_client(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    """Follows owner_test.exs: 'reconnects when ownership times out', with the connection
    idle: DBConnection's proxy disconnects on an ownership timeout "even if there is no
    client", rather than checking the connection in."""
    caplog.set_level(logging.WARNING, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools)
    assert pool.ownership_checkout(ownership_timeout=0.2) == "ok"
    pid = assert_checked_out(pool)

    events.wait_count(kind("connected"), 2)
    assert [e.backend_pid for e in events_of(events, "disconnected")] == [pid]
    assert "longer than 0.2s (set via the ownership_timeout option)" in caplog.text
    refute_checked_out(pool)  # the ownership ended
    assert pool.ownership_checkout(timeout=5) == "ok"
    assert assert_checked_out(pool) != pid


def test_reconnects_when_client_times_out_through_owner(
    pg_dsn: str, pools: list[Pool], gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """Ports owner_test.exs: 'reconnects when client times out through owner'.

    A client past its checkout deadline has its statement cancelled and its
    connection replaced, and the ownership ends, as DBConnection's proxy
    shuts down.
    """
    caplog.set_level(logging.WARNING, logger="dbpool.pool")
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")
    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)

    with pool.checkout(timeout=0.2) as conn, pytest.raises(ConnectionError) as info:
        conn.query(gate.sql)
    assert info.value.reason == "deadline"
    assert "longer than its 0.2s timeout" in caplog.text  # Elixir: ~r"timed out"

    events.wait_count(kind("connected"), 2)
    assert [e.backend_pid for e in events_of(events, "disconnected")] == [pid]
    wait_for(lambda: proxies(pool) == [])
    assert pool.ownership_checkin() == "not_found"
    assert pool.ownership_checkout(timeout=5) == "ok"
    assert assert_checked_out(pool) != pid


# Ports owner_test.exs: 'ignores a late deadline timer for a previous holder'.
# Not ported: DBConnection's proxy learns of a client's deadline by a timer
# message that may arrive after the holder changed.  dbpool has no such message:
# deadlines are checked by the loan watcher against the live loan it claims
# (Loan.take), so a stale timer cannot exist.


# -- shutdown_test.exs -------------------------------------------------------------


def test_pool_stop_stops_the_manager(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports shutdown_test.exs: 'pool shutdowns with manager'.

    In DBConnection the ownership pool is the manager, linked to its inner
    pool; here stopping the pool stops its manager, which ends every
    ownership, and the owned connections are closed.
    """
    pool, events = start_pool(pg_dsn, pools, size=2)
    owner = peers("owner")
    assert owner.call(pool.ownership_checkout) == "ok"
    owned = owner.call(lambda: assert_checked_out(pool))

    pool.stop()

    assert not pool.alive and pool.exit_error is None
    assert proxies(pool) == []
    assert owned in [e.backend_pid for e in events_of(events, "disconnected")]
    wait_for(lambda: not backend_alive(pg_dsn, owned))


def test_manager_stops_with_the_pool(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports shutdown_test.exs: 'manager shutdowns with pool'.

    The Elixir test kills the inner pool and sees the manager exit.  Here
    the pool stops on its own (a connection fails and ``backoff_type`` is
    "stop") and takes its manager with it: the ownership ends.
    """
    pool, events = start_pool(pg_dsn, pools, backoff_type="stop")
    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)
    terminate_backend(pg_dsn, pid)
    wait_for(lambda: not backend_alive(pg_dsn, pid))
    with pytest.raises(ConnectionError, match="connection lost"):
        pool.run(lambda conn: conn.query("SELECT 1"))

    assert pool.wait_stopped(5)
    assert isinstance(pool.exit_error, PoolStoppedError)
    assert proxies(pool) == []  # the manager ended the ownership as it stopped
    assert [e.backend_pid for e in events_of(events, "disconnected")] == [pid]


@pytest.mark.parametrize("mode", ["manual", "auto"])
def test_calls_after_stop_raise_pool_stopped_error(
    pg_dsn: str, pools: list[Pool], mode: str
) -> None:
    """Follows shutdown_test.exs: once the pool (and so its manager) has stopped, every
    call says so with the error a stopped pool raises, as a plain pool's calls do."""
    pool, _ = start_pool(pg_dsn, pools, ownership_mode=mode)
    assert pool.ownership_checkout() == "ok"
    pool.stop()
    me = threading.current_thread()
    calls: dict[str, Callable[[], object]] = {
        "ownership_checkout": pool.ownership_checkout,
        "ownership_checkin": pool.ownership_checkin,
        "ownership_allow": lambda: pool.ownership_allow(me, me),
        "ownership_mode": lambda: pool.ownership_mode("manual"),
    }
    if mode == "auto":  # in manual mode a caller with no connection gets OwnershipError
        calls["query"] = lambda: pool.query("SELECT 1")
    wrong = {}
    for name, call in calls.items():
        try:
            call()
        except PoolStoppedError:
            continue
        except Exception as exc:
            wrong[name] = f"{type(exc).__module__}.{type(exc).__name__}"
        else:
            wrong[name] = "no error"
    assert wrong == {}
