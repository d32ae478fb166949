"""The proxy: one owner's connection, lent in turn to the owner and to those it allows.

This is DBConnection's ``Ownership.Proxy``.  The ownership manager makes a
proxy when an owner checks out (explicitly, or on first use in auto mode),
and ends it when the ownership ends.  In between:

- **Taking.** The first client that needs the connection takes one from the
  pool's queue, on its own thread, and ``post_checkout`` runs on it.
- **Lending.** The owner and the owners it allowed are the proxy's clients.
  They take turns through a one-slot :class:`~dbpool.pool.queue.CheckoutQueue`
  (waiting, ``queue=False`` and timeouts work as in the pool), and each turn
  is a :class:`~dbpool.pool.loans.Loan` with its own deadline, guarded by
  the pool's loan watcher like any other checkout.
- **Losing.** A client that finds the connection broken checks it in as
  usual; the proxy gives it back to its actor to be replaced
  (``pre_checkin`` sees ``("disconnect", error)``), keeps the ownership, and
  its next client takes a fresh connection from the pool.
- **Ending.** An idle connection goes back to the pool after
  ``pre_checkin("checkin", ...)`` (or ``("disconnect", error)`` when the
  ownership timed out).  A connection in use is taken from its client as a
  deadline would take it: the statement is cancelled, the connection
  replaced, and the client's next call raises ``ConnectionError``.

Whoever holds the slot when the proxy ends gives it back: the proxy if it
is idle in the proxy's queue, else the client, when it checks in.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from dbpool.actors.scheduler import TimerHandle
from dbpool.actors.slot import Slot
from dbpool.driver import Ok
from dbpool.errors import ConfigurationError, ConnectionError

from ..connection import AsyncConnection, Connection
from ..loans import Location, format_location
from ..metrics import PoolMetrics
from ..queue import CheckoutQueue
from .owners import Owner, describe_owner

if TYPE_CHECKING:
    from .core import OwnershipCore

__all__ = ["CheckinReason", "PostCheckout", "PreCheckin", "Proxy", "ProxyGone", "Reacquire"]

logger = logging.getLogger("dbpool.ownership")

#: Why ``pre_checkin`` is called: a plain checkin, or the connection is to be dropped.
CheckinReason: TypeAlias = "Literal['checkin'] | tuple[Literal['disconnect'], BaseException]"
#: ``post_checkout(driver, state) -> (driver, state)``; raising drops the connection.
PostCheckout: TypeAlias = Callable[[Any, Any], tuple[Any, Any]]
#: ``pre_checkin(reason, driver, state) -> (pool_driver, state)``; raising drops it.
PreCheckin: TypeAlias = Callable[[CheckinReason, Any, Any], tuple[Any, Any]]


class ProxyGone(Exception):
    """The proxy ended while the caller was on its way in: look the owner up again."""


class Reacquire(Exception):
    """The proxy lost its connection while the caller waited: take a fresh one."""


class Proxy:
    """One owned connection and its clients.  See the module docstring."""

    def __init__(
        self, core: OwnershipCore, number: int, owner: Owner, where: Location | None, *,
        post_checkout: PostCheckout | None, pre_checkin: PreCheckin | None,
        ownership_timeout: float | None,
    ) -> None:
        self.core = core
        self.number = number
        self.owner = owner
        #: Owners allowed on this connection besides the owner.
        self.allowed: list[Owner] = []
        #: Where the ownership was taken, for the ownership_timeout message.
        self.where = where
        self.ownership_timeout = ownership_timeout
        self.timer: TimerHandle | None = None
        self._post_checkout = post_checkout
        self._pre_checkin = pre_checkin
        self._lock = threading.Lock()
        self.queue = self._new_queue()
        #: The pool's slot this proxy holds, if it holds one.
        self.slot: Slot | None = None
        # The slot's own driver and state, before post_checkout replaced them.
        self._base: tuple[Any, Any] = (None, None)
        self._pool_lent_at: float | None = None
        self._acquiring = False
        #: Why the proxy ended, once it has.
        self.ended: str | None = None
        self._end_error: ConnectionError | None = None

    def describe(self) -> str:
        return f"proxy {self.number} (owner: {describe_owner(self.owner)})"

    def _new_queue(self) -> CheckoutQueue:
        options = self.core.options
        return CheckoutQueue(
            name=f"{self.core.name}: connection owned by {describe_owner(self.owner)}",
            target=options.queue_target, interval=options.queue_interval,
            metrics=PoolMetrics())

    # -- clients (lent to in turn by dbpool.pool.ownership._async.lending) --

    def claim_acquire(self) -> bool:
        """Whether this caller is the one to take a connection from the pool."""
        with self._lock:
            if self.ended is not None:
                raise ProxyGone(self.ended)
            if self.slot is None and not self._acquiring:
                self._acquiring = True
                return True
            return False

    def usable(self, slot: Slot) -> bool:
        """Run the driver's checkout callback on a slot from the pool (as accept does)."""
        outcome = self.core.driver.checkout(slot.driver_state)
        if isinstance(outcome, Ok):
            return True
        self.core.checkin.refused(slot, outcome)  # raises, unless it only has it replaced
        return False

    def acquire_failed(self) -> None:
        """Taking a connection failed: let the next waiter try in its turn."""
        with self._lock:
            self._acquiring = False
            old = self._replace_queue()
        old.close(Reacquire())

    async def ainstall(self, slot: Slot) -> None:
        """:meth:`install` on a worker thread: post_checkout may do I/O (the
        sandbox's BEGIN), not on the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.install, slot)

    def install(self, slot: Slot) -> None:
        """Make a slot just taken from the pool ours: run post_checkout, queue it."""
        base = (slot.driver, slot.driver_state)
        driver, state = base
        if self._post_checkout is not None:
            try:
                driver, state = self._post_checkout(*base)
            except BaseException as error:
                logger.error("%s: connection %d disconnected: post_checkout raised %s: %s",
                             self.core.name, slot.index, type(error).__name__, error)
                slot.broken = error
                self.core.checkin.place(slot)
                self.acquire_failed()
                raise
        with self._lock:
            self._acquiring = False
            ended = self.ended
            self._base, self._pool_lent_at = base, slot.lent_at
            slot.driver, slot.driver_state, slot.lent_at = driver, state, None
            if ended is None:
                self.slot = slot
                self.core.holders[slot.index] = self
        if ended is not None:  # the ownership ended while we took it: give it straight back
            self._give_back(slot, "checkin")
            raise ProxyGone(ended)
        if not self.queue.put(slot):
            self._finish(slot)  # ended just now; the queue closed under us

    def alend_slot(self, slot: Slot, started: float, timeout: float,
                   where: Location | None) -> AsyncConnection:
        """:meth:`lend_slot`, lending to an asyncio task."""
        return AsyncConnection(self.lend_slot(slot, started, timeout, where))

    def lend_slot(self, slot: Slot, started: float, timeout: float,
                  where: Location | None) -> Connection:
        """Make our slot, taken from our queue, a loan to this caller.

        Raises :class:`ProxyGone` if the proxy ended meanwhile.
        """
        with self._lock:
            ended = self.ended
            if ended is None:
                return self.core.lend_slot(slot, started, timeout, where)
        self._finish(slot)  # it ended between our turn and here: we hold the slot
        raise ProxyGone(ended)

    def checkin(self, slot: Slot) -> None:
        """A client is done with the slot (its loan has ended and it was cleaned)."""
        if slot.broken is not None:
            self._lose(slot, slot.broken)
            return
        with self._lock:
            ended = self.ended
        if ended is None and self.queue.put(slot):
            return
        self._finish(slot)

    # -- losing and ending -----------------------------------------------

    def _replace_queue(self) -> CheckoutQueue:
        """Give waiters a fresh queue (under the lock); return the old one to close."""
        old = self.queue
        if self.ended is None:
            self.queue = self._new_queue()
        return old

    def _lose(self, slot: Slot, error: BaseException) -> None:
        """The connection broke: have it replaced; the ownership goes on."""
        with self._lock:
            self._release_slot(slot)
            old = self._replace_queue()
        old.close(Reacquire())
        self._give_back(slot, ("disconnect", error))

    def forget(self, slot: Slot) -> None:
        """The slot's connection was taken from its client (revoked): it is no longer ours.

        The connection stays with the client, who closes it; the slot goes
        back to its actor with the pool's own driver.
        """
        with self._lock:
            if self.slot is not slot:
                return
            self._release_slot(slot)
            old = self._replace_queue()
        slot.driver = self._base[0]
        old.close(Reacquire())

    def _release_slot(self, slot: Slot) -> None:
        self.slot = None
        self.core.holders.pop(slot.index, None)

    def end(self, message: str, disconnect: bool) -> None:
        """End the ownership (by the manager).  See the module docstring."""
        with self._lock:
            if self.ended is not None:
                return
            self.ended = message
            if disconnect:
                self._end_error = ConnectionError(message)
            slot = self.slot
            idle = self.queue.close(ProxyGone(message))
            loan = self.core.loans.get(slot.index) if slot is not None and not idle else None
        if self.timer is not None:
            self.timer.cancel()
        if slot is None:
            return
        if idle:
            self._finish(slot)
        elif loan is not None and loan.slot is slot:
            self.core.checkin.revoke(loan, ConnectionError(
                f"{self.core.name}: {message}; the connection was taken from its client, "
                f"{_client(loan.thread, loan.where)}, and is being replaced"))
        # Otherwise a client is between our queue and its loan, or checking in:
        # it sees self.ended and gives the slot back itself.

    def _finish(self, slot: Slot) -> None:
        """Give back the slot at the end of the ownership."""
        with self._lock:
            if self.slot is slot:
                self._release_slot(slot)
        error = self._end_error
        self._give_back(slot, "checkin" if error is None else ("disconnect", error))

    def _give_back(self, slot: Slot, reason: CheckinReason) -> None:
        """Run pre_checkin, restore the pool's driver and state, and check the slot in."""
        base_driver, base_state = self._base
        state = base_state
        if self._pre_checkin is not None:
            try:
                driver, state = self._pre_checkin(reason, slot.driver, slot.driver_state)
                if driver is not base_driver:
                    raise ConfigurationError(
                        f"pre_checkin must return the pool's own driver {base_driver!r}, "
                        f"got {driver!r}")
            except BaseException as error:
                logger.error("%s: connection %d disconnected: pre_checkin raised %s: %s",
                             self.core.name, slot.index, type(error).__name__, error)
                state, slot.broken = base_state, error
        slot.driver, slot.driver_state = base_driver, state
        if reason != "checkin" and slot.broken is None:
            slot.broken = reason[1]
        slot.lent_at = self._pool_lent_at
        self.core.checkin.place(slot)

    # -- metrics ---------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """DBConnection's entry for a proxy: ready is 1 while it holds an idle connection."""
        ready, waiting = self.queue.counts()
        return {"source": ("proxy", self.number), "owner": describe_owner(self.owner),
                "ready_conn_count": ready, "checkout_queue_length": waiting}


def _client(thread: threading.Thread, where: Location | None) -> str:
    """Who holds a lent connection: its thread, where it checked out, where it is now."""
    text = f"thread {thread.name!r}, checked out at {format_location(where)}"
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is not None:
        stack = "".join(traceback.format_stack(frame, limit=6))
        text += f", still using it at:\n{stack}"
    return text
