"""A remote transaction's BEGIN leaves with its first request (server/pipeline.py,
``Pipe.begin_pending``): ``begin`` costs no round trip to PostgreSQL, and the
transaction is still one transaction whatever its first request is.  And a
``with client.transaction()`` block sends no ``begin`` at all: its first
request carries ``begin: true`` (the client's ``AsyncTransaction._first``), so
a transaction of N statements makes N + 1 round trips, not N + 2.

Against a ``dbpool serve`` child process and the machine's PostgreSQL, with a
direct psycopg connection watching ``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from dbpool.client import AsyncClient, Client
from tests.support.remote import ServerProcess

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[ServerProcess]:
    with ServerProcess(pg_dsn, pool_size=2) as srv:
        yield srv


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.endpoint, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def table(pg_dsn: str) -> Iterator[str]:
    name = f"deferred_begin_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (n int)")
        try:
            yield name
        finally:
            conn.execute(f"DROP TABLE {name}")


def _in_transaction(pg_dsn: str) -> list[int]:
    """The backends of this database that are idle in a transaction."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction'").fetchall()
    return [pid for (pid,) in rows]


def test_begin_reaches_postgresql_only_with_the_first_statement(
        client: Client, pg_dsn: str) -> None:
    assert _in_transaction(pg_dsn) == []
    tx = client.transaction().begin()
    try:
        # The lease is granted, yet no backend is in a transaction: BEGIN has not run.
        assert tx.lease is not None
        assert _in_transaction(pg_dsn) == []
        pid = tx.query("SELECT pg_backend_pid()").rows[0][0]
        assert _in_transaction(pg_dsn) == [pid]
        # One transaction from its first statement on: its start time does not move.
        first = tx.query("SELECT now() = statement_timestamp()").rows[0][0]
        assert first is False  # now() is the transaction's start, before this statement
    finally:
        tx.rollback()
    assert _in_transaction(pg_dsn) == []


def test_statements_after_a_deferred_begin_roll_back_together(
        client: Client, table: str, pg_dsn: str) -> None:
    with client.transaction() as tx:
        tx.query(f"INSERT INTO {table} VALUES (1)")
        tx.batch([f"INSERT INTO {table} VALUES (2)", f"INSERT INTO {table} VALUES (3)"])
        assert tx.query(f"SELECT count(*) FROM {table}").rows == [(3,)]
        tx.rollback()
    assert client.query(f"SELECT count(*) FROM {table}").rows == [(0,)]


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_transaction_that_ran_nothing_ends_plainly_and_its_connection_serves_on(
        client: Client, end: str, pg_dsn: str) -> None:
    for _ in range(3):  # more times than there are connections
        tx = client.transaction().begin()
        result = tx.commit() if end == "commit" else tx.rollback()
        assert result.command == end.upper()
    assert _in_transaction(pg_dsn) == []
    for _ in range(4):  # both connections serve shared requests, none left in a transaction
        assert client.query("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_copy_as_the_first_request_is_inside_the_transaction(
        client: Client, table: str, end: str) -> None:
    tx = client.transaction().begin()
    tx.copy_from(f"COPY {table} FROM STDIN", b"1\n2\n")
    assert tx.query(f"SELECT count(*) FROM {table}").rows == [(2,)]
    tx.commit() if end == "commit" else tx.rollback()
    expected = 2 if end == "commit" else 0
    assert client.query(f"SELECT count(*) FROM {table}").rows == [(expected,)]


def test_a_stream_as_the_first_request_is_inside_the_transaction(
        client: Client, table: str) -> None:
    with client.transaction() as tx:
        with tx.stream("SELECT now() FROM generate_series(1, 2)", max_rows=1) as pages:
            rows = [row for page in pages for row in page.rows]
        tx.query(f"INSERT INTO {table} VALUES (1)")
        # The stream's statement already ran in this transaction: now() has not moved.
        assert tx.query("SELECT now()").rows == rows[:1]
        tx.rollback()
    assert client.query(f"SELECT count(*) FROM {table}").rows == [(0,)]


