"""The overload row of ``dbpool bench --remote``: twice what the pool can serve.

Issue 20's row 4.  A pool of :data:`POOL_SIZE` (2) connections runs
:data:`SQL`, a query that takes :data:`QUERY_SECONDS` (10 ms) whatever the
machine, so the pool's capacity is known and small:
:data:`CAPACITY` = 200 queries per second, cheap to exceed on a 2-core
machine.  One process offers :data:`LOAD` (2) times that, 400 requests per
second, for ``seconds`` (20 by default) through each pooler in turn:

- ``dbpool``: ``dbpool serve`` (:func:`~dbpool.bench.servers.start_poolers`,
  ``--pool-size 2``, no configuration: its CoDel queue has the pool's
  defaults, :data:`QUEUE_TARGET` 50 ms and :data:`QUEUE_INTERVAL` 2 s), through
  one :class:`dbpool.client.AsyncClient`, whose requests may overlap;
- ``pgbouncer``: PgBouncer in transaction mode with ``default_pool_size = 2``
  and its default ``query_wait_timeout`` of 120 s (what it does in real life:
  a waiting client waits up to two minutes), through psycopg's
  ``AsyncConnectionPool`` of :data:`BOUNCER_CLIENTS` connections, opened
  before the clock starts.  A PgBouncer client has one query in flight at a
  time, so the requests in flight need a connection each; with a connection
  for every request that may be in flight, and more for those being
  replaced (below), requests wait in PgBouncer's queue, not in psycopg's
  pool.  A connection per request instead would measure 400 connects a
  second in this process.

**Open loop.**  Requests start on a fixed schedule, one every 1/400 s,
whether or not earlier ones were answered (each is an asyncio task): that is
what makes a queue grow, where a closed loop of N clients slows down to what
the pool serves.  At most :data:`MAX_OUTSTANDING` are in flight; a request
due beyond that is not sent and counts as ``skipped`` (none should be: by
then the earlier ones have reached their deadline).

**Deadlines.**  Each request has :data:`REQUEST_TIMEOUT` (2 s), and its
pooler learns when it is over, so that neither runs queries for callers
that are gone: dbpool's client sends the timeout with the request (the
server drops a request still queued at its deadline); the PgBouncer client
closes its connection at the deadline (it shuts the socket down), the only
way to take back a query that waits in PgBouncer's queue: PgBouncer 1.18
answers a cancel request for a client still waiting for a server with a
bare ReadyForQuery and leaves its query queued.  PgBouncer then forgets the
waiting client; if the query was already running, it closes that server
connection ("client disconnect while server was not ready") and opens
another, which the report counts.

**Figures**, per contender: the requests sent, served, failed fast (an
error before the deadline: dbpool's answer to a request its CoDel queue
shed is ``ConnectionError(reason="queue_timeout")``) and timed out (no
answer by the deadline: the caller waited the whole time); the p50, p99 and
maximum latency of the served requests; the median time to an error; and
the p99 of the requests sent once CoDel had time to act (after
:data:`WARMUP_INTERVALS` queue intervals: one to see the queue stay above
its target, one to start shedding).

**Target** (:func:`overload_target`): CoDel, once the queue has stayed above
``queue_target`` for a whole ``queue_interval``, drops every waiter older
than twice the target, so a request it serves has waited at most
``2 x queue_target``.  After the warm-up, dbpool's served p99 must be at
most :data:`P99_TARGETS` (3) x ``queue_target`` + :data:`QUERY_SECONDS`:
the query's own time, the two targets of the longest allowed wait, and one
target of slack for the way to the database and back (160 ms with the
defaults).  PASS is value <= threshold.  A FIFO queue without shedding,
PgBouncer's, serves requests that waited nearly their whole deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from dbpool.pool.options import PoolOptions

from .servers import Backend, DbpoolServer, PgBouncer, one_line, start_poolers
from .table import cell

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["CAPACITY", "LOAD", "P99_TARGETS", "POOL_SIZE", "QUERY_SECONDS", "REQUEST_TIMEOUT",
           "TARGET", "overload_target", "print_overload", "run_overload"]

logger = logging.getLogger("dbpool.bench.overload")

#: What the query takes on the database, whatever the machine.
QUERY_SECONDS = 0.01
SQL = f"SELECT pg_sleep({QUERY_SECONDS:g})"
#: Server connections behind either pooler.
POOL_SIZE = 2
#: Queries per second the pool can serve at most.
CAPACITY = POOL_SIZE / QUERY_SECONDS
#: Offered load over capacity.
LOAD = 2.0
OFFERED = LOAD * CAPACITY
#: Seconds a request may take, its wait included; past it, it has timed out.
REQUEST_TIMEOUT = 2.0
#: Requests in flight at most: a quarter more than an open loop keeps in flight
#: when every request waits until its deadline.
MAX_OUTSTANDING = round(1.25 * OFFERED * REQUEST_TIMEOUT)
#: psycopg's connections to PgBouncer: one per request in flight, and a second's worth
#: more for those closed at a deadline that the pool is still replacing.
BOUNCER_CLIENTS = MAX_OUTSTANDING + round(OFFERED)
#: dbpool serve's CoDel settings: the pool's defaults, as DbpoolServer passes none.
QUEUE_TARGET = PoolOptions.queue_target
QUEUE_INTERVAL = PoolOptions.queue_interval
#: Queue intervals before the served p99 is judged: CoDel sheds nothing until
#: the queue has stayed above its target for a whole interval.
WARMUP_INTERVALS = 2
#: dbpool's served p99 after the warm-up: at most this many queue targets plus the query.
P99_TARGETS = 3
#: PgBouncer's query_wait_timeout, left at its default (seconds).
PGBOUNCER_QUERY_WAIT_TIMEOUT = 120.0
TARGET = (f"{LOAD:g}x overload, open loop: dbpool served p99 after {WARMUP_INTERVALS} "
          f"queue intervals <= {P99_TARGETS} x queue_target + the query's "
          f"{QUERY_SECONDS * 1000:g} ms")
#: Timers fire a hair early at most: a failure this close to its deadline is a time-out.
_DEADLINE_SLACK = 0.001
#: Seconds past its deadline after which a request that has not ended is cancelled.
_DRAIN_MARGIN = 5.0
#: What PgBouncer logs when it closes a server connection whose client left mid-query.
_LEFT_MID_QUERY = "client disconnect while server was not ready"

#: Runs one request, given the seconds it has left; raises if it fails.
Request = Callable[[float], Awaitable[object]]
#: A contender's figures of its own, read after its turn.
Extras = Callable[[], Awaitable[dict[str, Any]]]


@dataclass
class OverloadTurn:
    """One contender's turn: every request's outcome."""

    contender: str
    #: Seconds the requests were being sent for.
    seconds: float = 0.0
    #: Per request: when it was sent (seconds from the start), how long it took,
    #: and None if it was served, else what failed.
    outcomes: list[tuple[float, float, str | None]] = field(default_factory=list)
    skipped: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


def _failure(exc: BaseException) -> str:
    """A failure's kind for the report: its class, and its reason if it has one."""
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}({reason})" if isinstance(reason, str) else type(exc).__name__


