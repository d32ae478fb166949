"""A client process that dies mid-transaction, again and again: how soon is it rolled back?

Each run starts a client in a process of its own
(:class:`tests.support.remote.TransactionChild`) that begins a transaction on
``dbpool serve``, inserts a row with a key of the run's own, and holds the
transaction open.  Then the test ends the client and measures, from the
signal, how long until the transaction is rolled back: the server's pool is
whole again (no lease open, every connection idle) and no session of the
server's is left ``idle in transaction`` on the (private) cluster.  The key
is then free -- an ``INSERT`` of it neither waits for a lock (the
transaction would still be open) nor collides (it would have committed).

- **SIGKILL** (:data:`RUNS` runs, short: 3), against a server with
  ``--heartbeat-timeout 10``: the kernel closes the client's connections,
  the server's socket monitor reports them, and the lease is rolled back at
  once.  The median must be under :data:`ROLLBACK_WITHIN`; with a 10 s
  heartbeat timeout only a closed connection can explain that, and each
  run's log line must say so.
- **SIGSTOP** (:data:`STOP_RUNS` runs, short: 1), against a server with
  ``--heartbeat-timeout 1``: the connections stay open and silent, so only
  the heartbeat timeout can end the lease: after it, and not long before.

Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import itertools
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import errors as pg_errors

from dbpool.client import Client
from tests.support.events import wait_for
from tests.support.pgcluster import PgCluster
from tests.support.remote import ServerProcess, TransactionChild, expiry_line, pool_whole

RUNS = 20
SHORT_RUNS = 3
STOP_RUNS = 5
SHORT_STOP_RUNS = 1
SIZE = 4
#: The heartbeat timeout of the SIGKILL runs: much longer than ROLLBACK_WITHIN.
LONG_HEARTBEAT = 10.0
#: The heartbeat timeout of the SIGSTOP runs.
HEARTBEAT = 1.0
#: The median time from SIGKILL to the rollback must be under this.
ROLLBACK_WITHIN = 1.0
#: A stopped client's last heartbeat went out at most a third of the heartbeat
#: timeout before the stop (the client sends one every third), so the lease
#: ends no sooner than this after the stop ...
STOP_EARLIEST = HEARTBEAT * 2 / 3 - 0.05
#: ... and no later than this (the server looks every 50 ms; the rollback and
#: our polling take a moment).
STOP_LATEST = HEARTBEAT + 0.75
TABLE = "doomed"


#: Why the server ended a lease, as its log line says.
CLOSED = "its client's connections closed"


@dataclass(frozen=True)
class Run:
    elapsed: float  # seconds from the signal to the rollback
    why: str  # why the server said it rolled back


@pytest.fixture
def cluster(pg_cluster: PgCluster) -> Iterator[PgCluster]:
    with psycopg.connect(pg_cluster.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {TABLE} (k int PRIMARY KEY)")
    yield pg_cluster


class Judge:
    """Reads the cluster directly, on a connection of its own."""

    def __init__(self, cluster: PgCluster) -> None:
        self.conn = psycopg.connect(cluster.conninfo(application_name="judge"),
                                    autocommit=True)

    def in_transaction(self) -> int:
        """Sessions of the server's pool left inside a transaction."""
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbpool' "
            "AND state LIKE 'idle in transaction%'").fetchone()
        assert row is not None
        return int(row[0])

    def key_free(self, key: int) -> bool:
        """Whether ``key`` can be inserted at once (then the insert is undone)."""
        try:
            with self.conn.transaction(force_rollback=True):
                self.conn.execute("SET LOCAL lock_timeout = '2s'")
                self.conn.execute(f"INSERT INTO {TABLE} (k) VALUES (%s)", [key])
        except (pg_errors.LockNotAvailable, pg_errors.UniqueViolation):
            return False
        return True

    def keys(self) -> list[int]:
        return [k for (k,) in self.conn.execute(f"SELECT k FROM {TABLE} ORDER BY k")]

    def close(self) -> None:
        self.conn.close()


