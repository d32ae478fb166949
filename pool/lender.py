"""Lending to a caller that must never block: an event loop that drives connections itself.

``dbpool serve``'s front end is one thread serving every remote client; it
cannot wait in :meth:`Pool.checkout`.  ``pool.lender()`` gives it (or any
such loop) the pool's queue without the waiting:

- :meth:`Lender.try_borrow` lends an idle connection now, or returns None;
- :meth:`Lender.wait` queues for the next one like any other caller (fairly,
  behind in-process callers already waiting), and calls back, on whatever
  thread checks it in, with an :class:`Offer` that the loop then turns into
  a connection with :meth:`Lender.take` on its own thread;
- :meth:`Lender.give_back` returns a connection; one marked with
  :meth:`Connection.mark_broken` is replaced rather than lent again;
- :meth:`Lender.wants_back` says whether the pool wants a borrowed connection
  back though nothing is wrong with it (the pool shrank past it, or it is due
  for replacement): a borrower that keeps connections between requests gives
  it no new work and returns it once its requests are done, or a busy
  borrower would keep it past ``max_lifetime`` or a resize for ever;
- :meth:`Lender.cancel` and :meth:`Lender.interrupt` stop a statement, or
  wake whoever waits on the connection's socket, without blocking.

A borrowed connection has no deadline: the borrower enforces its own.  Its
:attr:`Connection.driver_state` is the driver's state, for a borrower that
drives the connection itself (the psycopg driver's is a
:class:`~dbpool.pgdriver.PgState`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbpool.actors.slot import Slot

from .connection import Connection

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["Lender", "Offer"]

logger = logging.getLogger("dbpool.pool")

_FOREVER = float("inf")

#: What :meth:`Lender.wait` hands its callback: a connection to :meth:`Lender.take`.
Offer = Slot


class Lender:
    """Non-blocking borrowing from one pool (see the module docstring)."""

    __slots__ = ("_core", "_queue")

    def __init__(self, core: PoolCore) -> None:
        self._core = core
        self._queue = core.queue

    @property
    def name(self) -> str:
        """The pool's name."""
        return self._core.name

    @property
    def driver(self) -> Any:
        """The pool's driver."""
        return self._core.driver

    @property
    def blocked(self) -> bool:
        """Whether the pool lends nothing now (paused, or its circuit open): a borrower
        should give new work to no connection it holds, and wait or fail like any
        caller."""
        return self._queue._blocked  # read at every request: one hop, not two

    @property
    def has_waiters(self) -> bool:
        """Whether other callers wait for a connection (a borrower should give back
        the ones it does not need at once)."""
        queue = self._queue
        return bool(queue._waiters) or queue._first is not None

    def try_borrow(self) -> Connection | None:
        """An idle connection, lent now, or None if none is idle."""
        core = self._core
        while True:
            slot = core.queue.try_get()
            if slot is None:
                return None
            conn = self.take(slot)
            if conn is not None:
                return conn

    def wait(self, callback: Callable[[Offer | None, BaseException | None], None], *,
             first: bool = False) -> Any:
        """Queue for the next connection (with ``first``, the next one checked in, ahead
        of the callers waiting: see :meth:`CheckoutQueue.wait`); return a handle for
        :meth:`cancel_wait`.

        ``callback(offer, None)`` or ``callback(None, error)`` is called once,
        on any thread (under the queue's lock: hand over to your own thread
        and return).  Raises ``ConnectionError`` at once if the queue takes no
        more waiters.
        """
        return self._core.queue.wait(callback, first)

    def cancel_wait(self, waiter: Any) -> bool:
        """Leave the queue; False if the callback has been called already."""
        return self._core.queue.cancel_wait(waiter)

    def take(self, offer: Offer) -> Connection | None:
        """Lend the connection an :meth:`wait` callback offered, or None if it died
        while idle (it is being replaced; wait again)."""
        try:
            return self._core.accept(offer, time.monotonic(), _FOREVER, None)
        except Exception:
            logger.exception("%s: the driver refused a connection", self._core.name)
            return None

    def wants_back(self, conn: Connection) -> bool:
        """Whether the pool wants ``conn`` back as soon as its work is done: the pool
        shrank past it, the recycler is due to replace it (``max_lifetime``,
        ``disconnect_all``), or the connection budget needs it for a moment (to
        reserve a slot with)."""
        slot = conn._slot
        core = self._core
        if slot.index in core.checkin.retired:
            return True
        budget = core.budget
        if budget is not None and budget.asks_back(slot.index):
            return True
        recycler = core.recycler
        return recycler.recycling and recycler.reason(slot) is not None

    def give_back(self, conn: Connection) -> None:
        """Return a borrowed connection (rolled back if left in a transaction)."""
        self._core.checkin.take_back(conn)

    def cancel(self, conn: Connection) -> None:
        """Ask the server to cancel the statement running on ``conn``; never blocks."""
        state = conn.driver_state
        if state is not None:
            self._core.canceller.cancel(self._core.driver, state)

    def interrupt(self, conn: Connection) -> None:
        """Wake at once whatever waits on ``conn``'s socket (the driver shuts it down),
        leaving the connection unusable; mark it broken and give it back."""
        interrupt = getattr(self._core.driver, "interrupt", None)
        state = conn.driver_state
        if interrupt is not None and state is not None:
            try:
                interrupt(state)
            except Exception:
                logger.debug("interrupting a borrowed connection failed", exc_info=True)