async def _offer(request: Request, seconds: float, turn: OverloadTurn) -> None:
    """Start ``request`` :data:`OFFERED` times a second for ``seconds``, whatever the
    answers; return when every request has ended (each ends by its deadline)."""
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    outcomes = turn.outcomes
    #: The first error of each kind, for the log.
    failures: dict[str, str] = {}
    began = time.monotonic()

    async def one(sent: float) -> None:
        failure: str | None = "cancelled"
        try:
            # The deadline counts from the moment the request was sent.
            await request(sent + REQUEST_TIMEOUT - time.monotonic())
            failure = None
        except Exception as exc:
            failure = _failure(exc)
            if failure not in failures:
                failures[failure] = one_line(exc)
        finally:  # a cancelled request counts too: every request sent is accounted for
            outcomes.append((sent - began, time.monotonic() - sent, failure))

    for i in range(round(OFFERED * seconds)):
        # Due times are absolute: a late wake-up sends the overdue requests at once,
        # so the rate offered stays OFFERED whatever the loop's delays.
        delay = began + i / OFFERED - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= MAX_OUTSTANDING:
            turn.skipped += 1
            continue
        task = loop.create_task(one(time.monotonic()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    turn.seconds = time.monotonic() - began
    if in_flight:
        # Every request ends by its deadline, or just after if it is hung up.
        _, stuck = await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT + _DRAIN_MARGIN)
        for task in stuck:
            task.cancel()
        if stuck:
            logger.warning("%s: %s requests had not ended %g s after their deadline: cancelled",
                           turn.contender, len(stuck), _DRAIN_MARGIN)
            await asyncio.wait(stuck)
    for failure, example in failures.items():
        logger.info("%s: failures of kind %s, such as %s", turn.contender, failure, example)
    if turn.skipped:
        logger.warning("%s: %s requests not sent, %s already in flight", turn.contender,
                       turn.skipped, MAX_OUTSTANDING)


async def _warm_up(request: Request) -> None:
    """A few rounds of as many requests as the pool has connections and more, so that
    every connection on the way is open before the clock starts."""
    for _ in range(3):
        await asyncio.gather(*(request(REQUEST_TIMEOUT) for _ in range(POOL_SIZE * 4)))


@contextlib.asynccontextmanager
async def _dbpool(server: DbpoolServer) -> AsyncIterator[tuple[Request, Extras]]:
    from dbpool.client import AsyncClient

    async with AsyncClient(server.endpoint, timeout=REQUEST_TIMEOUT) as client:
        async def query(left: float) -> object:
            # The timeout goes to the server too: a request still queued at its deadline
            # is dropped there, not run for a caller that is gone.
            return await client.query(SQL, timeout=max(left, _DEADLINE_SLACK))

        async def extras() -> dict[str, Any]:
            status = await client.status()
            # The pool's CoDel drops: when dbpool sheds load, they count here.
            return {"codel_drops": status["pool"]["drops"]}

        yield query, extras


def _hang_up(conn: AsyncConnection[Any]) -> None:
    """Shut down the TCP connection under ``conn``, as a client that gives up closes it.

    Not ``conn.close()``: another task awaits the connection's socket, and
    closing the descriptor under it would leave the event loop watching a
    number the next socket may reuse.  A shutdown leaves the descriptor open:
    that task reads the end of the stream and fails, and then the connection
    can be closed.
    """
    with contextlib.suppress(psycopg.Error, OSError), \
            socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.asynccontextmanager
async def _pgbouncer(bouncer: PgBouncer) -> AsyncIterator[tuple[Request, Extras]]:
    from psycopg_pool import AsyncConnectionPool

    # prepare_threshold=None: transaction pooling and psycopg's prepared statements
    # do not mix unless PgBouncer tracks them (max_prepared_statements).  More workers
    # than the default 3 replace the connections hung up at deadlines sooner.
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        bouncer.dsn, min_size=BOUNCER_CLIENTS, max_size=BOUNCER_CLIENTS, open=False,
        timeout=REQUEST_TIMEOUT, num_workers=8,
        kwargs={"autocommit": True, "prepare_threshold": None})
    await pool.open(wait=True, timeout=120)
    loop = asyncio.get_running_loop()
    # A request hung up at its deadline goes back to the pool closed, on purpose, and
    # psycopg_pool warns of each: thousands of lines a run, all expected (PgBouncer's
    # log counts what they cost it: server_connections_closed).
    pool_log = logging.getLogger("psycopg.pool")
    pool_log_level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        async def fetch(conn: AsyncConnection[Any]) -> object:
            cur = await conn.execute(SQL)
            return await cur.fetchall()

        async def query(left: float) -> object:
            deadline = loop.time() + left
            async with pool.connection(timeout=max(left, _DEADLINE_SLACK)) as conn:
                running = asyncio.ensure_future(fetch(conn))
                done, _ = await asyncio.wait((running,), timeout=deadline - loop.time())
                if done:
                    return running.result()
                _hang_up(conn)
                with contextlib.suppress(psycopg.Error):
                    await running
                # Closed, the pool replaces it; left open (if its answer came just as it was
                # hung up), its next request would fail on the shut socket.
                await conn.close()
                raise TimeoutError(f"no answer from pgbouncer within {REQUEST_TIMEOUT:g} s")

        async def extras() -> dict[str, Any]:
            return {"server_connections_closed": _count_in_log(bouncer, _LEFT_MID_QUERY)}

        yield query, extras
    finally:
        await pool.close()
        pool_log.setLevel(pool_log_level)


