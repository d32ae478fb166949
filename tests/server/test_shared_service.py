"""One ``dbpool serve`` shared by several applications: several pools, named clients,
their limits and permissions, and fair turns on a saturated pool.

Real server processes with CURVE keys (:class:`tests.server.test_curve.Keys`) and
the real PostgreSQL.  What is checked (issue 17):

- requests go to the pool they name (``Client(pool=...)``), each pool with
  its own metrics; an unknown pool is a ``protocol``/``unknown_pool`` error;
- a client limited to pool ``a`` gets :class:`~dbpool.errors.PermissionDenied`
  on pool ``b`` and on the default pool, and ``a`` keeps serving it;
- ``max_inflight`` and ``max_leases`` hold exactly: the request over the
  limit gets ``client_limit``, the ones within it succeed, and another
  client sees nothing of it;
- fairness: on a saturated pool of 2, a client that keeps 200 requests
  queued does not make a client sending one request at a time wait behind
  them all: the polite client's p99 stays within 5 x its latency on the idle
  pool, and it completes at least 30% of the requests (the best of up to
  three measurements, for the VM's slow spells);
- admin operations are for admin clients only; pausing pool ``b`` leaves
  ``a`` serving; ``clients`` lists who holds what; ``kick`` ends a client's
  leases and refuses it until a reload; ``dbpool admin`` runs them;
- the password of a pool's DSN shows in no log line or reply on these paths.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
import zmq

from dbpool.client import AsyncClient, Client
from dbpool.errors import ConnectionError, PermissionDenied, ProtocolError
from tests.server.test_curve import Keys, run_cli
from tests.support.pgcluster import PgCluster
from tests.support.remote import ServerProcess

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

CLIENTS = ("app", "limited", "flood", "polite", "ops")


def config_file(tmp_path: Path, pg_dsn: str) -> Path:
    path = tmp_path / "dbpool.toml"
    path.write_text(f"""
[pools.a]
dsn = "{pg_dsn}"
pool_size = 2

[pools.b]
dsn = "{pg_dsn}"
pool_size = 2

[pools.fair]
dsn = "{pg_dsn}"
pool_size = 2

[clients.app]
pools = ["a"]

[clients.limited]
max_inflight = 2
max_leases = 1

