"""The in-process entry point: :class:`Pool`.

::

    from dbpool.pool import Pool

    pool = Pool.start("host=127.0.0.1 user=postgres", pool_size=4)
    pool.query("SELECT 1").rows           # a checkout around one statement
    with pool.checkout() as conn:         # one connection, lent to this thread
        conn.query("SELECT pg_backend_pid()")
    pool.stop()

    async with pool.acheckout() as conn:  # asyncio: the loop never blocks
        await conn.query("SELECT 1")

``Pool.start`` returns at once; connections open in the background and
callers queue until one is ready.  ``pool.ref`` is the pool actor's pykka
ActorRef.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from sys import _getframe
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, Unpack, overload

import pykka

from dbpool.actors.connection import ConnectionConfig
from dbpool.actors.slot import Slot
from dbpool.driver import Driver, Params, Query, Result
from dbpool.errors import ConnectionError, PoolStoppedError, TransactionStatus
from dbpool.pgdriver import PgDriver

from .connection import AsyncConnection, AsyncTransaction, Connection, LostBeforeEffect
from .copy import CopyData
from .core import AsyncHold, Monitor, PoolCore
from .lender import Lender
from .loans import Loan, Location, caller_location
from .logentry import LogFn
from .options import PoolOptions, PoolStartOptions
from .ownership.core import OwnershipCore
from .ownership.owners import Owner
from .pool_actor import Availability, PoolActor
from .transaction import Transaction

__all__ = ["AsyncCheckout", "AsyncPoolTransaction", "Checkout", "Pool", "PoolTransaction"]

if TYPE_CHECKING:
    from .ownership.pool import OwnershipPool

logger = logging.getLogger("dbpool.pool")
T = TypeVar("T")
CheckoutT = TypeVar("CheckoutT")
TransactionT = TypeVar("TransactionT")


class Pool:
    """A handle on a running pool.  Thread-safe; share one per process.

    ``Pool.start(..., pool="ownership")`` returns an
    :class:`~dbpool.pool.ownership.pool.OwnershipPool`, this class with the
    ownership calls.
    """

    #: Whether a plain checkout holds its connection for the thread's other calls.
    _holds_checkouts = False

    def __init__(self, core: PoolCore, ref: pykka.ActorRef[Any]) -> None:
        self._core = core
        self._default_timeout = core.options.timeout
        self._default_queue = core.options.queue
        #: The pool actor's ActorRef.
        self.ref = ref

    @overload
    @classmethod
    def start(cls, conninfo: str | None = None, *, driver: Driver[Any] | None = None,
              pool: Literal["ownership"], **options: Unpack[PoolStartOptions]) -> OwnershipPool:
        ...

    @overload
    @classmethod
    def start(cls, conninfo: str | None = None, *, driver: Driver[Any] | None = None,
              pool: Literal["queue"] = "queue", **options: Unpack[PoolStartOptions]) -> Pool:
        ...

    @classmethod
    def start(cls, conninfo: str | None = None, *, driver: Driver[Any] | None = None,
              pool: Literal["queue", "ownership"] = "queue",
              **options: Unpack[PoolStartOptions]) -> Pool:
        """Start a pool of connections to ``conninfo`` and return its handle.

        ``conninfo`` is a libpq string or URI.  When it is None, dbpool
        starts (or reuses) the embedded PostgreSQL of the ``embedded`` extra,
        and fails clearly if that is not installed.  ``options`` are
        described in :class:`~dbpool.pool.options.PoolOptions`; an unknown
        name raises :class:`~dbpool.errors.ConfigurationError` (and is a
        type error for mypy: see :class:`~dbpool.pool.options.PoolStartOptions`).
        ``pool="ownership"`` starts an ownership pool and returns its
        :class:`~dbpool.pool.ownership.pool.OwnershipPool`.  As a context
        manager the handle closes the pool at the end of the block.
        """
        opts = PoolOptions.from_kwargs({**options, "pool": pool})
        if conninfo is None:
            from dbpool.embedded import embedded_conninfo

            conninfo = embedded_conninfo()
        driver = driver if driver is not None else PgDriver()
        handle: type[Pool] = Pool
        core: PoolCore
        if opts.pool == "ownership":
            from .ownership.pool import OwnershipPool  # it builds on this module

            handle, core = OwnershipPool, OwnershipCore(driver, opts)
        else:
            core = PoolCore(driver, opts)
        config = ConnectionConfig(
            pool_name=opts.name,
            driver=driver,
            connect_opts={"conninfo": conninfo, "ping_timeout": opts.ping_timeout,
                          **opts.connect_kwargs},
            scheduler=core.scheduler,
            release=core.checkin.from_actor,
            deliver=core.deliver,
            configure=opts.configure,
            after_connect=_after_connect_runner(core) if opts.after_connect else None,
            after_connect_timeout=opts.after_connect_timeout,
            backoff_type=opts.backoff_type,
            backoff_min=opts.backoff_min,
            backoff_max=opts.backoff_max,
            show_sensitive_data_on_connection_error=opts.show_sensitive_data_on_connection_error,
            max_lifetime=opts.max_lifetime,
            may_connect=lambda: core.breaker.may_connect,
        )
        ref = PoolActor.start(core, config)
        return handle(core, ref)

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def options(self) -> PoolOptions:
        return self._core.options

    def lender(self) -> Lender:
        """Non-blocking borrowing, for an event loop that drives connections itself
        (``dbpool serve``'s front end): see :mod:`dbpool.pool.lender`."""
        return Lender(self._core)

    # -- checkout --------------------------------------------------------

    def checkout(
        self, timeout: float | None = None, queue: bool | None = None, *,
        caller: Owner | None = None,
    ) -> Checkout:
        """Lend one connection to this thread: ``with pool.checkout() as conn: ...``.

        ``timeout`` (the pool's ``timeout`` option by default) is a deadline
        counted from now: it covers the wait for a connection and its use.
        Waiting past it raises ``ConnectionError(reason="queue_timeout")``;
        holding past it gets the running statement cancelled, the connection
        replaced, and ``ConnectionError(reason="deadline")`` from the next
        call.  ``queue=False`` fails at once if no connection is idle.
        ``caller`` is for the ownership pool: use that owner's connection.
        An ownership pool's checkout holds its connection for the thread's
        other calls, which could only wait for it otherwise.
        """
        return Checkout(self._core, timeout, queue, caller=caller, hold=self._holds_checkouts)

    def acheckout(
        self, timeout: float | None = None, queue: bool | None = None, *,
        caller: Owner | None = None,
    ) -> AsyncCheckout:
        """:meth:`checkout` for asyncio: ``async with pool.acheckout() as conn: ...``.

        Waiting for a connection never blocks the event loop, and each call
        on the :class:`~dbpool.pool.connection.AsyncConnection` runs on a
        worker thread.
        """
        return AsyncCheckout(self._core, timeout, queue, caller=caller,
                              hold=self._holds_checkouts)

    def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None,
        queue: bool | None = None, log: LogFn | None = None, caller: Owner | None = None,
    ) -> Result:
        """Run one statement on a connection checked out for it; return its Result.

        Inside ``run()`` or ``transaction()`` on this thread, it runs on that
        connection instead (a plain ``checkout()`` does not lend its
        connection to pool calls: use the connection it gives).  If the
        connection turns out to have been closed by the server and the
        statement had no effect (the session was terminated, or timed out
        while idle), it runs again on another connection, up to the
        ``checkout_retries`` option.
        """
        core = self._core
        if core.held.get() is not None:  # a run or transaction may be open here
            held = core.held_conn()
            if held is not None:
                return held.query(sql, params, log=log)
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
        return self._one_shot(lambda c: c.prepare(name, sql, log=log), **self._checkout_opts(opts))

    def execute(self, query: Query, params: Params = None, **opts: Any) -> Result:
        """Execute a prepared :class:`Query` (see :meth:`Connection.execute`)."""
        log = opts.pop("log", None)
        return self._one_shot(lambda c: c.execute(query, params, log=log),
                              **self._checkout_opts(opts))

    def prepare_execute(
        self, name: str, sql: str, params: Params = None, **opts: Any
    ) -> tuple[Query, Result]:
        """Prepare and execute in one checkout (see :meth:`Connection.prepare_execute`)."""
        log = opts.pop("log", None)
        return self._one_shot(lambda c: c.prepare_execute(name, sql, params, log=log),
                              **self._checkout_opts(opts))

    def close_prepared(self, query: Query, **opts: Any) -> None:
        """Release a prepared statement on one connection (see
        :meth:`Connection.close_prepared`)."""
        log = opts.pop("log", None)
        self._one_shot(lambda c: c.close_prepared(query, log=log), **self._checkout_opts(opts))

    def status(self, **opts: Any) -> TransactionStatus:
        """The transaction status of this thread's connection, or of a checked-out one.

        As in DBConnection it does not raise for connection trouble: a
        connection found lost, or none to be had, is ``"error"``.
        """
        checkout_opts = self._checkout_opts(opts)
        try:
            return self._one_shot(lambda c: c.status(), **checkout_opts)
        except ConnectionError:
            return "error"

    def run(self, fn: Callable[[Connection], T], **opts: Any) -> T:
        """Call ``fn(conn)`` on one checked-out connection and return its result.

        Calls on the pool from ``fn``'s thread use that connection.  The
        transaction status is read before and after: if ``fn`` changed it
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
                       **self._checkout_opts(opts)) as conn:
            before = conn._status_or_error()
            result = fn(conn)
            conn._check_status_unchanged(before)
            return result

    @overload
    def transaction(self, fn: None = None, **opts: Any) -> PoolTransaction:
        ...

    @overload
    def transaction(self, fn: Callable[[Connection], T], **opts: Any) -> T:
        ...

    def transaction(
        self, fn: Callable[[Connection], T] | None = None, **opts: Any
    ) -> PoolTransaction | T:
        """Run ``fn(conn)`` in a transaction and return its result; or, with no ``fn``,
        return a context manager: ``with pool.transaction() as conn: ...``.

        Commits on success; rolls back and re-raises on an exception;
        ``conn.rollback(reason)`` makes it raise
        :class:`~dbpool.errors.RolledBack`.  Inside another transaction (or
        run or checkout) on this thread it is a pass-through on that
        connection; see :mod:`dbpool.pool.transaction` for the nesting rules.
        A ``BEGIN`` that finds the connection closed by the server is retried
        on another connection, up to ``checkout_retries``.
        """
        log = opts.pop("log", None)
        tx = PoolTransaction(self._core, log, caller_location(), **self._checkout_opts(opts))
        if fn is None:
            return tx
        with tx as conn:
            return fn(conn)

    def stream(
        self, sql: str | Query, params: Params = None, *, max_rows: int = 500, **opts: Any
    ) -> Iterator[Result]:
        """Stream a result in batches (see :meth:`Connection.stream`).

        Outside a transaction it opens one for the stream's life, on a
        connection checked out when iteration starts.
        """
        log = opts.pop("log", None)
        # Made here, not in the generator, so that a deadline names the caller's line.
        tx = PoolTransaction(self._core, log, caller_location(), **self._checkout_opts(opts))
        return _stream_in(tx, sql, params, max_rows, log)

    def copy_from(self, sql: str | Query, data: CopyData, params: Params = None,
                  **opts: Any) -> Result:
        """Run a ``COPY ... FROM STDIN`` on one connection (see
        :meth:`Connection.copy_from`); ``rowcount`` is the rows it took."""
        log = opts.pop("log", None)
        return self._one_shot(lambda c: c.copy_from(sql, data, params, log=log),
                              **self._checkout_opts(opts))

    def copy_to(self, sql: str | Query, params: Params = None, **opts: Any) -> Iterator[bytes]:
        """The data of a ``COPY ... TO STDOUT``, block by block (see
        :meth:`Connection.copy_to`), on a connection checked out when iteration
        starts and checked in when it ends."""
        log = opts.pop("log", None)
        checkout_opts = self._checkout_opts(opts)
        held = self._core.held_conn()
        if held is not None:  # inside a transaction or run on this thread
            return iter(held.copy_to(sql, params, log=log))
        checkout = Checkout(self._core, where=caller_location(), hold=True, **checkout_opts)
        return _copy_in(checkout, sql, params, log)

    def _checkout_opts(self, opts: dict[str, Any]) -> dict[str, Any]:
        unknown = set(opts) - {"timeout", "queue", "caller"}
        if unknown:
            raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
        return {"timeout": opts.get("timeout"), "queue": opts.get("queue"),
                "caller": opts.get("caller")}

    def _one_shot(
        self, call: Callable[[Connection], T], timeout: float | None, queue: bool | None,
        where: Location | None = None, retries: int | None = None, caller: Owner | None = None,
    ) -> T:
        """``call(conn)`` on this thread's connection, or on one checked out for it.

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

    async def aquery(
        self, sql: str, params: Params = None, *, timeout: float | None = None,
        queue: bool | None = None, log: LogFn | None = None, caller: Owner | None = None,
    ) -> Result:
        """:meth:`query` for asyncio."""
        return await self._aone_shot(lambda c: c.query(sql, params, log=log), timeout, queue,
                                     caller)

    async def aprepare(self, name: str, sql: str, **opts: Any) -> Query:
        """:meth:`prepare` for asyncio."""
        log = opts.pop("log", None)
        return await self._aone_shot(lambda c: c.prepare(name, sql, log=log),
                                     **self._checkout_opts(opts))

    async def aexecute(self, query: Query, params: Params = None, **opts: Any) -> Result:
        """:meth:`execute` for asyncio."""
        log = opts.pop("log", None)
        return await self._aone_shot(lambda c: c.execute(query, params, log=log),
                                     **self._checkout_opts(opts))

    async def aprepare_execute(
        self, name: str, sql: str, params: Params = None, **opts: Any
    ) -> tuple[Query, Result]:
        """:meth:`prepare_execute` for asyncio."""
        log = opts.pop("log", None)
        return await self._aone_shot(lambda c: c.prepare_execute(name, sql, params, log=log),
                                     **self._checkout_opts(opts))

    async def aclose_prepared(self, query: Query, **opts: Any) -> None:
        """:meth:`close_prepared` for asyncio."""
        log = opts.pop("log", None)
        await self._aone_shot(lambda c: c.close_prepared(query, log=log),
                              **self._checkout_opts(opts))

    async def astatus(self, **opts: Any) -> TransactionStatus:
        """:meth:`status` for asyncio."""
        checkout_opts = self._checkout_opts(opts)
        try:
            return await self._aone_shot(lambda c: c.status(), **checkout_opts)
        except ConnectionError:
            return "error"

    async def arun(self, fn: Callable[[AsyncConnection], Awaitable[T]], **opts: Any) -> T:
        """:meth:`run` for asyncio: ``fn`` is a coroutine function given an AsyncConnection."""
        held = self._core.aheld_conn()
        if held is not None:
            return await held.run(fn)
        async with AsyncCheckout(self._core, where=caller_location(), hold=True,
                                  **self._checkout_opts(opts)) as conn:
            before = await conn._in_thread(conn.sync._status_or_error)
            result = await fn(conn)
            await conn._in_thread(conn.sync._check_status_unchanged, before)
            return result

    @overload
    def atransaction(self, fn: None = None, **opts: Any) -> AsyncPoolTransaction:
        ...

    @overload
    def atransaction(
        self, fn: Callable[[AsyncConnection], Awaitable[T]], **opts: Any
    ) -> Awaitable[T]:
        ...

    def atransaction(
        self, fn: Callable[[AsyncConnection], Awaitable[T]] | None = None, **opts: Any
    ) -> AsyncPoolTransaction | Awaitable[T]:
        """:meth:`transaction` for asyncio.

        ``await pool.atransaction(fn)`` with a coroutine function, or
        ``async with pool.atransaction() as conn: ...``.
        """
        log = opts.pop("log", None)
        tx = AsyncPoolTransaction(self._core, log, caller_location(),
                                   **self._checkout_opts(opts))
        if fn is None:
            return tx
        return tx.run(fn)

    def astream(
        self, sql: str | Query, params: Params = None, *, max_rows: int = 500, **opts: Any
    ) -> AsyncIterator[Result]:
        """:meth:`stream` for asyncio: an async iterator of batches."""
        log = opts.pop("log", None)
        tx = AsyncPoolTransaction(self._core, log, caller_location(),
                                   **self._checkout_opts(opts))
        return _astream_in(tx, sql, params, max_rows, log)

    async def _aone_shot(
        self, call: Callable[[Connection], T], timeout: float | None, queue: bool | None,
        caller: Owner | None = None,
    ) -> T:
        """:meth:`_one_shot` for asyncio: ``call`` runs on a worker thread."""
        held = self._core.aheld_conn()
        if held is not None:
            return await held._in_thread(call, held.sync)
        where = caller_location(3)  # past this and the public a* method
        retries = self._core.options.checkout_retries
        while True:
            async with AsyncCheckout(self._core, timeout, queue, where, caller=caller) as conn:
                try:
                    return await conn._in_thread(call, conn.sync)
                except LostBeforeEffect:
                    if retries <= 0:
                        raise
                    retries -= 1

    def disconnect_all(self, interval: float = 0.0) -> None:
        """Replace every connection made before this call, spread over ``interval`` seconds.

        Each connection goes at its own deterministic point in the interval,
        when next checked in or found idle by the idle sweep, so the
        database never sees them all reconnect at once.  Use it to pick up a
        DNS change or new credentials from ``configure``.
        """
        self._core.recycler.disconnect_all(interval)

    def connection_metrics(self) -> list[dict[str, Any]]:
        """DBConnection's ``get_connection_metrics``: the pool's entry (then, for an
        ownership pool, one per owned connection), each with ``ready_conn_count``
        and ``checkout_queue_length``."""
        ready, waiting = self._core.queue.counts()
        return [{"source": ("pool", self.name), "ready_conn_count": ready,
                 "checkout_queue_length": waiting}, *self._owned_metrics()]

    def _owned_metrics(self) -> list[dict[str, Any]]:
        """The entries of owned connections (an ownership pool has some)."""
        return []

    # -- availability (see dbpool.pool.breaker) ----------------------------

    @property
    def health(self) -> str:
        """The circuit breaker's state: ``"closed"`` (serving), ``"open"`` (the database
        is unavailable: checkouts fail at once) or ``"half_open"`` (probing)."""
        return self._core.breaker.state

    def open_circuit(self) -> None:
        """Maintenance: fail every checkout at once with ``reason="unavailable"``, and
        waiters now, until :meth:`close_circuit`.  Nothing probes meanwhile."""
        self._availability("open")

    def close_circuit(self) -> None:
        """Serve again after :meth:`open_circuit` (or end an outage by hand);
        connections that are down reconnect gradually."""
        self._availability("close")

    def pause(self) -> None:
        """Hold new checkouts, like PgBouncer's PAUSE: they wait, with their usual
        timeouts, while connections already lent finish; :meth:`resume` serves them."""
        self._availability("pause")

    def resume(self) -> None:
        """End :meth:`pause` or :meth:`drain`: serve the waiting checkouts, and
        reconnect (gradually) what drain closed."""
        self._availability("resume")

    def drain(self, timeout: float = 30.0) -> bool:
        """Stop lending, wait up to ``timeout`` s for every lent connection to come back,
        then close every connection: for rolling restarts.

        Returns whether all came back in time (the rest close as they do).
        The pool stays paused, with no connections, until :meth:`resume`.
        """
        self._availability("pause")
        deadline = time.monotonic() + timeout
        loans = self._core.loans
        while loans and time.monotonic() < deadline:
            time.sleep(0.005)  # loans end on their holders' threads, with no signal to wait on
        drained = not loans
        self._availability("drain")
        return drained

    def _availability(self, action: str) -> None:
        try:
            self.ref.ask(Availability(action), timeout=30.0)
        except pykka.ActorDeadError:
            raise PoolStoppedError(f"{self.name}: the pool is stopped") from None

    # -- lifecycle -------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Close the pool: fail its waiters, close its connections, stop its actors.

        Waits up to ``timeout`` seconds; closing a closed pool does nothing.
        ``with Pool.start(...) as pool:`` closes it at the end of the block.
        (A prepared statement is released by :meth:`close_prepared`.)
        """
        try:
            self.ref.stop(block=True, timeout=timeout)
        except pykka.ActorDeadError:
            pass
        self._core.stopped.wait(timeout)

    #: DBConnection's name for :meth:`close`.
    stop = close

    @property
    def alive(self) -> bool:
        """True until the pool has stopped, by request or by failure."""
        return not self._core.stopped.is_set()

    @property
    def exit_error(self) -> BaseException | None:
        """Why the pool stopped: None while running or after a requested stop."""
        return self._core.exit_error

    def add_monitor(self, monitor: Monitor) -> None:
        """Call ``monitor(exit_error)`` once when the pool stops (None if by request)."""
        self._core.add_monitor(monitor)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until the pool has stopped; return False on timeout."""
        return self._core.stopped.wait(timeout)

    def metrics(self) -> dict[str, Any]:
        """The pool's gauges, counters and histograms.

        ``ready_conn_count`` and ``checkout_queue_length`` are as DBConnection's
        ``get_connection_metrics`` gives them; the rest is described in
        :class:`~dbpool.pool.metrics.PoolMetrics`.
        """
        ready, waiting = self._core.queue.counts()
        metrics = {"ready_conn_count": ready, "checkout_queue_length": waiting,
                   "health": self._core.breaker.state, "paused": self._core.queue.paused,
                   **self._core.metrics.snapshot()}
        owned = self._owned_metrics()
        if owned:
            metrics["owned"] = owned
        return metrics

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dbpool Pool {self.name!r} size={self.options.pool_size} alive={self.alive}>"


