"""Lifecycle of ``dbpool serve`` with real processes and a real PostgreSQL.

The server runs in a child process (:class:`tests.support.remote.ServerProcess`);
clients that are to die run in child processes of their own
(:class:`tests.support.remote.TransactionChild`) and are SIGKILLed.
``tests/faults/test_client_death.py`` repeats the client's death and measures it.
What is checked, against ``docs/protocol.md``:

- a client killed mid-transaction: its writes are never committed and its
  connection is back in the pool within the heartbeat timeout;
- heartbeats keep an idle lease alive, silence ends it (``lease_expired``);
- ``lease_max`` ends a lease even while heartbeats keep coming;
- a lease used by another session: ``lease_not_owned``, and the owner's
  transaction is unaffected (nor kept alive by the intruder);
- a statement past its request timeout is cancelled on the server;
- a client (sync and async) finds a restarted server by itself;
- subscriptions see connections drop and come back when PostgreSQL stops
  and starts;
- SIGTERM: in-flight work finishes, new work is refused, open transactions
  are rolled back after the grace period, connections are closed, exit 0.

Waits poll a condition with a deadline; the only plain waits are the idle
periods that are themselves the behaviour under test (a transaction held
idle while heartbeats run).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import zmq
from psycopg import errors as pg_errors

from dbpool import wire
from dbpool.client import AsyncClient, Client, Event, Subscription, Transaction
from dbpool.errors import ConnectionError, PoolStoppedError, ProtocolError
from dbpool.protocol import VERSION
from tests.support.events import wait_for
from tests.support.pgcluster import PgCluster
from tests.support.remote import (
    ServerProcess,
    TransactionChild,
    expiry_line,
    pool_whole,
    restart,
)

#: ``--heartbeat-timeout`` of the tests about silent clients (seconds).
HEARTBEAT = 1.0
#: How much later than the heartbeat timeout a dead client's lease may end.
MARGIN = 1.5
#: ``[pool]`` options that make the pool notice a dead server and reconnect quickly.
FAST_POOL_TOML = """\
[pool]
idle_interval = 0.2
backoff_min = 0.1
backoff_max = 0.5
"""


# -- helpers ------------------------------------------------------------------------------


class Servers:
    """Starts ``dbpool serve`` processes and stops whatever is left at teardown."""

    def __init__(self) -> None:
        self.started: list[ServerProcess] = []

    def start(self, dsn: str, *args: str, pool_size: int = 4) -> ServerProcess:
        server = ServerProcess(dsn, *args, pool_size=pool_size)
        self.started.append(server)
        return server

    def restart(self, server: ServerProcess) -> ServerProcess:
        new = restart(server)
        self.started.append(new)
        return new

    def close(self) -> None:
        for server in self.started:
            if server.process.poll() is None:
                try:
                    server.terminate(timeout=20)
                except subprocess.TimeoutExpired:
                    server.kill()


@pytest.fixture
def servers() -> Iterator[Servers]:
    manager = Servers()
    try:
        yield manager
    finally:
        manager.close()


def open_leases(client: Client) -> int:
    return int(client.status()["server"]["open_leases"])


def rows_of(dsn: str, table: str) -> list[int]:
    """The committed rows of ``table``, read directly (not through dbpool)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [x for (x,) in conn.execute(f"SELECT x FROM {table} ORDER BY x")]


def running(dsn: str, marker: str) -> int:
    """How many backends other than ours are running a statement containing ``marker``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND pid <> pg_backend_pid() AND position(%s in query) > 0", [marker]).fetchone()
    assert row is not None
    return int(row[0])


def dbpool_backends(cluster: PgCluster) -> list[int]:
    """The pids of the backends dbpool's pool holds on ``cluster``."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbpool' "
            "AND pid <> pg_backend_pid()")]


