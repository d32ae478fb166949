"""The psycopg 3 implementation of the driver behaviour.

Connections run in autocommit mode: dbpool sends ``BEGIN``/``COMMIT``
itself, so the transaction status the server reports is the only truth.

Prepared statements are named server-side statements (``PREPARE`` /
``EXECUTE`` / ``DEALLOCATE``) written with PostgreSQL's ``$1`` placeholders.
Streams use psycopg's server-side cursors (``DECLARE`` / ``FETCH`` /
``CLOSE``), so only one batch is in memory at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import capabilities, pq, sql
from psycopg.conninfo import conninfo_to_dict

from .driver import (
    Column,
    CopyDirection,
    Disconnect,
    DisconnectAndRetry,
    Error,
    FetchStatus,
    Notification,
    Ok,
    Options,
    Outcome,
    Params,
    Query,
    Result,
    TxOutcome,
    WrongStatus,
)
from .errors import StatementNotAllowed, TransactionStatus
from .pgconnection import PgConnection, read_results, wait_for
from .statement_scope import copy_refused, is_copy

__all__ = ["CANCEL_TIMEOUT", "NETWORK_DEFAULTS", "PgCopy", "PgDriver", "PgState"]

logger = logging.getLogger("dbpool.pgdriver")

#: Option keys that belong to dbpool, never passed on to libpq.
_POOL_KEYS = frozenset({"pool_index", "conninfo", "ping_timeout", "spin"})

#: libpq's network settings unless the DSN or ``connect_kwargs`` set them.  A
#: connect or a statement must not wait for ever on a network that drops
#: packets: the connect gives up after ``connect_timeout`` seconds; an idle
#: connection whose peer vanished is found by TCP keepalives within about
#: 30 s; unacknowledged data is given up on after ``tcp_user_timeout`` ms.
#: (Pool deadlines, pings and revokes do not wait for these: see
#: :meth:`PgDriver.ping` and :meth:`PgDriver.interrupt`.)
#: Seconds a cancel request may take.
CANCEL_TIMEOUT = 5.0
_POLL_OK = pq.PollingStatus.OK
_POLL_FAILED = pq.PollingStatus.FAILED
_POLL_READING = pq.PollingStatus.READING
_BAD = int(pq.ConnStatus.BAD)  # an enum member lookup costs more per checkout

NETWORK_DEFAULTS: Mapping[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

_STATUS: dict[int, TransactionStatus] = {
    pq.TransactionStatus.IDLE: "idle",
    pq.TransactionStatus.INTRANS: "transaction",
    pq.TransactionStatus.INERROR: "error",
}
# Read at every checkin, so answered from libpq's int without allocating.
_OK_STATUS: dict[int, Ok[TransactionStatus]] = {code: Ok(s) for code, s in _STATUS.items()}
_OK_IDLE = _OK_STATUS[pq.TransactionStatus.IDLE]


@dataclass(slots=True, eq=False)
class PgState:
    """One psycopg connection and what the driver remembers about it."""

    conn: PgConnection[Any]
    cursor: psycopg.Cursor[Any]
    #: Names of the prepared statements this connection has.
    prepared: set[str] = field(default_factory=set)
    #: The ZeroMQ front end's prepared statements: (query, types) -> name.
    remote_statements: dict[Any, bytes] = field(default_factory=dict)
    #: How often the front end ran each statement not yet prepared here.
    remote_counts: dict[Any, int] = field(default_factory=dict)
    #: The front end's prepared statements whose plans went stale, to deallocate.
    stale_statements: list[bytes] = field(default_factory=list)
    #: The served pool's schema_epoch when the front end last used this connection.
    remote_epoch: int = 0
    #: The ZeroMQ front end's psycopg Transformer for this connection, and its
    #: statement converter, kept across its loans (making one costs more than a query).
    remote_transformer: Any = None
    remote_converter: Any = None
    #: The statement text run here last, known not to be a COPY: run again in a row,
    #: as a statement often is, it skips the check (which costs a call per statement).
    plain_sql: str | None = None
    #: Seconds a ping may wait for its answer.
    ping_timeout: float = 5.0
    #: Our own descriptor of the connection's socket (see PgDriver.interrupt).
    wake: socket.socket | None = None
    wake_lock: threading.Lock = field(default_factory=threading.Lock)
    #: The relay's connection only: notifications received, not yet taken.
    notifications: deque[psycopg.Notify] | None = None
    _cursor_ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def backend_pid(self) -> int:
        """The server process id serving this connection."""
        return self.conn.info.backend_pid

    def next_cursor_name(self) -> str:
        return f"dbpool_cursor_{next(self._cursor_ids)}"

    def next_statement_name(self) -> bytes:
        """A name for a prepared statement of the front end, unique on this connection."""
        return f"dbpool_remote_{next(self._cursor_ids)}".encode()


@dataclass(slots=True, eq=False)
class PgCopy:
    """A COPY in progress: psycopg's ``cursor.copy()`` block, entered."""

    block: AbstractContextManager[psycopg.Copy]
    copy: psycopg.Copy
    direction: CopyDirection
    #: A COPY TO's data was read to its end.
    done: bool = False