def _stream_in(
    tx: PoolTransaction, sql: str | Query, params: Params, max_rows: int, log: LogFn | None
) -> Iterator[Result]:
    with tx as conn:
        yield from conn.stream(sql, params, max_rows=max_rows, log=log)


def _copy_in(
    checkout: Checkout, sql: str | Query, params: Params, log: LogFn | None
) -> Iterator[bytes]:
    with checkout as conn, conn.copy_to(sql, params, log=log) as copy:
        yield from copy


async def _astream_in(
    tx: AsyncPoolTransaction, sql: str | Query, params: Params, max_rows: int,
    log: LogFn | None,
) -> AsyncIterator[Result]:
    async with tx as conn, conn.stream(sql, params, max_rows=max_rows, log=log) as batches:
        async for batch in batches:
            yield batch


class Checkout:
    """The context manager :meth:`Pool.checkout` returns.

    With ``hold`` (run and transaction), calls on the pool from this thread
    use its connection while it is open.  A plain checkout does not hold:
    the pool's other calls still take connections of their own.
    """

    __slots__ = ("_caller", "_conn", "_core", "_hold", "_queue", "_timeout", "_token", "_where")

    def __init__(
        self, core: PoolCore, timeout: float | None, queue: bool | None,
        where: Location | None = None, hold: bool = False, caller: Owner | None = None,
    ) -> None:
        self._core = core
        self._caller = caller
        self._hold = hold
        self._timeout = core.options.timeout if timeout is None else timeout
        self._queue = core.options.queue if queue is None else queue
        self._where = where
        self._conn: Connection | None = None
        self._token: contextvars.Token[weakref.ref[Connection] | None] | None = None

    def __enter__(self) -> Connection:
        core = self._core
        conn = core.lend(self._timeout, self._queue, self._where or caller_location(),
                         self._caller)
        self._conn = conn
        if self._hold:
            self._token = core.held.set(weakref.ref(conn))
        return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            if self._token is not None:
                try:
                    self._core.held.reset(self._token)
                except ValueError:  # exited from another context (a callback, a task)
                    self._core.held.set(None)
            self._core.checkin.take_back(conn)