class RawPeer:
    """A bare DEALER socket speaking the protocol by hand (no heartbeats, no retries)."""

    def __init__(self, endpoint: str) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sock: zmq.Socket[Any] = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = 0

    def send(self, op: str, **fields: Any) -> int:
        self.ids += 1
        self.sock.send(wire.packb({"v": VERSION, "id": self.ids, "op": op, **fields}))
        return self.ids

    def recv(self, rid: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1):
                raise AssertionError(f"no reply to request {rid} within {timeout:g}s")
            reply = wire.unpackb(self.sock.recv())
            if reply.get("id") == rid:
                return reply

    def call(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        return self.recv(self.send(op, **fields), timeout)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


@pytest.fixture
def raw_peers() -> Iterator[Callable[[str], RawPeer]]:
    made: list[RawPeer] = []

    def make(endpoint: str) -> RawPeer:
        peer = RawPeer(endpoint)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in made:
            peer.close()


def events_until(sub: Subscription, done: Callable[[list[Event]], bool], timeout: float,
                 what: str) -> list[Event]:
    """Collect events from ``sub`` until ``done(events)``; fail after ``timeout`` s."""
    got: list[Event] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seen = [(e.topic, e.name, e.data.get("index")) for e in got]
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; got {seen}")
        event = sub.get(timeout=remaining)
        if event is not None:
            got.append(event)
    return got


def kill_one_backend(cluster: PgCluster) -> int | None:
    """Terminate one of dbpool's backends on ``cluster`` (to make the pool publish events)."""
    pids = dbpool_backends(cluster)
    if not pids:
        return None
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [pids[0]])
    return pids[0]


def fast_pool_config(tmp_path: Path) -> str:
    path = tmp_path / "serve.toml"
    path.write_text(FAST_POOL_TOML)
    return str(path)


# -- 1. a client SIGKILLed mid-transaction ------------------------------------------------

#: A server heartbeat timeout long enough that only a closed connection explains a
#: rollback within a second of a client's death (the issue's 10 s).
LONG_HEARTBEAT = 10.0


@pytest.mark.parametrize("death", ["sigkill", "sigstop"])
def test_a_client_dead_mid_transaction_is_rolled_back_and_its_connection_returned(
        servers: Servers, pg_dsn: str, table: str, death: str) -> None:
    # SIGKILL closes the client's connections: the server rolls back at once.  SIGSTOP
    # leaves them open and silent: only the heartbeat timeout can tell.
    size = 4
    heartbeat = LONG_HEARTBEAT if death == "sigkill" else HEARTBEAT
    server = servers.start(pg_dsn, "--heartbeat-timeout", str(heartbeat), pool_size=size)
    with TransactionChild(server.endpoint,
                          f"INSERT INTO {table} (x) SELECT generate_series(1, 5)") as doomed:
        child, session, lease = doomed.process, doomed.session, doomed.lease
        assert doomed.rowcount == 5  # the inserts ran, inside the child's transaction
        with Client(server.endpoint, timeout=5) as observer:
            status = observer.status()
            assert status["server"]["open_leases"] == 1
            assert status["pool"]["ready_conn_count"] == size - 1
            assert rows_of(pg_dsn, table) == []  # not committed yet
            if death == "sigstop":
                # The child's heartbeats hold the lease past the heartbeat timeout.
                held_until = time.monotonic() + 1.5 * HEARTBEAT
                while time.monotonic() < held_until:
                    assert open_leases(observer) == 1, "the live child's lease ended"
                    time.sleep(0.1)
                child.send_signal(signal.SIGSTOP)
            else:
                child.send_signal(signal.SIGKILL)
                assert child.wait(10) == -signal.SIGKILL
            died_at = time.monotonic()

            wait_for(lambda: pool_whole(observer, size), heartbeat + 10,
                     "the dead client's connection back in the pool")
            elapsed = time.monotonic() - died_at
            if death == "sigkill":
                assert elapsed <= 1.0, f"lease held {elapsed:.2f}s after the kill"
                server.wait_output(expiry_line(lease, session, "its client's connections closed"))
            else:
                assert 0.5 * HEARTBEAT <= elapsed <= HEARTBEAT + MARGIN, \
                    f"lease held {elapsed:.2f}s after the client stopped"
                server.wait_output(expiry_line(
                    lease, session, f"no heartbeat from its client within {HEARTBEAT:g}s"))

            # Use every connection of the pool for a committed transaction: had the
            # rollback not happened, one of these COMMITs would commit the child's rows.
            with Client(server.endpoint, timeout=5) as other:
                transactions = [other.transaction() for _ in range(size)]
                for tx in transactions:
                    tx.query("SELECT 1")
                for tx in transactions:
                    tx.commit()
            assert rows_of(pg_dsn, table) == []
            assert observer.query("SELECT 1").rows == [(1,)]
    assert server.terminate() == 0
    assert rows_of(pg_dsn, table) == []


