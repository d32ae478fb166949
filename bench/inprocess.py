"""``dbpool bench``: every contender, one run, one machine, the same workload.

Contenders for ``SELECT 1``:

- ``psycopg``: raw psycopg on one connection, shared by the threads;
- ``psycopg_pool``: ``psycopg_pool.ConnectionPool`` (autocommit, fixed size);
- ``dbpool``: :class:`dbpool.pool.Pool` in-process.

Each runs at 1, 4, 16 and 64 threads on pools of 1, 4, 4 and 10 connections.
A second table times a bare checkout+checkin cycle (no query) for the two
pools.  Ratios are dbpool's figure over each other contender's.

Targets (:data:`TARGETS`, issue 20's): at 64 threads on 10 connections
dbpool's q/s is at least 1.5 x psycopg_pool's; at 1 thread at least raw
psycopg's.  The report's ``ok`` is False if one is missed or was not
measured, and ``dbpool bench`` then exits with status 1.

``dbpool bench --stream-rows N`` instead streams N rows through
``pool.stream`` and reports the peak growth of the process's resident
memory (:func:`stream`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

__all__ = ["TARGETS", "Cell", "Contender", "judge", "print_scenarios", "run", "scenario_rows",
           "stream",
           "take_turns"]

#: (threads, pool size) pairs, as the issue specifies them.
SCENARIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 4), (16, 4), (64, 10))
SQL = "SELECT 1"
#: (name, description, threads, ratio, threshold): the ratio at that many threads
#: must be at least the threshold.
TARGETS: tuple[tuple[str, str, int, str, float], ...] = (
    ("threads_64", "64 threads on 10 connections: dbpool q/s >= 1.5 x psycopg_pool", 64,
     "dbpool/psycopg_pool", 1.5),
    ("threads_1", "1 thread: dbpool q/s >= 1.0 x raw psycopg", 1, "dbpool/psycopg", 1.0),
)


@dataclass
class Cell:
    contender: str
    threads: int
    pool_size: int
    queries: int
    seconds: float

    @property
    def qps(self) -> float:
        return self.queries / self.seconds


Worker = Callable[[threading.Event], int]


def _drive(threads: int, make_worker: Callable[[], Worker], duration: float) -> tuple[int, float]:
    """Run ``threads`` workers for ``duration`` seconds; return (queries, seconds)."""
    stop = threading.Event()
    start = threading.Barrier(threads + 1)
    counts: list[int] = []
    lock = threading.Lock()

    def body() -> None:
        worker = make_worker()
        start.wait()
        n = worker(stop)
        with lock:
            counts.append(n)

    pool = [threading.Thread(target=body, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts), time.perf_counter() - began


def _loop(step: Callable[[], object]) -> Worker:
    def worker(stop: threading.Event) -> int:
        n = 0
        is_set = stop.is_set
        while not is_set():
            step()
            n += 1
        return n

    return worker


def _loop_factory(step: Callable[[], object]) -> Callable[[], Worker]:
    return lambda: _loop(step)


@contextmanager
def _raw(dsn: str, size: int) -> Iterator[Callable[[], object]]:
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        yield lambda: conn.execute(SQL).fetchall()
    finally:
        conn.close()


@contextmanager
def _psycopg_pool(dsn: str, size: int) -> Iterator[Callable[[], object]]:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(dsn, min_size=size, max_size=size, kwargs={"autocommit": True},
                          open=True)
    pool.wait()

    def step() -> object:
        with pool.connection() as conn:
            return conn.execute(SQL).fetchall()

    try:
        yield step
    finally:
        pool.close()


@contextmanager
def _dbpool(dsn: str, size: int) -> Iterator[Callable[[], object]]:
    from dbpool.pool import Pool

    pool = Pool.start(dsn, pool_size=size, name="bench")
    _warm(pool, size)
    try:
        yield lambda: pool.query(SQL)
    finally:
        pool.stop()


def _warm(pool: Any, size: int) -> None:
    """Wait until every connection of a dbpool pool is open."""
    deadline = time.monotonic() + 30
    while pool.metrics()["ready_conn_count"] < size and time.monotonic() < deadline:
        time.sleep(0.01)


CONTENDERS = {"psycopg": _raw, "psycopg_pool": _psycopg_pool, "dbpool": _dbpool}


def _checkout_cycle(dsn: str, cycles: int, rounds: int = 5) -> dict[str, float]:
    """Microseconds per bare checkout+checkin, single thread, pool of 1.

    The two pools take turns, ``rounds`` times; each keeps its fastest round,
    the one least disturbed by the rest of the machine.
    """
    from psycopg_pool import ConnectionPool

    from dbpool.pool import Pool

    ppool = ConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True})
    dpool = Pool.start(dsn, pool_size=1, name="bench-checkout")
    try:
        ppool.wait()
        _warm(dpool, 1)
        checkouts: dict[str, Callable[[], Any]] = {
            "psycopg_pool": ppool.connection, "dbpool": dpool.checkout}
        best = dict.fromkeys(checkouts, float("inf"))
        for _ in range(rounds):
            for name, checkout in checkouts.items():
                best[name] = min(best[name], _time_cycles(checkout, cycles))
        return best
    finally:
        ppool.close()
        dpool.stop()


def _time_cycles(checkout: Callable[[], Any], cycles: int) -> float:
    began = time.perf_counter()
    for _ in range(cycles):
        with checkout():
            pass
    return (time.perf_counter() - began) / cycles * 1e6


def run(dsn: str, duration: float = 0.5, rounds: int = 10, as_json: bool = False,
        contenders: tuple[str, ...] = tuple(CONTENDERS)) -> dict[str, Any]:
    """Run the benchmark, print a table (or JSON) and return the results.

    For each scenario every contender is opened once, then they take turns
    (:func:`take_turns`): ``rounds`` rounds in which each runs for
    ``duration`` seconds, in an order that rotates from round to round.  A
    cell's q/s is the median over its rounds, and a ratio is the median of
    the per-round ratios: a virtual machine's speed can swing severalfold
    within seconds, and short turns paired within a round cancel most of that.
    """
    factories = {name: CONTENDERS[name] for name in contenders}
    cells = take_turns(dsn, SCENARIOS, factories, duration, rounds, quiet=as_json)
    cycle = _checkout_cycle(dsn, 20_000)
    report = _report(cells, cycle, rounds, duration)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_scenarios(report)
        _print_checkout_cycle(report)
        print("\ntargets:")
        for target in report["targets"]:
            value = target["value"]
            shown = "-" if value is None else f"{value:.2f}x"
            print(f"  {target['status']:<12} {target['target']}: {shown}")
    return report


#: Opens a contender on (dsn, pool size) and yields one worker step: one query.
Contender = Callable[[str, int], AbstractContextManager[Callable[[], object]]]


def take_turns(dsn: str, scenarios: Sequence[tuple[int, int]],
               contenders: Mapping[str, Contender], duration: float, rounds: int,
               quiet: bool = False) -> list[Cell]:
    """Measure every contender at every (threads, pool size) scenario; one cell per turn.

    For each scenario every contender is opened once (all at the same time),
    then they take ``rounds`` turns of ``duration`` seconds each, in an order
    that rotates from round to round, and are closed.  Unless ``quiet``, each
    contender's median q/s is printed to stderr as its scenario ends.
    """
    names = tuple(contenders)
    cells: list[Cell] = []
    for threads, size in scenarios:
        runs: dict[str, list[Cell]] = {name: [] for name in names}
        with ExitStack() as stack:
            steps = {name: stack.enter_context(contenders[name](dsn, size)) for name in names}
            for round_ in range(rounds):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    queries, seconds = _drive(threads, _loop_factory(steps[name]), duration)
                    runs[name].append(Cell(name, threads, size, queries, seconds))
        for name in names:
            cells.extend(runs[name])
            if not quiet:
                qps = statistics.median(c.qps for c in runs[name])
                print(f"  {name:>12} {threads:>3} threads: {qps:9.0f} q/s (median)",
                      file=sys.stderr, flush=True)
    return cells


def scenario_rows(cells: list[Cell], scenarios: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per scenario: each contender's median q/s, and dbpool's ratios.

    A ratio ``dbpool/X`` is the median of the per-round ratios of dbpool's
    q/s over X's (the turns of a round are paired).
    """
    rows = []
    for threads, size in scenarios:
        here: dict[str, list[float]] = {}
        for c in cells:
            if c.threads == threads and c.pool_size == size:
                here.setdefault(c.contender, []).append(c.qps)
        row: dict[str, Any] = {"threads": threads, "pool_size": size,
                               "qps": {k: round(statistics.median(v)) for k, v in here.items()}}
        if "dbpool" in here:
            ours = here["dbpool"]
            row["ratio"] = {
                f"dbpool/{k}": round(statistics.median(
                    a / b for a, b in zip(ours, v, strict=True)), 3)
                for k, v in here.items() if k != "dbpool"}
        rows.append(row)
    return rows


