"""Network partitions between the pool and PostgreSQL, and flows that die silently.

Every scenario runs a private cluster behind a :class:`~tests.support.faultproxy.FaultProxy`
on loopback, with :data:`THREADS` threads (or remote clients) querying in a
loop, each call recorded (:class:`tests.support.load.Load`).

1. **Partition, in-process** (:func:`run_partition`): a pool with
   ``timeout=2.0`` loses the network for 10 s (the short version: 4 s), then
   it heals.  No call may last longer than :data:`BOUND`; calls made during the
   partition fail by their deadline with ``queue_timeout``, ``deadline`` or
   ``unavailable``; a holder stuck in a read that would never return is woken
   by its deadline's revoke (``PgDriver.interrupt``); successful queries
   resume within :data:`RESUME` of the heal; the pool's health reflects the
   outage and comes back (see :func:`check_health`), and an outage longer
   than :data:`OPENS_AFTER` opens the circuit (:func:`check_circuit`).  That
   last check found a bug (revoked connections still counted as up for the
   circuit breaker); :func:`test_a_failed_reconnect_after_revokes_opens_the_circuit`
   guards its fix in a second.
2. **Dead flows never come back** (:func:`run_dead_flows`): the proxy makes
   every open connection silent for ever while new connections go through
   (a NAT or firewall that lost its state), and later drops the dead flows
   (its state times out).  Callers stuck on them fail by their deadline, the
   pool serves again on new flows, and once the dead flows are dropped the
   cluster holds at most ``pool_size`` of the pool's connections
   (``pg_stat_activity``) -- while they are up it holds more.
3. **Partition through ``dbpool serve``** (:func:`run_remote_partition`): the
   server's pool is behind the proxy; remote clients with a request timeout
   get a ``ConnectionError`` with a reason within about that timeout, and the
   server serves again after the heal.

Each full scenario is marked ``slow`` and prints its figures; a short version
runs in the default suite.  The outages are plain waits (they are the
behaviour under test), sampled as they pass; every other wait polls a
condition with a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from dbpool.actors.listeners import ConnectionEvent, HealthEvent
from dbpool.client import Client
from dbpool.errors import ConnectionError
from dbpool.pool import Pool
from tests.support.events import Recorder, wait_for
from tests.support.faultproxy import FaultProxy, ProxyFactory
from tests.support.load import Call, Load, describe, ended, outcomes, quantiles, started
from tests.support.pgcluster import PgCluster
from tests.support.remote import ServerProcess

#: The pool's ``timeout``: every checkout's deadline, queue wait included.
POOL_TIMEOUT = 2.0
#: No call may last longer than this (the deadline, plus scheduling on a busy box).
BOUND = 2.5
#: After the network heals, a query must succeed within this many seconds.
RESUME = 2.0
#: Threads (in-process) or clients (remote) running queries.
THREADS = 8
SIZE = 4
#: Why small backoffs: after a partition heals, a connection whose connect
#: failed waits out its backoff step before it tries again, and while the
#: circuit is open one parked connection probes the database once per step.
#: Recovery after the heal is therefore bounded by one backoff step plus a
#: connect: 0.5 s here, where the default (backoff_max=30) could leave the
#: pool down for up to 30 s after the network came back.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 0.5
FAST: dict[str, Any] = {"backoff_min": BACKOFF_MIN, "backoff_max": BACKOFF_MAX}
#: How a call made during a partition may fail: waiting for a connection past
#: its deadline, holding one past it, or refused at once by the open circuit.
PARTITION_REASONS = frozenset({"queue_timeout", "deadline", "unavailable"})
#: The remote clients' request timeout (also sent to the server as the request's).
REMOTE_TIMEOUT = 2.0
#: Beyond its timeout, how much longer a remote call may take to fail.
REMOTE_MARGIN = 0.5
#: The pool opens its circuit only once a connect has failed, and a connect
#: through a partition fails at libpq's ``connect_timeout`` (5 s, see
#: ``dbpool.pgdriver.NETWORK_DEFAULTS``), which starts when a revoke has made
#: the pool reconnect (at most POOL_TIMEOUT into the outage).  Only an outage
#: longer than this can be expected to open it.
OPENS_AFTER = POOL_TIMEOUT + 5.0 + 1.0
class CircuitStayedClosed(AssertionError):
    """The circuit did not open during an outage long enough to open it."""


# -- helpers ------------------------------------------------------------------------------


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def since(t0: float) -> Callable[[float], str]:
    return lambda t: f"{t - t0:+.2f}s"


def wait_ready(pool: Pool, size: int, timeout: float = 10.0) -> None:
    wait_for(lambda: pool.metrics()["ready_conn_count"] == size, timeout,
             f"{size} idle connections in {pool.name}")


def backends(cluster: PgCluster, application_name: str) -> int:
    """How many sessions named ``application_name`` the cluster holds."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           [application_name]).fetchone()
    assert row is not None
    return int(row[0])


