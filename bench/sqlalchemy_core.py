"""``dbpool bench --sqlalchemy``: SQLAlchemy Core on three pools, side by side in one run.

Every worker thread loops::

    with engine.connect() as c:
        c.execute(text("SELECT 1")).scalar()

on one of three engines, each SQLAlchemy's own ``postgresql+psycopg``
dialect on psycopg connections in its default, transactional mode:

- ``dbpool``: :func:`dbpool.dbapi.sqlalchemy.create_engine` on a
  :class:`dbpool.pool.Pool` (``NullPool`` and a ``creator`` that checks a
  connection out of the pool; closing gives it back);
- ``QueuePool``: ``sqlalchemy.create_engine("postgresql+psycopg://...")``
  with SQLAlchemy's default ``QueuePool``, ``pool_size`` the others' size and
  ``max_overflow=0``, so that it holds as many connections;
- ``psycopg_pool``: psycopg_pool's recipe for SQLAlchemy, as its
  documentation gives it ("Integration with SQLAlchemy"): a
  ``psycopg_pool.ConnectionPool(close_returns=True)``, and an engine with
  ``creator=pool.getconn`` and ``poolclass=NullPool``; SQLAlchemy's
  ``close()`` of a connection then returns it to the pool (``putconn``).

Each runs at 1 thread on pools of 1 connection and at 16 threads on pools of
4, as the in-process benchmark's rows of those thread counts do; the
contenders take turns as there (:func:`dbpool.bench.inprocess.take_turns`),
and the ratios are dbpool's q/s over each other contender's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from .inprocess import Contender, _warm, print_scenarios, scenario_rows, take_turns

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = ["CONTENDERS", "SCENARIOS", "WORKLOAD", "engine_url", "psycopg_pool_engine",
           "queue_pool_engine", "run_sqlalchemy"]

logger = logging.getLogger("dbpool.bench.sqlalchemy_core")

#: (threads, pool size) pairs: 1 and 16 threads, on the in-process benchmark's pool sizes.
SCENARIOS: tuple[tuple[int, int], ...] = ((1, 1), (16, 4))
SQL = "SELECT 1"
WORKLOAD = 'with engine.connect() as c: c.execute(text("SELECT 1")).scalar()'

Step = Callable[[], object]


def _step(engine: sqlalchemy.Engine) -> Step:
    """One turn of the workload on ``engine``, checked once before it is timed."""

    def step() -> object:
        with engine.connect() as c:
            return c.execute(text(SQL)).scalar()

    # The first connection runs the dialect's initialize(): keep it out of the turns.
    if (value := step()) != 1:
        raise RuntimeError(f"SELECT 1 returned {value!r} through {engine.pool!r}")
    return step


def engine_url(dsn: str) -> sqlalchemy.URL:
    """The ``postgresql+psycopg`` URL for a libpq conninfo string or URI.

    Every libpq parameter goes in the URL's query, which the dialect passes to
    ``psycopg.connect`` as keywords: the same connection the DSN describes.
    """
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    return sqlalchemy.URL.create("postgresql+psycopg", query=params)


@contextmanager
def _dbpool(dsn: str, size: int) -> Iterator[Step]:
    """An engine from :func:`dbpool.dbapi.sqlalchemy.create_engine` on a dbpool pool."""
    from dbpool.dbapi.sqlalchemy import create_engine
    from dbpool.pool import Pool

    pool = Pool.start(dsn, pool_size=size, name="bench-sqlalchemy")
    try:
        _warm(pool, size)
        engine = create_engine(pool)
        try:
            yield _step(engine)
        finally:
            engine.dispose()
    finally:
        pool.stop()


def queue_pool_engine(dsn: str, size: int) -> sqlalchemy.Engine:
    """An engine with SQLAlchemy's default pool, a ``QueuePool`` of ``size``, no overflow."""
    engine = sqlalchemy.create_engine(engine_url(dsn), pool_size=size, max_overflow=0)
    if not isinstance(engine.pool, sqlalchemy.QueuePool):  # pragma: no cover - a default changed
        raise RuntimeError(f"SQLAlchemy's default pool is {engine.pool!r}, not a QueuePool")
    return engine


