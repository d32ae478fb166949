"""dbpool.dbapi's own behaviour beyond the compliance suite, in-process (issue 19)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

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


# -- both transports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(pg_dsn: str) -> Iterator[str]:
    """The endpoint of a ``dbpool serve`` for the module."""
    from tests.support.remote import ServerProcess

    with ServerProcess(pg_dsn, pool_size=2) as server:
        yield server.endpoint


@pytest.fixture(params=["in-process", "remote"])
def connect(request: pytest.FixtureRequest, pool: Pool) -> Iterator[Any]:
    """``connect(**kwargs)`` on the in-process pool, or through ``dbpool serve``."""
    opened: list[dbapi.Connection] = []

    def make(**kwargs: Any) -> dbapi.Connection:
        if request.param == "in-process":
            conn = dbapi.connect(pool=pool, **kwargs)
        else:
            conn = dbapi.connect(request.getfixturevalue("served"), **kwargs)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        if not conn.closed:
            conn.close()


def one(conn: dbapi.Connection, sql: str) -> Any:
    cur = conn.cursor()
    cur.execute(sql)
    row = cur.fetchone()
    assert row is not None
    return row[0]


def test_isolation_level_read_only_and_deferrable_apply_to_each_transaction(
    connect: Any
) -> None:
    conn = connect()
    assert one(conn, "SHOW transaction_isolation") == "read committed"
    conn.rollback()
    conn.isolation_level = "serializable"
    conn.read_only = True
    conn.deferrable = True
    assert one(conn, "SHOW transaction_isolation") == "serializable"
    assert one(conn, "SHOW transaction_read_only") == "on"
    assert one(conn, "SHOW transaction_deferrable") == "on"
    conn.commit()
    conn.isolation_level = "REPEATABLE_READ"  # SQLAlchemy's spelling works too
    conn.read_only = None
    assert one(conn, "SHOW transaction_isolation") == "repeatable read"
    assert one(conn, "SHOW transaction_read_only") == "off"
    conn.rollback()
    conn.isolation_level = "chaotic"
    with pytest.raises(dbapi.ProgrammingError, match="unknown isolation level"):
        conn.cursor().execute("SELECT 1")


def test_autocommit_cannot_change_inside_a_transaction(connect: Any) -> None:
    conn = connect()
    conn.cursor().execute("SELECT 1")
    assert conn.in_transaction
    with pytest.raises(dbapi.ProgrammingError, match="inside a transaction"):
        conn.autocommit = True
    conn.commit()
    conn.autocommit = True
    conn.cursor().execute("SELECT 1")
    assert not conn.in_transaction


def test_binary_is_bytes_and_round_trips(connect: Any) -> None:
    value = dbapi.Binary(b"\x00\xffdbpool")
    assert type(value) is bytes
    cur = connect().cursor()
    cur.execute("SELECT %s::bytea", [value])
    assert cur.fetchone() == (value,)


def test_the_services_own_errors_are_pep_249_classes(served: str) -> None:
    conn = dbapi.connect(served, autocommit=True)
    with pytest.raises(dbapi.ProgrammingError, match="cannot carry"):  # the wire's TypeError
        conn.cursor().execute("SELECT %s", [object()])
    conn.close()
    conn = dbapi.connect(served, pool="no_such_pool", autocommit=True)
    with pytest.raises(dbapi.InterfaceError, match="no pool named") as info:
        conn.cursor().execute("SELECT 1")
    assert type(info.value.__cause__).__name__ == "ProtocolError"
    conn.close()


def test_a_connection_is_held_until_close_unless_hold_timeout_says_otherwise(
    pool: Pool
) -> None:
    conn = dbapi.connect(pool=pool, timeout=0.2)  # 0.2s to get it, no limit on holding it
    cur = conn.cursor()
    cur.execute("SELECT pg_sleep(0.5)")
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)
    conn.close()
    conn = dbapi.connect(pool=pool, hold_timeout=0.2)
    with pytest.raises(dbapi.OperationalError) as info:
        conn.cursor().execute("SELECT pg_sleep(5)")
    assert getattr(info.value, "reason", None) == "deadline"
    assert pool.metrics()["deadlines"] == 1