class _TransactionBlock(Generic[CheckoutT, TransactionT]):
    """What a transaction block of the pool holds: how to check out, and, once
    entered, its checkout (None when nested) and its transaction."""

    def __init__(
        self, core: PoolCore, log: LogFn | None, where: Location | None,
        timeout: float | None, queue: bool | None, caller: Owner | None = None,
    ) -> None:
        self._core = core
        self._log = log
        self._where = where
        self._timeout = timeout
        self._queue = queue
        self._caller = caller
        self._checkout: CheckoutT | None = None
        self._tx: TransactionT | None = None


class PoolTransaction(_TransactionBlock["Checkout", Transaction]):
    """What :meth:`Pool.transaction` returns: a checkout (unless nested) and a transaction."""

    def __enter__(self) -> Connection:
        held = self._core.held_conn()
        if held is not None:  # nested: a pass-through on this thread's connection
            self._tx = Transaction(held, self._log)
            return self._tx.__enter__()
        retries = self._core.options.checkout_retries
        while True:
            checkout = Checkout(self._core, self._timeout, self._queue, self._where, hold=True,
                                 caller=self._caller)
            conn = checkout.__enter__()
            tx = Transaction(conn, self._log)
            try:
                tx.__enter__()
            except LostBeforeEffect:  # BEGIN found it closed by the server: take another
                checkout.__exit__(None, None, None)
                if retries <= 0:
                    raise
                retries -= 1
                continue
            except BaseException:
                checkout.__exit__(None, None, None)
                raise
            self._checkout, self._tx = checkout, tx
            return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tx is not None
        try:
            self._tx.__exit__(exc_type, exc, tb)
        finally:
            if self._checkout is not None:
                self._checkout.__exit__(None, None, None)


