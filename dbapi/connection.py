"""A PEP 249 connection: one connection of a dbpool pool, held until :meth:`close`."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import psycopg

from dbpool.driver import Params, Result

from .cursor import Cursor

if TYPE_CHECKING:
    from dbpool.pool import Checkout, Pool
    from dbpool.pool import Connection as PoolConnection

__all__ = ["Connection", "connect"]


class Connection:
    """A DB-API connection on a connection lent by an in-process pool.

    The exceptions are also attributes, as PEP 249's optional extension
    asks (``conn.Error``...).
    """

    Warning = psycopg.Warning
    Error = psycopg.Error
    InterfaceError = psycopg.InterfaceError
    DatabaseError = psycopg.DatabaseError
    DataError = psycopg.DataError
    OperationalError = psycopg.OperationalError
    IntegrityError = psycopg.IntegrityError
    InternalError = psycopg.InternalError
    ProgrammingError = psycopg.ProgrammingError
    NotSupportedError = psycopg.NotSupportedError

    def __init__(self, checkout: Checkout, autocommit: bool) -> None:
        self._checkout: Checkout | None = checkout
        self._conn: PoolConnection | None = checkout.__enter__()
        #: Whether each statement commits by itself (no transaction is begun).
        self.autocommit = autocommit
        self._in_transaction = False

    # -- PEP 249 ---------------------------------------------------------------

    def cursor(self) -> Cursor:
        self._live()
        return Cursor(self)

    def commit(self) -> None:
        conn = self._live()
        if self._in_transaction:
            self._in_transaction = False
            conn.query("COMMIT")

    def rollback(self) -> None:
        conn = self._live()
        if self._in_transaction:
            self._in_transaction = False
            conn.query("ROLLBACK")

    def close(self) -> None:
        """Roll back a transaction left open and give the connection back to its pool.

        Closing twice raises :class:`InterfaceError`, as the DB-API test suite
        expects.
        """
        checkout = self._checkout
        if checkout is None:
            raise psycopg.InterfaceError("the connection is already closed")
        try:
            if self._in_transaction:
                self._in_transaction = False
                self._live().query("ROLLBACK")
        finally:
            self._conn = self._checkout = None
            checkout.__exit__(None, None, None)  # a rollback that failed: the pool cleans

    @property
    def closed(self) -> bool:
        return self._checkout is None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        self.close()

    # -- for the cursors --------------------------------------------------------

    def _live(self) -> PoolConnection:
        conn = self._conn
        if conn is None:
            raise psycopg.InterfaceError("the connection is closed")
        return conn

    def _run(self, sql: str, params: Params) -> Result:
        """Run one statement, beginning the transaction first unless autocommit."""
        conn = self._live()
        if not self.autocommit and not self._in_transaction:
            conn.query("BEGIN")
            self._in_transaction = True
        return conn.query(sql, params)


def connect(*, pool: Pool, autocommit: bool = False,
            timeout: float | None = None) -> Connection:
    """Borrow a connection of ``pool`` until :meth:`Connection.close` (``timeout`` is the
    checkout's: the wait for a connection and its use, as for ``pool.checkout``)."""
    return Connection(pool.checkout(timeout=timeout), autocommit)
