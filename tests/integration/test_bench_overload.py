"""The overload row runs end to end: twice the pool's capacity, through both poolers.

Real PostgreSQL, a real ``dbpool serve`` and a real PgBouncer, for 8 s each:
CoDel sheds nothing during its first two queue intervals (4 s by default),
so a shorter run would have no steady state to judge.  What is checked is
what holds on any machine, however loaded: the load offered really is twice
what the pool serves, every request is accounted for, and PgBouncer's
first-come-first-served queue makes the requests it serves wait nearly
their whole deadline.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dbpool.bench.overload import (
    CAPACITY,
    LOAD,
    REQUEST_TIMEOUT,
    overload_target,
    print_overload,
    run_overload,
)
from dbpool.bench.servers import Backend, find_pgbouncer

SECONDS = 8.0
CONTENDERS = ("dbpool", "pgbouncer")


@pytest.fixture(scope="module")
def report(pg_dsn: str) -> dict[str, Any]:
    bouncer = find_pgbouncer()
    if bouncer is None:
        pytest.skip("pgbouncer is not installed (CI installs it)")
    unavailable: dict[str, str] = {}
    # What psycopg_pool logs through the run (as a user's logging would show it).
    pool_records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = pool_records.append  # type: ignore[assignment]
    handler.addFilter(lambda record: record.name.startswith("psycopg.pool"))
    logging.getLogger().addHandler(handler)
    try:
        measured = run_overload(pg_dsn, Backend.resolve(pg_dsn), bouncer, seconds=SECONDS,
                                unavailable=unavailable)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not unavailable, unavailable
    return {**measured, "pool_records": pool_records}


def test_twice_the_capacity_is_offered_and_every_request_is_accounted_for(
    report: dict[str, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    assert report["capacity_per_second"] == round(CAPACITY)
    for name in CONTENDERS:
        row = report["contenders"][name]
        assert row["served"] > 0, (name, row)
        # The open loop keeps its schedule whatever the answers: about LOAD x capacity.
        assert 0.8 * LOAD <= row["offered_per_second"] / CAPACITY <= 1.1 * LOAD, (name, row)
        assert row["skipped"] == 0, (name, row)
        assert row["served"] + row["failed_fast"] + row["timed_out"] == row["sent"], (name, row)
        assert row["failed_share"] == pytest.approx(1 - row["served"] / row["sent"], abs=1e-3)
        # More was asked than the pool of 2 can serve: a good part failed.
        assert row["served"] < 0.75 * row["sent"], (name, row)
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], (name, row)
    print_overload(report)
    printed = capsys.readouterr().out
    assert "dbpool's served p99 after" in printed
    for name in CONTENDERS:
        assert f"  {name:>9} " in printed


def test_pgbouncers_queue_grows_until_requests_wait_out_their_deadline(
    report: dict[str, Any],
) -> None:
    row = report["contenders"]["pgbouncer"]
    # First come, first served: once the queue holds a deadline's worth, what is
    # served has waited nearly that long, and the rest fails only at its deadline.
    assert row["steady_p99_ms"] > 0.5 * REQUEST_TIMEOUT * 1000, row
    assert row["timed_out"] > 0, row
    assert row["error_median_ms"] >= 0.99 * REQUEST_TIMEOUT * 1000, row


def test_the_connections_hung_up_at_deadlines_are_not_logged_one_by_one(
    report: dict[str, Any],
) -> None:
    # Each request that timed out went back to psycopg_pool closed; it warns of each
    # unless the benchmark quiets it, which buried the report under thousands of lines.
    assert report["contenders"]["pgbouncer"]["timed_out"] > 0
    warned = [r.getMessage() for r in report["pool_records"] if r.levelno >= logging.WARNING]
    assert warned == [], warned[:3]
    assert logging.getLogger("psycopg.pool").level == logging.NOTSET  # as it was before


def test_dbpool_sheds_its_queue_and_serves_at_the_pools_capacity(
    report: dict[str, Any],
) -> None:
    row = report["contenders"]["dbpool"]
    # The front end's queue sheds with CoDel: what it drops fails fast (queue_timeout),
    # and the pool's time goes to requests whose callers still wait for them.
    assert row["fast_errors"].get("ConnectionError(queue_timeout)", 0) > 0.2 * row["sent"], row
    assert row["failed_fast"] > row["timed_out"], row
    assert row["served_per_second"] > 0.7 * CAPACITY, row
    # The served p99 is judged by the benchmark (bench --remote), not here: it meets
    # its bound in some runs only (docs/performance.md).
    value, threshold = overload_target(report)
    assert value is not None and value <= row["max_ms"], (value, row)
    assert threshold == 160.0