class AsyncCheckout:
    """The async context manager :meth:`Pool.acheckout` returns (see :class:`Checkout`)."""

    __slots__ = ("_caller", "_conn", "_core", "_hold", "_queue", "_timeout", "_token", "_where")

    def __init__(
        self, core: PoolCore, timeout: float | None, queue: bool | None,
        where: Location | None = None, hold: bool = False, caller: Owner | None = None,
    ) -> None:
        self._core = core
        self._caller = caller
        self._where = where
        self._hold = hold
        self._timeout = core.options.timeout if timeout is None else timeout
        self._queue = core.options.queue if queue is None else queue
        self._conn: AsyncConnection | None = None
        self._token: contextvars.Token[AsyncHold | None] | None = None

    async def __aenter__(self) -> AsyncConnection:
        conn = await self._core.alend(self._timeout, self._queue,
                                      self._where or caller_location(), self._caller)
        self._conn = AsyncConnection(conn)
        if self._hold:
            self._token = self._core.aheld.set((asyncio.current_task(), weakref.ref(self._conn)))
        return self._conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._token is not None:
            try:
                self._core.aheld.reset(self._token)
            except ValueError:  # exited from another context (a different task)
                self._core.aheld.set(None)
        await conn._settle()
        if conn.sync._needs_cleaning():  # a rollback is I/O: not on the loop
            await asyncio.get_running_loop().run_in_executor(
                None, self._core.checkin.take_back, conn.sync)
        else:
            self._core.checkin.take_back(conn.sync)


