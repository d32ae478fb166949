"""Availability: the circuit breaker, pause/resume/drain and quiet reconnect logging.

Every test runs against a private cluster (``pg_cluster``) that it stops and
starts; the machine's server is never touched.  What is checked:

1. The database stops under load (8 threads of ``query``/``checkout``/``aquery``,
   and 6 client threads of a ``dbpool serve`` child process): from 1 s after
   the stop every new call fails at once with
   ``ConnectionError(reason="unavailable")``, no call waits for half its
   timeout, and the server's log stays small.  Remote requests already waiting
   for a connection fail at once when the circuit opens, and wait during a
   pause (an in-process front end, so that the test can drive the pool).
2. During the outage at most one connect attempt is made per backoff step
   (attempts counted as TCP connections through a fault proxy), and ERROR
   lines come at most once per ``reconnect_log_interval``.
3. After the restart the pool serves within ``backoff_max + 1`` s and reopens
   its connections gradually (read from the server's log, causally: the
   ``n``-th new backend is received only after ``ceil((n - 1) / 2)`` earlier
   ones were authorized); health events trace closed -> open -> half_open ->
   open ... -> half_open -> closed, the same on telemetry and on listeners.
   A pool started while the database is down fails fast, then serves.
4. ``pause``/``resume`` and ``drain`` (pg_stat_activity shows what is open).
5. Log volume during a 30 s outage of a pool of 10 stays under the documented
   bound (about 31 s: in the normal suite, not ``slow``).
6. ``open_circuit``/``close_circuit`` (no probing, even with the database
   down), ``breaker_threshold``, health in ``metrics()`` and
   ``client.status()``, and ``backoff_type="stop"``.

Two regression tests guard bugs found here (fixed in 1b1b5a2): a probe
whose actor crashed (``configure`` raised) left the circuit half_open for
ever, and drain left open the connections that were being pinged or were
connecting when it ran.

Waits poll a condition with a deadline.  The only plain waits are outages
and counting windows, which are the behaviour under test, and short windows
that show something does *not* happen.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent, HealthEvent
from dbpool.client import Client, Event, Subscription
from dbpool.errors import ConnectionError, PoolStoppedError
from dbpool.pool import Pool
from dbpool.server.frontend import FrontEnd
from tests.support.events import Recorder, wait_for
from tests.support.faultproxy import ProxyFactory
from tests.support.frontend import front_end as serve_in_thread
from tests.support.load import Call, Load, describe
from tests.support.pgcluster import PgCluster
from tests.support.remote import ServerProcess

BACKOFF_MIN = 0.2
BACKOFF_MAX = 1.0
#: Pool options that make an outage quick to notice and to recover from.
FAST: dict[str, Any] = {
    "backoff_min": BACKOFF_MIN,
    "backoff_max": BACKOFF_MAX,
    "idle_interval": 0.2,
    "reconnect_log_interval": 1.0,
}
FAST_TOML = """\
[pool]
backoff_min = 0.2
backoff_max = 1.0
idle_interval = 0.2
reconnect_log_interval = 1.0
"""
#: The timeout of every call made under load.
CALL_TIMEOUT = 5.0
#: How long after the stop every new call must fail with "unavailable".
NOTICE = 1.0
#: How long a call refused "at once" may take (scheduling noise on a busy box).
AT_ONCE = 0.25


# -- helpers ------------------------------------------------------------------------------


def pool_name() -> str:
    return f"avail-{uuid.uuid4().hex[:8]}"


def start_pool(pools: list[Pool], conninfo: str, **options: Any) -> Pool:
    options.setdefault("name", pool_name())
    pool = Pool.start(conninfo, **options)
    pools.append(pool)
    return pool


def wait_ready(pool: Pool, size: int, timeout: float = 10.0) -> None:
    wait_for(lambda: pool.metrics()["ready_conn_count"] == size, timeout,
             f"{size} idle connections in {pool.name}")


def dbpool_backends(cluster: PgCluster) -> list[int]:
    """The pids of the backends a pool holds on ``cluster`` (application_name 'dbpool')."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        return [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbpool' "
            "AND pid <> pg_backend_pid()")]


def terminate(cluster: PgCluster, pids: list[int]) -> None:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])


