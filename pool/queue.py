"""The checkout queue: idle slots, the callers waiting for one, and load shedding.

This is the hot path.  A caller takes an idle slot under one short lock, with
no actor hop: DBConnection lends connections the same way, through a shared
table, and only waiting involves the pool.  Idle slots are handed out
longest-idle first.  A slot checked in while callers wait goes straight to
the one waiting longest.

Load shedding follows DBConnection's CoDel queue (``connection_pool.ex``;
:mod:`.codel` judges): at checkin, a waiter that waited too long while the
queue is slow is dropped rather than served, and the pool's poll (every
``interval``) drops them all when the queue made no progress since the last
poll.  A dropped caller gets ``ConnectionError(reason="queue_timeout")``.

Waiters are threads (blocked on a lock of their own) or asyncio tasks
(awaiting a future that the checkin resolves through their loop).

Barging, after Go's ``sync.Mutex``: waking a sleeping thread costs about as
much as a whole ``SELECT 1`` here (a futex wake, then a fight for the GIL).
So while the longest waiter has waited less than ``barge_window``, a checkin
leaves its slot idle, and a caller that is already running (often the one
that just checked in) takes it without anyone sleeping or waking.  Once the
head has waited the window out, every checkin hands its slot straight to it,
and a timer hands over any slot left idle, so no waiter is served more than
``barge_window`` later than strict FIFO would serve it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable

from dbpool.actors.slot import Slot
from dbpool.errors import ConnectionError

from .codel import Codel
from .metrics import PoolMetrics

__all__ = ["CheckoutQueue", "drop_error"]

_DROP_ADVICE = (
    "This means requests are coming in and your connection pool cannot serve them fast "
    "enough. You can address this by:\n"
    "  1. Ensuring your database is available and that you can connect to it\n"
    "  2. Tracking down slow queries and making sure they are running fast enough\n"
    "  3. Increasing the pool_size (although this increases resource consumption)\n"
    "  4. Allowing requests to wait longer by increasing queue_target and queue_interval"
)


class _Waiter:
    """A thread blocked in :meth:`CheckoutQueue.get`; woken by releasing its lock."""

    __slots__ = ("error", "lock", "since", "slot")

    def __init__(self, since: float) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.since = since
        self.slot: Slot | None = None
        self.error: BaseException | None = None

    def wake(self, slot: Slot | None, error: BaseException | None) -> None:
        self.slot = slot
        self.error = error
        self.lock.release()


class _AsyncWaiter:
    """An asyncio task awaiting in :meth:`CheckoutQueue.aget`."""

    __slots__ = ("future", "loop", "queue", "since")

    def __init__(self, since: float, queue: CheckoutQueue) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Slot] = self.loop.create_future()
        self.since = since
        self.queue = queue

    def wake(self, slot: Slot | None, error: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._resolve, slot, error)
        except RuntimeError:  # the loop is closed: nobody will take the slot
            if slot is not None:
                self.queue.unserve(slot, self.since)

    def _resolve(self, slot: Slot | None, error: BaseException | None) -> None:
        if self.future.done():  # the task gave up (timeout, cancel) as it was served
            if slot is not None:
                self.queue.unserve(slot, self.since)
        elif error is not None:
            self.future.set_exception(error)
        else:
            assert slot is not None
            self.future.set_result(slot)


class _CallbackWaiter:
    """An event loop of its own (the ZeroMQ front end) waiting for a slot.

    ``wake`` runs ``callback(slot, error)`` on the thread that serves it,
    under the queue's lock: the callback must only record the slot and
    wake its loop.
    """

    __slots__ = ("callback", "since")

    def __init__(self, since: float, callback: Callable[[Slot | None, BaseException | None], object]
                 ) -> None:
        self.since = since
        self.callback = callback

    def wake(self, slot: Slot | None, error: BaseException | None) -> None:
        self.callback(slot, error)


_AnyWaiter = _Waiter | _AsyncWaiter | _CallbackWaiter


class CheckoutQueue:
    """Idle slots plus FIFO waiters, guarded by one lock.

    ``target`` and ``interval`` are CoDel's (seconds); ``max_waiting`` > 0
    bounds the number of waiters.  Counters and histograms go to ``metrics``.
    """

    def __init__(
        self, *, name: str = "dbpool", target: float = 0.05, interval: float = 2.0,
        max_waiting: int = 0, metrics: PoolMetrics | None = None, barge_window: float = 0.0,
        call_later: Callable[[float, Callable[[], object]], object] | None = None,
    ) -> None:
        self.name = name
        self.metrics = metrics if metrics is not None else PoolMetrics()
        self._lock = threading.Lock()
        self._idle: deque[Slot] = deque()
        self._waiters: deque[_AnyWaiter] = deque()
        #: A waiter served before all the others and outside CoDel (wait(first=True)):
        #: the connection budget's reservation (dbpool.pool.budget).  One at a time.
        self._first: _CallbackWaiter | None = None
        self._closed: BaseException | None = None
        #: The circuit breaker's error while the database is unavailable: checkouts
        #: and waiters fail with it at once.
        self._unavailable: ConnectionError | None = None
        #: Checkouts wait (pause, drain); checkins are not handed to waiters.
        self._paused = False
        #: Either of the two: the hot path tests one attribute.
        self._blocked = False
        self._max_waiting = max_waiting
        self._codel = Codel(target, interval, time.monotonic())
        # Barging (see the module docstring): a checkin may leave the slot idle
        # for a running thread while the head waiter is younger than the window.
        self._barge = barge_window if call_later is not None else 0.0
        self._call_later = call_later
        self._settle_armed = False

    # -- callers ---------------------------------------------------------

    def get(self, started: float, timeout: float, queue: bool = True) -> Slot:
        """Take an idle slot, waiting until ``started + timeout`` if ``queue``.

        ``started`` is when the checkout began (``time.monotonic()``).
        Raises :class:`~dbpool.errors.ConnectionError` with reason
        ``queue_disabled``, ``queue_full`` or ``queue_timeout``, or the
        pool's stop error.
        """
        with self._lock:
            idle = self._idle
            if idle and not self._waiters and not self._blocked:  # the hot path: take one
                slot = idle.popleft()
                slot.lent_at = started
                self.metrics.immediate += 1
                return slot
            now = time.monotonic()
            if idle and not self._blocked and self._may_barge(now):
                return self._lend_idle(now)
            waiter = _Waiter(now)
            self._enqueue(waiter, queue)
        if waiter.lock.acquire(timeout=max(started + timeout - now, 0.0)):
            return self._woken(waiter.slot, waiter.error)
        with self._lock:
            if waiter.slot is None and waiter.error is None:
                self._waiters.remove(waiter)
                raise self._timed_out(timeout)
        return self._woken(waiter.slot, waiter.error)  # served just as it timed out

    async def aget(self, started: float, timeout: float, queue: bool = True) -> Slot:
        """:meth:`get` for asyncio: waits without blocking the event loop."""
        with self._lock:
            now = time.monotonic()
            if self._idle and not self._blocked and (not self._waiters or self._may_barge(now)):
                return self._lend_idle(now)
            waiter = _AsyncWaiter(now, self)
            self._enqueue(waiter, queue)
        try:
            return await asyncio.wait_for(waiter.future, max(started + timeout - now, 0.0))
        except BaseException as exc:  # timeout or cancellation: leave the queue
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    # If it was served meanwhile, _resolve gives the slot back.
                    raise self._timed_out(timeout) from None
            raise

    def try_get(self) -> Slot | None:
        """Take an idle slot if one may be taken now, else None; never waits or raises.

        Used by an event loop that cannot block (the ZeroMQ front end); it
        follows :meth:`get`'s rules, barging included.
        """
        with self._lock:
            if not self._idle or self._closed is not None or self._blocked:
                return None
            now = time.monotonic()
            if self._waiters and not self._may_barge(now):
                return None
            return self._lend_idle(now)

    @property
    def has_waiters(self) -> bool:
        """Whether callers wait (read without the lock: a hint, not a promise)."""
        return bool(self._waiters)

    def wait(
        self, callback: Callable[[Slot | None, BaseException | None], object],
        first: bool = False,
    ) -> _CallbackWaiter:
        """Queue a waiter served by ``callback(slot, error)`` (see :class:`_CallbackWaiter`).

        Raises like :meth:`get` if the queue is closed or full.  The waiter
        waits until served or :meth:`cancel_wait`; its caller keeps time.
        With ``first`` it is served by the next checkin, before the waiters and
        outside CoDel, and it neither counts as waiting nor moves the queue's
        longest wait; one such waiter at a time (another raises
        ``ConnectionError``).
        """
        with self._lock:
            now = time.monotonic()
            waiter = _CallbackWaiter(now, callback)
            if first:
                return self._wait_first(waiter, now)
            if self._idle and self._closed is None and not self._blocked and (
                not self._waiters or self._may_barge(now)
            ):  # a slot came back since the caller's try_get
                callback(self._lend_idle(now), None)
                return waiter
            self._enqueue(waiter, True)
            return waiter

    def _wait_first(self, waiter: _CallbackWaiter, now: float) -> _CallbackWaiter:
        if self._closed is not None:
            raise self._closed
        if self._unavailable is not None:
            raise self._unavailable
        if self._first is not None:
            raise ConnectionError(f"{self.name}: a caller already waits first",
                                  reason="queue_full")
        if self._idle and not self._blocked:
            waiter.wake(self._lend_idle(now), None)
        else:
            self._first = waiter
        return waiter

    def cancel_wait(self, waiter: _CallbackWaiter) -> bool:
        """Withdraw a waiter; False if it was served (or failed) already."""
        with self._lock:
            if waiter is self._first:
                self._first = None
                return True
            try:
                self._waiters.remove(waiter)
            except ValueError:
                return False
            return True

    def _may_barge(self, now: float) -> bool:
        """Whether a caller may take an idle slot though others wait; settles if not."""
        if now - self._waiters[0].since < self._barge:
            return True
        self._settle(now)  # the head waited long enough: idle slots are theirs
        return bool(self._idle)

    def _lend_idle(self, now: float) -> Slot:
        slot = self._idle.popleft()
        slot.lent_at = now
        self.metrics.immediate += 1
        return slot

    def _enqueue(self, waiter: _AnyWaiter, queue: bool) -> None:
        if self._closed is not None:
            raise self._closed
        if self._unavailable is not None:
            self.metrics.unavailable += 1
            raise self._unavailable
        if not queue:
            self.metrics.queue_disabled += 1
            raise ConnectionError(
                "connection not available and queuing is disabled", reason="queue_disabled")
        if self._max_waiting and len(self._waiters) >= self._max_waiting:
            self.metrics.queue_full += 1
            raise ConnectionError(
                f"{self.name}: connection not available and the queue is full "
                f"({self._max_waiting} callers waiting; see max_waiting)", reason="queue_full")
        self.metrics.queue_waits += 1
        self._waiters.append(waiter)

    def _timed_out(self, timeout: float) -> ConnectionError:
        self.metrics.queue_timeouts += 1
        return ConnectionError(
            f"{self.name}: connection not available after waiting {timeout:g}s in the queue "
            "(the checkout timeout)", reason="queue_timeout")

    @staticmethod
    def _woken(slot: Slot | None, error: BaseException | None) -> Slot:
        if error is not None:
            raise error
        assert slot is not None
        return slot

    # -- checkin ---------------------------------------------------------

    def put(self, slot: Slot) -> bool:
        """Return a ready slot: to the longest waiter, else to the idle set.

        Records the slot's usage if it was lent.  Returns False, keeping
        nothing, if the queue is closed; the caller then disposes of the
        connection.
        """
        with self._lock:
            now = time.monotonic()
            if slot.lent_at is not None:
                usage = self.metrics.usage  # Histogram.observe, inlined: the hot path
                seconds = now - slot.lent_at
                usage.buckets[bisect_left(usage.bounds, seconds)] += 1
                usage.count += 1
                usage.sum += seconds
            if self._closed is not None:
                slot.lent_at = None
                return False
            if self._first is not None and not self._blocked:
                self._serve_first(slot, now)
                return True
            waiters = self._waiters
            if self._blocked or (not waiters and (self._idle or now < self._codel.next)):
                # Nobody waits and CoDel has no interval to close: just park it.
                slot.lent_at = None
                slot.idle_since = now
                self._idle.append(slot)
                return True
            if waiters and now - waiters[0].since < self._barge:
                self._arm_settle()  # leave it idle for a running thread, for a moment
            elif not self._idle:
                if self._dequeue(now, slot):
                    return True
            elif waiters:  # slots left idle by barging, and the head waited long enough
                self._park(slot, now)
                self._settle(now)
                return True
            self._park(slot, now)
            return True

    def _park(self, slot: Slot, now: float) -> None:
        slot.lent_at = None
        slot.idle_since = now
        self._idle.append(slot)

    def unserve(self, slot: Slot, since: float) -> None:
        """Take back a slot handed to an async waiter that gave up meanwhile.

        Its checkout is struck from the metrics, as nobody received it.
        """
        with self._lock:
            if slot.lent_at is not None:
                delay = slot.lent_at - since
                wait = self.metrics.queue_wait
                wait.buckets[bisect_left(wait.bounds, delay)] -= 1
                wait.count -= 1
                wait.sum -= delay
                self.metrics.checkouts -= 1
                slot.lent_at = None
        self.put(slot)

    def record_usage(self, slot: Slot) -> None:
        """Record the usage of a lent slot that goes back to its actor, not the queue."""
        with self._lock:
            if slot.lent_at is not None:
                self.metrics.usage.observe(time.monotonic() - slot.lent_at)
                slot.lent_at = None

    def _dequeue(self, now: float, slot: Slot) -> bool:
        """CoDel's dequeue: hand ``slot`` to a waiter, dropping late ones if slow."""
        waiters, codel = self._waiters, self._codel
        while waiters:
            waiter = waiters.popleft()
            if codel.serve(now, waiter.since):
                self._serve(waiter, slot, now)
                return True
            self._drop(waiter, now - waiter.since)
        codel.empty(now)
        return False

    def _serve(self, waiter: _AnyWaiter, slot: Slot, now: float) -> None:
        slot.lent_at = now
        self.metrics.checkouts += 1
        self.metrics.queue_wait.observe(now - waiter.since)
        waiter.wake(slot, None)

    def _serve_first(self, slot: Slot, now: float) -> None:
        first, self._first = self._first, None
        assert first is not None
        self._serve(first, slot, now)

    def _take_waiters(self) -> deque[_AnyWaiter]:
        """Every waiter, the first one too, leaving none (to fail them)."""
        waiters, self._waiters = self._waiters, deque()
        if self._first is not None:
            waiters.append(self._first)
            self._first = None
        return waiters

    def _arm_settle(self) -> None:
        if not self._settle_armed and self._call_later is not None:
            self._settle_armed = True
            self._call_later(self._barge, self._settle_later)

    def _settle_later(self) -> None:
        with self._lock:
            self._settle_armed = False
            self._settle(time.monotonic())

    def _settle(self, now: float) -> None:
        """Hand idle slots to waiters (no thread barged in within the window)."""
        if self._first is not None and self._idle and not self._blocked:
            self._serve_first(self._idle.popleft(), now)
        while self._idle and self._waiters and not self._blocked:
            slot = self._idle.popleft()
            if not self._dequeue(now, slot):
                self._idle.appendleft(slot)
                return

    def _drop(self, waiter: _AnyWaiter, delay: float) -> None:
        self.metrics.drops += 1
        waiter.wake(None, drop_error(self.name, delay))

    # -- the pool actor --------------------------------------------------

    def poll(self) -> None:
        """CoDel's periodic check, every ``interval``: shed load if the queue is stuck."""
        with self._lock:
            now = time.monotonic()
            waiters = self._waiters
            late = self._codel.poll(now, waiters[0].since if waiters else None)
            if late is not None:
                while waiters and waiters[0].since < late:
                    waiter = waiters.popleft()
                    self._drop(waiter, now - waiter.since)

    # -- availability (the circuit breaker, pause, drain) ----------------

    def set_unavailable(self, error: ConnectionError | None) -> None:
        """Fail checkouts at once with ``error`` (None: serve again).

        Callers already waiting get ``error`` now, not at their timeouts.
        """
        with self._lock:
            self._unavailable = error
            self._blocked = error is not None or self._paused
            waiters = self._take_waiters() if error is not None else deque()
            if error is None:
                self._settle(time.monotonic())
        for waiter in waiters:
            self.metrics.unavailable += 1
            waiter.wake(None, error)

    def pause(self) -> None:
        """Hold checkouts: they wait (with their timeouts) until :meth:`resume`."""
        with self._lock:
            self._paused = True
            self._blocked = True

    def resume(self) -> None:
        """Serve again: waiting checkouts get the idle connections."""
        with self._lock:
            self._paused = False
            self._blocked = self._unavailable is not None
            self._settle(time.monotonic())

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def blocked(self) -> bool:
        """Paused or unavailable: no checkout is served now (read without the lock)."""
        return self._blocked

    def take_idle(self, idle_since_before: float, limit: int) -> list[Slot]:
        """Remove up to ``limit`` slots idle since before the given time, oldest first."""
        taken: list[Slot] = []
        with self._lock:
            idle = self._idle
            while idle and len(taken) < limit and idle[0].idle_since <= idle_since_before:
                taken.append(idle.popleft())
        return taken

    def longest_wait(self, now: float) -> float:
        """Seconds the longest waiter has waited (0 if none waits)."""
        with self._lock:
            return now - self._waiters[0].since if self._waiters else 0.0

    def take_slots(self, indexes: set[int]) -> list[Slot]:
        """Remove the idle slots whose index is in ``indexes`` (a resize retires them)."""
        with self._lock:
            taken = [slot for slot in self._idle if slot.index in indexes]
            for slot in taken:
                self._idle.remove(slot)
        return taken

    def close(self, error: BaseException) -> list[Slot]:
        """Refuse all further checkouts with ``error``; fail the waiters; return idle slots."""
        with self._lock:
            self._closed = error
            waiters = self._take_waiters()
            idle, self._idle = list(self._idle), deque()
        for waiter in waiters:
            waiter.wake(None, error)
        return idle

    @property
    def closed(self) -> BaseException | None:
        return self._closed

    def counts(self) -> tuple[int, int]:
        """``(ready_conn_count, checkout_queue_length)``."""
        with self._lock:
            return len(self._idle), len(self._waiters)


def drop_error(name: str, delay: float) -> ConnectionError:
    """The error of a request CoDel dropped after ``delay`` seconds in ``name``'s queue."""
    return ConnectionError(
        f"{name}: connection not available and request was dropped from queue after "
        f"{delay * 1000:.0f}ms. {_DROP_ADVICE}", reason="queue_timeout")
