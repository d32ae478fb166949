"""The psycopg driver's callbacks against a real PostgreSQL.

Each callback's outcome is checked: Ok with the value, Error when the
connection survives (a SQL error), Disconnect when it does not.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from dbpool.driver import Disconnect, DisconnectAndRetry, Error, Ok, Query, WrongStatus
from dbpool.errors import sql_error_fields
from dbpool.pgdriver import PgDriver, PgState

driver = PgDriver()


@pytest.fixture
def state(pg_dsn: str) -> Iterator[PgState]:
    s = driver.connect({"conninfo": pg_dsn, "pool_index": 0})
    yield s
    driver.disconnect(None, s)


def test_connect_is_autocommit_and_never_passes_pool_keys_to_libpq(state: PgState) -> None:
    assert state.conn.autocommit
    assert driver.handle_status({}, state) == Ok("idle")
    assert state.backend_pid > 0


def test_execute_returns_columns_rows_rowcount_and_command(state: PgState) -> None:
    out = driver.handle_execute(Query("SELECT %s::int AS n, 'x' AS s"), [7], {}, state)
    assert isinstance(out, Ok)
    result = out.value
    assert [c.name for c in result.columns] == ["n", "s"]
    assert result.columns[0].type_oid == 23  # int4
    assert result.rows == [(7, "x")] and result.rowcount == 1 and result.command == "SELECT 1"


def test_sql_error_keeps_the_connection_and_its_fields(state: PgState) -> None:
    out = driver.handle_execute(Query("SELECT 1/0"), None, {}, state)
    assert isinstance(out, Error)
    assert isinstance(out.error, psycopg.errors.DivisionByZero)
    fields = sql_error_fields(out.error)
    assert fields["sqlstate"] == "22012" and fields["message"] == "division by zero"
    assert fields["class"] == "DivisionByZero"
    assert driver.handle_status({}, state) == Ok("idle")  # outside a transaction: still idle
    assert isinstance(driver.handle_execute(Query("SELECT 1"), None, {}, state), Ok)


def test_error_detail_is_kept(state: PgState) -> None:
    driver.handle_execute(Query("CREATE TEMP TABLE u (id int PRIMARY KEY)"), None, {}, state)
    driver.handle_execute(Query("INSERT INTO u VALUES (1)"), None, {}, state)
    out = driver.handle_execute(Query("INSERT INTO u VALUES (1)"), None, {}, state)
    assert isinstance(out, Error)
    fields = sql_error_fields(out.error)  # type: ignore[arg-type]
    assert fields["sqlstate"] == "23505"
    assert fields["detail"] == "Key (id)=(1) already exists."


def test_transaction_callbacks_and_status(state: PgState) -> None:
    assert isinstance(driver.handle_begin({}, state), Ok)
    assert driver.handle_status({}, state) == Ok("transaction")
    assert driver.handle_begin({}, state) == WrongStatus("transaction")
    assert isinstance(driver.handle_execute(Query("SELECT 1/0"), None, {}, state), Error)
    assert driver.handle_status({}, state) == Ok("error")  # inside a transaction: failed
    assert driver.handle_commit({}, state) == WrongStatus("error")
    assert isinstance(driver.handle_rollback({}, state), Ok)
    assert driver.handle_status({}, state) == Ok("idle")
    assert driver.handle_commit({}, state) == WrongStatus("idle")
    assert driver.handle_rollback({}, state) == WrongStatus("idle")


def test_commit_makes_writes_visible_and_rollback_discards_them(
    state: PgState, pg_dsn: str
) -> None:
    name = f"dbpool_tx_{state.backend_pid}"
    driver.handle_execute(Query(f"CREATE TABLE {name} (v int)"), None, {}, state)
    try:
        driver.handle_begin({}, state)
        driver.handle_execute(Query(f"INSERT INTO {name} VALUES (1)"), None, {}, state)
        driver.handle_rollback({}, state)
        driver.handle_begin({}, state)
        driver.handle_execute(Query(f"INSERT INTO {name} VALUES (2)"), None, {}, state)
        driver.handle_commit({}, state)
        with psycopg.connect(pg_dsn) as other:
            assert other.execute(f"SELECT v FROM {name}").fetchall() == [(2,)]
    finally:
        driver.handle_execute(Query(f"DROP TABLE {name}"), None, {}, state)


def test_prepare_execute_close_and_reprepare_on_a_new_connection(
    state: PgState, pg_dsn: str
) -> None:
    query = Query("SELECT $1::int + $2::int, $3::text", name="add_two")
    assert driver.handle_prepare(query, {}, state) == Ok(query)
    names = driver.handle_execute(
        Query("SELECT name FROM pg_prepared_statements"), None, {}, state)
    assert isinstance(names, Ok) and ("add_two",) in names.value.rows
    for a in range(3):  # reusable
        out = driver.handle_execute(query, [a, 1, "it's"], {}, state)
        assert isinstance(out, Ok) and out.value.rows == [(a + 1, "it's")]
    assert driver.handle_close(query, {}, state) == Ok(None)
    names = driver.handle_execute(
        Query("SELECT name FROM pg_prepared_statements"), None, {}, state)
    assert isinstance(names, Ok) and names.value.rows == []
    # A connection that never saw the statement prepares it on first execute.
    fresh = driver.connect({"conninfo": pg_dsn})
    try:
        out = driver.handle_execute(query, [2, 2, "x"], {}, fresh)
        assert isinstance(out, Ok) and out.value.rows == [(4, "x")]
    finally:
        driver.disconnect(None, fresh)


def test_prepare_error_is_an_error_not_a_disconnect(state: PgState) -> None:
    out = driver.handle_prepare(Query("SELEC 1", name="bad"), {}, state)
    assert isinstance(out, Error) and isinstance(out.error, psycopg.errors.SyntaxError)
    assert isinstance(driver.handle_execute(Query("SELECT 1"), None, {}, state), Ok)


def test_declare_fetch_deallocate_use_a_server_side_cursor(state: PgState) -> None:
    driver.handle_begin({}, state)
    query = Query("SELECT g FROM generate_series(1, 5) g")
    cursor = driver.handle_declare(query, None, {}, state)
    assert isinstance(cursor, Ok)
    cursors = driver.handle_execute(Query("SELECT name FROM pg_cursors"), None, {}, state)
    assert isinstance(cursors, Ok) and len(cursors.value.rows) == 1  # DECLAREd on the server
    batches = []
    while True:
        out = driver.handle_fetch(query, cursor.value, {"max_rows": 2}, state)
        assert isinstance(out, Ok)
        status, result = out.value
        batches.append([r[0] for r in result.rows])
        if status == "halt":
            break
    assert batches == [[1, 2], [3, 4], [5]]
    assert driver.handle_deallocate(query, cursor.value, {}, state) == Ok(None)
    cursors = driver.handle_execute(Query("SELECT name FROM pg_cursors"), None, {}, state)
    assert isinstance(cursors, Ok) and cursors.value.rows == []
    driver.handle_commit({}, state)


def test_a_terminated_backend_is_a_disconnect_safe_to_retry(state: PgState, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (state.backend_pid,))
    out = driver.handle_execute(Query("SELECT 1"), None, {}, state)
    # The server ended the session (57P01): the statement had no effect, so a
    # pool may run it again on another connection.
    assert isinstance(out, DisconnectAndRetry)
    assert out.error.sqlstate == "57P01"
    assert isinstance(driver.ping(state), Disconnect)
    assert isinstance(driver.checkout(state), Disconnect)


def test_ping_and_checkout_on_a_live_connection(state: PgState) -> None:
    assert driver.ping(state) == Ok(None)
    assert driver.checkout(state) == Ok(None)


def test_the_dsns_application_name_wins_and_dbpool_is_the_default(pg_dsn: str) -> None:
    driver = PgDriver()
    named = driver.connect({"conninfo": pg_dsn + " application_name=my-app"})
    plain = driver.connect({"conninfo": pg_dsn})
    try:
        names = [state.conn.execute("SHOW application_name").fetchone()
                 for state in (named, plain)]
        assert names == [("my-app",), ("dbpool",)]
    finally:
        driver.disconnect(None, named)
        driver.disconnect(None, plain)