# -- 2. heartbeats ------------------------------------------------------------------------


def test_heartbeats_keep_an_idle_transaction_alive(
        servers: Servers, pg_dsn: str, table: str) -> None:
    server = servers.start(pg_dsn, "--heartbeat-timeout", str(HEARTBEAT))
    with Client(server.endpoint, timeout=5) as client, \
            Client(server.endpoint, timeout=5) as observer:
        tx = client.transaction().begin()
        assert tx.heartbeat_timeout == HEARTBEAT
        tx.query(f"INSERT INTO {table} VALUES (1)")
        # Idle (no request of the transaction's) for three heartbeat timeouts; only
        # the client's heartbeat thread speaks for the session.
        idle_until = time.monotonic() + 3 * HEARTBEAT
        while time.monotonic() < idle_until:
            assert open_leases(observer) == 1, "the lease ended although heartbeats ran"
            time.sleep(0.1)
        assert tx.commit().command == "COMMIT"
    assert rows_of(pg_dsn, table) == [1]
    assert "no heartbeat" not in server.output()


def _raw_lease(servers: Servers, raw_peers: Callable[[str], RawPeer], pg_dsn: str,
               size: int) -> tuple[ServerProcess, RawPeer, str, dict[str, Any]]:
    """A server with a heartbeat timeout of :data:`HEARTBEAT`, a raw peer (which sends
    no heartbeats), its session, and the reply to the ``begin`` it sent."""
    server = servers.start(pg_dsn, "--heartbeat-timeout", str(HEARTBEAT), pool_size=size)
    peer = raw_peers(server.endpoint)
    session = uuid.uuid4().hex
    return server, peer, session, peer.call("begin", session=session)


def test_a_silent_session_loses_its_lease(
        servers: Servers, raw_peers: Callable[[str], RawPeer], pg_dsn: str,
        table: str) -> None:
    size = 4
    server, peer, session, begun = _raw_lease(servers, raw_peers, pg_dsn, size)
    assert begun["ok"]["heartbeat_timeout"] == HEARTBEAT
    lease = begun["ok"]["lease"]
    inserted = peer.call("query", sql=f"INSERT INTO {table} VALUES (2)", params=None,
                         lease=lease, session=session)
    assert inserted["ok"]["rowcount"] == 1
    last_request = time.monotonic()
    with Client(server.endpoint, timeout=5) as observer:
        assert open_leases(observer) == 1
        wait_for(lambda: pool_whole(observer, size), HEARTBEAT + 10, "the lease to end")
    elapsed = time.monotonic() - last_request
    assert HEARTBEAT * 0.9 <= elapsed <= HEARTBEAT + MARGIN, f"lease ended after {elapsed:.2f}s"
    server.wait_output(expiry_line(
        lease, session, f"no heartbeat from its client within {HEARTBEAT:g}s"))

    reply = peer.call("commit", lease=lease, session=session)
    assert reply["error"]["kind"] == "connection"
    assert reply["error"]["reason"] == "lease_expired"
    assert rows_of(pg_dsn, table) == []


def test_a_copy_left_unfinished_in_a_transaction_ends_the_transaction(
        servers: Servers, raw_peers: Callable[[str], RawPeer], pg_dsn: str,
        table: str) -> None:
    # The COPY's connection is lost with it, so its transaction must end at once:
    # left open, it kept a connection given back already, and ending it later gave
    # that connection back a second time, unwatching whichever new connection had
    # its socket's number (a fuzz campaign's victim then waited for ever).
    size = 2
    server, peer, session, begun = _raw_lease(servers, raw_peers, pg_dsn, size)
    lease = begun["ok"]["lease"]
    copying = peer.call("copy_in", sql=f"COPY {table} FROM STDIN", lease=lease,
                        session=session)
    copy = copying["ok"]["copy"]
    # A request on the transaction half a heartbeat later: refused (the COPY runs),
    # but it keeps the transaction heard from after the COPY falls silent.
    time.sleep(HEARTBEAT / 2)
    busy = peer.call("query", sql="SELECT 1", params=None, lease=lease, session=session)
    assert busy["error"]["code"] == "busy", busy
    server.wait_output(rf"copy {re.escape(copy[:8])} of session {re.escape(session[:8])}"
                       rf"\.\.\.: no heartbeat from its client within {HEARTBEAT:g}s")

    reply = peer.call("commit", lease=lease, session=session)
    assert reply["error"]["reason"] == "lease_expired", reply
    assert "COPY was left unfinished" in reply["error"]["message"], reply
    with Client(server.endpoint, timeout=5) as observer:
        wait_for(lambda: pool_whole(observer, size), 10, "the pool to be whole again")
        for _ in range(20):  # every connection serves, watched
            assert observer.query("SELECT 1").rows == [(1,)]
    assert "lease " + lease[:8] not in server.output()  # it never expired on its own


