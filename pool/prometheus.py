"""The pool's metrics for Prometheus: ``register(pool)`` and a ``/metrics`` shows its pools.

::

    from prometheus_client import start_http_server
    from dbpool.pool.prometheus import register

    register(pool)          # the default registry; or register(pool, registry=...)
    start_http_server(9187)

It needs ``prometheus_client`` (the ``metrics`` extra).  Nothing is counted
twice and nothing runs on the checkout path: at each scrape the collector
reads :meth:`~dbpool.pool.Pool.metrics` and reports it, every series with a
``pool`` label (as HikariCP's exporter does):

- ``dbpool_connections{state="idle"|"in_use"|"connecting"|"down"}``,
  ``dbpool_waiters``, ``dbpool_pool_size``, ``dbpool_paused``,
  ``dbpool_budget_slots{state="held"|"wanting"}`` (with a shared budget),
  ``dbpool_breaker_state{state="closed"|"open"|"half_open"}`` (1 for the
  state the circuit is in);
- counters ``dbpool_checkouts_total``, ``dbpool_queue_waits_total``,
  ``dbpool_queue_timeouts_total``, ``dbpool_codel_drops_total``,
  ``dbpool_queue_full_total``, ``dbpool_unavailable_total``,
  ``dbpool_connects_total``, ``dbpool_connect_errors_total``,
  ``dbpool_disconnects_total``, ``dbpool_recycles_total``,
  ``dbpool_deadlines_total``, ``dbpool_reclaimed_total``,
  ``dbpool_grown_total``, ``dbpool_shrunk_total`` (elastic sizing);
- histograms ``dbpool_queue_wait_seconds``, ``dbpool_usage_seconds`` and
  ``dbpool_connect_seconds``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("dbpool's Prometheus metrics need prometheus_client: "
                      "pip install 'dbpool[metrics]'") from exc

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["PoolCollector", "histogram_buckets", "pool_metric_families", "register"]

#: Counter series: (metric name without ``dbpool_``/``_total``, key in pool.metrics(), help).
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("checkouts", "checkouts", "connections lent"),
    ("queue_waits", "queue_waits", "checkouts that waited in the queue"),
    ("queue_timeouts", "queue_timeouts", "waits that ran out of time"),
    ("codel_drops", "drops", "waiters dropped by the CoDel queue"),
    ("queue_full", "queue_full", "checkouts refused: max_waiting already waited"),
    ("unavailable", "unavailable", "checkouts failed at once: the circuit was open"),
    ("connects", "connects", "connections made"),
    ("connect_errors", "connect_errors", "failed connect attempts"),
    ("disconnects", "disconnects", "connections closed or lost"),
    ("recycles", "recycled", "connections replaced by disconnect_all or max_lifetime"),
    ("deadlines", "deadlines", "loans revoked at their deadline"),
    ("reclaimed", "reclaimed", "abandoned loans taken back"),
    ("grown", "grown", "connections an elastic pool added under load"),
    ("shrunk", "shrunk", "connections an elastic pool closed after max_idle unused"),
)
#: Histogram series: (metric name without ``dbpool_``/``_seconds``, key, help).
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("queue_wait", "queue_wait", "seconds a checkout waited for a connection"),
    ("usage", "usage", "seconds a connection was held, checkout to checkin"),
    ("connect", "connect_time", "seconds a connect took"),
)
BREAKER_STATES = ("closed", "open", "half_open")
CONNECTION_STATES = ("idle", "in_use", "connecting", "down")


class PoolCollector(Collector):
    """Reports the pools ``pools()`` yields, at each scrape (see the module docstring)."""

    def __init__(self, pools: Callable[[], Iterable[Pool]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        rows = [(pool.name, pool.metrics()) for pool in self._pools() if pool.alive]
        yield from pool_metric_families(rows)


def pool_metric_families(rows: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """The metric families of pools, from ``(name, pool.metrics())`` rows."""
    connections = GaugeMetricFamily("dbpool_connections", "connections by state",
                                    labels=["pool", "state"])
    waiters = GaugeMetricFamily("dbpool_waiters", "checkouts waiting for a connection",
                                labels=["pool"])
    size = GaugeMetricFamily("dbpool_pool_size", "connections the pool keeps open",
                             labels=["pool"])
    paused = GaugeMetricFamily("dbpool_paused", "1 while the pool is paused or drained",
                               labels=["pool"])
    budget = GaugeMetricFamily("dbpool_budget_slots",
                               "slots of the shared connection budget this pool holds, and "
                               "its connections waiting for one",
                               labels=["pool", "state"])
    breaker = GaugeMetricFamily("dbpool_breaker_state",
                                "1 for the state the circuit breaker is in",
                                labels=["pool", "state"])
    counters = {name: CounterMetricFamily(f"dbpool_{name}", text, labels=["pool"])
                for name, _, text in COUNTERS}
    histograms = {name: HistogramMetricFamily(f"dbpool_{name}_seconds", text,
                                              labels=["pool"])
                  for name, _, text in HISTOGRAMS}
    for name, metrics in rows:
        for state in CONNECTION_STATES:
            connections.add_metric([name, state], metrics["connections"][state])
        waiters.add_metric([name], metrics["checkout_queue_length"])
        size.add_metric([name], metrics["pool_size"])
        paused.add_metric([name], 1 if metrics["paused"] else 0)
        if "budget" in metrics:
            budget.add_metric([name, "held"], metrics["budget"]["held"])
            budget.add_metric([name, "wanting"], metrics["budget"]["wanting"])
        for state in BREAKER_STATES:
            breaker.add_metric([name, state], 1 if metrics["health"] == state else 0)
        for metric, key, _ in COUNTERS:
            counters[metric].add_metric([name], metrics[key])
        for metric, key, _ in HISTOGRAMS:
            histogram = metrics[key]
            histograms[metric].add_metric([name], histogram_buckets(histogram["buckets"]),
                                          histogram["sum"])
    yield from (connections, waiters, size, paused, breaker, budget)
    yield from counters.values()
    yield from histograms.values()


def histogram_buckets(cumulative: dict[float, int]) -> list[tuple[str, float]]:
    """``{le: count}`` as prometheus_client wants it: the last bound is ``+Inf``."""
    return [("+Inf" if math.isinf(bound) else repr(bound), count)
            for bound, count in cumulative.items()]


def register(pool: Pool, registry: CollectorRegistry | None = None) -> PoolCollector:
    """Report ``pool`` to ``registry`` (the default one if None); return the collector,
    which ``registry.unregister(collector)`` removes."""
    collector = PoolCollector(lambda: (pool,))
    (REGISTRY if registry is None else registry).register(collector)
    return collector
