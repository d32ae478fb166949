"""A timer thread for actors.

pykka has no timers.  A :class:`Scheduler` runs callables at a time in the
future on one daemon thread; actors use it to ``tell`` themselves a message
later (a reconnect after backoff, the next idle sweep).  Scheduled callables
must be quick and must not block: typically a ``tell``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

__all__ = ["Scheduler", "TimerHandle"]

logger = logging.getLogger("dbpool.actors.scheduler")


@dataclass(order=True, slots=True)
class TimerHandle:
    """A scheduled call; :meth:`cancel` stops it from running."""

    when: float
    seq: int
    fn: Callable[[], object] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Runs callables after a delay, in order, on one thread."""

    def __init__(self, name: str = "dbpool-scheduler") -> None:
        self._heap: list[TimerHandle] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], object]) -> TimerHandle:
        """Run ``fn`` once, ``delay`` seconds from now."""
        handle = TimerHandle(time.monotonic() + max(delay, 0.0), next(self._seq), fn)
        with self._cond:
            if self._stopped:
                handle.cancelled = True
                return handle
            heapq.heappush(self._heap, handle)
            if self._heap[0] is handle:
                self._cond.notify()
        return handle

    def tell_later(self, delay: float, ref: pykka.ActorRef[Any], message: Any) -> TimerHandle:
        """Tell ``ref`` the ``message`` after ``delay``; a dead actor is skipped."""

        def tell() -> None:
            try:
                ref.tell(message)
            except pykka.ActorDeadError:
                pass

        return self.call_later(delay, tell)

    def tell_soon(self, delay: float, ref: pykka.ActorRef[Any], message: Any) -> None:
        """:meth:`tell_later`, but told at once (no trip through this thread) if
        ``delay`` is not positive."""
        if delay <= 0:
            ref.tell(message)
        else:
            self.tell_later(delay, ref, message)

    def stop(self) -> None:
        """Drop every pending call and end the thread."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                    not self._heap or self._heap[0].when > time.monotonic()
                ):
                    timeout = self._heap[0].when - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                handle.fn()
            except Exception:
                logger.exception("scheduled call %r failed", handle.fn)
