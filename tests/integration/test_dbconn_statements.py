"""Prepared statements, execute and streams: db_connection's integration cases, ported.

The cases are ``prepare_test.exs``, ``execute_test.exs``,
``prepare_execute_test.exs``, ``stream_test.exs`` and ``prepare_stream_test.exs``
of db_connection, with the log entries they check.  What a callback's return
makes the pool do (``Error`` keeps the connection, ``Disconnect`` replaces it,
``DisconnectAndRetry`` runs the call again, a raise) is driven by the
:class:`ScriptedDriver`, db_connection's TestConnection; what PostgreSQL itself
does (prepare then execute, SQL errors, cursors) runs on the real server.

Python forms: ``{:error, err}`` is ``err`` raised; ``{:error, :rollback}`` is
:class:`RolledBack`; ``Enum.take(stream, 1)`` is one ``next()`` on a stream
closed by its ``with`` block.

Every case runs against both pool kinds, as db_connection runs these cases
against DBConnection.ConnectionPool and DBConnection.Ownership: the plain pool
and the ownership pool in auto mode (``pool_kind``, see tests/support/pools.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
import pytest

from dbpool.actors.listeners import ConnectionEvent
from dbpool.driver import Disconnect, DisconnectAndRetry, Error, Ok, Query, Result
from dbpool.errors import ConnectionError, RolledBack
from dbpool.pool import Pool
from dbpool.pool.logentry import LogEntry
from tests.support.events import Recorder, kind
from tests.support.pools import POOL_KINDS, kind_options, start_named
from tests.support.scripted import ScriptedDriver

pytestmark = pytest.mark.parametrize("pool_kind", POOL_KINDS, indirect=True)

#: The driver calls db_connection's TestAgent records (it never records checkout or status).
#: The decode time the scripted driver reports (seconds).
DECODE = 0.005

RECORDED = frozenset({
    "connect", "disconnect", "handle_begin", "handle_commit", "handle_rollback",
    "handle_prepare", "handle_execute", "handle_close", "handle_declare", "handle_fetch",
    "handle_deallocate",
})


class TxDriver(ScriptedDriver):
    """A ScriptedDriver whose transaction status follows its begin, commit and rollback."""

    def handle_begin(self, opts: Any, state: Any) -> Any:
        outcome = super().handle_begin(opts, state)
        if isinstance(outcome, Ok):
            state.tx = "transaction"
        return outcome

    def handle_commit(self, opts: Any, state: Any) -> Any:
        outcome = super().handle_commit(opts, state)
        if isinstance(outcome, Ok):
            state.tx = "idle"
        return outcome

    def handle_rollback(self, opts: Any, state: Any) -> Any:
        outcome = super().handle_rollback(opts, state)
        if isinstance(outcome, Ok):
            state.tx = "idle"
        return outcome

    def handle_status(self, opts: Any, state: Any) -> Any:
        return self._answer("handle_status", (opts, state),
                            lambda: Ok(getattr(state, "tx", "idle")))


def scripted(
    pools: list[Pool], driver: ScriptedDriver, **options: Any
) -> tuple[Pool, Recorder[ConnectionEvent]]:
    """A one-connection pool of the test's kind on ``driver``, once connected; no idle
    pings."""
    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start("scripted", driver=driver, pool_size=1, idle_interval=30.0,
                      connection_listeners=[events], backoff_type="exp", backoff_min=0.01,
                      backoff_max=0.05, **{**kind_options(pools), **options})
    pools.append(pool)
    events.wait_count(kind("connected"), 1)
    return pool, events


def record(driver: ScriptedDriver) -> list[str]:
    """The names of the recorded driver calls, in order."""
    return [c.name for c in driver.calls if c.name in RECORDED]


def calls(driver: ScriptedDriver, name: str) -> list[tuple[Any, ...]]:
    return [c.args for c in driver.calls if c.name == name]


def result(*rows: Any, decode_time: float | None = None) -> Result:
    made = Result([], [tuple(r) for r in rows], len(rows), f"SELECT {len(rows)}")
    made.decode_time = decode_time
    return made


def decoding(outcome: Any, decode_time: float = DECODE) -> Any:
    """A script entry: a call that takes 2 * decode_time, reporting decode_time of it
    as decoding when the pool asks for timing (``opts["timed"]``, set only when it logs)."""

    def answer(*args: Any) -> Any:
        time.sleep(2 * decode_time)  # the "database" working, not a synchronisation
        value = outcome.value
        batch = value[-1] if isinstance(value, tuple) else value
        batch.decode_time = decode_time if args[-2].get("timed") else None
        return outcome

    return answer


# -- prepare (prepare_test.exs) --------------------------------------------------


def test_prepare_returns_the_drivers_query_each_time(pools: list[Pool]) -> None:
    # prepare_test: "prepare returns query"
    prepared = Query("SELECT 1 -- as prepared", "one")
    driver = ScriptedDriver({"handle_prepare": [Ok(prepared), Ok(prepared)]})
    pool, _ = scripted(pools, driver)
    assert pool.prepare("one", "SELECT 1") is prepared
    assert pool.prepare("one", "SELECT 1", timeout=5.0) is prepared
    assert record(driver) == ["connect", "handle_prepare", "handle_prepare"]
    first, second = calls(driver, "handle_prepare")
    assert first[0] == Query("SELECT 1", "one") and second[0] == Query("SELECT 1", "one")
    assert first[2] is second[2]  # the same connection, kept between calls


def test_prepare_logs_its_query_and_result_with_no_params_and_no_decode_time(
    pools: list[Pool]
) -> None:
    # prepare_test: "prepare logs result"
    prepared = Query("SELECT 1", "one")
    driver = ScriptedDriver({"handle_prepare": [Ok(prepared)]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    assert pool.prepare("one", "SELECT 1", log=entries.append) is prepared
    (entry,) = entries
    assert (entry.call, entry.query, entry.params) == ("prepare", Query("SELECT 1", "one"), None)
    assert entry.result is prepared and entry.error is None and entry.ok
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.idle_time is not None and entry.idle_time >= 0
    assert entry.connection_time >= 0
    assert entry.decode_time is None


def test_a_prepare_error_is_raised_as_is_and_keeps_the_connection(pools: list[Pool]) -> None:
    # prepare_test: "prepare error returns error" and "prepare! error raises error"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_prepare": [Error(err)]})
    pool, _ = scripted(pools, driver)
    with pytest.raises(RuntimeError) as info:
        pool.prepare("one", "SELECT 1")
    assert info.value is err
    assert pool.prepare("one", "SELECT 1") == Query("SELECT 1", "one")
    assert record(driver) == ["connect", "handle_prepare", "handle_prepare"]
    first, second = calls(driver, "handle_prepare")
    assert first[2] is second[2]


def test_a_prepare_error_is_logged_with_the_error_and_times(pools: list[Pool]) -> None:
    # prepare_test: "prepare logs error"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_prepare": [Error(err)]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError):
        pool.prepare("one", "SELECT 1", log=entries.append)
    (entry,) = entries
    assert (entry.call, entry.query, entry.params) == ("prepare", Query("SELECT 1", "one"), None)
    assert entry.error is err and entry.result is None and not entry.ok
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.connection_time >= 0
    assert entry.decode_time is None


def test_a_raising_prepare_propagates_its_exception_and_is_logged(pools: list[Pool]) -> None:
    # prepare_test: "prepare logs raise" (the raise and its log entry)
    boom = RuntimeError("oops")
    driver = ScriptedDriver({"handle_prepare": [boom]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.prepare("one", "SELECT 1", log=entries.append)
    assert info.value is boom
    (entry,) = entries
    assert (entry.call, entry.error, entry.result) == ("prepare", boom, None)
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.connection_time >= 0 and entry.decode_time is None


# -- execute (execute_test.exs) ---------------------------------------------------


def test_execute_returns_the_drivers_result_for_the_query_and_params(pools: list[Pool]) -> None:
    # execute_test: "execute returns result"
    first, second = result((1,)), result((2,))
    driver = ScriptedDriver({"handle_execute": [Ok(first), Ok(second)]})
    pool, _ = scripted(pools, driver)
    query = Query("SELECT $1", "q")
    assert pool.execute(query, [7]) is first
    assert pool.execute(query, [7], queue=True) is second
    assert record(driver) == ["connect", "handle_execute", "handle_execute"]
    (q1, p1, _, s1), (q2, p2, _, s2) = calls(driver, "handle_execute")
    assert (q1, p1) == (query, [7]) and (q2, p2) == (query, [7])
    assert s1 is s2


def test_execute_logs_query_params_result_and_the_drivers_decode_time(
    pools: list[Pool]
) -> None:
    # execute_test: "execute logs result"
    driver = ScriptedDriver({"handle_execute": [decoding(Ok(result((1,))))]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    query = Query("SELECT $1", "q")
    assert pool.execute(query, [1], log=entries.append).rows == [(1,)]
    (entry,) = entries
    assert (entry.call, entry.query, entry.params) == ("execute", query, [1])
    assert entry.result.rows == [(1,)] and entry.error is None
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.decode_time == DECODE
    # connection_time is the call's time with the decode time taken out.
    assert entry.connection_time >= DECODE


def test_an_execute_error_is_raised_logged_and_keeps_the_connection(pools: list[Pool]) -> None:
    # execute_test: "execute error returns error", "execute logs error", "execute! error raises"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_execute": [Error(err)]})
    pool, events = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.execute(Query("SELECT $1", "q"), [1], log=entries.append)
    assert info.value is err
    (entry,) = entries
    assert (entry.call, entry.params, entry.error, entry.result) == ("execute", [1], err, None)
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.connection_time >= 0 and entry.decode_time is None
    pool.execute(Query("SELECT $1", "q"), [2])
    assert record(driver) == ["connect", "handle_execute", "handle_execute"]
    s1, s2 = (args[3] for args in calls(driver, "handle_execute"))
    assert s1 is s2 and not s1.closed
    assert [e.kind for e in events.values()] == ["connected"]


def test_execute_disconnect_raises_connection_error_and_replaces_the_connection(
    pools: list[Pool]
) -> None:
    # execute_test: "execute disconnect returns error"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_execute": [Disconnect(err)]})
    pool, events = scripted(pools, driver)
    with pytest.raises(ConnectionError, match="connection lost: oops") as info:
        pool.execute(Query("SELECT $1", "q"), [1])
    assert info.value.__cause__ is err
    events.wait_count(kind("connected"), 2)
    assert record(driver) == ["connect", "handle_execute", "disconnect", "connect"]
    (execute,) = calls(driver, "handle_execute")
    (disconnect,) = calls(driver, "disconnect")
    assert disconnect == (err, execute[3])  # the error, and the connection that failed
    connects = calls(driver, "connect")
    assert connects[0] == connects[1]  # reconnected with the same options


def test_execute_disconnect_and_retry_runs_again_on_a_new_connection(pools: list[Pool]) -> None:
    # execute_test: "execute disconnect_and_retry succeeds"
    err = RuntimeError("oops")
    done = result((42,))
    driver = ScriptedDriver({"handle_execute": [DisconnectAndRetry(err), Ok(done)]})
    pool, _ = scripted(pools, driver)
    query = Query("SELECT $1", "q")
    assert pool.execute(query, [1]) is done
    assert record(driver) == ["connect", "handle_execute", "disconnect", "connect",
                              "handle_execute"]
    first, second = calls(driver, "handle_execute")
    assert calls(driver, "disconnect") == [(err, first[3])]
    assert second[:2] == (query, [1]) and second[3] is not first[3]


def test_execute_disconnect_and_retry_with_no_retries_left_raises(pools: list[Pool]) -> None:
    # execute_test: "execute disconnect_and_retry errors if there are no retries"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_execute": [DisconnectAndRetry(err)]})
    pool, events = scripted(pools, driver, checkout_retries=0)
    with pytest.raises(ConnectionError, match="connection lost: oops") as info:
        pool.execute(Query("SELECT $1", "q"), [1])
    assert info.value.__cause__ is err
    events.wait_count(kind("connected"), 2)
    assert record(driver) == ["connect", "handle_execute", "disconnect", "connect"]


def test_a_raising_execute_propagates_its_exception_and_is_logged(pools: list[Pool]) -> None:
    # execute_test: "execute logs raise" (the raise and its log entry)
    boom = RuntimeError("oops")
    driver = ScriptedDriver({"handle_execute": [boom]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.execute(Query("SELECT $1", "q"), [1], log=entries.append)
    assert info.value is boom
    (entry,) = entries
    assert (entry.call, entry.params, entry.error, entry.result) == ("execute", [1], boom, None)
    assert entry.pool_time is not None and entry.connection_time >= 0
    assert entry.decode_time is None


@pytest.mark.parametrize("call", ["prepare", "execute", "prepare_execute"])
def test_a_connection_whose_callback_raised_is_disconnected_and_replaced(
    pools: list[Pool], call: str
) -> None:
    # execute_test: "execute raise raises and stops connection"; prepare_test: "prepare logs
    # raise"; prepare_execute_test: "prepare_execute logs prepare raise"
    boom = RuntimeError("oops")
    callback = "handle_prepare" if call.startswith("prepare") else "handle_execute"
    driver = ScriptedDriver({callback: [boom]})
    pool, _ = scripted(pools, driver)
    args = {"prepare": ("q", "SELECT 1"), "execute": (Query("SELECT 1", "q"), [1]),
            "prepare_execute": ("q", "SELECT 1", [1])}[call]
    with pytest.raises(RuntimeError):
        getattr(pool, call)(*args)
    failed = driver.calls_to(callback)[0].args[-1]
    pool.query("SELECT 1")  # checks out whatever connection the slot has now
    assert driver.calls_to("handle_execute")[-1].args[-1] is not failed
    assert failed.closed
    assert record(driver)[:4] == ["connect", callback, "disconnect", "connect"]


def test_a_bad_return_raises_connection_error_and_replaces_the_connection(
    pools: list[Pool]
) -> None:
    # execute_test: "execute bad return raises DBConnection.ConnectionError and stops"
    driver = ScriptedDriver({"handle_execute": ["oops"]})
    pool, events = scripted(pools, driver)
    with pytest.raises(ConnectionError, match="bad return value: 'oops'"):
        pool.execute(Query("SELECT 1", "q"), [1])
    events.wait_count(kind("connected"), 2, timeout=2.0)
    assert record(driver) == ["connect", "handle_execute", "disconnect", "connect"]


# -- prepare_execute (prepare_execute_test.exs) -------------------------------------


def test_prepare_execute_executes_the_query_prepare_returned(pools: list[Pool]) -> None:
    # prepare_execute_test: "prepare_execute returns query and result"
    prepared = Query("SELECT $1 -- prepared", "q")
    done = result((1,))
    driver = ScriptedDriver({"handle_prepare": [Ok(prepared)], "handle_execute": [Ok(done)]})
    pool, _ = scripted(pools, driver)
    query, res = pool.prepare_execute("q", "SELECT $1", [1])
    assert query is prepared and res is done
    assert record(driver) == ["connect", "handle_prepare", "handle_execute"]
    (prepare,) = calls(driver, "handle_prepare")
    (execute,) = calls(driver, "handle_execute")
    assert prepare[0] == Query("SELECT $1", "q")
    assert execute[0] is prepared and execute[1] == [1]
    assert prepare[2] is execute[3]


def test_prepare_execute_logs_one_entry_with_query_result_and_decode_time(
    pools: list[Pool]
) -> None:
    # prepare_execute_test: "prepare_execute logs result"
    done = result((1,))
    driver = ScriptedDriver({"handle_execute": [decoding(Ok(done))]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    pool.prepare_execute("q", "SELECT $1", [1], log=entries.append)
    (entry,) = entries
    assert (entry.call, entry.query, entry.params) == (
        "prepare_execute", Query("SELECT $1", "q"), [1])
    assert entry.result == (Query("SELECT $1", "q"), done) and entry.error is None
    assert entry.pool_time is not None and entry.pool_time >= 0
    assert entry.connection_time >= DECODE and entry.decode_time == DECODE


def test_a_prepare_execute_whose_prepare_fails_raises_logs_and_does_not_execute(
    pools: list[Pool]
) -> None:
    # prepare_execute_test: "prepare_execute prepare error returns error", "... logs error",
    # "prepare_execute! error raises error"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_prepare": [Error(err)]})
    pool, events = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.prepare_execute("q", "SELECT $1", [1], log=entries.append)
    assert info.value is err
    assert record(driver) == ["connect", "handle_prepare"]
    (entry,) = entries
    assert (entry.call, entry.params, entry.error) == ("prepare_execute", [1], err)
    assert entry.pool_time is not None and entry.connection_time >= 0
    assert entry.decode_time is None
    assert [e.kind for e in events.values()] == ["connected"]


def test_a_prepare_execute_whose_execute_raises_propagates_and_is_logged(
    pools: list[Pool]
) -> None:
    # prepare_execute_test: "prepare_execute logs execute raise" (the raise and its log entry)
    boom = RuntimeError("oops")
    driver = ScriptedDriver({"handle_execute": [boom]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RuntimeError) as info:
        pool.prepare_execute("q", "SELECT $1", [1], log=entries.append)
    assert info.value is boom
    assert record(driver) == ["connect", "handle_prepare", "handle_execute"]
    (entry,) = entries
    assert (entry.call, entry.error, entry.decode_time) == ("prepare_execute", boom, None)


def test_a_prepare_execute_whose_execute_disconnects_replaces_the_connection(
    pools: list[Pool]
) -> None:
    # prepare_execute_test: "prepare_execute execute disconnect returns error"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_execute": [Disconnect(err)]})
    pool, events = scripted(pools, driver)
    with pytest.raises(ConnectionError, match="connection lost") as info:
        pool.prepare_execute("q", "SELECT $1", [1])
    assert info.value.__cause__ is err
    events.wait_count(kind("connected"), 2)
    assert record(driver) == ["connect", "handle_prepare", "handle_execute", "disconnect",
                              "connect"]
    (execute,) = calls(driver, "handle_execute")
    assert calls(driver, "disconnect") == [(err, execute[3])]


def test_a_prepare_execute_lost_before_effect_is_retried_whole(pools: list[Pool]) -> None:
    # prepare_execute_test: "prepare_execute execute disconnect_and_retry succeeds"
    err = RuntimeError("oops")
    driver = ScriptedDriver({"handle_prepare": [DisconnectAndRetry(err)]})
    pool, _ = scripted(pools, driver)
    query, res = pool.prepare_execute("q", "SELECT $1", [1])
    assert query == Query("SELECT $1", "q") and res.command == "SELECT 0"
    assert record(driver) == ["connect", "handle_prepare", "disconnect", "connect",
                              "handle_prepare", "handle_execute"]
    first, second = calls(driver, "handle_prepare")
    assert first[2] is not second[2] and first[2].closed


# -- streams on the scripted driver (stream_test.exs) ----------------------------------


def test_a_stream_yields_each_batch_then_deallocates_and_commits(pools: list[Pool]) -> None:
    # stream_test: "stream returns result"
    cursor = object()
    one, two = result((1,), (2,)), result((3,))
    driver = TxDriver({"handle_declare": [Ok(cursor)],
                       "handle_fetch": [Ok(("cont", one)), Ok(("halt", two))]})
    pool, _ = scripted(pools, driver)
    query = Query("SELECT x")
    with pool.transaction() as conn:
        assert list(conn.stream(query, [1], max_rows=2)) == [one, two]
    assert record(driver) == ["connect", "handle_begin", "handle_declare", "handle_fetch",
                              "handle_fetch", "handle_deallocate", "handle_commit"]
    (declare,) = calls(driver, "handle_declare")
    assert declare[:2] == (query, [1])
    for fetch in calls(driver, "handle_fetch"):
        assert fetch[0] is query and fetch[1] is cursor and fetch[2]["max_rows"] == 2
    (deallocate,) = calls(driver, "handle_deallocate")
    assert deallocate[:2] == (query, cursor)


def test_a_stream_logs_declare_fetch_and_deallocate_without_the_checkouts_times(
    pools: list[Pool]
) -> None:
    # stream_test: "stream logs result"
    cursor = object()
    batch = result((1,))
    driver = TxDriver({"handle_declare": [Ok(cursor)],
                       "handle_fetch": [decoding(Ok(("cont", batch)))]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pool.transaction(log=entries.append) as conn, conn.stream(
            "SELECT x", [1], log=entries.append) as stream:
        assert next(iter(stream)) is batch
    begin, declare, fetch, deallocate, commit = entries
    assert (begin.call, commit.call) == ("begin", "commit")
    assert begin.pool_time is not None and begin.idle_time is not None
    assert (declare.call, declare.query, declare.params) == ("declare", Query("SELECT x"), [1])
    assert declare.result is cursor and declare.decode_time is None
    assert fetch.call == "fetch" and fetch.result == ("cont", batch)
    assert fetch.decode_time == DECODE and fetch.connection_time >= DECODE
    assert deallocate.call == "deallocate" and deallocate.ok and deallocate.decode_time is None
    for entry in (declare, fetch, deallocate, commit):
        # The checkout's first call, its begin, took its pool and idle times.
        assert entry.pool_time is None and entry.idle_time is None
        assert entry.connection_time >= 0
    assert record(driver)[-3:] == ["handle_fetch", "handle_deallocate", "handle_commit"]


def test_a_stream_declare_error_is_raised_and_logged_and_the_transaction_commits(
    pools: list[Pool]
) -> None:
    # stream_test: "stream logs declare error"
    err = RuntimeError("oops")
    driver = TxDriver({"handle_declare": [Error(err)]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []

    def work(conn: Any) -> str:
        with pytest.raises(RuntimeError) as info:
            next(iter(conn.stream("SELECT x", [1], log=entries.append)))
        assert info.value is err
        return "hi"

    assert pool.transaction(work, log=entries.append) == "hi"
    assert [e.call for e in entries] == ["begin", "declare", "commit"]
    entry = entries[1]
    assert (entry.call, entry.params, entry.error) == ("declare", [1], err)
    assert entry.pool_time is None and entry.connection_time >= 0 and entry.decode_time is None
    assert record(driver) == ["connect", "handle_begin", "handle_declare", "handle_commit"]


def test_a_stream_declare_disconnect_rolls_back_the_transaction_and_reconnects(
    pools: list[Pool]
) -> None:
    # stream_test: "stream declare disconnects"
    err = RuntimeError("oops")
    driver = TxDriver({"handle_declare": [Disconnect(err)]})
    pool, events = scripted(pools, driver)

    def work(conn: Any) -> str:
        with pytest.raises(ConnectionError, match="connection lost: oops"):
            next(iter(conn.stream("SELECT x", [1])))
        return "hi"

    with pytest.raises(RolledBack) as info:
        pool.transaction(work)
    assert info.value.reason == "rollback"
    events.wait_count(kind("connected"), 2)
    # No ROLLBACK is sent on a lost connection: it is closed instead.
    assert record(driver) == ["connect", "handle_begin", "handle_declare", "disconnect",
                              "connect"]
    (declare,) = calls(driver, "handle_declare")
    assert calls(driver, "disconnect") == [(err, declare[3])]


def test_a_stream_fetch_disconnect_is_logged_and_rolls_back_and_reconnects(
    pools: list[Pool]
) -> None:
    # stream_test: "stream logs first disconnects" (declare and fetch entries, the calls)
    err = RuntimeError("oops")
    driver = TxDriver({"handle_fetch": [Disconnect(err)]})
    pool, events = scripted(pools, driver)
    entries: list[LogEntry] = []

    def work(conn: Any) -> str:
        with pytest.raises(ConnectionError, match="connection lost: oops"):
            next(iter(conn.stream("SELECT x", [1], log=entries.append)))
        return "hi"

    with pytest.raises(RolledBack):
        pool.transaction(work)
    assert [e.call for e in entries][:2] == ["declare", "fetch"]
    fetch = entries[1]
    assert isinstance(fetch.error, ConnectionError) and fetch.error.__cause__ is err
    assert fetch.pool_time is None and fetch.connection_time >= 0 and fetch.decode_time is None
    events.wait_count(kind("connected"), 2)
    # The lost connection gets no deallocate and no rollback: it is closed.
    assert record(driver) == ["connect", "handle_begin", "handle_declare", "handle_fetch",
                              "disconnect", "connect"]


def test_a_stream_deallocate_on_a_lost_connection_is_logged_as_connection_closed(
    pools: list[Pool]
) -> None:
    # stream_test: "stream logs first disconnects" (the deallocate entry)
    driver = TxDriver({"handle_fetch": [Disconnect(RuntimeError("oops"))]})
    pool, _ = scripted(pools, driver)
    entries: list[LogEntry] = []
    with pytest.raises(RolledBack), pool.transaction() as conn, pytest.raises(ConnectionError):
        next(iter(conn.stream("SELECT x", [1], log=entries.append)))
    assert [e.call for e in entries] == ["declare", "fetch", "deallocate"]
    deallocate = entries[2]
    assert isinstance(deallocate.error, ConnectionError)
    assert "connection is closed" in str(deallocate.error)
    assert deallocate.pool_time is None and deallocate.connection_time >= 0


def test_a_stream_on_a_lost_connection_says_it_is_closed(pools: list[Pool]) -> None:
    # Not "needs a transaction": the transaction is there, its connection is not.
    driver = TxDriver({"handle_execute": [Disconnect(RuntimeError("oops"))]})
    pool, _ = scripted(pools, driver)
    with pytest.raises(RolledBack), pool.transaction() as conn:
        with pytest.raises(ConnectionError, match="connection lost"):
            conn.query("SELECT x")
        with pytest.raises(ConnectionError, match="connection is closed"):
            next(iter(conn.stream("SELECT x")))
    assert "handle_declare" not in record(driver)


def test_a_stream_fetch_error_still_deallocates_and_the_fetch_error_wins(
    pools: list[Pool]
) -> None:
    # stream_test: "stream deallocates after transaction failed" (deallocate after a failure)
    err = RuntimeError("fetch failed")
    driver = TxDriver({"handle_fetch": [Ok(("cont", result((1,)))), Error(err)],
                       "handle_deallocate": [Error(RuntimeError("deallocate failed"))]})
    pool, _ = scripted(pools, driver)
    with pool.transaction() as conn:
        seen = []
        with pytest.raises(RuntimeError) as info:
            for batch in conn.stream("SELECT x", max_rows=1):
                seen.append(batch.rows)
        assert info.value is err and seen == [[(1,)]]
    assert record(driver)[1:] == ["handle_begin", "handle_declare", "handle_fetch",
                                  "handle_fetch", "handle_deallocate", "handle_commit"]


def test_a_stream_deallocates_after_an_inner_rollback_and_the_outer_one_rolls_back(
    pools: list[Pool]
) -> None:
    # stream_test: "stream deallocates after transaction failed"
    class Escape(Exception):
        pass

    driver = TxDriver({"handle_fetch": [Ok(("cont", result((1,))))]})
    pool, _ = scripted(pools, driver)

    def work(conn: Any) -> None:
        with pytest.raises(Escape), conn.stream("SELECT x", [1]) as stream:
            for _batch in stream:
                with pytest.raises(RolledBack) as inner:
                    conn.transaction(lambda c: c.rollback("oops"))
                assert inner.value.reason == "oops"
                raise Escape

    with pytest.raises(RolledBack) as outer:
        pool.transaction(work)
    assert outer.value.reason == "rollback"
    assert record(driver) == ["connect", "handle_begin", "handle_declare", "handle_fetch",
                              "handle_deallocate", "handle_rollback"]


def test_a_stream_deallocate_disconnect_is_logged_and_the_transaction_rolls_back(
    pools: list[Pool]
) -> None:
    # stream_test: "stream logs deallocate disconnect"
    err = RuntimeError("oops")
    batch = result((1,))
    driver = TxDriver({"handle_fetch": [Ok(("cont", batch))],
                       "handle_deallocate": [Disconnect(err)]})
    pool, events = scripted(pools, driver)
    entries: list[LogEntry] = []

    def work(conn: Any) -> str:
        with conn.stream("SELECT x", [1], log=entries.append) as stream:
            assert next(iter(stream)) is batch
        return "hi"

    with pytest.raises(RolledBack):
        pool.transaction(work)
    assert [e.call for e in entries] == ["declare", "fetch", "deallocate"]
    deallocate = entries[2]
    assert isinstance(deallocate.error, ConnectionError) and deallocate.error.__cause__ is err
    assert deallocate.pool_time is None and deallocate.connection_time >= 0
    assert deallocate.decode_time is None
    events.wait_count(kind("connected"), 2)
    assert record(driver) == ["connect", "handle_begin", "handle_declare", "handle_fetch",
                              "handle_deallocate", "disconnect", "connect"]


def test_a_raising_stream_log_callable_is_reported_and_the_stream_goes_on(
    pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    # stream_test: "stream declare log raises and continues"
    batch = result((1,))
    driver = TxDriver({"handle_fetch": [Ok(("halt", batch))]})
    pool, _ = scripted(pools, driver)

    def broken(entry: LogEntry) -> None:
        raise RuntimeError("logging oops")

    with caplog.at_level(logging.ERROR, logger="dbpool.log"), pool.transaction() as conn:
        assert list(conn.stream("SELECT x", [1], log=broken)) == [batch]
    assert sum("log callable" in r.getMessage() for r in caplog.records) == 3
    assert record(driver) == ["connect", "handle_begin", "handle_declare", "handle_fetch",
                              "handle_deallocate", "handle_commit"]


@pytest.mark.parametrize("callback", ["handle_declare", "handle_fetch"])
def test_a_raising_stream_callback_rolls_back_and_replaces_the_connection(
    pools: list[Pool], callback: str
) -> None:
    # stream_test: "stream declare raise raises and stops connection"; prepare_stream_test:
    # "prepare_stream declare raise raises and stops connection"
    boom = RuntimeError("oops")
    driver = TxDriver({"handle_fetch": [Ok(("cont", result((1,))))], callback: [boom]})
    pool, events = scripted(pools, driver)

    def work(conn: Any) -> str:
        with pytest.raises(RuntimeError) as info, conn.stream("SELECT x", [1]) as stream:
            next(iter(stream))
        assert info.value is boom
        return "hi"

    with pytest.raises(RolledBack):
        pool.transaction(work)
    events.wait_count(kind("connected"), 2, timeout=2.0)
    assert "handle_commit" not in record(driver)


def test_a_raising_deallocate_of_a_stream_stopped_early_raises_and_rolls_back(
    pools: list[Pool]
) -> None:
    # stream_test: "stream deallocate raise raises and stops connection"
    boom = RuntimeError("oops")
    driver = TxDriver({"handle_fetch": [Ok(("cont", result((1,))))],
                       "handle_deallocate": [boom]})
    pool, events = scripted(pools, driver)

    def work(conn: Any) -> str:
        with pytest.raises(RuntimeError) as info, conn.stream("SELECT x", [1]) as stream:
            next(iter(stream))
        assert info.value is boom
        return "hi"

    with pytest.raises(RolledBack):
        pool.transaction(work)
    events.wait_count(kind("connected"), 2, timeout=2.0)
    assert "handle_commit" not in record(driver)


# -- on PostgreSQL ------------------------------------------------------------------


@pytest.mark.pool_kind_skip(
    "ownership", reason="the case needs two connections on one thread, and an ownership "
    "pool's caller has one: the nested checkout queues behind the thread's own connection "
    "until the 15 s checkout timeout, as DBConnection.Ownership's proxy queues a second "
    "checkout by its owner")
def test_a_statement_prepared_on_one_connection_is_prepared_on_another_before_executing(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # execute_test: "execute reprepares query on encode error" (execute prepares what is missing)
    pool, _ = start_named(pg_dsn, pools, "st-cross", size=2)
    with pool.checkout() as a:
        query = a.prepare("cross_add", "SELECT $1::int + $2::int")
        with pool.checkout() as b:
            assert b.backend_pid != a.backend_pid
            assert b.query("SELECT count(*) FROM pg_prepared_statements").rows == [(0,)]
            assert b.execute(query, [40, 2]).rows == [(42,)]
            ((name, statement),) = b.query(
                "SELECT name, statement FROM pg_prepared_statements").rows
            assert name == "cross_add" and statement.endswith("SELECT $1::int + $2::int")
        assert a.execute(query, [1, 1]).rows == [(2,)]  # still its own, not prepared twice


def test_a_prepare_sql_error_raises_the_server_error_logs_it_and_keeps_the_connection(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # prepare_test: "prepare error returns error" and "prepare logs error", on PostgreSQL
    entries: list[LogEntry] = []
    pool, events = start_named(pg_dsn, pools, "st-prep-err", log=entries.append)
    with pool.checkout() as conn:
        pid = conn.backend_pid
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            conn.prepare("bad", "SELEC $1")
        assert info.value.sqlstate == "42601"
        assert conn.status() == "idle"
        assert conn.query("SELECT count(*) FROM pg_prepared_statements").rows == [(0,)]
    assert pool.query("SELECT pg_backend_pid()").rows == [(pid,)]
    prepare = entries[0]
    assert (prepare.call, prepare.query, prepare.params) == ("prepare", Query("SELEC $1", "bad"),
                                                             None)
    assert prepare.error is info.value and prepare.result is None
    assert prepare.pool_time is not None and prepare.connection_time > 0
    assert prepare.decode_time is None
    assert [e.kind for e in events.values()] == ["connected"]


def test_an_execute_error_keeps_the_connection_and_its_prepared_statement(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # execute_test: "execute error returns error", on PostgreSQL
    pool, events = start_named(pg_dsn, pools, "st-exec-err")
    query = pool.prepare("inverse", "SELECT 100 / $1::int")
    with pytest.raises(psycopg.errors.DivisionByZero):
        pool.execute(query, [0])
    assert pool.status() == "idle"
    assert pool.execute(query, [4]).rows == [(25,)]
    with pool.checkout() as conn:
        assert conn.query("SELECT name FROM pg_prepared_statements").rows == [("inverse",)]
    assert [e.kind for e in events.values()] == ["connected"]


def test_execute_and_prepare_execute_log_entries_on_postgresql(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # execute_test: "execute logs result"; prepare_execute_test: "prepare_execute logs result"
    entries: list[LogEntry] = []
    pool, _ = start_named(pg_dsn, pools, "st-log", log=entries.append)
    query, res = pool.prepare_execute("triple", "SELECT $1::int * 3", [5])
    assert res.rows == [(15,)]
    assert pool.execute(query, [7]).rows == [(21,)]
    pool.close_prepared(query)
    assert [e.call for e in entries] == ["prepare_execute", "execute", "close"]
    both, execute, close = entries
    assert both.query == query and both.params == [5]
    assert both.result[0] == query and both.result[1].rows == [(15,)]
    assert execute.query == query and execute.params == [7] and execute.result.rows == [(21,)]
    for entry in (both, execute):
        assert entry.pool_time is not None and entry.pool_time >= 0
        assert entry.idle_time is not None and entry.idle_time >= 0
        assert entry.connection_time > 0
        assert entry.decode_time is not None and entry.decode_time >= 0
    assert close.query == query and close.result is None and close.decode_time is None


def test_a_prepared_statement_without_parameters_executes(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # prepare_execute_test: "prepare_execute returns query and result" (a query with no params)
    pool, _ = start_named(pg_dsn, pools, "st-no-params")
    query, res = pool.prepare_execute("answer", "SELECT 42")
    assert res.rows == [(42,)]
    assert pool.execute(query).rows == [(42,)]


def test_a_prepared_query_streams_with_its_parameters(pg_dsn: str, pools: list[Pool]) -> None:
    # prepare_stream_test: "prepare_stream returns result"
    pool, _ = start_named(pg_dsn, pools, "st-prep-stream")
    with pool.transaction() as conn:
        query = conn.prepare("series", "SELECT generate_series(1, $1::int)")
        batches = [b.rows for b in conn.stream(query, [5], max_rows=2)]
    assert batches == [[(1,), (2,)], [(3,), (4,)], [(5,)]]


def test_a_stream_declare_sql_error_rolls_back_and_keeps_the_connection(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # stream_test: "stream logs declare error", on PostgreSQL (the transaction then failed)
    entries: list[LogEntry] = []
    pool, events = start_named(pg_dsn, pools, "st-declare-err", log=entries.append)
    pid = pool.query("SELECT pg_backend_pid()").rows[0][0]
    entries.clear()
    with pytest.raises(RolledBack), pool.transaction() as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            list(conn.stream("SELECT * FROM no_such_table_for_streams"))
        assert conn.status() == "error"
    assert [(e.call, e.ok) for e in entries] == [("begin", True), ("declare", False),
                                                ("rollback", True)]
    assert pool.query("SELECT pg_backend_pid()").rows == [(pid,)]
    assert [e.kind for e in events.values()] == ["connected"]


def test_a_stream_fetch_error_midway_closes_the_cursor_and_rolls_back(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # stream_test: "stream deallocates after transaction failed", on PostgreSQL
    entries: list[LogEntry] = []
    pool, events = start_named(pg_dsn, pools, "st-fetch-err", log=entries.append)
    seen: list[list[Any]] = []
    with (pytest.raises(RolledBack), pool.transaction() as conn,
          pytest.raises(psycopg.errors.DivisionByZero)):
        for batch in conn.stream("SELECT 10 / (5 - x) FROM generate_series(1, 9) x",
                                 max_rows=2):
            seen.append(batch.rows)
    assert seen == [[(2,), (3,)], [(5,), (10,)]]
    calls_made = [e.call for e in entries]
    assert calls_made[:5] == ["begin", "declare", "fetch", "fetch", "fetch"]
    assert calls_made[5:] == ["deallocate", "rollback"]
    assert not entries[4].ok
    with pool.checkout() as conn:
        assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(0,)]
        assert conn.status() == "idle"
    assert [e.kind for e in events.values()] == ["connected"]


def test_a_stream_in_a_with_block_left_early_or_by_an_exception_closes_its_cursor(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # stream_test: "stream logs result" (Enum.take stops early; the cursor is deallocated)
    pool, _ = start_named(pg_dsn, pools, "st-with")
    with pool.transaction() as conn:
        with conn.stream("SELECT generate_series(1, 1000)", max_rows=10) as stream:
            assert len(next(iter(stream)).rows) == 10
            assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(1,)]
        assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(0,)]
        with pytest.raises(KeyError), conn.stream("SELECT generate_series(1, 1000)") as stream:
            for _batch in stream:
                raise KeyError("stop")
        assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(0,)]
        assert conn.status() == "transaction"


def test_a_stream_left_by_break_or_by_an_exception_closes_its_cursor_at_once(
    pg_dsn: str, pools: list[Pool]
) -> None:
    # stream_test: "stream logs result" (Enum.take stops early; the cursor is deallocated)
    pool, _ = start_named(pg_dsn, pools, "st-break")
    with pool.transaction() as conn:
        for _batch in conn.stream("SELECT generate_series(1, 1000)", max_rows=10):
            assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(1,)]
            break
        assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(0,)]
        with pytest.raises(KeyError):
            for _batch in conn.stream("SELECT generate_series(1, 1000)", max_rows=10):
                raise KeyError("stop")
        assert conn.query("SELECT count(*) FROM pg_cursors").rows == [(0,)]
        assert conn.status() == "transaction"


def test_stream_log_entries_on_postgresql(pg_dsn: str, pools: list[Pool]) -> None:
    # stream_test: "stream logs result", on PostgreSQL
    entries: list[LogEntry] = []
    pool, _ = start_named(pg_dsn, pools, "st-stream-log", log=entries.append)
    batches = [b.rows for b in pool.stream("SELECT generate_series(1, %s)", [5], max_rows=3)]
    assert batches == [[(1,), (2,), (3,)], [(4,), (5,)]]
    assert [e.call for e in entries] == ["begin", "declare", "fetch", "fetch", "deallocate",
                                        "commit"]
    begin, declare, fetch1, fetch2, deallocate, commit = entries
    assert begin.pool_time is not None and begin.idle_time is not None
    assert declare.query == Query("SELECT generate_series(1, %s)") and declare.params == [5]
    assert fetch1.result[0] == "cont" and fetch1.result[1].rows == [(1,), (2,), (3,)]
    assert fetch2.result[0] == "halt" and fetch2.result[1].rows == [(4,), (5,)]
    for entry in (declare, fetch1, fetch2, deallocate, commit):
        assert entry.ok and entry.pool_time is None and entry.idle_time is None
        assert entry.connection_time > 0
    assert declare.decode_time is None and deallocate.decode_time is None


def test_a_stream_fetch_log_entry_has_a_decode_time(pg_dsn: str, pools: list[Pool]) -> None:
    # stream_test: "stream logs result" (decode_time of the fetch entry)
    entries: list[LogEntry] = []
    pool, _ = start_named(pg_dsn, pools, "st-fetch-decode", log=entries.append)
    assert sum(len(b.rows) for b in pool.stream("SELECT generate_series(1, 5)")) == 5
    fetch = next(e for e in entries if e.call == "fetch")
    assert fetch.decode_time is not None and fetch.decode_time >= 0
