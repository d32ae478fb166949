"""``Pool.resize``: the pool's size changes while it runs (issue 18's live reload).

Against the real PostgreSQL, counting the pool's backends by their
application_name: growing opens connections, shrinking closes the idle ones
past the size at once and a lent one only when it is checked in (its work is
not interrupted), and the pool serves throughout.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from dbpool.errors import ConfigurationError
from dbpool.pool import Pool
from tests.support.events import wait_for


@pytest.fixture
def name() -> str:
    return f"resize-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pool(pg_dsn: str, name: str) -> Iterator[Pool]:
    with Pool.start(f"{pg_dsn} application_name={name}", pool_size=2, name=name,
                    idle_interval=0.2) as started:
        yield started


def backends(pg_dsn: str, name: str) -> int:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           [name]).fetchone()
    assert row is not None
    return int(row[0])


def up(pool: Pool) -> int:
    connections = pool.metrics()["connections"]
    return int(connections["idle"] + connections["in_use"])


def test_grow_then_shrink_past_a_lent_connection_then_grow_again(
    pool: Pool, pg_dsn: str, name: str
) -> None:
    wait_for(lambda: backends(pg_dsn, name) == 2, 10, "two connections")
    pool.resize(4)
    wait_for(lambda: backends(pg_dsn, name) == 4 and up(pool) == 4, 10, "four connections")
    assert pool.metrics()["pool_size"] == 4
    with pool.checkout() as held:
        held.query("SELECT 1")
        pool.resize(1)
        # The others close; the lent one stays until it is checked in, and works.
        wait_for(lambda: backends(pg_dsn, name) <= 2, 10, "the idle ones to close")
        assert held.query("SELECT 2").rows == [(2,)]
        assert pool.metrics()["pool_size"] == 1
    wait_for(lambda: backends(pg_dsn, name) == 1 and up(pool) == 1, 10, "one connection")
    assert pool.query("SELECT 3").rows == [(3,)]
    pool.resize(3)
    wait_for(lambda: backends(pg_dsn, name) == 3 and up(pool) == 3, 10, "three again")
    for _ in range(10):
        assert pool.query("SELECT 4").rows == [(4,)]


def test_shrink_and_grow_back_at_once(pool: Pool, pg_dsn: str, name: str) -> None:
    wait_for(lambda: up(pool) == 2, 10, "two connections")
    pool.resize(1)
    pool.resize(2)  # index 1 may still be closing: it stays rather than doubling
    wait_for(lambda: backends(pg_dsn, name) == 2 and up(pool) == 2, 10, "two connections")
    assert pool.query("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_a_bad_size_is_refused(pool: Pool, size: object) -> None:
    with pytest.raises(ConfigurationError):
        pool.resize(size)  # type: ignore[arg-type]