def judge(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of :data:`TARGETS`, judged on the scenario rows: PASS, FAIL, or NOT
    MEASURED (its scenario or contender did not run)."""
    by_threads = {row["threads"]: row for row in scenarios}
    judged = []
    for name, text, threads, ratio, threshold in TARGETS:
        value = by_threads.get(threads, {}).get("ratio", {}).get(ratio)
        status = ("NOT MEASURED" if value is None
                  else "PASS" if value >= threshold else "FAIL")
        judged.append({"name": name, "target": text, "threshold": threshold,
                       "value": value, "status": status})
    return judged


def _report(
    cells: list[Cell], cycle: dict[str, float], rounds: int, duration: float
) -> dict[str, Any]:
    scenarios = scenario_rows(cells, SCENARIOS)
    targets = judge(scenarios)
    return {
        "workload": SQL,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "duration": duration,
        "scenarios": scenarios,
        "targets": targets,
        "ok": all(t["status"] == "PASS" for t in targets),
        "checkout_checkin_us": {k: round(v, 2) for k, v in cycle.items()},
        "cells": [asdict(c) | {"qps": round(c.qps)} for c in cells],
    }


def print_scenarios(report: dict[str, Any], title: str | None = None) -> None:
    """Print a report's scenario rows as a table: q/s per contender, then dbpool's ratios.

    ``title`` names the workload (by default the report's ``workload``, quoted).
    """
    names = list(report["scenarios"][0]["qps"])
    title = f"{report['workload']!r}" if title is None else title
    print(f"\n{title}, queries per second ({report['cpus']} CPUs; median of "
          f"{report['rounds']} rounds of {report['duration']:g}s; ratios: median of "
          "per-round ratios)\n")
    header = f"{'threads':>7} {'pool':>4} " + " ".join(f"{n:>12}" for n in names)
    ratios = [k for k in report["scenarios"][0].get("ratio", {})]
    header += " " + " ".join(f"{r:>20}" for r in ratios)
    print(header)
    for row in report["scenarios"]:
        line = f"{row['threads']:>7} {row['pool_size']:>4} "
        line += " ".join(f"{row['qps'][n]:>12}" for n in names)
        line += " " + " ".join(f"{row['ratio'][r]:>19.2f}x" for r in ratios)
        print(line)


def _print_checkout_cycle(report: dict[str, Any]) -> None:
    print("\nbare checkout+checkin, µs per cycle (1 thread, pool of 1):")
    for name, us in report["checkout_checkin_us"].items():
        print(f"  {name:>12}: {us:6.2f}")


# -- streaming memory ----------------------------------------------------------

_NO_DEADLINE = float("inf")

#: The streamed rows: an int and a short text each.
STREAM_SQL = "SELECT g, 'row ' || g FROM generate_series(1, %s) AS g"


def stream(dsn: str, rows: int = 10_000_000, max_rows: int = 500,
           limit_mb: float = 100.0, as_json: bool = False) -> dict[str, Any]:
    """Stream ``rows`` rows through ``pool.stream`` and report the peak RSS growth.

    The growth is the process's peak resident memory during the stream
    minus its resident memory just before it, after the pool has started.
    On Linux the peak is reset first (``/proc/self/clear_refs``), so it is
    the stream's own; elsewhere it is the process's lifetime peak, an upper
    bound.  Every row is counted and its first column summed, to check that
    all of them arrived.  The report says whether the growth stayed under
    ``limit_mb``.
    """
    from dbpool.pool import Pool

    pool = Pool.start(dsn, pool_size=1, name="bench-stream")
    try:
        _warm(pool, 1)
        before = _rss_bytes()
        _reset_peak_rss()
        began = time.perf_counter()
        count = total = batches = 0
        # No deadline: the checkout lasts as long as the stream does.
        for batch in pool.stream(STREAM_SQL, (rows,), max_rows=max_rows, timeout=_NO_DEADLINE):
            batches += 1
            count += len(batch.rows)
            total += sum(row[0] for row in batch.rows)
        seconds = time.perf_counter() - began
        peak = _peak_rss_bytes()
    finally:
        pool.stop()
    if count != rows or total != rows * (rows + 1) // 2:
        raise RuntimeError(f"the stream returned {count} rows (sum {total}), not {rows}")
    growth_mb = max(peak - before, 0) / 2**20
    report = {
        "workload": STREAM_SQL % rows,
        "rows": count,
        "max_rows": max_rows,
        "batches": batches,
        "seconds": round(seconds, 2),
        "rows_per_second": round(count / seconds),
        "rss_before_mb": round(before / 2**20, 1),
        "peak_rss_growth_mb": round(growth_mb, 1),
        "limit_mb": limit_mb,
        "within_limit": growth_mb < limit_mb,
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"\n{report['workload']!r} through pool.stream(max_rows={max_rows}):\n"
              f"  {count:,} rows in {batches:,} batches, {seconds:.1f} s "
              f"({report['rows_per_second']:,} rows/s)\n"
              f"  peak RSS growth: {growth_mb:.1f} MB (RSS before: "
              f"{report['rss_before_mb']} MB; limit {limit_mb:g} MB: "
              f"{'within' if report['within_limit'] else 'EXCEEDED'})")
    return report


def _proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    kb = _proc_status_kb("VmRSS")
    return kb * 1024 if kb is not None else _peak_rss_bytes()


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource  # not on Windows; ru_maxrss is in kB on Linux, bytes on macOS

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
