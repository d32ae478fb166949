"""Every request of the wire protocol, end to end: client process -> ``dbpool serve`` -> PostgreSQL.

The test process is the client (:class:`~dbpool.client.Client` and
:class:`~dbpool.client.AsyncClient`); the server is a ``python -m dbpool serve``
child process (:class:`tests.support.remote.ServerProcess`) on the machine's
PostgreSQL (``pg_dsn``).  Nothing is mocked.  Where the protocol promises
"as in-process", the test runs the same SQL on a direct psycopg connection and
compares: values and their Python types, columns, command tags, error classes
and diagnostics.

Covered: ping, status, query (positional and named parameters), execute
(prepared once per connection, checked on a one-connection server), batch
(``params_seq`` and ``statements``; atomicity and ``index``), stream (pages,
early close, inside a transaction), transactions (commit, rollback, rollback
on an exception, aborted transactions); the value round trip of every type
the wire carries; unsupported types both ways; SQL and adaptation errors;
the ``dbpool query`` / ``dbpool status`` commands; in-process connection
listeners next to a remote server.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as dtime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import psycopg.errors as pg_errors
import pytest
from psycopg.types.json import Json, Jsonb

from dbpool.client import AsyncClient, Client
from dbpool.errors import ProtocolError, StatementNotAllowed
from dbpool.pool import Pool
from tests.support.events import Recorder, kind
from tests.support.remote import ServerProcess

POOL_SIZE = 4
TIMEOUT = 10.0

# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[ServerProcess]:
    """One ``dbpool serve`` for the module, its pool fully connected."""
    with ServerProcess(pg_dsn, "--grace", "2", pool_size=POOL_SIZE) as srv:
        with Client(srv.endpoint, timeout=TIMEOUT) as client:
            wait_status(client, lambda s: s["pool"]["ready_conn_count"] == POOL_SIZE)
        yield srv
        code = srv.terminate()
        assert code == 0, srv.output()


@pytest.fixture(scope="module")
def server1(pg_dsn: str) -> Iterator[ServerProcess]:
    """A server with one connection: every request runs on the same backend."""
    with ServerProcess(pg_dsn, "--grace", "2", pool_size=1) as srv:
        yield srv


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.endpoint, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
def other(server: ServerProcess) -> Iterator[Client]:
    """A second client (another session) to look from outside a transaction."""
    with Client(server.endpoint, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def direct(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An in-process psycopg connection: the reference the remote results must match."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def items(direct: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table ``(id int primary key, v text)``, dropped afterwards."""
    name = f"remote_req_{uuid.uuid4().hex[:12]}"
    direct.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    try:
        yield name
    finally:
        direct.execute(f"DROP TABLE IF EXISTS {name}")


# -- helpers -----------------------------------------------------------------------------


