"""What the front end takes from psycopg's and libpq's insides, all of it, in one place.

- **Placeholders and adaptation.**  A remote statement uses psycopg's
  placeholders (``%s``, ``%(name)s``) and psycopg's adaptation, exactly as
  in-process: psycopg's ``PostgresQuery`` turns it into PostgreSQL's ``$n``
  form with adapted parameters, the way psycopg's cursors do.
  ``PostgresClientQuery`` merges the parameters into the text instead, as
  ``cursor.copy()`` does, for COPY (which takes no bind parameters).  Both
  live in the private ``psycopg._queries``.
- **``PQsendPipelineSync``** (libpq 17), which psycopg does not wrap yet:
  it queues a Sync without flushing, so that the requests one loop
  iteration puts on a connection leave in one write.  It is found in the
  libpq psycopg loaded and called through ctypes.

Each has a checked fast path and a tested fallback.  The private classes are
used only with the psycopg versions of :data:`TESTED` (the range
``pyproject.toml`` pins and CI installs); with another version, or if they
cannot be imported, :class:`Converter` merges parameters as literals through
psycopg's public ``ClientCursor.mogrify`` (same values, no server-side
binding, so no automatic preparation), and a warning says so at start.
Without ``PQsendPipelineSync`` (libpq before 17, or not Linux),
``PQpipelineSync`` serves: one write per request.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import psycopg
from psycopg import pq
from psycopg.abc import Transformer as TransformerProtocol

__all__ = ["FAST", "TESTED", "Converted", "Converter", "pipeline_sync_sender",
           "send_pipeline_sync"]

logger = logging.getLogger("dbpool.server.psycopg_internals")

#: The psycopg versions whose private query classes are used: from the first
#: to before the second (the range pyproject.toml pins).
TESTED = ((3, 3), (3, 4))


def _version() -> tuple[int, int]:
    major, minor, *_ = (int(part) for part in psycopg.__version__.split(".")[:2])
    return major, minor


def _private_queries() -> tuple[type[Any], type[Any]] | None:
    if not TESTED[0] <= _version() < TESTED[1]:
        logger.warning(
            "psycopg %s is outside the versions dbpool serve was tested with (%d.%d to "
            "before %d.%d): parameters are merged into statements as literals",
            psycopg.__version__, *TESTED[0], *TESTED[1])
        return None
    try:
        from psycopg._queries import PostgresClientQuery, PostgresQuery
    except ImportError:  # moved: the public fallback serves
        logger.warning("psycopg %s has no psycopg._queries: parameters are merged into "
                       "statements as literals", psycopg.__version__)
        return None
    return PostgresQuery, PostgresClientQuery


_QUERIES = _private_queries()
#: Whether the private, fast path is in use.
FAST = _QUERIES is not None


#: A statement ready for libpq: ``(text, parameters, their types, their formats)``.
Converted = tuple[bytes, Any, Sequence[int], Any]


class Converter:
    """Turns statements with psycopg's placeholders into libpq's form, for one connection.

    ``fallback=True`` forces the public path (the tests use it).
    """

    def __init__(self, conn: psycopg.Connection[Any], tx: TransformerProtocol,
                 fallback: bool = False) -> None:
        self._tx = tx
        queries = None if fallback else _QUERIES
        self._query_class = queries[0] if queries is not None else None
        self._client_class = queries[1] if queries is not None else None
        self._mogrifier = psycopg.ClientCursor(conn) if queries is None else None
        #: Whether statements keep their parameters apart (and so can be prepared).
        self.binds = queries is not None

    def convert(self, sql: str, params: Any) -> Converted:
        """``sql`` and ``params`` as libpq takes them; raises psycopg's TypeError,
        ValueError or psycopg.Error for a parameter it cannot adapt."""
        if self._query_class is not None:
            query = self._query_class(self._tx)
            query.convert(sql, params)
            return query.query, query.params, query.types, query.formats
        return self.merge(sql, params), None, (), None

    def merge(self, sql: str, params: Any) -> bytes:
        """``sql`` with ``params`` merged in as literals (for COPY)."""
        if self._client_class is not None:
            query = self._client_class(self._tx)
            query.convert(sql, params)
            assert query.query is not None
            return cast(bytes, query.query)
        assert self._mogrifier is not None
        text = self._mogrifier.mogrify(sql, params)
        return text.encode(self._mogrifier.connection.info.encoding)


def _libpq_send_pipeline_sync() -> Callable[[int], int] | None:
    """libpq's ``PQsendPipelineSync`` in the libpq psycopg loaded, if it has one."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libpq" in line})
    except OSError:  # not Linux
        return None
    for path in paths:
        try:
            function = getattr(ctypes.CDLL(path), "PQsendPipelineSync", None)
        except OSError:
            continue
        if function is not None:
            function.argtypes = [ctypes.c_void_p]
            function.restype = ctypes.c_int
            return cast(Callable[[int], int], function)
    return None


_send_pipeline_sync = _libpq_send_pipeline_sync()


def pipeline_sync_sender() -> Callable[[int], int] | None:
    """``PQsendPipelineSync`` for a caller that inlines :func:`send_pipeline_sync` on its
    hot path (called with ``pgconn.pgconn_ptr``; 1 on success), or None without it."""
    return _send_pipeline_sync


def send_pipeline_sync(pgconn: pq.abc.PGconn, flush: bool = False) -> None:
    """Queue a Sync on ``pgconn`` (in pipeline mode), leaving the flush to the caller.

    ``flush=True``, or a libpq without ``PQsendPipelineSync``, uses
    ``PQpipelineSync``, which flushes.  Raises psycopg.OperationalError if
    libpq refuses.
    """
    if flush or _send_pipeline_sync is None:
        pgconn.pipeline_sync()
    elif _send_pipeline_sync(pgconn.pgconn_ptr) != 1:  # type: ignore[attr-defined]
        raise psycopg.OperationalError(f"sending a Sync failed: {pgconn.get_error_message()!r}")
