"""Lending a pool's psycopg connections to a framework that drives them itself.

SQLAlchemy's ``postgresql+psycopg`` dialect and Django's PostgreSQL backend
each want a psycopg connection of their own, not dbpool's
:class:`~dbpool.pool.Connection`.  A :class:`Lender` checks one out of a
dbpool :class:`~dbpool.pool.Pool` and lends the psycopg connection under it,
in psycopg's transactional mode (``autocommit`` off) as a DB-API connection
starts; :meth:`Lender.give_back` takes it back, rolls back what is open,
restores dbpool's own mode (autocommit, with explicit ``BEGIN``) and checks it
in.  The pool cleans what it gets back (a broken connection is replaced).

So each framework checkout is a dbpool checkout: it waits in dbpool's queue
(CoDel), under its circuit breaker, and counts in its metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from dbpool.pool import Checkout, Pool

__all__ = ["Lender"]


class Lender:
    """Lends ``pool``'s psycopg connections, and takes them back.

    ``timeout`` bounds the wait for a connection (the pool's ``timeout`` by
    default).  ``hold_timeout`` bounds how long one may then be held: None (the
    default) holds it until :meth:`give_back`, as psycopg_pool and
    SQLAlchemy's own pools do, since a framework holds a connection for as
    long as its session or request lasts.  A connection whose thread ends while
    it is lent is reclaimed all the same.  Thread-safe.
    """

    def __init__(self, pool: Pool, timeout: float | None = None,
                 hold_timeout: float | None = None) -> None:
        self.pool = pool
        self.timeout = timeout
        self.hold_timeout = hold_timeout
        self._lent: dict[int, tuple[Checkout, psycopg.Connection[Any]]] = {}

    def lend(self) -> psycopg.Connection[Any]:
        """Check a connection out and lend its psycopg connection (autocommit off)."""
        checkout: Checkout = self.pool.checkout(timeout=self.timeout)
        conn = checkout.__enter__()
        try:
            conn.set_deadline(self.hold_timeout)
            raw: psycopg.Connection[Any] = conn.driver_state.conn
            raw.autocommit = False
        except BaseException:
            checkout.__exit__(None, None, None)
            raise
        self._lent[id(raw)] = (checkout, raw)
        return raw

    def give_back(self, raw: Any) -> None:
        """Roll back what is open and give the connection back to the pool.

        A connection this lender did not lend is closed.
        """
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
