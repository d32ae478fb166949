"""Pool metrics: counters and latency histograms, read with ``pool.metrics()``.

The counters that change on every checkout are updated by the checkout
queue while it holds its lock anyway, so they cost no extra locking on the
hot path.  Rare events (connects, errors) come from actor threads and take
:attr:`PoolMetrics.lock`.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any

__all__ = ["DEFAULT_BUCKETS", "Histogram", "PoolMetrics"]

#: Upper bounds, in seconds, of the latency buckets (Prometheus style).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"),
)


class Histogram:
    """Counts of observations per bucket, plus their count and sum.  Not locked."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.bounds = bounds
        self.buckets = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def snapshot(self, zeros: int = 0) -> dict[str, Any]:
        """``{"count", "sum", "buckets": {le: cumulative count}}``, as Prometheus reports it.

        ``zeros`` adds that many observations of 0 s counted elsewhere.
        """
        cumulative: dict[float, int] = {}
        running = zeros
        for bound, n in zip(self.bounds, self.buckets, strict=True):
            running += n
            cumulative[bound] = running
        return {"count": self.count + zeros, "sum": self.sum, "buckets": cumulative}


class PoolMetrics:
    """Everything :meth:`dbpool.pool.Pool.metrics` reports besides the two gauges.

    Counters:

    - ``checkouts``: connections lent (including to waiters);
    - ``queue_waits``: checkouts that had to wait in the queue;
    - ``queue_timeouts``: waits that ran out of time;
    - ``drops``: waiters dropped by load shedding (CoDel);
    - ``queue_full``: checkouts refused because ``max_waiting`` waited already;
    - ``queue_disabled``: ``queue=False`` checkouts that found nothing idle;
    - ``unavailable``: checkouts failed at once because the circuit was open;
    - ``deadlines``: loans revoked for passing their deadline;
    - ``reclaimed``: abandoned loans the pool took back;
    - ``connects``, ``connect_errors``, ``disconnects``;
    - ``recycled``: connections closed by ``disconnect_all`` or ``max_lifetime``;
    - ``grown``, ``shrunk``: connections an elastic pool added or closed
      (:mod:`dbpool.pool.elastic`).

    Histograms (seconds): ``queue_wait`` (every checkout; 0 when a connection
    was idle), ``usage`` (checkout to checkin) and ``connect_time`` (each
    successful connect).
    """

    COUNTERS = (
        "checkouts", "queue_waits", "queue_timeouts", "drops", "queue_full", "queue_disabled",
        "unavailable", "deadlines", "reclaimed", "connects", "connect_errors", "disconnects",
        "recycled", "grown", "shrunk",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Checkouts served at once from an idle slot.  The hot path bumps this
        #: one integer; snapshots fold it into ``checkouts`` and ``queue_wait``.
        self.immediate = 0
        #: Checkouts served to a waiter.
        self.checkouts = 0
        self.queue_waits = 0
        self.queue_timeouts = 0
        self.drops = 0
        self.queue_full = 0
        self.queue_disabled = 0
        self.unavailable = 0
        self.deadlines = 0
        self.reclaimed = 0
        self.connects = 0
        self.connect_errors = 0
        self.disconnects = 0
        self.recycled = 0
        self.grown = 0
        self.shrunk = 0
        self.queue_wait = Histogram()
        self.usage = Histogram()
        self.connect_time = Histogram()

    def observe_connect(self, seconds: float) -> None:
        """A connection took ``seconds`` to connect (from a connection actor's thread)."""
        with self.lock:
            self.connect_time.observe(seconds)

    def add(self, counter: str, n: int = 1) -> None:
        """Bump a counter from outside the queue lock."""
        with self.lock:
            setattr(self, counter, getattr(self, counter) + n)

    def snapshot(self) -> dict[str, Any]:
        counters: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        counters["checkouts"] += self.immediate
        counters["timeouts"] = self.queue_timeouts + self.deadlines
        counters["queue_wait"] = self.queue_wait.snapshot(zeros=self.immediate)
        counters["usage"] = self.usage.snapshot()
        counters["connect_time"] = self.connect_time.snapshot()
        return counters