# -- 3. lease_max -------------------------------------------------------------------------


def test_lease_max_ends_a_transaction_despite_heartbeats(
        servers: Servers, pg_dsn: str, table: str) -> None:
    size = 4
    # Heartbeats are needed every 0.6 s, so the lease outlives the heartbeat
    # timeout only because the client's heartbeats keep coming.
    server = servers.start(pg_dsn, "--lease-max", "1", "--heartbeat-timeout", "0.6",
                           pool_size=size)
    with Client(server.endpoint, timeout=5) as client, \
            Client(server.endpoint, timeout=5) as observer:
        began = time.monotonic()
        tx = client.transaction().begin()
        assert tx.expires_in == 1.0
        tx.query(f"INSERT INTO {table} VALUES (3)")
        wait_for(lambda: open_leases(observer) == 0, 10, "lease_max to end the lease")
        lasted = time.monotonic() - began
        assert 0.9 <= lasted <= 1.0 + MARGIN, f"the lease lasted {lasted:.2f}s"
        server.wait_output(expiry_line(tx.lease, client.session,
                                       r"it outlived lease_max \(1s\)"))
        assert "no heartbeat" not in server.output()

        with pytest.raises(ConnectionError) as info:
            tx.query("SELECT 1")
        assert info.value.reason == "lease_expired"
        with pytest.raises(ConnectionError) as info:
            tx.commit()
        assert info.value.reason == "lease_expired"
        wait_for(lambda: pool_whole(observer, size), 5, "the connection back in the pool")
        assert client.query("SELECT 1").rows == [(1,)]
    assert rows_of(pg_dsn, table) == []