def pool_gauges(pool: Pool) -> tuple[str, int, int]:
    """``(health, ready connections, waiting checkouts)`` of an in-process pool."""
    metrics = pool.metrics()
    return metrics["health"], metrics["ready_conn_count"], metrics["checkout_queue_length"]


@dataclass
class Sample:
    at: float
    health: str
    ready: int
    waiting: int


def watch(read: Callable[[], tuple[str, int, int]], until: float,
          step: float = 0.05) -> list[Sample]:
    """Sample ``read() -> (health, ready, waiting)`` until ``until`` (a partition is
    the behaviour under test: the test waits it out, looking)."""
    samples: list[Sample] = []
    while (now := time.monotonic()) < until:
        samples.append(Sample(now, *read()))
        time.sleep(min(step, max(0.0, until - time.monotonic())))
    return samples


def in_partition(calls: list[Call], cut: float, healed: float, timeout: float) -> list[Call]:
    """The calls made while the network was partitioned whose deadline (``timeout``
    after their start) came before the heal."""
    return [c for c in calls if c.start >= cut and c.start + timeout <= healed]


def wrong_partition_failures(calls: list[Call]) -> dict[str, int]:
    """Calls made during a partition that did not fail with one of PARTITION_REASONS."""
    return outcomes(c for c in calls if not (
        isinstance(c.error, ConnectionError) and c.error.reason in PARTITION_REASONS))


@dataclass
class Figures:
    """What one scenario measured; printed as one block."""

    title: str
    lines: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.lines.append(text)

    def print(self) -> None:
        print(f"\n== {self.title}")
        for line in self.lines:
            print(f"   {line}")


# -- 1. a partition, in-process -----------------------------------------------------------


def start_proxied_pool(pools: list[Pool], proxy: FaultProxy, cluster: PgCluster,
                       listener: Recorder[Any], **options: Any) -> Pool:
    pool = Pool.start(proxy.wrap_conninfo(cluster.conninfo()), name=name("partition"),
                      pool_size=SIZE, timeout=POOL_TIMEOUT, connection_listeners=[listener],
                      **FAST, **options)
    pools.append(pool)
    wait_ready(pool, SIZE)
    return pool


Changes = list[tuple[float, str, str]]


def health_changes(events: list[tuple[float, Any]], cut: float) -> Changes:
    """``(when, previous, state)`` of the pool's health changes from ``cut`` on."""
    return [(t, e.previous, e.state) for t, e in events
            if isinstance(e, HealthEvent) and e.state != e.previous and t >= cut]