_COPY_STATUS: dict[int, CopyDirection] = {
    pq.ExecStatus.COPY_OUT: "out", pq.ExecStatus.COPY_IN: "in"}


class PgDriver:
    """The driver behaviour on psycopg 3 (see :class:`dbpool.driver.Driver`)."""

    def connect(self, opts: Options) -> PgState:
        conninfo = str(opts.get("conninfo", ""))
        kwargs = {k: v for k, v in opts.items() if k not in _POOL_KEYS}
        try:
            given = conninfo_to_dict(conninfo)
        except psycopg.Error:
            given = {}  # libpq will say what is wrong with it
        if "application_name" not in given:  # a keyword would beat the DSN's own
            kwargs.setdefault("application_name", "dbpool")
        for key, value in NETWORK_DEFAULTS.items():
            if key not in given and key not in kwargs:
                kwargs[key] = value
        conn: PgConnection[Any] = PgConnection.connect(conninfo, autocommit=True, **kwargs)
        conn.spin = float(opts.get("spin", 0.0))
        state = PgState(conn=conn, cursor=conn.cursor(),
                        ping_timeout=float(opts.get("ping_timeout", 5.0)))
        try:
            state.wake = socket.socket(fileno=os.dup(conn.pgconn.socket))
        except OSError:  # not a socket we can wake: interrupt() does nothing
            state.wake = None
        return state

    def disconnect(self, err: BaseException | None, state: PgState) -> None:
        try:
            state.conn.close()
        except Exception:  # closing must never raise into the pool
            logger.debug("error while closing connection", exc_info=True)
        with state.wake_lock:  # the socket closes once our descriptor of it does
            wake, state.wake = state.wake, None
        if wake is not None:
            wake.close()

    def interrupt(self, state: PgState) -> None:
        """Wake, at once, a thread blocked on this connection's socket: shut it down.

        The blocked call fails as with a lost connection, and the connection
        is unusable afterwards.  Safe from any thread.  A deadline revoke uses
        it, so that a holder stuck in a network that dropped its packets
        raises at its deadline rather than whenever TCP gives up.  It acts
        on the driver's own duplicate of the socket's descriptor, under a
        lock shared with :meth:`disconnect`, so it can never reach another
        connection that reused the number.
        """
        with state.wake_lock:
            if state.wake is None:
                return
            try:
                state.wake.shutdown(socket.SHUT_RDWR)
            except OSError:  # already shut or reset
                pass

    def checkout(self, state: PgState) -> Outcome[None]:
        conn = state.conn
        if conn.pgconn.status == _BAD:  # conn.closed, without the cost of its property
            return Disconnect(psycopg.OperationalError("the connection is closed"))
        if conn.rollback_pending:  # its last user did not wait for its ROLLBACK
            try:
                conn.settle(time.monotonic() + state.ping_timeout)
            except psycopg.Error as err:
                return Disconnect(err)
        return _OK_NONE

    def ping(self, state: PgState) -> Outcome[None]:
        """``SELECT 1``, waiting at most ``ping_timeout`` for the answer.

        Driven through libpq directly with a poll, so that a network that
        drops packets makes a ping fail at its deadline, not hang the
        connection's actor.
        """
        conn = state.conn
        pgconn = conn.pgconn
        deadline = time.monotonic() + state.ping_timeout
        try:
            conn.settle(deadline)
            pgconn.send_query(b"SELECT 1")
            results = read_results(pgconn, deadline)
            if results is None:
                return Disconnect(_ping_timeout(state))
            failed = None
            for result in results:
                if result.status != _TUPLES_OK and failed is None:
                    failed = psycopg.errors.error_from_result(result, conn.info.encoding)
        except psycopg.Error as err:
            return Disconnect(err)
        if failed is not None or pgconn.status != pq.ConnStatus.OK:
            return Disconnect(failed or psycopg.OperationalError("the connection is not usable"))
        return _OK_NONE

    def cancel(self, state: PgState) -> None:
        """Ask the server to cancel the statement running on ``state``; wait for the
        answer up to :data:`CANCEL_TIMEOUT`.

        Safe to call from any thread while another thread runs a query.
        """
        self.prepare_cancel(state)()

    def prepare_cancel(self, state: PgState) -> Callable[[], None]:
        """A cancel of the statement running on ``state``, made now without I/O; the
        call it returns sends it (blocking, up to :data:`CANCEL_TIMEOUT`).

        Made while the connection is open, it can be sent after the
        connection has been closed, from any thread.
        """
        pgconn = state.conn.pgconn
        if not capabilities.has_cancel_safe():  # libpq before 17: no timeout to be had
            return pgconn.get_cancel().cancel
        cancel_conn = pgconn.cancel_conn()

        def send() -> None:
            deadline = time.monotonic() + CANCEL_TIMEOUT
            try:
                cancel_conn.start()
                while True:
                    status = cancel_conn.poll()
                    if status == _POLL_OK:
                        return
                    if status == _POLL_FAILED:
                        raise psycopg.OperationalError(
                            f"cancel failed: {cancel_conn.get_error_message()}")
                    event = select.POLLIN if status == _POLL_READING else select.POLLOUT
                    if not wait_for(cancel_conn.socket, event, deadline):
                        raise psycopg.errors.CancellationTimeout(
                            f"no answer to a cancel within {CANCEL_TIMEOUT:g}s")
            finally:
                cancel_conn.finish()

        return send

    # -- the LISTEN/NOTIFY relay's connection ------------------------------

    def listen(self, state: PgState, channel: str) -> Outcome[Result]:
        """``LISTEN channel`` (quoted: any string is a channel name)."""
        return self._relay_statement(state, "LISTEN", channel)

    def unlisten(self, state: PgState, channel: str) -> Outcome[Result]:
        """``UNLISTEN channel``."""
        return self._relay_statement(state, "UNLISTEN", channel)

    def notifications(self, state: PgState, timeout: float,
                      wake: int | None = None) -> Outcome[list[Notification]]:
        """The notifications received, waiting up to ``timeout`` s (or until ``wake``
        is readable) for some if none is waiting.  See :mod:`dbpool.driver`."""
        received = _received(state)
        pgconn = state.conn.pgconn
        try:
            _take_notifies(pgconn)  # libpq may hold some already (a ping read them)
            if not received:
                fds = [pgconn.socket] if wake is None else [pgconn.socket, wake]
                readable, _, _ = select.select(fds, [], [], timeout)
                if pgconn.socket in readable:
                    pgconn.consume_input()
                    _take_notifies(pgconn)
                    if pgconn.status != pq.ConnStatus.OK:
                        raise psycopg.OperationalError("the connection was lost")
        except (psycopg.Error, OSError, ValueError) as err:
            return Disconnect(err)
        got = [Notification(n.channel, n.payload, n.pid) for n in received]
        received.clear()
        return Ok(got)

    def _relay_statement(self, state: PgState, command: str, channel: str) -> Outcome[Result]:
        _received(state)  # from now on, what arrives during statements is kept too
        statement = sql.SQL(command + " {}").format(sql.Identifier(channel))
        return self._run(state, statement.as_string(state.conn))

    # -- transactions ----------------------------------------------------

    def handle_begin(self, opts: Options, state: PgState) -> TxOutcome[Result]:
        status = _status(state)
        if status != "idle":
            return WrongStatus(status)
        return self._run(state, "BEGIN", retry_safe=True)

    def handle_commit(self, opts: Options, state: PgState) -> TxOutcome[Result]:
        status = _status(state)
        if status != "transaction":
            return WrongStatus(status)
        return self._run(state, "COMMIT")

    def handle_rollback(self, opts: Options, state: PgState) -> TxOutcome[Result]:
        status = _status(state)
        if status == "idle":
            return WrongStatus(status)
        return self._run(state, "ROLLBACK")

    def handle_status(self, opts: Options, state: PgState) -> Outcome[TransactionStatus]:
        status = _OK_STATUS.get(state.conn.pgconn.transaction_status)
        if status is None and state.conn.rollback_pending:
            return _OK_IDLE  # as the ROLLBACK will leave it; the next checkout reads its answer
        if status is None:  # UNKNOWN (broken) or ACTIVE (a query still running)
            return Disconnect(psycopg.OperationalError("the connection is not usable"))
        return status

    # -- statements ------------------------------------------------------

    def handle_prepare(self, query: Query, opts: Options, state: PgState) -> Outcome[Query]:
        if query.name is None:
            return Error(ValueError("only a named query can be prepared"))
        try:
            state.cursor.execute(
                sql.SQL("PREPARE {} AS ").format(sql.Identifier(query.name)) + sql.SQL(query.sql)
            )
        except psycopg.Error as err:
            return _failure(state, err)
        state.prepared.add(query.name)
        return Ok(query)

    def handle_execute(
        self, query: Query | str, params: Params, opts: Options, state: PgState
    ) -> Outcome[Result]:
        cur = state.cursor
        text = query if isinstance(query, str) else query.sql
        if text is not state.plain_sql:  # the same text (str is immutable) passed already
            if is_copy(text):
                return Error(copy_refused())  # psycopg would refuse it only once it is running
            state.plain_sql = text
        try:
            if isinstance(query, str):
                cur.execute(query, params)
            elif query.name is None:
                cur.execute(query.sql, params)
            else:
                cur.execute(self._execute_sql(query, params, state))
            if "timed" not in opts:
                return Ok(_result(state))
            return Ok(_timed_result(state))
        except _CALL_ERRORS as err:
            return _failure(state, err)

    def handle_close(self, query: Query, opts: Options, state: PgState) -> Outcome[None]:
        if query.name is None or query.name not in state.prepared:
            return _OK_NONE
        try:
            state.cursor.execute(sql.SQL("DEALLOCATE {}").format(sql.Identifier(query.name)))
        except psycopg.Error as err:
            return _failure(state, err)
        state.prepared.discard(query.name)
        return _OK_NONE

    def _execute_sql(self, query: Query, params: Params, state: PgState) -> sql.Composed:
        """``EXECUTE name(literal, ...)``, preparing first if this connection lacks it.

        The arguments go as literals quoted by psycopg: a utility statement's
        bind parameters would reach the server untyped.
        """
        assert query.name is not None
        if query.name not in state.prepared:
            prepared = self.handle_prepare(query, {}, state)
            if not isinstance(prepared, Ok):
                raise prepared.error
        if isinstance(params, Mapping):
            raise TypeError("a prepared statement takes positional parameters ($1, $2, ...)")
        if not params:  # PostgreSQL rejects "EXECUTE name()"
            return sql.SQL("EXECUTE {}").format(sql.Identifier(query.name))
        args = sql.SQL(", ").join(sql.Literal(p) for p in params)
        return sql.SQL("EXECUTE {}({})").format(sql.Identifier(query.name), args)

    # -- cursors ---------------------------------------------------------

    def handle_declare(
        self, query: Query, params: Params, opts: Options, state: PgState
    ) -> Outcome[psycopg.ServerCursor[Any]]:
        name = state.next_cursor_name()
        # A named (prepared) query is written with PostgreSQL's $n placeholders,
        # which a raw cursor passes through; a server cannot DECLARE over EXECUTE.
        cursor = (state.conn.cursor(name=name) if query.name is None
                  else psycopg.RawServerCursor(state.conn, name))
        try:
            cursor.execute(query.sql, params)
        except _CALL_ERRORS as err:
            cursor.close()
            return _failure(state, err)
        return Ok(cursor)

    def handle_fetch(
        self, query: Query, cursor: Any, opts: Options, state: PgState
    ) -> Outcome[tuple[FetchStatus, Result]]:
        max_rows = int(opts.get("max_rows", 500))
        # FETCH through the plain cursor, as a query: the rows arrive, then
        # are decoded, so a log entry can tell the two times apart.
        fetch = sql.SQL("FETCH FORWARD {} FROM {}").format(
            sql.Literal(max_rows), sql.Identifier(cursor.name))
        cur = state.cursor
        try:
            # Not prepared: the cursor's name is never seen again.
            cur.execute(fetch, prepare=False)
            batch = _result(state) if "timed" not in opts else _timed_result(state)
        except psycopg.Error as err:
            return _failure(state, err)
        status: FetchStatus = "cont" if batch.rowcount == max_rows else "halt"
        return Ok((status, batch))

    def handle_deallocate(
        self, query: Query, cursor: Any, opts: Options, state: PgState
    ) -> Outcome[None]:
        try:
            cursor.close()
        except psycopg.Error as err:
            return _failure(state, err)
        return _OK_NONE

    # -- COPY ------------------------------------------------------------

    def handle_copy(
        self, query: Query, params: Params, direction: CopyDirection, opts: Options,
        state: PgState,
    ) -> Outcome[PgCopy]:
        """Start a COPY through psycopg's ``cursor.copy()`` (parameters are merged
        into the statement on the client, as psycopg does: COPY takes none)."""
        block = state.cursor.copy(query.sql, params)
        try:
            copy = block.__enter__()
        except _CALL_ERRORS as err:
            return _failure(state, err)
        pgresult = state.cursor.pgresult
        actual = _COPY_STATUS.get(pgresult.status) if pgresult is not None else None
        handle = PgCopy(block, copy, direction)
        if actual == direction:
            return Ok(handle)
        other, call = ("FROM STDIN", "copy_to()") if direction == "out" \
            else ("TO STDOUT", "copy_from()")
        error = StatementNotAllowed(
            f"the statement is a COPY {other}, the wrong way round for {call}; it was "
            "stopped", scope="copy")
        ended = self.handle_copy_end(handle, error, opts, state)  # FROM fails; TO is cancelled
        return ended if not isinstance(ended, Ok) else Error(error)

    def handle_copy_read(
        self, copy: PgCopy, opts: Options, state: PgState
    ) -> Outcome[bytes | None]:
        if copy.done:
            return Ok(None)
        try:
            data = copy.copy.read()
        except psycopg.Error as err:
            copy.done = True
            return _failure(state, err)
        if not data:
            copy.done = True
            return Ok(None)
        return Ok(bytes(data))

    def handle_copy_write(
        self, copy: PgCopy, data: bytes, opts: Options, state: PgState
    ) -> Outcome[None]:
        try:
            copy.copy.write(data)
        except _CALL_ERRORS as err:
            return _failure(state, err)
        return _OK_NONE

    def handle_copy_end(
        self, copy: PgCopy, error: BaseException | None, opts: Options, state: PgState
    ) -> Outcome[Result]:
        if error is None and copy.direction == "out" and not copy.done:
            error = StatementNotAllowed("the COPY was closed before the end of its data",
                                        scope="copy")
        try:
            if error is None:
                copy.block.__exit__(None, None, None)
            else:  # FROM: CopyFail with its message; TO: cancel, then read the rest out
                copy.block.__exit__(type(error), error, error.__traceback__)
        except _CALL_ERRORS as err:
            return _failure(state, err)
        cur = state.cursor
        return Ok(Result([], [], cur.rowcount, cur.statusmessage))

    # -- helpers ---------------------------------------------------------

    def _run(self, state: PgState, statement: str, retry_safe: bool = False) -> Outcome[Result]:
        try:
            state.cursor.execute(statement)
        except psycopg.Error as err:
            return _failure(state, err, retry_safe)
        return Ok(_result(state))


