"""Requests pipelined behind another client's on one connection.

``dbpool serve`` lets a request go behind others on a connection (libpq's
pipeline, a Sync after each request) when that saves work: behind a busy
connection's request when no connection is idle, and behind short
statements that have not left yet, which then share one write and one
wake-up of PostgreSQL.  What is checked here, with real PostgreSQL and the
front end on a thread of the test:

- a request that arrives with others, in one read, joins their connection
  when their statements are known to be short; it does not when they are
  not (never run yet, or lately long), and takes an idle connection;
- a request behind one that runs past its deadline is not lost with it:
  the one in front is cancelled, and the one behind runs;
- if that cancel lands late, on the request behind (the one in front ended
  first), that request runs again: PostgreSQL rolled it back whole.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import pytest

import dbpool.server.pipeline as pipeline
from dbpool import wire
from dbpool.client import Client
from dbpool.client.direct import ZmtpConnection
from dbpool.errors import ConnectionError
from dbpool.pool import Pool
from dbpool.protocol import VERSION
from dbpool.server.frontend import FrontEnd
from dbpool.zmtp import frame
from tests.support.compiled import replaces_methods
from tests.support.events import wait_for
from tests.support.frontend import front_end
from tests.support.remote import pool_whole

PID_SQL = "SELECT pg_backend_pid()"
T = TypeVar("T")


@pytest.fixture
def pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=4) as started:
        yield started


def _connect(front: FrontEnd, size: int = 4) -> ZmtpConnection:
    """A raw connection to ``front``, once every connection of its pool is idle."""
    with Client(front.endpoint, timeout=10) as client:
        wait_for(lambda: pool_whole(client, size), timeout=10,
                 what=f"the pool's {size} connections")
    host, port = front.endpoint.removeprefix("tcp://").rsplit(":", 1)
    conn = ZmtpConnection(host, int(port))
    conn.connect(5.0)
    return conn


Statement = str | tuple[str, list[Any]]


def _send_together(conn: ZmtpConnection, statements: list[Statement]) -> None:
    """Send a query request per statement (SQL, or SQL and parameters) in one write,
    so that the server reads them in one go; their ids count from 1."""
    requests = []
    for i, statement in enumerate(statements):
        sql, params = (statement, None) if isinstance(statement, str) else statement
        requests.append(wire.packb({"v": VERSION, "id": i + 1, "op": "query", "sql": sql,
                                    "params": params}))
    data = b"".join(frame(body) for body in requests)
    sent = 0
    while sent < len(data):
        sent += os.write(conn.fileno(), data[sent:])


def _replies(conn: ZmtpConnection, count: int) -> list[dict[str, Any]]:
    """The replies to the ``count`` requests sent together, in order."""
    deadline = time.monotonic() + 10
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < count:
        body = conn.recv(deadline)
        assert body is not None, f"{len(replies)} of {count} replies came"
        reply = wire.unpackb(body)
        replies[reply["id"]] = reply
    return [replies[i + 1] for i in range(count)]


def _together(conn: ZmtpConnection, statements: list[Statement]) -> list[dict[str, Any]]:
    _send_together(conn, statements)
    return _replies(conn, len(statements))


def _pids(replies: list[dict[str, Any]]) -> set[int]:
    assert all("ok" in reply for reply in replies), replies
    return {reply["ok"]["rows"][0][0] for reply in replies}


def test_requests_that_arrive_together_share_a_connection_behind_short_statements(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    # What counts as short on a loaded test machine: the rule, not the threshold.
    monkeypatch.setattr(pipeline, "SHORT_REQUEST", 0.5)
    with front_end(pool) as front:
        conn = _connect(front)
        try:
            for _ in range(3):  # the statement's record: short
                assert len(_pids(_together(conn, [PID_SQL]))) == 1
            pids = _pids(_together(conn, [PID_SQL] * 6))
        finally:
            conn.close()
    assert len(pids) == 1, f"6 requests sent together ran on {len(pids)} connections"


def test_requests_do_not_join_statements_not_known_to_be_short(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "SHORT_REQUEST", 0.5)
    long_sql = "SELECT pg_backend_pid() FROM pg_sleep(0.6)"
    with front_end(pool) as front:
        conn = _connect(front)
        try:
            # Never run before: nothing says it is short.
            first = _together(conn, [f"{PID_SQL} /* new */", PID_SQL])
            # Run before, and long: the request after it takes another connection.
            _together(conn, [long_sql])
            second = _together(conn, [long_sql, PID_SQL])
        finally:
            conn.close()
    assert len(_pids(first)) == 2
    assert len(_pids(second)) == 2


def test_a_run_that_failed_does_not_make_a_statement_short(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long statement that once failed at once (a bad parameter) is still known to
    be long: the request after it takes another connection."""
    monkeypatch.setattr(pipeline, "SHORT_REQUEST", 0.5)
    sleep = "SELECT pg_backend_pid() FROM pg_sleep(%s)"
    with front_end(pool) as front:
        conn = _connect(front)
        try:
            _together(conn, [(sleep, [0.6])])
            failed = _together(conn, [(sleep, ["not a number"])])
            after = _together(conn, [(sleep, [0.6]), PID_SQL])
        finally:
            conn.close()
    assert "error" in failed[0], failed
    assert len(_pids(after)) == 2


