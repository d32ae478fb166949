"""Read replicas and failover (``replicas``, ``readonly``; dbpool.pool.replicas), on two
private clusters with synchronous streaming replication, all on loopback.

- 1,000 read-only queries all run where ``pg_is_in_recovery()`` is true,
  and writes go to the primary; with the replica stopped, read-only queries
  fall back to the primary with no error, and ``readonly="replica"`` fails
  fast;
- a replica whose replay is paused falls behind past ``max_replica_lag`` and
  leaves the rotation until it catches up;
- failover: with a multi-host primary (``target_session_attrs=read-write``),
  after the primary stops and the standby is promoted, writes fail fast
  while no primary exists, succeed again within ``backoff_max`` + 2 s, and
  nothing acknowledged before the switch is lost;
- through ``dbpool serve``: ``readonly`` requests and transactions of the
  client run on the replica, the others on the primary, and a read that
  loses its replica connection mid-flight runs again on the primary, unless
  its client has given up on it;
- the DB-API (in-process and remote) and SQLAlchemy (an engine on a pool,
  and the ``postgresql+dbpool://`` dialect) read from the replica too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy
import zmq

from dbpool import dbapi
from dbpool.client import Client
from dbpool.dbapi.sqlalchemy import create_engine
from dbpool.errors import ConnectionError, ProtocolError
from dbpool.pool import Pool
from dbpool.wire import packb, unpackb
from tests.support.faultproxy import ProxyFactory
from tests.support.frontend import front_end
from tests.support.pgcluster import PgCluster

#: Every commit on the primary waits until the standby has applied it (so that a
#: read on the replica right after a write sees it).
SYNCHRONOUS = {"synchronous_standby_names": "*", "synchronous_commit": "remote_apply"}
BACKOFF = {"backoff_min": 0.1, "backoff_max": 0.5}


@pytest.fixture
def replicated(pg_template: Any) -> Iterator[tuple[PgCluster, PgCluster]]:
    primary = PgCluster(template=pg_template, settings=SYNCHRONOUS)
    standby: PgCluster | None = None
    try:
        primary.start()
        standby = primary.standby()
        standby.start()
        with psycopg.connect(primary.conninfo(), autocommit=True) as admin:
            deadline = time.monotonic() + 30
            while admin.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state "
                                "= 'sync'").fetchone() != (1,):
                assert time.monotonic() < deadline, "the standby never streamed"
                time.sleep(0.05)
        yield primary, standby
    finally:
        if standby is not None:
            standby.cleanup()
        primary.cleanup()


def _in_rotation(pool: Pool, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(r["in_rotation"] for r in pool.replica_status()):
        assert time.monotonic() < deadline, pool.replica_status()
        time.sleep(0.02)


def test_reads_go_to_the_replica_writes_to_the_primary_and_fall_back(
        replicated: tuple[PgCluster, PgCluster]) -> None:
    primary, standby = replicated
    with Pool.start(primary.conninfo(), replicas=[standby.conninfo()], pool_size=2,
                    idle_interval=0.2, **BACKOFF) as pool:
        _in_rotation(pool)
        reads = [pool.query("SELECT pg_is_in_recovery()", readonly=True).rows[0][0]
                 for _ in range(1000)]
        assert reads == [True] * 1000
        assert pool.query("SELECT pg_is_in_recovery()").rows == [(False,)]
        pool.query("CREATE TABLE written (x int)")
        pool.query("INSERT INTO written VALUES (1)")
        # Synchronous replication: the replica has it, and reads it.
        assert pool.query("SELECT count(*) FROM written", readonly="replica").rows == [(1,)]
        with pool.transaction(readonly=True) as tx:
            assert tx.query("SELECT pg_is_in_recovery()").rows == [(True,)]
        with pool.checkout(readonly=True) as conn:
            assert conn.query("SELECT pg_is_in_recovery()").rows == [(True,)]
        with pool.transaction() as tx:  # a read inside a write transaction stays on it
            assert tx.query("SELECT pg_is_in_recovery()").rows == [(False,)]
            assert pool.query("SELECT pg_is_in_recovery()", readonly=True).rows == [(False,)]

        standby.stop()
        fallback = [pool.query("SELECT pg_is_in_recovery()", readonly=True).rows[0][0]
                    for _ in range(200)]
        assert fallback[-1] is False  # no error on the way: every read was answered
        deadline = time.monotonic() + 10
        while any(r["in_rotation"] for r in pool.replica_status()):
            assert time.monotonic() < deadline
            pool.query("SELECT 1", readonly=True)
        started = time.monotonic()
        with pytest.raises(ConnectionError) as caught:
            pool.query("SELECT 1", readonly="replica")
        assert caught.value.reason == "unavailable" and time.monotonic() - started < 0.5

        standby.start()
        _in_rotation(pool)
        assert pool.query("SELECT pg_is_in_recovery()", readonly=True).rows == [(True,)]


def test_a_lagging_replica_leaves_the_rotation_until_it_catches_up(
        replicated: tuple[PgCluster, PgCluster]) -> None:
    primary, standby = replicated
    with Pool.start(primary.conninfo(), replicas=[standby.conninfo()], pool_size=2,
                    idle_interval=0.2, max_replica_lag=1.0, **BACKOFF) as pool, \
            psycopg.connect(standby.conninfo(), autocommit=True) as on_standby:
        _in_rotation(pool)
        on_standby.execute("SELECT pg_wal_replay_pause()")
        with pool.transaction() as tx:  # received, not replayed: do not wait for that
            tx.query("SET LOCAL synchronous_commit TO local")
            tx.query("CREATE TABLE lagging (x int)")
        deadline = time.monotonic() + 10
        while any(r["in_rotation"] for r in pool.replica_status()):
            assert time.monotonic() < deadline, pool.replica_status()
            time.sleep(0.05)
        (status,) = pool.replica_status()
        assert status["lag"] > 1.0 and status["health"] == "closed"
        assert pool.query("SELECT pg_is_in_recovery()", readonly=True).rows == [(False,)]
        on_standby.execute("SELECT pg_wal_replay_resume()")
        _in_rotation(pool)
        assert pool.query("SELECT count(*) FROM lagging", readonly=True).rows == [(0,)]


def test_the_pool_follows_a_promoted_standby(
        replicated: tuple[PgCluster, PgCluster]) -> None:
    primary, standby = replicated
    hosts = (f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} user=postgres "
             "dbname=postgres target_session_attrs=read-write connect_timeout=2")
    with Pool.start(hosts, pool_size=2, idle_interval=0.2, **BACKOFF) as pool:
        pool.query("CREATE TABLE acked (x int)")
        acknowledged = 0
        for n in range(100):
            pool.query("INSERT INTO acked VALUES (%s)", [n])
            acknowledged += 1
        primary.stop()
        # No primary now: writes fail, and fast.
        failures = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and failures < 5:
            started = time.monotonic()
            try:
                pool.query("INSERT INTO acked VALUES (-1)", timeout=2.0)
            except psycopg.OperationalError:
                failures += 1
                assert time.monotonic() - started < 2.5
            else:
                pytest.fail("a write succeeded with no primary")
        assert failures == 5
        with psycopg.connect(standby.conninfo(), autocommit=True) as promote:
            promote.execute("SELECT pg_promote()")
        promoted = time.monotonic()
        while True:
            try:
                pool.query("INSERT INTO acked VALUES (100)", timeout=1.0)
                break
            except psycopg.OperationalError:
                assert time.monotonic() - promoted < 0.5 + 2, "writes did not resume in time"
                time.sleep(0.05)
        assert time.monotonic() - promoted <= 0.5 + 2
        rows = pool.query("SELECT count(*) FROM acked WHERE x BETWEEN 0 AND 99").rows
        assert rows == [(acknowledged,)]
        assert pool.query("SELECT pg_is_in_recovery()").rows == [(False,)]


def test_remote_reads_go_to_the_replica_through_the_service(
        replicated: tuple[PgCluster, PgCluster]) -> None:
    primary, standby = replicated
    with Pool.start(primary.conninfo(), replicas=[standby.conninfo()], pool_size=2,
                    idle_interval=0.2, **BACKOFF) as pool:
        _in_rotation(pool)
        with front_end(pool) as front, Client(front.endpoint, timeout=10) as client:
            recovery = "SELECT pg_is_in_recovery()"
            assert [client.query(recovery, readonly=True).rows[0][0]
                    for _ in range(100)] == [True] * 100
            assert client.query(recovery).rows == [(False,)]
            assert client.execute(recovery, readonly="replica").rows == [(True,)]
            assert client.batch([(recovery, None)], readonly=True)[0].rows == [(True,)]
            with client.transaction(readonly=True) as tx:
                assert tx.query(recovery).rows == [(True,)]
            with client.transaction() as tx:
                assert tx.query(recovery).rows == [(False,)]
            status = client.status()["pools"]
            assert status["default/replica-0"]["checkouts"] > 0
            with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
                raw.connect(front.endpoint)
                raw.send(packb({"v": 1, "id": 1, "op": "query", "sql": "SELECT 1",
                                "readonly": "yes"}))
                assert raw.poll(5000)
                assert unpackb(raw.recv())["error"]["code"] == "bad_request"
            # A read whose replica connection is lost mid-flight runs again on the primary.
            sleeper = "SELECT pg_is_in_recovery() FROM pg_sleep(2)"
            outcome: list[Any] = []
            reader = threading.Thread(target=lambda: outcome.append(
                client.query(sleeper, readonly=True).rows))
            reader.start()
            with psycopg.connect(standby.conninfo(), autocommit=True) as admin:
                deadline = time.monotonic() + 10
                while admin.execute("SELECT count(pg_terminate_backend(pid)) FROM "
                                    "pg_stat_activity WHERE query = %s",
                                    [sleeper]).fetchone() != (1,):
                    assert time.monotonic() < deadline, "the read never reached the replica"
                    time.sleep(0.02)
            reader.join(15)
            assert outcome == [[(False,)]]
            standby.stop()
            deadline = time.monotonic() + 10
            while any(r["in_rotation"] for r in pool.replica_status()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert client.query(recovery, readonly=True).rows == [(False,)]
            with pytest.raises(ConnectionError) as caught:
                client.query(recovery, readonly="replica")
            assert caught.value.reason == "unavailable"
            assert not isinstance(caught.value, ProtocolError)


def test_the_adapters_read_from_the_replica(replicated: tuple[PgCluster, PgCluster]) -> None:
    primary, standby = replicated
    recovery = "SELECT pg_is_in_recovery()"
    with Pool.start(primary.conninfo(), replicas=[standby.conninfo()], pool_size=2,
                    idle_interval=0.2, **BACKOFF) as pool:
        _in_rotation(pool)
        for readonly, expected in ((True, True), (False, False)):
            conn = dbapi.connect(pool=pool, readonly=readonly)
            try:
                cur = conn.cursor()
                cur.execute(recovery)
                assert cur.fetchone() == (expected,)
            finally:
                conn.close()
        reader = create_engine(pool, readonly=True)
        writer = create_engine(pool)
        with reader.connect() as on_reader, writer.connect() as on_writer:
            assert on_reader.execute(sqlalchemy.text(recovery)).scalar() is True
            assert on_writer.execute(sqlalchemy.text(recovery)).scalar() is False
        reader.dispose()
        writer.dispose()
        with front_end(pool) as front:
            remote = dbapi.connect(front.endpoint, readonly="replica")
            try:
                cur = remote.cursor()
                cur.execute(recovery)  # in a transaction: DB-API begins one
                assert cur.fetchone() == (True,)
                remote.commit()
            finally:
                remote.close()
            host, port = front.endpoint.removeprefix("tcp://").rsplit(":", 1)
            engine = sqlalchemy.create_engine(
                f"postgresql+dbpool://{host}:{port}/?readonly=true")
            with engine.connect() as on_remote:
                assert on_remote.execute(sqlalchemy.text(recovery)).scalar() is True
            engine.dispose()


def test_a_remote_read_past_its_deadline_is_not_run_again_on_the_primary(
        pg_dsn: str, fault_proxy: ProxyFactory) -> None:
    # The "replica" is the same database behind a proxy, so that its network can go
    # away under a read; the read counts on a sequence, which shows whether it ran.
    sequence = f"replica_read_{time.monotonic_ns()}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SEQUENCE {sequence}")
        try:
            info = psycopg.conninfo.conninfo_to_dict(pg_dsn)
            proxy = fault_proxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)))
            with Pool.start(pg_dsn, replicas=[proxy.wrap_conninfo(pg_dsn)], pool_size=1,
                            idle_interval=0.2) as pool:
                _in_rotation(pool)
                replica = pool.replicas[0]
                with front_end(pool, timeout=0.5) as front, \
                        Client(front.endpoint, timeout=1.0) as client:
                    assert client.query("SELECT 1", readonly=True).rows == [(1,)]
                    lost = replica.metrics()["disconnects"]
                    proxy.blackhole(True)  # the read hangs there past its deadline
                    with pytest.raises(ConnectionError):
                        client.query(f"SELECT nextval('{sequence}')", readonly=True)
                    deadline = time.monotonic() + 10
                    while replica.metrics()["disconnects"] == lost:  # dropped as stuck
                        assert time.monotonic() < deadline, "the stuck read was never dropped"
                        time.sleep(0.05)
                    assert client.query("SELECT 1").rows == [(1,)]  # the primary serves
            row = admin.execute(f"SELECT is_called FROM {sequence}").fetchone()
            assert row == (False,), "the read ran on the primary after its client gave up"
        finally:
            admin.execute(f"DROP SEQUENCE {sequence}")
