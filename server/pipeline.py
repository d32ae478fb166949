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
same objects psycopg's cursors use (the ``Transformer``, and the query
classes that :mod:`dbpool.server.psycopg_internals` keeps, with every other
piece of psycopg's and libpq's insides the server needs): a parameter or a
column converts exactly as it does in-process.
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import psycopg
from psycopg import pq
from psycopg.abc import Transformer as TransformerProtocol
from psycopg.adapt import Transformer

from dbpool.driver import CopyDirection
from dbpool.pgdriver import PgState
from dbpool.pool.connection import Connection
from dbpool.statement_scope import copy_refused

from .copy import Copy
from .psycopg_internals import Converter, pipeline_sync_sender

if TYPE_CHECKING:
    from .clients import ClientState
    from .served_pool import ServedPool

__all__ = ["AT_ONCE", "NEVER", "PREPARE_THRESHOLD", "Job", "Outcome", "Pipe", "Statement",
           "cancelled", "first_error"]

logger = logging.getLogger("dbpool.server.pipeline")

_monotonic = time.monotonic
#: A connection takes requests behind the one it runs only while that one has
#: run less than this (seconds), and while its requests lately took less than
#: LONG_REQUEST each; one behind it always may.  Behind short statements,
#: pipelining saves round trips; behind long ones, a request would wait unseen,
#: so it waits in the front end's queue instead, where CoDel judges its wait
#: (served_pool.py).
PIPELINE_BEHIND = 0.002
#: See PIPELINE_BEHIND: the time per request (a moving average of the time from
#: one completion to the next) past which a connection pipelines one deep.  Well
#: above what a busy loop takes to come back to a connection (under 1 ms), so
#: that only statements that are long in themselves count.
LONG_REQUEST = 0.005
#: A request may join requests queued on a connection that have not left yet,
#: rather than take an idle connection, when each of those runs one statement
#: whose last timed run took less than this (seconds).  They then share one
#: write, one wake-up of PostgreSQL's backend and, mostly, one read: less CPU
#: per request on both sides, which on a busy machine is throughput.  Behind a
#: statement never timed, or lately long, the request would wait for it, so it
#: goes elsewhere (see :attr:`Pipe.unsent_short`).
SHORT_REQUEST = 0.001
#: Statements longer than this (characters) are not timed for SHORT_REQUEST: their
#: texts are not kept, and nothing joins them.
MAX_TIMED_TEXT = 4096

#: ``(sql, params)``: one statement of a request.
Statement: TypeAlias = tuple[str, Any]
#: What a job gets when done: one libpq result per statement, or the
#: error that lost the connection.
Outcome: TypeAlias = "list[pq.abc.PGresult] | BaseException"

_send_pipeline_sync = pipeline_sync_sender()
_UNTIMED = float("inf")
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_TEXT = pq.Format.TEXT
_SYNC = int(pq.ExecStatus.PIPELINE_SYNC)
_FATAL = int(pq.ExecStatus.FATAL_ERROR)
_TUPLES = int(pq.ExecStatus.TUPLES_OK)
_COMMAND_OK = int(pq.ExecStatus.COMMAND_OK)
_SUCCEEDED = frozenset({_TUPLES, _COMMAND_OK})
_BAD = int(pq.ConnStatus.BAD)
#: A transaction still open after a Sync.  (libpq reports ACTIVE instead while
#: more requests are in flight behind it, so this check sees the last one only:
#: a backstop behind the front end's refusal of transaction control.)
_OPEN = frozenset({int(pq.TransactionStatus.INTRANS), int(pq.TransactionStatus.INERROR)})
#: What a statement's result may be in the pipeline; anything else (a COPY
#: that slipped through, a protocol surprise) ends its request and the connection.
_EXPECTED = frozenset(int(status) for status in (
    pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK, pq.ExecStatus.EMPTY_QUERY,
    pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.PIPELINE_ABORTED))
_COPY = frozenset(int(status) for status in (
    pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_BOTH))