def test_requests_join_only_a_connection_on_which_nothing_runs(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool of one, A's statement running: of two short requests that arrive
    together, the first goes behind A (no connection is idle), and the second does
    not join it there (A runs, and may run long): it waits in the server's queue."""
    monkeypatch.setattr(pipeline, "SHORT_REQUEST", 0.5)
    tag = f"behind-{uuid.uuid4().hex}"
    with Pool.start(pg_dsn, pool_size=1) as one, front_end(one) as front, \
            psycopg.connect(pg_dsn, autocommit=True) as watcher, \
            Client(front.endpoint, timeout=10) as a, \
            Client(front.endpoint, timeout=10) as observer:
        conn = _connect(front, 1)
        try:
            for _ in range(3):  # the statement's record: short
                _together(conn, [PID_SQL])
            a_outcome = _in_thread(
                lambda: a.query(f"SELECT 1 FROM pg_sleep(1) /* {tag}-a */"))
            # Past PIPELINE_BEHIND: nothing may go behind A but the one that always may.
            wait_for(lambda: _running(watcher, f"{tag}-a", 0.05), timeout=10,
                     what="A's statement to run a while")
            _send_together(conn, [PID_SQL, PID_SQL])
            wait_for(lambda: observer.status()["server"]["queued"] == 1, timeout=5,
                     what="the second request in the server's queue")
            replies = _replies(conn, 2)
            a_error = a_outcome.exception(10)
        finally:
            conn.close()
    assert len(_pids(replies)) == 1
    assert a_error is None


def _running(watcher: psycopg.Connection[Any], tag: str, for_at_least: float = 0.0) -> bool:
    """Whether a statement tagged ``tag`` runs, and has for ``for_at_least`` seconds."""
    row = watcher.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
        "AND pid <> pg_backend_pid() AND now() - query_start >= %s * interval '1 s'",
        (f"%{tag}%", for_at_least)).fetchone()
    return bool(row and row[0])


def _in_thread(call: Callable[[], T]) -> Future[T]:
    """``call`` on a thread of its own; its outcome as a future."""
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        return executor.submit(call)
    finally:
        executor.shutdown(wait=False)


@contextmanager
def _a_running(pg_dsn: str, tag: str, seconds: float,
               timeout: float) -> Iterator[tuple[FrontEnd, Client, Future[Any]]]:
    """A pool of one behind a front end, client A's ``pg_sleep(seconds)`` running on
    its connection with a request timeout of ``timeout``: yields the front end,
    client B and A's outcome (done once the block ends)."""
    with Pool.start(pg_dsn, pool_size=1) as pool, front_end(pool) as front, \
            psycopg.connect(pg_dsn, autocommit=True) as watcher, \
            Client(front.endpoint, timeout=10) as b, Client(front.endpoint) as a:
        b.query("SELECT 1")
        a_outcome = _in_thread(lambda: a.query(
            f"SELECT 1 FROM pg_sleep({seconds}) /* {tag}-a */", timeout=timeout))
        wait_for(lambda: _running(watcher, f"{tag}-a"), timeout=10,
                 what="A's statement to run")
        yield front, b, a_outcome
        wait([a_outcome], timeout=10)


