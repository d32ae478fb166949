"""The service's prepared statements across DDL that changes what they return.

``dbpool serve`` prepares a statement on its fifth run on a connection.  When
DDL changes the statement's result columns, PostgreSQL fails every run of the
old prepared statement ("cached plan must not change result type",
``FeatureNotSupported``) until it is prepared again.  The service:

- forgets a connection's prepared statements when DDL (``DROP``, ``ALTER``)
  completes through the pool, on any of its connections;
- forgets those prepared inside a lease whose transaction rolled back (they may
  name objects the rollback undid);
- when a run still hits a stale plan (DDL done elsewhere), forgets them and,
  outside a lease, where the failure rolled the whole request back, runs the
  request again unprepared; the stale statements are deallocated.

All on one connection (``pool_size=1``), so that the catalogue a test reads
is that of the backend that prepared.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors as pg_errors
import pytest

from dbpool.client import Client
from tests.support.remote import ServerProcess

TIMEOUT = 15.0
COUNT = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s"


@pytest.fixture(scope="module")
def server1(pg_dsn: str) -> Iterator[ServerProcess]:
    with ServerProcess(pg_dsn, "--grace", "2", pool_size=1) as srv:
        yield srv


@pytest.fixture
def client(server1: ServerProcess) -> Iterator[Client]:
    with Client(server1.endpoint, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
def table(pg_dsn: str) -> Iterator[str]:
    name = f"remote_ddl_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def prepare(client: Client, sql: str, expected: list[tuple[Any, ...]]) -> None:
    """Run ``sql`` until the service has prepared it, checking its rows each time."""
    for _ in range(6):
        assert client.query(sql).rows == expected
    assert client.query(COUNT, [f"%{sql}%"]).rows == [(1,)]


def test_ddl_through_the_service_makes_the_next_run_prepare_afresh(
    client: Client, table: str
) -> None:
    client.query(f"CREATE TABLE {table} (x int)")
    client.query(f"INSERT INTO {table} VALUES (1)")
    sql = f"SELECT x FROM {table}"
    prepare(client, sql, [(1,)])
    client.query(f"ALTER TABLE {table} ALTER COLUMN x TYPE text")
    # In a lease, where a stale plan could not be run again: it must not be met at all.
    with client.transaction() as tx:
        assert tx.query(sql).rows == [("1",)]
    assert client.query(sql).rows == [("1",)]
    # The old statement is deallocated, not left on the server.
    assert client.query(COUNT, [f"%{sql}%"]).rows == [(0,)]


def test_ddl_done_elsewhere_is_met_once_and_the_request_runs_again_unprepared(
    client: Client, table: str, pg_dsn: str
) -> None:
    client.query(f"CREATE TABLE {table} (x int)")
    client.query(f"INSERT INTO {table} VALUES (2)")
    sql = f"SELECT x FROM {table}"
    prepare(client, sql, [(2,)])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # not through the service
        conn.execute(f"ALTER TABLE {table} ALTER COLUMN x TYPE text")
    assert client.query(sql).rows == [("2",)]  # no FeatureNotSupported
    assert client.query(COUNT, [f"%{sql}%"]).rows == [(0,)]  # forgotten and deallocated
    prepare(client, sql, [("2",)])  # and prepared again for the new type


def test_a_stale_plan_met_inside_a_lease_fails_that_transaction_only(
    client: Client, table: str, pg_dsn: str
) -> None:
    client.query(f"CREATE TABLE {table} (x int)")
    client.query(f"INSERT INTO {table} VALUES (3)")
    sql = f"SELECT x FROM {table}"
    prepare(client, sql, [(3,)])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {table} ALTER COLUMN x TYPE text")
    with pytest.raises(pg_errors.FeatureNotSupported), client.transaction() as tx:
        tx.query(sql)  # its transaction is aborted: it cannot be run again
    with client.transaction() as tx:
        assert tx.query(sql).rows == [("3",)]


def test_statements_prepared_in_a_rolled_back_lease_are_forgotten(
    client: Client, table: str
) -> None:
    sql = f"SELECT x FROM {table}"
    with client.transaction() as tx:
        tx.query(f"CREATE TABLE {table} (x int)")
        tx.query(f"INSERT INTO {table} VALUES (4)")
        for _ in range(6):
            assert tx.query(sql).rows == [(4,)]
        tx.rollback()  # the table is gone, without a DROP
    with client.transaction() as tx:
        tx.query(f"CREATE TABLE {table} (x text)")
        tx.query(f"INSERT INTO {table} VALUES ('four')")
        assert tx.query(sql).rows == [("four",)]
