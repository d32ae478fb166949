"""The parts of one pool, made together, and the lending of its connections.

:class:`PoolCore` makes a pool's parts and gives each what it needs: the
checkout queue (:mod:`~dbpool.pool.queue`), the circuit breaker
(:mod:`~dbpool.pool.breaker`), the loans and their watcher
(:mod:`~dbpool.pool.loans`), recycling (:mod:`~dbpool.pool.recycling`),
cancels (:mod:`~dbpool.pool.cancels`) and the checkin policy
(:mod:`~dbpool.pool.checkin`).  Its own work is lending: a checkout takes a
slot from the queue (:mod:`dbpool.pool._async.lending`, with its generated
sync twin), the driver's checkout callback accepts it, and a loan with its
deadline makes it a :class:`~dbpool.pool.connection.Connection`.
The way back does not pass through here: the holder hands the connection to
the checkin, which decides where it goes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent, Listener, deliver, normalize
from dbpool.actors.scheduler import Scheduler
from dbpool.actors.slot import Slot
from dbpool.driver import Driver, Ok
from dbpool.errors import ConnectionError
from dbpool.telemetry import listened as _listened

from ._async.lending import alend as _alend
from ._sync.lending import lend as _lend
from .breaker import Breaker
from .budget import Budget
from .cancels import Canceller
from .checkin import Checkin
from .connection import AsyncConnection, Connection
from .lender import Lender
from .loans import Loan, LoanWatcher, Location
from .metrics import PoolMetrics
from .options import PoolOptions
from .queue import CheckoutQueue
from .recycling import Recycler

__all__ = ["PoolCore"]

logger = logging.getLogger("dbpool.pool")

Monitor = Callable[[BaseException | None], object]
#: What an async checkout leaves in its context: the holding task and its connection.
AsyncHold = tuple["asyncio.Task[Any] | None", "weakref.ref[AsyncConnection]"]
HoldToken = Token["weakref.ref[Connection] | None"]
AsyncHoldToken = Token["AsyncHold | None"]



class PoolCore:
    """The state one pool's actors, watcher and callers share."""

    def __init__(self, driver: Driver[Any], options: PoolOptions) -> None:
        self.name = options.name
        self.driver = driver
        self.options = options
        #: The pool's ``log`` option, read by every checkout.
        self.log = options.log
        self.metrics = PoolMetrics()
        self.scheduler = Scheduler(name=f"{options.name}-scheduler")
        self.queue = CheckoutQueue(
            name=options.name, target=options.queue_target, interval=options.queue_interval,
            max_waiting=options.max_waiting, metrics=self.metrics,
            barge_window=options.barge_seconds, call_later=self.scheduler.call_later)
        self.listeners: tuple[Listener, ...] = normalize(options.connection_listeners)
        #: The circuit breaker; the pool actor attaches it to its connections.
        self.breaker = Breaker(self.name, options, self.queue, self.listeners)
        #: The connection this thread (or task context) holds through checkout,
        #: run or transaction: calls on the pool from there use it.
        #: Weak references, so that a checkout dropped without checkin can
        #: still be garbage-collected and reclaimed.
        self.held: ContextVar[weakref.ref[Connection] | None] = ContextVar(
            f"{self.name}-held", default=None)
        self.aheld: ContextVar[AsyncHold | None] = ContextVar(
            f"{self.name}-aheld", default=None)
        #: Lent connections by slot index, for the watcher's sweeps.
        self.loans: dict[int, Loan] = {}
        self.recycler = Recycler(self.breaker, options.max_lifetime is not None)
        #: The connection budget shared with other pools and servers, if any.
        self.budget = (Budget(options.budget_name, options.max_server_connections, driver,
                              lender=Lender(self), up=self.breaker.up,
                              interval=options.idle_interval)
                       if options.max_server_connections is not None else None)
        self.canceller = Canceller(options.name)
        #: Where connections go when they come back (the one way back).
        self.checkin = self._make_checkin()
        self.watcher = LoanWatcher(options.name, self.loans, self.checkin, self.metrics,
                                   options.idle_interval)
        self.stopped = threading.Event()
        #: Why the pool stopped: None for a requested stop, else the error.
        self.exit_error: BaseException | None = None
        self._monitors: list[Monitor] = []
        self._monitor_lock = threading.Lock()

    def _make_checkin(self) -> Checkin:
        return Checkin(self.name, self.driver, self.queue, self.loans, self.breaker,
                       self.recycler, self.metrics, self.canceller, self.deliver)

    # -- lending ---------------------------------------------------------

    def held_conn(self) -> Connection | None:
        """The connection this thread holds (run, transaction), if any.

        Only the holder's own thread sees it, even where a context was copied
        to another thread: connections are not shared behind a caller's back.
        """
        ref = self.held.get()
        conn = None if ref is None else ref()
        if conn is None or conn._loan.thread is not threading.current_thread():
            return None
        return conn

    def aheld_conn(self) -> AsyncConnection | None:
        """The async connection this task holds, if any.

        Tasks it creates inherit the context but not the connection: like
        Ecto's processes, they check out their own.
        """
        held = self.aheld.get()
        if held is None:
            return None
        task, ref = held
        conn = ref()
        if conn is None or task is not asyncio.current_task():
            return None
        return conn

    #: Check out a connection for this thread: :func:`dbpool.pool._sync.lending.lend`.
    lend = _lend
    #: The same for an asyncio task, lent an AsyncConnection:
    #: :func:`dbpool.pool._async.lending.alend` (``lend``'s source).
    alend = _alend

    def hold(self, conn: Connection) -> HoldToken:
        """Make ``conn`` this thread's held connection (run, transaction) until :meth:`unhold`."""
        return self.held.set(weakref.ref(conn))

    def ahold(self, conn: AsyncConnection) -> AsyncHoldToken:
        """Make ``conn`` this task's held connection until :meth:`aunhold`."""
        return self.aheld.set((asyncio.current_task(), weakref.ref(conn)))

    def unhold(self, token: HoldToken) -> None:
        """End a :meth:`hold`."""
        try:
            self.held.reset(token)
        except ValueError:  # ended from another context (a callback, a task)
            self.held.set(None)

    def aunhold(self, token: AsyncHoldToken) -> None:
        """End an :meth:`ahold`."""
        try:
            self.aheld.reset(token)
        except ValueError:  # ended from another context (a different task)
            self.aheld.set(None)

    def report_failure(self, error: ConnectionError) -> None:
        """Emit the connection_error telemetry event for a failed checkout."""
        telemetry.emit("connection_error", {"count": 1}, {"pool": self.name, "error": error})

    def _emit_checkout(self, slot: Slot, started: float) -> None:
        telemetry.emit("checkout", {"queue_time": time.monotonic() - started},
                       {"pool": self.name, "index": slot.index})

    def accept(
        self, slot: Slot, started: float, timeout: float, where: Location | None
    ) -> Connection | None:
        """Lend a slot taken from the queue, or None if its connection died while idle.

        Raises the driver's error if its checkout callback fails otherwise.
        """
        outcome = self.driver.checkout(slot.driver_state)
        if isinstance(outcome, Ok):
            return self.lend_slot(slot, started, timeout, where)
        self.checkin.refused(slot, outcome)
        return None

    def aaccept(
        self, slot: Slot, started: float, timeout: float, where: Location | None
    ) -> AsyncConnection | None:
        """:meth:`accept`, lending the connection to an asyncio task."""
        conn = self.accept(slot, started, timeout, where)
        return None if conn is None else AsyncConnection(conn)

    def lend_slot(
        self, slot: Slot, started: float, timeout: float, where: Location | None
    ) -> Connection:
        """Start a loan of a slot taken for this caller: the watcher guards its deadline."""
        loan = Loan(slot, started, started + timeout, where)
        self.loans[slot.index] = loan
        watcher = self.watcher
        if loan.deadline < watcher.wake_at:  # watcher.watch(loan), inlined: the hot path
            watcher.watch(loan)
        if "checkout" in _listened:
            self._emit_checkout(slot, started)
        return Connection(self, slot, loan)

    # -- events ----------------------------------------------------------

    def deliver(self, event: ConnectionEvent) -> None:
        """Give a connection event to the listeners and to telemetry."""
        self.metrics.add("connects" if event.kind == "connected" else "disconnects")
        if event.duration is not None:
            self.metrics.observe_connect(event.duration)
        deliver(self.listeners, event)
        telemetry.emit(event.kind, {"count": 1}, {"pool": self.name, "event": event})

    # -- stopping --------------------------------------------------------

    def before_stop(self) -> None:
        """Called by the pool actor first thing on stop (the ownership pool gives back
        its owned connections here)."""

    # -- monitors --------------------------------------------------------

    def add_monitor(self, monitor: Monitor) -> None:
        """Call ``monitor(exit_error)`` once the pool has stopped (at once if it has)."""
        with self._monitor_lock:
            if not self.stopped.is_set():
                self._monitors.append(monitor)
                return
        _call_monitor(monitor, self.exit_error)

    def mark_stopped(self, error: BaseException | None) -> None:
        self.canceller.shutdown()
        with self._monitor_lock:
            self.exit_error = error
            self.stopped.set()
            monitors, self._monitors = self._monitors, []
        for monitor in monitors:
            _call_monitor(monitor, error)


def _call_monitor(monitor: Monitor, error: BaseException | None) -> None:
    try:
        monitor(error)
    except Exception:
        logger.exception("pool monitor %r raised", monitor)
