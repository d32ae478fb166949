"""Streams: a result read in batches through a server-side cursor.

``conn.stream(sql, params, max_rows=500)`` returns a :class:`Stream`.  It
must run inside a transaction, where PostgreSQL keeps cursors.  Iterating it:

1. declares a cursor for the statement (log call ``declare``);
2. fetches ``max_rows`` rows at a time (``fetch``), yielding each batch as a
   :class:`~dbpool.driver.Result`, until the cursor is exhausted;
3. closes the cursor (``deallocate``), also when the consumer stops early,
   raises, or drops the stream.  A close that fails is logged, not raised
   (a lost connection fails the transaction instead), as in DBConnection.

Only one batch is in memory at a time, whatever the size of the result.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dbpool.driver import Outcome, Params, Query, Result
from dbpool.errors import ConnectionError, TransactionError

from .logentry import LogFn

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Stream"]

logger = logging.getLogger("dbpool.pool")


class Stream:
    """An iterable of result batches; also a context manager that closes it."""

    def __init__(
        self, conn: Connection, query: Query, params: Params, max_rows: int,
        log: LogFn | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        self._conn = conn
        self._query = query
        self._params = params
        self._max_rows = max_rows
        self._log = log
        self._batches: Generator[Result, None, None] | None = None

    def __iter__(self) -> Iterator[Result]:
        if self._batches is None:
            self._batches = _batches(self._conn, self._query, self._params, self._max_rows,
                                     self._log)
        return self._batches

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """The rows one by one, across batches."""
        for batch in self:
            yield from batch.rows

    def close(self) -> None:
        """Stop the stream and close its cursor (also done when the iteration ends)."""
        if self._batches is not None:
            self._batches.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()



# Module functions, not methods: a generator whose frame held the Stream would
# make a reference cycle with it, and a loop left by break or by an exception
# would then leave the cursor open until the cyclic garbage collector ran.
def _batches(
    conn: Connection, query: Query, params: Params, max_rows: int, log: LogFn | None
) -> Generator[Result, None, None]:
    driver = conn._driver
    conn._state()  # outdated, lost, or rolling back: say so, not "needs a transaction"
    status = conn.status()
    if status != "transaction":
        raise TransactionError(
            f"stream() needs a transaction (a cursor lives in one); the connection is "
            f"{status!r}: use it inside conn.transaction()", status=status)
    cursor = conn._call("declare", query, params, log,
                        lambda opts, state: driver.handle_declare(query, params, opts, state))
    fetch_opts = {"max_rows": max_rows}
    error_in_flight = True
    try:
        while True:
            more, batch = conn._call("fetch", query, params, log,
                                     lambda opts, state: driver.handle_fetch(
                                         query, cursor, {**opts, **fetch_opts}, state))
            if batch.rows:
                yield batch
            if more == "halt":
                break
        error_in_flight = False
    except GeneratorExit:  # the consumer stopped early: no error to keep
        error_in_flight = False
        raise
    finally:
        _deallocate(conn, query, cursor, log, quietly=error_in_flight)


def _deallocate(
    conn: Connection, query: Query, cursor: Any, log: LogFn | None, quietly: bool
) -> None:
    """Close the cursor, as DBConnection's stream does: an error the driver returns
    (or a connection already closed) is logged, not raised, and a lost connection
    fails the transaction; a driver that raises is raised, unless ``quietly``
    (an error is leaving the stream already and matters more).
    """
    driver = conn._driver
    returned = False

    def deallocate(opts: Any, state: Any) -> Outcome[None]:
        nonlocal returned
        outcome = driver.handle_deallocate(query, cursor, opts, state)
        returned = True
        return outcome

    try:
        conn._call("deallocate", query, None, log, deallocate, while_failed=True)
    except Exception as error:
        if quietly or returned or isinstance(error, ConnectionError):
            logger.debug("closing a stream's cursor failed", exc_info=True)
            return
        raise