def die(server: ServerProcess, observer: Client, judge: Judge, key: int, signum: int,
        heartbeat: float) -> Run:
    """One run: a client inserts ``key`` in a transaction and gets ``signum``."""
    assert pool_whole(observer, SIZE), "the pool was not whole before the run"
    with TransactionChild(server.endpoint,
                          f"INSERT INTO {TABLE} (k) VALUES ({key})") as child:
        assert child.rowcount == 1
        assert observer.status()["server"]["open_leases"] == 1
        assert judge.in_transaction() == 1
        sent = child.signal(signum)
        wait_for(lambda: pool_whole(observer, SIZE) and judge.in_transaction() == 0,
                 heartbeat + 5, "the dead client's transaction to be rolled back")
        elapsed = time.monotonic() - sent
        line = server.wait_output(expiry_line(child.lease, child.session, "(?P<why>.*?)"),
                                  timeout=5)
        assert judge.key_free(key), f"key {key}: the transaction was not rolled back"
    return Run(elapsed, line.group("why"))


def campaign(cluster: PgCluster, signum: int, heartbeat: float, runs: int) -> list[Run]:
    name = signal.Signals(signum).name
    done: list[Run] = []
    judge = Judge(cluster)
    keys = itertools.count(1)
    try:
        with ServerProcess(cluster.conninfo(), "--heartbeat-timeout", str(heartbeat),
                           pool_size=SIZE) as server, \
                Client(server.endpoint, timeout=5) as observer:
            wait_for(lambda: pool_whole(observer, SIZE), 10, "the server's pool to connect")
            for _ in range(runs):
                done.append(die(server, observer, judge, next(keys), signum, heartbeat))
            assert observer.query("SELECT 1").rows == [(1,)]
            assert server.process.poll() is None, "the server died"
        assert judge.keys() == [], "a dead client's rows were committed"
    finally:
        judge.close()
        if done:
            times = [run.elapsed for run in done]
            print(f"\n== {name} of a client mid-transaction, --heartbeat-timeout "
                  f"{heartbeat:g}: {len(times)} runs")
            print("   seconds to the rollback: " + " ".join(f"{t:.3f}" for t in times))
            print(f"   median {statistics.median(times):.3f}s, min {min(times):.3f}s, "
                  f"max {max(times):.3f}s")
            print(f"   the server's reasons: {sorted({run.why for run in done})}")
    return done


def killed(cluster: PgCluster, runs: int) -> None:
    done = campaign(cluster, signal.SIGKILL, LONG_HEARTBEAT, runs)
    times = [run.elapsed for run in done]
    median = statistics.median(times)
    assert median < ROLLBACK_WITHIN, \
        f"median {median:.2f}s from SIGKILL to the rollback; runs: {times}"
    assert all(run.why == CLOSED for run in done), done


def stopped(cluster: PgCluster, runs: int) -> None:
    done = campaign(cluster, signal.SIGSTOP, HEARTBEAT, runs)
    times = [run.elapsed for run in done]
    silent = f"no heartbeat from its client within {HEARTBEAT:g}s"
    assert all(run.why == silent for run in done), done
    early = [t for t in times if t < STOP_EARLIEST]
    late = [t for t in times if t > STOP_LATEST]
    assert not early, f"leases of stopped clients ended before the heartbeat timeout: {times}"
    assert not late, f"leases of stopped clients outlived the heartbeat timeout: {times}"


def test_client_killed_mid_transaction_short(cluster: PgCluster) -> None:
    killed(cluster, SHORT_RUNS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_client_killed_mid_transaction_20_runs(cluster: PgCluster) -> None:
    killed(cluster, RUNS)


def test_client_stopped_mid_transaction_short(cluster: PgCluster) -> None:
    stopped(cluster, SHORT_STOP_RUNS)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_client_stopped_mid_transaction_5_runs(cluster: PgCluster) -> None:
    stopped(cluster, STOP_RUNS)
