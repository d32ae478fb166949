"""The pool from asyncio code and from other pykka actors, on real PostgreSQL.

asyncio: ``pool.acheckout()`` / ``pool.aquery()`` must never block the event
loop, neither while a statement runs nor while a task waits in the queue.

Actors: the pool actor (``pool.ref``) answers :class:`RunQuery` either to an
``ask`` (a future of the Result) or, with ``reply_to``, by telling a
:class:`QueryReply`; it must never deadlock an actor that blocks on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pykka
import pytest

from dbpool.actors.listeners import ConnectionEvent
from dbpool.driver import Result
from dbpool.errors import ConnectionError, PoolStoppedError
from dbpool.pool import Pool
from dbpool.pool.connection import AsyncConnection
from dbpool.pool.messages import QueryReply, RunQuery
from tests.support.events import Recorder, kind


def started(pg_dsn: str, pools: list[Pool], size: int = 1, **options: Any) -> Pool:
    """A pool whose connections are all open and idle."""
    events: Recorder[ConnectionEvent] = Recorder()
    # No idle ping unless asked for: one would take a connection out of the
    # queue for a moment, and the tests read the gauges at exact points.
    options.setdefault("idle_interval", 30.0)
    pool = Pool.start(pg_dsn, pool_size=size, connection_listeners=[events], **options)
    pools.append(pool)
    events.wait_count(kind("connected"), size)
    # "connected" is announced just before the actor hands the slot to the queue.
    deadline = time.monotonic() + 5
    while pool.metrics()["ready_conn_count"] != size:
        assert time.monotonic() < deadline, pool.metrics()
        time.sleep(0.005)
    return pool


def queue_length(pool: Pool) -> int:
    return int(pool.metrics()["checkout_queue_length"])


def ready(pool: Pool) -> int:
    return int(pool.metrics()["ready_conn_count"])


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a pool gauge from the loop (nothing else announces a queued task)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def run(coro: Callable[[], Awaitable[None]], timeout: float = 10.0) -> None:
    """Run an async test body on a fresh loop, bounded in time."""

    async def bounded() -> None:
        await asyncio.wait_for(coro(), timeout)

    asyncio.run(bounded())


class Ticker:
    """Counts ``asyncio.sleep(0.01)`` ticks: proof that the loop is not blocked."""

    def __init__(self, counts: Callable[[], bool] = lambda: True) -> None:
        self.ticks = 0
        self._counts = counts
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            if self._counts():
                self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


# -- asyncio ------------------------------------------------------------------


def test_acheckout_yields_an_async_connection(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools, 2)

    async def body() -> None:
        async with pool.acheckout(timeout=5, queue=True) as conn:
            assert isinstance(conn, AsyncConnection)
            result = await conn.query("SELECT %s::int AS n, %s::text AS s", [7, "seven"])
            assert isinstance(result, Result)
            assert result.rows == [(7, "seven")]
            assert [c.name for c in result.columns] == ["n", "s"]
            assert result.rowcount == 1
            assert await conn.status() == "idle"
            (pid,) = (await conn.query("SELECT pg_backend_pid()")).rows[0]
            assert conn.backend_pid == pid
            assert ready(pool) == 1
        assert ready(pool) == 2

        result = await pool.aquery("SELECT generate_series(1, %s)", [3])
        assert result.rows == [(1,), (2,), (3,)] and result.rowcount == 3

    run(body)
    assert pool.metrics()["checkouts"] == 2


def test_a_sql_error_in_async_code_raises_the_psycopg_class(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        async with pool.acheckout(timeout=5) as conn:
            with pytest.raises(psycopg.errors.UndefinedTable):
                await conn.query("SELECT * FROM dbpool_no_such_table")
            assert (await conn.query("SELECT 1")).rows == [(1,)]  # still usable
        with pytest.raises(psycopg.errors.DivisionByZero):
            await pool.aquery("SELECT 1 / 0")

    run(body)
    assert pool.metrics()["disconnects"] == 0


def test_the_loop_keeps_running_while_a_query_runs(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        with Ticker() as ticker:
            began = time.monotonic()
            await pool.aquery("SELECT pg_sleep(0.5)")
            took = time.monotonic() - began
            ticks = ticker.ticks
        assert took >= 0.5
        assert ticks >= 20, f"only {ticks} ticks of 10 ms during a {took:.2f}s query"

    run(body)


def test_the_loop_keeps_running_while_a_task_waits_in_the_queue(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        async with pool.acheckout(timeout=5):
            # The waiter's own timeout ends a loop-blocking wait, failing it.
            waiter = asyncio.create_task(pool.aquery("SELECT 2", timeout=3))
            # Ticks count only while the waiter is queued.
            with Ticker(lambda: queue_length(pool) == 1) as ticker:
                await until(lambda: ticker.ticks >= 20)
            assert not waiter.done()
        result = await waiter
        assert result.rows == [(2,)]

    run(body)
    m = pool.metrics()
    assert m["queue_waits"] == 1 and m["checkout_queue_length"] == 0


def test_an_async_waiter_times_out_with_queue_timeout(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        async with pool.acheckout(timeout=5):
            began = time.monotonic()
            with pytest.raises(ConnectionError) as info:
                async with pool.acheckout(timeout=0.2):
                    raise AssertionError("served while the only connection was held")
            waited = time.monotonic() - began
            assert info.value.reason == "queue_timeout"
            assert 0.2 <= waited < 1.5
            assert queue_length(pool) == 0
        assert (await pool.aquery("SELECT 3")).rows == [(3,)]

    run(body)
    m = pool.metrics()
    assert m["queue_timeouts"] == 1 and m["checkouts"] == 2
    assert (m["ready_conn_count"], m["checkout_queue_length"]) == (1, 0)


def test_cancelling_a_waiting_task_leaves_the_queue(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        async with pool.acheckout(timeout=5) as held:
            holder_pid = held.backend_pid
            waiter = asyncio.create_task(pool.aquery("SELECT 4", timeout=5))
            await until(lambda: queue_length(pool) == 1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert queue_length(pool) == 0
        assert ready(pool) == 1  # the checkin did not go to the cancelled task
        async with pool.acheckout(timeout=1) as conn:
            assert conn.backend_pid == holder_pid
            assert (await conn.query("SELECT 5")).rows == [(5,)]

    run(body)
    m = pool.metrics()
    assert m["checkouts"] == 2 and m["queue_timeouts"] == 0


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-then-checkin",
                                                          "checkin-then-cancel"])
def test_a_cancel_racing_a_checkin_loses_no_connection(
    pg_dsn: str, pools: list[Pool], cancel_first: bool
) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        async def wait_and_use() -> None:
            async with pool.acheckout(timeout=5) as conn:
                await conn.query("SELECT 1")

        for _ in range(10):
            held = pool.acheckout(timeout=5)
            await held.__aenter__()
            waiter = asyncio.create_task(wait_and_use())
            await until(lambda: queue_length(pool) == 1)
            # Neither awaits in between: the checkin hands the slot to the
            # waiter's loop while its cancellation is pending too.
            if cancel_first:
                waiter.cancel()
                await held.__aexit__(None, None, None)
            else:
                await held.__aexit__(None, None, None)
                waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            assert (ready(pool), queue_length(pool)) == (1, 0)
        assert (await pool.aquery("SELECT 6")).rows == [(6,)]

    run(body)
    metrics = pool.metrics()
    assert ready(pool) == 1 and metrics["disconnects"] == 0
    # A slot handed to a task that gave up is not counted as lent.
    assert metrics["checkouts"] == metrics["usage"]["count"]


def test_a_timeout_falling_due_with_a_checkin_is_still_a_queue_timeout(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        held = pool.checkout(timeout=5)
        held.__enter__()
        loop = asyncio.get_running_loop()

        async def waiter() -> None:
            async with pool.acheckout(timeout=0.05):
                pass

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        loop.call_later(0.06, held.__exit__, None, None, None)
        loop.call_later(0.01, time.sleep, 0.1)  # the timeout and the checkin fall due together
        with pytest.raises(ConnectionError) as info:
            await task
        assert info.value.reason == "queue_timeout"

    run(body)
    metrics = pool.metrics()
    assert metrics["queue_timeouts"] == 1
    assert metrics["checkouts"] == metrics["usage"]["count"] == 1
    assert pool.query("SELECT 1").rows == [(1,)]


def test_a_transaction_left_open_is_rolled_back_at_async_exit(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        async with pool.acheckout(timeout=5) as conn:
            pid = conn.backend_pid
            await conn.query("CREATE TEMP TABLE dbpool_async_tx (n int)")
            await conn.query("BEGIN")
            await conn.query("INSERT INTO dbpool_async_tx VALUES (1)")
            assert await conn.status() == "transaction"
        async with pool.acheckout(timeout=5) as conn:
            assert conn.backend_pid == pid  # the same session, not a replacement
            assert await conn.status() == "idle"
            assert (await conn.query("SELECT count(*) FROM dbpool_async_tx")).rows == [(0,)]

    with caplog.at_level(logging.WARNING, logger="dbpool.pool"):
        run(body)
    assert any("rolled back" in r.getMessage() for r in caplog.records)
    assert pool.metrics()["disconnects"] == 0


def test_queue_false_with_nothing_idle_raises_queue_disabled(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools)

    async def body() -> None:
        assert (await pool.aquery("SELECT 7", queue=False)).rows == [(7,)]
        async with pool.acheckout(timeout=5):
            with pytest.raises(ConnectionError) as info:
                async with pool.acheckout(timeout=5, queue=False):
                    raise AssertionError("served while the only connection was held")
            assert info.value.reason == "queue_disabled"
            assert queue_length(pool) == 0

    run(body)
    assert pool.metrics()["queue_disabled"] == 1


# -- the actor-message API ----------------------------------------------------


class Asker(pykka.ThreadingActor):
    """Sends RunQuery messages to the pool and records the QueryReply messages."""

    def __init__(self, pool: pykka.ActorRef[Any], replies: Recorder[QueryReply]) -> None:
        super().__init__()
        self.pool = pool
        self.replies = replies

    def on_receive(self, message: Any) -> Any:
        match message:
            case QueryReply():
                self.replies(message)
            case ("send", list(queries)):
                for tag, sql, params in queries:
                    self.pool.tell(RunQuery(sql, params, reply_to=self.actor_ref, tag=tag))
        return None


class BlockingAsker(pykka.ThreadingActor):
    """Asks the pool and blocks on the answer inside its own on_receive."""

    def __init__(self, pool: pykka.ActorRef[Any], answers: Recorder[Any]) -> None:
        super().__init__()
        self.pool = pool
        self.answers = answers

    def on_receive(self, message: Any) -> Any:
        sql, params = message
        try:
            self.answers(self.pool.ask(RunQuery(sql, params)).get(timeout=5))
        except Exception as exc:
            self.answers(exc)
        return None


@pytest.fixture
def actors() -> Iterator[list[pykka.ActorRef[Any]]]:
    """ActorRefs to stop at teardown."""
    refs: list[pykka.ActorRef[Any]] = []
    yield refs
    for ref in refs:
        try:
            ref.stop(timeout=5)
        except pykka.ActorDeadError:
            pass


def test_ask_run_query_returns_a_result(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools)
    result = pool.ref.ask(RunQuery("SELECT %s::int, %s::text", [42, "x"])).get(timeout=5)
    assert isinstance(result, Result)
    assert result.rows == [(42, "x")] and result.rowcount == 1
    assert pool.metrics()["checkouts"] == 1 and ready(pool) == 1


def test_ask_run_query_with_a_sql_error_raises_the_psycopg_class(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools)
    future = pool.ref.ask(RunQuery("SELECT * FROM dbpool_no_such_table"))
    with pytest.raises(psycopg.errors.UndefinedTable):
        future.get(timeout=5)
    assert pool.ref.ask(RunQuery("SELECT 1")).get(timeout=5).rows == [(1,)]
    assert pool.metrics()["disconnects"] == 0 and ready(pool) == 1


def test_run_query_timeout_applies_to_the_wait(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools)
    with pool.checkout():
        future = pool.ref.ask(RunQuery("SELECT 1", timeout=0.1))
        with pytest.raises(ConnectionError) as info:
            future.get(timeout=5)
    assert info.value.reason == "queue_timeout"
    assert pool.ref.ask(RunQuery("SELECT 1")).get(timeout=5).rows == [(1,)]


def test_an_actor_gets_query_replies_for_many_queries_on_a_pool_of_one(
    pg_dsn: str, pools: list[Pool], actors: list[pykka.ActorRef[Any]]
) -> None:
    pool = started(pg_dsn, pools)
    replies: Recorder[QueryReply] = Recorder()
    asker = Asker.start(pool.ref, replies)
    actors.append(asker)
    queries = [(f"q{i}", "SELECT %s::int, pg_backend_pid()", [i]) for i in range(8)]
    asker.tell(("send", queries))
    got = replies.wait_count(lambda r: True, 8)
    assert sorted(r.tag for r in got) == sorted(f"q{i}" for i in range(8))
    assert all(r.error is None and r.result is not None for r in got)
    assert all(r.result is not None and r.result.rows[0][0] == int(r.tag[1:]) for r in got)
    assert len({r.result.rows[0][1] for r in got if r.result is not None}) == 1  # one connection
    m = pool.metrics()
    assert m["checkouts"] == 8 and (m["ready_conn_count"], m["checkout_queue_length"]) == (1, 0)


def test_an_actor_gets_the_sql_error_in_its_query_reply(
    pg_dsn: str, pools: list[Pool], actors: list[pykka.ActorRef[Any]]
) -> None:
    pool = started(pg_dsn, pools)
    replies: Recorder[QueryReply] = Recorder()
    asker = Asker.start(pool.ref, replies)
    actors.append(asker)
    asker.tell(("send", [("bad", "SELECT * FROM dbpool_no_such_table", None),
                         ("good", "SELECT 9", None)]))
    got = {r.tag: r for r in replies.wait_count(lambda r: True, 2)}
    assert got["bad"].result is None
    assert isinstance(got["bad"].error, psycopg.errors.UndefinedTable)
    assert got["good"].error is None and got["good"].result is not None
    assert got["good"].result.rows == [(9,)]


def test_an_actor_blocking_on_ask_inside_on_receive_gets_its_answers(
    pg_dsn: str, pools: list[Pool], actors: list[pykka.ActorRef[Any]]
) -> None:
    pool = started(pg_dsn, pools)
    answers: Recorder[Any] = Recorder()
    askers = [BlockingAsker.start(pool.ref, answers) for _ in range(3)]
    actors.extend(askers)
    for i, asker in enumerate(askers):
        for j in range(3):
            asker.tell(("SELECT %s::int", [10 * i + j]))
    got = answers.wait_count(lambda a: True, 9)
    assert all(isinstance(a, Result) for a in got), got
    assert sorted(a.rows[0][0] for a in got) == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    assert (ready(pool), queue_length(pool)) == (1, 0)


def test_a_run_query_waiting_for_a_connection_does_not_hold_up_the_pool_actor(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools)
    with pool.checkout():
        waiting = pool.ref.ask(RunQuery("SELECT 1", timeout=10))
        deadline = time.monotonic() + 5
        while queue_length(pool) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        # Stopping goes through the pool actor's mailbox: it must be free.
        began = time.monotonic()
        pool.stop(timeout=5)
        assert time.monotonic() - began < 2 and not pool.alive
        with pytest.raises(PoolStoppedError):
            waiting.get(timeout=1)


def test_run_query_after_stop_raises_actor_dead(pg_dsn: str, pools: list[Pool]) -> None:
    pool = started(pg_dsn, pools)
    pool.stop()
    with pytest.raises(pykka.ActorDeadError):
        pool.ref.ask(RunQuery("SELECT 1"))
    with pytest.raises(pykka.ActorDeadError):
        pool.ref.tell(RunQuery("SELECT 1"))


def test_run_query_in_flight_at_stop_finishes_and_a_queued_one_fails(
    pg_dsn: str, pools: list[Pool]
) -> None:
    pool = started(pg_dsn, pools)
    running = pool.ref.ask(RunQuery("SELECT pg_sleep(0.3), 1"))
    queued = pool.ref.ask(RunQuery("SELECT 2"))
    deadline = time.monotonic() + 5
    while pool.metrics()["checkouts"] < 1:  # the first one holds the only connection
        assert time.monotonic() < deadline
        time.sleep(0.005)
    pool.stop()
    assert running.get(timeout=5).rows == [("", 1)]
    with pytest.raises(PoolStoppedError):
        queued.get(timeout=5)
