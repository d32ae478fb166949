"""db_connection's transaction, transaction_execute, client and close cases, in Python form.

Ported from db_connection's ``integration_test/cases/transaction_test.exs``,
``transaction_execute_test.exs``, ``client_test.exs`` and ``close_test.exs``.
Behaviour that PostgreSQL itself shows (commit, rollback, nesting, a lost
session) is tested against the real server; what the pool does with one
particular callback return (an error, a wrong status, a disconnect, a raise)
is tested with the scripted driver, reading back the calls the pool made.

Mapping: ``{:error, err}`` is the exception raised; ``{:error, :rollback}``
is ``RolledBack("rollback")``; a callback that raises, which stops the
connection process in DBConnection, propagates here and the connection is
cleaned (status read, rolled back if needed) at checkin.  Each test names
the Elixir test it ports in a comment.

Every case runs against both pool kinds, as db_connection runs these cases
against DBConnection.ConnectionPool and DBConnection.Ownership: the plain pool
and the ownership pool in auto mode (``pool_kind``, see tests/support/pools.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from dbpool.driver import (
    Disconnect,
    DisconnectAndRetry,
    Error,
    Ok,
    Query,
    Result,
    WrongStatus,
)
from dbpool.errors import ConnectionError, RolledBack, TransactionError
from dbpool.pool import Pool
from dbpool.pool.connection import Connection
from dbpool.pool.logentry import LogEntry
from tests.support.events import kind
from tests.support.pools import POOL_KINDS, kind_options, start_named
from tests.support.scripted import Call, FakeState, ScriptedDriver

pytestmark = pytest.mark.parametrize("pool_kind", POOL_KINDS, indirect=True)

# -- helpers ----------------------------------------------------------------

#: Calls that happen on their own schedule or around every checkout.
_BACKGROUND = frozenset({"ping", "checkout"})


def start(pools: list[Pool], driver: ScriptedDriver, **options: Any) -> Pool:
    """A one-connection pool on the scripted driver, of the test's pool kind."""
    pool = Pool.start("scripted", driver=driver, pool_size=1,
                      **{**kind_options(pools), **options})
    pools.append(pool)
    return pool


def sequence(driver: ScriptedDriver, *, status: bool = False) -> list[str]:
    """The callbacks the pool made, in order; handle_status only if ``status``.

    The status reads around a commit and at checkin are the pool's own
    bookkeeping; most tests are about the other calls.
    """
    return [c.name for c in driver.calls
            if c.name not in _BACKGROUND and (status or c.name != "handle_status")]


def state_of(call: Call) -> Any:
    """The connection state a callback was given (disconnect: its second argument)."""
    return call.args[1] if call.name == "disconnect" else call.args[-1]


def calls(driver: ScriptedDriver, name: str) -> list[Call]:
    return driver.calls_to(name)


def boom() -> RuntimeError:
    return RuntimeError("oops")


def raising(error: BaseException) -> Callable[..., Any]:
    """A script entry whose callback raises ``error`` (a driver bug)."""
    def raise_it(*_args: Any) -> Any:
        raise error
    return raise_it


def never(_conn: Any) -> Any:
    pytest.fail("the transaction's function ran")


def count(pool: Pool, table: str) -> int:
    return int(pool.query(f"SELECT count(*) FROM {table}").rows[0][0])