def _count_in_log(bouncer: PgBouncer, text: str) -> int | None:
    try:
        with open(bouncer.dir / "pgbouncer.log", errors="replace") as log:
            return sum(text in line for line in log)
    except OSError:
        return None


Contender = Callable[[], contextlib.AbstractAsyncContextManager[tuple[Request, Extras]]]


async def _turns(contenders: dict[str, Contender], seconds: float,
                 unavailable: dict[str, str]) -> list[OverloadTurn]:
    """Each contender in turn, one after the other, never two at once."""
    turns: list[OverloadTurn] = []
    for name, make in contenders.items():
        turn = OverloadTurn(name)
        try:
            async with make() as (request, extras):
                await _warm_up(request)
                before = await extras()
                used, wall = time.process_time(), time.monotonic()
                await _offer(request, seconds, turn)
                used, wall = time.process_time() - used, time.monotonic() - wall
                after = await extras()
        except Exception as exc:
            logger.warning("%s: the overload turn failed: %s", name, one_line(exc))
            unavailable[name] = f"the overload turn failed: {one_line(exc)}"
            continue
        # Counters of the turn alone: the warm-up and the server's start are not its own.
        turn.extras = {key: None if value is None or before.get(key) is None
                       else value - before[key] for key, value in after.items()}
        # This process's CPU while it offered the load: near 100%, the client itself
        # (not the pooler) would be what limits the figures.
        turn.extras["client_cpu_percent"] = round(100 * used / wall)
        turns.append(turn)
    return turns


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _percentile_ms(values: list[float], percent: int) -> float | None:
    if len(values) < 2:
        return _ms(values[0]) if values else None
    return _ms(statistics.quantiles(values, n=100, method="inclusive")[percent - 1])