def test_leaving_a_transaction_whose_lease_ended_logs_no_warning(
        servers: Servers, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # The server rolled it back already: the rollback on the way out has nothing to
    # report beyond a debug line, and certainly no traceback.
    server = servers.start(pg_dsn, "--lease-max", "0.3")
    with Client(server.endpoint, timeout=5) as client, \
            Client(server.endpoint, timeout=5) as observer, \
            caplog.at_level(logging.DEBUG, logger="dbpool.client"), \
            pytest.raises(ValueError, match="the caller's own"), client.transaction().begin():
        wait_for(lambda: open_leases(observer) == 0, 10, "lease_max to end the lease")
        raise ValueError("the caller's own error")
    records = [r for r in caplog.records if r.name.startswith("dbpool.client")]
    assert any("had ended before its rollback" in r.getMessage() for r in records), records
    assert all(r.levelno < logging.WARNING and r.exc_info is None for r in records), \
        [(r.levelname, r.getMessage()) for r in records]


# -- 4. leases belong to their session -----------------------------------------------------


def _forged(client: Client, tx: Transaction) -> Transaction:
    """A transaction of ``client`` that claims ``tx``'s lease (another session's)."""
    stolen = Transaction(client, None)
    stolen.lease, stolen._state = tx.lease, "active"
    return stolen


def test_a_lease_used_by_another_session_is_refused_and_unaffected(
        servers: Servers, pg_dsn: str, table: str) -> None:
    server = servers.start(pg_dsn)
    with Client(server.endpoint, timeout=5) as owner, \
            Client(server.endpoint, timeout=5) as intruder:
        assert owner.session != intruder.session
        tx = owner.transaction()
        tx.query(f"INSERT INTO {table} VALUES (10)")

        stolen = _forged(intruder, tx)
        attempts: list[Callable[[], object]] = [
            lambda: stolen.query(f"INSERT INTO {table} VALUES (99)"),
            lambda: stolen.execute(f"INSERT INTO {table} VALUES (99)"),
            lambda: stolen.batch([(f"INSERT INTO {table} VALUES (%s)", [99])]),
            lambda: stolen.stream(f"SELECT x FROM {table}").fetch(),
            stolen.commit,
        ]
        for attempt in attempts:
            with pytest.raises(ProtocolError) as info:
                attempt()
            assert info.value.code == "lease_not_owned"
        stolen = _forged(intruder, tx)
        with pytest.raises(ProtocolError) as info:
            stolen.rollback()
        assert info.value.code == "lease_not_owned"

        # The owner's transaction is untouched: still open, its row visible to it
        # only, and the intruder's inserts never ran in it.
        assert tx.query(f"SELECT x FROM {table} ORDER BY x").rows == [(10,)]
        tx.query(f"INSERT INTO {table} VALUES (11)")
        assert rows_of(pg_dsn, table) == []
        assert tx.commit().command == "COMMIT"
    assert rows_of(pg_dsn, table) == [10, 11]


def test_another_sessions_requests_do_not_keep_a_lease_alive(
        servers: Servers, raw_peers: Callable[[str], RawPeer], pg_dsn: str) -> None:
    server = servers.start(pg_dsn, "--heartbeat-timeout", str(HEARTBEAT))
    owner, intruder = raw_peers(server.endpoint), raw_peers(server.endpoint)
    session, other = uuid.uuid4().hex, uuid.uuid4().hex
    lease = owner.call("begin", session=session)["ok"]["lease"]
    last_owner_request = time.monotonic()
    # The intruder keeps using the lease (and heartbeating its own session):
    # refused every time, and the owner's silence still ends the lease.
    deadline = last_owner_request + HEARTBEAT + MARGIN
    while True:
        assert intruder.call("heartbeat", session=other)["ok"] == {"leases": 0}
        error = intruder.call("query", sql="SELECT 1", params=None, lease=lease,
                              session=other)["error"]
        if error["kind"] == "connection":
            assert error["reason"] == "lease_expired"
            break
        assert error["code"] == "lease_not_owned"
        assert time.monotonic() < deadline, "the intruder's requests kept the lease alive"
        time.sleep(0.05)
    assert time.monotonic() - last_owner_request >= HEARTBEAT * 0.9
    server.wait_output(expiry_line(
        lease, session, f"no heartbeat from its client within {HEARTBEAT:g}s"))
    reply = owner.call("commit", lease=lease, session=session)
    assert reply["error"]["reason"] == "lease_expired"


# -- 5. request timeouts cancel the statement ----------------------------------------------


def test_a_statement_past_its_timeout_is_cancelled(
        servers: Servers, raw_peers: Callable[[str], RawPeer], pg_dsn: str) -> None:
    size = 4
    server = servers.start(pg_dsn, pool_size=size)
    with Client(server.endpoint, timeout=5) as client:
        marker = f"dbpool-cancel-{uuid.uuid4().hex}"
        started = time.monotonic()
        with pytest.raises((ConnectionError, pg_errors.QueryCanceled)) as info:
            client.query(f"SELECT pg_sleep(10) /* {marker} */", timeout=0.5)
        assert time.monotonic() - started <= 1.5
        if isinstance(info.value, ConnectionError):  # the client gave up first
            assert info.value.reason == "timeout"
        wait_for(lambda: running(pg_dsn, marker) == 0, 3, "the statement to be cancelled")
        wait_for(lambda: pool_whole(client, size), 3, "the pool to be whole")
        assert client.query("SELECT 42").rows == [(42,)]

        # The server's own answer, waited for beyond the request's timeout: the
        # statement was cancelled (SQLSTATE 57014), soon after the deadline.
        peer = raw_peers(server.endpoint)
        marker = f"dbpool-cancel-{uuid.uuid4().hex}"
        started = time.monotonic()
        rid = peer.send("query", sql=f"SELECT pg_sleep(10) /* {marker} */", params=None,
                        timeout=0.5)
        reply = peer.recv(rid, 8)
        assert time.monotonic() - started <= 1.5
        assert reply["error"]["kind"] == "sql"
        assert reply["error"]["sqlstate"] == "57014"
        assert running(pg_dsn, marker) == 0
        wait_for(lambda: pool_whole(client, size), 3, "the pool to be whole")
        assert client.query("SELECT 43").rows == [(43,)]


# -- 6. server restarts ---------------------------------------------------------------------


def test_client_finds_a_restarted_server(servers: Servers, pg_dsn: str) -> None:
    server = servers.start(pg_dsn)
    with Client(server.endpoint, timeout=5) as client:
        assert client.query("SELECT 1").rows == [(1,)]
        assert server.terminate() == 0
        new = servers.restart(server)
        assert (new.endpoint, new.events) == (server.endpoint, server.events)
        assert new.pid != server.pid
        assert client.query("SELECT 2").rows == [(2,)]
        assert client.status()["server"]["requests"] <= 2  # the new server answered


def test_client_recovers_after_timing_out_while_the_server_was_down(
        servers: Servers, pg_dsn: str) -> None:
    server = servers.start(pg_dsn)
    with Client(server.endpoint, timeout=5) as client:
        assert client.query("SELECT 1").rows == [(1,)]
        assert server.terminate() == 0
        with pytest.raises(ConnectionError) as info:
            client.query("SELECT 1", timeout=0.3)
        # No connection to send on (no_server), or sent before libzmq saw the server
        # go and never answered (timeout): a race of libzmq's.
        assert info.value.reason in ("no_server", "timeout")
        servers.restart(server)
        assert client.query("SELECT 3").rows == [(3,)]


def test_a_transaction_open_across_a_restart_gets_lease_expired(
        servers: Servers, pg_dsn: str, table: str) -> None:
    server = servers.start(pg_dsn, "--grace", "0.5")
    with Client(server.endpoint, timeout=5) as client:
        tx = client.transaction()
        tx.query(f"INSERT INTO {table} VALUES (1)")
        assert server.terminate() == 0
        servers.restart(server)
        with pytest.raises(Exception) as info:
            tx.query("SELECT 1")
        assert rows_of(pg_dsn, table) == []
        assert isinstance(info.value, ConnectionError), repr(info.value)
        assert info.value.reason == "lease_expired"


@pytest.mark.asyncio
async def test_async_client_finds_a_restarted_server(servers: Servers, pg_dsn: str) -> None:
    server = await asyncio.to_thread(servers.start, pg_dsn)
    async with AsyncClient(server.endpoint, timeout=5) as client:
        assert (await client.query("SELECT 1")).rows == [(1,)]
        assert await asyncio.to_thread(server.terminate) == 0
        new = await asyncio.to_thread(servers.restart, server)
        assert new.endpoint == server.endpoint
        assert (await client.query("SELECT 2")).rows == [(2,)]
        assert (await client.status())["server"]["requests"] <= 2


# -- 7. subscriptions while PostgreSQL stops and starts --------------------------------------


def _prime(sub: Subscription, cluster: PgCluster, client: Client, size: int) -> None:
    """Make sure ``sub`` is joined (ZeroMQ's slow joiner): kill backends until an event
    arrives, then wait for the pool to be whole again."""
    deadline = time.monotonic() + 15
    while True:
        kill_one_backend(cluster)
        if sub.get(timeout=1.0) is not None:
            break
        assert time.monotonic() < deadline, "the subscription never received an event"
    wait_for(lambda: pool_whole(client, size) and len(dbpool_backends(cluster)) == size, 10,
             "the pool to reconnect after priming")


def _disconnects_of_all(size: int, since: float) -> Callable[[list[Event]], bool]:
    def done(events: list[Event]) -> bool:
        indexes = {e.data["index"] for e in events
                   if e.name == "disconnected" and e.data["time"] >= since}
        errors = [e for e in events if e.name == "connection_error"]
        return indexes >= set(range(size)) and bool(errors)
    return done


def _connects_of_all(size: int, since: float) -> Callable[[list[Event]], bool]:
    def done(events: list[Event]) -> bool:
        return {e.data["index"] for e in events
                if e.name == "connected" and e.data["time"] >= since} >= set(range(size))
    return done


def test_subscription_sees_the_database_stop_and_start(
        servers: Servers, pg_cluster: PgCluster, tmp_path: Path) -> None:
    size, name = 2, f"lifecycle-{uuid.uuid4().hex[:6]}"
    server = servers.start(pg_cluster.conninfo(), "--config", fast_pool_config(tmp_path),
                           "--name", name, pool_size=size)
    with Client(server.endpoint, timeout=5) as client, \
            client.subscribe(("connection", "telemetry", "pool")) as sub:
        wait_for(lambda: len(dbpool_backends(pg_cluster)) == size, 10, "the pool to connect")
        _prime(sub, pg_cluster, client, size)

        stopped_at = time.time()
        pg_cluster.stop("fast")
        down = events_until(sub, _disconnects_of_all(size, stopped_at), 15,
                            "every connection to disconnect and a connect to fail")
        for event in down:
            assert event.data["pool"] == name
        disconnects = [e for e in down if e.name == "disconnected"]
        for event in disconnects:
            assert event.topic == "connection"
            assert isinstance(event.data["index"], int)
            assert isinstance(event.data["backend_pid"], int)
            assert isinstance(event.data["reason"], str) and event.data["reason"]
        errors = [e for e in down if e.name == "connection_error"]
        for event in errors:
            assert event.topic == "telemetry"
            assert isinstance(event.data["message"], str) and event.data["message"]
        assert any(isinstance(e.data["index"], int) for e in errors)

        started_at = time.time()
        pg_cluster.start()
        up = events_until(sub, _connects_of_all(size, started_at), 15,
                          "every connection to reconnect")
        for event in (e for e in up if e.name == "connected"):
            assert event.topic == "connection"
            assert event.data["pool"] == name
            assert isinstance(event.data["backend_pid"], int)
        wait_for(lambda: pool_whole(client, size), 10, "the pool to be whole")
        assert client.query("SELECT 1").rows == [(1,)]


@pytest.mark.asyncio
async def test_async_subscription_sees_the_database_stop(
        servers: Servers, pg_cluster: PgCluster, tmp_path: Path) -> None:
    size, name = 2, f"lifecycle-{uuid.uuid4().hex[:6]}"
    server = await asyncio.to_thread(
        servers.start, pg_cluster.conninfo(), "--config", fast_pool_config(tmp_path),
        "--name", name, pool_size=size)
    async with AsyncClient(server.endpoint, timeout=5) as client, \
            client.subscribe(("connection", "telemetry")) as sub:
        await asyncio.to_thread(wait_for, lambda: len(dbpool_backends(pg_cluster)) == size,
                                10, "the pool to connect")
        deadline = time.monotonic() + 15
        while True:  # the slow joiner: make events until one arrives (see _prime)
            await asyncio.to_thread(kill_one_backend, pg_cluster)
            if await sub.get(timeout=1.0) is not None:
                break
            assert time.monotonic() < deadline, "the subscription never received an event"

        stopped_at = time.time()
        await asyncio.to_thread(pg_cluster.stop, "fast")
        deadline = time.monotonic() + 15
        while True:
            event = await sub.get(timeout=max(0.0, deadline - time.monotonic()))
            assert event is not None, "no disconnected event after the database stopped"
            if event.name == "disconnected" and event.data["time"] >= stopped_at:
                break
        assert event.topic == "connection"
        assert event.data["pool"] == name
        assert isinstance(event.data["index"], int)
        assert isinstance(event.data["reason"], str) and event.data["reason"]


# -- 8. SIGTERM -------------------------------------------------------------------------------


def _query_in_thread(client: Client, sql: str) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(client.query(sql))
        except Exception as exc:  # reported by the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_sigterm_lets_an_in_flight_query_finish_and_exits_0(
        servers: Servers, pg_dsn: str) -> None:
    server = servers.start(pg_dsn, "--grace", "10")
    marker = f"dbpool-drain-{uuid.uuid4().hex}"
    with Client(server.endpoint, timeout=10) as client, \
            Client(server.endpoint, timeout=1) as late:
        thread, outcome = _query_in_thread(
            client, f"SELECT 'finished' FROM pg_sleep(2) /* {marker} */")
        wait_for(lambda: running(pg_dsn, marker) == 1, 5, "the statement to run")
        sent_at = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        server.wait_output(r"front end: stopping")

        # While it drains, work that needs a connection of its own is refused.
        with pytest.raises(PoolStoppedError) as info:
            late.transaction().begin()
        assert info.value.reason == "stopped"
        assert late.status()["server"]["draining"] is True
        assert running(pg_dsn, marker) == 1, "the test took too long: the drain is over"

        thread.join(10)
        assert not thread.is_alive()
        result = outcome[0]
        assert not isinstance(result, Exception), repr(result)
        assert result.rows == [("finished",)]  # type: ignore[attr-defined]
        assert server.process.wait(10) == 0
        assert time.monotonic() - sent_at < 5  # it did not wait out the whole grace

        # Gone: nothing listens.  The request finds no server (no_server), or, if
        # libzmq had not yet seen the connection close, goes unanswered (timeout).
        with pytest.raises(ConnectionError) as info:
            late.query("SELECT 1")
        assert info.value.reason in ("no_server", "timeout")
    assert "Traceback" not in server.output()


