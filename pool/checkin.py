"""Checkin: where a connection goes when it comes back, decided in one place.

A lent connection comes back one way, and once: its holder hands it back
(:meth:`Checkin.take_back`, which ends the loan through
:meth:`Connection._surrender`, a call that decides nothing), or the loan
watcher takes it (:meth:`Checkin.revoke` at a deadline,
:meth:`Checkin.reclaim` for an abandoned one).  Then this module decides,
in order:

1. **clean**: a connection left in a transaction is rolled back; one that
   cannot be is marked broken;
2. **place**: a broken connection goes to its actor to be replaced
   (``reconnect``); one due for recycling (:mod:`dbpool.pool.recycling`) is
   replaced too; a good one goes back to the queue, which hands it to the
   next waiter (or keeps it idle); if the queue is closed, it is closed here.

Nothing here calls back into its caller.  The pool's parts give a
:class:`Checkin` what it needs when they make it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent
from dbpool.actors.messages import Reconnect, Retire
from dbpool.actors.slot import Slot
from dbpool.driver import Disconnect, Driver, Ok
from dbpool.errors import ConnectionError
from dbpool.telemetry import listened as _listened

from .breaker import Breaker
from .cancels import Canceller
from .loans import Loan
from .metrics import PoolMetrics
from .queue import CheckoutQueue
from .recycling import Recycler

if TYPE_CHECKING:
    from .connection import AsyncConnection, Connection

__all__ = ["Checkin"]

logger = logging.getLogger("dbpool.pool")

_NO_OPTS: dict[str, Any] = {}


class Checkin:
    """The checkin policy of one pool (see the module docstring)."""

    def __init__(self, name: str, driver: Driver[Any], queue: CheckoutQueue,
                 loans: dict[int, Loan], breaker: Breaker, recycler: Recycler,
                 metrics: PoolMetrics, canceller: Canceller,
                 deliver: Callable[[ConnectionEvent], None]) -> None:
        self.name = name
        self.driver = driver
        self.queue = queue
        self.loans = loans
        self.breaker = breaker
        self.recycler = recycler
        self.metrics = metrics
        self.canceller = canceller
        self.deliver = deliver
        #: Slot indexes past the pool's size after a resize: their connections close
        #: as they come back, and the pool actor stops their actors.
        self.retired: set[int] = set()

    # -- from the holder ---------------------------------------------------

    def take_back(self, conn: Connection) -> None:
        """The holder hands its connection back: end the loan, clean, place."""
        slot = conn._surrender()
        if slot is None:  # the watcher took it already
            return
        self.loans.pop(slot.index, None)
        lent_at = slot.lent_at  # before place() clears it
        self.clean(slot)
        self.place(slot)
        if "checkin" in _listened and lent_at is not None:
            telemetry.emit("checkin", {"usage_time": time.monotonic() - lent_at},
                           {"pool": self.name, "index": slot.index})

    async def atake_back(self, conn: AsyncConnection) -> None:
        """:meth:`take_back` from an asyncio task: a call its task abandoned
        ends first, and a rollback (I/O) runs on a worker thread, not on the loop."""
        await conn.settle()
        if conn.sync._needs_cleaning():
            await asyncio.get_running_loop().run_in_executor(None, self.take_back, conn.sync)
        else:
            self.take_back(conn.sync)

    def refused(self, slot: Slot, outcome: Any) -> None:
        """The driver's checkout callback refused a slot taken from the queue.

        A ``Disconnect`` has it replaced and returns (the caller takes
        another); any other refusal raises its error.
        """
        if isinstance(outcome, Disconnect):
            slot.broken = outcome.error
            self.place(slot)
            return
        self.place(slot)
        raise outcome.error

    # -- from the loan watcher ---------------------------------------------

    def revoke(self, loan: Loan, error: ConnectionError, metric: str | None = None) -> bool:
        """End someone else's loan now: its holder's next call raises ``error``.

        The running statement is cancelled on the server, the holder is woken
        from any read (the driver's ``interrupt``), and the slot gets a fresh
        connection for others; the old one stays with its holder, who closes
        it on its own thread.  ``metric``, if given, is counted once the loan
        is taken, before the holder is woken.  False if the loan had ended
        already.
        """
        loan.revoked = error  # set first, so the holder never sees a bare claim
        if not loan.take():
            loan.revoked = None  # the holder checked in just now
            return False
        if metric is not None:  # counted before the holder is woken and can look
            self.metrics.add(metric)
        slot = loan.slot
        state = slot.driver_state
        self.loans.pop(slot.index, None)
        self.queue.record_usage(slot)
        logger.warning("%s", error)
        if state is not None:
            # The cancel is made before the holder can close the connection, and
            # sent after the holder is woken (at once, even from a read that would
            # never return): so the holder always finds its connection lost, never
            # the cancel's plain error, which a framework would take for a failed
            # statement and go on with the connection (a rollback on a dead socket).
            cancel = self.canceller.prepare(slot.driver, state)
            interrupt = getattr(slot.driver, "interrupt", None)
            if interrupt is not None:
                try:
                    interrupt(state)
                except Exception:
                    logger.debug("waking the holder of a revoked loan failed", exc_info=True)
            self.canceller.send(cancel)
        slot.driver_state = None
        self.reconnect(slot, error, taken=True)  # its actor reports it disconnected
        return True

    def reclaim(self, loan: Loan, how: str) -> None:
        """Take back a loan its holder abandoned (already claimed by the watcher)."""
        slot = loan.slot
        self.loans.pop(slot.index, None)
        self.metrics.add("reclaimed")
        if loan.exposed and slot.broken is None:
            slot.broken = ConnectionError(
                f"{self.name}: connection {slot.index} was driven directly by its holder "
                "and abandoned: replaced, as what the holder changed in it is unknown")
        self.clean(slot)
        fate = "replacing it" if slot.broken is not None else "returned it to the pool"
        logger.warning(
            "%s: connection %d was %s and never checked in: %s; the pool %s",
            self.name, slot.index, loan.describe(), how, fate)
        self.place(slot)

    # -- from a connection actor ---------------------------------------------

    def from_actor(self, slot: Slot) -> bool:
        """A connection actor's ready slot (connected or pinged): into the queue, or
        False if the pool takes none now (stopping, or drained)."""
        if self.breaker.drained or slot.index in self.retired:
            return False
        return self.queue.put(slot)

    # -- the decisions ---------------------------------------------------------

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

    def place(self, slot: Slot) -> None:
        """A cleaned slot: broken or due ones to their actor, good ones to the queue."""
        if slot.broken is not None:
            self.queue.record_usage(slot)
            self.reconnect(slot, slot.broken)
            return
        if self.recycler.recycling:
            reason = self.recycler.reason(slot)
            if reason is not None:
                self.queue.record_usage(slot)
                self.recycle(slot, reason)
                return
        if slot.index in self.retired:  # the pool shrank past it
            self.queue.record_usage(slot)
            try:
                slot.actor.tell(Retire(slot))
            except Exception:  # the actor is gone: the pool is stopping
                self.dispose(slot)
            return
        if not self.queue.put(slot):
            self.dispose(slot)

    def recycle(self, slot: Slot, reason: str) -> None:
        """Replace a healthy connection (see :mod:`dbpool.pool.recycling`)."""
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