def terminate(dsn: str, pid: int | None) -> None:
    """End a session from outside and wait until it is gone."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (True,)


# -- nesting, on real PostgreSQL -------------------------------------------------


def test_nested_transactions_and_runs_share_one_connection_and_one_begin_commit(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # Ports "transaction and transaction returns result", "transaction and run
    # returns result" and "run inside transaction".
    entries: list[LogEntry] = []
    pool, _ = start_named(pg_dsn, pools, "dbc-nested", size=2)

    def outer(conn: Connection) -> str:
        conn.query(f"INSERT INTO {table} VALUES (1)")

        def inner(conn2: Connection) -> str:
            assert conn2 is conn
            conn2.query(f"INSERT INTO {table} VALUES (2)")
            return "inner"

        assert pool.transaction(inner, log=entries.append) == "inner"
        assert conn.transaction(inner) == "inner"
        assert pool.run(lambda conn3: (conn3 is conn, conn3.status())) == (True, "transaction")
        assert conn.run(lambda conn3: conn3 is conn)
        return "outer"

    assert pool.transaction(outer, log=entries.append) == "outer"
    # One BEGIN and one COMMIT: the nested blocks sent nothing to the server.
    assert [(e.call, e.ok) for e in entries] == [("begin", True), ("commit", True)]
    assert count(pool, table) == 3


@pytest.mark.parametrize("inner_failure", ["rollback", "raise"])
def test_after_an_inner_failure_later_nested_transactions_fail_and_the_outer_rolls_back(
    pg_dsn: str, pools: list[Pool], table: str, inner_failure: str
) -> None:
    # Ports "inner transaction rollback returns error on other transactions" and
    # "inner transaction raise returns error on other transactions".
    pool, events = start_named(pg_dsn, pools, f"dbc-inner-{inner_failure}")
    entries: list[LogEntry] = []
    later_ran: list[bool] = []

    def outer(conn: Connection) -> None:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        if inner_failure == "rollback":
            with pytest.raises(RolledBack) as inner:
                conn.transaction(lambda c: c.rollback("oops"))
            assert inner.value.reason == "oops"
        else:
            def fail(c: Connection) -> None:
                raise boom()

            with pytest.raises(RuntimeError, match="oops"):
                conn.transaction(fail)
        # The next nested transaction runs its function but cannot succeed.
        with pytest.raises(RolledBack) as later:
            conn.transaction(lambda c: later_ran.append(True))
        assert later.value.reason == "rollback"

    with pool.checkout() as first:
        pid = first.backend_pid
    with pytest.raises(RolledBack) as info:
        pool.transaction(outer, log=entries.append)
    assert info.value.reason == "rollback"
    assert later_ran == [True]
    # No call was made on the failed connection, so it was rolled back and kept.
    assert [(e.call, e.ok) for e in entries] == [("begin", True), ("rollback", True)]
    assert count(pool, table) == 0
    with pool.checkout() as conn:
        assert conn.backend_pid == pid
        assert conn.status() == "idle"
    assert [e.kind for e in events.values()] == ["connected"]


def test_an_outer_rollback_after_an_inner_rollback_raises_the_outer_reason(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # Ports "outer transaction rolls back after inner rollback".
    pool, events = start_named(pg_dsn, pools, "dbc-outer-rollback")

    def outer(conn: Connection) -> None:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(RolledBack) as inner:
            pool.transaction(lambda c: c.rollback("oops"))
        assert inner.value.reason == "oops"
        conn.rollback("oops2")

    with pytest.raises(RolledBack) as info:
        pool.transaction(outer)
    assert info.value.reason == "oops2"
    assert count(pool, table) == 0
    assert pool.transaction(lambda conn: conn.status()) == "transaction"  # usable again
    assert [e.kind for e in events.values()] == ["connected"]


def test_a_transaction_logs_begin_commit_rollback_and_its_statements(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # Ports "transaction logs begin/commit/rollback", "transaction logs on fun
    # raise" and transaction_execute's "execute logs result".
    pool, _ = start_named(pg_dsn, pools, "dbc-tx-log")
    entries: list[LogEntry] = []
    seen_in_fn: list[list[str]] = []

    def work(conn: Connection) -> str:
        seen_in_fn.append([e.call for e in entries])  # begin is logged before fn runs
        result = conn.query("SELECT %s::int", [7], log=entries.append)
        assert result.rows == [(7,)]
        return "result"

    assert pool.transaction(work, log=entries.append) == "result"
    assert seen_in_fn == [["begin"]]
    begin, query, commit = entries
    assert (begin.call, begin.query, begin.params, begin.error) == ("begin", "BEGIN", None, None)
    assert begin.result.command == "BEGIN"
    assert begin.pool_time is not None and begin.pool_time >= 0  # the checkout's first entry
    assert begin.decode_time is None and begin.connection_time >= 0
    # Later entries of the same checkout carry no pool time.
    assert query.call == "query" and query.pool_time is None
    assert query.decode_time is not None and query.decode_time >= 0
    assert (commit.call, commit.query, commit.params, commit.error) == (
        "commit", "COMMIT", None, None)
    assert commit.pool_time is None and commit.decode_time is None
    assert commit.connection_time >= 0

    entries.clear()
    with pytest.raises(RolledBack) as info:
        pool.transaction(lambda conn: conn.rollback("result"), log=entries.append)
    assert info.value.reason == "result"
    assert [(e.call, e.query, e.ok) for e in entries] == [
        ("begin", "BEGIN", True), ("rollback", "ROLLBACK", True)]
    assert entries[1].pool_time is None and entries[1].decode_time is None

    entries.clear()
    with pytest.raises(RuntimeError, match="oops"), pool.transaction(log=entries.append):
        raise boom()
    assert [(e.call, e.ok) for e in entries] == [("begin", True), ("rollback", True)]


def test_a_session_lost_inside_a_transaction_fails_later_calls_and_the_transaction(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # Ports transaction_execute's "execute disconnect returns error".
    pool, events = start_named(pg_dsn, pools, "dbc-tx-lost")
    entries: list[LogEntry] = []
    with pytest.raises(RolledBack) as info, pool.transaction(log=entries.append) as conn:
        conn.query(f"INSERT INTO {table} VALUES (1)")
        pid = conn.backend_pid
        terminate(pg_dsn, pid)
        with pytest.raises(ConnectionError, match="connection lost"):
            conn.query("SELECT 1")
        with pytest.raises(ConnectionError,
                           match="connection is closed because of an error, disconnect or "
                                 "timeout"):
            conn.query("SELECT 1")
    assert info.value.reason == "rollback"
    # The rollback is logged with the error that kept it from reaching the server.
    assert [e.call for e in entries] == ["begin", "rollback"]
    assert isinstance(entries[1].error, ConnectionError)
    events.wait_count(kind("connected"), 2)
    with pool.checkout() as conn:
        assert conn.backend_pid != pid
    assert count(pool, table) == 0


def test_a_transaction_ended_by_sql_cannot_commit_and_its_connection_is_replaced(
    pg_dsn: str, pools: list[Pool], table: str
) -> None:
    # Ports "transaction logs commit status errors and disconnects" (the commit
    # that finds the connection idle), on the server: DBConnection returns
    # {:error, :rollback}; dbpool raises TransactionError with the status found.
    pool, events = start_named(pg_dsn, pools, "dbc-commit-idle")
    entries: list[LogEntry] = []
    with pytest.raises(TransactionError) as info, pool.transaction(log=entries.append) as conn:
        pid = conn.backend_pid
        conn.query(f"INSERT INTO {table} VALUES (1)")
        conn.query("COMMIT")
    assert info.value.status == "idle"
    assert "cannot commit: transaction is not started" in str(info.value)
    assert [(e.call, e.ok) for e in entries] == [("begin", True), ("commit", False)]
    assert entries[1].error is info.value
    events.wait_count(kind("connected"), 2)
    with pool.checkout() as conn:
        assert conn.backend_pid != pid
    assert count(pool, table) == 1  # the SQL COMMIT did commit


def test_close_is_logged_and_releases_the_statement(pg_dsn: str, pools: list[Pool]) -> None:
    # Ports close_test's "close returns ok" and "close logs ok".
    pool, _ = start_named(pg_dsn, pools, "dbc-close")
    entries: list[LogEntry] = []
    query = pool.prepare("dbc_close", "SELECT $1::int")
    assert pool.close_prepared(query, log=entries.append) is None
    (entry,) = entries
    assert (entry.call, entry.query, entry.params, entry.error) == ("close", query, None, None)
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.connection_time >= 0 and entry.decode_time is None
    names = pool.query("SELECT name FROM pg_prepared_statements").rows
    assert ("dbc_close",) not in names
    pool.close_prepared(query)  # closing again is harmless


# -- begin ------------------------------------------------------------------------


def test_a_transaction_calls_begin_then_commit_on_the_same_connection(
    pools: list[Pool]
) -> None:
    # Ports "transaction returns result" (the calls made).
    state = FakeState()
    driver = ScriptedDriver({"connect": [state]})
    pool = start(pools, driver)
    assert pool.transaction(lambda conn: "result") == "result"
    with pool.transaction() as conn:
        assert isinstance(conn, Connection)
    assert sequence(driver) == ["connect", "handle_begin", "handle_commit",
                                "handle_begin", "handle_commit"]
    assert all(state_of(c) is state for c in driver.calls if c.name.startswith("handle_"))


def test_a_begin_error_is_raised_logged_and_the_connection_kept(pools: list[Pool]) -> None:
    # Ports "transaction begin error raises error" and "transaction logs begin error".
    err = boom()
    driver = ScriptedDriver({"handle_begin": [Error(err)]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.transaction(never, log=entries.append)
    assert info.value is err
    (entry,) = entries
    assert (entry.call, entry.query, entry.params, entry.error) == ("begin", "BEGIN", None, err)
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.connection_time >= 0 and entry.decode_time is None
    assert pool.transaction(lambda conn: "result") == "result"
    assert sequence(driver) == ["connect", "handle_begin", "handle_begin", "handle_commit"]
    assert len({id(state_of(c)) for c in calls(driver, "handle_begin")}) == 1


def test_a_raising_begin_propagates_is_logged_and_the_connection_is_replaced(
    pools: list[Pool]
) -> None:
    # Ports "transaction logs begin raise" and "transaction begin raise raises and
    # stops connection": the raise propagates, and a connection whose callback
    # raised is in an unknown state, so it is dropped without a rollback.
    err = boom()
    driver = ScriptedDriver({"handle_begin": [raising(err)]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.transaction(never, log=entries.append)
    assert info.value is err
    assert [(e.call, e.error) for e in entries] == [("begin", err)]
    assert entries[0].pool_time is not None
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "disconnect", "connect"]
    assert pool.transaction(lambda conn: "result") == "result"


def test_a_begin_disconnect_raises_and_the_connection_is_replaced(pools: list[Pool]) -> None:
    # Ports "transaction begin disconnect raises error".
    err = boom()
    driver = ScriptedDriver({"handle_begin": [Disconnect(err)]})
    pool = start(pools, driver)
    with pytest.raises(ConnectionError, match="connection lost: oops") as info:
        pool.transaction(never)
    assert info.value.__cause__ is err
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "disconnect", "connect"]
    (disconnect,) = calls(driver, "disconnect")
    assert disconnect.args[0] is err
    assert state_of(disconnect) is state_of(calls(driver, "handle_begin")[0])


def test_a_begin_disconnect_and_retry_runs_the_transaction_on_a_new_connection(
    pools: list[Pool]
) -> None:
    # Ports "transaction begin disconnect_and_retry succeeds".
    err = boom()
    driver = ScriptedDriver({"handle_begin": [DisconnectAndRetry(err)]})
    pool = start(pools, driver)
    assert pool.transaction(lambda conn: conn.backend_pid) is not None
    assert sequence(driver) == ["connect", "handle_begin", "disconnect", "connect",
                                "handle_begin", "handle_commit"]
    first, second = calls(driver, "handle_begin")
    assert state_of(calls(driver, "disconnect")[0]) is state_of(first)
    assert state_of(second) is not state_of(first)
    assert state_of(calls(driver, "handle_commit")[0]) is state_of(second)


def test_a_begin_disconnect_and_retry_without_retries_raises(pools: list[Pool]) -> None:
    # Ports "transaction begin disconnect_and_retry errors if there are no retries".
    err = boom()
    driver = ScriptedDriver({"handle_begin": [DisconnectAndRetry(err)]})
    pool = start(pools, driver, checkout_retries=0)
    with pytest.raises(ConnectionError, match="connection lost: oops") as info:
        pool.transaction(never)
    assert info.value.__cause__ is err
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "disconnect", "connect"]


@pytest.mark.parametrize("status", ["transaction", "error"])
def test_a_begin_finding_the_wrong_status_raises_transaction_error_and_replaces(
    pools: list[Pool], status: Any
) -> None:
    # Ports "transaction logs begin status errors and disconnects".  DBConnection
    # returns {:error, :rollback}; dbpool raises TransactionError (as documented in
    # dbpool.pool.transaction) and replaces the connection all the same.
    driver = ScriptedDriver({"handle_begin": [WrongStatus(status)]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(TransactionError) as info:
        pool.transaction(never, log=entries.append)
    assert info.value.status == status
    assert [(e.call, e.error) for e in entries] == [("begin", info.value)]
    assert entries[0].pool_time is not None
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "disconnect", "connect"]
    assert calls(driver, "disconnect")[0].args[0] is info.value


# -- commit -----------------------------------------------------------------------


def test_a_commit_error_is_raised_logged_and_the_connection_kept(pools: list[Pool]) -> None:
    # Ports "transaction commit error raises error" and "transaction logs commit error".
    err = boom()
    driver = ScriptedDriver({"handle_commit": [Error(err)]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.transaction(lambda conn: "ok", log=entries.append)
    assert info.value is err
    assert [(e.call, e.error) for e in entries] == [("begin", None), ("commit", err)]
    commit = entries[1]
    assert commit.query == "COMMIT" and commit.params is None
    assert commit.pool_time is None and commit.decode_time is None
    assert commit.connection_time >= 0
    assert pool.transaction(lambda conn: "result") == "result"
    assert sequence(driver) == ["connect", "handle_begin", "handle_commit",
                                "handle_begin", "handle_commit"]
    assert len({id(state_of(c)) for c in calls(driver, "handle_commit")}) == 1


def test_a_commit_disconnect_raises_and_the_connection_is_replaced(pools: list[Pool]) -> None:
    # Ports "transaction commit disconnect raises error".
    err = boom()
    driver = ScriptedDriver({"handle_commit": [Disconnect(err)]})
    pool = start(pools, driver)
    with pytest.raises(ConnectionError, match="connection lost: oops") as info:
        pool.transaction(lambda conn: "result")
    assert info.value.__cause__ is err
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "handle_commit", "disconnect",
                                "connect"]
    assert calls(driver, "disconnect")[0].args[0] is err


def test_a_raising_commit_propagates_is_logged_and_the_connection_is_replaced(
    pools: list[Pool]
) -> None:
    # Ports "transaction commit raise raises and stops connection" and "transaction
    # logs commit raise".
    err = boom()
    driver = ScriptedDriver({"handle_commit": [raising(err)],
                             "handle_status": [Ok("transaction")]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.transaction(lambda conn: "ok", log=entries.append)
    assert info.value is err
    assert [(e.call, e.error) for e in entries] == [("begin", None), ("commit", err)]
    assert entries[1].pool_time is None
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "handle_commit", "disconnect",
                                "connect"]


def test_a_commit_finding_no_transaction_raises_transaction_error_and_replaces(
    pools: list[Pool]
) -> None:
    # Ports "transaction logs commit status errors and disconnects" (status idle).
    driver = ScriptedDriver({"handle_commit": [WrongStatus("idle")]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(TransactionError) as info:
        pool.transaction(lambda conn: "ok", log=entries.append)
    assert info.value.status == "idle"
    assert [(e.call, e.error) for e in entries] == [("begin", None), ("commit", info.value)]
    assert entries[1].pool_time is None
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "handle_commit", "disconnect",
                                "connect"]
    assert calls(driver, "disconnect")[0].args[0] is info.value


def test_a_commit_finding_a_failed_transaction_rolls_back_and_keeps_the_connection(
    pools: list[Pool]
) -> None:
    # Ports "transaction logs commit status errors and disconnects" (status error).
    driver = ScriptedDriver({"handle_commit": [WrongStatus("error")]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RolledBack) as info:
        pool.transaction(lambda conn: "ok", log=entries.append)
    assert info.value.reason == "rollback"
    assert sequence(driver) == ["connect", "handle_begin", "handle_commit", "handle_rollback"]
    assert [e.call for e in entries] == ["begin", "commit", "rollback"]
    refused = entries[1].error
    assert isinstance(refused, TransactionError) and refused.status == "error"
    assert entries[2].error is None
    assert not calls(driver, "disconnect")


# -- rollback ---------------------------------------------------------------------


def test_a_rollback_error_is_raised_instead_of_rolled_back(pools: list[Pool]) -> None:
    # Ports "transaction rollback error raises error".
    err = boom()
    driver = ScriptedDriver({"handle_rollback": [Error(err)]})
    pool = start(pools, driver)
    with pytest.raises(RuntimeError) as info:
        pool.transaction(lambda conn: conn.rollback("oops"))
    assert info.value is err
    assert pool.transaction(lambda conn: "result") == "result"
    assert sequence(driver) == ["connect", "handle_begin", "handle_rollback",
                                "handle_begin", "handle_commit"]
    assert not calls(driver, "disconnect")


def test_a_raising_rollback_propagates_and_is_logged(pools: list[Pool]) -> None:
    # Ports "transaction logs rollback raise".
    err = boom()
    driver = ScriptedDriver({"handle_rollback": [raising(err)]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.transaction(lambda conn: conn.rollback("oops"), log=entries.append)
    assert info.value is err
    assert [(e.call, e.error) for e in entries] == [("begin", None), ("rollback", err)]
    assert entries[1].pool_time is None and entries[1].decode_time is None
    assert sequence(driver)[:3] == ["connect", "handle_begin", "handle_rollback"]


def test_a_rollback_finding_no_transaction_still_ends_in_rolled_back_and_replaces(
    pools: list[Pool]
) -> None:
    # Ports "transaction logs rollback status error and disconnects".
    driver = ScriptedDriver({"handle_rollback": [WrongStatus("idle")]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RolledBack) as info:
        pool.transaction(lambda conn: conn.rollback("oops"), log=entries.append)
    assert info.value.reason == "oops"
    assert [e.call for e in entries] == ["begin", "rollback"]
    rollback_error = entries[1].error
    assert isinstance(rollback_error, TransactionError) and rollback_error.status == "idle"
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "handle_rollback", "disconnect",
                                "connect"]


# -- statements inside a transaction ----------------------------------------------


def test_a_statement_error_inside_a_transaction_does_not_fail_it(pools: list[Pool]) -> None:
    # Ports transaction_execute's "execute returns result", "execute error returns
    # error" and "execute! error raises error": the pool does not fail the
    # transaction on an Error; the server's status decides.
    err = boom()
    ok = Result([], [("row",)], 1, "SELECT 1")
    driver = ScriptedDriver({"handle_execute": [Error(err), Ok(ok)],
                             "handle_status": [Ok("transaction")]})
    pool = start(pools, driver)

    def work(conn: Connection) -> str:
        with pytest.raises(RuntimeError) as info:
            conn.execute(Query("SELECT x"), ["param"])
        assert info.value is err
        assert conn.execute(Query("SELECT x"), ["param"]) is ok
        return "hi"

    assert pool.transaction(work) == "hi"
    assert sequence(driver) == ["connect", "handle_begin", "handle_execute", "handle_execute",
                                "handle_commit"]
    first, second = calls(driver, "handle_execute")
    assert first.args[:2] == (Query("SELECT x"), ["param"])
    assert state_of(first) is state_of(second)


def test_a_disconnect_inside_a_transaction_skips_the_rollback_and_reconnects(
    pools: list[Pool]
) -> None:
    # Ports transaction_execute's "execute disconnect returns error".
    err = boom()
    driver = ScriptedDriver({"handle_execute": [Disconnect(err)]})
    pool = start(pools, driver)

    def work(conn: Connection) -> str:
        with pytest.raises(ConnectionError, match="connection lost: oops"):
            conn.execute(Query("SELECT x"), ["param"])
        with pytest.raises(ConnectionError,
                           match="connection is closed because of an error, disconnect or "
                                 "timeout"):
            conn.execute(Query("SELECT x"), ["param"])
        return "closed"

    with pytest.raises(RolledBack) as info:
        pool.transaction(work)
    assert info.value.reason == "rollback"
    driver.wait_for("connect", 2)
    # The second execute never reached the driver, and no ROLLBACK was sent.
    assert sequence(driver) == ["connect", "handle_begin", "handle_execute", "disconnect",
                                "connect"]
    assert calls(driver, "disconnect")[0].args[0] is err
    first, second = calls(driver, "connect")
    assert first.args == second.args  # the same connect options


def test_a_raising_statement_inside_a_transaction_drops_the_connection(
    pools: list[Pool]
) -> None:
    # Ports transaction_execute's "execute raise raises and stops connection": the
    # raise leaves the block, and the connection, in an unknown state, is
    # replaced rather than sent a ROLLBACK.
    err = boom()
    driver = ScriptedDriver({"handle_execute": [raising(err)]})
    pool = start(pools, driver)
    with pytest.raises(RuntimeError) as info, pool.transaction() as conn:
        conn.execute(Query("SELECT x"), ["param"])
    assert info.value is err
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "handle_execute", "disconnect",
                                "connect"]
    assert pool.query("SELECT 1").command == "SELECT 0"


def test_a_statement_after_an_inner_rollback_drops_the_connection_without_rollback(
    pools: list[Pool]
) -> None:
    # Ports transaction_execute's "execute raises after inner transaction rollback".
    driver = ScriptedDriver()
    pool = start(pools, driver)

    def outer(conn: Connection) -> None:
        with pytest.raises(RolledBack) as inner:
            conn.transaction(lambda c: c.rollback("oops"))
        assert inner.value.reason == "oops"
        with pytest.raises(ConnectionError, match="transaction rolling back"):
            conn.execute(Query("SELECT x"), ["param"])

    with pytest.raises(RolledBack) as info:
        pool.transaction(outer)
    assert info.value.reason == "rollback"
    driver.wait_for("connect", 2)
    assert sequence(driver) == ["connect", "handle_begin", "disconnect", "connect"]


def test_a_transaction_on_a_lost_connection_logs_its_rollback(pools: list[Pool]) -> None:
    # Ports transaction_execute's "transaction logs rollback if closed".
    driver = ScriptedDriver({"handle_execute": [Disconnect(boom())]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []

    def work(conn: Connection) -> None:
        with pytest.raises(ConnectionError):
            conn.execute(Query("SELECT x"), ["param"])

    with pytest.raises(RolledBack):
        pool.transaction(work, log=entries.append)
    assert [e.call for e in entries] == ["begin", "rollback"]
    assert isinstance(entries[1].error, ConnectionError)


@pytest.mark.parametrize("callback", ["handle_begin", "handle_commit", "handle_execute"])
def test_a_bad_return_value_raises_connection_error_and_replaces_the_connection(
    pools: list[Pool], callback: str
) -> None:
    # Ports "transaction begin bad return raises and stops connection", "transaction
    # commit bad return raises and stops connection" and transaction_execute's
    # "execute bad return raises DBConnection.ConnectionError and stops".
    driver = ScriptedDriver({callback: ["oops"]})
    pool = start(pools, driver)

    def work(conn: Connection) -> str:
        conn.execute(Query("SELECT x"), ["param"])
        return "result"

    with pytest.raises(ConnectionError, match="bad return value: 'oops'"):
        pool.transaction(work)
    driver.wait_for("connect", 2)
    assert "disconnect" in sequence(driver)


# -- status and run ---------------------------------------------------------------


class StatusBox:
    """A handle_status script entry that answers whatever the test set last."""

    def __init__(self) -> None:
        self.answer: Any = Ok("idle")

    def __call__(self, opts: Any, state: Any) -> Any:
        return self.answer


def status_driver(box: StatusBox, **script: Any) -> ScriptedDriver:
    return ScriptedDriver({"handle_status": [box] * 100, **script})


def test_status_reports_the_driver_status_and_a_lost_connection_is_replaced(
    pools: list[Pool]
) -> None:
    # Ports "status returns result" and "status disconnect returns error": a
    # status call that disconnects answers "error", and the connection is replaced.
    box = StatusBox()
    driver = status_driver(box)
    pool = start(pools, driver)
    for status in ("idle", "transaction", "error"):
        box.answer = Ok(status)
        assert pool.status() == status
        assert pool.status(queue=False) == status
    err = boom()
    box.answer = Disconnect(err)
    assert pool.status() == "error"
    box.answer = Ok("idle")
    driver.wait_for("connect", 2)
    disconnect = calls(driver, "disconnect")[0]
    assert disconnect.args[0] is err
    assert pool.status() == "idle"
    assert state_of(calls(driver, "handle_status")[-1]) is not state_of(disconnect)
    pool.stop()
    assert pool.status() == "error"  # no connection to be had


def test_status_disconnect_and_retry_is_retried_on_a_new_connection(pools: list[Pool]) -> None:
    # Ports "status disconnect_and_retry succeeds".
    err = boom()
    driver = ScriptedDriver({"handle_status": [DisconnectAndRetry(err)]})
    pool = start(pools, driver)
    assert pool.status() == "idle"
    assert sequence(driver, status=True)[:5] == [
        "connect", "handle_status", "disconnect", "connect", "handle_status"]
    statuses = calls(driver, "handle_status")
    assert state_of(calls(driver, "disconnect")[0]) is state_of(statuses[0])
    assert state_of(statuses[1]) is not state_of(statuses[0])


def test_run_keeps_a_connection_whose_status_did_not_change(pools: list[Pool]) -> None:
    # Ports "status returns result on successful run".
    box = StatusBox()
    box.answer = Ok("transaction")
    driver = status_driver(box)
    pool = start(pools, driver)
    assert pool.run(lambda conn: "ok") == "ok"
    assert sequence(driver, status=True)[:3] == ["connect", "handle_status", "handle_status"]
    assert not calls(driver, "disconnect")


def test_a_connection_lost_inside_run_fails_later_calls_and_is_replaced(
    pools: list[Pool]
) -> None:
    # Ports "status returns result on disconnect run".
    box = StatusBox()
    box.answer = Ok("error")
    driver = status_driver(box)
    pool = start(pools, driver)
    err = boom()

    def work(conn: Connection) -> str:
        box.answer = Disconnect(err)
        assert pool.status(queue=False) == "error"  # this thread's connection
        asked = len(calls(driver, "handle_status"))
        assert conn.status() == "error"
        assert len(calls(driver, "handle_status")) == asked  # lost: not asked again
        with pytest.raises(ConnectionError, match="connection is closed because of an error"):
            conn.query("SELECT 1")
        return "done"

    assert pool.run(work) == "done"
    box.answer = Ok("idle")
    driver.wait_for("connect", 2)
    assert sequence(driver, status=True) == [
        "connect", "handle_status", "handle_status", "disconnect", "connect"]
    assert calls(driver, "disconnect")[0].args[0] is err


def test_a_transaction_inside_run_sends_one_begin_and_commit(pools: list[Pool]) -> None:
    # Ports "transaction inside run".
    driver = ScriptedDriver()
    pool = start(pools, driver)

    def work(conn: Connection) -> Any:
        return pool.transaction(lambda tx: (tx is conn, "result"))

    assert pool.run(work) == (True, "result")
    assert sequence(driver) == ["connect", "handle_begin", "handle_commit"]
    statuses = sequence(driver, status=True)
    assert statuses[1] == "handle_status"  # run reads the status before fn


# -- clients: deadlines and outdated references ----------------------------------------


@pytest.mark.parametrize("outcome", ["ok", "disconnect", "raise"])
def test_a_call_running_past_the_deadline_finishes_while_the_slot_serves_others(
    pools: list[Pool], outcome: str
) -> None:
    # Ports client_test's "reconnect when client timeout", "reconnect when client
    # timeout and then returns ok even when disconnected", "... and then returns
    # error when disconnected" and "... and then crashes".
    reconnected = threading.Event()
    first = FakeState()

    def second_connect(opts: Any) -> FakeState:
        reconnected.set()
        return FakeState()

    other: dict[str, Any] = {}
    returned_at: list[float] = []
    result = Result([], [("first",)], 1, "SELECT 1")
    err = boom()

    def overdue_call(query: Query, params: Any, opts: Any, state: Any) -> Any:
        assert reconnected.wait(5), "the slot was not given a new connection"

        def use_the_slot() -> None:
            other["pid"] = pool.run(lambda conn: conn.backend_pid, timeout=5)

        thread = threading.Thread(target=use_the_slot)
        thread.start()
        thread.join(5)
        assert not thread.is_alive()
        returned_at.append(time.monotonic())
        if outcome == "ok":
            return Ok(result)
        if outcome == "disconnect":
            return Disconnect(ConnectionError("oops"))
        raise err

    driver = ScriptedDriver({"connect": [first, second_connect],
                             "handle_execute": [overdue_call]})
    pool = start(pools, driver)

    def work(conn: Connection) -> Result:
        return conn.execute(Query("SELECT first"), ["first"])

    if outcome == "ok":
        assert pool.run(work, timeout=0.2) is result
    elif outcome == "disconnect":
        with pytest.raises(ConnectionError) as info:
            pool.run(work, timeout=0.2)
        assert info.value.reason == "deadline"
    else:
        with pytest.raises(RuntimeError) as raised:
            pool.run(work, timeout=0.2)
        assert raised.value is err
    # Another caller had the slot's new connection while the call was running.
    assert other["pid"] not in (None, first.backend_pid)
    # The overdue holder closed its old connection itself, once its call returned.
    (disconnect,) = calls(driver, "disconnect")
    assert state_of(disconnect) is first
    assert disconnect.at >= returned_at[0]
    pool.execute(Query("SELECT second"), ["second"])
    last = calls(driver, "handle_execute")[-1]
    assert last.args[1] == ["second"] and state_of(last).backend_pid == other["pid"]


def test_an_outdated_connection_is_refused_even_while_its_slot_is_lent_again(
    pools: list[Pool]
) -> None:
    # Ports client_test's "fails when using an outdated connection reference".
    driver = ScriptedDriver()
    pool = start(pools, driver)
    outdated = pool.run(lambda conn: conn)
    with pytest.raises(ConnectionError, match="outdated connection"):
        outdated.execute(Query("SELECT x"), ["first"])

    def again(conn: Connection) -> None:
        assert conn.index == outdated.index  # the same slot, lent again
        with pytest.raises(ConnectionError, match="outdated connection"):
            outdated.execute(Query("SELECT x"), ["first"])

    pool.run(again)
    assert not calls(driver, "handle_execute")
    assert not calls(driver, "disconnect")


# -- close ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["error", "raise"])
def test_a_close_error_is_raised_and_logged(pools: list[Pool], how: str) -> None:
    # Ports close_test's "close error returns error", "close logs error", "close!
    # error raises error" and "close logs raise": an error keeps the connection, a
    # raise replaces it.
    err = boom()
    driver = ScriptedDriver({"handle_close": [Error(err) if how == "error" else raising(err)]})
    pool = start(pools, driver)
    entries: list[LogEntry] = []
    query = Query("SELECT 1", "q")
    with pytest.raises(RuntimeError) as info:
        pool.close_prepared(query, log=entries.append)
    assert info.value is err
    (entry,) = entries
    assert (entry.call, entry.query, entry.params, entry.error) == ("close", query, None, err)
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.connection_time >= 0 and entry.decode_time is None
    assert calls(driver, "handle_close")[0].args[0] is query
    if how == "error":
        assert sequence(driver) == ["connect", "handle_close"]
    else:
        driver.wait_for("connect", 2)
        assert sequence(driver) == ["connect", "handle_close", "disconnect", "connect"]
    pool.close_prepared(query)
    assert len(calls(driver, "disconnect")) == (how == "raise")


def test_close_is_allowed_in_a_failed_transaction_which_then_rolls_back(
    pools: list[Pool]
) -> None:
    # Ports close_test's "close in failed transaction".
    driver = ScriptedDriver()
    pool = start(pools, driver)
    query = Query("SELECT 1", "q")

    def outer(conn: Connection) -> None:
        with pytest.raises(RolledBack):
            conn.transaction(lambda c: c.rollback("oops"))
        assert conn.close_prepared(query) is None
        assert pool.close_prepared(query) is None  # on this thread's connection

    with pytest.raises(RolledBack) as info:
        pool.transaction(outer)
    assert info.value.reason == "rollback"
    assert sequence(driver) == ["connect", "handle_begin", "handle_close", "handle_close",
                                "handle_rollback"]
    assert not calls(driver, "disconnect")
