# Generated from pool/_async/calls.py by .ci/generate_sync.py (the unasync
# package's rewrite of async code as sync code): do not edit; edit the
# source and run `python .ci/generate_sync.py`.  CI fails when this file is stale.
"""The pool's calls: what :class:`~dbpool.pool.pool.Pool` does with a connection.

Every call checks out a connection for itself, runs on it and checks it in,
unless the caller already holds one through ``run()`` or ``transaction()``:
then it runs on that one.  A call that lost its connection with no effect
(the server had closed it) runs again on another, up to the pool's
``checkout_retries`` (DBConnection's ``disconnect_and_retry``).

The asyncio calls (``aquery``, ``acheckout``, ...) are :class:`AsyncPoolCalls`;
the sync ones (``query``, ``checkout``, ...) are its generated twin
``PoolCalls``.  With asyncio, waiting for a connection never blocks the
event loop, and each call on the connection runs on a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from sys import _getframe
from typing import TYPE_CHECKING, Any, TypeVar, overload

from dbpool.driver import Params, Query, Result
from dbpool.errors import ConnectionError, TransactionStatus

from ..connection import Connection, LostBeforeEffect
from ..copy import CopyData
from ..loans import Location, caller_location
from ..logentry import LogFn
from ..options import checkout_options
from ..replicas import ReadOnly, ReplicaSet, lost_connection
from .checkout import Checkout, PoolTransaction

if TYPE_CHECKING:
    from ..core import PoolCore
    from ..ownership.owners import Owner
    from ..pool import Pool

__all__ = ["PoolCalls"]

logger = logging.getLogger("dbpool.pool")
T = TypeVar("T")


class PoolCalls:
    """The calls of :class:`~dbpool.pool.pool.Pool` (see the module docstring)."""

    _core: PoolCore
    _default_timeout: float
    _default_queue: bool
    #: Whether a plain checkout holds its connection for the caller's other calls.
    _holds_checkouts: bool
    #: The read replicas (see dbpool.pool.replicas), or None.
    _replicas: ReplicaSet | None

    def _reader(self, readonly: ReadOnly) -> Pool | None:
        """The replica for a read-only call, or None: the primary serves it.

        ``readonly="replica"`` with no replica to serve raises
        ``ConnectionError(reason="unavailable")``.
        """
        replica = self._replicas.choose() if self._replicas is not None else None
        if replica is None and readonly == "replica":
            raise ConnectionError(f"{self._core.name}: no replica can serve a "
                                  "readonly='replica' call", reason="unavailable")
        return replica

    def _read_failed(self, replica: Pool, readonly: ReadOnly, error: BaseException) -> None:
        """A read failed on ``replica``: re-raise unless it may run on the primary."""
        if readonly == "replica" or not lost_connection(error) or self._replicas is None:
            raise error
        self._replicas.failed(replica, error)

    def checkout(
        self, timeout: float | None = None, queue: bool | None = None, *,
        caller: Owner | None = None, readonly: ReadOnly = False,
    ) -> Checkout:
        """Lend one connection to this caller: ``with pool.checkout() as conn: ...``
        (``async with pool.acheckout() as conn: ...``).

        ``timeout`` (the pool's ``timeout`` option by default) is a deadline
        counted from now: it covers the wait for a connection and its use.
        Waiting past it raises ``ConnectionError(reason="queue_timeout")``;
        holding past it gets the running statement cancelled, the connection
        replaced, and ``ConnectionError(reason="deadline")`` from the next
        call.  ``queue=False`` fails at once if no connection is idle.
        ``caller`` is for the ownership pool: use that owner's connection.
        An ownership pool's checkout holds its connection for the caller's
        other calls, which could only wait for it otherwise.
        ``readonly=True`` lends a replica's connection if one can serve (see
        :mod:`dbpool.pool.replicas`); ``"replica"``, only a replica's.
        """
        if readonly:
            replica = self._reader(readonly)
            if replica is not None:
                return replica.checkout(timeout, queue)
        return Checkout(self._core, timeout, queue, caller=caller,
                             hold=self._holds_checkouts)

    def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None,
        queue: bool | None = None, log: LogFn | None = None, caller: Owner | None = None,
        readonly: ReadOnly = False,
    ) -> Result:
        """Run one statement on a connection checked out for it; return its Result.

        Inside ``run()`` or ``transaction()`` it runs on that connection
        instead (a plain ``checkout()`` does not lend its connection to pool
        calls: use the connection it gives).  If the connection turns out to
        have been closed by the server and the statement had no effect (the
        session was terminated, or timed out while idle), it runs again on
        another connection, up to the ``checkout_retries`` option.

        ``readonly=True`` runs it on a replica if one can serve, else on the
        primary; ``"replica"`` only on a replica (see :mod:`dbpool.pool.replicas`).
        """
        core = self._core
        if core.held.get() is not None:  # a run or transaction may be open here
            held = core.held_conn()
            if held is not None:
                return held.query(sql, params, log=log)
        if readonly:
            replica = self._reader(readonly)
            if replica is not None:
                try:
                    return replica.query(sql, params, timeout=timeout, queue=queue,
                                                log=log)
                except Exception as error:
                    self._read_failed(replica, readonly, error)
        frame = _getframe(1)  # caller_location(), inlined: the hot path
        conn = core.lend(self._default_timeout if timeout is None else timeout,
                                self._default_queue if queue is None else queue,
                                (frame.f_code, frame.f_lasti), caller)
        try:
            return conn.query(sql, params, log=log)
        except LostBeforeEffect:
            if core.options.checkout_retries <= 0:
                raise
        finally:
            core.checkin.take_back(conn)
        return self._one_shot(lambda c: c.query(sql, params, log=log), timeout, queue,
                                     caller_location(), retries=core.options.checkout_retries - 1,
                                     caller=caller)

    def prepare(self, name: str, sql: str, **opts: Any) -> Query:
        """Prepare a statement on one connection (see :meth:`Connection.prepare`).

        The returned :class:`Query` works with :meth:`execute` on any
        connection of the pool: one that lacks it prepares it first.
        """
        log = opts.pop("log", None)
        return self._one_shot(lambda c: c.prepare(name, sql, log=log),
                                     **checkout_options(opts))

    def execute(self, query: Query, params: Params = None, **opts: Any) -> Result:
        """Execute a prepared :class:`Query` (see :meth:`Connection.execute`)."""
        log = opts.pop("log", None)
        return self._one_shot(lambda c: c.execute(query, params, log=log),
                                     **checkout_options(opts))

    def prepare_execute(
        self, name: str, sql: str, params: Params = None, **opts: Any
    ) -> tuple[Query, Result]:
        """Prepare and execute in one checkout (see :meth:`Connection.prepare_execute`)."""
        log = opts.pop("log", None)
        return self._one_shot(lambda c: c.prepare_execute(name, sql, params, log=log),
                                     **checkout_options(opts))

    def close_prepared(self, query: Query, **opts: Any) -> None:
        """Release a prepared statement on one connection (see
        :meth:`Connection.close_prepared`)."""
        log = opts.pop("log", None)
        self._one_shot(lambda c: c.close_prepared(query, log=log),
                              **checkout_options(opts))

    def status(self, **opts: Any) -> TransactionStatus:
        """The transaction status of this caller's connection, or of a checked-out one.

        As in DBConnection it does not raise for connection trouble: a
        connection found lost, or none to be had, is ``"error"``.
        """
        options = checkout_options(opts)
        try:
            return self._one_shot(lambda c: c.status(), **options)
        except ConnectionError:
            return "error"

    def copy_from(self, sql: str | Query, data: CopyData, params: Params = None,
                         **opts: Any) -> Result:
        """Run a ``COPY ... FROM STDIN`` on one connection (see
        :meth:`Connection.copy_from`); ``rowcount`` is the rows it took."""
        log = opts.pop("log", None)
        return self._one_shot(lambda c: c.copy_from(sql, data, params, log=log),
                                     **checkout_options(opts))

    def run(self, fn: Callable[[Connection], T], **opts: Any) -> T:
        """Call ``fn(conn)`` on one checked-out connection and return its result.

        Calls on the pool from ``fn``'s thread or task use that connection.
        The transaction status is read before and after: if ``fn`` changed it
        (left a transaction open, or ended one it did not start), the
        connection is dropped rather than trusted and ``ConnectionError`` is
        raised; if ``fn`` raises, its exception goes on unchecked.  Inside
        another run or a transaction it is ``fn(conn)`` on that connection.
        Runs are not logged.
        """
        held = self._core.held_conn()
        if held is not None:
            return held.run(fn)
        with Checkout(self._core, where=caller_location(), hold=True,
                                 **checkout_options(opts)) as conn:
            before = conn._status_or_error()
            result = fn(conn)
            conn._check_status_unchanged(before)
            return result

    @overload
    def transaction(self, fn: None = None, **opts: Any) -> PoolTransaction:
        ...

    @overload
    def transaction(
        self, fn: Callable[[Connection], T], **opts: Any
    ) -> T:
        ...

    def transaction(
        self, fn: Callable[[Connection], T] | None = None, **opts: Any
    ) -> PoolTransaction | T:
        """Run ``fn(conn)`` in a transaction and return its result; or, with no ``fn``,
        return a context manager: ``with pool.transaction() as conn: ...``
        (``await pool.atransaction(fn)``, ``async with pool.atransaction() as conn:``).

        Commits on success; rolls back and re-raises on an exception;
        ``conn.rollback(reason)`` makes it raise
        :class:`~dbpool.errors.RolledBack`.  Inside another transaction (or
        run or checkout) of this caller it is a pass-through on that
        connection; see :mod:`dbpool.pool.transaction` for the nesting rules.
        A ``BEGIN`` that finds the connection closed by the server is retried
        on another connection, up to ``checkout_retries``.
        ``readonly=True`` runs it on a replica if one can serve, else on the
        primary; ``"replica"`` only on a replica (see :mod:`dbpool.pool.replicas`).
        """
        log = opts.pop("log", None)
        readonly: ReadOnly = opts.pop("readonly", False)
        if readonly and self._core.held_conn() is None:  # not inside a transaction here
            replica = self._reader(readonly)
            if replica is not None:
                return replica.transaction(fn, log=log, **opts)
        tx = PoolTransaction(self._core, log, caller_location(), **checkout_options(opts))
        if fn is None:
            return tx
        return tx.run(fn)

    def stream(
        self, sql: str | Query, params: Params = None, *, max_rows: int = 500, **opts: Any
    ) -> Iterator[Result]:
        """Stream a result in batches (see :meth:`Connection.stream`).

        Outside a transaction it opens one for the stream's life, on a
        connection checked out when iteration starts.
        """
        log = opts.pop("log", None)
        # Made here, not in the generator, so that a deadline names the caller's line.
        tx = PoolTransaction(self._core, log, caller_location(), **checkout_options(opts))
        return _stream_in(tx, sql, params, max_rows, log)

    def _one_shot(
        self, call: Callable[[Connection], T], timeout: float | None,
        queue: bool | None, where: Location | None = None, retries: int | None = None,
        caller: Owner | None = None,
    ) -> T:
        """``call(conn)`` on this caller's connection, or on one checked out for it.

        A call that lost its connection with no effect is retried on another
        (DBConnection's ``disconnect_and_retry``).
        """
        core = self._core
        held = core.held_conn()
        if held is not None:
            return call(held)
        timeout = self._default_timeout if timeout is None else timeout
        queue = self._default_queue if queue is None else queue
        where = where or caller_location(3)
        retries = core.options.checkout_retries if retries is None else retries
        while True:
            conn = core.lend(timeout, queue, where, caller)
            try:
                return call(conn)
            except LostBeforeEffect:
                if retries <= 0:
                    raise
                retries -= 1
                logger.info("%s: connection %d was closed by the server; retrying the call "
                            "on another connection", core.name, conn.index)
            finally:
                core.checkin.take_back(conn)


def _stream_in(
    tx: PoolTransaction, sql: str | Query, params: Params, max_rows: int,
    log: LogFn | None,
) -> Iterator[Result]:
    with tx as conn, conn.stream(sql, params, max_rows=max_rows, log=log) as batches:
        for batch in batches:
            yield batch
