"""The lent connection: what a caller holds between checkout and checkin.

A :class:`Connection` runs driver callbacks directly on the caller's thread;
nothing goes through an actor.  It is valid only until its loan ends, and a
loan ends exactly once, by whichever comes first:

- the caller checks it in (leaving the ``with`` block);
- its deadline passes: the pool cancels the running statement, gives the
  slot a fresh connection, and the caller's next call raises
  ``ConnectionError(reason="deadline")`` (the old connection is closed then,
  on the caller's own thread, so no two threads ever use it at once);
- it is abandoned: garbage-collected, or its thread ended, while lent.  The
  pool rolls it back and takes it back, and logs where it was checked out.

After that every call raises ``ConnectionError`` rather than touch a
connection that may now be another caller's.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, overload

from dbpool.actors.slot import Slot
from dbpool.driver import (
    Disconnect,
    DisconnectAndRetry,
    Driver,
    Error,
    Ok,
    Options,
    Outcome,
    Params,
    Query,
    Result,
)
from dbpool.errors import ConnectionError, TransactionError, TransactionStatus

from .copy import CopyData, CopyTo, copy_from
from .loans import Loan
from .logentry import LogEntry, LogFn, emit
from .stream import Stream
from .transaction import AsyncTransaction, RollbackSignal, Transaction

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["AsyncConnection", "AsyncStream", "Connection", "LostBeforeEffect"]

T = TypeVar("T")
_NO_OPTS: dict[str, Any] = {}
#: Asks the driver to time decoding (Result.decode_time), for log entries.
_TIMED: dict[str, Any] = {"timed": True}


class LostBeforeEffect(ConnectionError):
    """The connection was lost and the call had no effect (DisconnectAndRetry).

    One-shot calls on the pool catch it and retry on another connection.
    """


class _Tracking:
    """What a checkout tracks once it opens a transaction or logs a call.

    Kept apart so that a plain query, the hot path, never pays for it.
    """

    __slots__ = ("depth", "failed", "times_logged")

    def __init__(self) -> None:
        #: Open transaction() blocks on the connection (0: none).
        self.depth = 0
        #: An inner transaction rolled back: the outermost one must roll back too.
        self.failed = False
        #: The checkout's pool and idle times went with a logged call already.
        self.times_logged = False


class Connection:
    """A connection lent to the current caller.  Not thread-safe: one borrower.

    Every call takes ``log=``: a callable given a :class:`LogEntry` for the
    call (default: the pool's ``log`` option).
    """

    __slots__ = (
        "__weakref__", "_broken", "_core", "_driver", "_driver_state", "_loan", "_slot",
        "_tracked")

    def __init__(self, core: PoolCore, slot: Slot, loan: Loan) -> None:
        self._core = core
        self._slot = slot
        self._loan = loan
        self._driver: Driver[Any] = slot.driver
        self._driver_state = slot.driver_state
        self._tracked: _Tracking | None = None
        #: Why the connection must be replaced at checkin, once it must.  Kept
        #: here, not on the slot, until this loan's own checkin: after a revoke
        #: the slot serves a new connection, which a late mark must not reach.
        self._broken: BaseException | None = None

    # -- statements ------------------------------------------------------

    def query(self, sql: str, params: Params = None, *, log: LogFn | None = None) -> Result:
        """Run one statement and return its :class:`~dbpool.driver.Result`.

        A SQL error raises the ``psycopg.errors`` class the server reported
        and leaves the connection usable: idle outside a transaction, status
        ``"error"`` inside one.
        """
        if log is None and self._core.log is None:  # the hot path: nothing to time
            # _state(), inlined for a loan in force, not broken, with no transaction
            # tracked; anything else goes through it, to raise or check.
            if self._loan.claim and self._broken is None and self._tracked is None:
                state = self._driver_state
            else:
                state = self._state()
            try:  # _callback(), inlined
                outcome = self._driver.handle_execute(sql, params, _NO_OPTS, state)
            except BaseException as error:
                self._raised(error)
            if type(outcome) is Ok:  # the common case, without a call to _unwrap
                return outcome.value
            return self._unwrap(outcome)
        driver = self._driver
        return self._call("query", sql, params, log, lambda opts, state: driver.handle_execute(
            sql, params, opts, state))

    def prepare(self, name: str, sql: str, *, log: LogFn | None = None) -> Query:
        """Prepare ``sql`` on the server as statement ``name``; return the :class:`Query`.

        A prepared statement uses PostgreSQL's placeholders (``$1``, ``$2``).
        """
        driver = self._driver
        query = Query(sql, name)
        return self._call("prepare", query, None, log,
                          lambda opts, state: driver.handle_prepare(query, opts, state))

    def execute(self, query: Query, params: Params = None, *, log: LogFn | None = None) -> Result:
        """Execute a prepared (or any) :class:`Query`.

        A named query this connection does not have (it was prepared on
        another connection, or before a reconnect) is prepared first.
        """
        driver = self._driver
        return self._call("execute", query, params, log,
                          lambda opts, state: driver.handle_execute(query, params, opts, state))

    def prepare_execute(
        self, name: str, sql: str, params: Params = None, *, log: LogFn | None = None
    ) -> tuple[Query, Result]:
        """Prepare then execute, in one call: ``(query, result)``."""
        driver = self._driver
        query = Query(sql, name)

        def both(opts: Options, state: Any) -> Outcome[tuple[Query, Result]]:
            prepared = driver.handle_prepare(query, opts, state)
            if not isinstance(prepared, Ok):
                return prepared
            executed = driver.handle_execute(prepared.value, params, opts, state)
            if not isinstance(executed, Ok):
                return executed
            return Ok((prepared.value, executed.value))

        return self._call("prepare_execute", query, params, log, both)

    def close_prepared(self, query: Query, *, log: LogFn | None = None) -> None:
        """Release a prepared statement on the server (a no-op if it has none).

        The one call still allowed while a failed transaction rolls back.
        """
        driver = self._driver
        self._call("close", query, None, log,
                   lambda opts, state: driver.handle_close(query, opts, state),
                   while_failed=True)

    def stream(
        self, sql: str | Query, params: Params = None, *, max_rows: int = 500,
        log: LogFn | None = None,
    ) -> Stream:
        """Iterate over the result in batches of at most ``max_rows`` rows.

        Runs inside a transaction (a server-side cursor lives in one).  Each
        item is a :class:`~dbpool.driver.Result`; the cursor is closed when
        the iteration ends, stops early or raises.
        """
        query = sql if isinstance(sql, Query) else Query(sql)
        return Stream(self, query, params, max_rows, log)

    def copy_to(self, sql: str | Query, params: Params = None, *,
                log: LogFn | None = None) -> CopyTo:
        """The data of a ``COPY ... TO STDOUT``, as an iterable of ``bytes`` blocks.

        Bounded memory; leaving it early cancels the COPY.  See
        :mod:`dbpool.pool.copy`.
        """
        return CopyTo(self, sql, params, log)

    def copy_from(self, sql: str | Query, data: CopyData, params: Params = None, *,
                  log: LogFn | None = None) -> Result:
        """Run a ``COPY ... FROM STDIN`` with ``data`` (bytes or str, an iterable of
        them, or a file object); return its result (``rowcount``: rows taken).

        Bounded memory; data that raises aborts the COPY.  See
        :mod:`dbpool.pool.copy`.
        """
        return copy_from(self, sql, data, params, log)

    # -- status, run and transactions ---------------------------------------

    def status(self) -> TransactionStatus:
        """``"idle"``, ``"transaction"``, or ``"error"``: a failed transaction, or, as
        in DBConnection, a connection found lost (it is then replaced at checkin).
        """
        loan = self._loan
        if not loan.claim and loan.revoked is not None:  # its deadline took it
            self._close_revoked(loan.revoked)
            return "error"
        if self._broken is not None:
            return "error"
        outcome = self._callback(self._driver.handle_status, _NO_OPTS,
                                 self._state(while_failed=True))
        if isinstance(outcome, Ok):
            return outcome.value
        try:
            self._unwrap(outcome)
        except LostBeforeEffect:
            raise  # a one-shot pool.status() retries on another connection
        except Exception:
            pass  # logged by nobody: DBConnection does not log status calls either
        return "error"

    def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn(self)``: on a connection already held, run is a pass-through.

        :meth:`Pool.run` is the one that checks the transaction status.
        """
        return fn(self)

    @overload
    def transaction(self, fn: None = None, *, log: LogFn | None = None) -> Transaction:
        ...

    @overload
    def transaction(self, fn: Callable[[Connection], T], *, log: LogFn | None = None) -> T:
        ...

    def transaction(
        self, fn: Callable[[Connection], T] | None = None, *, log: LogFn | None = None
    ) -> Transaction | T:
        """Run ``fn(self)`` in a transaction, or with no ``fn``, return a context manager.

        See :class:`~dbpool.pool.transaction.Transaction` for commit, rollback
        and nesting.
        """
        tx = Transaction(self, log)
        if fn is None:
            return tx
        with tx:
            return fn(self)

    def rollback(self, reason: object = "rollback") -> NoReturn:
        """Roll back the innermost transaction, which then raises ``RolledBack(reason)``.

        Raises :class:`~dbpool.errors.TransactionError` outside a transaction.
        """
        if not self.in_transaction:
            raise TransactionError("not inside transaction: rollback() needs an open "
                                   "transaction() block", status=self.status())
        raise RollbackSignal(reason)

    @property
    def in_transaction(self) -> bool:
        """Whether a ``transaction()`` block of this connection is open."""
        tracked = self._tracked
        return tracked is not None and tracked.depth > 0

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL server process serving this connection."""
        pid: int | None = getattr(self._state(), "backend_pid", None)
        return pid

    @property
    def index(self) -> int:
        """The connection's position in its pool."""
        return self._slot.index

    @property
    def driver_state(self) -> Any:
        """The driver's state of this connection (the psycopg driver's is a
        :class:`~dbpool.pgdriver.PgState`), for a holder that drives the
        connection itself (see :mod:`dbpool.pool.lender`); None once the loan
        has ended.  A connection whose state was taken and that is then abandoned
        (its thread ends, it is dropped unreturned) is replaced, not reused: what
        its holder changed in it is unknown."""
        self._loan.exposed = True
        return self._driver_state

    def set_deadline(self, seconds: float | None) -> None:
        """Move this checkout's deadline to ``seconds`` from now, or lift it (None).

        For a holder whose use has no end known at checkout, such as a DB-API
        connection or an ORM session held until it is closed: its wait was
        bounded by the checkout's timeout, its use is bounded here.  Without a
        deadline the connection stays lent until it is checked in, or until the
        thread that checked it out ends (then it is reclaimed).
        """
        loan = self._loan
        loan.deadline = float("inf") if seconds is None else time.monotonic() + seconds
        self._core.watcher.watch(loan)  # an earlier deadline must wake the watcher

    def mark_broken(self, error: BaseException) -> None:
        """Have the pool replace this connection when it is checked in, for ``error``.

        For a holder that drives the connection itself (``dbpool serve``'s
        front end) and finds it unusable, or carrying session state that the
        next borrower must not see.  The first reason given is kept; calls
        after this one raise ``ConnectionError``.
        """
        if self._broken is None:
            self._broken = error

    # -- internals -------------------------------------------------------

    def _state(self, while_failed: bool = False) -> Any:
        if not self._loan.claim:
            self._raise_ended()
        if self._broken is not None:
            raise ConnectionError(
                "connection is closed because of an error, disconnect or timeout")
        tracked = self._tracked
        if tracked is not None and tracked.failed and not while_failed:
            # As DBConnection does: the call fails and the connection is dropped,
            # so the outermost transaction ends without a ROLLBACK to send.
            error = ConnectionError("transaction rolling back: an inner transaction rolled "
                                    "back, so the outer one can only roll back too")
            self._broken = error
            raise error
        return self._driver_state

    def _call(
        self, call: str, query: Any, params: Params, log: LogFn | None,
        fn: Callable[[Options, Any], Outcome[T]], while_failed: bool = False,
    ) -> T:
        """Run one driver callback; time it and log it if a log callable is set.

        A call refused because the connection is closed or outdated is
        logged with its error too, as DBConnection does.
        """
        log = log or self._core.log
        if log is None:
            return self._unwrap(self._callback(fn, _NO_OPTS, self._state(while_failed)))
        started = time.perf_counter()
        try:
            value = self._unwrap(self._callback(fn, _TIMED, self._state(while_failed)))
        except BaseException as error:
            self._log_entry(log, call, query, params, None, error, time.perf_counter() - started)
            raise
        self._log_entry(log, call, query, params, value, None, time.perf_counter() - started)
        return value

    def _callback(
        self, fn: Callable[[Options, Any], Outcome[T]], opts: Options, state: Any
    ) -> Outcome[T]:
        try:
            return fn(opts, state)
        except BaseException as error:
            self._raised(error)

    def _raised(self, error: BaseException) -> NoReturn:
        """A driver callback raised (a bug, or an interrupt): the connection's state is
        unknown, so it is dropped and replaced, as DBConnection does.  The error goes on.
        """
        loan = self._loan
        if not loan.claim:  # revoked while the call ran: the slot serves others now
            if loan.revoked is not None:
                self._close_revoked(loan.revoked)
        elif self._broken is None:
            self._broken = error
        raise error

    def _log_entry(
        self, log: LogFn, call: str, query: Any, params: Params, result: Any,
        error: BaseException | None, elapsed: float,
    ) -> None:
        decode = getattr(result, "decode_time", None)
        if isinstance(result, tuple):  # (query, result) or a fetch's (status, batch)
            decode = getattr(result[-1], "decode_time", None)
        pool_time = idle_time = None
        tracked = self._tracking()
        if not tracked.times_logged:  # the checkout's times go with its first logged call
            tracked.times_logged = True
            slot, loan = self._slot, self._loan
            if slot.lent_at is not None:
                pool_time = max(slot.lent_at - loan.started, 0.0)
                idle_time = max(slot.lent_at - slot.idle_since, 0.0) if slot.idle_since else None
        emit(log, LogEntry(call, query, params, result, error, pool_time,
                           elapsed - (decode or 0.0), decode, idle_time))

    def _tracking(self) -> _Tracking:
        tracked = self._tracked
        if tracked is None:
            tracked = self._tracked = _Tracking()
        return tracked

    def _check_status_unchanged(self, before: TransactionStatus) -> None:
        """Pool.run's check: drop the connection if its status changed since ``before``.

        A failed transaction (status ``"error"``) is let through: checkin
        rolls it back.
        """
        after = self._status_or_error()
        if after != "error" and after != before:
            error = ConnectionError(f"connection was checked out with status {before!r} but "
                                    f"it was checked in with status {after!r}")
            self._broken = error
            raise error

    def _status_or_error(self) -> TransactionStatus:
        try:
            return self.status()
        except ConnectionError:
            return "error"

    def _raise_ended(self) -> NoReturn:
        revoked = self._loan.revoked
        if revoked is not None:
            self._close_revoked(revoked)
            raise revoked
        raise ConnectionError(
            "outdated connection: its checkout has ended, so it may now serve another caller")

    def _unwrap(self, outcome: Outcome[T]) -> T:
        # A call that completed is its answer, even if its deadline passed meanwhile
        # (as in DBConnection): a revoke wakes a holder blocked on the network,
        # whose call then fails, so a late success is a true one.
        if isinstance(outcome, Ok):
            return outcome.value
        if not self._loan.claim:  # revoked while the call ran (its deadline passed)
            self._raise_ended()
        if isinstance(outcome, Error):
            raise outcome.error
        if isinstance(outcome, (Disconnect, DisconnectAndRetry)):
            self._lose(outcome.error, retry_safe=isinstance(outcome, DisconnectAndRetry))
        # A driver bug: whatever state the connection is in, it cannot be trusted.
        error = ConnectionError(f"bad return value: {outcome!r}")
        self._broken = error
        raise error

    def _lose(self, error: BaseException, retry_safe: bool = False) -> NoReturn:
        """The driver says the connection is gone: mark it for reconnect and raise."""
        self._broken = error
        message = f"connection lost: {' '.join(str(error).split())}"
        raise (LostBeforeEffect if retry_safe else ConnectionError)(message) from error

    def _surrender(self) -> Slot | None:
        """End the loan from the holder's side (the checkin calls this, once): the
        slot, or None if the watcher took it already.  Decides nothing: the
        checkin cleans and places the slot."""
        loan = self._loan
        try:
            loan.claim.pop()  # loan.take(), inlined: the hot path
        except IndexError:
            if loan.revoked is not None:
                self._close_revoked(loan.revoked)
            return None
        self._driver_state = None  # ours no longer; nothing below may close it
        slot = self._slot
        if self._broken is not None and slot.broken is None:
            slot.broken = self._broken
        return slot

    def _needs_cleaning(self) -> bool:
        """Whether checkin will have to roll back (which is I/O)."""
        if not self._loan.claim or self._broken is not None:
            return False
        status = self._driver.handle_status(_NO_OPTS, self._driver_state)
        return not (isinstance(status, Ok) and status.value == "idle")

    def _close_revoked(self, error: BaseException) -> None:
        """Close the connection the deadline took from us, on this (its owner's) thread."""
        state, self._driver_state = self._driver_state, None
        if state is not None:
            self._driver.disconnect(error, state)

    def __del__(self) -> None:
        # Garbage-collected while lent: hand it back through the pool's watcher
        # (no I/O and no locks here: this may run in the middle of any code).
        loan = self._loan
        if loan.claim and loan.take():
            self._core.watcher.abandoned(loan, "it was garbage-collected while checked out")

    def __repr__(self) -> str:
        state = "lent" if self._loan.claim else "ended"
        return f"<dbpool Connection {self._core.name}#{self._slot.index} {state}>"


class AsyncConnection:
    """A lent connection for asyncio code: every call runs on a worker thread.

    The calls of one connection run one at a time, in order (tasks sharing
    it take turns), so the event loop is never blocked by the database and
    two threads never use the connection at once.
    """

    __slots__ = ("__weakref__", "_conn", "_lock", "_pending")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pending: asyncio.Future[Any] | None = None
        self._lock: asyncio.Lock | None = None

    async def query(self, sql: str, params: Params = None, *, log: LogFn | None = None) -> Result:
        """See :meth:`Connection.query`."""
        return await self._in_thread(functools.partial(self._conn.query, log=log), sql, params)

    async def prepare(self, name: str, sql: str, *, log: LogFn | None = None) -> Query:
        """See :meth:`Connection.prepare`."""
        return await self._in_thread(functools.partial(self._conn.prepare, log=log), name, sql)

    async def execute(
        self, query: Query, params: Params = None, *, log: LogFn | None = None
    ) -> Result:
        """See :meth:`Connection.execute`."""
        return await self._in_thread(functools.partial(self._conn.execute, log=log),
                                     query, params)

    async def prepare_execute(
        self, name: str, sql: str, params: Params = None, *, log: LogFn | None = None
    ) -> tuple[Query, Result]:
        """See :meth:`Connection.prepare_execute`."""
        return await self._in_thread(functools.partial(self._conn.prepare_execute, log=log),
                                     name, sql, params)

    async def close_prepared(self, query: Query, *, log: LogFn | None = None) -> None:
        """See :meth:`Connection.close_prepared`."""
        await self._in_thread(functools.partial(self._conn.close_prepared, log=log), query)

    async def copy_from(self, sql: str | Query, data: CopyData, params: Params = None, *,
                        log: LogFn | None = None) -> Result:
        """See :meth:`Connection.copy_from` (the data is read on a worker thread)."""
        return await self._in_thread(functools.partial(self._conn.copy_from, log=log),
                                     sql, data, params)

    async def copy_to(self, sql: str | Query, params: Params = None, *,
                      log: LogFn | None = None) -> AsyncIterator[bytes]:
        """See :meth:`Connection.copy_to`: ``async for block in conn.copy_to(...)``."""
        copy = self._conn.copy_to(sql, params, log=log)
        blocks = iter(copy)
        try:
            while True:
                block = await self._in_thread(next, blocks, None)
                if block is None:
                    return
                yield block
        finally:
            await self._in_thread(copy.close)

    async def status(self) -> TransactionStatus:
        """See :meth:`Connection.status`."""
        return await self._in_thread(self._conn.status)

    async def run(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``await fn(self)``: on a connection already held, run is a pass-through."""
        return await fn(self)

    @overload
    def transaction(self, fn: None = None, *, log: LogFn | None = None) -> AsyncTransaction:
        ...

    @overload
    def transaction(self, fn: Callable[[AsyncConnection], Awaitable[T]], *,
                    log: LogFn | None = None) -> Awaitable[T]:
        ...

    def transaction(
        self, fn: Callable[[AsyncConnection], Awaitable[T]] | None = None, *,
        log: LogFn | None = None,
    ) -> AsyncTransaction | Awaitable[T]:
        """``async with conn.transaction():``, or ``await conn.transaction(fn)``.

        The same rules as :meth:`Connection.transaction`.
        """
        tx = AsyncTransaction(self, log)
        return tx if fn is None else tx.run(fn)

    def rollback(self, reason: object = "rollback") -> NoReturn:
        """See :meth:`Connection.rollback` (no I/O: it unwinds to the transaction)."""
        self._conn.rollback(reason)

    def stream(
        self, sql: str | Query, params: Params = None, *, max_rows: int = 500,
        log: LogFn | None = None,
    ) -> AsyncStream:
        """See :meth:`Connection.stream`: an async iterator of batches, and an async
        context manager that closes it (``async with conn.stream(...) as batches:``).
        """
        return AsyncStream(self._stream(self._conn.stream(sql, params, max_rows=max_rows,
                                                          log=log)))

    async def _stream(self, stream: Stream) -> AsyncGenerator[Result, None]:
        batches = iter(stream)
        try:
            while True:
                batch = await self._in_thread(next, batches, None)
                if batch is None:
                    return
                yield batch
        finally:
            await self._in_thread(stream.close)

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    @property
    def backend_pid(self) -> int | None:
        return self._conn.backend_pid

    @property
    def index(self) -> int:
        return self._conn.index

    def set_deadline(self, seconds: float | None) -> None:
        """See :meth:`Connection.set_deadline`."""
        self._conn.set_deadline(seconds)

    @property
    def sync(self) -> Connection:
        """The underlying :class:`Connection` (blocking calls; use in a thread)."""
        return self._conn

    async def _astatus_or_error(self) -> TransactionStatus:
        return await self._in_thread(self._conn._status_or_error)

    async def _acheck_status_unchanged(self, before: TransactionStatus) -> None:
        await self._in_thread(self._conn._check_status_unchanged, before)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            # A call abandoned by a cancelled task may still run on its thread:
            # it ends first, so that two threads never share the connection.
            await self.settle()
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(None, functools.partial(fn, *args))
            self._pending = future
            # Shielded: if the task is cancelled, the call still finishes before
            # the next one or checkin (see settle).
            return await asyncio.shield(future)

    async def settle(self) -> None:
        """Wait for a call abandoned by a cancelled task to finish (before a checkin)."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            await asyncio.wait([pending])

    def __repr__(self) -> str:
        return f"<dbpool AsyncConnection {self._conn!r}>"


class AsyncStream:
    """:class:`~dbpool.pool.stream.Stream` for asyncio: ``async for``, and ``async with``
    to close the cursor as soon as the block is left."""

    __slots__ = ("_batches",)

    def __init__(self, batches: AsyncGenerator[Result, None]) -> None:
        self._batches = batches

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Result:
        return await self._batches.__anext__()

    async def aclose(self) -> None:
        """Stop the stream and close its cursor (also done when the iteration ends)."""
        await self._batches.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