def _figures(turn: OverloadTurn, steady_after: float) -> dict[str, Any]:
    served = [took for _, took, failure in turn.outcomes if failure is None]
    steady = [took for sent, took, failure in turn.outcomes
              if failure is None and sent >= steady_after]
    failed = [(took, failure) for _, took, failure in turn.outcomes if failure is not None]
    late = REQUEST_TIMEOUT - _DEADLINE_SLACK
    fast = Counter(failure for took, failure in failed if took < late)
    sent = len(turn.outcomes)
    per_second = 1 / turn.seconds if turn.seconds > 0 else 0.0
    return {
        "offered_per_second": round((sent + turn.skipped) * per_second),
        "sent": sent,
        "skipped": turn.skipped,
        "served": len(served),
        "served_per_second": round(len(served) * per_second),
        "failed_fast": sum(fast.values()),
        "timed_out": len(failed) - sum(fast.values()),
        "failed_share": round(len(failed) / sent, 3) if sent else None,
        "p50_ms": _percentile_ms(served, 50),
        "p99_ms": _percentile_ms(served, 99),
        "max_ms": _ms(max(served)) if served else None,
        "steady_p99_ms": _percentile_ms(steady, 99),
        "error_median_ms": _ms(statistics.median(took for took, _ in failed)) if failed else None,
        "fast_errors": dict(fast.most_common()),
        **turn.extras,
    }


