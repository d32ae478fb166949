"""The query API from asyncio, on real PostgreSQL.

The asyncio counterparts of the calls in test_query_api.py and
integration/test_dbconn_statements.py: ``aquery``, ``aprepare``, ``aexecute``,
``aprepare_execute``, ``aclose``, ``astatus``, ``arun``, ``atransaction``,
``astream`` and ``acheckout`` with the AsyncConnection's own calls; nesting,
run's status check, cancellation in the middle of a statement, streams
stopped early, and the log entries of async calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from dbpool.driver import Query
from dbpool.errors import ConnectionError, RolledBack
from dbpool.pool import Pool
from dbpool.pool.connection import AsyncConnection
from dbpool.pool.logentry import LogEntry
from tests.support.pools import start_named


def run(body: Callable[[], Awaitable[None]], timeout: float = 10.0) -> None:
    """Run an async test body on a fresh loop, bounded in time."""

    async def bounded() -> None:
        await asyncio.wait_for(body(), timeout)

    asyncio.run(bounded())


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition nothing announces (a pool gauge, the server's view) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def count(pool: Pool, table: str) -> int:
    return int((await pool.aquery(f"SELECT count(*) FROM {table}")).rows[0][0])


async def pid_of(conn: AsyncConnection) -> int:
    return int((await conn.query("SELECT pg_backend_pid()")).rows[0][0])


async def cursors(conn: AsyncConnection) -> int:
    return int((await conn.query("SELECT count(*) FROM pg_cursors")).rows[0][0])


def test_async_prepare_execute_prepare_execute_close_and_status(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # prepare_test "prepare returns query", execute_test "execute returns result" and
    # "execute error returns error", prepare_execute_test "prepare_execute returns query and
    # result", with aclose and astatus
    pool, events = start_named(pg_dsn, pools, "aq-statements")

    async def body() -> None:
        query = await pool.aprepare("a_inc", "SELECT $1::int + 1")
        assert query == Query("SELECT $1::int + 1", "a_inc")
        assert (await pool.aexecute(query, [1])).rows == [(2,)]
        assert (await pool.aexecute(query, [41])).rows == [(42,)]
        inverse, res = await pool.aprepare_execute("a_inv", "SELECT 60 / $1::int", [5])
        assert inverse == Query("SELECT 60 / $1::int", "a_inv") and res.rows == [(12,)]
        with pytest.raises(psycopg.errors.DivisionByZero):
            await pool.aexecute(inverse, [0], timeout=5.0)
        assert await pool.astatus() == "idle"
        assert (await pool.aexecute(inverse, [4])).rows == [(15,)]
        names = await pool.aquery("SELECT name FROM pg_prepared_statements ORDER BY name")
        assert names.rows == [("a_inc",), ("a_inv",)]
        await pool.aclose_prepared(query)
        names = await pool.aquery("SELECT name FROM pg_prepared_statements")
        assert names.rows == [("a_inv",)]
        await pool.aclose_prepared(query)  # closing what the connection no longer has is a no-op

    run(body)
    assert [e.kind for e in events.values()] == ["connected"]


def test_acheckout_connection_runs_queries_transactions_and_rollbacks(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # transaction_test "transaction returns result" / "rollback returns error", through acheckout
    pool, _ = start_named(pg_dsn, pools, "aq-acheckout")

    async def body() -> None:
        async with pool.acheckout() as conn:
            async with conn.transaction() as tx:
                assert tx is conn and conn.in_transaction
                await conn.query(f"INSERT INTO {table} VALUES (1)")
                assert await conn.status() == "transaction"
            assert not conn.in_transaction and await conn.status() == "idle"

            async def insert_and_return(c: AsyncConnection) -> str:
                await c.query(f"INSERT INTO {table} VALUES (2)")
                return "done"

            assert await conn.transaction(insert_and_return) == "done"
            with pytest.raises(RolledBack) as info:
                async with conn.transaction():
                    await conn.query(f"INSERT INTO {table} VALUES (3)")
                    conn.rollback("changed my mind")
            assert info.value.reason == "changed my mind"
            with pytest.raises(KeyError):
                async with conn.transaction():
                    await conn.query(f"INSERT INTO {table} VALUES (4)")
                    raise KeyError("boom")
            assert await conn.status() == "idle"
            rows = await conn.query(f"SELECT x FROM {table} ORDER BY x")
            assert rows.rows == [(1,), (2,)]

    run(body)


def test_nested_async_transactions_share_the_connection_and_an_inner_rollback_fails_the_outer(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # transaction_test "transaction rolls back when inner transaction rolls back" (async)
    pool, events = start_named(pg_dsn, pools, "aq-nested", size=2)

    async def body() -> None:
        with pytest.raises(RolledBack) as outer:
            async with pool.atransaction() as conn:
                await conn.query(f"INSERT INTO {table} VALUES (1)")
                async with pool.atransaction() as inner:  # a pass-through: no BEGIN
                    assert await pid_of(inner) == await pid_of(conn)
                with pytest.raises(RolledBack) as info:
                    async with conn.transaction() as inner:
                        inner.rollback("inner")
                assert info.value.reason == "inner"
                with pytest.raises(ConnectionError, match="transaction rolling back"):
                    await conn.query("SELECT 1")
        assert outer.value.reason == "rollback"
        assert await count(pool, table) == 0

        # An inner exception, even caught, fails the outer transaction too.
        with pytest.raises(RolledBack) as outer:
            async with pool.atransaction() as conn:
                await conn.query(f"INSERT INTO {table} VALUES (2)")
                with pytest.raises(ValueError):
                    async with pool.atransaction():
                        raise ValueError("inner")
        assert outer.value.reason == "rollback"
        assert await count(pool, table) == 0

    run(body)
    # The "transaction rolling back" call dropped its connection, which was replaced.
    events.wait_count(lambda e: e.kind == "connected", 3)


def test_pool_calls_inside_atransaction_use_its_connection_but_child_tasks_do_not(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # transaction_test: calls on the pool inside a transaction run in it (async form)
    pool, _ = start_named(pg_dsn, pools, "aq-held", size=2)

    async def body() -> None:
        async with pool.atransaction() as conn:
            pid = await pid_of(conn)
            await pool.aquery(f"INSERT INTO {table} VALUES (1)")
            assert await pool.astatus() == "transaction"
            assert (await pool.aquery("SELECT pg_backend_pid()")).rows == [(pid,)]
            query = await pool.aprepare("a_pid", "SELECT pg_backend_pid() + $1::int")
            assert (await pool.aexecute(query, [0])).rows == [(pid,)]

            async def child() -> tuple[int, int]:
                other = (await pool.aquery("SELECT pg_backend_pid()")).rows[0][0]
                return other, await count(pool, table)

            other, seen = await asyncio.create_task(child())
            assert other != pid and seen == 0  # its own connection: the row is not committed
        assert await count(pool, table) == 1

    run(body)


def test_arun_disconnects_a_connection_left_in_a_transaction(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # DBConnection.run's status check (test_query_api's run test, async form)
    pool, events = start_named(pg_dsn, pools, "aq-arun")

    async def body() -> None:
        async def fine(conn: AsyncConnection) -> int:
            pid = await pid_of(conn)
            assert (await pool.aquery("SELECT pg_backend_pid()")).rows == [(pid,)]
            return pid

        pid = await pool.arun(fine)

        async def leave_open(conn: AsyncConnection) -> None:
            await conn.query("BEGIN")

        with pytest.raises(ConnectionError, match="checked out with status 'idle' but it was "
                                                  "checked in with status 'transaction'"):
            await pool.arun(leave_open)
        assert (await pool.aquery("SELECT pg_backend_pid()")).rows[0][0] != pid
        assert await pool.astatus() == "idle"

    run(body)
    assert [e.kind for e in events.values()][:3] == ["connected", "disconnected", "connected"]


def test_a_task_cancelled_mid_query_keeps_its_connection_until_the_query_ends(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # no Elixir counterpart: asyncio cancellation while a statement runs on a worker thread
    pool, events = start_named(pg_dsn, pools, "aq-cancel", idle_interval=30.0)
    key = uuid.uuid4().int % 2**31

    async def body() -> None:
        admin = await psycopg.AsyncConnection.connect(pg_dsn)
        try:
            await admin.execute("SELECT pg_advisory_xact_lock(%s)", (key,))  # held until commit
            pids: list[int] = []
            cancelled = asyncio.Event()

            async def victim() -> None:
                async with pool.acheckout() as conn:
                    pids.append(await pid_of(conn))
                    try:
                        await conn.query("SELECT pg_advisory_xact_lock(%s)", [key])
                    except asyncio.CancelledError:
                        cancelled.set()
                        raise

            waiting: list[bool] = []

            async def blocked() -> bool:
                rows = await admin.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s "
                    "AND NOT granted", (key,))
                row = await rows.fetchone()
                return row is not None and row[0] == 1

            task = asyncio.create_task(victim())
            deadline = time.monotonic() + 5
            while not await blocked():  # the statement is on the server, waiting for the lock
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            other = asyncio.create_task(pool.aquery("SELECT pg_backend_pid()"))
            await until(lambda: pool.metrics()["checkout_queue_length"] == 1)
            task.cancel()
            await cancelled.wait()
            # A bounded look for something that must not happen: the cancelled task keeps
            # the connection while its statement runs, so the waiter does not get it.
            done, _ = await asyncio.wait([task, other], timeout=0.3)
            assert done == set()
            waiting.append(await blocked())
            assert waiting == [True]
            assert pool.metrics()["ready_conn_count"] == 0
            assert pool.metrics()["checkout_queue_length"] == 1
            await admin.commit()  # the statement ends; then the connection goes back
            assert (await other).rows == [(pids[0],)]  # the same connection, kept
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await pool.aquery("SELECT 1")).rows == [(1,)]
            assert pool.metrics()["ready_conn_count"] == 1
        finally:
            await admin.close()

    run(body)
    assert [e.kind for e in events.values()] == ["connected"]


def test_an_async_stream_stopped_early_with_aclosing_closes_its_cursor(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # stream_test "stream logs result" (Enum.take stops early; the cursor is deallocated)
    pool, _ = start_named(pg_dsn, pools, "aq-stream")

    async def body() -> None:
        async with pool.atransaction() as conn:
            batches = [len(b.rows) async for b in conn.stream(
                "SELECT generate_series(1, 25)", max_rows=10)]
            assert batches == [10, 10, 5]
            assert await cursors(conn) == 0
            async with contextlib.aclosing(conn.stream(
                    "SELECT generate_series(1, 1000)", max_rows=10)) as stream:
                async for batch in stream:
                    assert len(batch.rows) == 10 and await cursors(conn) == 1
                    break
            assert await cursors(conn) == 0
            with pytest.raises(KeyError):
                async with contextlib.aclosing(conn.stream("SELECT 1")) as stream:
                    async for _batch in stream:
                        raise KeyError("stop")
            assert await cursors(conn) == 0
            assert await conn.status() == "transaction"

        # pool.astream: its own transaction, ended when the stream is closed.
        async with contextlib.aclosing(pool.astream(
                "SELECT generate_series(1, 1000)", max_rows=10)) as stream:
            async for batch in stream:
                assert len(batch.rows) == 10
                break
        assert pool.metrics()["ready_conn_count"] == 1
        assert await pool.astatus() == "idle"

    run(body)


def test_an_async_stream_is_an_async_context_manager_like_the_sync_one(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # stream_test "stream returns result" (the stream is closed when its user is done)
    pool, _ = start_named(pg_dsn, pools, "aq-stream-with")

    async def body() -> None:
        async with pool.atransaction() as conn:
            stream: Any = conn.stream("SELECT generate_series(1, 1000)", max_rows=10)
            async with stream as batches:
                async for _batch in batches:
                    break
            assert await cursors(conn) == 0

    run(body)


def test_async_calls_write_log_entries(pg_dsn: str, pools: list[Pool]) -> None:
    # execute_test "execute logs result", prepare_execute_test "prepare_execute logs result",
    # stream_test "stream logs result" and "execute logs error", from asyncio
    entries: list[LogEntry] = []
    pool, _ = start_named(pg_dsn, pools, "aq-log", log=entries.append)

    async def body() -> None:
        await pool.aquery("SELECT %s::int", [5])
        query, _ = await pool.aprepare_execute("a_log", "SELECT $1::int * 2", [4])
        with pytest.raises(psycopg.errors.DivisionByZero):
            await pool.aquery("SELECT 1/0")
        async with pool.atransaction() as conn:
            await conn.execute(query, [1])
            batches = [b.rows async for b in conn.stream("SELECT generate_series(1, 3)",
                                                         max_rows=2)]
            assert batches == [[(1,), (2,)], [(3,)]]
        own: list[LogEntry] = []
        await pool.aquery("SELECT 3", log=own.append)
        assert [e.call for e in own] == ["query"]

    run(body)
    assert [(e.call, e.ok) for e in entries] == [
        ("query", True), ("prepare_execute", True), ("query", False), ("begin", True),
        ("execute", True), ("declare", True), ("fetch", True), ("fetch", True),
        ("deallocate", True), ("commit", True)]
    query, both, failed, begin, execute = entries[:5]
    assert (query.query, query.params, query.result.rows) == ("SELECT %s::int", [5], [(5,)])
    assert both.query == Query("SELECT $1::int * 2", "a_log") and both.params == [4]
    assert both.result[1].rows == [(8,)]
    assert isinstance(failed.error, psycopg.errors.DivisionByZero) and failed.result is None
    # Each checkout's first logged call carries its pool and idle times; later ones do not.
    for first in (query, both, failed, begin):
        assert first.pool_time is not None and first.pool_time >= 0
        assert first.idle_time is not None and first.idle_time >= 0
    for later in entries[4:]:
        assert later.pool_time is None and later.idle_time is None
    for entry in entries:
        assert entry.connection_time >= 0
    for timed in (query, both, execute):
        assert timed.decode_time is not None and timed.decode_time >= 0
    assert execute.result.rows == [(2,)]


def test_a_stream_cancelled_mid_fetch_raises_cancelled_and_closes_its_cursor(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # The FETCH goes on in its thread after the cancel: closing the cursor
    # and rolling back wait for it, rather than share the connection with it.
    pool, _ = start_named(pg_dsn, pools, "aq-stream-cancel")
    admin = psycopg.connect(pg_dsn, autocommit=True)
    first = asyncio.Event()
    pids: list[int] = []

    def fetching() -> bool:
        rows = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active' "
            "AND query LIKE 'FETCH%%'", pids).fetchone()
        return rows is not None and rows[0] == 1

    async def consumer() -> None:
        async with pool.atransaction() as conn:
            pids.append(conn.backend_pid or 0)
            sql = "SELECT pg_sleep(CASE WHEN g = 1 THEN 0 ELSE 0.3 END), g " \
                  "FROM generate_series(1, 5) AS g"
            async with conn.stream(sql, max_rows=1) as batches:
                async for _ in batches:
                    first.set()

    async def body() -> None:
        task = asyncio.create_task(consumer())
        await first.wait()
        await until(fetching)  # the second FETCH is on the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await pool.aquery("SELECT count(*) FROM pg_cursors")).rows == [(0,)]
        assert (await pool.astatus()) == "idle"

    try:
        run(body)
    finally:
        admin.close()
