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

    pool.listen("orders", print)          # every NOTIFY orders, '...' (see listen)

``Pool.start`` returns at once; connections open in the background and
callers queue until one is ready.  ``pool.ref`` is the pool actor's pykka
ActorRef.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Literal, Unpack, overload

import pykka

from dbpool.actors.connection import ConnectionConfig
from dbpool.actors.listeners import Listener, ListenerSpec, normalize
from dbpool.actors.messages import Listen, Unlisten
from dbpool.actors.relay import THREAD_NAME as RELAY_THREAD
from dbpool.actors.slot import Slot
from dbpool.driver import Driver, Params, Query
from dbpool.errors import ConfigurationError, ConnectionError, PoolStoppedError
from dbpool.pgdriver import PgDriver
from dbpool.protocol import check_channel

from ._async.calls import AsyncPoolCalls
from ._async.checkout import AsyncCheckout, AsyncPoolTransaction
from ._sync.calls import PoolCalls
from ._sync.checkout import Checkout, PoolTransaction
from .connection import Connection
from .core import Monitor, PoolCore
from .lender import Lender
from .loans import Loan, caller_location
from .logentry import LogFn
from .options import PoolOptions, PoolStartOptions, checkout_options
from .ownership.core import OwnershipCore
from .pool_actor import Availability, PoolActor, Resize
from .replicas import ReplicaSet

__all__ = ["AsyncCheckout", "AsyncPoolTransaction", "Checkout", "Pool", "PoolTransaction"]

if TYPE_CHECKING:
    from .ownership.pool import OwnershipPool

logger = logging.getLogger("dbpool.pool")