def transitions(states: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(state, previous)`` pairs that change the state (pause and the like do not)."""
    return [(state, previous) for state, previous in states if state != previous]


def health_of(events: Recorder[dict[str, Any]], pool: Pool) -> list[tuple[str, str]]:
    """The ``(state, previous)`` of the telemetry health events of ``pool``."""
    return [(m["state"], m["previous"]) for m in events.values() if m.get("pool") == pool.name]


def listener_health(events: Recorder[Any]) -> list[HealthEvent]:
    return [e for e in events.values() if isinstance(e, HealthEvent)]


def assert_chained(changes: list[tuple[str, str]]) -> None:
    """Each change starts from the state the previous one ended in, from "closed"."""
    state = "closed"
    for new, previous in changes:
        assert previous == state, f"{previous!r} after {state!r} in {changes}"
        assert new in ("closed", "open", "half_open"), changes
        state = new


def unavailable(error: BaseException | None) -> bool:
    return isinstance(error, ConnectionError) and error.reason == "unavailable"


class AsyncCaller:
    """``pool.aquery`` driven from one load thread, on that thread's own event loop."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.local = threading.local()
        self.loops: list[asyncio.AbstractEventLoop] = []

    def __call__(self) -> object:
        loop = getattr(self.local, "loop", None)
        if loop is None:
            loop = self.local.loop = asyncio.new_event_loop()
            self.loops.append(loop)
        return loop.run_until_complete(self.pool.aquery("SELECT 1", timeout=CALL_TIMEOUT))

    def close(self) -> None:
        for loop in self.loops:
            loop.close()


def pool_load(pool: Pool) -> Load:
    """8 threads: 5 of ``pool.query``, 2 of ``pool.checkout``, 1 of ``pool.aquery``."""

    def query() -> object:
        return pool.query("SELECT 1", timeout=CALL_TIMEOUT)

    def checkout() -> object:
        with pool.checkout(timeout=CALL_TIMEOUT) as conn:
            return conn.query("SELECT 1")

    return Load([query] * 5 + [checkout] * 2 + [AsyncCaller(pool)])


def check_outage_calls(calls: list[Call], down: float) -> None:
    """Calls made from ``NOTICE`` s after the database went down fail at once with
    "unavailable", and no call at all waits for half its timeout."""
    late = [c for c in calls if c.start >= down + NOTICE]
    assert len(late) >= 20, f"too few calls after the outage began: {len(late)}"
    wrong = Counter(describe(c.error) for c in late if not unavailable(c.error))
    assert not wrong, f"calls made {NOTICE:g}s after the stop that were not refused as " \
                      f"unavailable: {dict(wrong)}"
    slowest_late = max(c.duration for c in late)
    assert slowest_late < AT_ONCE, f"a refusal took {slowest_late:.3f}s"
    slowest = max(calls, key=lambda c: c.duration)
    assert slowest.duration < CALL_TIMEOUT / 2, (
        f"a call waited {slowest.duration:.2f}s of its {CALL_TIMEOUT:g}s timeout "
        f"({describe(slowest.error)}, started {slowest.start - down:+.2f}s from the stop)")


class LogLines(logging.Handler):
    """Keeps every record of the ``dbpool`` loggers at INFO and above."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._records_lock:
            self.records.append(record)

    def since(self, when: float) -> list[logging.LogRecord]:
        with self._records_lock:
            return [r for r in self.records if r.created >= when]


@pytest.fixture
def dbpool_log() -> Iterator[LogLines]:
    logger = logging.getLogger("dbpool")
    handler = LogLines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def health_events() -> Iterator[Recorder[dict[str, Any]]]:
    """The telemetry "health" events of every pool (filter on ``metadata["pool"]``)."""
    events: Recorder[dict[str, Any]] = Recorder()
    handler_id = f"test-availability-health-{uuid.uuid4().hex}"
    telemetry.attach(handler_id, ["health"], lambda _e, _m, metadata: events(dict(metadata)))
    try:
        yield events
    finally:
        telemetry.detach(handler_id)


# -- 1. the database stops under load ------------------------------------------------------


def test_a_database_stopped_under_load_fails_every_checkout_at_once(
        pg_cluster: PgCluster, pools: list[Pool]) -> None:
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=4, **FAST)
    wait_ready(pool, 4)
    assert pool.health == "closed" and pool.metrics()["health"] == "closed"
    load = pool_load(pool).start()
    try:
        wait_for(lambda: load.count(lambda c: c.error is None) >= 200, 10, "calls to succeed")
        stopping = time.monotonic()
        pg_cluster.stop("fast")
        down = time.monotonic()
        wait_for(lambda: load.count(lambda c: c.start >= down + NOTICE + 1.0) >= 8, 10,
                 "calls well into the outage")
    finally:
        calls = load.stop()
    before = [c for c in calls if c.end < stopping]
    assert before and all(c.error is None for c in before), "the pool did not serve at first"
    check_outage_calls(calls, down)
    assert pool.health in ("open", "half_open")
    assert pool.metrics()["health"] in ("open", "half_open")
    for call in (lambda: pool.checkout(queue=False).__enter__(),
                 lambda: asyncio.run(pool.acheckout().__aenter__())):
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            call()
        assert info.value.reason == "unavailable"
        assert time.monotonic() - started < AT_ONCE


def _priming(sub: Subscription, cluster: PgCluster, client: Client, size: int) -> None:
    """Make sure ``sub`` is joined (ZeroMQ's slow joiner): kill a backend until an event
    arrives, then wait for the pool to be whole again."""
    deadline = time.monotonic() + 15
    while True:
        pids = dbpool_backends(cluster)
        terminate(cluster, pids[:1])
        if sub.get(timeout=1.0) is not None:
            break
        assert time.monotonic() < deadline, "the subscription never received an event"
    wait_for(lambda: client.status()["pool"]["ready_conn_count"] == size
             and len(dbpool_backends(cluster)) == size, 10, "the pool to be whole again")


def events_until(sub: Subscription, done: Callable[[list[Event]], bool], timeout: float,
                 what: str, got: list[Event]) -> list[Event]:
    deadline = time.monotonic() + timeout
    while not done(got):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            seen = [(e.topic, e.name, e.data.get("state")) for e in got]
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; got {seen}")
        event = sub.get(timeout=remaining)
        if event is not None:
            got.append(event)
    return got


def _health_event(state: str, previous: str) -> Callable[[list[Event]], bool]:
    def done(events: list[Event]) -> bool:
        return any(e.topic == "pool" and e.name == "health" and e.data.get("state") == state
                   and e.data.get("previous") == previous for e in events)
    return done


def test_remote_clients_get_unavailable_at_once_and_service_resumes(
        pg_cluster: PgCluster, tmp_path: Path) -> None:
    size, name = 4, pool_name()
    config = tmp_path / "serve.toml"
    config.write_text(FAST_TOML)
    with ServerProcess(pg_cluster.conninfo(), "--config", str(config), "--name", name,
                       pool_size=size) as server, \
            Client(server.endpoint, timeout=CALL_TIMEOUT) as client, \
            client.subscribe(("pool", "connection")) as sub:
        wait_for(lambda: client.status()["pool"]["ready_conn_count"] == size, 10,
                 "the server's pool to connect")
        status = client.status()
        assert status["health"] == "closed" and status["pool"]["health"] == "closed"
        _priming(sub, pg_cluster, client, size)

        def remote_query() -> object:
            return client.query("SELECT 1", timeout=CALL_TIMEOUT)

        load = Load([remote_query] * 6).start()
        try:
            wait_for(lambda: load.count(lambda c: c.error is None) >= 100, 10,
                     "remote calls to succeed")
            log_mark = len(server.output().splitlines())
            stopping = time.monotonic()
            pg_cluster.stop("fast")
            down = time.monotonic()
            wait_for(lambda: load.count(lambda c: c.start >= down + NOTICE + 1.0) >= 6, 10,
                     "remote calls well into the outage")
        finally:
            calls = load.stop()
        check_outage_calls(calls, down)
        status = client.status()
        assert status["health"] in ("open", "half_open"), status
        assert status["pool"]["health"] in ("open", "half_open"), status
        got: list[Event] = []
        events_until(sub, _health_event("open", "closed"), 5, "a health event: open", got)
        opened = next(e for e in got if e.name == "health")
        assert opened.data["pool"] == name

        pg_cluster.start()
        up = time.monotonic()
        wait_for(lambda: _remote_serves(client), BACKOFF_MAX + 1.0, "the service to serve again")
        recovered = time.monotonic() - up
        assert recovered <= BACKOFF_MAX + 1.0, f"served again {recovered:.2f}s after the restart"
        events_until(sub, _health_event("closed", "half_open"), 5, "a health event: closed", got)
        wait_for(lambda: client.status()["health"] == "closed", 2, "status health closed")

        # Thousands of refused requests, yet the server's log stays within the bound
        # (reconnect_log_interval = 1 s): errors, one open, one close, a drop per connection.
        outage = time.monotonic() - stopping
        lines = [line for line in server.output().splitlines()[log_mark:]
                 if _SERVER_LOG_LINE.match(line)]
        errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
        text = "\n".join(lines)
        assert len(errors) <= math.ceil(outage) + 1, text
        assert sum(" WARNING " in line for line in lines) == 1, text
        assert len(lines) <= math.ceil(outage) + 1 + 2 + size, text


_SERVER_LOG_LINE = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR|CRITICAL) dbpool[\w.]*: ")


@pytest.fixture
def front_end(pools: list[Pool]) -> Iterator[Callable[[Pool], FrontEnd]]:
    """``make(pool) -> FrontEnd``: ``dbpool serve``'s front end on ``pool``, run on a
    thread of this process (so that the test can call the pool's own methods)."""
    with ExitStack() as stack:
        yield lambda pool: stack.enter_context(serve_in_thread(pool))


def test_remote_requests_waiting_for_a_connection_fail_at_once_when_the_circuit_opens(
        pg_cluster: PgCluster, pools: list[Pool],
        front_end: Callable[[Pool], FrontEnd]) -> None:
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=1, **FAST)
    wait_ready(pool, 1)
    front = front_end(pool)
    outcome: dict[str, Any] = {}
    with Client(front.endpoint, timeout=CALL_TIMEOUT) as client:
        assert client.query("SELECT 1").rows == [(1,)]

        def remote_waiter() -> None:
            started = time.monotonic()
            try:
                outcome["rows"] = client.query("SELECT 2", timeout=CALL_TIMEOUT).rows
            except ConnectionError as exc:
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - started

        with pool.checkout(timeout=10):  # the only connection: the remote request waits
            thread = threading.Thread(target=remote_waiter, daemon=True)
            thread.start()
            wait_for(lambda: pool.metrics()["checkout_queue_length"] == 1, 3,
                     "the remote request to wait for a connection")
            pool.open_circuit()
            thread.join(CALL_TIMEOUT + 1)
        assert unavailable(outcome.get("error")), outcome
        assert outcome["took"] < 1.0, outcome
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            client.query("SELECT 3", timeout=CALL_TIMEOUT)
        assert info.value.reason == "unavailable"
        assert time.monotonic() - started < AT_ONCE
        assert client.status()["health"] == "open"

        pool.close_circuit()
        assert client.query("SELECT 4").rows == [(4,)]
        assert client.status()["health"] == "closed"


def test_remote_requests_wait_during_pause_and_are_served_on_resume(
        pg_cluster: PgCluster, pools: list[Pool],
        front_end: Callable[[Pool], FrontEnd]) -> None:
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=2, **FAST)
    wait_ready(pool, 2)
    front = front_end(pool)
    outcome: dict[str, Any] = {}
    with Client(front.endpoint, timeout=CALL_TIMEOUT) as client:
        assert client.query("SELECT 1").rows == [(1,)]
        tx = client.transaction()
        tx.query("SELECT 1")
        pool.pause()
        assert tx.query("SELECT 5").rows == [(5,)]  # an open transaction goes on
        tx.commit()

        def remote_waiter() -> None:
            try:
                outcome["rows"] = client.query("SELECT 2", timeout=CALL_TIMEOUT).rows
            except ConnectionError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=remote_waiter, daemon=True)
        thread.start()
        wait_for(lambda: pool.metrics()["checkout_queue_length"] == 1, 3,
                 "the remote request to wait")
        thread.join(0.3)  # a window in which it must not be served
        assert outcome == {}, outcome
        pool.resume()
        thread.join(3)
        assert outcome == {"rows": [(2,)]}, outcome