def psycopg_pool_engine(pgpool: ConnectionPool[Any]) -> sqlalchemy.Engine:
    """psycopg_pool's recipe for SQLAlchemy: an engine taking its connections from ``pgpool``.

    ``creator=pgpool.getconn`` and ``poolclass=NullPool``, as psycopg_pool's
    documentation gives it; ``pgpool`` must be made with ``close_returns=True``,
    so that the ``close()`` with which NullPool ends each checkout (after
    SQLAlchemy's reset-on-return rollback) returns the connection to it
    (``putconn``) instead of closing it.
    """
    if not pgpool.close_returns:
        raise ValueError("psycopg_pool's recipe needs a pool made with close_returns=True")
    return sqlalchemy.create_engine("postgresql+psycopg://", creator=pgpool.getconn,
                                    poolclass=NullPool)


@contextmanager
def _queue_pool(dsn: str, size: int) -> Iterator[Step]:
    """:func:`queue_pool_engine`, every connection opened before the turns."""
    engine = queue_pool_engine(dsn, size)
    try:
        opened = [engine.connect() for _ in range(size)]
        for c in opened:
            c.close()
        yield _step(engine)
    finally:
        engine.dispose()


@contextmanager
def _psycopg_pool(dsn: str, size: int) -> Iterator[Step]:
    """:func:`psycopg_pool_engine` on a fixed-size pool, every connection open before the turns."""
    from psycopg_pool import ConnectionPool

    pgpool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        dsn, min_size=size, max_size=size, close_returns=True, open=True)
    try:
        pgpool.wait()
        engine = psycopg_pool_engine(pgpool)
        try:
            yield _step(engine)
        finally:
            engine.dispose()
    finally:
        pgpool.close()


#: The contenders, in the order of the table's columns.
CONTENDERS: dict[str, Contender] = {
    "dbpool": _dbpool, "QueuePool": _queue_pool, "psycopg_pool": _psycopg_pool}

_DESCRIPTIONS = {
    "dbpool": "dbpool.dbapi.sqlalchemy.create_engine(Pool.start(dsn, pool_size=N))",
    "QueuePool": "sqlalchemy.create_engine('postgresql+psycopg://...', pool_size=N, "
                 "max_overflow=0)",
    "psycopg_pool": "sqlalchemy.create_engine('postgresql+psycopg://', "
                    "creator=ConnectionPool(dsn, min_size=N, max_size=N, "
                    "close_returns=True).getconn, poolclass=NullPool)",
}


def run_sqlalchemy(dsn: str, duration: float = 0.5, rounds: int = 10,
                   as_json: bool = False) -> dict[str, Any]:
    """Run the SQLAlchemy benchmark, print a table (or JSON) and return the report.

    Each (threads, pool size) of :data:`SCENARIOS` opens the three engines,
    then they take ``rounds`` turns of ``duration`` seconds each, in an order
    that rotates from round to round.  A cell's q/s is the median of its
    rounds; a ratio ``dbpool/X`` is the median of the per-round ratios.
    """
    from psycopg_pool import __version__ as psycopg_pool_version

    logger.debug("SQLAlchemy benchmark: %s rounds of %gs per contender and scenario",
                 rounds, duration)
    cells = take_turns(dsn, SCENARIOS, CONTENDERS, duration, rounds, quiet=as_json)
    report: dict[str, Any] = {
        "workload": WORKLOAD,
        "contenders": _DESCRIPTIONS,
        "versions": {"sqlalchemy": sqlalchemy.__version__, "psycopg": psycopg.__version__,
                     "psycopg_pool": psycopg_pool_version},
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "duration": duration,
        "scenarios": scenario_rows(cells, SCENARIOS),
        "cells": [asdict(c) | {"qps": round(c.qps)} for c in cells],
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_scenarios(report, title=f"SQLAlchemy Core, {WORKLOAD}")
        versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        print(f"\n({versions})")
    return report
