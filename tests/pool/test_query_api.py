"""The query API on real PostgreSQL: transactions, run, prepared statements, streams, logs.

Scenarios follow db_connection's integration_test/cases (transaction_test,
execute_test, prepare_execute_test, close_test, stream_test), in Python form.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from dbpool.errors import ConnectionError, RolledBack, TransactionError
from dbpool.pool import Pool
from dbpool.pool.connection import Connection
from dbpool.pool.logentry import LogEntry
from tests.support.pools import start_named


def count(pool: Pool, table: str) -> int:
    return int(pool.query(f"SELECT count(*) FROM {table}").rows[0][0])


def test_transaction_commits_on_success_and_returns_the_result(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-commit")

    def work(conn: Connection) -> str:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        assert conn.status() == "transaction"
        return "done"

    assert pool.transaction(work) == "done"
    with pool.transaction() as conn:
        conn.query(f"INSERT INTO {table} VALUES (2)")
    assert count(pool, table) == 2


def test_an_exception_rolls_back_and_is_reraised(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-raise")
    with pytest.raises(KeyError), pool.transaction() as conn:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        raise KeyError("boom")
    assert count(pool, table) == 0
    assert pool.status() == "idle"


def test_rollback_raises_rolled_back_with_the_reason(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-rollback")

    def work(conn: Connection) -> None:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        conn.rollback("changed my mind")

    with pytest.raises(RolledBack) as info:
        pool.transaction(work)
    assert info.value.reason == "changed my mind"
    assert count(pool, table) == 0
    # The next transaction works (db_connection: "rollback returns error").
    pool.transaction(lambda conn: conn.query(f"INSERT INTO {table} VALUES (2)"))
    assert count(pool, table) == 1


def test_an_inner_rollback_fails_the_outer_transaction(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-nested")
    pids: list[int | None] = []

    def outer(conn: Connection) -> None:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        pids.append(conn.backend_pid)
        # A pass-through on the same connection:
        with pytest.raises(RolledBack) as inner, pool.transaction() as nested:
            pids.append(nested.backend_pid)
            nested.rollback("inner")
        assert inner.value.reason == "inner"
        # Every later call but close raises "transaction rolling back".
        with pytest.raises(ConnectionError, match="transaction rolling back"):
            conn.query("SELECT 1")

    with pytest.raises(RolledBack) as outer_info:
        pool.transaction(outer)
    assert outer_info.value.reason == "rollback"
    assert pids[0] == pids[1]
    assert count(pool, table) == 0


def test_an_inner_exception_fails_the_outer_transaction_even_if_caught(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-nested-raise")
    with pytest.raises(RolledBack) as info, pool.transaction() as conn:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(ValueError), conn.transaction():
            raise ValueError("inner")
    assert info.value.reason == "rollback"
    assert count(pool, table) == 0


def test_a_sql_error_inside_a_transaction_keeps_the_connection_and_ends_in_rollback(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, events = start_named(pg_dsn, pools, "q-sqlerr")
    with pytest.raises(RolledBack), pool.transaction() as conn:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(psycopg.errors.DivisionByZero) as err:
            conn.query("SELECT 1/0")
        assert err.value.sqlstate == "22012"
        assert conn.status() == "error"
    assert count(pool, table) == 0
    # Outside a transaction a SQL error leaves the connection idle and in service.
    with pytest.raises(psycopg.errors.UndefinedTable):
        pool.query("SELECT * FROM no_such_table_here")
    assert pool.status() == "idle"
    assert [e.kind for e in events.values()] == ["connected"]


def test_begin_on_a_connection_already_in_a_transaction_is_a_transaction_error(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-begin")
    with pool.checkout() as conn:
        conn.query("BEGIN")
        with pytest.raises(TransactionError) as info, conn.transaction():
            pass
    assert info.value.status == "transaction"
    assert "transaction is already started" in str(info.value)
    assert pool.query("SELECT 1").rows == [(1,)]


def test_rollback_outside_a_transaction_raises(pg_dsn: str, pools: list[Pool]) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-rb-outside")
    with pool.checkout() as conn, pytest.raises(TransactionError, match="not inside transaction"):
        conn.rollback()


def test_run_disconnects_a_connection_left_in_a_transaction(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "q-run")
    assert pool.run(lambda conn: conn.query("SELECT 7").rows) == [(7,)]
    with pytest.raises(ConnectionError,
                       match="checked out with status 'idle' but it was checked in with "
                             "status 'transaction'"):
        pool.run(lambda conn: conn.query("BEGIN"))
    events.wait_count(lambda e: e.kind == "disconnected", 1)
    assert pool.query("SELECT 1").rows == [(1,)]


def test_a_transaction_inside_run_uses_the_same_connection(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-run-tx", size=2)

    def work(conn: Connection) -> tuple[Any, Any]:
        inner = pool.transaction(lambda tx: tx.backend_pid)
        return conn.backend_pid, inner

    outer_pid, inner_pid = pool.run(work)
    assert outer_pid == inner_pid


def test_prepared_statements_are_reused_and_reprepared_after_a_reconnect(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, events = start_named(pg_dsn, pools, "q-prepare")
    with pool.checkout() as conn:
        query = conn.prepare("add_one", "SELECT $1::int + 1")
        assert conn.execute(query, [1]).rows == [(2,)]
        assert conn.execute(query, [41]).rows == [(42,)]
        pid = conn.backend_pid
    pool.disconnect_all()
    pool.query("SELECT 1")  # checkin after disconnect_all replaces the connection
    events.wait_count(lambda e: e.kind == "connected", 2)
    with pool.checkout() as conn:
        assert conn.backend_pid != pid
        assert conn.execute(query, [9]).rows == [(10,)]  # prepared again on the new one
        conn.close_prepared(query)
        statements = conn.query("SELECT name FROM pg_prepared_statements").rows
        assert ("add_one",) not in statements
    prepared, result = pool.prepare_execute("twice", "SELECT $1::int * 2", [21])
    assert result.rows == [(42,)] and prepared.name == "twice"


def test_a_stream_reads_in_batches_and_closes_its_cursor_when_stopped_early(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-stream")
    with pool.transaction() as conn:
        batches = [len(b.rows) for b in conn.stream("SELECT generate_series(1, 1234)",
                                                     max_rows=500)]
        assert batches == [500, 500, 234]
        stream = conn.stream("SELECT generate_series(1, 10000)", max_rows=100)
        for i, _batch in enumerate(stream):
            assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(1,)]
            if i == 2:
                break
        stream.close()
        assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(0,)]
    assert sum(len(b.rows) for b in pool.stream("SELECT generate_series(1, 777)")) == 777


def test_a_stream_outside_a_transaction_is_refused(pg_dsn: str, pools: list[Pool]) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-stream-notx")
    with pool.checkout() as conn, pytest.raises(TransactionError, match="needs a transaction"):
        list(conn.stream("SELECT 1"))


def test_log_entries_describe_each_call_and_a_raising_log_is_harmless(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    entries: list[LogEntry] = []
    pool, _ = start_named(pg_dsn, pools, "q-log", log=entries.append)
    pool.query("SELECT %s::int", [5])
    with pytest.raises(RolledBack), pool.transaction() as conn:
        conn.query("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.query("SELECT 1/0")
    calls = [(e.call, e.ok) for e in entries]
    assert calls == [("query", True), ("begin", True), ("query", True), ("query", False),
                     ("rollback", True)]
    first = entries[0]
    assert first.query == "SELECT %s::int" and first.params == [5]
    assert first.result.rows == [(5,)]
    assert first.pool_time is not None and first.pool_time >= 0
    assert first.idle_time is not None and first.connection_time > 0
    assert first.decode_time is not None and first.decode_time >= 0
    assert entries[1].pool_time is not None and entries[2].pool_time is None
    assert isinstance(entries[3].error, psycopg.errors.DivisionByZero)

    def broken_log(entry: LogEntry) -> None:
        raise RuntimeError("log failed")

    assert pool.query("SELECT 3", log=broken_log).rows == [(3,)]
    assert any("log callable" in r.getMessage() for r in caplog.records)


def test_a_statement_whose_session_was_terminated_is_retried_on_another_connection(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-retry", size=2)
    with pool.checkout() as a, pool.checkout() as b:
        pids = [a.backend_pid, b.backend_pid]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for pid in pids:  # the server ends both idle sessions
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # Each attempt finds a dead session; the third runs on a fresh connection.
    assert pool.query("SELECT 42").rows == [(42,)]
    assert pool.transaction(lambda conn: conn.query("SELECT 43").rows) == [(43,)]


def test_retries_stop_at_checkout_retries(pg_dsn: str, pools: list[Pool]) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-retry0", checkout_retries=0)
    pid = pool.query("SELECT pg_backend_pid()").rows[0][0]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(ConnectionError, match="connection lost"):
        pool.query("SELECT 1")


def test_a_connection_used_after_its_transaction_is_outdated(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-outdated")
    kept = pool.transaction(lambda conn: conn)
    with pytest.raises(ConnectionError, match="outdated connection"):
        kept.query("SELECT 1")


def test_asyncio_transactions_streams_and_statements(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    pool, _ = start_named(pg_dsn, pools, "q-async")

    async def body() -> None:
        async with pool.atransaction() as conn:
            await conn.query(f"INSERT INTO {table} VALUES (1)")
            batches = [len(b.rows) async for b in conn.stream(
                "SELECT generate_series(1, 25)", max_rows=10)]
            assert batches == [10, 10, 5]

        async def rolled(conn: Any) -> None:
            await conn.query(f"INSERT INTO {table} VALUES (2)")
            conn.rollback("nope")

        with pytest.raises(RolledBack) as info:
            await pool.atransaction(rolled)
        assert info.value.reason == "nope"
        query = await pool.aprepare("async_double", "SELECT $1::int * 2")
        assert (await pool.aexecute(query, [4])).rows == [(8,)]
        assert await pool.arun(lambda conn: conn.status()) == "idle"
        assert [len(b.rows) async for b in pool.astream("SELECT generate_series(1, 3)")] == [3]

    asyncio.run(body())
    assert count(pool, table) == 1


def test_a_parameter_error_raised_before_sending_keeps_the_connection(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # psycopg rejects these before anything reaches the server: the
    # connection is not in doubt, so it is neither replaced nor failed.
    pool, _ = start_named(pg_dsn, pools, "qa-param-error")
    pid = pool.query("SELECT pg_backend_pid()").rows[0][0]
    with pytest.raises(TypeError):
        pool.query("SELECT %s", 5)  # type: ignore[arg-type]
    assert pool.query("SELECT pg_backend_pid()").rows[0][0] == pid
    with pool.transaction() as conn:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(TypeError):
            conn.query("SELECT %s", 5)  # type: ignore[arg-type]
        assert conn.status() == "transaction"  # the server saw nothing
    assert count(pool, table) == 1


def test_stream_fetches_are_not_left_prepared_on_the_server(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # psycopg prepares a statement run often enough; a FETCH names a cursor
    # never seen again, so a prepared one would only fill the server's cache.
    pool, _ = start_named(pg_dsn, pools, "qa-fetch-unprepared")
    with pool.transaction() as conn:
        for _ in range(8):
            batches = list(conn.stream("SELECT generate_series(1, 10)", max_rows=1))
            assert len(batches) == 10
        prepared = conn.query("SELECT statement FROM pg_prepared_statements").rows
    assert not [s for (s,) in prepared if "FETCH" in s.upper()]


def test_a_result_copies_and_pickles_as_a_plain_result(
    pg_dsn: str, pools: list[Pool]
) -> None:
    import copy
    import pickle

    pool, _ = start_named(pg_dsn, pools, "qa-copy")
    result = pool.query("SELECT 1 AS one, 'x'::text AS x")
    for clone in (copy.deepcopy(result), pickle.loads(pickle.dumps(result))):
        assert clone == result
        assert [c.name for c in clone.columns] == ["one", "x"]
        assert clone.command == "SELECT 1"