def _remote_serves(client: Client) -> bool:
    try:
        return client.query("SELECT 1", timeout=1.0).rows == [(1,)]
    except ConnectionError as exc:
        assert exc.reason == "unavailable", exc
        return False


def test_a_pool_started_while_the_database_is_down_fails_fast_then_serves(
        pg_cluster: PgCluster, pools: list[Pool]) -> None:
    pg_cluster.stop("fast")
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=5, **FAST)
    wait_for(lambda: pool.health == "open", 3, "the circuit to open")
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            pool.query("SELECT 1", timeout=CALL_TIMEOUT)
        assert info.value.reason == "unavailable"
        assert time.monotonic() - started < AT_ONCE
    pg_cluster.start()
    up = time.monotonic()

    def serves() -> bool:
        try:
            return pool.query("SELECT 1", timeout=0.5).rows == [(1,)]
        except ConnectionError:
            return False

    wait_for(serves, BACKOFF_MAX + 1.0, "the pool to serve")
    assert time.monotonic() - up <= BACKOFF_MAX + 1.0
    wait_ready(pool, 5)
    assert pool.health == "closed"


# -- 2. one connect attempt per backoff step --------------------------------------------------


def attempts_bound(backoff_type: str, window: float) -> int:
    """The most attempts a one-per-step breaker can make in ``window`` s, if the backoff
    sequence started over at the window's start (it cannot do more)."""
    delays: list[float] = []
    delay = BACKOFF_MIN
    while sum(delays) <= window:
        delays.append(delay)
        # exp doubles; every rand_exp delay is at least backoff_min.
        delay = min(delay * 2, BACKOFF_MAX) if backoff_type == "exp" else BACKOFF_MIN
    steps = len(delays) - 1  # the last one overshot
    return steps + 2  # + one at the window's very start, + one for timer jitter at its end


