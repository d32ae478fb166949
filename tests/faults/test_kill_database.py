"""``kill -9`` of PostgreSQL under load, then a restart, again and again.

A private cluster (with ``synchronous_commit`` on: see :func:`durable_cluster`)
is crashed by SIGKILL of its postmaster and every backend
(:meth:`~tests.support.pgcluster.PgCluster.kill`), then started again (crash
recovery), :data:`CYCLES` times (the short versions: 2) while
:data:`THREADS` threads insert rows, each in a committed transaction with a
unique id:

- in-process (:func:`pool_writers`): ``pool.transaction`` with a deadline;
- remote (:func:`remote_writers`): a :class:`~dbpool.client.Client` per thread
  against ``dbpool serve``, ``begin`` / ``query`` / ``commit``, each request
  with a timeout.

Each insert whose commit was acknowledged is recorded.  What is counted:

- lost acknowledged commits: recorded ids missing from the table at the
  end (must be 0);
- hung calls: calls (remote: requests) that took longer than their timeout
  plus :data:`MARGIN` (must be 0);
- recovery: after each restart, how long until an insert is acknowledged
  again (must be within :data:`RECOVERY` every time), and the pool or server
  whole again at the end.

Each cycle waits for writes to succeed, kills, waits until a call has seen
the crash, restarts, and waits for an acknowledged insert: waits on
conditions, no sleeps.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from dbpool.client import Client
from dbpool.pool import Pool
from tests.support.events import wait_for
from tests.support.load import Load, describe, ended, outcomes, quantiles
from tests.support.pgcluster import ClusterFactory, PgCluster
from tests.support.remote import ServerProcess

CYCLES = 20
SHORT_CYCLES = 2
THREADS = 6
SIZE = 4
#: Each call's timeout: the pool checkout's deadline, or each remote request's.
CALL_TIMEOUT = 5.0
#: How much longer than its timeout a call may take before it counts as hung.
MARGIN = 1.0
#: Small reconnect steps, so that the pool tries again soon after the restart:
#: recovery is bounded by one backoff step plus a connect.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 0.5
#: After a restart, an insert must be acknowledged within this many seconds.
RECOVERY = BACKOFF_MAX + 2.5
#: Acknowledged inserts to see before each kill (the load is running).
BEFORE_KILL = 50

TABLE = "acks"


@pytest.fixture
def durable_cluster(pg_cluster_factory: ClusterFactory) -> PgCluster:
    """A private cluster that keeps every acknowledged commit through a crash.

    The harness runs its clusters with ``synchronous_commit=off`` for speed,
    with which a crash may lose the last acknowledged commits by design;
    this campaign counts exactly those, so it turns it on.  ``fsync=off``
    stays: a killed process loses nothing the kernel already has.
    """
    cluster = pg_cluster_factory(synchronous_commit=True)
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, writer text NOT NULL)")
    return cluster


def committed(cluster: PgCluster) -> set[int]:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        return {row[0] for row in conn.execute(f"SELECT id FROM {TABLE}")}


@dataclass
class Cycle:
    killed: float
    noticed: float  # the first call that failed after the kill ended
    restarted: float  # start() returned
    recovered: float  # the first acknowledged insert after the restart ended

    def line(self, index: int) -> str:
        return (f"kill {index + 1:2d}: a call failed {self.noticed - self.killed:.2f}s after "
                f"the kill, restarted after {self.restarted - self.killed:.2f}s, first ack "
                f"{self.recovered - self.restarted:.2f}s after the restart")


@dataclass
class Writers:
    """A load of inserting threads and what to do when it has stopped."""

    load: Load
    close: Callable[[], None]
    #: Durations of single requests, where a call makes several (remote).
    requests: list[float]


def pool_writers(pool: Pool, ids: Iterator[int]) -> Writers:
    def insert() -> int:
        n = next(ids)
        pool.transaction(lambda conn: conn.query(
            f"INSERT INTO {TABLE} (id, writer) VALUES (%s, 'pool')", [n]), timeout=CALL_TIMEOUT)
        return n

    return Writers(Load([insert] * THREADS, name="kill-pool"), lambda: None, [])


def remote_writers(endpoint: str, ids: Iterator[int]) -> Writers:
    clients = [Client(endpoint, timeout=CALL_TIMEOUT) for _ in range(THREADS)]
    requests: list[float] = []

    def timed(call: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return call()
        finally:
            requests.append(time.monotonic() - started)

    def writer(client: Client) -> Callable[[], int]:
        def insert() -> int:
            n = next(ids)
            tx = timed(lambda: client.transaction(timeout=CALL_TIMEOUT))
            try:
                timed(lambda: tx.query(f"INSERT INTO {TABLE} (id, writer) VALUES (%s, 'remote')",
                                       [n], timeout=CALL_TIMEOUT))
            except BaseException:
                try:
                    timed(lambda: tx.rollback(timeout=CALL_TIMEOUT))
                except Exception:  # the lease is gone with its connection: that is all
                    pass
                raise
            timed(lambda: tx.commit(timeout=CALL_TIMEOUT))
            return n

        return insert

    def close() -> None:
        for client in clients:
            client.close()

    return Writers(Load([writer(c) for c in clients], name="kill-remote"), close, requests)


def run_kills(cluster: PgCluster, writers: Writers, cycles: int, title: str,
              whole: Callable[[], bool]) -> None:
    load = writers.load.start()
    history: list[Cycle] = []
    try:
        for _ in range(cycles):
            load.wait_ok(time.monotonic(), BEFORE_KILL, 15)
            killed = time.monotonic()
            cluster.kill()
            failed = load.wait_first(ended(killed, ok=False), CALL_TIMEOUT + MARGIN,
                                     "a call to see the crash")
            cluster.start()
            restarted = time.monotonic()
            first = load.wait_first(ended(restarted, ok=True), 30,
                                    "an insert to be acknowledged after the restart")
            history.append(Cycle(killed, failed.end, restarted, first.end))
        load.wait_ok(time.monotonic(), BEFORE_KILL, 15)
    finally:
        calls = load.stop()
        writers.close()
    wait_for(whole, 10, "the pool to be whole again")
    acked = {c.value for c in calls if c.ok}
    lost = sorted(acked - committed(cluster))
    timed = writers.requests or [c.duration for c in calls]
    hung = [d for d in timed if d > CALL_TIMEOUT + MARGIN]
    recoveries = [c.recovered - c.restarted for c in history]
    print(f"\n== {title}: {cycles} kills, {THREADS} writers, pool_size={SIZE}, "
          f"timeout {CALL_TIMEOUT:g}s")
    for index, cycle in enumerate(history):
        print(f"   {cycle.line(index)}")
    print(f"   calls: {len(calls)} {outcomes(calls)}")
    print(f"   acknowledged inserts: {len(acked)}, lost: {len(lost)} {lost[:10]}")
    kind = "requests" if writers.requests else "calls"
    print(f"   {kind}: {len(timed)}, median/p99/max {quantiles(timed)}, "
          f"hung (> {CALL_TIMEOUT + MARGIN:g}s): {len(hung)}")
    print(f"   recovery after a restart: median/p99/max {quantiles(recoveries)}")
    slowest = max(calls, key=lambda c: c.duration)
    print(f"   slowest call: {slowest.duration:.3f}s ({describe(slowest.error)})")

    assert not lost, f"{len(lost)} acknowledged commits lost: {lost[:20]}"
    assert not hung, f"{len(hung)} {kind} hung past {CALL_TIMEOUT + MARGIN:g}s: {sorted(hung)}"
    slow = [(i + 1, r) for i, r in enumerate(recoveries) if r > RECOVERY]
    assert not slow, f"(kill, seconds to the first ack after the restart) over {RECOVERY:g}s: " \
                     f"{slow}"
    assert len(history) == cycles


# -- in-process ---------------------------------------------------------------------------


def kill_in_process(cluster: PgCluster, pools: list[Pool], cycles: int) -> None:
    pool = Pool.start(cluster.conninfo(), name=f"kill-{uuid.uuid4().hex[:8]}", pool_size=SIZE,
                      backoff_min=BACKOFF_MIN, backoff_max=BACKOFF_MAX)
    pools.append(pool)
    wait_for(lambda: pool.metrics()["ready_conn_count"] == SIZE, 10, "the pool to connect")
    run_kills(cluster, pool_writers(pool, itertools.count(1)), cycles, "kill -9, in-process",
              lambda: pool.health == "closed" and pool.metrics()["ready_conn_count"] == SIZE)


def test_kill_database_in_process_short(durable_cluster: PgCluster, pools: list[Pool]) -> None:
    kill_in_process(durable_cluster, pools, SHORT_CYCLES)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_database_in_process_20_times(durable_cluster: PgCluster,
                                           pools: list[Pool]) -> None:
    kill_in_process(durable_cluster, pools, CYCLES)


# -- through dbpool serve ---------------------------------------------------------------------


def kill_remote(cluster: PgCluster, cycles: int) -> None:
    with ServerProcess(cluster.conninfo(), "--timeout", str(CALL_TIMEOUT),
                       "--backoff-min", str(BACKOFF_MIN), "--backoff-max", str(BACKOFF_MAX),
                       pool_size=SIZE) as server, \
            Client(server.endpoint, timeout=CALL_TIMEOUT) as observer:

        def whole() -> bool:
            status = observer.status()
            return bool(status["health"] == "closed"
                        and status["pool"]["ready_conn_count"] == SIZE
                        and status["server"]["open_leases"] == 0)

        wait_for(whole, 10, "the server's pool to connect")
        run_kills(cluster, remote_writers(server.endpoint, itertools.count(1)), cycles,
                  "kill -9, through dbpool serve", whole)
        assert observer.query("SELECT 1").rows == [(1,)]
        assert server.process.poll() is None, "the server died"


def test_kill_database_remote_short(durable_cluster: PgCluster) -> None:
    kill_remote(durable_cluster, SHORT_CYCLES)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_database_remote_20_times(durable_cluster: PgCluster) -> None:
    kill_remote(durable_cluster, CYCLES)
