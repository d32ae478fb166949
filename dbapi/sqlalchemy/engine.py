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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy.pool import NullPool

from ..lending import Lender

if TYPE_CHECKING:
    from dbpool.pool import Pool

__all__ = ["create_engine"]


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
    # The dialect closes a DB-API connection through do_close: ours goes back instead.
    engine.dialect.do_close = lender.give_back  # type: ignore[method-assign, assignment]
    return engine
