"""PgConnection: a ROLLBACK sent without waiting for its answer, read by the
connection's next use (psycopg's, or the pool's checkout and ping)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import pq

from dbpool.driver import Disconnect, Ok
from dbpool.pgdriver import PgDriver, PgState
from tests.support.faultproxy import ProxyFactory
from tests.support.server import advisory_lock_free

driver = PgDriver()
LOCK = 640_771


@pytest.fixture
def state(pg_dsn: str) -> Iterator[PgState]:
    s = driver.connect({"conninfo": pg_dsn, "pool_index": 0})
    yield s
    driver.disconnect(None, s)


def _holding_lock(state: PgState) -> None:
    state.conn.execute("BEGIN")
    state.conn.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK])


def test_the_rollback_ends_the_transaction_before_anyone_reads_its_answer(
    state: PgState, pg_dsn: str
) -> None:
    _holding_lock(state)
    state.conn.rollback_unawaited()
    assert state.conn.rollback_pending
    assert advisory_lock_free(pg_dsn, LOCK)  # released by the server, unread by us
    assert state.conn.rollback_pending


def test_psycopg_reads_the_answer_before_its_next_operation(state: PgState) -> None:
    conn = state.conn
    _holding_lock(state)
    conn.rollback_unawaited()
    assert conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE
    assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    assert not conn.rollback_pending
    assert conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
    conn.execute("BEGIN")
    conn.rollback_unawaited()
    conn.autocommit = False  # psycopg's setter checks the status: after the answer
    assert not conn.rollback_pending
    conn.autocommit = True


def test_the_pool_sees_it_idle_and_its_checkout_and_ping_read_the_answer(
    state: PgState,
) -> None:
    for read_by in (driver.checkout, driver.ping):
        state.conn.execute("BEGIN")
        state.conn.rollback_unawaited()
        assert driver.handle_status({}, state) == Ok("idle")  # at checkin: as it will be
        assert state.conn.rollback_pending
        assert read_by(state) == Ok(None)
        assert not state.conn.rollback_pending
        assert state.conn.pgconn.transaction_status == pq.TransactionStatus.IDLE


def test_prepared_statements_are_forgotten_as_psycopg_forgets_them(state: PgState) -> None:
    conn = state.conn
    conn.execute("BEGIN")
    conn.execute("SELECT %s::int", [1], prepare=True)
    assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (1,)
    conn.rollback_unawaited()
    # As after psycopg's own rollback: its cache is emptied, the server's too.
    assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    assert conn.execute("SELECT %s::int", [2], prepare=True).fetchone() == (2,)


def test_where_psycopg_has_more_to_do_it_is_psycopg_s_rollback(state: PgState) -> None:
    conn = state.conn
    conn.rollback_unawaited()  # no transaction: nothing to do, nothing sent
    assert not conn.rollback_pending
    with conn.transaction(), pytest.raises(psycopg.ProgrammingError, match="rollback"):
        conn.rollback_unawaited()
    assert not conn.rollback_pending


def test_an_answer_that_never_comes_fails_the_checkout_at_its_deadline(
    pg_dsn: str, fault_proxy: ProxyFactory
) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    proxy = fault_proxy(str(params.get("host", "127.0.0.1")), int(params.get("port", 5432)))
    state = driver.connect({"conninfo": proxy.wrap_conninfo(pg_dsn), "pool_index": 0,
                            "ping_timeout": 0.3})
    try:
        state.conn.execute("BEGIN")
        proxy.blackhole(True)
        state.conn.rollback_unawaited()
        started = time.monotonic()
        outcome = driver.checkout(state)
        assert isinstance(outcome, Disconnect)
        assert "ROLLBACK" in str(outcome.error)
        assert time.monotonic() - started < 3
    finally:
        proxy.blackhole(False)
        driver.disconnect(None, state)