@pytest.mark.parametrize("backoff_type", ["exp", "rand_exp"])
def test_an_outage_gets_one_connect_attempt_per_backoff_step(
        pg_cluster: PgCluster, fault_proxy: ProxyFactory, pools: list[Pool],
        dbpool_log: LogLines, backoff_type: str) -> None:
    size, window = 8, 4.0
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    pool = start_pool(pools, proxy.wrap_conninfo(pg_cluster.conninfo()), pool_size=size,
                      backoff_type=backoff_type, **FAST)
    wait_ready(pool, size)
    pg_cluster.stop("fast")
    wait_for(lambda: pool.health == "open", 3, "the circuit to open")
    start, began = proxy.connection_count, time.time()
    time.sleep(window)  # the outage under test
    attempts = proxy.connection_count - start
    bound = attempts_bound(backoff_type, window)
    # Without the breaker every connection would try once per step of its own.
    assert bound * 3 <= size * (bound - 2)
    assert 2 <= attempts <= bound, f"{attempts} connect attempts in {window:g}s (bound {bound})"
    assert pool.health in ("open", "half_open")
    # reconnect_log_interval=1.0: at most one ERROR line a second, and some.
    errors = [r.created for r in dbpool_log.since(began) if r.levelno >= logging.ERROR]
    assert 1 <= len(errors) <= math.ceil(window / 1.0) + 1, errors
    gaps = [b - a for a, b in itertools.pairwise(errors)]
    assert all(gap >= 0.9 for gap in gaps), gaps


# -- 3. recovery: within backoff_max + 1 s, gradually; health events ----------------------------

_LOG_LINE = re.compile(r"\[(\d+)\] LOG:  connection (received|authorized): (.*)$", re.MULTILINE)


def new_backend_order(log: str) -> list[tuple[str, int]]:
    """``("received" | "authorized", pid)`` of the pool's new backends, in log order."""
    ours = {int(pid) for pid, what, rest in _LOG_LINE.findall(log)
            if what == "authorized" and re.search(r"application_name=dbpool$", rest)}
    return [(what, int(pid)) for pid, what, _ in _LOG_LINE.findall(log) if int(pid) in ours]