class Pool(PoolCalls, AsyncPoolCalls):
    """A handle on a running pool.  Thread-safe; share one per process.

    Its calls on connections (``query``, ``checkout``, ``transaction``... and
    their asyncio forms ``aquery``, ``acheckout``, ``atransaction``...) are
    described in :mod:`dbpool.pool._async.calls`, where they are written once.

    ``Pool.start(..., pool="ownership")`` returns an
    :class:`~dbpool.pool.ownership.pool.OwnershipPool`, this class with the
    ownership calls.
    """

    #: Whether a plain checkout holds its connection for the thread's other calls.
    _holds_checkouts = False

    def __init__(self, core: PoolCore, ref: pykka.ActorRef[Any],
                 replicas: ReplicaSet | None = None) -> None:
        self._core = core
        self._default_timeout = core.options.timeout
        self._default_queue = core.options.queue
        self._replicas = replicas
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
                          "spin": opts.spin,
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
            claim=core.budget.connect if core.budget is not None else None,
            holds=core.budget.holds if core.budget is not None else None,
            claim_interval=opts.idle_interval,
        )
        ref = PoolActor.start(core, config)
        replicas = None
        if opts.replicas:
            if opts.pool != "queue":
                raise ConfigurationError("replicas are for pool='queue' pools")
            replica_options: dict[str, Any] = {**options, "replicas": ()}
            replicas = ReplicaSet(
                [Pool.start(replica, driver=driver, **{**replica_options,
                                                       "name": f"{opts.name}-replica-{i}"})
                 for i, replica in enumerate(opts.replicas)],
                opts.max_replica_lag, opts.idle_interval, opts.ping_timeout, opts.name)
        return handle(core, ref, replicas)

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def options(self) -> PoolOptions:
        return self._core.options

    @property
    def replicas(self) -> list[Pool]:
        """The pools of the read replicas (``replicas`` option), in the order given."""
        return self._replicas.pools if self._replicas is not None else []

    def replica_for_read(self, only: bool = False) -> Pool | None:
        """The replica a read-only call would go to now, or None for the primary;
        with ``only``, ConnectionError (``unavailable``) rather than None."""
        return self._reader("replica" if only else True)

    def replica_failed(self, replica: Pool, error: BaseException) -> None:
        """A read lost its connection on ``replica`` (one of :attr:`replicas`): it leaves
        the rotation for a moment.  For a caller that routes reads itself (``dbpool
        serve``, which then runs the read again on this pool)."""
        if self._replicas is not None:
            self._replicas.failed(replica, error)

    def replica_status(self) -> list[dict[str, Any]]:
        """Each replica's ``name``, ``health``, ``lag`` (seconds, None until measured)
        and whether it is ``in_rotation`` (see :mod:`dbpool.pool.replicas`)."""
        return self._replicas.status() if self._replicas is not None else []

    def lender(self) -> Lender:
        """Non-blocking borrowing, for an event loop that drives connections itself
        (``dbpool serve``'s front end): see :mod:`dbpool.pool.lender`."""
        return Lender(self._core)

    # -- the calls: query, checkout, transaction... are PoolCalls and AsyncPoolCalls

    def copy_to(self, sql: str | Query, params: Params = None, **opts: Any) -> Iterator[bytes]:
        """The data of a ``COPY ... TO STDOUT``, block by block (see
        :meth:`Connection.copy_to`), on a connection checked out when iteration
        starts and checked in when it ends."""
        log = opts.pop("log", None)
        checkout_opts = checkout_options(opts)
        held = self._core.held_conn()
        if held is not None:  # inside a transaction or run on this thread
            return iter(held.copy_to(sql, params, log=log))
        checkout = Checkout(self._core, where=caller_location(), hold=True, **checkout_opts)
        return _copy_in(checkout, sql, params, log)

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

    # -- LISTEN/NOTIFY (see dbpool.actors.relay) ----------------------------

    def listen(self, channel: str, listener: ListenerSpec, timeout: float | None = None) -> None:
        """Subscribe ``listener`` to ``channel``'s notifications.

        ``listener`` is an ActorRef (told each event) or a callable (called
        with it, on the relay's thread: keep it quick), optionally paired
        with a tag, as for ``connection_listeners``.  It hears a
        :class:`~dbpool.actors.listeners.NotificationEvent` for every
        ``NOTIFY channel`` committed by anyone, through this pool or not,
        and a :class:`~dbpool.actors.listeners.NotificationGap` after the
        pool's listening connection was lost and listens again.

        Returns once the pool listens to ``channel``: every notification
        committed after that is delivered.  One connection per pool, outside
        ``pool_size``, holds every ``LISTEN``; it opens at the first call.
        If it cannot listen within ``timeout`` (default: the pool's
        ``timeout``), the subscription is dropped and
        :class:`~dbpool.errors.ConnectionError` (``reason="timeout"``) raised.
        ``channel`` is a name as PostgreSQL takes it quoted (case counts).
        Called from a subscriber (on the relay's thread) it returns at once,
        and the subscription is in force once the subscriber returns.
        """
        subscriber, ready = self._subscribe(channel, listener)
        wait = self._default_timeout if timeout is None else timeout
        if not _settled(ready, wait):
            # This subscription only: the same target may have listened before.
            _settled(self.stop_listening(channel, subscriber), wait)
            raise ConnectionError(f"{self.name}: could not listen to {channel!r} within "
                                  f"{wait:g}s", reason="timeout")

    def start_listening(self, channel: str, listener: ListenerSpec) -> Future[None]:
        """:meth:`listen` without the wait: the future is done once the pool
        listens to ``channel`` (for an event loop that must not block)."""
        return self._subscribe(channel, listener)[1]

    def _subscribe(self, channel: str, listener: ListenerSpec) -> tuple[Listener, Future[None]]:
        check_channel(channel)
        (subscriber,) = normalize([listener])
        ready: Future[None] = Future()
        try:
            self.ref.tell(Listen(channel, subscriber, ready))
        except pykka.ActorDeadError:
            raise PoolStoppedError(f"{self.name}: the pool is stopped") from None
        return subscriber, ready

    def unlisten(self, channel: str, listener: object = None) -> None:
        """Unsubscribe ``listener`` (as given to :meth:`listen`, without its tag) from
        ``channel``, or every subscriber if None.  The pool stops listening to
        a channel when its last subscriber goes.

        Once it returns, ``listener`` hears nothing more on ``channel``
        (called from a subscriber as it is called, it returns at once and
        takes effect after the notifications being delivered).
        """
        _settled(self.stop_listening(channel, listener), self._default_timeout)

    def stop_listening(self, channel: str, listener: object = None) -> Future[None]:
        """:meth:`unlisten` without the wait: the future is done once ``listener``
        hears nothing more on ``channel``."""
        check_channel(channel)
        done: Future[None] = Future()
        try:
            self.ref.tell(Unlisten(channel, listener, done))
        except pykka.ActorDeadError:
            done.set_result(None)  # a stopped pool listens to nothing
        return done

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

    def resize(self, size: int) -> None:
        """Keep ``size`` connections open from now on, as HikariCP's
        ``setMaximumPoolSize`` does at run time.  An elastic pool's size is
        then fixed (``min_size`` and ``max_size`` become ``size``).

        Growing opens the new connections in the background.  Shrinking closes
        idle connections past the new size at once and lent ones when they are
        checked in: nothing in flight is interrupted.
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigurationError(f"pool_size must be an integer >= 1, got {size!r}")
        try:
            self.ref.ask(Resize(size), timeout=30.0)
        except pykka.ActorDeadError:
            raise PoolStoppedError(f"{self.name}: the pool is stopped") from None

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
        if self._replicas is not None:
            self._replicas.close(timeout)
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
        core = self._core
        ready, waiting = core.queue.counts()
        breaker = core.breaker
        up, down, in_use = len(breaker.up), len(breaker.parked), len(core.loans)
        metrics = {"ready_conn_count": ready, "checkout_queue_length": waiting,
                   "health": breaker.state, "paused": core.queue.paused,
                   "pool_size": core.options.pool_size, "min_size": core.options.min_size,
                   "max_size": core.options.max_size,
                   "connections": {"idle": max(0, up - in_use), "in_use": in_use,
                                   "connecting": max(0, core.options.pool_size - up - down),
                                   "down": down},
                   **core.metrics.snapshot()}
        if self._replicas is not None:
            metrics["replicas"] = self._replicas.status()
        budget = core.budget
        if budget is not None:
            metrics["budget"] = {"name": budget.name, "size": budget.size, "held": up,
                                 "wanting": budget.wanting()}
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


def _settled(future: Future[None], timeout: float) -> bool:
    """Wait up to ``timeout`` for the relay to do what ``future`` stands for; False if
    it did not (the database is out of reach, or the pool is stopping).

    On the relay's own thread (a subscriber calling back as it is called) it
    returns True at once: the relay does it once the subscriber returns.  A
    future that failed raises its error.
    """
    if threading.current_thread().name.startswith(RELAY_THREAD):
        return True
    try:
        future.result(timeout)
    except FutureTimeout:
        return False
    return True


def _copy_in(
    checkout: Checkout, sql: str | Query, params: Params, log: LogFn | None
) -> Iterator[bytes]:
    with checkout as conn, conn.copy_to(sql, params, log=log) as copy:
        yield from copy


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