# -- the client's side: a transaction begins with its first request (begin: true) --------


class _Counted:
    """The requests a client sends, by op (its ``_call`` wrapped)."""

    def __init__(self, client: Client) -> None:
        self.ops: list[str] = []
        call = client._call

        def counted(msg: dict[str, Any], timeout: float | None) -> Any:
            self.ops.append(msg["op"] + ("+begin" if msg.get("begin") else ""))
            return call(msg, timeout)

        client._call = counted  # type: ignore[method-assign]


def test_a_with_block_begins_with_its_first_request(client: Client, table: str) -> None:
    sent = _Counted(client)
    with client.transaction() as tx:
        assert tx.active and tx.lease is None  # nothing sent yet
        tx.query(f"INSERT INTO {table} VALUES (1)")
        assert tx.lease is not None
        tx.execute(f"INSERT INTO {table} VALUES (%s)", [2])
    assert sent.ops == ["query+begin", "execute", "commit"]
    assert client.query(f"SELECT count(*) FROM {table}").rows == [(2,)]
    with client.transaction() as tx:
        tx.batch([f"INSERT INTO {table} VALUES (3)", f"INSERT INTO {table} VALUES (4)"])
        tx.rollback()
    assert sent.ops[3:] == ["query", "batch+begin", "rollback"]
    assert client.query(f"SELECT count(*) FROM {table}").rows == [(2,)]


def test_a_with_block_that_sends_nothing_begins_nothing(client: Client) -> None:
    sent = _Counted(client)
    with client.transaction():
        pass
    with client.transaction() as tx:
        assert tx.commit().command == "COMMIT"
    with pytest.raises(RuntimeError), client.transaction():
        raise RuntimeError("boom")
    assert sent.ops == []


def test_a_failed_first_request_leaves_its_transaction_open_and_aborted(
        client: Client, pg_dsn: str) -> None:
    with client.transaction() as tx:
        with pytest.raises(psycopg.errors.DivisionByZero):
            tx.query("SELECT 1 / 0")
        assert tx.active and tx.lease is not None  # it began: the error named its lease
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            tx.query("SELECT 1")
        tx.rollback()
    assert _in_transaction(pg_dsn) == []
    assert client.query("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize("first", ["stream", "copy_to", "copy_from"])
def test_a_stream_or_copy_first_in_a_with_block_begins_the_transaction(
        client: Client, table: str, first: str) -> None:
    with client.transaction() as tx:
        if first == "stream":
            with tx.stream("SELECT now()", max_rows=10) as pages:
                started = [row for page in pages for row in page.rows]
        elif first == "copy_to":
            with tx.copy_to("COPY (SELECT 1) TO STDOUT") as copy:
                assert copy.read() == b"1\n"
            started = tx.query("SELECT now()").rows
        else:
            tx.copy_from(f"COPY {table} FROM STDIN", b"1\n")
            started = tx.query("SELECT now()").rows
        tx.query(f"INSERT INTO {table} VALUES (2)")
        assert tx.query("SELECT now()").rows == started  # one transaction throughout
        tx.rollback()
    assert client.query(f"SELECT count(*) FROM {table}").rows == [(0,)]


def test_the_async_client_begins_with_its_first_request(
        server: ServerProcess, table: str) -> None:
    async def main() -> None:
        async with AsyncClient(server.endpoint, timeout=TIMEOUT) as client:
            with pytest.raises(psycopg.errors.DivisionByZero):
                async with client.transaction() as tx:
                    assert tx.lease is None
                    await tx.query("SELECT 1 / 0")
            assert tx.lease is not None and not tx.active  # began, then rolled back
            async with client.transaction() as tx:
                await tx.query(f"INSERT INTO {table} VALUES (1)")
                assert tx.lease is not None
            assert (await client.query(f"SELECT count(*) FROM {table}")).rows == [(1,)]

    asyncio.run(main())
