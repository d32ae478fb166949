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
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pykka

from dbpool.actors.connection import ConnectionConfig
from dbpool.actors.slot import Slot
from dbpool.driver import Driver, Params, Result
from dbpool.pgdriver import PgDriver

from .connection import AsyncConnection, Connection
from .core import Monitor, PoolCore
from .loans import Loan, caller_location
from .options import PoolOptions
from .pool_actor import PoolActor

__all__ = ["Pool"]

logger = logging.getLogger("dbpool.pool")


class Pool:
    """A handle on a running pool.  Thread-safe; share one per process."""

    def __init__(self, core: PoolCore, ref: pykka.ActorRef[Any]) -> None:
        self._core = core
        self._default_timeout = core.options.timeout
        self._default_queue = core.options.queue
        #: The pool actor's ActorRef.
        self.ref = ref

    @classmethod
    def start(
        cls, conninfo: str | None = None, *, driver: Driver[Any] | None = None, **options: Any
    ) -> Pool:
        """Start a pool of connections to ``conninfo`` and return its handle.

        ``conninfo`` is a libpq string or URI.  When it is None, dbpool
        starts (or reuses) the embedded PostgreSQL of the ``embedded`` extra,
        and fails clearly if that is not installed.  ``options`` are
        described in :class:`~dbpool.pool.options.PoolOptions`; an unknown
        name raises :class:`~dbpool.errors.ConfigurationError`.
        """
        opts = PoolOptions.from_kwargs(options)
        if conninfo is None:
            from dbpool.embedded import embedded_conninfo

            conninfo = embedded_conninfo()
        driver = driver if driver is not None else PgDriver()
        core = PoolCore(driver, opts)
        config = ConnectionConfig(
            pool_name=opts.name,
            driver=driver,
            connect_opts={"conninfo": conninfo, **opts.connect_kwargs},
            scheduler=core.scheduler,
            release=core.queue.put,
            deliver=core.deliver,
            configure=opts.configure,
            after_connect=_after_connect_runner(core) if opts.after_connect else None,
            after_connect_timeout=opts.after_connect_timeout,
            backoff_type=opts.backoff_type,
            backoff_min=opts.backoff_min,
            backoff_max=opts.backoff_max,
            show_sensitive_data_on_connection_error=opts.show_sensitive_data_on_connection_error,
            max_lifetime=opts.max_lifetime,
        )
        ref = PoolActor.start(core, config)
        return cls(core, ref)

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def options(self) -> PoolOptions:
        return self._core.options

    # -- checkout --------------------------------------------------------

    def checkout(self, timeout: float | None = None, queue: bool | None = None) -> _Checkout:
        """Lend one connection to this thread: ``with pool.checkout() as conn: ...``.

        ``timeout`` (the pool's ``timeout`` option by default) is a deadline
        counted from now: it covers the wait for a connection and its use.
        Waiting past it raises ``ConnectionError(reason="queue_timeout")``;
        holding past it gets the running statement cancelled, the connection
        replaced, and ``ConnectionError(reason="deadline")`` from the next
        call.  ``queue=False`` fails at once if no connection is idle.
        """
        return _Checkout(
            self._core,
            self._default_timeout if timeout is None else timeout,
            self._default_queue if queue is None else queue,
        )

    def acheckout(self, timeout: float | None = None, queue: bool | None = None) -> _AsyncCheckout:
        """:meth:`checkout` for asyncio: ``async with pool.acheckout() as conn: ...``.

        Waiting for a connection never blocks the event loop, and each call
        on the :class:`~dbpool.pool.connection.AsyncConnection` runs on a
        worker thread.
        """
        return _AsyncCheckout(
            self._core,
            self._default_timeout if timeout is None else timeout,
            self._default_queue if queue is None else queue,
        )

    def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None,
        queue: bool | None = None,
    ) -> Result:
        """Check out a connection, run one statement on it and check it back in."""
        core = self._core  # checkout(), inlined: this is the hot path
        conn = core.lend(self._default_timeout if timeout is None else timeout,
                         self._default_queue if queue is None else queue, caller_location())
        try:
            return conn.query(sql, params)
        finally:
            core.give_back(conn)

    async def aquery(
        self, sql: str, params: Params = None, *, timeout: float | None = None,
        queue: bool | None = None,
    ) -> Result:
        """:meth:`query` for asyncio."""
        async with self.acheckout(timeout, queue) as conn:
            return await conn.query(sql, params)

    def disconnect_all(self, interval: float = 0.0) -> None:
        """Replace every connection made before this call, spread over ``interval`` seconds.

        Each connection goes at its own deterministic point in the interval,
        when next checked in or found idle by the idle sweep, so the
        database never sees them all reconnect at once.  Use it to pick up a
        DNS change or new credentials from ``configure``.
        """
        self._core.disconnect_all(interval)

    # -- lifecycle -------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the pool: fail waiters, close connections, stop the actors."""
        try:
            self.ref.stop(block=True, timeout=timeout)
        except pykka.ActorDeadError:
            pass
        self._core.stopped.wait(timeout)

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
        return {"ready_conn_count": ready, "checkout_queue_length": waiting,
                **self._core.metrics.snapshot()}

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<dbpool Pool {self.name!r} size={self.options.pool_size} alive={self.alive}>"


class _Checkout:
    """The context manager :meth:`Pool.checkout` returns."""

    __slots__ = ("_conn", "_core", "_queue", "_timeout")

    def __init__(self, core: PoolCore, timeout: float, queue: bool) -> None:
        self._core = core
        self._timeout = timeout
        self._queue = queue
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        self._conn = self._core.lend(self._timeout, self._queue, caller_location())
        return self._conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._core.give_back(self._conn)
            self._conn = None


class _AsyncCheckout:
    """The async context manager :meth:`Pool.acheckout` returns."""

    __slots__ = ("_conn", "_core", "_queue", "_timeout")

    def __init__(self, core: PoolCore, timeout: float, queue: bool) -> None:
        self._core = core
        self._timeout = timeout
        self._queue = queue
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        conn = await self._core.alend(self._timeout, self._queue, caller_location())
        self._conn = AsyncConnection(conn)
        return self._conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        await conn._settle()
        if conn.sync._needs_cleaning():  # a rollback is I/O: not on the loop
            await asyncio.get_running_loop().run_in_executor(
                None, self._core.give_back, conn.sync)
        else:
            self._core.give_back(conn.sync)


def _after_connect_runner(core: PoolCore) -> Callable[[Slot], None]:
    """Wrap the user's after_connect so that it receives a Connection."""
    user_fn = core.options.after_connect
    assert user_fn is not None

    def run(slot: Slot) -> None:
        conn = Connection(core, slot, Loan(slot))
        try:
            user_fn(conn)
        finally:
            conn._end()  # the actor, not a queue, takes the slot back
        if slot.broken is not None:  # e.g. left in a transaction that would not roll back
            raise slot.broken

    return run