def test_after_a_restart_the_pool_serves_within_backoff_max_and_reopens_gradually(
        pg_cluster: PgCluster, fault_proxy: ProxyFactory, pools: list[Pool],
        health_events: Recorder[dict[str, Any]]) -> None:
    """The ramp is read from the server's log.  A local server forks, logs and
    authorizes a backend in well under a millisecond, so connects made all at once
    would still look one after the other there; a proxy adds latency (each connect
    then takes a few round trips of 0.1 s) to make concurrent connects visible."""
    size = 10
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    listened: Recorder[Any] = Recorder()
    pool = start_pool(pools, proxy.wrap_conninfo(pg_cluster.conninfo()), pool_size=size,
                      connection_listeners=[listened], **FAST)
    wait_ready(pool, size)
    pg_cluster.stop("fast")
    # Open, then at least one failed probe: the breaker is in its steady state.
    health_events.wait_until(
        lambda _: ("open", "half_open") in transitions(health_of(health_events, pool)), 5)
    log_offset = len(pg_cluster.log_text())
    proxy.set_latency(0.05)
    pg_cluster.start()
    up = time.monotonic()

    def serves() -> bool:
        try:
            return pool.query("SELECT 1", timeout=0.5).rows == [(1,)]
        except ConnectionError as exc:
            assert exc.reason in ("unavailable", "queue_timeout"), exc
            return False

    wait_for(serves, BACKOFF_MAX + 1.0, "the pool to serve again")
    recovered = time.monotonic() - up
    assert recovered <= BACKOFF_MAX + 1.0, f"served again {recovered:.2f}s after the restart"
    wait_for(lambda: pool.metrics()["ready_conn_count"] == size, 10, "every connection back")
    assert pool.health == "closed" and pool.metrics()["health"] == "closed"

    order = new_backend_order(pg_cluster.log_text()[log_offset:])
    received = [pid for what, pid in order if what == "received"]
    assert len(received) == size, order
    authorized = 0
    for position, (what, _pid) in enumerate(order):
        if what == "authorized":
            authorized += 1
            continue
        nth = received.index(_pid)  # 0-based rank of this new backend
        assert authorized >= math.ceil(nth / 2), (
            f"backend #{nth + 1} was received after only {authorized} authorized "
            f"(at most 1 + 2 per success may try): {order[:position + 1]}")
    first_authorized = next(i for i, (what, _) in enumerate(order) if what == "authorized")
    assert order[first_authorized - 1] == ("received", received[0]) and first_authorized == 1, \
        f"the probe did not connect alone: {order}"

    # Health: closed -> open (-> half_open -> open)* -> half_open -> closed, on both channels.
    health_events.wait_until(
        lambda _: transitions(health_of(health_events, pool))[-1:] == [("closed", "half_open")])
    listened.wait_until(lambda _: transitions(
        [(e.state, e.previous) for e in listener_health(listened)])[-1:] == [
            ("closed", "half_open")])
    changes = transitions(health_of(health_events, pool))
    assert changes[0] == ("open", "closed"), changes
    assert changes[-1] == ("closed", "half_open"), changes
    assert ("half_open", "open") in changes and ("open", "half_open") in changes, changes
    assert_chained(changes)
    metadata = [m for m in health_events.values() if m.get("pool") == pool.name]
    assert all("reason" in m for m in metadata), metadata
    heard = listener_health(listened)
    assert all(e.pool == pool.name for e in heard), heard
    assert transitions([(e.state, e.previous) for e in heard]) == changes
    listened.wait_count(lambda e: isinstance(e, ConnectionEvent) and e.kind == "connected",
                        2 * size)


def test_a_probe_whose_configure_raises_does_not_leave_the_circuit_half_open(
        pg_cluster: PgCluster, pools: list[Pool]) -> None:
    """A probe whose actor crashes (here ``configure`` raises once) is a failed probe:
    the circuit opens again and the next step probes, so the pool serves once the
    database is back.  (It used to stay half_open for ever.)"""
    raising = threading.Event()

    def configure(opts: dict[str, Any]) -> dict[str, Any]:
        if raising.is_set():
            raising.clear()  # once: e.g. a secrets service briefly down with the database
            raise RuntimeError("could not fetch the password")
        return opts

    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=3, configure=configure, **FAST)
    wait_ready(pool, 3)
    pg_cluster.stop("fast")
    wait_for(lambda: pool.health == "open", 3, "the circuit to open")
    raising.set()  # while open only probes call configure: the next probe crashes
    wait_for(lambda: not raising.is_set(), 5, "the probe to call configure")
    pg_cluster.start()
    up = time.monotonic()

    def serves() -> bool:
        try:
            return pool.query("SELECT 1", timeout=0.5).rows == [(1,)]
        except ConnectionError:
            return False

    try:
        wait_for(serves, BACKOFF_MAX + 3.0, "the pool to serve again")
    except AssertionError:
        raise AssertionError(f"not serving {time.monotonic() - up:.1f}s after the restart; "
                             f"health {pool.health!r}") from None
    assert pool.health == "closed"


# -- 4. pause / resume, drain ---------------------------------------------------------------