def check_health(events: list[tuple[float, Any]], pool: Pool, cut: float, healed: float,
                 figures: Figures) -> Changes:
    """The pool's health reflects the outage and comes back.

    Every connection stuck in the partition is replaced (a ``disconnected``
    event for each); after the heal the circuit is closed and the pool whole
    again.  (Whether the circuit opened: :func:`check_circuit`.)
    """
    at = since(cut)
    lost = {e.index for t, e in events
            if isinstance(e, ConnectionEvent) and e.kind == "disconnected" and cut <= t < healed}
    changes = health_changes(events, cut)
    figures.add("health: " + (", ".join(f"{p}->{s} at {at(t)}" for t, p, s in changes)
                              or "closed throughout"))
    figures.add(f"connections replaced during the partition: {sorted(lost)}")
    assert lost == set(range(SIZE)), \
        f"connections stuck in the partition were not all replaced: {sorted(lost)}"
    assert changes == [] or changes[-1][2] == "closed", changes
    if changes:
        assert changes[-1][0] >= healed, f"the circuit closed before the heal: {changes}"
    wait_for(lambda: pool.health == "closed" and pool.metrics()["ready_conn_count"] == SIZE,
             5, "the pool to be whole and its circuit closed")
    return changes


def check_circuit(changes: Changes, healed: float, outage: float) -> None:
    """An outage longer than :data:`OPENS_AFTER` opens the circuit before the heal
    (checkouts then fail at once with ``unavailable``)."""
    if outage >= OPENS_AFTER and not [t for t, _p, s in changes if s == "open" and t < healed]:
        raise CircuitStayedClosed(
            f"the circuit never opened during a {outage:g}s partition: {changes}")


def run_partition(cluster: PgCluster, proxy: FaultProxy, pools: list[Pool],
                  outage: float) -> Figures:
    figures = Figures(f"in-process partition of {outage:g}s, pool_size={SIZE}, "
                      f"timeout={POOL_TIMEOUT:g}s, {THREADS} threads")
    listened: Recorder[Any] = Recorder()
    pool = start_proxied_pool(pools, proxy, cluster, listened)
    load = Load([lambda: pool.query("SELECT 1")] * THREADS, name="partition").start()
    newcomers: Load | None = None
    try:
        load.wait_ok(0.0, 200)
        proxy.blackhole(True)
        cut = time.monotonic()
        newcomers = Load([lambda: pool.query("SELECT 1")] * THREADS, name="newcomer").start(
            stagger=(outage - POOL_TIMEOUT) / THREADS)
        samples = watch(lambda: pool_gauges(pool), cut + outage)
        proxy.blackhole(False)
        healed = time.monotonic()
        first = load.wait_first(ended(healed, ok=True), 10, "a query to succeed after the heal")
        load.wait_ok(healed, 100)
    finally:
        calls = load.stop()
        if newcomers is not None:
            calls += newcomers.stop()
    at = since(cut)
    during = in_partition(calls, cut, healed, POOL_TIMEOUT)
    slowest = max(calls, key=lambda c: c.duration)
    resumed = first.end - healed
    figures.add(f"calls: {len(calls)} {outcomes(calls)}")
    figures.add(f"made during the partition, due before the heal: {len(during)} "
                f"{outcomes(during)}, "
                f"median/p99/max {quantiles([c.duration for c in during])}")
    figures.add(f"slowest call: {slowest.duration:.3f}s ({describe(slowest.error)}, "
                f"started {at(slowest.start)})")
    figures.add(f"first success after the heal: {resumed:.3f}s")
    figures.add(f"sampled during the partition: health {sorted({s.health for s in samples})}, "
                f"ready connections {min(s.ready for s in samples)}.."
                f"{max(s.ready for s in samples)}, most waiting "
                f"{max(s.waiting for s in samples)}")
    changes = check_health(listened.items, pool, cut, healed, figures)
    figures.print()

    assert slowest.duration <= BOUND, (
        f"a call lasted {slowest.duration:.2f}s ({describe(slowest.error)}, started "
        f"{at(slowest.start)} from the partition, which lasted {outage:g}s)")
    assert len(during) >= THREADS, f"too few calls during the partition: {len(during)}"
    wrong = wrong_partition_failures(during)
    assert not wrong, f"calls made during the partition that did not fail by their deadline: " \
                      f"{wrong}"
    revoked = [c for c in calls if isinstance(c.error, ConnectionError)
               and c.error.reason == "deadline" and c.start < cut + POOL_TIMEOUT]
    assert revoked, "no holder stuck in the partition was revoked at its deadline"
    assert resumed <= RESUME, f"queries resumed {resumed:.2f}s after the heal"
    check_circuit(changes, healed, outage)  # last: the 10 s run's known failure
    return figures