def test_sigterm_refuses_a_new_query_while_another_is_in_flight(
        servers: Servers, pg_dsn: str, table: str) -> None:
    server = servers.start(pg_dsn, "--grace", "10")
    marker = f"dbpool-drain-{uuid.uuid4().hex}"
    with Client(server.endpoint, timeout=10) as client, \
            Client(server.endpoint, timeout=5) as late:
        thread, _ = _query_in_thread(client, f"SELECT pg_sleep(1.5) /* {marker} */")
        wait_for(lambda: running(pg_dsn, marker) == 1, 5, "the statement to run")
        os.kill(server.pid, signal.SIGTERM)
        server.wait_output(r"front end: stopping")
        try:
            with pytest.raises(PoolStoppedError):
                late.query(f"INSERT INTO {table} VALUES (1)")
        finally:
            thread.join(10)
            assert server.process.wait(10) == 0
            assert rows_of(pg_dsn, table) == []


def test_sigterm_rolls_back_an_open_transaction_after_the_grace_period(
        servers: Servers, pg_cluster: PgCluster, tmp_path: Path) -> None:
    size, grace = 3, 1.0
    dsn = pg_cluster.conninfo()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE lifecycle (x int)")
    server = servers.start(dsn, "--grace", str(grace), "--config", fast_pool_config(tmp_path),
                           pool_size=size)
    with Client(server.endpoint, timeout=5) as client:
        wait_for(lambda: len(dbpool_backends(pg_cluster)) == size, 10, "the pool to connect")
        tx = client.transaction()
        tx.query("INSERT INTO lifecycle VALUES (1), (2)")
        sent_at = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        server.wait_output(r"front end: stopping")
        # Within the grace period the lease still serves its owner.
        assert tx.query("SELECT count(*) FROM lifecycle").rows == [(2,)]
        assert server.process.wait(grace + 10) == 0
        took = time.monotonic() - sent_at
        assert grace * 0.9 <= took <= grace + 5, f"exited {took:.2f}s after SIGTERM"
        server.wait_output(expiry_line(tx.lease, client.session,
                                       "the server is shutting down"))
        with pytest.raises(ConnectionError) as info:  # the server is gone
            tx.commit(timeout=0.5)
        assert info.value.reason in ("no_server", "timeout")  # as above: libzmq's race
    assert rows_of(dsn, "lifecycle") == []
    wait_for(lambda: not dbpool_backends(pg_cluster), 5, "the server's connections to close")