def test_pause_lets_lent_connections_finish_and_queues_checkouts_until_resume(
        pg_cluster: PgCluster, pools: list[Pool]) -> None:
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=2, **FAST)
    wait_ready(pool, 2)
    results: dict[str, Any] = {}
    done = threading.Event()

    def waiter() -> None:
        try:
            results["query"] = pool.query("SELECT 2", timeout=10).rows
            results["aquery"] = asyncio.run(pool.aquery("SELECT 3", timeout=10)).rows
        except Exception as exc:
            results["error"] = exc
        finally:
            done.set()

    with pool.checkout(timeout=10) as held:
        pool.pause()
        assert held.query("SELECT 1").rows == [(1,)]  # lent work goes on
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            pool.query("SELECT 1", timeout=0.3)  # queues with its usual timeout
        waited = time.monotonic() - started
        assert info.value.reason == "queue_timeout"
        assert 0.25 <= waited < 1.5, waited
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        wait_for(lambda: pool.metrics()["checkout_queue_length"] == 1, 2, "the checkout to queue")
        assert held.query("SELECT 1").rows == [(1,)]
    # Checked in: still paused, so the waiter is not served.
    assert not done.wait(0.3), results
    assert pool.metrics()["checkout_queue_length"] == 1
    pool.resume()
    assert done.wait(2), "the queued checkout was not served on resume"
    assert results == {"query": [(2,)], "aquery": [(3,)]}
    assert pool.health == "closed"


def test_drain_waits_for_checkins_closes_every_connection_and_resume_reconnects(
        pg_cluster: PgCluster, pools: list[Pool]) -> None:
    size = 3
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=size, **FAST)
    wait_ready(pool, size)
    assert len(dbpool_backends(pg_cluster)) == size
    lent = threading.Event()
    result: dict[str, Any] = {}

    def holder() -> None:
        with pool.checkout(timeout=10) as conn:
            lent.set()
            time.sleep(0.5)  # work in progress when the drain begins
            result["rows"] = conn.query("SELECT 1").rows

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert lent.wait(5)
    started = time.monotonic()
    assert pool.drain(5.0) is True
    took = time.monotonic() - started
    thread.join(5)
    assert result == {"rows": [(1,)]}, "the lent connection's work did not finish"
    assert 0.3 <= took < 5.0, f"drain returned after {took:.2f}s"
    assert pool.metrics()["ready_conn_count"] == 0
    wait_for(lambda: dbpool_backends(pg_cluster) == [], 1, "drain to close every connection")
    with pytest.raises(ConnectionError) as info:
        pool.query("SELECT 1", timeout=0.3)  # paused: it waits, then times out
    assert info.value.reason == "queue_timeout"
    assert dbpool_backends(pg_cluster) == []

    pool.resume()
    wait_for(lambda: len(dbpool_backends(pg_cluster)) == size, 5, "the pool to reconnect")
    assert pool.query("SELECT 1", timeout=5).rows == [(1,)]
    wait_ready(pool, size)


def test_drain_returns_false_when_a_connection_is_not_checked_in_in_time(
        pg_cluster: PgCluster, pools: list[Pool]) -> None:
    size = 3
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=size, **FAST)
    wait_ready(pool, size)
    lent, release = threading.Event(), threading.Event()

    def holder() -> None:
        try:
            with pool.checkout(timeout=30) as conn:
                lent.set()
                release.wait(10)
                conn.query("SELECT 1")
        except Exception:  # the drain may have closed it: that is not under test here
            pass

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert lent.wait(5)
    started = time.monotonic()
    drained = pool.drain(0.5)
    took = time.monotonic() - started
    release.set()
    thread.join(5)
    assert drained is False
    assert 0.45 <= took < 2.0, f"drain(0.5) returned after {took:.2f}s"
    wait_for(lambda: dbpool_backends(pg_cluster) == [], 3, "every connection to close")
    assert pool.metrics()["ready_conn_count"] == 0

    pool.resume()
    wait_for(lambda: len(dbpool_backends(pg_cluster)) == size, 5, "the pool to reconnect")
    assert pool.query("SELECT 1", timeout=5).rows == [(1,)]


@pytest.mark.parametrize("busy", ["pinging", "connecting"])
def test_drain_closes_connections_that_were_busy_in_their_actors(
        pg_cluster: PgCluster, fault_proxy: ProxyFactory, pools: list[Pool], busy: str) -> None:
    """Latency through a proxy (0.2 s each way) makes a ping take 0.4 s and a connect
    about 1 s; drain runs while connections are in their actors' hands.  Over the
    next 2.5 s (time for them to finish and be closed) none may become idle in the
    drained pool, and none may be left open.  idle_interval=5 keeps the idle sweep,
    which closes such connections eventually, out of that window.  (They used to come
    back to the drained pool's queue and stay open until a later idle sweep.)"""
    size, window = 4, 2.5
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    conninfo = proxy.wrap_conninfo(pg_cluster.conninfo())
    if busy == "pinging":
        pool = start_pool(pools, conninfo, pool_size=size, idle_interval=5.0)
        wait_ready(pool, size)
        proxy.set_latency(0.2)
        # The idle sweep pings every idle connection: wait until some are out for one.
        wait_for(lambda: pool.metrics()["ready_conn_count"] < size, 12, "a ping in flight",
                 step=0.005)
    else:
        proxy.set_latency(0.2)
        pool = start_pool(pools, conninfo, pool_size=size, idle_interval=5.0)
        wait_for(lambda: proxy.active_count == size, 5, "connects in flight")
        assert pool.metrics()["ready_conn_count"] == 0
    assert pool.drain(2.0) is True
    drained = time.monotonic()
    most_ready = 0
    while time.monotonic() < drained + window:  # the window under test
        most_ready = max(most_ready, pool.metrics()["ready_conn_count"])
        time.sleep(0.02)
    left = dbpool_backends(pg_cluster)
    assert left == [] and most_ready == 0, (
        f"{len(left)} connections still open {window:g}s after drain() returned "
        f"(up to {most_ready} of them idle in the drained pool)")