class AsyncPoolTransaction(_TransactionBlock["AsyncCheckout", AsyncTransaction]):
    """What :meth:`Pool.atransaction` returns: an async checkout (unless nested) and a
    transaction."""

    async def __aenter__(self) -> AsyncConnection:
        core = self._core
        held = core.aheld_conn()
        if held is not None:  # nested: a pass-through on this task's connection
            self._tx = AsyncTransaction(held, self._log)
            return await self._tx.__aenter__()
        retries = core.options.checkout_retries
        while True:
            checkout = AsyncCheckout(core, self._timeout, self._queue, self._where, hold=True,
                                      caller=self._caller)
            conn = await checkout.__aenter__()
            tx = AsyncTransaction(conn, self._log)
            try:
                await tx.__aenter__()
            except LostBeforeEffect:  # BEGIN found it closed by the server: take another
                await checkout.__aexit__(None, None, None)
                if retries <= 0:
                    raise
                retries -= 1
                continue
            except BaseException:
                await checkout.__aexit__(None, None, None)
                raise
            self._checkout, self._tx = checkout, tx
            return conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tx is not None
        try:
            await self._tx.__aexit__(exc_type, exc, tb)
        finally:
            if self._checkout is not None:
                await self._checkout.__aexit__(None, None, None)

    async def run(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self as conn:
            return await fn(conn)


def _after_connect_runner(core: PoolCore) -> Callable[[Slot], None]:
    """Wrap the user's after_connect so that it receives a Connection."""
    user_fn = core.options.after_connect
    assert user_fn is not None

    def run(slot: Slot) -> None:
        conn = Connection(core, slot, Loan(slot))
        try:
            user_fn(conn)
        finally:
            if conn._surrender() is not None:  # the actor, not a queue, takes it back
                core.checkin.clean(slot)
        if slot.broken is not None:  # e.g. left in a transaction that would not roll back
            raise slot.broken

    return run
