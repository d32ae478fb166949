"""Tests for the test harness itself: PgCluster, FaultProxy and the fixtures.

Everything runs against real PostgreSQL servers with psycopg; nothing is mocked.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.support.faultproxy import FaultProxy, ProxyFactory
from tests.support.pgcluster import PG_TEST_PASSWORD, PgCluster, PgTemplate

# Bounded waits: long enough for a loaded CI box, short enough to fail fast.
WAIT = 5.0
# How long we watch something that must NOT happen (a hung query).
HANG_WINDOW = 0.3


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (killed postgres processes
    are re-parented to init, which may never reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def target_of(dsn: str) -> tuple[str, int]:
    params = conninfo_to_dict(dsn)
    return str(params["host"]), int(params.get("port") or 5432)


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
    # autocommit: a hung/broken connection must not be stuck "in transaction".
    return psycopg.connect(dsn, connect_timeout=5, autocommit=True, **kwargs)


class Background:
    """Run ``fn`` in a daemon thread; ``done`` is set when it returns or raises."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = WAIT) -> object:
        assert self.done.wait(timeout), "background call did not finish"
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


# ------------------------------------------------------------------------- PgCluster


def test_private_cluster_answers_select_1(pg_cluster: PgCluster) -> None:
    assert pg_cluster.is_running()
    assert pg_cluster.host == "127.0.0.1"
    assert pg_cluster.user == "postgres"
    with connect(pg_cluster.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["port", "fsync", "listen_addresses", "log_connections"],),
            ).fetchall()
        )
    assert settings == {
        "port": str(pg_cluster.port),
        "fsync": "off",
        "listen_addresses": "127.0.0.1",
        "log_connections": "on",
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when running as root")
def test_cluster_runs_as_postgres_os_user_when_root(pg_cluster: PgCluster) -> None:
    import pwd

    pid = pg_cluster.postmaster_pid
    assert pid is not None
    uid = os.stat(f"/proc/{pid}").st_uid
    assert pwd.getpwuid(uid).pw_name == "postgres"
    assert pwd.getpwuid(pg_cluster.base_dir.stat().st_uid).pw_name == "postgres"
    assert pg_cluster.base_dir.stat().st_mode & 0o777 == 0o700


def test_stop_makes_connects_fail_and_start_restores(pg_cluster: PgCluster) -> None:
    port = pg_cluster.port
    pg_cluster.stop()
    assert not pg_cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        connect(pg_cluster.conninfo())

    pg_cluster.start()
    assert pg_cluster.port == port  # clients can reconnect to the same address
    with connect(pg_cluster.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_kill_breaks_open_connection_and_restart_recovers(pg_cluster: PgCluster) -> None:
    conn = connect(pg_cluster.conninfo())
    backend_pid = conn.info.backend_pid
    assert conn.execute("SELECT 1").fetchone() == (1,)

    pg_cluster.kill()
    assert not pg_cluster.is_running()
    assert not process_alive(backend_pid)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()

    pg_cluster.restart()
    assert "not properly shut down" in pg_cluster.log_text()  # it really crashed
    with connect(pg_cluster.conninfo()) as conn2:
        assert conn2.execute("SELECT 1").fetchone() == (1,)


def test_kill_and_stop_are_noops_when_not_running(pg_cluster: PgCluster) -> None:
    pg_cluster.stop()
    pg_cluster.kill()
    pg_cluster.stop()
    pg_cluster.start()
    pg_cluster.start()  # already running: no-op
    assert pg_cluster.is_running()


def test_log_counts_tcp_connection_attempts(pg_cluster: PgCluster) -> None:
    before = pg_cluster.count_connection_attempts()
    for _ in range(3):
        with connect(pg_cluster.conninfo()) as conn:
            conn.execute("SELECT 1")
    # A rejected login is still an attempt the server saw.
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        connect(pg_cluster.conninfo(dbname="no_such_db"))
    assert pg_cluster.count_connection_attempts() == before + 4
    # The harness's own readiness probes use the unix socket and are excluded.
    assert pg_cluster.count_connection_attempts(include_local=True) > before + 4
    assert f"[{pg_cluster.postmaster_pid}]" in pg_cluster.log_text()  # pid in prefix


def test_context_manager_cleans_up(pg_template: PgTemplate) -> None:
    with PgCluster(template=pg_template) as cluster:
        pid = cluster.postmaster_pid
        base = cluster.base_dir
        with connect(cluster.conninfo()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pid is not None
    assert not base.exists()
    assert not cluster.is_running()


def test_fresh_cluster_starts_quickly(pg_template: PgTemplate) -> None:
    started = time.monotonic()
    with PgCluster(template=pg_template) as cluster:
        elapsed = time.monotonic() - started
        assert cluster.is_ready()
    # Typically ~0.1-0.3 s; generous bound so a busy CI box does not flake.
    assert elapsed < 3.0


def test_password_cluster_wants_the_password_over_tcp(pg_password_cluster: PgCluster) -> None:
    cluster = pg_password_cluster
    assert cluster.password == PG_TEST_PASSWORD
    assert conninfo_to_dict(cluster.conninfo())["password"] == PG_TEST_PASSWORD
    with connect(cluster.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.used_password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(cluster.conninfo(password="not-the-password"))
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        connect(cluster.conninfo(password="", passfile=os.devnull))
    assert cluster.is_ready()  # the harness's probes use the unix socket, still trusted
    # The password is in the data dir: it survives a crash and a restart.
    cluster.kill()
    cluster.start()
    with connect(cluster.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_password_cluster_rejects_an_empty_password(pg_template: PgTemplate) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        PgCluster(template=pg_template, password="")


# ------------------------------------------------------------------------ FaultProxy


def test_proxy_forwards_queries(pg_dsn: str, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(*target_of(pg_dsn))
    with connect(proxy.wrap_conninfo(pg_dsn)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Big enough to need many chunks and hit send-buffer backpressure.
        row = conn.execute("SELECT repeat('x', 4000000)").fetchone()
        assert row is not None and len(row[0]) == 4_000_000
        assert proxy.connection_count == 1
        assert proxy.active_count == 1
    wait_for(lambda: proxy.active_count == 0, what="proxy to see the close")


def test_proxy_adds_latency(pg_dsn: str, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(*target_of(pg_dsn))
    latency = 0.1
    with connect(proxy.wrap_conninfo(pg_dsn)) as conn:
        conn.execute("SELECT 1")
        proxy.set_latency(latency)
        started = time.monotonic()
        conn.execute("SELECT 1")
        rtt = time.monotonic() - started
        proxy.set_latency(0)
    # One delay on the query, one on the reply.
    assert rtt >= 2 * latency
    assert rtt < 2 * latency + 2.0


def test_blackhole_hangs_query_without_reset(pg_dsn: str, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(*target_of(pg_dsn))
    conn = connect(proxy.wrap_conninfo(pg_dsn))
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.blackhole(True)
        query = Background(lambda: conn.execute("SELECT 42").fetchone())
        assert not query.done.wait(HANG_WINDOW), "query got through a blackhole"
        assert proxy.active_count == 1  # nothing was closed or reset
        assert not conn.closed

        # Healing delivers the held bytes: the same connection carries on.
        proxy.blackhole(False)
        assert query.join() == (42,)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        # On failure the background query may still hold the connection's
        # lock; resetting the proxy unblocks it before we close.
        proxy.close()
        conn.close()


def test_blackhole_holds_new_connections(pg_cluster: PgCluster, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    proxy.blackhole(True)
    before = pg_cluster.count_connection_attempts()

    attempt = Background(lambda: connect(proxy.wrap_conninfo(pg_cluster.conninfo())))
    wait_for(lambda: proxy.connection_count == 1, what="proxy to accept")
    assert not attempt.done.wait(HANG_WINDOW), "connect got through a blackhole"
    assert pg_cluster.count_connection_attempts() == before  # the server saw nothing

    proxy.blackhole(False)
    conn = attempt.join()
    assert isinstance(conn, psycopg.Connection)
    with conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pg_cluster.count_connection_attempts() == before + 1


def test_reset_all_breaks_open_connections(pg_dsn: str, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(*target_of(pg_dsn))
    dsn = proxy.wrap_conninfo(pg_dsn)
    conns = [connect(dsn) for _ in range(2)]
    for conn in conns:
        conn.execute("SELECT 1")

    assert proxy.reset_all() == 2
    assert proxy.active_count == 0
    for conn in conns:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()

    with connect(dsn) as conn:  # new connections are unaffected
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_refuse_makes_connect_fail(pg_dsn: str, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(*target_of(pg_dsn))
    dsn = proxy.wrap_conninfo(pg_dsn)
    proxy.refuse(True)
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        connect(dsn)
    assert time.monotonic() - started < 2.0  # a reset, not a timeout
    assert proxy.connection_count == 1
    assert proxy.refused_count == 1

    proxy.refuse(False)
    with connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_silence_all_stalls_open_connections_for_ever_until_dropped(
    pg_cluster: PgCluster, fault_proxy: ProxyFactory
) -> None:
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    dsn = proxy.wrap_conninfo(pg_cluster.conninfo(application_name="silenced"))
    old = connect(dsn)
    try:
        assert old.execute("SELECT 1").fetchone() == (1,)
        assert proxy.silence_all() == 1
        assert proxy.silenced_count == 1
        query = Background(lambda: old.execute("SELECT 42").fetchone())
        # New connections are forwarded as usual while the old one stays silent,
        # even across a blackhole and its healing.
        with connect(dsn) as new:
            assert new.execute("SELECT 2").fetchone() == (2,)
            proxy.blackhole(True)
            proxy.blackhole(False)
            assert new.execute("SELECT 3").fetchone() == (3,)
        assert not query.done.wait(HANG_WINDOW), "a query got through a silenced connection"
        assert proxy.silence_all() == 0  # already silent
        with connect(pg_cluster.conninfo()) as admin:  # the server still holds its session
            row = admin.execute("SELECT count(*) FROM pg_stat_activity "
                                "WHERE application_name = 'silenced'").fetchone()
            assert row == (1,)

        assert proxy.drop_silenced() == 1
        assert proxy.silenced_count == 0
        assert proxy.active_count == 0
        with pytest.raises(psycopg.OperationalError):
            query.join()
        with connect(pg_cluster.conninfo()) as admin:
            wait_for(lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'silenced'"
            ).fetchone() == (0,), what="the server to see the dropped flow close")
    finally:
        proxy.close()
        old.close()


def test_proxy_to_stopped_server_resets_client(
    pg_cluster: PgCluster, fault_proxy: ProxyFactory
) -> None:
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    pg_cluster.stop()
    with pytest.raises(psycopg.OperationalError):
        connect(proxy.wrap_conninfo(pg_cluster.conninfo()))
    wait_for(lambda: proxy.active_count == 0, what="proxy to drop the pair")


def test_proxy_close_joins_thread_and_drops_connections(pg_dsn: str) -> None:
    def proxy_threads(port: int) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(f"faultproxy-{port}-")]

    with FaultProxy(*target_of(pg_dsn)) as proxy:
        conn = connect(proxy.wrap_conninfo(pg_dsn))
        conn.execute("SELECT 1")
        assert len(proxy_threads(proxy.port)) == 1
    assert proxy_threads(proxy.port) == []
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with pytest.raises(RuntimeError):
        proxy.blackhole(True)