def _behind(front: FrontEnd) -> bool:
    """Whether a connection of ``front`` has two requests (read from the test's thread:
    a snapshot is enough)."""
    return any(len(pipe.requests) == 2 for pipe in list(front._pipes.values()))


def test_a_request_behind_one_past_its_deadline_runs(pg_dsn: str) -> None:
    """Pool of one: B goes behind A, which runs past its deadline.  A is cancelled
    at its deadline, and B answers (it was dropped with A's connection, 2 s later)."""
    tag = f"behind-{uuid.uuid4().hex}"
    with _a_running(pg_dsn, tag, 30, timeout=1.0) as (front, b, a_outcome):
        started = time.monotonic()
        b_outcome = _in_thread(lambda: b.query("SELECT 41 + 1"))
        wait_for(lambda: _behind(front), timeout=10, what="B behind A")
        b_result = b_outcome.result(10)
        took = time.monotonic() - started
    # A's client gives up at its timeout, or hears of the cancel first.
    a_error = a_outcome.exception(0)
    assert isinstance(a_error, ConnectionError | psycopg.errors.QueryCanceled), a_error
    assert b_result.rows == [(42,)]
    assert took < 2.5, f"B answered after {took:.2f} s"
    with psycopg.connect(pg_dsn, autocommit=True) as watcher:
        assert not _running(watcher, f"{tag}-a"), "A still runs"


@replaces_methods
def test_a_request_hit_by_a_cancel_meant_for_the_one_before_runs_again(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A passes its deadline and its cancel is held back until B, behind it, runs:
    the cancel lands on B, which the server runs again, and B answers a whole run
    (1 s) after the cancel."""
    tag = f"behind-{uuid.uuid4().hex}"
    send_cancel = FrontEnd._send_cancel
    sent_at: list[float] = []

    def late_cancel(self: FrontEnd, pipe: Any) -> None:
        def when_b_runs() -> None:
            with psycopg.connect(pg_dsn, autocommit=True) as watcher:
                wait_for(lambda: _running(watcher, f"{tag}-b"), timeout=10,
                         what="B's statement to run")
            sent_at.append(time.monotonic())
            send_cancel(self, pipe)

        threading.Thread(target=when_b_runs, daemon=True).start()

    monkeypatch.setattr(FrontEnd, "_send_cancel", late_cancel)
    with _a_running(pg_dsn, tag, 1.5, timeout=1.0) as (front, b, _):
        b_outcome = _in_thread(
            lambda: b.query(f"SELECT 7 FROM pg_sleep(1) /* {tag}-b */"))
        wait_for(lambda: _behind(front), timeout=10, what="B behind A")
        b_result = b_outcome.result(15)
        done = time.monotonic()
    assert sent_at, "no cancel was sent for A"
    assert b_result.rows == [(7,)]
    # Hit at its start, B ran again whole; a cancel that missed it would leave < 1 s.
    assert done - sent_at[0] >= 0.9, f"B answered {done - sent_at[0]:.2f} s after the cancel"


@replaces_methods
def test_a_connection_is_dropped_only_when_a_cancel_goes_unanswered(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """B waits behind A (which takes 2.5 s) well past B's own deadline, with C behind
    B.  When A ends, B is cancelled, and its cancel takes 0.3 s to land: the
    connection, which answers, is kept, and C runs (it was dropped with B's
    connection, B's deadline having passed 2 s before)."""
    tag = f"behind-{uuid.uuid4().hex}"
    send_cancel = FrontEnd._send_cancel

    def slow_cancel(self: FrontEnd, pipe: Any) -> None:
        threading.Timer(0.3, send_cancel, (self, pipe)).start()

    monkeypatch.setattr(FrontEnd, "_send_cancel", slow_cancel)
    with _a_running(pg_dsn, tag, 2.5, timeout=30) as (front, b, a_outcome), \
            Client(front.endpoint, timeout=30) as c:
        b_outcome = _in_thread(lambda: b.query("SELECT 2 FROM pg_sleep(5)", timeout=0.2))
        wait_for(lambda: _behind(front), timeout=10, what="B behind A")
        c_result = _in_thread(lambda: c.query("SELECT 3")).result(15)
        b_error = b_outcome.exception(15)
    assert a_outcome.exception(0) is None
    assert b_error is not None
    assert c_result.rows == [(3,)]
