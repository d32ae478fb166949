"""The asyncio row of ``dbpool bench --remote``: many tasks in one process.

One process runs ``tasks`` asyncio tasks (256 by default), each running
``SELECT 1`` in a loop, in turns of ``duration`` seconds, two ways:

- ``dbpool``: one :class:`dbpool.client.AsyncClient` through ``dbpool
  serve``, whose requests from every task share one socket and are
  pipelined on the pool's connections;
- ``pgbouncer``: psycopg's ``AsyncConnectionPool`` of as many connections as
  tasks, to a PgBouncer in transaction mode, as an asyncio application
  would use PgBouncer (each task checks a connection out per query).

Both poolers keep :data:`POOL_SIZE` server connections.  Each turn also
reports where the CPU went, in microseconds per query: in the client process
(this one), in the pooler's process (``dbpool serve`` or PgBouncer) and in
PostgreSQL's processes.  The contenders take
turns in an order that rotates from round to round; a rate is the median
over rounds, the ratio the median of the per-round ratios.  The target
(:data:`THRESHOLD`): dbpool's q/s at least twice PgBouncer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

from .servers import (
    Backend,
    DbpoolServer,
    PairedTurn,
    cpu_now,
    median_cpu,
    median_ratio,
    one_line,
    start_poolers,
)

__all__ = ["POOL_SIZE", "TASKS", "THRESHOLD", "run_many_tasks"]

logger = logging.getLogger("dbpool.bench.many_tasks")

SQL = "SELECT 1"
TASKS = 256
#: Server connections behind either pooler.
POOL_SIZE = 10
#: dbpool's q/s over PgBouncer's, at least.
THRESHOLD = 2.0
#: Seconds a client may wait for one answer before the turn counts as failed.
REQUEST_TIMEOUT = 30.0

Query = Callable[[], Awaitable[object]]
#: A contender: how to open its query, and the pid of its pooler's process.
Contender = tuple[Callable[[], contextlib.AbstractAsyncContextManager[Query]], int]


async def _drive(query: Query, tasks: int, duration: float) -> tuple[int, float, list[str]]:
    """``tasks`` tasks running ``query`` until ``duration`` has passed: (queries, seconds,
    errors).  A task that fails stops; the others go on."""
    counts = [0] * tasks
    errors: set[str] = set()
    deadline = time.monotonic() + duration

    async def loop(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                await query()
            except Exception as exc:
                errors.add(one_line(exc))
                return
            counts[i] += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(tasks)))
    return sum(counts), time.perf_counter() - started, sorted(errors)


@contextlib.asynccontextmanager
async def _dbpool(server: DbpoolServer) -> AsyncIterator[Query]:
    from dbpool.client import AsyncClient

    async with AsyncClient(server.endpoint, timeout=REQUEST_TIMEOUT) as client:
        async def query() -> object:
            return await client.query(SQL)

        yield query


@contextlib.asynccontextmanager
async def _pgbouncer(dsn: str, tasks: int) -> AsyncIterator[Query]:
    from psycopg_pool import AsyncConnectionPool

    # prepare_threshold=None: transaction pooling and psycopg's prepared statements
    # do not mix unless PgBouncer tracks them (max_prepared_statements).
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=tasks, max_size=tasks, open=False, timeout=REQUEST_TIMEOUT,
        kwargs={"autocommit": True, "prepare_threshold": None})
    await pool.open(wait=True, timeout=120)
    try:
        async def query() -> object:
            async with pool.connection() as conn:
                cur = await conn.execute(SQL)
                return await cur.fetchall()

        yield query
    finally:
        await pool.close()


async def _turns(contenders: dict[str, Contender], tasks: int, duration: float,
                 rounds: int) -> list[PairedTurn]:
    names = list(contenders)
    turns: list[PairedTurn] = []
    async with contextlib.AsyncExitStack() as stack:
        queries = {name: await stack.enter_async_context(make())
                   for name, (make, _) in contenders.items()}
        for query in queries.values():  # warm up: every connection opened and used
            await _drive(query, tasks, 0.2)
        for round_ in range(rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                pid = contenders[name][1]
                before = cpu_now(pid)
                done, seconds, errors = await _drive(queries[name], tasks, duration)
                after = cpu_now(pid)
                if errors:
                    logger.warning("%s, %s tasks, round %s: %s", name, tasks, round_ + 1,
                                   "; ".join(errors))
                turn = PairedTurn(name, round_, done, seconds, errors)
                turn.charge(before, after)
                turns.append(turn)
    return turns


def run_many_tasks(dsn: str, backend: Backend | None, bouncer_binary: str | None,
                   duration: float, rounds: int, tasks: int = TASKS,
                   unavailable: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure both contenders (those that start); return the row's figures.

    A contender that cannot start is left out, with its reason in
    ``unavailable``; the ratio is then None.
    """
    unavailable = {} if unavailable is None else unavailable
    contenders: dict[str, Contender] = {}
    with contextlib.ExitStack() as stack:
        bouncer, server = start_poolers(stack, dsn, backend, bouncer_binary, POOL_SIZE,
                                        unavailable)
        if bouncer is not None and bouncer.proc is not None:
            bouncer_dsn = bouncer.dsn
            contenders["pgbouncer"] = (lambda: _pgbouncer(bouncer_dsn, tasks), bouncer.pid)
        if server is not None:
            contenders["dbpool"] = (lambda: _dbpool(server), server.pid)
        turns = asyncio.run(_turns(contenders, tasks, duration, rounds)) if contenders else []
    qps: dict[str, int | None] = {}
    for name in ("dbpool", "pgbouncer"):
        rates = [t.per_second for t in turns if t.contender == name and not t.errors]
        qps[name] = round(statistics.median(rates)) if rates else None
    cpu = {name: median_cpu(turns, name) for name in ("dbpool", "pgbouncer")}
    return {
        "tasks": tasks,
        "pool_size": POOL_SIZE,
        "qps": qps,
        "cpu_us_per_query": cpu,
        "dbpool/pgbouncer": median_ratio(turns, "dbpool", "pgbouncer"),
        "turns": [asdict(t) | {"per_second": round(t.per_second)} for t in turns],
    }
