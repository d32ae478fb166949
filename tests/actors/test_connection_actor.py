"""The connection actor's lifecycle, driven by a scripted driver (no database).

These are the deterministic unit tests of pool logic; the same behaviours
against a real PostgreSQL are in test_connection_actor_pg.py.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pykka
import pytest

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent
from dbpool.driver import Disconnect
from dbpool.errors import ConfigurationError, ConnectionError, PoolStoppedError
from dbpool.pool import Pool
from tests.support.events import Recorder, kind
from tests.support.scripted import FakeState, ScriptedDriver

FAST = {"backoff_type": "exp", "backoff_min": 0.05, "backoff_max": 0.2}


def start(pools: list[Pool], driver: ScriptedDriver, **options: Any) -> Pool:
    pool = Pool.start("scripted", driver=driver, **options)
    pools.append(pool)
    return pool


def test_each_connection_of_the_pool_connects_and_is_announced(pools: list[Pool]) -> None:
    events: Recorder[ConnectionEvent] = Recorder()
    driver = ScriptedDriver()
    start(pools, driver, pool_size=3, connection_listeners=[events])
    connected = events.wait_count(kind("connected"), 3)
    assert sorted(e.index for e in connected) == [0, 1, 2]
    assert len({e.backend_pid for e in connected}) == 3
    assert len({e.connection.actor_urn for e in connected}) == 3


def test_failed_connects_are_retried_with_exp_backoff_spacing(pools: list[Pool]) -> None:
    driver = ScriptedDriver({"connect": [OSError("refused")] * 4})
    start(pools, driver, pool_size=1, **FAST)
    calls = driver.wait_for("connect", 5, timeout=5)
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    # exp: 0.05, 0.1, 0.2, 0.2 (capped).  A timer never fires early.
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert expected <= gap < expected + 0.15, gaps


def test_failed_connects_are_retried_with_rand_backoff_spacing(pools: list[Pool]) -> None:
    driver = ScriptedDriver({"connect": [OSError("refused")] * 5})
    start(pools, driver, pool_size=1, backoff_type="rand", backoff_min=0.05, backoff_max=0.15)
    calls = driver.wait_for("connect", 6, timeout=5)
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert all(0.05 <= gap < 0.15 + 0.1 for gap in gaps), gaps


def test_failed_connects_are_retried_with_rand_exp_backoff_spacing(pools: list[Pool]) -> None:
    driver = ScriptedDriver({"connect": [OSError("refused")] * 6})
    start(pools, driver, pool_size=1, backoff_type="rand_exp", backoff_min=0.02,
          backoff_max=0.3)
    calls = driver.wait_for("connect", 7, timeout=5)
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    lower, prev = 0.1, 0.02  # lower = max(min, max / 3); prev starts at min
    for gap in gaps:
        # A timer fires a little late, never early: measured gaps overshoot.  The
        # circuit is open after the first failure, so the steps are the pool's
        # probes (pool/breaker.py), two messages away: allow for that in `prev`.
        assert min(prev, lower) - 0.04 <= gap < min(prev * 3, 0.3) + 0.1, gaps
        prev = gap


def test_configure_runs_before_every_attempt_with_pool_index(pools: list[Pool]) -> None:
    seen: list[dict[str, Any]] = []

    def configure(opts: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(opts))
        return {**opts, "attempt": len(seen)}

    driver = ScriptedDriver({"connect": [OSError("refused"), OSError("refused")]})
    start(pools, driver, pool_size=1, configure=configure, **FAST)
    calls = driver.wait_for("connect", 3)
    assert [s["pool_index"] for s in seen[:3]] == [0, 0, 0]
    # configure always starts from the same base options ...
    assert all("attempt" not in s for s in seen)
    # ... and what it returns is what connect gets.
    assert [c.args[0]["attempt"] for c in calls] == [1, 2, 3]


def test_configure_gets_each_connections_own_index(pools: list[Pool]) -> None:
    indexes: Recorder[int] = Recorder()

    def configure(opts: dict[str, Any]) -> dict[str, Any]:
        indexes(opts["pool_index"])
        return opts

    start(pools, ScriptedDriver(), pool_size=4, configure=configure)
    assert sorted(indexes.wait_until(lambda v: len(v) == 4)) == [0, 1, 2, 3]


def test_after_connect_failure_disconnects_and_reconnects_after_backoff(pools: list[Pool]) -> None:
    runs: Recorder[int] = Recorder()

    def after_connect(conn: Any) -> None:
        runs(conn.backend_pid)
        if len(runs.values()) == 1:
            raise RuntimeError("after_connect failed")

    events: Recorder[ConnectionEvent] = Recorder()
    driver = ScriptedDriver()
    pool = start(pools, driver, pool_size=1, after_connect=after_connect,
                 connection_listeners=[events], backoff_type="exp", backoff_min=0.2)
    events.wait_count(kind("connected"), 2)
    disconnect = driver.wait_for("disconnect", 1)[0]
    second_connect = driver.wait_for("connect", 2)[1]
    assert second_connect.at - disconnect.at >= 0.2  # one backoff step, not at once
    # connected is announced before after_connect runs, as in DBConnection.
    first, second = runs.wait_until(lambda v: len(v) == 2)
    assert first != second  # a new connection, not the failed one reused
    assert pool.query("SELECT 1").command == "SELECT 0"


def test_after_connect_timeout_disconnects_and_reconnects(pools: list[Pool]) -> None:
    import threading

    release = threading.Event()
    runs: Recorder[int] = Recorder()

    def after_connect(conn: Any) -> None:
        runs(1)
        if len(runs.values()) == 1:
            release.wait(10)  # hangs past after_connect_timeout

    driver = ScriptedDriver()
    start(pools, driver, pool_size=1, after_connect=after_connect,
          after_connect_timeout=0.2, backoff_type="exp", backoff_min=0.1)
    timed_out = driver.wait_for("disconnect", 1, timeout=10)[0]
    assert "after_connect" in str(timed_out.args[0]) and "timed out" in str(timed_out.args[0])
    connects = driver.wait_for("connect", 2, timeout=10)
    assert connects[1].at - connects[0].at >= 0.3  # timeout, then one backoff step
    runs.wait_until(lambda v: len(v) == 2)
    release.set()


def test_connection_listeners_receive_tagged_events_and_bad_listeners_are_harmless(
    pools: list[Pool],
) -> None:
    class ListenerActor(pykka.ThreadingActor):
        def __init__(self, sink: Recorder[ConnectionEvent]) -> None:
            super().__init__()
            self.sink = sink

        def on_receive(self, message: Any) -> None:
            self.sink(message)

    from_actor: Recorder[ConnectionEvent] = Recorder()
    tagged: Recorder[ConnectionEvent] = Recorder()
    listener = ListenerActor.start(from_actor)
    dead = ListenerActor.start(Recorder())
    dead.stop()

    def raising(event: ConnectionEvent) -> None:
        raise RuntimeError("listener bug")

    try:
        driver = ScriptedDriver()
        pool = start(pools, driver, pool_size=2,
                     connection_listeners=[raising, dead, listener, (tagged, "replica-a")])
        assert {e.tag for e in from_actor.wait_count(kind("connected"), 2)} == {None}
        assert {e.tag for e in tagged.wait_count(kind("connected"), 2)} == {"replica-a"}
        assert pool.query("SELECT 1").command == "SELECT 0"  # the pool is unharmed
    finally:
        listener.stop()


def test_disconnect_then_reconnect_is_announced(pools: list[Pool]) -> None:
    events: Recorder[ConnectionEvent] = Recorder()
    driver = ScriptedDriver({"handle_execute": [Disconnect(OSError("server closed"))]})
    pool = start(pools, driver, pool_size=1, connection_listeners=[events], **FAST)
    with pytest.raises(ConnectionError, match="connection lost: server closed"):
        pool.query("SELECT 1")
    values = events.wait_count(kind("connected"), 2)
    kinds = [e.kind for e in events.values()]
    assert kinds[:3] == ["connected", "disconnected", "connected"]
    assert values[0].backend_pid != values[1].backend_pid
    # The first reconnect after a disconnect is immediate (no backoff step).
    connects = driver.wait_for("connect", 2)
    disconnect = driver.wait_for("disconnect", 1)[0]
    assert connects[1].at - disconnect.at < 0.05


def test_idle_connections_are_pinged_and_a_failed_ping_reconnects(pools: list[Pool]) -> None:
    events: Recorder[ConnectionEvent] = Recorder()
    driver = ScriptedDriver({"ping": [Disconnect(OSError("gone"))]})
    start(pools, driver, pool_size=1, idle_interval=0.05, connection_listeners=[events], **FAST)
    pings = driver.wait_for("ping", 3, timeout=5)
    assert isinstance(pings[0].args[0], FakeState)
    kinds = [e.kind for e in events.wait_count(lambda e: True, 3)]
    assert kinds[:3] == ["connected", "disconnected", "connected"]
    # Pings of an idle connection keep coming, about one per interval.
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings[1:])]
    assert all(gap >= 0.05 for gap in gaps)


def test_idle_limit_caps_pings_per_interval(pools: list[Pool]) -> None:
    driver = ScriptedDriver()
    events: Recorder[ConnectionEvent] = Recorder()
    start(pools, driver, pool_size=3, idle_interval=0.1, idle_limit=0,
          connection_listeners=[events])
    events.wait_count(kind("connected"), 3)
    # Several intervals pass, measured by another pool's pings: none here.
    other = ScriptedDriver()
    start(pools, other, pool_size=1, idle_interval=0.1)
    other.wait_for("ping", 3)
    assert driver.calls_to("ping") == []


def test_a_crashing_connection_actor_is_restarted(pools: list[Pool]) -> None:
    attempts: Recorder[int] = Recorder()

    def configure(opts: dict[str, Any]) -> dict[str, Any]:
        attempts(opts["pool_index"])
        if len(attempts.values()) <= 2:
            raise RuntimeError("configure bug")
        return opts

    events: Recorder[ConnectionEvent] = Recorder()
    pool = start(pools, ScriptedDriver(), pool_size=1, configure=configure,
                 connection_listeners=[events], max_restarts=3, max_seconds=5)
    events.wait_count(kind("connected"), 1)
    assert len(attempts.values()) == 3  # two crashes, two restarts, then success
    assert pool.alive
    assert pool.query("SELECT 1").command == "SELECT 0"


def test_too_many_crashes_stop_the_pool_and_monitors_see_why(pools: list[Pool]) -> None:
    attempts: Recorder[int] = Recorder()

    def configure(opts: dict[str, Any]) -> dict[str, Any]:
        attempts(1)
        raise RuntimeError("configure bug")

    stopped: Recorder[BaseException | None] = Recorder()
    pool = start(pools, ScriptedDriver(), pool_size=1, configure=configure,
                 max_restarts=2, max_seconds=5)
    pool.add_monitor(stopped)
    assert pool.wait_stopped(5)
    (error,) = stopped.wait_until(lambda v: len(v) == 1)
    assert isinstance(error, PoolStoppedError)
    assert "crashed more than 2 times within 5s" in str(error)
    assert isinstance(error.cause, RuntimeError)
    assert len(attempts.values()) == 3  # the first run plus max_restarts restarts
    assert not pool.ref.is_alive()
    with pytest.raises(PoolStoppedError):
        pool.query("SELECT 1")


def test_backoff_stop_stops_the_pool_on_a_failed_connect(pools: list[Pool]) -> None:
    driver = ScriptedDriver({"connect": [OSError("refused")]})
    stopped: Recorder[BaseException | None] = Recorder()
    pool = start(pools, driver, pool_size=1, backoff_type="stop")
    pool.add_monitor(stopped)
    (error,) = stopped.wait_until(lambda v: len(v) == 1)
    assert isinstance(error, PoolStoppedError)
    assert "backoff_type is 'stop'" in str(error)
    assert len(driver.calls_to("connect")) == 1  # no retry


def test_backoff_stop_stops_the_pool_on_a_disconnect(pools: list[Pool]) -> None:
    driver = ScriptedDriver({"handle_execute": [Disconnect(OSError("server closed"))]})
    pool = start(pools, driver, pool_size=1, backoff_type="stop")
    with pytest.raises(ConnectionError):
        pool.query("SELECT 1")
    assert pool.wait_stopped(5)
    assert isinstance(pool.exit_error, PoolStoppedError)
    assert len(driver.calls_to("connect")) == 1  # it did not try to reconnect


def test_a_queued_caller_is_failed_when_the_pool_stops(pools: list[Pool]) -> None:
    driver = ScriptedDriver({"connect": [OSError("refused")]})
    pool = start(pools, driver, pool_size=1, backoff_type="stop")
    with pytest.raises(PoolStoppedError):
        pool.query("SELECT 1", timeout=10)  # fails at the stop, not at the timeout


def test_password_is_hidden_from_errors_logs_and_telemetry(
    pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "hunter2-very-secret"
    leak = OSError(f"cannot connect with password={secret} to host")
    driver = ScriptedDriver({"connect": [leak, leak]})
    errors: Recorder[Any] = Recorder()
    telemetry.attach("test-password", ["connection_error"],
                     lambda _e, _m, meta: errors(meta["error"]))
    try:
        with caplog.at_level(logging.DEBUG):
            start(pools, driver, pool_size=1, connect_kwargs={"password": secret}, **FAST)
            seen = errors.wait_until(lambda v: len(v) == 2)
    finally:
        telemetry.detach("test-password")
    assert caplog.records, "the failure must be logged"
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert record.exc_info is None or secret not in str(record.exc_info[1])
    for error in seen:
        assert secret not in str(error) and "******" in str(error)
        assert error.__cause__ is None and error.__context__ is None


def test_show_sensitive_data_keeps_the_whole_error(pools: list[Pool]) -> None:
    secret = "hunter2-very-secret"
    driver = ScriptedDriver({"connect": [OSError(f"password={secret}")]})
    errors: Recorder[Any] = Recorder()
    telemetry.attach("test-sensitive", ["connection_error"],
                     lambda _e, _m, meta: errors(meta["error"]))
    try:
        start(pools, driver, pool_size=1, connect_kwargs={"password": secret},
              show_sensitive_data_on_connection_error=True, **FAST)
        (error,) = errors.wait_until(lambda v: len(v) >= 1)[:1]
    finally:
        telemetry.detach("test-sensitive")
    assert secret in str(error)
    assert isinstance(error.__cause__, OSError)


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown pool option.*idle_intervall"):
        Pool.start("scripted", driver=ScriptedDriver(), idle_intervall=1)
    with pytest.raises(ConfigurationError, match="pool_size"):
        Pool.start("scripted", driver=ScriptedDriver(), pool_size=0)