#: Command tags after which the front end's prepared statements may be gone
#: (a DEALLOCATE does not say which one it dropped: all are forgotten).
_FORGETS_STATEMENTS = (b"DISCARD ALL", b"DEALLOCATE")
#: PostgreSQL's SQLSTATE for "cached plan must not change result type": a prepared
#: statement whose result columns changed under it (DDL, here or on another
#: connection).  It fails every run until the statement is prepared again.
_STALE_PLAN = b"0A000"
#: PostgreSQL's SQLSTATE for a statement stopped by a cancel request.
_QUERY_CANCELED = b"57014"
#: Command tags of DDL that may change what a prepared statement returns (psycopg
#: forgets its own prepared statements after the same ones).
_CHANGES_SCHEMA = (b"DROP", b"ALTER")
_ENDS_TRANSACTION = (b"COMMIT", b"ROLLBACK")
_SQLSTATE = pq.DiagnosticField.SQLSTATE

#: Prepared statements a connection keeps for the front end; past this,
#: statements run unprepared rather than grow the server's memory.
MAX_PREPARED = 256
#: Statements whose runs a connection counts towards preparing them.
MAX_COUNTED = 1024
#: Values of ``Pipe.send``'s ``prepare``: never, or at the first run.
NEVER = 0
AT_ONCE = 1
#: The ``query`` op prepares a statement on its fifth run on a connection,
#: as psycopg does by default (``prepare_threshold``).
PREPARE_THRESHOLD = 5


class Job:
    """One remote request, from its arrival to its reply.

    The front end fills in who asked (``route``, ``rid``), what (``op``,
    ``req``) and until when (``deadline``); a :class:`Pipe` that runs it
    collects its ``results``.  ``finish``, if set, is called with
    ``(job, outcome, pipe)`` when they are in; without it, the front end
    answers with the one statement's result.
    """

    __slots__ = ("begins", "client", "deadline", "finish", "holding", "needs_own", "op",
                 "opened", "prepares", "ran_prepared", "replanned", "req", "results", "rid",
                 "route", "served", "shared", "stale_plan", "start", "started", "state",
                 "statements")

    def __init__(self, route: list[bytes], rid: int, op: str, req: dict[str, Any],
                 deadline: float) -> None:
        self.route = route
        self.rid = rid
        self.op = op
        self.req = req
        self.deadline = deadline
        self.finish: Callable[[Job, Outcome, Pipe], None] | None = None
        #: The pool it runs on, if it needs a connection of its own (ServedPool).
        self.served: ServedPool | None = None
        #: Who sent it: its turn in a pool's queue is its client's (see FairQueue).
        self.client: Hashable = None
        #: Its client's counts (ClientState), until it is answered.
        self.state: ClientState | None = None
        #: Whether it opens a lease, stream or copy (it counts toward max_leases).
        self.holding = False
        #: When it arrived (monotonic; 0 for the front end's own jobs).
        self.started = 0.0
        #: What to run once the job has a connection (a queued job).
        self.start: Callable[[Pipe], None] | None = None
        #: Whether it needs a connection of its own (begin, stream).
        self.needs_own = False
        #: The libpq results of its statements, as they arrive.
        self.results: list[pq.abc.PGresult] = []
        #: (result position, cache key, name) of each Prepare sent for it.
        self.prepares: list[tuple[int, Any, bytes]] | None = None
        #: Sent on a connection that no lease or stream held: it must leave
        #: no transaction open behind it.
        self.shared = False
        #: Whether one of its statements ran as a prepared statement.
        self.ran_prepared = False
        #: What it runs, for running it again (the front end sets it for query,
        #: execute and batch).
        self.statements: Sequence[Statement] | None = None
        #: Whether it failed because a prepared statement's plan went stale (PostgreSQL's
        #: "cached plan must not change result type").
        self.stale_plan = False
        #: Whether it was sent again after a prepared statement's plan went stale.
        self.replanned = False
        #: Whether its statements went out after the lease's deferred BEGIN, in the
        #: same Sync (see :attr:`Pipe.begin_pending`).
        self.begins = False
        #: The lease it opened, for a transaction's first request sent with its
        #: begin (``begin: true``): its reply, or its error, names it.
        self.opened: Any = None


def _ignore(job: Job, outcome: Outcome, pipe: Pipe) -> None:
    """The finish of the pipe's own requests: nobody waits for their results."""