def test_sigterm_lets_an_open_transaction_commit_within_the_grace_period(
        servers: Servers, pg_dsn: str, table: str) -> None:
    grace = 10.0
    server = servers.start(pg_dsn, "--grace", str(grace))
    with Client(server.endpoint, timeout=5) as client:
        tx = client.transaction()
        tx.query(f"INSERT INTO {table} VALUES (7)")
        sent_at = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        server.wait_output(r"front end: stopping")
        assert tx.commit().command == "COMMIT"
        # Nothing is left to wait for: it exits without using up the grace period.
        assert server.process.wait(grace) == 0
        assert time.monotonic() - sent_at < grace / 2
    assert rows_of(pg_dsn, table) == [7]


def test_sigterm_stops_within_the_grace_period_under_steady_load(
        servers: Servers, pg_dsn: str) -> None:
    grace = 1.0
    server = servers.start(pg_dsn, "--grace", str(grace), "--pool-size", "1", pool_size=1)
    stop = threading.Event()

    def load() -> None:
        with Client(server.endpoint, timeout=2) as client:
            while not stop.is_set():
                try:
                    client.query("SELECT pg_sleep(0.2)")
                except ConnectionError:
                    return

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        with Client(server.endpoint, timeout=5) as observer:
            wait_for(lambda: observer.status()["server"]["requests"] > 5, 5, "the load to run")
        sent_at = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        code = server.process.wait(grace + 10)
        took = time.monotonic() - sent_at
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert code == 0
    assert "still busy after the grace period" not in server.output()
    assert took <= grace + 2, f"exited {took:.2f}s after SIGTERM"