def run_overload(dsn: str, backend: Backend | None, bouncer_binary: str | None,
                 seconds: float = 20.0,
                 unavailable: dict[str, str] | None = None) -> dict[str, Any]:
    """Overload each pooler (those that start) in turn for ``seconds``; return the row.

    A contender that cannot start, or whose turn fails, is left out, with
    its reason in ``unavailable``.  Runs shorter than ``WARMUP_INTERVALS x
    QUEUE_INTERVAL`` (4 s) have no ``steady_p99_ms``, and the target is then
    not measured.
    """
    unavailable = {} if unavailable is None else unavailable
    if bouncer_binary is None:
        unavailable.setdefault("pgbouncer", "not installed")
    elif backend is None:
        unavailable.setdefault("pgbouncer", "PostgreSQL's address was not resolved")
    contenders: dict[str, Contender] = {}
    with contextlib.ExitStack() as stack:
        bouncer, server = start_poolers(stack, dsn, backend, bouncer_binary, POOL_SIZE,
                                        unavailable)
        if server is not None:
            contenders["dbpool"] = lambda: _dbpool(server)
        if bouncer is not None:
            contenders["pgbouncer"] = lambda: _pgbouncer(bouncer)
        turns = asyncio.run(_turns(contenders, seconds, unavailable)) if contenders else []
    steady_after = WARMUP_INTERVALS * QUEUE_INTERVAL
    return {
        "workload": SQL,
        "pool_size": POOL_SIZE,
        "capacity_per_second": round(CAPACITY),
        "load": LOAD,
        "seconds": seconds,
        "request_timeout": REQUEST_TIMEOUT,
        "max_outstanding": MAX_OUTSTANDING,
        "queue_target": QUEUE_TARGET,
        "queue_interval": QUEUE_INTERVAL,
        "steady_after": steady_after,
        "pgbouncer_query_wait_timeout": PGBOUNCER_QUERY_WAIT_TIMEOUT,
        "contenders": {t.contender: _figures(t, steady_after) for t in turns},
        "unavailable": {name: why for name, why in unavailable.items()
                        if name in ("dbpool", "pgbouncer")},
    }


def overload_target(report: dict[str, Any]) -> tuple[float | None, float]:
    """(dbpool's served p99 in ms after the warm-up, the most it may be): PASS is
    value <= threshold; a value of None was not measured."""
    threshold = _ms(P99_TARGETS * report["queue_target"] + QUERY_SECONDS)
    dbpool = report["contenders"].get("dbpool")
    return (None if dbpool is None else dbpool["steady_p99_ms"]), threshold


def print_overload(report: dict[str, Any]) -> None:
    """Print the row's section, as ``dbpool bench --remote`` prints the others."""
    print(f"\noverload: {report['workload']!r} on a pool of {report['pool_size']} (capacity "
          f"{report['capacity_per_second']} q/s), {report['load']:g}x that offered in an open "
          f"loop for {report['seconds']:g} s per pooler, {report['request_timeout']:g} s per "
          f"request;\ndefaults: dbpool's CoDel queue_target {report['queue_target'] * 1000:g} ms, "
          f"queue_interval {report['queue_interval']:g} s; PgBouncer's query_wait_timeout "
          f"{report['pgbouncer_query_wait_timeout']:g} s\n")
    for name, why in report["unavailable"].items():
        print(f"  {name}: {why.splitlines()[0] if why else ''}")
    after = f"p99 after {report['steady_after']:g}s"
    print(f"  {'':>9} {'offered/s':>9} {'sent':>6} {'served':>6} {'served/s':>8} "
          f"{'failed':>6} {'fast':>5} {'timed out':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {after:>15} {'to error ms':>11}")
    for name, row in report["contenders"].items():
        failed = None if row["failed_share"] is None else row["failed_share"] * 100
        print(f"  {name:>9} {row['offered_per_second']:>9} {row['sent']:>6} {row['served']:>6} "
              f"{row['served_per_second']:>8} {cell(failed, 5)}% {row['failed_fast']:>5} "
              f"{row['timed_out']:>9} {cell(row['p50_ms'], 7)} {cell(row['p99_ms'], 7)} "
              f"{cell(row['max_ms'], 7)} {cell(row['steady_p99_ms'], 15)} "
              f"{cell(row['error_median_ms'], 11)}")
    for name, row in report["contenders"].items():
        notes = [f"client process CPU {row['client_cpu_percent']}%"]
        notes += [f"{kind} x {count}" for kind, count in row["fast_errors"].items()]
        if "codel_drops" in row:
            notes.append(f"{row['codel_drops']} CoDel drops in the pool")
        if row.get("server_connections_closed") is not None:
            notes.append(f"{row['server_connections_closed']} server connections closed "
                         "as their client left mid-query")
        if row["skipped"]:
            notes.append(f"{row['skipped']} not sent, {report['max_outstanding']} in flight")
        print(f"  {name}: " + "; ".join(notes))
    value, threshold = overload_target(report)
    print(f"  dbpool's served p99 after {report['steady_after']:g} s: "
          f"{cell(value, 0)} ms (target <= {threshold:g} ms: {P99_TARGETS} x queue_target "
          f"+ {QUERY_SECONDS * 1000:g} ms query)")