# -- 5. log volume during a 30 s outage -------------------------------------------------------


def test_a_30s_outage_logs_no_more_than_the_documented_lines(
        pg_cluster: PgCluster, pools: list[Pool], dbpool_log: LogLines) -> None:
    size, outage = 10, 30.0
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=size, backoff_min=BACKOFF_MIN,
                      backoff_max=BACKOFF_MAX, idle_interval=0.2)
    interval = pool.options.reconnect_log_interval
    assert interval == 10.0  # the default
    wait_ready(pool, size)
    began = time.time()
    pg_cluster.stop("fast")
    wait_for(lambda: pool.health == "open", 3, "the circuit to open")
    time.sleep(max(0.0, began + outage - time.time()))  # the outage under test
    pg_cluster.start()
    wait_for(lambda: pool.health == "closed" and pool.metrics()["ready_conn_count"] == size,
             10, "the pool to recover")
    wait_for(lambda: any(r.levelno == logging.INFO and "close" in r.getMessage().lower()
                         for r in dbpool_log.since(began)), 2, "the circuit's close line")
    lines = dbpool_log.since(began)
    text = "\n".join(f"{r.created - began:6.2f} {r.levelname} {r.name}: {r.getMessage()}"
                     for r in lines)
    errors = [r for r in lines if r.levelno >= logging.ERROR]
    warnings = [r for r in lines if r.levelno == logging.WARNING]
    infos = [r for r in lines if r.levelno == logging.INFO]
    error_bound = math.ceil(outage / interval) + 1
    assert len(errors) <= error_bound, text
    # Not silent either: connects fail at least once a second (backoff_max), so a line
    # comes at the first failure and then within a second of each interval's end.
    assert len(errors) >= 3, text
    gaps = [b.created - a.created for a, b in itertools.pairwise(errors)]
    assert all(gap >= interval - 0.5 for gap in gaps), text
    # Each later line sums up the attempts since the one before.
    assert all(re.search(r"\b\d+\b.*attempt", r.getMessage()) for r in errors[1:]), text
    assert len(warnings) == 1, text  # the circuit opened, once
    disconnected = [r for r in infos if "disconnected" in r.getMessage()]
    assert len(disconnected) <= size, text
    assert len(infos) <= size + 1, text  # a disconnected line per connection + the close
    assert len(lines) <= error_bound + 1 + 1 + size, text


# -- 6. manual control, threshold, health in metrics, backoff_type="stop" -------------------------


def test_open_circuit_fails_checkouts_and_waiters_at_once_without_probing(
        pg_cluster: PgCluster, fault_proxy: ProxyFactory, pools: list[Pool],
        health_events: Recorder[dict[str, Any]]) -> None:
    proxy = fault_proxy(pg_cluster.host, pg_cluster.port)
    listened: Recorder[Any] = Recorder()
    pool = start_pool(pools, proxy.wrap_conninfo(pg_cluster.conninfo()), pool_size=1,
                      connection_listeners=[listened], **FAST)
    wait_ready(pool, 1)
    outcomes: dict[str, dict[str, Any]] = {"sync": {}, "async": {}}

    def waiter(kind: str, call: Callable[[], object]) -> None:
        started = time.monotonic()
        try:
            call()
        except ConnectionError as exc:
            outcomes[kind]["error"] = exc
        outcomes[kind]["took"] = time.monotonic() - started

    with pool.checkout(timeout=10) as held:
        threads = [
            threading.Thread(target=waiter, daemon=True, args=(
                "sync", lambda: pool.query("SELECT 1", timeout=CALL_TIMEOUT))),
            threading.Thread(target=waiter, daemon=True, args=(
                "async", lambda: asyncio.run(pool.aquery("SELECT 1", timeout=CALL_TIMEOUT)))),
        ]
        for thread in threads:
            thread.start()
        wait_for(lambda: pool.metrics()["checkout_queue_length"] == 2, 2, "two waiters")
        attempts = proxy.connection_count
        pool.open_circuit()
        for thread in threads:
            thread.join(CALL_TIMEOUT + 1)
        for outcome in outcomes.values():
            assert unavailable(outcome.get("error")), outcomes
            assert outcome["took"] < 1.0, outcomes
        held.query("SELECT 1")  # a lent connection is not taken away
    assert pool.health == "open" and pool.metrics()["health"] == "open"

    async def acheckout() -> None:
        async with pool.acheckout():
            pass

    refusals: list[Callable[[], object]] = [
        lambda: pool.query("SELECT 1", timeout=CALL_TIMEOUT),
        lambda: pool.checkout(timeout=CALL_TIMEOUT).__enter__(),
        lambda: pool.query("SELECT 1", queue=False),
        lambda: asyncio.run(pool.aquery("SELECT 1", timeout=CALL_TIMEOUT)),
        lambda: asyncio.run(acheckout()),
    ]
    for refuse in refusals:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as info:
            refuse()
        assert info.value.reason == "unavailable"
        assert time.monotonic() - started < AT_ONCE

    # Maintenance: the database goes down while the circuit is open by hand.  The
    # connection drops, and nothing probes: not one attempt in several backoff steps.
    pg_cluster.stop("fast")
    listened.wait_count(lambda e: isinstance(e, ConnectionEvent) and e.kind == "disconnected",
                        1)
    time.sleep(BACKOFF_MIN + 2 * BACKOFF_MIN + 4 * BACKOFF_MIN)  # room for 3 probes: none
    assert proxy.connection_count == attempts, "a manually opened circuit probed"
    assert pool.health == "open"
    pg_cluster.start()

    pool.close_circuit()
    assert pool.health == "closed"
    assert pool.query("SELECT 1", timeout=5).rows == [(1,)]
    assert pool.metrics()["health"] == "closed"
    expected = [("open", "closed"), ("closed", "open")]
    health_events.wait_until(lambda _: len(transitions(health_of(health_events, pool))) >= 2)
    listened.wait_until(lambda _: len(listener_health(listened)) >= 2)
    changes = transitions(health_of(health_events, pool))
    assert changes == expected, changes
    heard = listener_health(listened)
    assert transitions([(e.state, e.previous) for e in heard]) == changes
    assert all(e.pool == pool.name for e in heard)


