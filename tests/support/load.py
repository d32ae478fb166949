"""Threads that call a function in a loop and record every call, for fault campaigns.

:class:`Load` runs one thread per function given; each calls its function
again and again until :meth:`Load.stop` (or until its time limit, so that a
failing test cannot leave it running), and records a :class:`Call` per call:
when it started and ended, what it returned and what it raised.  A test
waits on the record (:meth:`Load.wait_ok`, or :meth:`Load.count` with
:func:`tests.support.events.wait_for`) and judges the calls afterwards.

While any load runs, Python's cyclic garbage collector is paused.  A call's
duration is the service's answer time only if nothing in this process stops
the calling threads: a full collection of a whole test session's heap holds
the interpreter for 100-250 ms on this machine, and was seen counted as a
"refusal" that took 0.253 s.  Reference counting still frees everything that
is not in a cycle; the collector runs again when the last load stops.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .events import wait_for

#: Seconds a failed call's thread pauses before its next call, so that callers
#: that fail at once do not starve the threads of the code under test.
PACING = 0.005

_running_lock = threading.Lock()
#: How many loads are running; the collector is paused while it is above 0.
_running = 0


def _load_started() -> None:
    global _running
    with _running_lock:
        _running += 1
        if _running == 1:
            gc.disable()


def _load_stopped() -> None:
    global _running
    with _running_lock:
        _running -= 1
        if _running == 0:
            gc.enable()


@dataclass(frozen=True)
class Call:
    """One call made by a :class:`Load` thread."""

    thread: int
    start: float
    end: float
    value: Any = None
    error: BaseException | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.error is None


def ended(after: float, *, ok: bool) -> Callable[[Call], bool]:
    """Matches calls that succeeded (``ok``) or failed and ended at ``after`` or later."""
    return lambda call: call.ok is ok and call.end >= after


def started(after: float, *, ok: bool) -> Callable[[Call], bool]:
    """Matches calls that succeeded (``ok``) or failed and started at ``after`` or later."""
    return lambda call: call.ok is ok and call.start >= after


def describe(error: BaseException | None) -> str:
    """``"ok"``, or the error's class with its ``reason`` if it has one."""
    if error is None:
        return "ok"
    reason = getattr(error, "reason", None)
    return f"{type(error).__name__}({reason})" if reason else type(error).__name__


def outcomes(calls: Iterable[Call]) -> dict[str, int]:
    """How many calls ended each way (see :func:`describe`)."""
    return dict(Counter(describe(call.error) for call in calls))


def quantiles(values: list[float]) -> str:
    """``median/p99/max`` of ``values`` in seconds, for a report line."""
    if not values:
        return "-"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered):.3f}/{p99:.3f}/{ordered[-1]:.3f}s"


class Load:
    """Threads that each call their function in a loop and record every call.

    ``limit`` bounds how long the threads run, in seconds, should a test
    never call :meth:`stop`.
    """

    def __init__(self, fns: list[Callable[[], Any]], *, limit: float = 300.0,
                 name: str = "load") -> None:
        self._fns = fns
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._began = self._until = 0.0
        self._limit = limit
        self._stagger = 0.0
        self._threads = [threading.Thread(target=self._run, args=(i, fn), daemon=True,
                                          name=f"{name}-{i}") for i, fn in enumerate(fns)]

    def start(self, stagger: float = 0.0) -> Load:
        """Start the threads; thread ``i`` makes its first call ``i * stagger`` s from now."""
        self._began = time.monotonic()
        self._until = self._began + self._limit
        self._stagger = stagger
        _load_started()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> list[Call]:
        """Stop the threads (each finishes its call), close the functions that have a
        ``close``, and return every call made."""
        stopped_before = self._stopping.is_set()
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not stopped_before:  # after the last call has been timed
            _load_stopped()
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        assert not stuck, f"load threads stuck in a call for {timeout:g}s: {stuck}"
        for fn in self._fns:
            close = getattr(fn, "close", None)
            if close is not None:
                close()
        return self.calls()

    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def count(self, match: Callable[[Call], bool]) -> int:
        with self._lock:
            return sum(1 for call in self._calls if match(call))

    def wait_ok(self, after: float, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` calls made from ``after`` on have succeeded."""
        wait_for(lambda: self.count(lambda c: c.ok and c.start >= after) >= count, timeout,
                 f"{count} calls to succeed")

    def first(self, match: Callable[[Call], bool]) -> Call | None:
        """The call that ended first among those that match, if any."""
        with self._lock:
            found = [call for call in self._calls if match(call)]
        return min(found, key=lambda call: call.end) if found else None

    def wait_first(self, match: Callable[[Call], bool], timeout: float, what: str) -> Call:
        """Wait until a call matches; return the one that ended first."""
        found = wait_for(lambda: self.first(match), timeout, what)
        assert isinstance(found, Call)
        return found

    def _run(self, index: int, fn: Callable[[], Any]) -> None:
        first = self._began + index * self._stagger
        if self._stopping.wait(max(0.0, first - time.monotonic())):
            return
        while not self._stopping.is_set() and time.monotonic() < self._until:
            start = time.monotonic()
            value: Any = None
            error: BaseException | None = None
            try:
                value = fn()
            except Exception as exc:
                error = exc
            with self._lock:
                self._calls.append(Call(index, start, time.monotonic(), value, error))
            if error is not None:
                self._stopping.wait(PACING)
