"""SQLAlchemy on an in-process dbpool pool: :func:`create_engine`.

SQLAlchemy runs its own ``postgresql+psycopg`` dialect on connections that
a dbpool :class:`~dbpool.pool.Pool` lends (:class:`~dbpool.dbapi.lending.Lender`):
SQLAlchemy's own pooling is off (``NullPool``), so each SQLAlchemy checkout
is a dbpool checkout, under dbpool's queue (CoDel), circuit breaker and
metrics.  When SQLAlchemy closes a connection it goes back to dbpool, which
cleans what it gets: a transaction left open is rolled back, a broken
connection replaced.

It is psycopg_pool's recipe for SQLAlchemy (``creator`` and ``NullPool``)
with dbpool as the pool.

**Under the SQL sandbox** (an ownership pool, and
:mod:`dbpool.pool.ownership.pytest_plugin` or
:mod:`~dbpool.pool.ownership.sandbox`), the same engine joins the test's
transaction, with no change to the application: SQLAlchemy's transactions
on a sandboxed connection become savepoints in it (the lender's
``begin``/``commit``/``rollback``), so a ``Session.commit()`` is seen by the
test and by the threads it allows, a ``rollback()`` returns to where the
transaction began, ``begin_nested()`` nests a savepoint inside, and nothing
is committed.  The sandbox's transaction fixes the isolation level,
read-only and deferrable modes: the engine's settings of them are ignored
there, and ``isolation_level="AUTOCOMMIT"`` is refused, since its writes
could not be kept without a transaction to commit.  A thread's connections
are one in the sandbox, lent in turn: a thread that holds one (a session in a
transaction) and waits for another waits for itself, until its ``timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy
from sqlalchemy.pool import NullPool

from ..lending import Lender

if TYPE_CHECKING:
    from dbpool.pool import Pool

__all__ = ["create_engine"]

logger = logging.getLogger("dbpool.dbapi")


def create_engine(pool: Pool, *, timeout: float | None = None,
                  hold_timeout: float | None = None, **kwargs: Any) -> sqlalchemy.Engine:
    """An SQLAlchemy engine whose connections are ``pool``'s (see the module docstring).

    ``timeout`` bounds each checkout's wait for a connection (the pool's
    ``timeout`` by default); ``hold_timeout`` how long SQLAlchemy may then hold
    it (None: until it closes it, as with SQLAlchemy's own pools); ``kwargs`` go
    to ``sqlalchemy.create_engine``.
    """
    lender = Lender(pool, timeout, hold_timeout)
    engine = sqlalchemy.create_engine("postgresql+psycopg://", creator=lender.lend,
                                      poolclass=NullPool, **kwargs)
    dialect = engine.dialect
    # The dialect closes a DB-API connection through do_close: ours goes back instead.
    dialect.do_close = lender.give_back  # type: ignore[method-assign, assignment]
    _join_sandboxes(dialect, lender)
    return engine


def _join_sandboxes(dialect: Any, lender: Lender) -> None:
    """Give ``dialect``'s transaction calls on a sandboxed connection to ``lender``.

    The engine's dialect is the one instance its pool and connections call
    (as for ``do_close`` above), so setting these on it covers them all.
    Other connections keep the dialect's own calls.
    """
    hooks: dict[str, Callable[..., None]] = {
        "do_begin": lambda raw: lender.begin(raw),
        "do_commit": lambda raw: lender.commit(raw),
        "do_rollback": lambda raw: lender.rollback(raw),
        "set_isolation_level": _keep_isolation_level,
        "set_readonly": _keep_characteristic("read-only"),
        "set_deferrable": _keep_characteristic("deferrable"),
    }
    for name, in_sandbox in hooks.items():
        setattr(dialect, name, _when_sandboxed(lender, getattr(dialect, name), in_sandbox))


def _when_sandboxed(lender: Lender, plain: Callable[..., None],
                    in_sandbox: Callable[..., None]) -> Callable[..., None]:
    def call(dbapi_connection: Any, *args: Any) -> None:
        # SQLAlchemy hands the dialect either the DB-API connection or its
        # pool's proxy of it (which has no identity of ours): unwrap the proxy.
        raw = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
        if lender.sandboxed(raw):
            in_sandbox(raw, *args)
        else:
            plain(dbapi_connection, *args)

    return call


def _keep_isolation_level(raw: Any, level: str) -> None:
    if level == "AUTOCOMMIT":
        raise psycopg.NotSupportedError(
            "isolation_level='AUTOCOMMIT' does not work in dbpool's SQL sandbox: the "
            "sandbox's transaction is never committed, so there is no committing "
            "each statement; leave the isolation level to the engine's default there")
    logger.debug("SQL sandbox: isolation level %s ignored: the sandbox's transaction has "
                 "begun with its own", level)


def _keep_characteristic(name: str) -> Callable[[Any, bool], None]:
    def keep(raw: Any, value: bool) -> None:
        logger.debug("SQL sandbox: %s=%s ignored: the sandbox's transaction has begun "
                     "with its own", name, value)

    return keep
