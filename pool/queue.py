"""The checkout queue: idle slots and the callers waiting for one.

This is the hot path.  A caller takes an idle slot under one short lock, with
no actor hop: DBConnection lends connections the same way, through a shared
table, and only waiting involves the pool.  A slot checked in while callers
wait goes straight to the one waiting longest.  Idle slots are handed out
longest-idle first.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from dbpool.actors.slot import Slot
from dbpool.errors import ConnectionError

__all__ = ["CheckoutQueue"]


class _Waiter:
    """A thread blocked in :meth:`CheckoutQueue.get`; woken by releasing its lock."""

    __slots__ = ("error", "lock", "since", "slot")

    def __init__(self, since: float) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.since = since
        self.slot: Slot | None = None
        self.error: BaseException | None = None


class CheckoutQueue:
    """Idle slots plus FIFO waiters, guarded by one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: deque[Slot] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._closed: BaseException | None = None

    # -- callers ---------------------------------------------------------

    def get(self, timeout: float, queue: bool = True) -> Slot:
        """Take an idle slot, waiting up to ``timeout`` seconds if ``queue``.

        Raises :class:`~dbpool.errors.ConnectionError` with reason
        ``queue_disabled`` or ``queue_timeout``, or the pool's stop error.
        """
        with self._lock:
            now = time.monotonic()
            if self._idle:
                slot = self._idle.popleft()
                slot.lent_at = now
                return slot
            if self._closed is not None:
                raise self._closed
            if not queue:
                raise ConnectionError(
                    "connection not available and queuing is disabled", reason="queue_disabled"
                )
            waiter = _Waiter(now)
            self._waiters.append(waiter)
        if waiter.lock.acquire(timeout=max(timeout, 0.0)):
            return self._woken(waiter)
        with self._lock:
            if waiter.slot is None and waiter.error is None:
                self._waiters.remove(waiter)
                raise ConnectionError(
                    f"connection not available after waiting {timeout:g}s in the queue",
                    reason="queue_timeout",
                )
        return self._woken(waiter)  # handed a slot just as it timed out

    @staticmethod
    def _woken(waiter: _Waiter) -> Slot:
        if waiter.error is not None:
            raise waiter.error
        assert waiter.slot is not None
        return waiter.slot

    def put(self, slot: Slot) -> bool:
        """Return a ready slot: to the longest waiter, else to the idle set.

        Returns False, keeping nothing, if the queue is closed; the caller
        then disposes of the connection.
        """
        with self._lock:
            if self._closed is not None:
                slot.lent_at = None
                return False
            now = time.monotonic()
            if self._waiters:
                waiter = self._waiters.popleft()
                slot.lent_at = now
                waiter.slot = slot
                waiter.lock.release()
                return True
            slot.lent_at = None
            slot.idle_since = now
            self._idle.append(slot)
            return True

    # -- the pool actor --------------------------------------------------

    def take_idle(self, idle_since_before: float, limit: int) -> list[Slot]:
        """Remove up to ``limit`` slots idle since before the given time, oldest first."""
        taken: list[Slot] = []
        with self._lock:
            idle = self._idle
            while idle and len(taken) < limit and idle[0].idle_since <= idle_since_before:
                taken.append(idle.popleft())
        return taken

    def close(self, error: BaseException) -> list[Slot]:
        """Refuse all further checkouts with ``error``; fail the waiters; return idle slots."""
        with self._lock:
            self._closed = error
            waiters, self._waiters = self._waiters, deque()
            idle, self._idle = list(self._idle), deque()
        for waiter in waiters:
            waiter.error = error
            waiter.lock.release()
        return idle

    @property
    def closed(self) -> BaseException | None:
        return self._closed

    def counts(self) -> tuple[int, int]:
        """``(ready_conn_count, checkout_queue_length)``."""
        with self._lock:
            return len(self._idle), len(self._waiters)
