"""SQLAlchemy on a dbpool pool: ``create_engine(pool)``.

::

    from dbpool.dbapi.sqlalchemy import create_engine

    engine = create_engine(pool)          # SQLAlchemy's own postgresql+psycopg dialect
    with engine.begin() as conn:
        conn.execute(text("SELECT 1"))

SQLAlchemy runs its ``postgresql+psycopg`` dialect on connections that the
dbpool :class:`~dbpool.pool.Pool` lends: its own pooling is off
(``NullPool``), so each SQLAlchemy checkout is a dbpool checkout, under
dbpool's queue (CoDel), deadlines, circuit breaker and metrics.  When
SQLAlchemy closes a connection it goes back to dbpool, which cleans what it
gets: a transaction left open is rolled back, a broken connection replaced.

It is psycopg_pool's recipe for SQLAlchemy (``creator`` and ``NullPool``)
with dbpool as the pool.  It needs the ``sqlalchemy`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

try:
    import sqlalchemy
    from sqlalchemy.pool import NullPool
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("dbpool's SQLAlchemy engine needs SQLAlchemy: "
                      "pip install 'dbpool[sqlalchemy]'") from exc

if TYPE_CHECKING:
    from dbpool.pool import Checkout, Pool

__all__ = ["Lender", "create_engine"]


class Lender:
    """Lends the pool's psycopg connections to SQLAlchemy, and takes them back.

    SQLAlchemy gets the psycopg connection itself (its dialect checks that it
    is one), in psycopg's transactional mode (``autocommit`` off) as it
    expects of a DB-API connection; its ``close`` goes to :meth:`give_back`
    instead, through the dialect's ``do_close``.
    """

    def __init__(self, pool: Pool, timeout: float | None) -> None:
        self.pool = pool
        self.timeout = timeout
        self._lent: dict[int, tuple[Checkout, psycopg.Connection[Any]]] = {}

    def lend(self) -> psycopg.Connection[Any]:
        checkout: Checkout = self.pool.checkout(timeout=self.timeout)
        conn = checkout.__enter__()
        raw: psycopg.Connection[Any] = conn.driver_state.conn
        try:
            raw.autocommit = False
        except BaseException:
            checkout.__exit__(None, None, None)
            raise
        self._lent[id(raw)] = (checkout, raw)
        return raw

    def give_back(self, raw: Any) -> None:
        """Roll back what is open and give the connection back to the pool."""
        lent = self._lent.pop(id(raw), None)
        if lent is None or lent[1] is not raw:  # not one of ours
            raw.close()
            return
        checkout = lent[0]
        try:
            if not raw.closed:
                raw.rollback()
                raw.autocommit = True  # dbpool's own mode, with explicit BEGIN
        except Exception:  # broken: the pool's checkin finds it so and replaces it
            pass
        finally:
            checkout.__exit__(None, None, None)


def create_engine(pool: Pool, *, timeout: float | None = None,
                  **kwargs: Any) -> sqlalchemy.Engine:
    """An SQLAlchemy engine whose connections are ``pool``'s (see the module docstring).

    ``timeout`` is each checkout's (the pool's ``timeout`` by default: the wait
    for a connection and its use); ``kwargs`` go to ``sqlalchemy.create_engine``.
    """
    lender = Lender(pool, timeout)
    engine = sqlalchemy.create_engine("postgresql+psycopg://", creator=lender.lend,
                                      poolclass=NullPool, **kwargs)
    # The dialect closes a DB-API connection through do_close: ours goes back instead.
    engine.dialect.do_close = lender.give_back  # type: ignore[method-assign, assignment]
    return engine
