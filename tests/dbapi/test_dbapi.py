"""dbpool.dbapi's own behaviour beyond the compliance suite, in-process (issue 19)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from dbpool import dbapi
from dbpool.pool import Pool


@pytest.fixture
def pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=2, name=f"dbapi-{uuid.uuid4().hex[:6]}") as started:
        yield started


@pytest.fixture
def table(pg_dsn: str) -> Iterator[str]:
    name = f"dbapi_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text)")
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {name}")


def count(pg_dsn: str, table: str) -> int:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_the_first_statement_begins_a_transaction_that_commit_ends(
    pool: Pool, pg_dsn: str, table: str
) -> None:
    conn = dbapi.connect(pool=pool)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {table} VALUES (%s, %s)", [1, "a"])
    assert count(pg_dsn, table) == 0  # not yet committed
    conn.commit()
    assert count(pg_dsn, table) == 1
    cur.execute(f"INSERT INTO {table} VALUES (%(id)s, %(body)s)", {"id": 2, "body": "b"})
    conn.rollback()
    assert count(pg_dsn, table) == 1
    cur.execute(f"INSERT INTO {table} VALUES (3, 'c')")
    conn.close()  # an open transaction is rolled back
    assert count(pg_dsn, table) == 1
    assert pool.metrics()["connections"]["in_use"] == 0  # the connection went back


def test_autocommit_and_the_context_manager(pool: Pool, pg_dsn: str, table: str) -> None:
    conn = dbapi.connect(pool=pool, autocommit=True)
    conn.cursor().execute(f"INSERT INTO {table} VALUES (1, 'a')")
    assert count(pg_dsn, table) == 1
    conn.close()
    with dbapi.connect(pool=pool) as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (2, 'b')")
    assert count(pg_dsn, table) == 2  # committed at the end of the block
    with pytest.raises(ZeroDivisionError), dbapi.connect(pool=pool) as conn:
        conn.cursor().execute(f"INSERT INTO {table} VALUES (3, 'c')")
        raise ZeroDivisionError
    assert count(pg_dsn, table) == 2  # rolled back


def test_description_type_codes_and_executemany(pool: Pool, table: str) -> None:
    with dbapi.connect(pool=pool) as conn:
        cur = conn.cursor()
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(1, "a"), (2, "b"), (3, "c")])
        assert cur.rowcount == 3
        cur.execute(f"SELECT id, body, now(), 'x'::bytea FROM {table} ORDER BY id")
        assert cur.description is not None
        names = [column[0] for column in cur.description]
        types = [column[1] for column in cur.description]
        assert names == ["id", "body", "now", "bytea"]
        assert types[0] == dbapi.NUMBER and types[1] == dbapi.STRING
        assert types[2] == dbapi.DATETIME and types[3] == dbapi.BINARY
        assert cur.rowcount == 3
        assert [row[0] for row in cur] == [1, 2, 3]


def test_errors_are_psycopgs_and_a_closed_connection_says_so(pool: Pool) -> None:
    conn = dbapi.connect(pool=pool)
    cur = conn.cursor()
    with pytest.raises(psycopg.errors.DivisionByZero) as caught:
        cur.execute("SELECT 1/0")
    assert isinstance(caught.value, dbapi.DatabaseError) and isinstance(caught.value,
                                                                        conn.DataError)
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        cur.execute("SELECT 1")  # the transaction failed: roll back first
    conn.rollback()
    assert cur.execute("SELECT 2").fetchone() == (2,)
    with pytest.raises(dbapi.ProgrammingError):  # psycopg's SyntaxError is one
        cur.execute("SELEC 1")
    conn.rollback()
    conn.close()
    with pytest.raises(dbapi.InterfaceError):
        cur.execute("SELECT 1")
    with pytest.raises(dbapi.InterfaceError):
        conn.close()


def test_through_dbpool_serve_a_transaction_is_a_lease(pg_dsn: str, table: str) -> None:
    from tests.support.remote import ServerProcess

    with ServerProcess(pg_dsn, pool_size=2) as server:
        conn = dbapi.connect(server.endpoint)
        cur = conn.cursor()
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(1, "a"), (2, "b")])
        assert cur.rowcount == 2
        assert count(pg_dsn, table) == 0  # in the lease's transaction
        conn.commit()
        assert count(pg_dsn, table) == 2
        with pytest.raises(psycopg.errors.UniqueViolation):  # the same class as in-process
            cur.execute(f"INSERT INTO {table} VALUES (1, 'again')")
        conn.rollback()
        cur.execute(f"SELECT body FROM {table} ORDER BY id")
        assert cur.fetchall() == [("a",), ("b",)]
        conn.close()
        auto = dbapi.connect(server.endpoint, autocommit=True)
        auto.cursor().execute(f"DELETE FROM {table} WHERE id = 1")  # no lease needed
        assert count(pg_dsn, table) == 1
        auto.close()
