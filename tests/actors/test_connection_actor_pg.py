"""The connection actor against a real PostgreSQL: events, kills, restarts, options."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent
from dbpool.pool import Pool
from tests.support.events import Recorder, kind
from tests.support.pgcluster import PgCluster
from tests.support.server import backends


@pytest.fixture
def connect_errors() -> Iterator[Recorder[dict[str, Any]]]:
    errors: Recorder[dict[str, Any]] = Recorder()
    telemetry.attach("test-connect-errors", ["connection_error"], lambda _e, _m, meta: errors(meta))
    yield errors
    telemetry.detach("test-connect-errors")


def test_pool_size_3_gives_3_distinct_connected_events(pg_dsn: str, pools: list[Pool]) -> None:
    events: Recorder[ConnectionEvent] = Recorder()
    pools.append(
        Pool.start(
            pg_dsn,
            pool_size=3,
            connection_listeners=[events],
            connect_kwargs={"application_name": "dbpool-three"},
        )
    )
    connected = events.wait_count(kind("connected"), 3)
    pids = {e.backend_pid for e in connected}
    assert len(pids) == 3 and sorted(e.index for e in connected) == [0, 1, 2]
    assert set(backends(pg_dsn, "dbpool-three")) == pids  # really three server sessions


def test_killed_server_disconnects_backs_off_and_reconnects_after_restart(
    pg_cluster: PgCluster, pools: list[Pool], connect_errors: Recorder[dict[str, Any]]
) -> None:
    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start(
        pg_cluster.conninfo(),
        pool_size=2,
        connection_listeners=[events],
        idle_interval=0.05,
        backoff_type="exp",
        backoff_min=0.1,
        backoff_max=0.4,
    )
    pools.append(pool)
    first = events.wait_count(kind("connected"), 2)

    pg_cluster.kill()
    gone = events.wait_count(kind("disconnected"), 2, timeout=5)
    assert {e.backend_pid for e in gone} == {e.backend_pid for e in first}
    failures = connect_errors.wait_count(lambda m: "index" in m, 7, timeout=10)
    assert all(m["error"].reason == "error" for m in failures)
    # Each connection reconnects at once when it finds the server gone, and fails.
    # The two find it apart by up to a ping interval (more on a loaded machine), so
    # each attempt is timed from its own connection's disconnect.
    lost_at = {e.index: t for t, e in events.items if e.kind == "disconnected"}
    first_try: dict[int, float] = {}
    for t, m in connect_errors.items:
        if "index" in m:
            first_try.setdefault(m["index"], t)
    assert first_try.keys() == lost_at.keys() == {0, 1}
    for index, tried in first_try.items():
        assert tried - lost_at[index] < 0.08, (lost_at, first_try)
    # Both failures open the circuit (pool/breaker.py); from then on one attempt per
    # exp step, whichever connection makes it: 0.1, 0.2, 0.4, 0.4.
    times = connect_errors.times(lambda m: "index" in m)
    both_tried = max(first_try.values())
    gaps = [b - a for a, b in itertools.pairwise([both_tried]
                                                  + [t for t in times if t > both_tried])][:4]
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True):
        assert expected - 0.03 <= gap < expected + 0.25, gaps

    pg_cluster.start()
    again = events.wait_count(kind("connected"), 4, timeout=5)[2:]
    assert {e.index for e in again} == {0, 1}
    assert {e.backend_pid for e in again}.isdisjoint({e.backend_pid for e in first})
    assert pool.query("SELECT 1").rows == [(1,)]


def test_stopped_server_with_backoff_stop_stops_the_pool(
    pg_cluster: PgCluster, pools: list[Pool]
) -> None:
    events: Recorder[ConnectionEvent] = Recorder()
    stopped: Recorder[BaseException | None] = Recorder()
    pool = Pool.start(
        pg_cluster.conninfo(),
        pool_size=1,
        backoff_type="stop",
        idle_interval=0.05,
        connection_listeners=[events],
    )
    pools.append(pool)
    pool.add_monitor(stopped)
    events.wait_count(kind("connected"), 1)
    pg_cluster.stop()
    (error,) = stopped.wait_until(lambda v: len(v) == 1, timeout=5)
    assert error is not None and "backoff_type is 'stop'" in str(error)
    assert not pool.alive and not pool.ref.is_alive()


def test_configure_is_used_for_every_connection(pg_dsn: str, pools: list[Pool]) -> None:
    seen: Recorder[int] = Recorder()

    def configure(opts: dict[str, Any]) -> dict[str, Any]:
        seen(opts["pool_index"])
        return {**opts, "application_name": f"dbpool-configured-{opts['pool_index']}"}

    events: Recorder[ConnectionEvent] = Recorder()
    pools.append(
        Pool.start(pg_dsn, pool_size=2, configure=configure, connection_listeners=[events])
    )
    connected = events.wait_count(kind("connected"), 2)
    names = backends(pg_dsn, "dbpool-configured-")
    assert {names[e.backend_pid] for e in connected} == {
        "dbpool-configured-0",
        "dbpool-configured-1",
    }
    assert sorted(seen.values()) == [0, 1]


def test_after_connect_prepares_each_connection_before_it_serves(
    pg_dsn: str, pools: list[Pool]
) -> None:
    def after_connect(conn: Any) -> None:
        conn.query("SET application_name = 'dbpool-after-connect'")

    pool = Pool.start(pg_dsn, pool_size=2, after_connect=after_connect)
    pools.append(pool)
    for _ in range(4):
        assert pool.query("SHOW application_name").rows == [("dbpool-after-connect",)]


def test_after_connect_sql_error_reconnects_after_backoff(pg_dsn: str, pools: list[Pool]) -> None:
    runs: Recorder[int] = Recorder()

    def after_connect(conn: Any) -> None:
        runs(conn.backend_pid)
        if len(runs.values()) == 1:
            conn.query("SELECT * FROM no_such_table_here")

    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start(
        pg_dsn,
        pool_size=1,
        after_connect=after_connect,
        connection_listeners=[events],
        backoff_type="exp",
        backoff_min=0.3,
    )
    pools.append(pool)
    kinds = [e.kind for e in events.wait_count(kind("connected"), 2)]
    assert len(kinds) == 2
    times = events.times(lambda e: True)
    assert times[2] - times[1] >= 0.3  # disconnected, then a backoff step
    # connected is announced before after_connect runs, as in DBConnection.
    first, second = runs.wait_until(lambda v: len(v) == 2)
    assert first != second
    assert pool.query("SELECT pg_backend_pid()").rows == [(second,)]


def test_after_connect_timeout_cancels_the_statement_and_reconnects(
    pg_dsn: str, pools: list[Pool]
) -> None:
    runs: Recorder[int] = Recorder()
    failed = threading.Event()

    def after_connect(conn: Any) -> None:
        runs(conn.backend_pid)
        if len(runs.values()) == 1:
            try:
                conn.query("SELECT pg_sleep(30) /* dbpool-after-connect-sleep */")
            except Exception:
                failed.set()
                raise

    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start(
        pg_dsn,
        pool_size=1,
        after_connect=after_connect,
        after_connect_timeout=0.3,
        connection_listeners=[events],
        backoff_type="exp",
        backoff_min=0.1,
    )
    pools.append(pool)
    events.wait_count(kind("connected"), 2, timeout=10)
    assert failed.wait(5), "the sleeping statement was not cancelled"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        sleeping = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            ("%dbpool-after-connect-sleep%",),
        ).fetchone()
    assert sleeping == (0,)
    assert pool.query("SELECT 1").rows == [(1,)]


def _texts(error: BaseException) -> Iterator[str]:
    """Every text reachable from ``error``: its str and repr, its attributes, and those
    of every exception it chains to.  A psycopg connect error keeps the connection it
    failed on (``pgconn``), and that one keeps the password it was given."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield str(exc)
        yield repr(exc)
        yield repr(exc.args)
        yield repr(getattr(exc, "__dict__", None))
        yield repr(getattr(exc, "pgconn", None))
        stack.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)


