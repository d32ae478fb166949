"""Loans and their watcher: checkout deadlines and abandoned connections.

Every checkout creates a :class:`Loan`: which slot, until when, where in the
caller's code and on which thread.  A loan ends exactly once.  Whoever
*claims* it first ends it: the owner checking in, the :class:`LoanWatcher`
when the deadline passes or the owner's thread has died, or the lent
connection's ``__del__`` when the owner dropped it without checking in.

The watcher is one thread per pool.  It sleeps until the earliest deadline
among the loans (or ``idle_interval``, to look for dead threads) and:

- on a passed deadline, revokes the loan: it cancels the running statement
  on the server and has the slot's actor open a fresh connection for others.
  The owner's next call raises ``ConnectionError(reason="deadline")`` and
  closes the old connection on the owner's own thread;
- on an abandoned loan, rolls the connection back if needed (or replaces
  it) and returns it to the pool, logging where it was checked out.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from types import CodeType
from typing import TYPE_CHECKING

from dbpool.actors.slot import Slot
from dbpool.errors import ConnectionError

if TYPE_CHECKING:
    from .checkin import Checkin
    from .metrics import PoolMetrics

__all__ = ["Loan", "LoanWatcher", "Location", "caller_location"]

logger = logging.getLogger("dbpool.pool")

#: Where a checkout happened: the caller's code object and the byte offset
#: of its current instruction.  The line number is worked out only when it is
#: reported: reading ``frame.f_lineno`` costs more than the rest of a checkout.
Location = tuple[CodeType, int]


def caller_location(depth: int = 2) -> Location:
    """Where the code ``depth`` frames up from here is: by default, our caller's caller.

    Public entry points call this directly, so that it names the user's line.
    """
    frame = sys._getframe(depth)
    return (frame.f_code, frame.f_lasti)


def format_location(where: Location | None) -> str:
    """``file:line in function()`` for a :func:`caller_location`."""
    if where is None:
        return "an unknown place"
    code, offset = where
    line = next((line for start, end, line in code.co_lines() if start <= offset < end), None)
    return f"{code.co_filename}:{line or code.co_firstlineno} in {code.co_name}()"


class Loan:
    """One checkout of one slot.  See the module docstring."""

    __slots__ = ("claim", "deadline", "exposed", "revoked", "slot", "started", "thread",
                 "where")

    def __init__(
        self, slot: Slot, started: float = 0.0, deadline: float = float("inf"),
        where: Location | None = None,
    ) -> None:
        self.slot = slot
        #: When the checkout began (time.monotonic()), queue wait included.
        self.started = started
        self.deadline = deadline
        self.where = where
        self.thread = threading.current_thread()
        #: Set when the watcher revoked the loan at its deadline.
        self.revoked: ConnectionError | None = None
        #: Whether the holder took the driver's state to drive the connection itself:
        #: then nobody knows what it changed, and an abandoned one is replaced.
        self.exposed = False
        # Claiming pops this list; list.pop is atomic, so the owner, the
        # watcher and a __del__ (which must take no lock) can race for it.
        self.claim = [True]

    def take(self) -> bool:
        """Claim the end of the loan; False if someone else already did."""
        try:
            self.claim.pop()
        except IndexError:
            return False
        return True

    def describe(self) -> str:
        return f"checked out at {format_location(self.where)} by thread {self.thread.name!r}"


class LoanWatcher:
    """Ends loans that passed their deadline or were abandoned.  One thread per pool."""

    def __init__(self, name: str, loans: dict[int, Loan], checkin: Checkin,
                 metrics: PoolMetrics, idle_interval: float) -> None:
        self._name = name
        self._loans = loans
        self._checkin = checkin
        self._metrics = metrics
        self._idle_interval = idle_interval
        # SimpleQueue.put is reentrant, so Connection.__del__ may use it.
        self._inbox: queue.SimpleQueue[tuple[Loan, str] | None] = queue.SimpleQueue()
        #: When the thread sweeps next; a loan due earlier must wake it.
        self.wake_at = float("inf")
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run, name=f"{name}-loan-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(None)
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout=10)

    # -- callers ---------------------------------------------------------

    def watch(self, loan: Loan) -> None:
        """A new loan: wake the thread if it is due before the next sweep."""
        if loan.deadline < self.wake_at:
            self._inbox.put(None)

    def abandoned(self, loan: Loan, how: str) -> None:
        """A loan claimed by ``__del__``: reclaim it on the watcher's thread."""
        self._inbox.put((loan, how))

    # -- the thread ------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            wait = self.wake_at - time.monotonic()
            try:
                item = self._inbox.get(timeout=max(wait, 0.0) if wait < 3600 else 3600)
            except queue.Empty:
                item = None
            if self._stopped:
                return
            try:
                if item is not None:
                    self._checkin.reclaim(*item)
                self._sweep()
            except Exception:
                logger.exception("%s: loan watcher failed; continuing", self._name)

    def _sweep(self) -> None:
        self.wake_at = float("inf")  # loans made during the sweep wake us again
        now = time.monotonic()
        next_sweep = now + self._idle_interval
        for loan in list(self._loans.values()):
            if now >= loan.deadline:
                self._revoke(loan)
            elif not loan.thread.is_alive():
                if loan.take():
                    self._checkin.reclaim(loan, "its thread ended while it was checked out")
            else:
                next_sweep = min(next_sweep, loan.deadline)
        self.wake_at = next_sweep

    def _revoke(self, loan: Loan) -> None:
        slot = loan.slot
        error = ConnectionError(
            f"{self._name}: connection {slot.index} was revoked: it was queued and checked "
            f"out for longer than its {loan.deadline - loan.started:g}s timeout "
            f"({loan.describe()}); its statement was cancelled and the connection is being "
            "replaced", reason="deadline")
        self._checkin.revoke(loan, error, metric="deadlines")
