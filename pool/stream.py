"""Streams: a result read in batches through a server-side cursor.

``conn.stream(sql, params, max_rows=500)`` returns a :class:`Stream`.  It
must run inside a transaction, where PostgreSQL keeps cursors.  Iterating it:

1. declares a cursor for the statement (log call ``declare``);
2. fetches ``max_rows`` rows at a time (``fetch``), yielding each batch as a
   :class:`~dbpool.driver.Result`, until the cursor is exhausted;
3. closes the cursor (``deallocate``), also when the consumer stops early,
   raises, or drops the stream.

Only one batch is in memory at a time, whatever the size of the result.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dbpool.driver import Params, Query, Result
from dbpool.errors import TransactionError

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
            self._batches = self._run()
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

    def _run(self) -> Generator[Result, None, None]:
        conn, query, log = self._conn, self._query, self._log
        driver = conn._core.driver
        status = conn.status()
        if status != "transaction":
            raise TransactionError(
                f"stream() needs a transaction (a cursor lives in one); the connection is "
                f"{status!r}: use it inside conn.transaction()", status=status)
        cursor = conn._call("declare", query, self._params, log,
                            lambda opts, state: driver.handle_declare(
                                query, self._params, opts, state))
        fetch_opts = {"max_rows": self._max_rows}
        finished = False
        try:
            while True:
                more, batch = conn._call("fetch", query, self._params, log,
                                         lambda opts, state: driver.handle_fetch(
                                             query, cursor, {**opts, **fetch_opts}, state))
                if batch.rows:
                    yield batch
                if more == "halt":
                    break
            finished = True
        finally:
            self._deallocate(cursor, quietly=not finished)

    def _deallocate(self, cursor: Any, quietly: bool) -> None:
        conn, query, driver = self._conn, self._query, self._conn._core.driver
        try:
            conn._call("deallocate", query, None, self._log,
                       lambda opts, state: driver.handle_deallocate(query, cursor, opts, state),
                       while_failed=True)
        except Exception:
            if not quietly:
                raise
            # The stream is already ending with an error (or was dropped); that
            # error matters more.  The cursor ends with the transaction anyway.
            logger.debug("closing the cursor of an abandoned stream failed", exc_info=True)