def test_partition_short(pg_cluster: PgCluster, fault_proxy: ProxyFactory,
                         pools: list[Pool]) -> None:
    run_partition(pg_cluster, fault_proxy(pg_cluster.host, pg_cluster.port), pools, 4.0)


@pytest.mark.slow
def test_partition_10s(pg_cluster: PgCluster, fault_proxy: ProxyFactory,
                       pools: list[Pool]) -> None:
    run_partition(pg_cluster, fault_proxy(pg_cluster.host, pg_cluster.port), pools, 10.0)


def test_a_failed_reconnect_after_revokes_opens_the_circuit(
        pg_cluster: PgCluster, fault_proxy: ProxyFactory, pools: list[Pool]) -> None:
    """The bug the 10 s partition found, in a second: a pool of one connection, whose
    holder is stuck in a partition and revoked at its deadline; the reconnect is refused.
    No connection is up, so that first failure must open the circuit."""
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    pool = Pool.start(proxy.wrap_conninfo(pg_cluster.conninfo()), name=name("revoked"),
                      pool_size=1, backoff_min=5.0, backoff_max=5.0)
    pools.append(pool)
    wait_ready(pool, 1)
    proxy.blackhole(True)
    proxy.refuse(True)  # new connections are reset at once, even in the blackhole
    with pytest.raises(ConnectionError) as info:
        pool.query("SELECT 1", timeout=0.5)
    assert info.value.reason == "deadline"
    wait_for(lambda: pool.metrics()["connect_errors"] >= 1, 5, "the reconnect to fail")
    # The next attempt is a 5 s backoff step away: only this failure can open it.
    wait_for(lambda: pool.health == "open", 1, "the circuit to open")
    assert pool.metrics()["connect_errors"] == 1


# -- 2. dead flows never come back --------------------------------------------------------


