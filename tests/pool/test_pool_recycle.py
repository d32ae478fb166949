"""Recycling on real PostgreSQL: disconnect_all, its periodic form, and max_lifetime."""

from __future__ import annotations

from typing import Any

import pytest

from dbpool.errors import ConfigurationError
from dbpool.pool import Pool
from tests.support.events import kind
from tests.support.pools import start_named
from tests.support.server import backends


def test_disconnect_all_replaces_every_idle_connection_staggered(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-flush", 4, idle_interval=0.05)
    old = set(backends(pg_dsn, "dbpool-flush"))
    assert len(old) == 4
    pool.disconnect_all(0.6)
    events.wait_count(kind("connected"), 8)
    new = {e.backend_pid for e in events.values()[4:] if e.kind == "connected"}
    assert len(new) == 4 and not new & old
    assert set(backends(pg_dsn, "dbpool-flush")) == new  # the old sessions are gone
    gone = events.times(kind("disconnected"))
    assert max(gone) - min(gone) >= 0.25  # spread over the interval, not all at once
    assert pool.metrics()["recycled"] == 4
    # Connections made after the call are left alone.
    with pool.checkout() as conn:
        assert conn.backend_pid in new


def test_disconnect_all_replaces_a_busy_connection_at_checkin(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-flush-busy", 1, idle_interval=60)
    with pool.checkout() as conn:
        old_pid = conn.backend_pid
        pool.disconnect_all(0)
        assert conn.query("SELECT 1").rows == [(1,)]  # a loan is never cut short
    events.wait_count(kind("connected"), 2)
    with pool.checkout() as conn:
        assert conn.backend_pid != old_pid


def test_disconnect_all_every_flushes_periodically(pg_dsn: str, pools: list[Pool]) -> None:
    _, events = start_named(pg_dsn, pools, "dbpool-periodic", 2, idle_interval=0.05,
                      disconnect_all_every=0.3, disconnect_all_interval=0.1)
    connected = events.wait_count(kind("connected"), 6, timeout=10)  # two flushes
    assert len({e.backend_pid for e in connected}) == 6


def test_max_lifetime_replaces_each_connection_after_a_jittered_lifetime(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "dbpool-lifetime", 4, idle_interval=0.02,
                         max_lifetime=(0.3, 0.9))
    events.wait_until(  # every connection retired at least once
        lambda vs: {e.index for e in vs if e.kind == "disconnected"} == {0, 1, 2, 3}, timeout=10)
    values = events.values()
    lifetimes = []
    for index in range(4):
        born = next(t for t, e in events.items if e.kind == "connected" and e.index == index)
        died = next(t for t, e in events.items if e.kind == "disconnected" and e.index == index)
        lifetimes.append(died - born)
    assert all(0.3 <= life <= 3.0 for life in lifetimes), lifetimes  # 0.9 + sweep delays
    assert max(lifetimes) - min(lifetimes) > 0.02, lifetimes  # jittered, not in lockstep
    assert all(e.reason and "max_lifetime" in e.reason for e in values if e.kind == "disconnected")
    assert pool.query("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize("bad", [(0, 1), (2, 1), "soon", (1,)])
def test_max_lifetime_must_be_a_range(pg_dsn: str, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_lifetime"):
        Pool.start(pg_dsn, max_lifetime=bad)
