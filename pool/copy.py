"""COPY through a lent connection: data out and in as blocks of bytes.

``conn.copy_to("COPY t TO STDOUT")`` returns a :class:`CopyTo`, an iterable
of ``bytes`` blocks as PostgreSQL sends them (one row each, in text format);
``conn.copy_from("COPY t FROM STDIN", data)`` sends ``data`` (bytes or str,
or an iterable of them, or a file object: see :mod:`dbpool.copy_data`) and
returns the COPY's
:class:`~dbpool.driver.Result`, whose ``rowcount`` is the number of rows.

Memory stays bounded whatever the size of the data: one block is in memory
at a time, in either direction.  A COPY runs in the connection's current
transaction, or as its own statement outside one.

- A ``CopyTo`` left before the end of its data (``break``, an exception,
  ``close()``) cancels the COPY on the server and reads out what was already
  on its way; inside a transaction, the cancel fails the transaction, as
  with psycopg.
- A ``copy_from`` whose data raises aborts the COPY (no row is taken) and
  the error goes on to the caller.
- A statement that is not a COPY raises
  :class:`~dbpool.errors.StatementNotAllowed` before it is sent; a COPY the
  other way round is stopped and raises it too.  ``query()`` refuses COPY
  the same way: it needs these calls.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dbpool.copy_data import CopyData, blocks
from dbpool.driver import CopyDirection, Params, Query, Result
from dbpool.errors import StatementNotAllowed
from dbpool.statement_scope import scope_of

from .logentry import LogFn

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["CopyData", "CopyTo", "copy_from", "not_a_copy"]

logger = logging.getLogger("dbpool.pool")


def not_a_copy(sql: str, call: str) -> StatementNotAllowed:
    """The error for a statement given to a copy call that is not a COPY."""
    return StatementNotAllowed(
        f"{call}() takes a COPY statement; for anything else use query()", scope="copy")


def _query(sql: str | Query, call: str) -> Query:
    query = sql if isinstance(sql, Query) else Query(sql)
    if scope_of(query.sql) != "copy":
        raise not_a_copy(query.sql, call)
    return query


class CopyTo:
    """The data of a ``COPY ... TO STDOUT``, block by block (see the module docstring).

    Also a context manager that ends the COPY on leaving.  :attr:`result`
    holds the COPY's result once the data has been read to its end.
    """

    def __init__(self, conn: Connection, sql: str | Query, params: Params,
                 log: LogFn | None = None) -> None:
        self._conn = conn
        self._query = _query(sql, "copy_to")
        self._params = params
        self._log = log
        self._blocks: Generator[bytes, None, None] | None = None
        self._box: list[Result] = []

    @property
    def result(self) -> Result | None:
        """The COPY's result (``rowcount``: rows sent), once it has ended."""
        return self._box[0] if self._box else None

    def __iter__(self) -> Iterator[bytes]:
        if self._blocks is None:
            self._blocks = _blocks(self._conn, self._query, self._params, self._log, self._box)
        return self._blocks

    def read(self) -> bytes:
        """All the data at once (bounded memory is what iterating gives)."""
        return b"".join(self)

    def close(self) -> None:
        """End the COPY now; data not yet read is discarded (see the module docstring)."""
        if self._blocks is not None:
            self._blocks.close()

    def __enter__(self) -> CopyTo:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# A module function, not a method: a generator whose frame held the CopyTo
# would make a reference cycle with it (see stream.py).
def _blocks(
    conn: Connection, query: Query, params: Params, log: LogFn | None, box: list[Result]
) -> Generator[bytes, None, None]:
    driver = conn._driver
    copy = _start(conn, query, params, "out", log)
    error: BaseException | None = None
    try:
        while True:
            block = conn._call("copy_read", query, None, log,
                               lambda opts, state: driver.handle_copy_read(copy, opts, state))
            if block is None:
                break
            yield block
    except GeneratorExit:
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        result = _end(conn, query, copy, error, log)
        if result is not None:
            box.append(result)


def copy_from(conn: Connection, sql: str | Query, data: CopyData, params: Params = None,
              log: LogFn | None = None) -> Result:
    """Run a ``COPY ... FROM STDIN`` with ``data`` (see the module docstring)."""
    query = _query(sql, "copy_from")
    driver = conn._driver
    copy = _start(conn, query, params, "in", log)
    try:
        for block in blocks(data):
            conn._call("copy_write", query, None, log,
                       functools.partial(_write, driver, copy, block))
    except BaseException as error:
        _end(conn, query, copy, error, log)
        raise
    result = _end(conn, query, copy, None, log, raise_errors=True)
    assert result is not None
    return result


def _write(driver: Any, copy: Any, data: bytes, opts: Any, state: Any) -> Any:
    return driver.handle_copy_write(copy, data, opts, state)


def _start(conn: Connection, query: Query, params: Params, direction: CopyDirection,
           log: LogFn | None) -> Any:
    driver = conn._driver
    return conn._call("copy", query, params, log, lambda opts, state: driver.handle_copy(
        query, params, direction, opts, state))


def _end(conn: Connection, query: Query, copy: Any, error: BaseException | None,
         log: LogFn | None, raise_errors: bool = False) -> Result | None:
    """End the COPY (aborting it if ``error``): its result.  Errors while ending one
    that failed already are logged, not raised, so that the first one goes on."""
    driver = conn._driver
    try:
        result: Result = conn._call(
            "copy_end", query, None, log,
            lambda opts, state: driver.handle_copy_end(copy, error, opts, state),
            while_failed=True)
    except Exception:
        if raise_errors or error is None:
            raise
        logger.debug("ending a failed COPY failed too", exc_info=True)
        return None
    return result