def run_dead_flows(cluster: PgCluster, proxy: FaultProxy, pools: list[Pool], rounds: int,
                   hold: float) -> Figures:
    """``rounds`` times: silence every open flow, keep them silent for ``hold`` s, drop them."""
    app = name("deadflows")
    figures = Figures(f"dead flows: {rounds} rounds held {hold:g}s, pool_size={SIZE}, "
                      f"timeout={POOL_TIMEOUT:g}s, {THREADS} threads")
    pool = Pool.start(proxy.wrap_conninfo(cluster.conninfo()), name=app, pool_size=SIZE,
                      timeout=POOL_TIMEOUT, connect_kwargs={"application_name": app}, **FAST)
    pools.append(pool)
    wait_ready(pool, SIZE)
    load = Load([lambda: pool.query("SELECT 1")] * THREADS, name="deadflows").start()
    cuts: list[float] = []
    recoveries: list[float] = []
    held: list[int] = []
    settled: list[float] = []
    try:
        for _ in range(rounds):
            load.wait_ok(time.monotonic(), 100)
            silenced = proxy.silence_all()
            cut = time.monotonic()
            cuts.append(cut)
            assert silenced >= SIZE, f"only {silenced} flows were open to silence"
            first = load.wait_first(started(cut, ok=True), POOL_TIMEOUT + 5,
                                    "a query to succeed on a new flow")
            recoveries.append(first.end - cut)
            # The dead flows stay up for a while (the behaviour under test): the
            # cluster then holds their sessions as well as the new ones.
            time.sleep(max(0.0, cut + hold - time.monotonic()))
            held.append(backends(cluster, app))
            assert proxy.drop_silenced() == silenced
            dropped = time.monotonic()
            wait_for(lambda: backends(cluster, app) <= SIZE, 5,
                     f"at most {SIZE} sessions once the dead flows were dropped")
            settled.append(time.monotonic() - dropped)
        load.wait_ok(time.monotonic(), 100)
    finally:
        calls = load.stop()
    wait_ready(pool, SIZE)
    assert backends(cluster, app) == SIZE
    slowest = max(calls, key=lambda c: c.duration)
    stuck = [c for c in calls if any(c.start < cut < c.end for cut in cuts)]
    figures.add(f"calls: {len(calls)} {outcomes(calls)}")
    figures.add(f"in flight when the flows died: {len(stuck)} {outcomes(stuck)}, "
                f"median/p99/max {quantiles([c.duration for c in stuck])}")
    figures.add(f"slowest call: {slowest.duration:.3f}s ({describe(slowest.error)})")
    figures.add("first success on a new flow after each cut: "
                + " ".join(f"{r:.2f}s" for r in recoveries))
    figures.add(f"sessions on the cluster while dead flows were up: {held} (pool_size {SIZE}); "
                f"at most {SIZE} again "
                + " ".join(f"{s:.2f}s" for s in settled) + " after each drop")
    figures.print()

    assert slowest.duration <= BOUND, \
        f"a call lasted {slowest.duration:.2f}s ({describe(slowest.error)})"
    deadline = [c for c in stuck if isinstance(c.error, ConnectionError)
                and c.error.reason == "deadline"]
    assert len(deadline) >= rounds, f"callers stuck on dead flows: {outcomes(stuck)}"
    wrong = wrong_partition_failures([c for c in stuck if not c.ok])
    assert not wrong, f"callers on dead flows that did not fail by their deadline: {wrong}"
    assert all(r <= POOL_TIMEOUT + RESUME for r in recoveries), \
        f"first success on a new flow after each cut: {recoveries}"
    assert all(n > SIZE for n in held), \
        f"the dead flows held no sessions: {held} (the scenario tests nothing)"
    return figures


def test_dead_flows_short(pg_cluster: PgCluster, fault_proxy: ProxyFactory,
                          pools: list[Pool]) -> None:
    run_dead_flows(pg_cluster, fault_proxy(pg_cluster.host, pg_cluster.port), pools,
                   rounds=1, hold=4.0)


@pytest.mark.slow
def test_dead_flows_three_rounds(pg_cluster: PgCluster, fault_proxy: ProxyFactory,
                                 pools: list[Pool]) -> None:
    run_dead_flows(pg_cluster, fault_proxy(pg_cluster.host, pg_cluster.port), pools,
                   rounds=3, hold=10.0)


# -- 3. a partition through dbpool serve ---------------------------------------------------


def remote_gauges(client: Client) -> tuple[str, int, int]:
    """``(health, ready connections, queued requests)`` of a server."""
    status = client.status(timeout=REMOTE_TIMEOUT)
    return (status["health"], status["pool"]["ready_conn_count"],
            status["server"]["queued"])


