"""``dbpool bench --fairness``: one client floods a pool of 2, another sends one request
at a time; how long does the polite one wait, through ``dbpool serve`` and through
PgBouncer?

Each contender gets a pool of 2 connections and the same workload,
``SELECT pg_sleep(0.002)``:

- the polite client (this process) first measures its latency on the idle
  pool, one request at a time;
- a flood process then keeps 200 requests outstanding (dbpool: one
  ``AsyncClient`` with 200 requests in flight; PgBouncer: 200 connections,
  one request each, as a PgBouncer client can have only one);
- for ``duration`` seconds the polite client keeps sending one request at a
  time; the report gives its median and p99 latency, both against its idle
  median, and its share of all the requests completed meanwhile.

PgBouncer serves waiting clients first come, first served, so the polite
client waits behind the flood; dbpool takes waiting requests in turn by
client and gives each client its share of the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any

import psycopg

from .servers import Backend, DbpoolServer, PgBouncer, ServerError, find_pgbouncer

__all__ = ["run_fairness"]

SQL = "SELECT pg_sleep(0.002)"
POOL_SIZE = 2
FLOOD = 200
IDLE_QUERIES = 200
#: Seconds to wait for the flood to fill the pool's queue.
SATURATE_TIMEOUT = 30.0


def _flood_dbpool(endpoint: str, count: Synchronized[int], ready: Event, stop: Event) -> None:
    from dbpool.client import AsyncClient
    from dbpool.errors import ConnectionError

    async def main() -> None:
        async with AsyncClient(endpoint, timeout=120) as client:
            async def one() -> None:
                while not stop.is_set():
                    try:
                        await client.query(SQL)
                    except ConnectionError as error:
                        if error.reason != "queue_timeout":
                            raise
                        continue  # shed by the server's CoDel: a flood asks again
                    with count.get_lock():
                        count.value += 1

            ready.set()
            await asyncio.gather(*(one() for _ in range(FLOOD)))

    asyncio.run(main())


def _flood_pgbouncer(dsn: str, count: Synchronized[int], ready: Event, stop: Event) -> None:
    connections = [psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
                   for _ in range(FLOOD)]

    def one(conn: psycopg.Connection[Any]) -> None:
        while not stop.is_set():
            conn.execute(SQL).fetchall()
            with count.get_lock():
                count.value += 1

    threads = [threading.Thread(target=one, args=(conn,)) for conn in connections]
    ready.set()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for conn in connections:
        conn.close()


def _measure(step: Callable[[], object], flood: Callable[..., None], target: str,
             duration: float) -> dict[str, Any]:
    for _ in range(20):
        step()
    idle = []
    for _ in range(IDLE_QUERIES):
        started = time.perf_counter()
        step()
        idle.append(time.perf_counter() - started)
    spawn = multiprocessing.get_context("spawn")
    count, ready, stop = spawn.Value("q", 0), spawn.Event(), spawn.Event()
    process = spawn.Process(target=flood, args=(target, count, ready, stop), daemon=True)
    process.start()
    try:
        if not ready.wait(SATURATE_TIMEOUT):
            raise ServerError("the flood process did not start")
        deadline = time.monotonic() + SATURATE_TIMEOUT
        while count.value < FLOOD:  # every flood request has gone round once
            if time.monotonic() > deadline:
                raise ServerError("the flood never saturated the pool")
            time.sleep(0.01)
        latencies = []
        before = count.value
        began = time.monotonic()
        while time.monotonic() - began < duration:
            started = time.perf_counter()
            step()
            latencies.append(time.perf_counter() - started)
        flood_count = count.value - before
    finally:
        stop.set()
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    idle_median = statistics.median(idle)
    p99 = statistics.quantiles(latencies, n=100)[98]
    median = statistics.median(latencies)
    return {
        "idle_median_ms": round(idle_median * 1e3, 2),
        "median_ms": round(median * 1e3, 2), "p99_ms": round(p99 * 1e3, 2),
        "median_x_idle": round(median / idle_median, 1),
        "p99_x_idle": round(p99 / idle_median, 1),
        "polite_requests": len(latencies), "flood_requests": flood_count,
        "polite_share": round(len(latencies) / (len(latencies) + flood_count), 3),
    }


@contextlib.contextmanager
def _dbpool(dsn: str) -> Iterator[tuple[Callable[[], object], str]]:
    from dbpool.client import Client

    server = DbpoolServer(dsn, POOL_SIZE).start()
    try:
        with Client(server.endpoint, timeout=120) as client:
            yield (lambda: client.query(SQL)), server.endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def _pgbouncer(dsn: str, binary: str) -> Iterator[tuple[Callable[[], object], str]]:
    bouncer = PgBouncer(binary, Backend.resolve(dsn), POOL_SIZE).start()
    try:
        with psycopg.connect(bouncer.dsn, autocommit=True, prepare_threshold=None) as conn:
            yield (lambda: conn.execute(SQL).fetchall()), bouncer.dsn
    finally:
        bouncer.stop()


def run_fairness(dsn: str, duration: float = 3.0, as_json: bool = False) -> dict[str, Any]:
    """Measure both contenders, print the table (or JSON), return the report."""
    report: dict[str, Any] = {"workload": SQL, "pool_size": POOL_SIZE, "flood": FLOOD,
                              "duration": duration, "contenders": {}}
    with _dbpool(dsn) as (step, endpoint):
        report["contenders"]["dbpool"] = _measure(step, _flood_dbpool, endpoint, duration)
    binary = find_pgbouncer()
    if binary is None:
        report["contenders"]["pgbouncer"] = {"error": "not installed"}
    else:
        with _pgbouncer(dsn, binary) as (step, bouncer_dsn):
            report["contenders"]["pgbouncer"] = _measure(step, _flood_pgbouncer, bouncer_dsn,
                                                         duration)
    if as_json:
        print(json.dumps(report, indent=2))
        return report
    print(f"\none client keeps {FLOOD} x {SQL!r} outstanding on a pool of {POOL_SIZE}; "
          f"another sends one at a time for {duration:g}s\n")
    print(f"{'':>10} {'idle ms':>8} {'median ms':>10} {'p99 ms':>8} {'p99/idle':>9} "
          f"{'polite share':>13}")
    for name, row in report["contenders"].items():
        if "error" in row:
            print(f"{name:>10}  {row['error']}")
            continue
        print(f"{name:>10} {row['idle_median_ms']:>8.2f} {row['median_ms']:>10.2f} "
              f"{row['p99_ms']:>8.2f} {row['p99_x_idle']:>8.1f}x {row['polite_share']:>12.0%}")
    return report
