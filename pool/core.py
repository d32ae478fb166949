"""What a pool's parts share: the driver, the options, the queue and the loans.

:class:`PoolCore` is the meeting point of the pool actor (lifecycle), the
connection actors (via the release callback), the loan watcher (deadlines
and leaks) and callers (checkout and checkin on their own threads).  Its own
policy is lending and taking back: where a returned slot goes next.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from functools import partial
from typing import Any

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent, Listener, deliver, normalize
from dbpool.actors.messages import Reconnect
from dbpool.actors.scheduler import Scheduler
from dbpool.actors.slot import Slot
from dbpool.driver import Disconnect, Driver, Ok
from dbpool.errors import ConnectionError
from dbpool.telemetry import listened as _listened

from .breaker import Breaker
from .connection import _NO_OPTS, AsyncConnection, Connection
from .loans import Loan, LoanWatcher, Location
from .metrics import PoolMetrics
from .options import PoolOptions
from .queue import CheckoutQueue

__all__ = ["PoolCore"]

logger = logging.getLogger("dbpool.pool")

Monitor = Callable[[BaseException | None], object]
#: What an async checkout leaves in its context: the holding task and its connection.
AsyncHold = tuple["asyncio.Task[Any] | None", "weakref.ref[AsyncConnection]"]

#: Threads that send cancels, at most (see PoolCore.cancel).
CANCEL_THREADS = 4

# Spreads disconnect_all over its interval: connection i goes at
# frac(i * golden ratio) of the way, an even, deterministic stagger.
_GOLDEN = 0.6180339887498949


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
            barge_window=options.barge_window, call_later=self.scheduler.call_later)
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
        self.watcher = LoanWatcher(self)
        #: Sends cancels (see :meth:`cancel`).
        self.cancels = ThreadPoolExecutor(CANCEL_THREADS,
                                          thread_name_prefix=f"{options.name}-cancel")
        self.stopped = threading.Event()
        #: Why the pool stopped: None for a requested stop, else the error.
        self.exit_error: BaseException | None = None
        #: (start, interval) of the latest disconnect_all, if any.
        self._flush: tuple[float, float] | None = None
        self._recycling = options.max_lifetime is not None
        self._monitors: list[Monitor] = []
        self._monitor_lock = threading.Lock()

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

    def lend(
        self, timeout: float, queue: bool, where: Location | None, caller: Any = None
    ) -> Connection:
        """Check out a connection for this thread (see :meth:`Pool.checkout`).

        ``caller`` is for the ownership pool, which lends the connection of
        that owner; a plain pool ignores it.
        """
        started = time.monotonic()
        try:
            while True:
                slot = self.queue.get(started, timeout, queue)
                conn = self.accept(slot, started, timeout, where)
                if conn is not None:
                    return conn
        except ConnectionError as error:
            self._report(error)
            raise

    async def alend(
        self, timeout: float, queue: bool, where: Location | None, caller: Any = None
    ) -> Connection:
        """:meth:`lend` for asyncio: the wait never blocks the event loop."""
        started = time.monotonic()
        try:
            while True:
                slot = await self.queue.aget(started, timeout, queue)
                conn = self.accept(slot, started, timeout, where)
                if conn is not None:
                    return conn
        except ConnectionError as error:
            self._report(error)
            raise

    def _report(self, error: ConnectionError) -> None:
        """Emit the connection_error telemetry event for a failed checkout."""
        telemetry.emit("connection_error", {"count": 1}, {"pool": self.name, "error": error})

    def _emit_checkout(self, slot: Slot, started: float) -> None:
        telemetry.emit("checkout", {"queue_time": time.monotonic() - started},
                       {"pool": self.name, "index": slot.index})

    def give_back(self, conn: Connection) -> None:
        """End a loan from its owner's side: clean the slot and check it in."""
        slot = conn._end()
        if slot is None:
            return
        lent_at = slot.lent_at  # before checkin clears it
        self.checkin(slot)
        if "checkin" in _listened and lent_at is not None:
            telemetry.emit("checkin", {"usage_time": time.monotonic() - lent_at},
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
        self.refused(slot, outcome)
        return None

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

    def refused(self, slot: Slot, outcome: Any) -> None:
        """The driver's checkout callback refused a slot: take it back.

        A ``Disconnect`` has it replaced and returns (the caller takes
        another); any other refusal raises its error.
        """
        if isinstance(outcome, Disconnect):
            slot.broken = outcome.error
            self.checkin(slot)
            return
        self.checkin(slot)
        raise outcome.error

    def revoke(self, loan: Loan, error: ConnectionError) -> bool:
        """End someone else's loan now: its holder's next call raises ``error``.

        The running statement is cancelled on the server and the slot gets a
        fresh connection for others; the old one stays with its holder, who
        closes it on its own thread.  False if the loan had ended already.
        """
        loan.revoked = error  # set first, so the holder never sees a bare claim
        if not loan.take():
            loan.revoked = None  # the holder checked in just now
            return False
        slot = loan.slot
        state = slot.driver_state
        self.forget(loan)
        self.queue.record_usage(slot)
        logger.warning("%s", error)
        if state is not None:
            # The cancel is made here, before the holder can close the connection,
            # and sent from another thread: it may wait on the network.  Then the
            # holder is woken at once, even from a read that would never return.
            self.cancel(slot.driver, state)
            interrupt = getattr(slot.driver, "interrupt", None)
            if interrupt is not None:
                try:
                    interrupt(state)
                except Exception:
                    logger.debug("waking the holder of a revoked loan failed", exc_info=True)
        slot.driver_state = None
        self.reconnect(slot, error, taken=True)  # its actor reports it disconnected
        return True

    def cancel(self, driver: Any, state: Any) -> None:
        """Cancel the statement running on a connection, without waiting for it.

        The cancel is prepared now (``driver.prepare_cancel``, no I/O, so the
        connection may close right after) and sent by one of at most
        :data:`CANCEL_THREADS` threads: revokes and the front end's timeouts
        never wait on the network, and a partition cannot pile up threads.
        """
        prepare = getattr(driver, "prepare_cancel", None)
        try:
            send = prepare(state) if prepare is not None else partial(driver.cancel, state)
        except Exception:
            logger.debug("preparing a cancel failed", exc_info=True)
            return
        try:
            self.cancels.submit(_send_cancel, send)
        except RuntimeError:  # shut down: the pool is stopping
            pass

    def forget(self, loan: Loan) -> None:
        """Drop an ended loan from the watcher's table (by its claimer, so it is there)."""
        self.loans.pop(loan.slot.index, None)

    def clean(self, slot: Slot) -> None:
        """Roll back a connection left in a transaction; mark it broken if that fails.

        A driver callback that raises marks it broken too: the slot must still
        go back to the pool, to be replaced.
        """
        if slot.broken is not None:
            return
        driver, state = slot.driver, slot.driver_state
        try:
            status = driver.handle_status(_NO_OPTS, state)
            if not isinstance(status, Ok):
                slot.broken = status.error
                return
            if status.value == "idle":
                return
            outcome = driver.handle_rollback(_NO_OPTS, state)
        except Exception as error:
            logger.error("%s: connection %d failed its checkin check (%s: %s); replacing it",
                         self.name, slot.index, type(error).__name__, error)
            slot.broken = error
            return
        if isinstance(outcome, Ok):
            logger.warning("%s: connection %d was checked in with status %r; rolled back",
                           self.name, slot.index, status.value)
            return
        slot.broken = getattr(outcome, "error", None) or ConnectionError(
            f"connection checked in with status {status.value!r} could not be rolled back")

    def take_from_actor(self, slot: Slot) -> bool:
        """A connection actor's ready slot (connected or pinged): into the queue, or
        False if the pool takes none now (stopping, or drained)."""
        if self.breaker.drained:
            return False
        return self.queue.put(slot)

    def checkin(self, slot: Slot) -> None:
        """Take back a slot: broken or expired ones to their actor, good ones to the queue."""
        if slot.broken is not None:
            self.queue.record_usage(slot)
            self.reconnect(slot, slot.broken)
            return
        if self._recycling:
            reason = self.recycle_reason(slot)
            if reason is not None:
                self.queue.record_usage(slot)
                self.recycle(slot, reason)
                return
        if not self.queue.put(slot):
            self.dispose(slot)

    # -- recycling -------------------------------------------------------

    def disconnect_all(self, interval: float) -> None:
        """Recycle every connection made before now, staggered over ``interval`` seconds."""
        self._flush = (time.monotonic(), max(interval, 0.0))
        self._recycling = True

    def recycle_reason(self, slot: Slot) -> str | None:
        """Why the slot's connection should be replaced now (drain, disconnect_all,
        max_lifetime)."""
        if self.breaker.drained:
            return "the pool was drained"
        now = time.monotonic()
        flush = self._flush
        if flush is not None:
            start, interval = flush
            if slot.connected_at <= start and now >= start + interval * (
                (slot.index * _GOLDEN) % 1.0
            ):
                return "disconnect_all"
        if now >= slot.expires_at:
            return "max_lifetime exceeded"
        return None

    def recycle(self, slot: Slot, reason: str) -> None:
        self.metrics.add("recycled")
        self.reconnect(slot, ConnectionError(f"{self.name}: connection {slot.index}: {reason}"))

    def reconnect(self, slot: Slot, error: BaseException, taken: bool = False) -> None:
        """Have the slot's actor drop the connection and connect again at once."""
        try:
            slot.actor.tell(Reconnect(slot, slot.generation, error, taken=taken))
        except Exception:  # the actor is gone: the pool is stopping
            self.dispose(slot)

    def dispose(self, slot: Slot) -> None:
        """Close a slot's connection here and now (the pool is stopping)."""
        state, slot.driver_state = slot.driver_state, None
        if state is not None:
            error = self.queue.closed
            self.driver.disconnect(error, state)
            self.deliver(ConnectionEvent("disconnected", self.name, slot.index, slot.actor,
                                         slot.backend_pid, reason=str(error or "pool stopped")))

    # -- events ----------------------------------------------------------

    def deliver(self, event: ConnectionEvent) -> None:
        """Give a connection event to the listeners and to telemetry."""
        self.metrics.add("connects" if event.kind == "connected" else "disconnects")
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
        self.cancels.shutdown(wait=False, cancel_futures=True)
        with self._monitor_lock:
            self.exit_error = error
            self.stopped.set()
            monitors, self._monitors = self._monitors, []
        for monitor in monitors:
            _call_monitor(monitor, error)


def _send_cancel(send: Callable[[], object]) -> None:
    try:
        send()
    except Exception as error:  # the statement may have ended; the network may be down
        logger.debug("a cancel failed: %s", error)


def _call_monitor(monitor: Monitor, error: BaseException | None) -> None:
    try:
        monitor(error)
    except Exception:
        logger.exception("pool monitor %r raised", monitor)