def run_remote_partition(cluster: PgCluster, proxy: FaultProxy, outage: float) -> Figures:
    figures = Figures(f"partition of {outage:g}s behind dbpool serve, pool_size={SIZE}, "
                      f"request timeout {REMOTE_TIMEOUT:g}s, {THREADS} clients")
    with ServerProcess(proxy.wrap_conninfo(cluster.conninfo()),
                       "--timeout", str(REMOTE_TIMEOUT), "--backoff-min", str(BACKOFF_MIN),
                       "--backoff-max", str(BACKOFF_MAX), "--name", name("remote-partition"),
                       pool_size=SIZE) as server, \
            Client(server.endpoint, timeout=REMOTE_TIMEOUT) as observer:
        wait_for(lambda: remote_gauges(observer)[1] == SIZE, 10, "the server's pool to connect")
        clients = [Client(server.endpoint, timeout=REMOTE_TIMEOUT) for _ in range(THREADS)]
        newcomers: list[Client] = []
        fresh: Load | None = None

        def caller(client: Client) -> Callable[[], Any]:
            return lambda: client.query("SELECT 1", timeout=REMOTE_TIMEOUT)

        load = Load([caller(c) for c in clients], name="remote").start()
        try:
            load.wait_ok(0.0, 200)
            proxy.blackhole(True)
            cut = time.monotonic()
            newcomers = [Client(server.endpoint, timeout=REMOTE_TIMEOUT)
                         for _ in range(THREADS)]
            fresh = Load([caller(c) for c in newcomers], name="remote-newcomer").start(
                stagger=(outage - REMOTE_TIMEOUT) / THREADS)
            samples = watch(lambda: remote_gauges(observer), cut + outage)
            proxy.blackhole(False)
            healed = time.monotonic()
            first = load.wait_first(ended(healed, ok=True), 10,
                                    "a query to succeed after the heal")
            load.wait_ok(healed, 100)
        finally:
            calls = load.stop()
            if fresh is not None:
                calls += fresh.stop()
            for client in clients + newcomers:
                client.close()
        wait_for(lambda: remote_gauges(observer)[:2] == ("closed", SIZE), 10,
                 "the server's pool to be whole")
        assert observer.query("SELECT 1").rows == [(1,)]
        assert server.process.poll() is None, "the server died"
    at = since(cut)
    during = in_partition(calls, cut, healed, REMOTE_TIMEOUT)
    failed = [c for c in calls if not c.ok]
    slowest = max(calls, key=lambda c: c.duration)
    resumed = first.end - healed
    figures.add(f"calls: {len(calls)} {outcomes(calls)}")
    figures.add(f"made during the partition, due before the heal: {len(during)} "
                f"{outcomes(during)}, median/p99/max {quantiles([c.duration for c in during])}")
    figures.add(f"slowest call: {slowest.duration:.3f}s ({describe(slowest.error)}, "
                f"started {at(slowest.start)})")
    figures.add(f"first success after the heal: {resumed:.3f}s")
    figures.add(f"server sampled during the partition: health "
                f"{sorted({s.health for s in samples})}, ready connections "
                f"{min(s.ready for s in samples)}..{max(s.ready for s in samples)}, most queued "
                f"{max(s.waiting for s in samples)}")
    figures.print()

    unclean = outcomes(c for c in failed
                       if not (isinstance(c.error, ConnectionError) and c.error.reason))
    assert not unclean, f"remote calls that failed other than with a ConnectionError: {unclean}"
    assert slowest.duration <= REMOTE_TIMEOUT + REMOTE_MARGIN, (
        f"a remote call lasted {slowest.duration:.2f}s ({describe(slowest.error)}, started "
        f"{at(slowest.start)} from the partition)")
    assert len(during) >= THREADS, f"too few calls during the partition: {len(during)}"
    assert not [c for c in during if c.ok], f"calls succeeded in a partition: {outcomes(during)}"
    assert resumed <= RESUME, f"remote queries resumed {resumed:.2f}s after the heal"
    return figures


def test_remote_partition_short(pg_cluster: PgCluster, fault_proxy: ProxyFactory) -> None:
    run_remote_partition(pg_cluster, fault_proxy(pg_cluster.host, pg_cluster.port), 4.0)


@pytest.mark.slow
def test_remote_partition_10s(pg_cluster: PgCluster, fault_proxy: ProxyFactory) -> None:
    run_remote_partition(pg_cluster, fault_proxy(pg_cluster.host, pg_cluster.port), 10.0)
