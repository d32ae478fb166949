"""Log entries: what one call on a connection did, and how long each part took.

DBConnection's ``LogEntry``.  Pass ``log=callable`` to :meth:`Pool.start`
(every call of the pool) or to a single call; the callable receives one
:class:`LogEntry` per driver call, after the call:

- ``query``, ``execute``, ``prepare``, ``prepare_execute``, ``close``;
- ``begin``, ``commit``, ``rollback`` (a transaction);
- ``declare``, ``fetch``, ``deallocate`` (a stream).

Times are in seconds.  The first logged call after a checkout carries the
checkout's ``pool_time`` (its wait in the queue) and ``idle_time`` (how long
the connection had been idle); later calls of the same checkout have None
there, so summing ``pool_time`` over entries counts each checkout once.

A log callable that raises is reported on the ``dbpool.log`` logger and
never breaks the call it describes.  Without a log callable nothing is timed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbpool.driver import Params

__all__ = ["LogEntry", "LogFn", "emit"]

logger = logging.getLogger("dbpool.log")


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One driver call, as given to a ``log`` callable.

    ``result`` is what the call returned (a Result, a Query, None), or
    ``error`` the exception it raised.
    """

    call: str
    query: Any
    params: Params
    result: Any
    error: BaseException | None
    #: Seconds the checkout waited in the queue (first call of a checkout only).
    pool_time: float | None
    #: Seconds the driver spent on the call, decoding excluded.
    connection_time: float
    #: Seconds spent decoding rows, if the driver reports it.
    decode_time: float | None
    #: Seconds the connection was idle before this checkout (first call only).
    idle_time: float | None

    @property
    def ok(self) -> bool:
        return self.error is None


LogFn = Callable[[LogEntry], object]


def emit(log: LogFn, entry: LogEntry) -> None:
    """Give ``entry`` to ``log``; a raising log callable is reported, never raised."""
    try:
        log(entry)
    except Exception:
        logger.exception("log callable %r raised on a %s entry", log, entry.call)