_OK_NONE: Ok[None] = Ok(None)


def _received(state: PgState) -> deque[psycopg.Notify]:
    """The notifications ``state``'s connection received and nobody has taken yet.

    Kept through psycopg's notify handler, which it also calls for what
    arrives while a statement runs, so none is lost between statements.
    Only the relay's connection has one: a pooled connection whose user ran
    ``LISTEN`` keeps nothing for nobody.
    """
    if state.notifications is None:
        state.notifications = deque()
        state.conn.add_notify_handler(state.notifications.append)
    return state.notifications


def _take_notifies(pgconn: pq.abc.PGconn) -> None:
    """Hand what libpq has read of notifications to psycopg's notify handler, which
    decodes them for ours (see :func:`_received`)."""
    handler = pgconn.notify_handler
    while (pgn := pgconn.notifies()) is not None:
        if handler is not None:
            handler(pgn)


def _ping_timeout(state: PgState) -> psycopg.OperationalError:
    return psycopg.OperationalError(f"no answer to a ping within {state.ping_timeout:g}s")


def _status(state: PgState) -> TransactionStatus:
    conn = state.conn
    if conn.rollback_pending:  # lent without a checkout (an owner's): settle here
        conn.settle()
    return _STATUS.get(conn.pgconn.transaction_status, "error")