@pytest.mark.parametrize(("threshold", "opens"), [(3, True), (50, False)])
def test_breaker_threshold_failed_connects_open_the_circuit_while_a_connection_is_up(
        pg_cluster: PgCluster, fault_proxy: ProxyFactory, pools: list[Pool],
        threshold: int, opens: bool) -> None:
    """Connection 0 stays up; 1 and 2 are made to fail (their connects go to a proxy
    that resets them).  ``breaker_threshold`` consecutive failures open the circuit
    even so; fewer do not."""
    size = 3
    dead = fault_proxy(pg_cluster.host, pg_cluster.port)
    dead.refuse(True)
    failing: set[int] = set()

    def configure(opts: dict[str, Any]) -> dict[str, Any]:
        if opts["pool_index"] in failing:
            return {**opts, "conninfo": dead.wrap_conninfo(opts["conninfo"])}
        return opts

    name = pool_name()
    #: (state, previous, connects refused so far) at each health event of this pool
    seen: Recorder[tuple[str, str, int]] = Recorder()
    handler_id = f"test-availability-threshold-{name}"
    telemetry.attach(handler_id, ["health"], lambda _e, _m, meta: seen(
        (meta["state"], meta["previous"], dead.refused_count)) if meta.get("pool") == name
        else None)
    try:
        listened: Recorder[Any] = Recorder()
        pool = start_pool(pools, pg_cluster.conninfo(), name=name, pool_size=size,
                          configure=configure, breaker_threshold=threshold,
                          backoff_type="exp", connection_listeners=[listened], **FAST)
        wait_ready(pool, size)
        pids = {e.index: e.backend_pid for e in listened.values()
                if isinstance(e, ConnectionEvent) and e.kind == "connected"}
        failing.update({1, 2})
        terminate(pg_cluster, [pids[1], pids[2]])
        if opens:
            (state, previous, refused), *_ = seen.wait_until(
                lambda got: any(s == "open" for s, _p, _r in got), 5)
            assert (state, previous) == ("open", "closed")
            assert refused >= threshold, f"the circuit opened after {refused} failed connects"
            with pytest.raises(ConnectionError) as info:
                pool.query("SELECT 1", timeout=CALL_TIMEOUT)
            assert info.value.reason == "unavailable"
        else:
            wait_for(lambda: dead.refused_count >= 6, 5, "connects to fail")
            assert pool.health == "closed"
            assert pool.query("SELECT 1", timeout=CALL_TIMEOUT).rows == [(1,)]
            assert [(s, p) for s, p, _ in seen.values() if s != p] == []
    finally:
        telemetry.detach(handler_id)


@pytest.mark.parametrize("when", ["at_start", "after_a_loss"])
def test_backoff_stop_still_stops_the_pool_on_the_first_failed_connect(
        pg_cluster: PgCluster, pools: list[Pool], when: str) -> None:
    if when == "at_start":
        pg_cluster.stop("fast")
    pool = start_pool(pools, pg_cluster.conninfo(), pool_size=2, backoff_type="stop",
                      idle_interval=0.2)
    if when == "after_a_loss":
        wait_ready(pool, 2)
        assert pool.alive
        pg_cluster.stop("fast")
    assert pool.wait_stopped(5), "the pool did not stop"
    assert not pool.alive
    assert isinstance(pool.exit_error, PoolStoppedError), pool.exit_error
    with pytest.raises(ConnectionError) as info:
        pool.query("SELECT 1", timeout=1)
    assert info.value.reason == "stopped"