class Pipe:
    """A lent pool connection in pipeline mode (see the module docstring)."""

    def __init__(self, conn: Connection,
                 complete: Callable[[Pipe, Job, Outcome], None]) -> None:
        self.conn = conn
        #: The pool it came from (the front end sets it when it adopts the connection).
        self.served: ServedPool
        #: Called with each job when its results are in (or the connection is lost).
        self.complete = complete
        state = conn.driver_state
        if not isinstance(state, PgState):
            raise TypeError(f"dbpool serve drives psycopg connections; this pool's driver "
                            f"gives {type(state).__name__}")
        self.state = state
        pgconn = state.conn.pgconn
        self.pgconn = pgconn
        self.fd: int = pgconn.socket
        if state.remote_transformer is None:  # kept on the connection: costly to make
            state.remote_transformer = Transformer(state.conn)
            state.remote_converter = Converter(state.conn, state.remote_transformer)
        self.tx: TransformerProtocol = state.remote_transformer
        self.converter: Converter = state.remote_converter
        self.encoding = state.conn.info.encoding
        self.requests: deque[Job] = deque()
        #: How many of :attr:`requests` each client has (for the front end's fair
        #: share: a count, not a scan of every connection's requests per request).
        self.clients: dict[Hashable, int] = {}
        #: Why the connection is unusable, once it is.
        self.broken: BaseException | None = None
        #: Why it must take no new requests and be replaced once those in flight end.
        self.retiring: BaseException | None = None
        #: Who holds it: None while it serves any client, else a lease or stream.
        self.owner: Any = None
        #: Whether libpq holds unsent data (the loop then polls for writability).
        self.wants_write = False
        #: When its last request completed (monotonic), while it has none.
        self.idle_since = 0.0
        #: When the request it runs now became its first: sent to it idle, or the
        #: one before completed (monotonic).
        self.progress = 0.0
        #: How long its requests ran lately, each once first (a moving average, s).
        self.service = 0.0
        #: A cancel was sent for its first request (past its deadline): it takes no more
        #: requests until those it has end.
        self.cancelling = False
        #: The request the last cancel sent on it was for (None: a COPY's), and when it
        #: was sent: 0.0 once it landed (see FrontEnd._complete).
        self.cancel_for: Job | None = None
        self.cancel_sent = 0.0
        #: Requests queued since the last flush (their statements wait in libpq), and
        #: whether each runs one statement known to be short (see SHORT_REQUEST).
        self.unsent = 0
        self.unsent_short = True
        #: Statements whose Prepare is in flight: (query, types) -> name.  Until
        #: PostgreSQL confirms one, other requests run it unnamed, so that a
        #: Prepare skipped after an earlier failure can never break them.
        self.preparing: dict[Any, bytes] = {}
        #: DDL ran in the transaction of the lease that holds it, not yet ended.
        self.ddl_pending = False
        #: Statements prepared in that transaction: (query, types) keys.
        self.lease_prepared: list[Any] = []
        #: The COPY this connection is running, out of pipeline mode (see copy.py).
        self.copy: Copy | None = None
        #: A lease began on it and its BEGIN has not gone out: it leaves with the
        #: next request's statements, in their Sync, so that a transaction's begin
        #: costs no round trip to PostgreSQL (PostgreSQL takes a transaction's
        #: snapshot at its first statement anyway).  Sharing the Sync means a BEGIN
        #: that fails skips those statements rather than let them run outside it.
        self.begin_pending = False
        pgconn.nonblocking = 1
        pgconn.enter_pipeline_mode()

    @property
    def inflight(self) -> int:
        return len(self.requests)

    def takes_more(self, now: float) -> bool:
        """Whether a request may go behind those in flight now (see PIPELINE_BEHIND)."""
        inflight = len(self.requests)
        # One always may: the connection then has its next statement when the one it
        # runs ends, and never idles for a round trip.
        return inflight < 2 or (self.service < LONG_REQUEST
                                and now - self.progress < PIPELINE_BEHIND)

    def joinable(self) -> bool:
        """Whether a request may join this connection's requests, though an idle
        connection may be at hand: none of them has left yet (nothing runs there that
        it would wait for), and each is known to be short (see SHORT_REQUEST)."""
        return (0 < self.unsent == len(self.requests) and self.unsent_short
                and self.owner is None and self.broken is None and self.retiring is None
                and not self.cancelling)

    def events(self) -> int:
        """What the loop should poll its socket for."""
        copy = self.copy
        events = _POLLIN if copy is None or copy.reading else 0
        return events | _POLLOUT if self.wants_write else events

    def start_copy(self, statement: str, params: Any, direction: CopyDirection,
                   page_bytes: int, notify: Callable[[Copy], None]) -> Copy:
        """Set up a COPY on this connection, which must have nothing in flight (copy.py);
        :meth:`Copy.start` sends it.

        Parameters are merged into the statement here, as psycopg's
        ``cursor.copy()`` does (COPY takes no bind parameters); a value that
        cannot be adapted raises with nothing sent.
        """
        assert not self.requests and self.copy is None
        copy = self.copy = Copy(self, self.converter.merge(statement, params), direction,
                                page_bytes, notify)
        return copy

    # -- sending ------------------------------------------------------------

    def send(self, job: Job, statements: Sequence[Statement], prepare: int = NEVER) -> None:
        """Queue ``job``'s statements and a Sync; :attr:`complete` gets their results later.

        They leave at the next :meth:`flush`, so that the requests of one
        loop iteration share a write.

        Parameters are adapted first, all of them, so a value psycopg cannot
        adapt raises here (``TypeError``, ``ValueError``, ``psycopg.Error``)
        with nothing sent.  ``prepare`` is when a statement runs as a named
        prepared statement of this connection: :data:`NEVER`, :data:`AT_ONCE`
        (the ``execute`` op), or from its Nth run here on (the ``query`` op,
        like psycopg's ``prepare_threshold``).
        """
        converter = self.converter
        converted = [converter.convert(sql, params) for sql, params in statements]
        if not converter.binds:  # literals merged in: every text would be a new statement
            prepare = NEVER
        pgconn = self.pgconn
        prepares: list[tuple[int, Any, bytes]] | None = None
        position = 0
        ran_prepared = False
        state = self.state
        if state.remote_epoch != self.served.schema_epoch:  # DDL ran since: start afresh
            state.remote_epoch = self.served.schema_epoch
            if state.remote_statements:
                state.stale_statements.extend(state.remote_statements.values())
                state.remote_statements.clear()
        if state.stale_statements and self.owner is None:  # in no transaction: drop them
            self._deallocate_stale()
        try:
            begins = self.begin_pending
            if begins:
                pgconn.send_query_params(b"BEGIN", None, result_format=_TEXT)
                position = 1
            for text, params, types, formats in converted:
                name = None
                if prepare:
                    key = (text, tuple(types))
                    name = self.state.remote_statements.get(key)
                    if name is None and prepares:  # prepared earlier in this request
                        name = next((n for _, k, n in prepares if k == key), None)
                    if name is None and key not in self.preparing:
                        name = self._new_statement(key, prepare)
                        if name is not None:
                            pgconn.send_prepare(name, text, param_types=types)
                            self.preparing[key] = name
                            if prepares is None:
                                prepares = []
                            prepares.append((position, key, name))
                            position += 1
                if name is not None:
                    pgconn.send_query_prepared(name, params, param_formats=formats)
                    ran_prepared = True
                else:
                    pgconn.send_query_params(text, params, param_types=types,
                                             param_formats=formats, result_format=_TEXT)
                position += 1
            if _send_pipeline_sync is None:  # send_pipeline_sync(pgconn), inlined: hot path
                pgconn.pipeline_sync()
            elif _send_pipeline_sync(pgconn.pgconn_ptr) != 1:  # type: ignore[attr-defined]
                raise psycopg.OperationalError(
                    f"sending a Sync failed: {pgconn.get_error_message()!r}")
        except psycopg.Error as error:
            self.lose(error)
            raise
        if begins:
            self.begin_pending = False
            job.begins = True
        job.prepares = prepares
        job.ran_prepared = ran_prepared
        job.shared = self.owner is None
        self.unsent += 1
        if self.unsent_short and (len(statements) != 1 or self.served.statement_times.get(
                statements[0][0], _UNTIMED) >= SHORT_REQUEST):  # (not timed: _UNTIMED)
            self.unsent_short = False
        if not self.requests:
            self.progress = _monotonic()
        self._add(job)

    def _deallocate_stale(self) -> None:
        """Send ``DEALLOCATE`` for the prepared statements found stale, as a request of
        its own whose results nobody waits for."""
        state = self.state
        names, state.stale_statements = state.stale_statements, []
        pgconn = self.pgconn
        for name in names:
            pgconn.send_query_params(b'DEALLOCATE "' + name + b'"', None, result_format=_TEXT)
        pgconn.pipeline_sync()
        job = Job([], 0, "deallocate", {}, float("inf"))
        job.finish = _ignore
        job.shared = True
        self._add(job)

    def _add(self, job: Job) -> None:
        self.requests.append(job)
        clients = self.clients
        clients[job.client] = clients.get(job.client, 0) + 1

    def _take(self) -> Job:
        """The first request, off the connection."""
        job = self.requests.popleft()
        clients = self.clients
        left = clients[job.client] - 1
        if left:
            clients[job.client] = left
        else:
            del clients[job.client]
        return job

    def _after_statements(self, job: Job) -> None:
        """Keep the connection's prepared statements true to what its results say.

        One pass over the command tags: a ``DISCARD ALL`` or ``DEALLOCATE`` of a
        lease's client dropped them; DDL (``DROP``, ``ALTER``) may have changed
        what any of the pool's prepared statements return, so the pool's schema
        epoch moves, now and again when the lease that ran it commits (until then
        other connections still see the old schema, and may prepare for it); the
        end of a lease's transaction keeps what was prepared inside it after a
        commit, and forgets it after a rollback, as it may name objects the
        rollback undid (psycopg forgets its own on ROLLBACK for the same reason);
        and a run that met a stale plan (DDL done elsewhere) forgets them all, to
        be deallocated once the connection is in no transaction.
        """
        forgets = changes_schema = stale = False
        ended = b""
        for r in job.results:
            status = r.status
            if status == _COMMAND_OK:
                tag = r.command_status or b""
                if tag.startswith(_FORGETS_STATEMENTS):
                    forgets = True
                elif tag.startswith(_CHANGES_SCHEMA):
                    changes_schema = True
                elif tag.startswith(_ENDS_TRANSACTION):
                    ended = tag
            elif status == _FATAL and job.ran_prepared and \
                    r.error_field(_SQLSTATE) == _STALE_PLAN:
                stale = True
        state = self.state
        statements = state.remote_statements
        if forgets:
            statements.clear()
        if ended and self.lease_prepared:  # (a lease's COMMIT or ROLLBACK is sent as shared)
            if ended.startswith(b"ROLLBACK"):
                for key in self.lease_prepared:
                    name = statements.pop(key, None)
                    if name is not None:
                        state.stale_statements.append(name)
            self.lease_prepared.clear()
        if changes_schema or (self.ddl_pending and ended):
            self.served.schema_epoch += 1
        if ended or job.shared:  # its transaction is over: committed or not
            self.ddl_pending = False
        elif changes_schema:
            self.ddl_pending = True
        if stale:
            job.stale_plan = True
            logger.debug("prepared statements went stale on a %s request: %d forgotten",
                         job.op, len(statements))
            state.stale_statements.extend(statements.values())
            statements.clear()

    def _new_statement(self, key: tuple[bytes, tuple[int, ...]], prepare: int) -> bytes | None:
        """A name to prepare a statement this connection lacks under, or None: run it
        unnamed this time.

        A statement is prepared on its ``prepare``-th run on this connection,
        while the connection keeps fewer than :data:`MAX_PREPARED`.
        """
        state = self.state
        if prepare > AT_ONCE:
            counts = state.remote_counts
            seen = counts[key] = counts.get(key, 0) + 1
            if seen < prepare:
                if len(counts) > MAX_COUNTED:  # many one-off statements: start afresh
                    counts.clear()
                return None
            del counts[key]
        if (len(state.remote_statements) + len(self.preparing) + len(state.stale_statements)
                >= MAX_PREPARED):
            return None
        return state.next_statement_name()

    def flush(self) -> None:
        """Send what libpq holds; what the socket cannot take now waits for writability."""
        self.unsent, self.unsent_short = 0, True
        if self.copy is not None:
            self.copy.flush()
            return
        try:
            self.wants_write = self.pgconn.flush() == 1
        except psycopg.Error as error:
            self.lose(error)

    # -- receiving ----------------------------------------------------------

    def read(self) -> None:
        """Collect the results that arrived; finish each request whose Sync came."""
        if self.copy is not None:
            self.copy.read()
            return
        pgconn = self.pgconn
        requests = self.requests
        finished = False
        try:
            pgconn.consume_input()
            while requests and not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:  # the end of one statement's results
                    continue
                status = result.status
                if status == _SYNC:
                    if requests[0].shared and pgconn.transaction_status in _OPEN:
                        self.lose(_left_open())
                        return
                    job = self._take()
                    if not finished:  # the others that finished in this read took ~0
                        finished = True
                        now = _monotonic()
                        took = now - self.progress
                        self.service += 0.25 * (took - self.service)
                        self.progress = now
                        statements = job.statements
                        results = job.results
                        # A run that failed (a cancel, an error) says nothing of how long
                        # the statement takes; a long text is not kept.
                        if (statements is not None and len(statements) == 1 and results
                                and results[-1].status in _SUCCEEDED
                                and len(statements[0][0]) <= MAX_TIMED_TEXT):
                            times = self.served.statement_times
                            sql = statements[0][0]
                            if len(times) >= MAX_COUNTED and sql not in times:
                                times.clear()  # many one-off statements: start afresh
                            times[sql] = took
                    self._finish(job)
                elif status in _EXPECTED:
                    requests[0].results.append(result)
                else:
                    self.lose(_unexpected(status), culprit=requests[0],
                               blame=copy_refused() if status in _COPY else None)
                    return
        except psycopg.Error as error:
            self.lose(error)
            return
        if pgconn.status == _BAD:
            self.lose(psycopg.OperationalError("the server closed the connection"))

    def _finish(self, job: Job) -> None:
        statements = self.state.remote_statements
        if job.prepares:
            # Only what PostgreSQL confirmed is prepared: after a failure it skips
            # the rest of the request, Prepares included (PIPELINE_ABORTED).
            results = job.results
            skip = set()
            for position, key, name in job.prepares:
                self.preparing.pop(key, None)
                status = results[position].status
                if status == _COMMAND_OK:
                    statements[key] = name
                    if not job.shared:
                        self.lease_prepared.append(key)
                if status != _FATAL:  # a failed Prepare is the request's error
                    skip.add(position)
            job.results = [r for i, r in enumerate(results) if i not in skip]
        if job.begins:
            begun = job.results[0] if job.results else None
            if begun is None or begun.status != _COMMAND_OK:
                # The lease's later requests may be on their way already, and must not
                # run outside its transaction: the connection goes, and they fail.
                error = (self.error(begun) if begun is not None
                         else psycopg.OperationalError("the transaction's BEGIN gave no result"))
                self.lose(error)
                self.complete(self, job, error)
                return
            job.results = job.results[1:]
        if job.finish is not _ignore:  # the pipe's own DEALLOCATEs: nothing to learn
            self._after_statements(job)
        try:
            self.complete(self, job, job.results)
        except Exception:
            logger.exception("completing a %s request raised", job.op)

    def lose(self, error: BaseException, culprit: Job | None = None,
              blame: BaseException | None = None) -> None:
        """The connection is gone (or must go): fail every request on it.

        ``culprit``, the request that broke it, gets ``blame`` (default:
        ``error``); the others get ``error``.
        """
        if self.broken is not None:
            return
        self.break_(error)
        jobs, self.requests = self.requests, deque()
        self.clients = {}
        self.preparing.clear()
        for job in jobs:
            try:
                self.complete(self, job, blame if job is culprit and blame else error)
            except Exception:
                logger.exception("completing a %s request raised", job.op)

    def retire(self, error: BaseException) -> None:
        """Take no new requests; have the pool replace the connection when it comes back."""
        self.retiring = error
        self.conn.mark_broken(error)

    def break_(self, error: BaseException) -> None:
        """Mark the connection unusable: the pool replaces it when it comes back."""
        if self.broken is None:
            self.broken = error
        self.conn.mark_broken(self.broken)

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
                self.break_(error)
        return self.conn


def _left_open() -> psycopg.OperationalError:
    return psycopg.OperationalError(
        "a request left a transaction open on a shared connection; it and the requests "
        "behind it were rolled back with the connection, which is being replaced")


def _unexpected(status: int) -> psycopg.OperationalError:
    return psycopg.OperationalError(
        f"unexpected result {pq.ExecStatus(status).name} in the pipeline; the request "
        "was ended and its connection is being replaced")


def first_error(results: list[pq.abc.PGresult]) -> int | None:
    """The position of the statement that failed, if one did."""
    for position, result in enumerate(results):
        if result.status == _FATAL:
            return position
    return None




def cancelled(outcome: Outcome) -> bool:
    """Whether a request's statements failed for a cancel (``query_canceled``)."""
    if isinstance(outcome, BaseException):
        return False
    failed = first_error(outcome)
    return failed is not None and outcome[failed].error_field(_SQLSTATE) == _QUERY_CANCELED