_TUPLES_OK = int(pq.ExecStatus.TUPLES_OK)  # an enum member lookup costs more per query


def _result(state: PgState) -> Result:
    """The result of the statement ``state``'s cursor ran last."""
    cur = state.cursor
    pgresult = cur.pgresult
    if pgresult is None or pgresult.status != _TUPLES_OK:
        return Result([], [], cur.rowcount, cur.statusmessage)
    # state.conn is the cursor's connection, without the cost of its property.
    return _PgResult(pgresult, state.conn, cur.fetchall())


def _timed_result(state: PgState) -> Result:
    """:func:`_result`, with the time psycopg takes to decode the rows."""
    started = time.perf_counter()
    result = _result(state)
    result.decode_time = time.perf_counter() - started
    return result


class _PgResult(Result):
    """A SELECT's Result: columns and command tag read from libpq's result on first use.

    Both read from the result itself, whatever the cursor has run since.
    One is made for every SELECT, so it has no closures, and the two lazy
    slots stay unset (reading one raises AttributeError) until first read.
    """

    __slots__ = ("_conn", "_pgresult")

    def __init__(self, pgresult: pq.abc.PGresult, conn: psycopg.Connection[Any],
                 rows: list[Any]) -> None:
        self._pgresult = pgresult
        self._conn = conn
        self.rows = rows
        self.rowcount = len(rows)
        self.decode_time = None

    @property
    def columns(self) -> list[Column]:
        try:
            return self._columns  # type: ignore[return-value]
        except AttributeError:
            pgresult, encoding = self._pgresult, self._conn.info.encoding
            self._columns = columns = [
                Column((pgresult.fname(i) or b"").decode(encoding), pgresult.ftype(i))
                for i in range(pgresult.nfields)]
            return columns

    def __reduce__(self) -> tuple[Any, ...]:
        # Copied or pickled as a plain Result: libpq's result cannot be.
        return (Result, (self.columns, self.rows, self.rowcount, self.command))

    @property
    def command(self) -> str | None:
        try:
            return self._command  # type: ignore[return-value]
        except AttributeError:
            tag = self._pgresult.command_status
            self._command = command = tag.decode(self._conn.info.encoding) if tag else None
            return command


#: The server ended the session (terminate, shutdown, idle timeout): whatever
#: statement it was given was rolled back with the session, so a call outside
#: a transaction may safely run again on another connection.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P05"})


#: What a statement call returns as a failure rather than raising: psycopg's
#: errors, and the TypeError/ValueError psycopg raises for bad parameters
#: before it sends anything.
_CALL_ERRORS = (psycopg.Error, TypeError, ValueError)


def _failure(
    state: PgState, err: Exception, retry_safe: bool = False
) -> Error | Disconnect | DisconnectAndRetry:
    """A SQL or parameter error keeps the connection; a broken connection does not.

    ``retry_safe``: the statement has no effect unless it completes (BEGIN)."""
    conn = state.conn
    if conn.closed or conn.broken:
        if retry_safe or getattr(err, "sqlstate", None) in _SESSION_ENDED:
            return DisconnectAndRetry(err)
        return Disconnect(err)
    if conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
        return Disconnect(err)  # failed halfway through a statement: state unknown
    return Error(err)