def wait_status(client: Client, predicate: Callable[[dict[str, Any]], bool],
                timeout: float = 5.0) -> dict[str, Any]:
    """Poll the server's status until ``predicate`` holds; fail with the last one seen."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"status never matched within {timeout}s: {status!r}")
        time.sleep(0.02)


def idle(status: dict[str, Any]) -> bool:
    """No stream or lease open and every connection back in the pool."""
    server = status["server"]
    return (server["open_streams"] == 0 and server["open_leases"] == 0
            and server["connections_held"] == 0
            and status["pool"]["ready_conn_count"] == POOL_SIZE)


def count(client: Client, table: str) -> int:
    value = client.query(f"SELECT count(*) FROM {table}").rows[0][0]
    assert isinstance(value, int)
    return value


def local_rows(direct: psycopg.Connection[Any], sql: str,
               params: Any = None) -> tuple[list[tuple[Any, ...]], list[tuple[str, int]]]:
    cur = direct.execute(sql, params)
    assert cur.description is not None
    return cur.fetchall(), [(d.name, d.type_code) for d in cur.description]


def local_error(direct: psycopg.Connection[Any], sql: str, params: Any = None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        direct.execute(sql, params)
    return info.value


def assert_same_error(remote: BaseException, local: psycopg.Error) -> None:
    """The remote error is the in-process one: class, SQLSTATE, message, detail, hint."""
    assert type(remote) is type(local), (remote, local)
    assert isinstance(remote, psycopg.Error)
    assert remote.sqlstate == local.sqlstate
    assert remote.diag.sqlstate == local.diag.sqlstate
    assert remote.diag.message_primary == local.diag.message_primary
    assert remote.diag.message_detail == local.diag.message_detail
    assert remote.diag.message_hint == local.diag.message_hint


def assert_same(got: Any, want: Any, *, strict: bool = True, path: str = "value") -> None:
    """Equal values of the same Python types, recursively.

    NaNs match NaNs; a zero's sign counts; aware and naive datetimes and times
    never match.  ``strict`` (for remote vs in-process) also asks for the same
    Decimal text (exponent) and the same UTC offset and zone.
    """
    assert type(got) is type(want), f"{path}: {type(got).__name__} {got!r} != " \
                                    f"{type(want).__name__} {want!r}"
    if isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, strict=strict, path=f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], strict=strict, path=f"{path}[{key!r}]")
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), f"{path}: {got!r} is not nan"
        else:
            assert got == want and math.copysign(1, got) == math.copysign(1, want), \
                f"{path}: {got!r} != {want!r}"
    elif isinstance(want, Decimal):
        if want.is_nan():
            assert got.is_nan(), f"{path}: {got!r} is not NaN"
        else:
            assert got == want, f"{path}: {got!r} != {want!r}"
        if strict:
            assert str(got) == str(want), f"{path}: {got!r} != {want!r}"
    elif isinstance(want, datetime | dtime):
        assert got == want, f"{path}: {got!r} != {want!r}"
        assert (got.tzinfo is None) == (want.tzinfo is None), f"{path}: {got!r} vs {want!r}"
        if strict:
            assert got.utcoffset() == want.utcoffset(), f"{path}: {got!r} vs {want!r}"
            assert getattr(got.tzinfo, "key", None) == getattr(want.tzinfo, "key", None), \
                f"{path}: zone of {got!r} vs {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dbpool", *args], capture_output=True,
                          text=True, timeout=60)


# -- ping and status ---------------------------------------------------------------------


def test_ping_returns_the_round_trip_in_seconds(client: Client) -> None:
    first = client.ping()
    assert isinstance(first, float)
    assert 0 < first < TIMEOUT
    assert isinstance(client.ping(timeout=5), float)


def test_status_has_version_counters_pool_metrics_events_and_health(
    client: Client, server: ServerProcess
) -> None:
    wait_status(client, idle)
    before = client.status()
    assert before["version"] == 1
    assert before["events"] == server.events
    assert isinstance(before["health"], str) and before["health"]
    assert before["health"] != "stopped"
    counters = before["server"]
    for key in ("requests", "errors", "leases", "streams", "open_leases", "open_streams"):
        assert isinstance(counters[key], int), key
    pool = before["pool"]
    assert pool["ready_conn_count"] == POOL_SIZE
    assert pool["checkout_queue_length"] == 0
    # The counters count: one failing query and one transaction later...
    with pytest.raises(pg_errors.DivisionByZero):
        client.query("SELECT 1/0")
    with client.transaction() as tx:
        tx.query("SELECT 1")
    after = client.status()["server"]
    assert after["errors"] == counters["errors"] + 1
    assert after["leases"] == counters["leases"] + 1
    # query, query (with its begin), commit and this status (the first status counted
    # itself)
    assert after["requests"] == counters["requests"] + 4


def test_status_server_counters_include_clients(client: Client) -> None:
    assert isinstance(client.status()["server"]["clients"], int)


# -- query and execute -------------------------------------------------------------------


def test_query_positional_and_named_params_as_in_process(
    client: Client, direct: psycopg.Connection[Any]
) -> None:
    sql = "SELECT %s::int + %s::int AS total, %s::text AS label"
    result = client.query(sql, [40, 2, "x"])
    rows, columns = local_rows(direct, sql, [40, 2, "x"])
    assert result.rows == [(42, "x")] == rows
    assert [(c.name, c.type_oid) for c in result.columns] == columns
    assert result.rowcount == 1
    assert result.command == "SELECT 1"

    named = "SELECT %(a)s::int * %(b)s::int AS product, %(a)s::int AS a"
    result = client.query(named, {"a": 6, "b": 7})
    assert result.rows == [(42, 6)] == local_rows(direct, named, {"a": 6, "b": 7})[0]
    assert [c.name for c in result.columns] == ["product", "a"]

    many = client.query("SELECT g FROM generate_series(1, 5) AS g")
    assert many.rows == [(1,), (2,), (3,), (4,), (5,)]
    assert many.rowcount == 5 and many.command == "SELECT 5"


def test_query_writes_and_reports_the_command_tag(client: Client, items: str) -> None:
    insert = client.query(f"INSERT INTO {items} (id, v) VALUES (%s, %s), (%s, %s)",
                          [1, "a", 2, "b"])
    assert insert.rows == [] and insert.columns == []
    assert insert.command == "INSERT 0 2" and insert.rowcount == 2
    update = client.query(f"UPDATE {items} SET v = %s WHERE id >= %s", ["z", 1])
    assert update.command == "UPDATE 2" and update.rowcount == 2
    returning = client.query(f"DELETE FROM {items} WHERE id = %(id)s RETURNING id, v",
                             {"id": 2})
    assert returning.rows == [(2, "z")] and returning.command == "DELETE 1"
    assert client.query(f"SELECT id, v FROM {items}").rows == [(1, "z")]


def test_execute_runs_the_statement_and_prepares_it_once_per_connection(
    server1: ServerProcess
) -> None:
    marker = f"marker_{uuid.uuid4().hex[:10]}"
    sql = f"SELECT %s::int * 2 AS {marker}"
    with Client(server1.endpoint, timeout=TIMEOUT) as c:
        first = c.execute(sql, [21])
        second = c.execute(sql, [50])
        assert first.rows == [(42,)] and second.rows == [(100,)]
        assert [col.name for col in first.columns] == [marker]
        assert first.command == "SELECT 1"
        # One connection: the catalogue below is that of the backend that ran them.
        prepared = c.query("SELECT name, statement FROM pg_prepared_statements "
                           "WHERE statement LIKE %s", [f"%{marker}%"]).rows
        assert len(prepared) == 1, prepared
        name, statement = prepared[0]
        assert name.startswith("dbpool_remote_")
        assert statement == f"SELECT $1::int * 2 AS {marker}"
        # query is not prepared on its first run
        plain = f"plain_{uuid.uuid4().hex[:10]}"
        assert c.query(f"SELECT %s::int AS {plain}", [1]).rows == [(1,)]
        assert c.query("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                       [f"%{plain}%"]).rows == [(0,)]


def test_query_prepares_a_statement_on_its_fifth_run_like_psycopg(
    server1: ServerProcess
) -> None:
    marker = f"auto_{uuid.uuid4().hex[:10]}"
    sql = f"SELECT %s::int + 1 AS {marker}"
    count = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s"
    with Client(server1.endpoint, timeout=TIMEOUT) as c:
        for run in range(1, 8):
            assert c.query(sql, [run]).rows == [(run + 1,)]
            expected = 1 if run >= 5 else 0
            assert c.query(count, [f"%{marker}%"]).rows == [(expected,)], run
        # DEALLOCATE ALL would drop it under other clients: refused outside a lease.
        with pytest.raises(StatementNotAllowed) as refused:
            c.query("DEALLOCATE ALL")
        assert refused.value.scope == "session"
        assert c.query(count, [f"%{marker}%"]).rows == [(1,)]
        pid = c.query("SELECT pg_backend_pid()").rows
        # Inside a lease it runs: the front end forgets the statement, which keeps
        # working (prepared again after five more runs) ...
        with c.transaction() as tx:
            assert tx.query("DEALLOCATE ALL").command == "DEALLOCATE ALL"
            for run in range(5):
                assert tx.query(sql, [run]).rows == [(run + 1,)]
            assert tx.query(count, [f"%{marker}%"]).rows == [(1,)]
        # ... and the lease changed the session: its connection was replaced.
        assert c.query("SELECT pg_backend_pid()").rows != pid


@pytest.mark.parametrize(("sql", "error"), [
    pytest.param("SELEC 1", pg_errors.SyntaxError, id="syntax"),
    pytest.param("SELECT * FROM remote_req_no_such_table", pg_errors.UndefinedTable,
                 id="undefined-table"),
])
def test_execute_raises_when_the_statement_cannot_be_prepared(
    client: Client, direct: psycopg.Connection[Any], sql: str, error: type[psycopg.Error]
) -> None:
    local = local_error(direct, sql)
    assert type(local) is error
    with pytest.raises(error) as info:
        client.execute(sql)
    assert_same_error(info.value, local)


def test_execute_in_a_transaction_raises_when_the_statement_cannot_be_prepared(
    client: Client, items: str
) -> None:
    with client.transaction() as tx:
        tx.query(f"INSERT INTO {items} (id) VALUES (1)")
        with pytest.raises(pg_errors.UndefinedTable):
            tx.execute("SELECT * FROM remote_req_no_such_table")
        tx.rollback()


def test_execute_in_an_aborted_transaction_raises_in_failed_sql_transaction(
    client: Client, items: str
) -> None:
    with client.transaction() as tx:
        with pytest.raises(pg_errors.DivisionByZero):
            tx.query("SELECT 1/0")
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            tx.execute(f"INSERT INTO {items} (id) VALUES (%s) /* {uuid.uuid4().hex} */", [1])
        tx.rollback()


# -- batch -------------------------------------------------------------------------------


def test_batch_with_params_seq(client: Client, items: str) -> None:
    results = client.batch(f"INSERT INTO {items} (id, v) VALUES (%s, %s)",
                           [[1, "a"], (2, "b"), [3, None]])
    assert [r.command for r in results] == ["INSERT 0 1"] * 3
    assert [r.rowcount for r in results] == [1, 1, 1]
    assert client.query(f"SELECT id, v FROM {items} ORDER BY id").rows == [
        (1, "a"), (2, "b"), (3, None)]
    named = client.batch(f"SELECT v FROM {items} WHERE id = %(id)s", [{"id": 3}, {"id": 1}])
    assert [r.rows for r in named] == [[(None,)], [("a",)]]


def test_batch_with_statements_returns_one_result_per_statement(
    client: Client, items: str
) -> None:
    results = client.batch([
        (f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [1, "one"]),
        f"INSERT INTO {items} (id, v) VALUES (2, 'two')",
        (f"UPDATE {items} SET v = %(v)s WHERE id = %(id)s", {"v": "uno", "id": 1}),
        (f"SELECT id, v FROM {items} ORDER BY id", None),
        ("SELECT %s::text AS t", ["é"]),
    ])
    assert [r.command for r in results] == [
        "INSERT 0 1", "INSERT 0 1", "UPDATE 1", "SELECT 2", "SELECT 1"]
    assert results[3].rows == [(1, "uno"), (2, "two")]
    assert [c.name for c in results[3].columns] == ["id", "v"]
    assert results[4].rows == [("é",)]
    assert count(client, items) == 2


@pytest.mark.parametrize(("failing", "error"), [
    pytest.param("INSERT INTO {t} (id, v) VALUES (1, 'again')", pg_errors.UniqueViolation,
                 id="unique"),
    pytest.param("SELECT 1/0", pg_errors.DivisionByZero, id="division"),
])
def test_batch_is_atomic_and_the_error_has_the_failing_index(
    client: Client, items: str, failing: str, error: type[psycopg.Error]
) -> None:
    with pytest.raises(error) as info:
        client.batch([
            (f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [1, "a"]),
            (f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [2, "b"]),
            failing.format(t=items),
            f"INSERT INTO {items} (id, v) VALUES (3, 'c')",
        ])
    assert info.value.index == 2  # type: ignore[attr-defined]
    assert info.value.sqlstate == error.sqlstate
    assert count(client, items) == 0  # nothing of the batch took effect
    with pytest.raises(pg_errors.UniqueViolation) as info2:
        client.batch(f"INSERT INTO {items} (id) VALUES (%s)", [[5], [6], [7], [5]])
    assert info2.value.index == 3  # type: ignore[attr-defined]
    assert count(client, items) == 0


# -- streams -----------------------------------------------------------------------------


def test_stream_pages_in_order(client: Client) -> None:
    sizes: list[int] = []
    rows: list[tuple[Any, ...]] = []
    with client.stream("SELECT g, 'r' || g FROM generate_series(1, %s) AS g ORDER BY g",
                       [23], max_rows=5) as stream:
        for page in stream:
            sizes.append(len(page.rows))
            rows.extend(page.rows)
            assert [c.name for c in page.columns] == ["g", "?column?"]
        assert stream.done
    assert sizes == [5, 5, 5, 5, 3]
    assert rows == [(i, f"r{i}") for i in range(1, 24)]
    assert [r[0] for r in client.stream("SELECT generate_series(1, 7)", max_rows=3).rows()] \
        == list(range(1, 8))
    wait_status(client, idle)


def test_stream_closed_early_gives_its_connection_back(client: Client) -> None:
    before = client.status()["server"]["streams"]
    stream = client.stream("SELECT g FROM generate_series(1, 1000) AS g", max_rows=10)
    first = stream.fetch()
    assert first is not None and first.rows == [(i,) for i in range(1, 11)]
    # the stream holds one connection, and only that one
    status = wait_status(client, lambda s: s["server"]["open_streams"] == 1
                         and s["server"]["connections_held"] == 1
                         and s["pool"]["ready_conn_count"] == POOL_SIZE - 1)
    assert status["server"]["streams"] == before + 1
    stream.close()
    assert stream.closed and not stream.done
    assert stream.fetch() is None
    wait_status(client, idle)
    # the same by leaving an iteration early
    for page in client.stream("SELECT g FROM generate_series(1, 1000) AS g", max_rows=10):
        assert len(page.rows) == 10
        break
    wait_status(client, idle)


# -- transactions ------------------------------------------------------------------------


def test_transaction_commit_is_visible_to_another_client(
    client: Client, other: Client, items: str
) -> None:
    with client.transaction() as tx:
        assert tx.active
        tx.query(f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [1, "a"])
        tx.execute(f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [2, "b"])
        tx.batch(f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [[3, "c"], [4, "d"]])
        assert count(other, items) == 0  # not yet committed
        assert tx.query(f"SELECT count(*) FROM {items}").rows == [(4,)]
    assert not tx.active
    assert count(other, items) == 4
    wait_status(client, idle)


def test_transaction_commit_and_rollback_return_their_tags(
    client: Client, other: Client, items: str
) -> None:
    tx = client.transaction()
    tx.query(f"INSERT INTO {items} (id) VALUES (1)")
    assert tx.commit().command == "COMMIT"
    tx = client.transaction()
    tx.query(f"INSERT INTO {items} (id) VALUES (2)")
    assert tx.rollback().command == "ROLLBACK"
    assert other.query(f"SELECT id FROM {items}").rows == [(1,)]
    wait_status(client, idle)


def test_transaction_rolls_back_when_the_block_raises(
    client: Client, other: Client, items: str
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), client.transaction() as tx:
        tx.query(f"INSERT INTO {items} (id) VALUES (1)")
        raise Boom
    assert not tx.active
    assert count(other, items) == 0
    wait_status(client, idle)


def test_stream_in_a_transaction_sees_its_uncommitted_rows(
    client: Client, other: Client, items: str
) -> None:
    with client.transaction() as tx:
        tx.batch(f"INSERT INTO {items} (id, v) VALUES (%s, %s)",
                 [[i, f"v{i}"] for i in range(1, 13)])
        sizes = []
        rows = []
        with tx.stream(f"SELECT id, v FROM {items} ORDER BY id", max_rows=5) as stream:
            for page in stream:
                sizes.append(len(page.rows))
                rows.extend(page.rows)
        assert sizes == [5, 5, 2]
        assert rows == [(i, f"v{i}") for i in range(1, 13)]
        assert count(other, items) == 0
        # a stream closed early leaves the transaction usable
        early = tx.stream(f"SELECT id FROM {items} ORDER BY id", max_rows=2)
        assert early.fetch() is not None
        early.close()
        assert tx.query(f"SELECT max(id) FROM {items}").rows == [(12,)]
        tx.rollback()
    assert count(other, items) == 0
    wait_status(client, idle)


# -- asyncio -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_requests_overlapping_on_one_socket_are_all_answered(
    server: ServerProcess,
) -> None:
    # Requests go out and replies come in straight through the socket when they can;
    # a send can take in replies that ZeroMQ's edge-triggered descriptor then never
    # reports, and a client that did not look for them left them unread until their
    # timeout (224 of 3,000 such requests timed out, when it did not).
    tasks, each = 8, 375
    answered: list[int] = []
    async with AsyncClient(server.endpoint, timeout=2.0) as c:
        async def loop(k: int) -> None:
            for i in range(each):
                result = await c.query("SELECT %s::int", [k * each + i])
                answered.append(result.rows[0][0])

        await asyncio.gather(*(loop(k) for k in range(tasks)))
    assert sorted(answered) == list(range(tasks * each))


@pytest.mark.asyncio
async def test_async_ping_status_query_execute(server: ServerProcess) -> None:
    deadline = time.monotonic() + 5
    async with AsyncClient(server.endpoint, timeout=TIMEOUT) as c:
        rtt = await c.ping()
        assert isinstance(rtt, float) and 0 < rtt < TIMEOUT
        status = await c.status()
        while status["pool"]["ready_conn_count"] != POOL_SIZE:  # a previous test's rollback
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.02)
            status = await c.status()
        assert status["version"] == 1
        assert status["events"] == server.events
        assert status["pool"]["ready_conn_count"] == POOL_SIZE
        assert isinstance(status["server"]["requests"], int)
        assert isinstance(status["health"], str) and status["health"] != "stopped"
        result = await c.query("SELECT %s::int + %s::int AS s", [1, 2])
        assert result.rows == [(3,)] and result.command == "SELECT 1"
        assert (await c.query("SELECT %(x)s::text || %(y)s::text", {"x": "a", "y": "b"})).rows \
            == [("ab",)]
        assert (await c.execute("SELECT %s::int * 3", [5])).rows == [(15,)]
        assert (await c.execute("SELECT %s::int * 3", [7])).rows == [(21,)]
        # many requests in flight at once on one client, matched by id
        results = await asyncio.gather(*(c.query("SELECT %s::int", [i]) for i in range(50)))
        assert [r.rows for r in results] == [[(i,)] for i in range(50)]


@pytest.mark.asyncio
async def test_async_execute_prepares_once(server1: ServerProcess) -> None:
    marker = f"amarker_{uuid.uuid4().hex[:10]}"
    async with AsyncClient(server1.endpoint, timeout=TIMEOUT) as c:
        assert (await c.execute(f"SELECT %s::text AS {marker}", ["a"])).rows == [("a",)]
        assert (await c.execute(f"SELECT %s::text AS {marker}", ["b"])).rows == [("b",)]
        prepared = (await c.query("SELECT name FROM pg_prepared_statements "
                                  "WHERE statement LIKE %s", [f"%{marker}%"])).rows
        assert len(prepared) == 1 and prepared[0][0].startswith("dbpool_remote_")


@pytest.mark.asyncio
async def test_async_batch_forms_and_atomicity(
    server: ServerProcess, other: Client, items: str
) -> None:
    async with AsyncClient(server.endpoint, timeout=TIMEOUT) as c:
        results = await c.batch(f"INSERT INTO {items} (id, v) VALUES (%s, %s)",
                                [[1, "a"], [2, "b"]])
        assert [r.command for r in results] == ["INSERT 0 1", "INSERT 0 1"]
        results = await c.batch([(f"SELECT v FROM {items} WHERE id = %s", [2]),
                                 "SELECT 'lit'"])
        assert [r.rows for r in results] == [[("b",)], [("lit",)]]
        with pytest.raises(pg_errors.UniqueViolation) as info:
            await c.batch([f"INSERT INTO {items} (id) VALUES (3)",
                           f"INSERT INTO {items} (id) VALUES (4)",
                           f"INSERT INTO {items} (id) VALUES (1)"])
        assert info.value.index == 2  # type: ignore[attr-defined]
        assert info.value.diag.message_detail == "Key (id)=(1) already exists."
    assert other.query(f"SELECT id FROM {items} ORDER BY id").rows == [(1,), (2,)]


@pytest.mark.asyncio
async def test_async_stream_pages_and_early_close(server: ServerProcess, other: Client) -> None:
    async with AsyncClient(server.endpoint, timeout=TIMEOUT) as c:
        sizes = []
        rows: list[Any] = []
        async with c.stream("SELECT g FROM generate_series(1, 17) AS g", max_rows=4) as stream:
            async for page in stream:
                sizes.append(len(page.rows))
                rows.extend(page.rows)
        assert sizes == [4, 4, 4, 4, 1]
        assert rows == [(i,) for i in range(1, 18)]
        assert [row async for row in c.stream("SELECT generate_series(1, 5)", max_rows=2)
                .rows()] == [(i,) for i in range(1, 6)]
        async with c.stream("SELECT g FROM generate_series(1, 1000) AS g",
                            max_rows=10) as stream:
            page = await stream.fetch()
            assert page is not None and len(page.rows) == 10
            assert (await c.status())["server"]["open_streams"] == 1
        assert stream.closed and not stream.done
    wait_status(other, idle)


@pytest.mark.asyncio
async def test_async_transactions(server: ServerProcess, other: Client, items: str) -> None:
    async with AsyncClient(server.endpoint, timeout=TIMEOUT) as c:
        async with c.transaction() as tx:
            await tx.query(f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [1, "kept"])
            await tx.execute(f"INSERT INTO {items} (id, v) VALUES (%s, %s)", [2, "kept"])
            assert count(other, items) == 0
            async with tx.stream(f"SELECT id FROM {items} ORDER BY id", max_rows=1) as stream:
                assert [row async for row in stream.rows()] == [(1,), (2,)]
        assert count(other, items) == 2

        tx = await c.transaction()
        await tx.query(f"INSERT INTO {items} (id) VALUES (3)")
        assert (await tx.rollback()).command == "ROLLBACK"

        with pytest.raises(KeyError):
            async with c.transaction() as tx:
                await tx.query(f"INSERT INTO {items} (id) VALUES (4)")
                raise KeyError("boom")
        assert not tx.active

        async with c.transaction() as tx:
            with pytest.raises(pg_errors.DivisionByZero):
                await tx.query("SELECT 1/0")
            with pytest.raises(pg_errors.InFailedSqlTransaction):
                await tx.query("SELECT 1")
            assert (await tx.commit()).command == "ROLLBACK"
    assert other.query(f"SELECT id FROM {items} ORDER BY id").rows == [(1,), (2,)]
    wait_status(other, idle)


@pytest.mark.asyncio
async def test_async_errors_and_unsupported_types(
    server: ServerProcess, direct: psycopg.Connection[Any]
) -> None:
    async with AsyncClient(server.endpoint, timeout=TIMEOUT) as c:
        with pytest.raises(pg_errors.UndefinedTable) as info:
            await c.query("SELECT * FROM remote_req_no_such_table")
        assert_same_error(info.value, local_error(direct, "SELECT * FROM remote_req_no_such_table"))
        with pytest.raises(TypeError, match="object"):
            await c.query("SELECT %s", [object()])
        with pytest.raises(ProtocolError) as perr:
            await c.query("SELECT '10.0.0.1'::inet")
        assert perr.value.code == "unsupported_type"
        assert (await c.query("SELECT 1")).rows == [(1,)]


# -- the values of every type ------------------------------------------------------------

_UTC = ZoneInfo("UTC")
_PARIS = ZoneInfo("Europe/Paris")
_UUID = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")

# (sql, params, what psycopg returns); each runs remotely and in-process.
TYPE_CASES = [
    # int: int2/int4/int8 come back as int; anything beyond int8 is numeric: Decimal.
    pytest.param("SELECT %s", [7], 7, id="int-small"),
    pytest.param("SELECT %s::int2", [-32768], -32768, id="int2"),
    pytest.param("SELECT %s::int8", [2**63 - 1], 2**63 - 1, id="int8-max"),
    pytest.param("SELECT %s::int8", [-(2**63)], -(2**63), id="int8-min"),
    pytest.param("SELECT %s", [2**63], Decimal(2**63), id="int-2e63-untyped-is-numeric"),
    pytest.param("SELECT %s", [2**64 - 1], Decimal(2**64 - 1), id="uint64-max-is-numeric"),
    pytest.param("SELECT %s::numeric", [10**30], Decimal(10**30), id="int-1e30-numeric"),
    pytest.param("SELECT %s::numeric", [-(10**40)], Decimal(-(10**40)), id="int-neg-1e40"),
    pytest.param("SELECT %s::numeric", [2**70], Decimal(2**70), id="int-2e70-numeric"),
    pytest.param("SELECT %s", [2**70], Decimal(2**70), id="int-2e70-untyped"),
    pytest.param("SELECT 2^70::numeric", None, Decimal("1180591620717411303424.0000000000000000"),
                 id="pow-2-70-numeric"),
    # float
    pytest.param("SELECT %s", [3.25], 3.25, id="float"),
    pytest.param("SELECT %s::float8", [-0.0], -0.0, id="float-neg-zero"),
    pytest.param("SELECT %s::float8", [1e300], 1e300, id="float-big"),
    pytest.param("SELECT %s::float4", [0.5], 0.5, id="float4"),
    pytest.param("SELECT %s::float8", [math.nan], math.nan, id="float-nan"),
    pytest.param("SELECT %s::float8", [math.inf], math.inf, id="float-inf"),
    pytest.param("SELECT %s::float8", [-math.inf], -math.inf, id="float-neg-inf"),
    # Decimal
    pytest.param("SELECT %s", [Decimal("123.4500")], Decimal("123.4500"), id="decimal"),
    pytest.param("SELECT %s", [Decimal("1.5E+10")], Decimal("15000000000"),
                 id="decimal-exponent"),
    pytest.param("SELECT %s", [Decimal("-1E-20")], Decimal("-0.00000000000000000001"),
                 id="decimal-neg-exponent"),
    pytest.param("SELECT %s::numeric", [Decimal("NaN")], Decimal("NaN"), id="decimal-nan"),
    pytest.param("SELECT %s::numeric", [Decimal("Infinity")], Decimal("Infinity"),
                 id="decimal-inf"),
    pytest.param("SELECT %s::numeric", [Decimal("-Infinity")], Decimal("-Infinity"),
                 id="decimal-neg-inf"),
    pytest.param("SELECT %s::numeric(10,3)", [Decimal("2.5")], Decimal("2.500"),
                 id="decimal-scale"),
    # str, bytes, bool, None
    pytest.param("SELECT %s", ["héllo wörld ✓ 🐘 日本"], "héllo wörld ✓ 🐘 日本", id="str-unicode"),
    pytest.param("SELECT %s::text", ["line1\nline2\t'q' \"dq\" \\"],
                 "line1\nline2\t'q' \"dq\" \\", id="str-escapes"),
    pytest.param("SELECT %s::text", [""], "", id="str-empty"),
    pytest.param("SELECT %s", [b"\x00\x01\xff\\x'abc"], b"\x00\x01\xff\\x'abc", id="bytes"),
    pytest.param("SELECT %s::bytea", [b""], b"", id="bytes-empty"),
    pytest.param("SELECT %s, %s", [True, False], (True, False), id="bool"),
    pytest.param("SELECT %s::int, %s::text", [None, None], (None, None), id="none"),
    pytest.param("SELECT NULL", None, None, id="null-literal"),
    # dates and times
    pytest.param("SELECT %s", [date(2024, 2, 29)], date(2024, 2, 29), id="date"),
    pytest.param("SELECT %s::date, %s::date", [date(1, 1, 1), date(9999, 12, 31)],
                 (date(1, 1, 1), date(9999, 12, 31)), id="date-limits"),
    pytest.param("SELECT %s", [dtime(13, 14, 15, 123456)], dtime(13, 14, 15, 123456),
                 id="time"),
    pytest.param("SELECT %s::timetz",
                 [dtime(1, 2, 3, 4, tzinfo=timezone(timedelta(hours=5, minutes=30)))],
                 dtime(1, 2, 3, 4, tzinfo=timezone(timedelta(hours=5, minutes=30))),
                 id="timetz"),
    pytest.param("SELECT %s::timetz", [dtime(23, 0, tzinfo=timezone(timedelta(hours=-8)))],
                 dtime(23, 0, tzinfo=timezone(timedelta(hours=-8))), id="timetz-negative"),
    pytest.param("SELECT %s", [datetime(2024, 5, 6, 7, 8, 9, 101112)],
                 datetime(2024, 5, 6, 7, 8, 9, 101112), id="timestamp"),
    pytest.param("SELECT %s", [datetime(2024, 5, 6, 7, 8, 9, 1, tzinfo=UTC)],
                 datetime(2024, 5, 6, 7, 8, 9, 1, tzinfo=UTC), id="timestamptz-utc"),
    pytest.param("SELECT %s", [datetime(2024, 7, 1, 12, 0, tzinfo=_PARIS)],
                 datetime(2024, 7, 1, 10, 0, tzinfo=_UTC), id="timestamptz-zoneinfo"),
    pytest.param("SELECT %s::timestamptz",
                 [datetime(2024, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=-3, minutes=-30)))],
                 datetime(2024, 1, 1, 3, 30, tzinfo=_UTC), id="timestamptz-offset"),
    pytest.param("SELECT %s", [timedelta(days=3, seconds=4, microseconds=5)],
                 timedelta(days=3, seconds=4, microseconds=5), id="interval"),
    pytest.param("SELECT %s", [timedelta(days=-1, seconds=10)], timedelta(days=-1, seconds=10),
                 id="interval-negative"),
    pytest.param("SELECT %s", [-timedelta(microseconds=1)], -timedelta(microseconds=1),
                 id="interval-neg-micro"),
    pytest.param("SELECT '1 year 2 mons 3 days 04:05:06.789'::interval", None,
                 timedelta(days=428, seconds=14706, microseconds=789000),
                 id="interval-months"),
    # uuid
    pytest.param("SELECT %s", [_UUID], _UUID, id="uuid"),
    pytest.param("SELECT %s::uuid[]", [[_UUID, None]], [_UUID, None], id="uuid-array"),
    # json and jsonb: sent wrapped, loaded as plain values
    pytest.param("SELECT %s", [Json({"a": [1, 2.5, None, "x"], "b": {"c": True}})],
                 {"a": [1, 2.5, None, "x"], "b": {"c": True}}, id="json"),
    pytest.param("SELECT %s", [Jsonb([1, "two", {"three": 3}])], [1, "two", {"three": 3}],
                 id="jsonb"),
    pytest.param("SELECT %s::json", [Json("just a string")], "just a string",
                 id="json-scalar"),
    pytest.param("SELECT %s::jsonb", [Jsonb({"ü": "ß", "n": 10**20})], {"n": 10**20, "ü": "ß"},
                 id="jsonb-unicode-bigint"),
    pytest.param("SELECT %s::jsonb", [Jsonb(None)], None, id="jsonb-null"),
    pytest.param("""SELECT '{"k": [1, {"z": null}]}'::jsonb""", None, {"k": [1, {"z": None}]},
                 id="jsonb-literal"),
    # arrays
    pytest.param("SELECT %s::int[]", [[1, None, 3]], [1, None, 3], id="int-array-nulls"),
    pytest.param("SELECT %s", [[1, 2, 3]], [1, 2, 3], id="int-array-untyped"),
    pytest.param("SELECT %s::text[]", [["a", None, "ü", "with space", 'q"uote', "NULL"]],
                 ["a", None, "ü", "with space", 'q"uote', "NULL"], id="text-array-nulls"),
    pytest.param("SELECT %s::int[]", [[[1, 2], [3, None]]], [[1, 2], [3, None]],
                 id="int-array-2d"),
    pytest.param("SELECT ARRAY[[1.5, 2], [3, 4]]::numeric[]", None,
                 [[Decimal("1.5"), Decimal("2")], [Decimal("3"), Decimal("4")]],
                 id="numeric-array-2d"),
    pytest.param("SELECT %s::int[]", [[]], [], id="int-array-empty"),
    pytest.param("SELECT '{}'::text[]", None, [], id="text-array-empty-literal"),
    pytest.param("SELECT %s::date[]", [[date(2020, 1, 1), None]], [date(2020, 1, 1), None],
                 id="date-array"),
    pytest.param("SELECT %s::bool[]", [[True, None, False]], [True, None, False],
                 id="bool-array"),
    # several columns of several types in several rows
    pytest.param("SELECT g, g::text, g % 2 = 0, g * 1.5 FROM generate_series(1, 3) AS g", None,
                 [(1, "1", False, Decimal("1.5")), (2, "2", True, Decimal("3.0")),
                  (3, "3", False, Decimal("4.5"))], id="rows"),
]


@pytest.mark.parametrize("op", ["query", "execute"])
@pytest.mark.parametrize(("sql", "params", "expected"), TYPE_CASES)
def test_value_round_trips_as_in_process(
    client: Client, direct: psycopg.Connection[Any], op: str, sql: str, params: Any,
    expected: Any
) -> None:
    local, local_columns = local_rows(direct, sql, params)
    result = getattr(client, op)(sql, params)
    if isinstance(expected, list) and expected and isinstance(expected[0], tuple):
        want_rows = expected
    elif isinstance(expected, tuple):
        want_rows = [expected]
    else:
        want_rows = [(expected,)]
    # what psycopg returns in-process is what this test expects...
    assert_same(local, want_rows, strict=False, path="in-process")
    # ...and what the remote client gets is exactly that
    assert_same(result.rows, local, strict=True, path=f"remote {op}")
    assert [(c.name, c.type_oid) for c in result.columns] == local_columns
    if isinstance(expected, datetime) and expected.tzinfo is not None:
        assert result.rows[0][0].tzinfo is not None


def test_aware_values_keep_offset_and_zone_when_the_session_has_a_zone(
    client: Client, direct: psycopg.Connection[Any]
) -> None:
    # A timestamptz comes back in the connection's TimeZone, as a ZoneInfo.
    sql = "SELECT %s::timestamptz, current_setting('TimeZone')"
    sent = datetime(2024, 3, 31, 1, 30, tzinfo=_PARIS)
    (value, zone), = client.query(sql, [sent]).rows
    assert value == sent
    assert isinstance(value.tzinfo, ZoneInfo) and value.tzinfo.key == zone
    assert_same(client.query(sql, [sent]).rows, direct.execute(sql, [sent]).fetchall())
    # Everything at once, in one row, through a transaction and a batch too.
    values = [7, 2**70, 1.5, Decimal("1.10"), "s", b"b", True, None, date(2020, 2, 2),
              dtime(1, 2), datetime(2020, 2, 2, 2, 2), sent, timedelta(hours=-5), _UUID,
              Json({"k": 1}), Jsonb([None]), [1, None], [["a"], ["b"]]]
    row_sql = "SELECT " + ", ".join(["%s"] * len(values))
    local = direct.execute(row_sql, values).fetchall()
    with client.transaction() as tx:
        assert_same(tx.query(row_sql, values).rows, local)
        assert_same(tx.batch([(row_sql, values)])[0].rows, local)
        page = tx.stream(row_sql, values).fetch()
        assert page is not None
        assert_same(page.rows, local)


# -- unsupported types ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "name"), [
    pytest.param(object(), "object", id="object"),
    pytest.param({1, 2}, "set", id="set"),
    pytest.param(frozenset(), "frozenset", id="frozenset"),
    pytest.param(1 + 2j, "complex", id="complex"),
])
def test_a_param_the_wire_cannot_carry_is_a_type_error_naming_it(
    client: Client, server: ServerProcess, value: Any, name: str
) -> None:
    requests = client.status()["server"]["requests"]
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        client.query("SELECT %s", [value])
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        client.batch("SELECT %s", [[1], [value]])
    with client.transaction() as tx, pytest.raises(TypeError, match=rf"\b{name}\b"):
        tx.query("SELECT %s", [value])
    # nothing was sent for them (the transaction never began), and the client still works
    after = client.status()["server"]["requests"]
    assert after == requests + 1  # this status
    assert client.query("SELECT %s::int", [5]).rows == [(5,)]


def test_a_param_psycopg_cannot_adapt_is_a_programming_error(
    client: Client, direct: psycopg.Connection[Any]
) -> None:
    # A plain dict crosses the wire (msgpack map) but psycopg needs Json/Jsonb.
    local = local_error(direct, "SELECT %s", [{"a": 1}])
    with pytest.raises(psycopg.ProgrammingError) as info:
        client.query("SELECT %s", [{"a": 1}])
    assert type(info.value) is type(local)
    assert str(info.value) == str(local)
    assert client.query("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize(("sql", "type_name"), [
    pytest.param("SELECT '127.0.0.1'::inet", "IPv4Address", id="inet"),
    pytest.param("SELECT '10.0.0.0/8'::cidr", "IPv4Network", id="cidr"),
    pytest.param("SELECT int4range(1, 5)", "Range", id="range"),
])
def test_a_column_the_wire_cannot_carry_is_unsupported_type(
    client: Client, sql: str, type_name: str
) -> None:
    errors = client.status()["server"]["errors"]
    with pytest.raises(ProtocolError, match=type_name) as info:
        client.query(sql)
    assert info.value.code == "unsupported_type"
    with pytest.raises(ProtocolError) as info:
        client.batch(["SELECT 1", sql])
    assert info.value.code == "unsupported_type"
    with client.transaction() as tx:
        with pytest.raises(ProtocolError) as info:
            tx.execute(sql)
        assert info.value.code == "unsupported_type"
        assert tx.query("SELECT 2").rows == [(2,)]  # the transaction is fine
    # the server keeps serving
    assert client.query("SELECT 3").rows == [(3,)]
    status = wait_status(client, idle)
    assert status["server"]["errors"] == errors + 3


def test_a_stream_whose_first_page_cannot_be_encoded_is_ended(pg_dsn: str) -> None:
    with ServerProcess(pg_dsn, "--grace", "0.5", pool_size=1) as srv, \
            Client(srv.endpoint, timeout=TIMEOUT) as c:
        with pytest.raises(ProtocolError) as info:
            c.stream("SELECT '127.0.0.1'::inet FROM generate_series(1, 10)", max_rows=3).fetch()
        assert info.value.code == "unsupported_type"
        wait_status(c, lambda s: s["server"]["open_streams"] == 0
                    and s["server"]["connections_held"] == 0, timeout=2.0)


# -- errors ------------------------------------------------------------------------------


def test_unique_violation_as_in_process(
    client: Client, direct: psycopg.Connection[Any], items: str
) -> None:
    client.query(f"INSERT INTO {items} (id, v) VALUES (1, 'a')")
    sql = f"INSERT INTO {items} (id, v) VALUES (%s, %s)"
    local = local_error(direct, sql, [1, "b"])
    with pytest.raises(pg_errors.UniqueViolation) as info:
        client.query(sql, [1, "b"])
    err = info.value
    assert err.sqlstate == "23505" and err.diag.sqlstate == "23505"
    assert err.diag.message_detail == "Key (id)=(1) already exists."
    assert_same_error(err, local)
    with pytest.raises(pg_errors.UniqueViolation) as info:
        client.execute(sql, [1, "c"])
    assert_same_error(info.value, local)


@pytest.mark.parametrize(("sql", "error"), [
    pytest.param("SELECT * FROM remote_req_no_such_table", pg_errors.UndefinedTable,
                 id="undefined-table"),
    pytest.param("SELEC 1", pg_errors.SyntaxError, id="syntax"),
    pytest.param("SELECT 1/0", pg_errors.DivisionByZero, id="division"),
    pytest.param("SELECT 'abc'::int", pg_errors.InvalidTextRepresentation, id="bad-text"),
    pytest.param("SELECT no_such_column FROM pg_class", pg_errors.UndefinedColumn,
                 id="undefined-column"),
])
def test_sql_errors_raise_the_in_process_class(
    client: Client, direct: psycopg.Connection[Any], sql: str, error: type[psycopg.Error]
) -> None:
    local = local_error(direct, sql)
    assert type(local) is error
    with pytest.raises(error) as info:
        client.query(sql)
    assert_same_error(info.value, local)
    with client.transaction() as tx:
        with pytest.raises(error) as info:
            tx.query(sql)
        assert_same_error(info.value, local)
        with pytest.raises(pg_errors.InFailedSqlTransaction) as failed:
            tx.query("SELECT 1")
        assert failed.value.sqlstate == "25P02"
    assert client.query("SELECT 1").rows == [(1,)]


def test_an_error_in_a_transaction_aborts_it_and_commit_rolls_back(
    client: Client, other: Client, items: str
) -> None:
    with client.transaction() as tx:
        tx.query(f"INSERT INTO {items} (id) VALUES (1)")
        with pytest.raises(pg_errors.UniqueViolation):
            tx.query(f"INSERT INTO {items} (id) VALUES (1)")
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            tx.query(f"INSERT INTO {items} (id) VALUES (%s)", [2])
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            tx.batch([f"INSERT INTO {items} (id) VALUES (3)"])
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            tx.stream("SELECT 1").fetch()
        assert tx.commit().command == "ROLLBACK"
    assert count(other, items) == 0
    wait_status(client, idle)


@pytest.mark.parametrize(("sql", "params"), [
    pytest.param("SELECT %s, %s", [1], id="too-few"),
    pytest.param("SELECT %s", [1, 2], id="too-many"),
    pytest.param("SELECT %(a)s", {"b": 1}, id="missing-name"),
    pytest.param("SELECT %(a)s, %s", {"a": 1}, id="mixed-placeholders"),
    pytest.param("SELECT %x", [1], id="bad-placeholder"),
])
def test_wrong_params_are_a_programming_error(
    client: Client, direct: psycopg.Connection[Any], sql: str, params: Any
) -> None:
    local = local_error(direct, sql, params)
    assert type(local) is psycopg.ProgrammingError
    with pytest.raises(psycopg.ProgrammingError) as info:
        client.query(sql, params)
    assert type(info.value) is psycopg.ProgrammingError
    assert str(info.value) == str(local)
    with pytest.raises(psycopg.ProgrammingError):
        client.execute(sql, params)
    with pytest.raises(psycopg.ProgrammingError) as binfo:
        client.batch([("SELECT 1", None), (sql, params)])
    assert str(binfo.value) == str(local)
    assert client.query("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize(("sql", "params", "error"), [
    pytest.param("SELECT %s", [[1, "a"]], psycopg.DataError, id="mixed-list"),
    pytest.param("SELECT %s", ["a\x00b"], psycopg.DataError, id="nul-in-text"),
    pytest.param("SELECT %s", [[[1], 2]], pg_errors.InvalidTextRepresentation, id="ragged-array"),
])
def test_values_psycopg_or_postgresql_reject_fail_as_in_process(
    client: Client, direct: psycopg.Connection[Any], sql: str, params: Any,
    error: type[psycopg.Error]
) -> None:
    local = local_error(direct, sql, params)
    assert type(local) is error
    with pytest.raises(error) as info:
        client.query(sql, params)
    assert type(info.value) is error
    assert info.value.sqlstate == local.sqlstate
    assert str(info.value).splitlines()[0] == str(local).splitlines()[0]
    assert client.query("SELECT 1").rows == [(1,)]


@pytest.mark.parametrize(("sql", "params"), [
    pytest.param("SELECT %(a)s", [1], id="list-for-named"),
    pytest.param("SELECT %s", {"a": 1}, id="map-for-positional"),
])
def test_params_of_the_wrong_kind_fail_as_in_process(
    client: Client, direct: psycopg.Connection[Any], sql: str, params: Any
) -> None:
    with pytest.raises(TypeError):
        direct.execute(sql, params)
    with pytest.raises((TypeError, psycopg.ProgrammingError)):
        client.query(sql, params)


# -- the command line ----------------------------------------------------------------------


def test_cli_query_prints_a_table(server: ServerProcess) -> None:
    done = run_cli("query", "--endpoint", server.endpoint, "SELECT 1 AS x")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["x"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["1"]
    assert "SELECT 1" in lines[3]
    done = run_cli("query", "--endpoint", server.endpoint,
                   "SELECT %s::int + 1 AS answer, %s::text AS word", "41", "hi")
    assert done.returncode == 0, done.stderr
    header, _, row = done.stdout.splitlines()[:3]
    assert header.split() == ["answer", "|", "word"]
    assert row.split() == ["42", "|", "hi"]


def test_cli_query_exits_1_on_a_sql_error(server: ServerProcess) -> None:
    done = run_cli("query", "--endpoint", server.endpoint, "SELECT 1/0")
    assert done.returncode == 1
    assert "division by zero" in done.stderr
    assert done.stdout == ""


def test_cli_status_json(server: ServerProcess, client: Client) -> None:
    wait_status(client, idle)
    done = run_cli("status", "--endpoint", server.endpoint, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert {"version", "server", "pool", "events", "health"} <= set(status)
    assert status["version"] == 1
    assert status["events"] == server.events
    assert status["pool"]["ready_conn_count"] == POOL_SIZE
    assert isinstance(status["server"]["requests"], int)


# -- in-process listeners beside the remote server -----------------------------------------


def test_in_process_connection_listeners_still_get_events(
    pg_dsn: str, client: Client, pools: list[Pool]
) -> None:
    events: Recorder[Any] = Recorder()
    pool = Pool.start(pg_dsn, pool_size=2, name=f"listened_{uuid.uuid4().hex[:8]}",
                      connection_listeners=[events])
    pools.append(pool)
    connected = events.wait_count(kind("connected"), 2, timeout=10)
    pids = {event.backend_pid for event in connected}
    assert {event.pool for event in connected} == {pool.name}
    assert pool.query("SELECT pg_backend_pid()").rows[0][0] in pids
    assert client.query("SELECT 1").rows == [(1,)]  # the remote server serves meanwhile
    pool.stop()
    gone = events.wait_count(kind("disconnected"), 2, timeout=10)
    assert {event.backend_pid for event in gone} == pids
