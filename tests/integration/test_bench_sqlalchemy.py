"""``dbpool bench --sqlalchemy``: the SQLAlchemy rows of the benchmark run end to end.

A very short run (one round of tiny turns) through the command: the numbers of
so short a run mean nothing; what is checked is that every contender was
measured at both thread counts and that the report has its fields.  The
psycopg_pool contender is checked to be psycopg_pool's recipe: the engine's
connections go back to the pool rather than being closed.
"""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg_pool")

from psycopg_pool import ConnectionPool
from sqlalchemy import text

from dbpool.bench.sqlalchemy_core import (
    CONTENDERS,
    SCENARIOS,
    engine_url,
    psycopg_pool_engine,
    queue_pool_engine,
)
from dbpool.cli import main

CONTENDER_NAMES = ("dbpool", "QueuePool", "psycopg_pool")
SHORT = ["--duration", "0.05", "--rounds", "1"]


def test_the_json_report_has_every_contender_at_1_and_16_threads(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--sqlalchemy", "--dsn", pg_dsn, *SHORT, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert tuple(CONTENDERS) == CONTENDER_NAMES
    assert set(report) >= {"workload", "contenders", "versions", "cpus", "rounds", "duration",
                           "scenarios", "cells"}
    assert "engine.connect()" in report["workload"] and "SELECT 1" in report["workload"]
    assert set(report["contenders"]) == set(CONTENDER_NAMES)
    assert set(report["versions"]) == {"sqlalchemy", "psycopg", "psycopg_pool"}
    assert report["rounds"] == 1 and report["duration"] == 0.05
    assert [(s["threads"], s["pool_size"]) for s in report["scenarios"]] == [(1, 1), (16, 4)]
    for scenario in report["scenarios"]:
        assert set(scenario["qps"]) == set(CONTENDER_NAMES)
        assert all(qps > 0 for qps in scenario["qps"].values()), scenario
        assert set(scenario["ratio"]) == {"dbpool/QueuePool", "dbpool/psycopg_pool"}
        assert all(ratio > 0 for ratio in scenario["ratio"].values()), scenario
    cells = report["cells"]
    assert len(cells) == len(SCENARIOS) * len(CONTENDER_NAMES)  # one round
    assert {(c["contender"], c["threads"]) for c in cells} == {
        (name, threads) for name in CONTENDER_NAMES for threads in (1, 16)}
    for cell in cells:
        assert set(cell) == {"contender", "threads", "pool_size", "queries", "seconds", "qps"}
        assert cell["queries"] > 0 and cell["seconds"] > 0


def test_the_table_shows_the_three_columns_and_both_ratios(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--sqlalchemy", "--dsn", pg_dsn, *SHORT]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("threads"))
    assert header.split() == ["threads", "pool", *CONTENDER_NAMES, "dbpool/QueuePool",
                              "dbpool/psycopg_pool"]
    rows = [line.split() for line in out.splitlines()
            if line.split()[:2] in (["1", "1"], ["16", "4"])]
    assert [row[:2] for row in rows] == [["1", "1"], ["16", "4"]]
    assert all(len(row) == 7 and row[-1].endswith("x") for row in rows), rows
    assert "sqlalchemy" in out and "psycopg_pool" in out


def test_the_psycopg_pool_recipe_returns_connections_to_the_pool(pg_dsn: str) -> None:
    with ConnectionPool(pg_dsn, min_size=2, max_size=2, close_returns=True, open=True) as pgpool:
        pgpool.wait()
        engine = psycopg_pool_engine(pgpool)
        pids: set[int] = set()
        lock = threading.Lock()

        def work() -> None:
            for _ in range(20):
                with engine.connect() as c:
                    pid = c.execute(text("SELECT pg_backend_pid()")).scalar_one()
                with lock:
                    pids.add(pid)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = pgpool.get_stats()
        engine.dispose()
    # 80 checkouts, the same two connections: returned by close(), never closed.
    assert len(pids) <= 2
    assert stats["connections_num"] == 2
    assert stats["requests_num"] >= 80
    assert stats.get("returns_bad", 0) == 0


def test_the_recipe_refuses_a_pool_whose_close_would_close() -> None:
    pgpool = ConnectionPool("", min_size=1, open=False)
    with pytest.raises(ValueError, match="close_returns"):
        psycopg_pool_engine(pgpool)


def test_the_queue_pool_engine_holds_as_many_connections_as_the_others(pg_dsn: str) -> None:
    engine = queue_pool_engine(pg_dsn, 3)
    try:
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 0  # type: ignore[attr-defined]
        with engine.connect() as c:
            assert c.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_the_url_carries_every_libpq_parameter_of_the_dsn() -> None:
    for dsn in ("host=127.0.0.1 port=5432 user=postgres dbname=postgres application_name=b",
                "postgresql://postgres@127.0.0.1:5432/postgres?application_name=b"):
        url = engine_url(dsn)
        assert url.drivername == "postgresql+psycopg"
        assert dict(url.query) == {"host": "127.0.0.1", "port": "5432", "user": "postgres",
                                   "dbname": "postgres", "application_name": "b"}