[clients.ops]
admin = true
""")
    return path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path, CLIENTS)


@pytest.fixture
def server(pg_dsn: str, keys: Keys, tmp_path: Path) -> Iterator[ServerProcess]:
    path = config_file(tmp_path, pg_dsn)
    with ServerProcess(pg_dsn, *keys.server_args(), "--config", str(path),
                       pool_size=2) as process:
        yield process


def test_requests_go_to_the_pool_they_name(server: ServerProcess, keys: Keys) -> None:
    with keys.client(server, "ops", timeout=10) as default, \
            keys.client(server, "ops", timeout=10, pool="b") as on_b:
        before = default.status()["pools"]
        assert set(before) == {"default", "a", "b", "fair"}
        for _ in range(5):
            on_b.query("SELECT 1")
        default.query("SELECT 1")
        after = default.status()["pools"]
        assert after["b"]["checkouts"] - before["b"]["checkouts"] >= 1
        assert after["a"]["checkouts"] == before["a"]["checkouts"]
        assert after["b"]["name"] == "b" and after["default"]["name"] == "dbpool"
        with keys.client(server, "ops", timeout=10, pool="nope") as lost, \
                pytest.raises(ProtocolError) as caught:
            lost.query("SELECT 1")
        assert caught.value.code == "unknown_pool" and "a, b, default, fair" in str(caught.value)


def test_a_client_limited_to_one_pool_is_refused_the_others(
    server: ServerProcess, keys: Keys
) -> None:
    with keys.client(server, "app", timeout=10, pool="a") as on_a, \
            keys.client(server, "app", timeout=10, pool="b") as on_b, \
            keys.client(server, "app", timeout=10) as on_default:
        assert on_a.query("SELECT 1").rows == [(1,)]
        for client in (on_b, on_default):
            with pytest.raises(PermissionDenied, match="may not use pool"):
                client.query("SELECT 1")
            with pytest.raises(PermissionDenied):
                client.transaction().begin()
        assert isinstance(PermissionDenied("x"), PermissionError)
        with on_a.transaction() as tx:
            assert tx.query("SELECT 2").rows == [(2,)]
        assert on_b.ping() is None or True  # ping needs no pool


def test_max_inflight_holds_exactly(server: ServerProcess, keys: Keys) -> None:
    async def main() -> tuple[list[object], float]:
        async with AsyncClient(server.endpoint, timeout=10,
                               server_key=str(keys.server_public),
                               client_key=str(keys.secrets["limited"]), pool="a") as limited, \
                AsyncClient(server.endpoint, timeout=10, server_key=str(keys.server_public),
                            client_key=str(keys.secrets["ops"]), pool="b") as other:
            slow = [asyncio.ensure_future(limited.query("SELECT pg_sleep(0.5), 1"))
                    for _ in range(2)]
            await asyncio.sleep(0.1)  # both are in flight on the server
            over = await asyncio.gather(limited.query("SELECT 1"), return_exceptions=True)
            started = time.monotonic()
            assert (await other.query("SELECT 1")).rows == [(1,)]  # untouched
            others_latency = time.monotonic() - started
            results = [*(await asyncio.gather(*slow, return_exceptions=True)), *over]
            again = await limited.query("SELECT 3")  # the limit frees as they end
            assert again.rows == [(3,)]
            return results, others_latency

    results, others_latency = asyncio.run(main())
    assert [getattr(r, "rows", None) for r in results[:2]] == [[("", 1)], [("", 1)]]
    refused = results[2]
    assert isinstance(refused, ConnectionError) and refused.reason == "client_limit"
    assert "2 requests in flight" in str(refused)
    assert others_latency < 0.4  # not behind the limited client's sleeps


def test_max_leases_holds_exactly(server: ServerProcess, keys: Keys) -> None:
    with keys.client(server, "limited", timeout=10, pool="a") as limited, \
            keys.client(server, "ops", timeout=10, pool="b") as other:
        tx = limited.transaction().begin()
        with pytest.raises(ConnectionError) as caught:
            limited.transaction().begin()
        assert caught.value.reason == "client_limit"
        with pytest.raises(ConnectionError) as caught, limited.transaction() as deferred:
            deferred.query("SELECT 1")  # a transaction that begins with its first request
        assert caught.value.reason == "client_limit"
        with pytest.raises(ConnectionError) as streamed:
            list(limited.stream("SELECT generate_series(1, 3)"))
        assert streamed.value.reason == "client_limit"
        assert tx.query("SELECT 1").rows == [(1,)]  # the one it holds works
        with other.transaction() as mine, other.transaction() as second:  # others: no limit
            assert mine.query("SELECT 1").rows == second.query("SELECT 1").rows
        tx.commit()
        with limited.transaction() as again:
            assert again.query("SELECT 2").rows == [(2,)]


def _flood(endpoint: str, server_key: str, client_key: str, sql: str, count: Synchronized[int],
           stop: Event, errors: Synchronized[int]) -> None:
    """A client process that keeps 200 requests in flight until ``stop``.  A request the
    server sheds (CoDel: ``queue_timeout``, as a flood's requests wait long) is sent
    again; any other error counts in ``errors`` and ends that request's loop."""

    async def main() -> None:
        async with AsyncClient(endpoint, timeout=60, pool="fair", server_key=server_key,
                               client_key=client_key) as client:
            async def one() -> None:
                while not stop.is_set():
                    try:
                        await client.query(sql)
                    except ConnectionError as error:
                        if error.reason == "queue_timeout":
                            continue
                        with errors.get_lock():
                            errors.value += 1
                        return
                    except Exception:
                        with errors.get_lock():
                            errors.value += 1
                        return
                    with count.get_lock():
                        count.value += 1

            await asyncio.gather(*(one() for _ in range(200)))

    asyncio.run(main())


#: Measurements of the fairness test: the best of them is judged (see the test).
FAIRNESS_ATTEMPTS = 3


def test_a_flooding_client_does_not_starve_a_polite_one(
    server: ServerProcess, keys: Keys
) -> None:
    """The polite client's p99 within 5 x its idle median, and 30% of the requests.

    A latency bound on a 2-core VM where the flood, the server, PostgreSQL and
    the polite client all want the CPU: a slow spell of the VM can put one
    measurement over it with fairness intact (6.4x and 7.5x were seen, old code
    and new).  So it measures up to three times, each from its idle median, and
    judges the best.  Without fair turns every measurement misses (about 10x,
    and a 6% share), so the best of three still fails.
    """
    attempts = []
    for _ in range(FAIRNESS_ATTEMPTS):
        attempt = _polite_under_flood(server, keys)
        print(attempt.summary())
        attempts.append(attempt)
        if attempt.ratio <= 5 and attempt.share >= 0.30:
            break
    assert all(a.errors == 0 for a in attempts)
    best = min(attempts, key=lambda a: (a.share < 0.30, a.ratio))
    assert best.ratio <= 5, [a.summary() for a in attempts]
    assert best.share >= 0.30, [a.summary() for a in attempts]


@dataclass
class _Fairness:
    """One measurement of the polite client beside the flood."""

    idle_median: float
    p99: float
    polite: int
    flood: int
    errors: int

    @property
    def ratio(self) -> float:
        return self.p99 / self.idle_median

    @property
    def share(self) -> float:
        return self.polite / (self.polite + self.flood)

    def summary(self) -> str:
        return (f"idle median {self.idle_median * 1e3:.2f} ms; saturated: polite p99 "
                f"{self.p99 * 1e3:.2f} ms ({self.ratio:.1f}x), {self.polite} polite and "
                f"{self.flood} flood requests (polite share {self.share:.0%})")


def _polite_under_flood(server: ServerProcess, keys: Keys) -> _Fairness:
    """The polite client's latency alone on pool ``fair``, then while another client
    keeps 200 requests in flight there (3 s)."""
    sql = "SELECT pg_sleep(0.002)"
    spawn = multiprocessing.get_context("spawn")
    count, errors, stop = spawn.Value("q", 0), spawn.Value("q", 0), spawn.Event()
    with keys.client(server, "polite", timeout=20, pool="fair") as polite:
        for _ in range(20):
            polite.query(sql)
        idle = []
        for _ in range(100):
            started = time.perf_counter()
            polite.query(sql)
            idle.append(time.perf_counter() - started)
        idle_median = statistics.median(idle)
        flooder = spawn.Process(target=_flood, args=(
            server.endpoint, str(keys.server_public), str(keys.secrets["flood"]), sql, count,
            stop, errors))
        flooder.start()
        try:
            with keys.client(server, "ops", timeout=10) as ops:
                deadline = time.monotonic() + 30
                while ops.status()["pools"]["fair"]["queued"] < 100:  # saturated
                    assert time.monotonic() < deadline, "the flood never queued"
            latencies = []
            flood_before = count.value
            started_all = time.monotonic()
            while time.monotonic() - started_all < 3.0:
                started = time.perf_counter()
                polite.query(sql)
                latencies.append(time.perf_counter() - started)
            flood_count = count.value - flood_before
        finally:
            stop.set()
            flooder.join(timeout=60)
            if flooder.is_alive():
                flooder.kill()
    return _Fairness(idle_median, statistics.quantiles(latencies, n=100)[98], len(latencies),
                     flood_count, errors.value)


# -- admin operations ----------------------------------------------------------------------


def test_only_an_admin_pauses_and_a_paused_pool_leaves_the_others_serving(
    server: ServerProcess, keys: Keys
) -> None:
    with keys.client(server, "ops", timeout=10) as ops, \
            keys.client(server, "app", timeout=10, pool="a") as app, \
            keys.client(server, "polite", timeout=2, pool="b") as on_b:
        with pytest.raises(PermissionDenied, match="admin"):
            app.admin("pause", pool="b")
        assert on_b.query("SELECT 1").rows == [(1,)]
        assert ops.admin("pause", pool="b") == {"b": "paused"}
        try:
            for _ in range(20):
                assert app.query("SELECT 1").rows == [(1,)]  # pool a serves on
            with pytest.raises(ConnectionError) as caught:
                on_b.query("SELECT 1", timeout=0.5)
            assert caught.value.reason in ("queue_timeout", "timeout")
            assert ops.admin("status", pool="b")["pools"]["b"]["paused"] is True
            assert set(ops.admin("status")["pools"]) == {"default", "a", "b", "fair"}
        finally:
            assert ops.admin("resume", pool="b") == {"b": "resumed"}
        assert on_b.query("SELECT 2").rows == [(2,)]
        assert ops.admin("drain", pool="b", seconds=5) == {"b": "drained"}
        drained = ops.admin("status", pool="b")["pools"]["b"]
        assert drained["paused"] is True and drained["ready_conn_count"] == 0
        assert app.query("SELECT 1").rows == [(1,)]  # pool a untouched
        ops.admin("resume", pool="b")
        assert on_b.query("SELECT 3").rows == [(3,)]


def test_clients_lists_each_client_and_kick_ends_its_leases_until_reload(
    server: ServerProcess, keys: Keys
) -> None:
    with keys.client(server, "ops", timeout=10) as ops, \
            keys.client(server, "limited", timeout=10, pool="a") as limited:
        tx = limited.transaction()
        tx.query("SELECT 1")
        listed = {entry["name"]: entry for entry in ops.admin("clients")}
        assert listed["limited"]["leases"] == 1 and listed["limited"]["max_leases"] == 1
        assert listed["ops"]["admin"] is True and listed["ops"]["inflight"] == 1  # this one
        assert ops.admin("kick", name="limited") == {"name": "limited", "leases_ended": 1}
        with pytest.raises(ConnectionError) as caught:
            limited.query("SELECT 1")
        assert caught.value.reason == "unauthorized" and "kicked" in str(caught.value)
        with pytest.raises(ConnectionError):
            tx.query("SELECT 1")
        ops.admin("reload")
        assert limited.query("SELECT 3").rows == [(3,)]


def test_dbpool_admin_on_the_command_line(server: ServerProcess, keys: Keys) -> None:
    common = ["--endpoint", server.endpoint, "--server-key", str(keys.server_public)]
    done = run_cli("admin", "status", "--pool", "a", *common,
                   "--client-key", str(keys.secrets["ops"]))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pools"]["a"]["name"] == "a"
    refused = run_cli("admin", "pause", *common, "--client-key", str(keys.secrets["app"]))
    assert refused.returncode == 1 and "may not run admin operations" in refused.stderr


def test_no_password_on_the_new_paths(
    pg_password_cluster: PgCluster, keys: Keys, tmp_path: Path
) -> None:
    """Several pools, SIGHUP's reload, admin status and clients: the DSNs' password is
    in no log line and no reply."""
    cluster = pg_password_cluster
    secret = cluster.password
    assert secret is not None
    path = tmp_path / "dbpool.toml"
    path.write_text(f'[pools.first]\ndsn = "{cluster.conninfo()}"\n\n'
                    f'[pools.second]\ndsn = "{cluster.conninfo()}"\n\n'
                    '[clients.ops]\nadmin = true\n')
    with ServerProcess(cluster.conninfo(), *keys.server_args(), "--config", str(path),
                       pool_size=1) as srv:
        with keys.client(srv, "ops", timeout=10, pool="second") as ops, \
                ops.subscribe("") as events:
            assert ops.query("SELECT 1").rows == [(1,)]  # logged in with the password
            replies = [ops.status(), ops.admin("status"), ops.admin("clients"),
                       ops.admin("reload"), ops.admin("disconnect_all", seconds=0.1)]
            os.kill(srv.pid, signal.SIGHUP)
            srv.wait_output("authorized keys reloaded")
            first = events.get(timeout=15)  # the reconnects disconnect_all brings
            seen = [] if first is None else [first]
            while (event := events.get(timeout=0.5)) is not None and len(seen) < 50:
                seen.append(event)
            assert ops.query("SELECT 1").rows == [(1,)]
        assert srv.terminate() == 0
        output = srv.output()
    assert "pool first of 1" in output and "pool second of 1" in output  # described
    assert secret not in output
    for reply in replies:
        assert secret not in repr(reply)
    assert seen, "no event arrived"  # the disconnect_all's reconnects, at least
    for event in seen:
        assert secret not in repr(event)


def test_losing_one_pools_database_leaves_the_others_serving(
    pg_dsn: str, pg_cluster: PgCluster, keys: Keys, tmp_path: Path
) -> None:
    path = tmp_path / "dbpool.toml"
    path.write_text(f'breaker_threshold = 1\nbackoff_min = 0.05\nbackoff_max = 0.2\n\n'
                    f'[pools.kept]\ndsn = "{pg_dsn}"\n\n'
                    f'[pools.lost]\ndsn = "{pg_cluster.conninfo()}"\n')
    with ServerProcess(pg_dsn, *keys.server_args(), "--config", str(path),
                       pool_size=2) as srv, \
            keys.client(srv, "ops", timeout=10, pool="kept") as kept, \
            keys.client(srv, "ops", timeout=3, pool="lost") as lost:
        assert lost.query("SELECT 1").rows == kept.query("SELECT 1").rows == [(1,)]
        pg_cluster.kill()
        deadline = time.monotonic() + 15
        while True:  # the lost pool's circuit opens
            try:
                lost.query("SELECT 1")
            except ConnectionError as error:
                if error.reason == "unavailable":
                    break
            assert time.monotonic() < deadline, "the lost pool never said unavailable"
        for _ in range(50):
            assert kept.query("SELECT 1").rows == [(1,)]
        status = kept.status()["pools"]
        assert status["lost"]["health"] == "open" and status["kept"]["health"] == "closed"


def test_without_curve_everyone_is_the_anonymous_client(pg_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "dbpool.toml"
    path.write_text("[clients.anonymous]\nmax_leases = 0\nadmin = true\n")
    with ServerProcess(pg_dsn, "--config", str(path), pool_size=2) as srv, \
            Client(srv.endpoint, timeout=10) as one, Client(srv.endpoint, timeout=10) as two:
        assert one.query("SELECT 1").rows == [(1,)]
        for client in (one, two):
            with pytest.raises(ConnectionError) as caught:
                client.transaction().begin()
            assert caught.value.reason == "client_limit"
        assert [entry["name"] for entry in two.admin("clients")] == ["anonymous"]