def _leaked(error: BaseException, secrets: list[str]) -> list[str]:
    return [t for t in _texts(error) for s in secrets if s in t]


@pytest.mark.parametrize("failure", ["wrong_password", "refused"])
def test_password_never_appears_in_logs_or_errors_of_a_failing_connect(
    failure: str,
    pg_password_cluster: PgCluster,
    pools: list[Pool],
    caplog: pytest.LogCaptureFixture,
    connect_errors: Recorder[dict[str, Any]],
    fault_proxy: Any,
) -> None:
    """Two passwords, both secret: the DSN's (wrong), and ``connect_kwargs``' that wins
    and is sent.  Checked: the log records (and their exceptions), the telemetry
    ``connection_error`` errors with everything they chain to, the health events and
    the error a caller gets (the circuit is open: it quotes the last connect error).

    ``wrong_password``: PostgreSQL rejects the password (``password authentication
    failed``).  ``refused``: the right password, but the server cannot be reached;
    once it can, the pool logs in with it (SCRAM), so the hidden password is one that
    works, and it is the keyword's, not the DSN's.
    """
    cluster = pg_password_cluster
    assert cluster.password is not None
    dsn_secret = "dsn-pw-3d9f0a"  # wrong: the keyword below overrides it
    if failure == "wrong_password":
        sent, port = "wrong-pw-8c2a41", cluster.port
        expected: tuple[str, ...] = ("password authentication failed",)
    else:
        proxy = fault_proxy(cluster.host, cluster.port)
        proxy.refuse(True)  # every attempt is reset before it reaches authentication
        sent, port = cluster.password, proxy.port
        expected = ("server closed the connection", "Connection reset by peer")
    secrets = [dsn_secret, sent]
    events: Recorder[Any] = Recorder()
    dsn = f"postgresql://{cluster.user}:{dsn_secret}@{cluster.host}:{port}/postgres"
    with caplog.at_level(logging.DEBUG):
        pool = Pool.start(
            dsn,
            pool_size=1,
            backoff_type="exp",
            backoff_min=0.05,
            backoff_max=0.2,
            breaker_threshold=2,
            reconnect_log_interval=0.1,
            connection_listeners=[events],
            connect_kwargs={"password": sent},
        )
        pools.append(pool)
        failures = connect_errors.wait_count(lambda m: "index" in m, 3)
        events.wait_count(lambda e: getattr(e, "state", None) == "open", 1)
        with pytest.raises(Exception) as raised:
            pool.query("SELECT 1", timeout=0.2)
    # The failures are the ones meant (for wrong_password: PostgreSQL's own refusal).
    assert all(any(e in str(m["error"]) for e in expected) for m in failures), failures
    assert "circuit open" in str(raised.value), raised.value
    assert any(e in str(raised.value) for e in expected), raised.value
    log_text = cluster.log_text()
    authenticated = f'connection authenticated: identity="{cluster.user}" method=scram-sha-256'
    assert authenticated not in log_text
    if failure == "wrong_password":
        assert f'password authentication failed for user "{cluster.user}"' in log_text
    assert _leaked(raised.value, secrets) == []
    assert any("failed to connect" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert not [s for s in secrets if s in record.getMessage()], record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            assert _leaked(record.exc_info[1], secrets) == []
    assert not [s for s in secrets if s in caplog.text]
    for meta in connect_errors.values():
        assert _leaked(meta["error"], secrets) == []
        assert not [s for s in secrets if s in repr(meta)]
    for event in events.values():
        assert not [s for s in secrets if s in repr(event)], event

    if failure == "refused":
        proxy.refuse(False)
        events.wait_count(kind("connected"), 1, timeout=5)
        assert pool.query("SELECT 1").rows == [(1,)]
        assert authenticated in cluster.log_text()


@pytest.mark.parametrize("dirty", ["transaction", "error"])
def test_a_connection_checked_in_dirty_is_rolled_back(
    pg_dsn: str, pools: list[Pool], dirty: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = Pool.start(pg_dsn, pool_size=1)
    pools.append(pool)
    with pool.checkout() as conn:
        pid = conn.backend_pid
        conn.query("CREATE TEMP TABLE IF NOT EXISTS dirty_check (v int)")
        conn.query("BEGIN")
        conn.query("INSERT INTO dirty_check VALUES (1)")
        if dirty == "error":
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.query("SELECT 1/0")
        assert conn.status() == dirty
    with pool.checkout() as conn:
        assert conn.backend_pid == pid  # the same connection, cleaned, not replaced
        assert conn.status() == "idle"
        assert conn.query("SELECT count(*) FROM dirty_check").rows == [(0,)]
    assert any("rolled back" in r.getMessage() for r in caplog.records)


def test_after_connect_that_leaves_a_transaction_open_does_not_lend_it_dirty(
    pg_dsn: str, pools: list[Pool]
) -> None:
    def after_connect(conn: Any) -> None:
        conn.query("BEGIN")
        conn.query("SET LOCAL application_name = 'dbpool-left-open'")

    pool = Pool.start(pg_dsn, pool_size=1, after_connect=after_connect)
    pools.append(pool)
    with pool.checkout() as conn:
        assert conn.status() == "idle"
        assert conn.query("SHOW application_name").rows != [("dbpool-left-open",)]


def test_a_uri_password_with_a_bad_percent_escape_is_hidden(
    pools: list[Pool], caplog: pytest.LogCaptureFixture,
    connect_errors: Recorder[dict[str, Any]], pg_dsn: str,
) -> None:
    # libpq refuses the URI and quotes the password back, as written.
    secret = "pw%zzHIDDEN-uri-secret"
    port = psycopg.conninfo.conninfo_to_dict(pg_dsn).get("port") or 5432
    with caplog.at_level(logging.DEBUG):
        pool = Pool.start(f"postgresql://postgres:{secret}@127.0.0.1:{port}/postgres",
                          pool_size=1, backoff_type="exp", backoff_min=0.05)
        pools.append(pool)
        connect_errors.wait_count(lambda m: True, 1)
    quoted = [str(m["error"]) for m in connect_errors.values()]
    assert any("percent" in text for text in quoted), quoted  # the refusal we meant
    assert all(secret not in text and "******" in text for text in quoted), quoted
    assert secret not in caplog.text
