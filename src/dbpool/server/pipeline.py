"""A pool connection lent to the front end and driven through libpq's pipeline.

The front end runs remote statements on connections it borrows from the
pool like any caller, but it cannot block on one: a single thread serves
every client.  So while it holds a connection, :class:`Pipe` puts it in
libpq's non-blocking pipeline mode and drives it from the front end's poll
loop:

- :meth:`Pipe.send` sends one request's statements followed by a Sync, and
  returns at once.  Requests of different clients may follow each other on
  one connection (up to the front end's ``pipeline_depth``); the Sync after
  each makes each request its own implicit transaction, so one client's
  failure never touches another's statements.
- :meth:`Pipe.read`, called when the socket is readable, collects results
  and hands each request (a :class:`Job`) its results, in order.
- :meth:`Pipe.release` leaves pipeline mode and returns the connection to
  the pool.

Statements use psycopg's placeholders and psycopg's adaptation, through the
same objects psycopg's cursors use (``PostgresQuery`` and the
``Transformer``): a parameter or a column converts exactly as it does
in-process.  ``PostgresQuery`` lives in a private psycopg module; this is
the one place dbpool uses it, and ``tests/test_remote_*`` cover it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import psycopg
from psycopg import pq
from psycopg._queries import PostgresQuery
from psycopg.abc import Transformer as TransformerProtocol
from psycopg.adapt import Transformer

from dbpool.pgdriver import PgState
from dbpool.pool.connection import Connection

__all__ = ["Job", "Outcome", "Pipe", "Statement", "first_error"]

logger = logging.getLogger("dbpool.server.pipeline")

#: ``(sql, params)``: one statement of a request.
Statement: TypeAlias = tuple[str, Any]
#: What a job gets when done: one libpq result per statement, or the
#: error that lost the connection.
Outcome: TypeAlias = "list[pq.abc.PGresult] | BaseException"

_TEXT = pq.Format.TEXT
_SYNC = int(pq.ExecStatus.PIPELINE_SYNC)
_FATAL = int(pq.ExecStatus.FATAL_ERROR)
_TUPLES = int(pq.ExecStatus.TUPLES_OK)
_BAD = int(pq.ConnStatus.BAD)
#: Prepared statements a connection keeps for the front end; past this,
#: ``execute`` runs unprepared rather than grow the server's memory.
MAX_PREPARED = 256


class Job:
    """One remote request, from its arrival to its reply.

    The front end fills in who asked (``route``, ``rid``), what (``op``,
    ``req``) and until when (``deadline``); a :class:`Pipe` that runs it
    collects its ``results``.  ``finish``, if set, is called with
    ``(job, outcome, pipe)`` when they are in; without it, the front end
    answers with the one statement's result.
    """

    __slots__ = ("deadline", "finish", "needs_own", "op", "prepares", "req",
                 "results", "rid", "route", "start")

    def __init__(self, route: list[bytes], rid: int, op: str, req: dict[str, Any],
                 deadline: float) -> None:
        self.route = route
        self.rid = rid
        self.op = op
        self.req = req
        self.deadline = deadline
        self.finish: Callable[[Job, Outcome, Pipe], None] | None = None
        #: What to run once the job has a connection (a queued job).
        self.start: Callable[[Pipe], None] | None = None
        #: Whether it needs a connection of its own (begin, stream).
        self.needs_own = False
        #: The libpq results of its statements, as they arrive.
        self.results: list[pq.abc.PGresult] = []
        #: (result position, cache key) of each Prepare sent for it.
        self.prepares: list[tuple[int, Any]] | None = None


class Pipe:
    """A lent pool connection in pipeline mode (see the module docstring)."""

    def __init__(self, conn: Connection,
                 complete: Callable[[Pipe, Job, Outcome], None]) -> None:
        self.conn = conn
        #: Called with each job when its results are in (or the connection is lost).
        self.complete = complete
        state: PgState = conn._driver_state
        self.state = state
        pgconn = state.conn.pgconn
        self.pgconn = pgconn
        self.fd: int = pgconn.socket
        if state.remote_transformer is None:
            state.remote_transformer = Transformer(state.conn)
        self.tx: TransformerProtocol = state.remote_transformer
        self.encoding = state.conn.info.encoding
        self.requests: deque[Job] = deque()
        #: Why the connection is unusable, once it is.
        self.broken: BaseException | None = None
        #: Who holds it: None while it serves any client, else a lease or stream.
        self.owner: Any = None
        #: Whether libpq holds unsent data (the loop then polls for writability).
        self.wants_write = False
        #: When its last request completed (monotonic), while it has none.
        self.idle_since = 0.0
        #: A cancel was sent for its one request: it takes no more until that ends.
        self.cancelling = False
        pgconn.nonblocking = 1
        pgconn.enter_pipeline_mode()

    @property
    def inflight(self) -> int:
        return len(self.requests)

    # -- sending ------------------------------------------------------------

    def send(self, job: Job, statements: Sequence[Statement], prepared: bool = False) -> None:
        """Queue ``job``'s statements and a Sync; :attr:`complete` gets their results later.

        They leave at the next :meth:`flush`, so that the requests of one
        loop iteration share a write.

        Parameters are adapted first, all of them, so a value psycopg cannot
        adapt raises here (``TypeError``, ``ValueError``, ``psycopg.Error``)
        with nothing sent.  ``prepared`` runs each statement as a named
        prepared statement, preparing it on this connection the first time.
        """
        converted = []
        for sql, params in statements:
            query = PostgresQuery(self.tx)
            query.convert(sql, params)
            converted.append((query.query, query.params, query.types, query.formats))
        pgconn = self.pgconn
        prepares: list[tuple[int, Any]] | None = None
        position = 0
        try:
            for text, params, types, formats in converted:
                name = None
                if prepared:
                    name, new = self._statement_name(text, types)
                    if name is not None and new:
                        pgconn.send_prepare(name, text, param_types=types)
                        if prepares is None:
                            prepares = []
                        prepares.append((position, (text, tuple(types))))
                        position += 1
                if name is not None:
                    pgconn.send_query_prepared(name, params, param_formats=formats)
                else:
                    pgconn.send_query_params(text, params, param_types=types,
                                             param_formats=formats, result_format=_TEXT)
                position += 1
            pgconn.pipeline_sync()
        except psycopg.Error as error:
            self._lose(error)
            raise
        job.prepares = prepares
        self.requests.append(job)

    def _statement_name(self, text: bytes, types: Sequence[int]) -> tuple[bytes | None, bool]:
        """The statement's name on this connection, and whether it must be prepared.

        None when the connection keeps :data:`MAX_PREPARED` already.
        """
        cache = self.state.remote_statements
        key = (text, tuple(types))
        name = cache.get(key)
        if name is not None:
            return name, False
        if len(cache) >= MAX_PREPARED:
            return None, False
        name = cache[key] = self.state.next_statement_name()
        return name, True

    def flush(self) -> None:
        """Send what libpq holds; what the socket cannot take now waits for writability."""
        try:
            self.wants_write = self.pgconn.flush() == 1
        except psycopg.Error as error:
            self._lose(error)

    # -- receiving ----------------------------------------------------------

    def read(self) -> None:
        """Collect the results that arrived; finish each request whose Sync came."""
        pgconn = self.pgconn
        requests = self.requests
        try:
            pgconn.consume_input()
            while requests and not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:  # the end of one statement's results
                    continue
                if result.status == _SYNC:
                    self._finish(requests.popleft())
                else:
                    requests[0].results.append(result)
        except psycopg.Error as error:
            self._lose(error)
            return
        if pgconn.status == _BAD:
            self._lose(psycopg.OperationalError("the server closed the connection"))

    def _finish(self, job: Job) -> None:
        if job.prepares:
            results = job.results
            skip = set()
            for position, key in job.prepares:
                if results[position].status != _FATAL:
                    skip.add(position)
                    continue
                self.state.remote_statements.pop(key, None)  # prepare again next time
            job.results = [r for i, r in enumerate(results) if i not in skip]
        try:
            self.complete(self, job, job.results)
        except Exception:
            logger.exception("completing a %s request raised", job.op)

    def _lose(self, error: BaseException) -> None:
        """The connection is gone: fail every request on it."""
        if self.broken is not None:
            return
        self.broken = error
        self.conn._slot.broken = error
        jobs, self.requests = self.requests, deque()
        for job in jobs:
            try:
                self.complete(self, job, error)
            except Exception:
                logger.exception("completing a %s request raised", job.op)

    # -- results ------------------------------------------------------------

    def rows(self, result: pq.abc.PGresult) -> list[Any]:
        """A result's rows, adapted by psycopg as a cursor would."""
        if result.status != _TUPLES or not result.ntuples:
            return []
        tx = self.tx
        tx.set_pgresult(result)
        return tx.load_rows(0, result.ntuples, tuple)

    def columns(self, result: pq.abc.PGresult) -> list[list[Any]]:
        encoding = self.encoding
        return [[(result.fname(i) or b"").decode(encoding), result.ftype(i)]
                for i in range(result.nfields)]

    def error(self, result: pq.abc.PGresult) -> psycopg.Error:
        """The psycopg error of a failed statement's result."""
        return psycopg.errors.error_from_result(result, self.encoding)

    # -- giving back ----------------------------------------------------------

    def release(self) -> Connection:
        """Leave pipeline mode; return the connection, for the pool to take back."""
        if self.broken is None:
            try:
                self.pgconn.exit_pipeline_mode()
                self.pgconn.nonblocking = 0
            except psycopg.Error as error:
                self.broken = error
                self.conn._slot.broken = error
        return self.conn


def first_error(results: list[pq.abc.PGresult]) -> int | None:
    """The position of the statement that failed, if one did."""
    for position, result in enumerate(results):
        if result.status == _FATAL:
            return position
    return None


