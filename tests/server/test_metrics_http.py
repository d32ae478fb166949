"""``dbpool serve --metrics-bind``: Prometheus metrics and health over real HTTP.

A server process on the real PostgreSQL (or a private cluster that is
stopped and started) is scraped while clients run; the text is parsed with
prometheus_client's parser (tests/pool/test_prometheus.py's ``parse``).
What is checked (issue 18):

- the pools' and the server's series are there, with their labels and
  types, and the counters move with the traffic;
- ``/health/live`` answers; ``/health/ready`` is 503 while the database is
  down and 200 within ``backoff_max`` + 1 s of its return, and ``dbpool
  healthcheck`` agrees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from dbpool.client import Client
from tests.pool.test_prometheus import parse
from tests.support.pgcluster import PgCluster
from tests.support.remote import ServerProcess


def get(server: ServerProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{server.metrics}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def healthcheck(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dbpool", "healthcheck", "--url",
                           f"http://{server.metrics}/health/ready"],
                          capture_output=True, text=True, timeout=30, env=os.environ.copy())


def test_metrics_are_scraped_while_clients_run_and_move_with_the_traffic(pg_dsn: str) -> None:
    with ServerProcess(pg_dsn, "--metrics-bind", "127.0.0.1:0", pool_size=2) as server, \
            Client(server.endpoint, timeout=10) as client:
        assert server.metrics
        stop = threading.Event()
        done = 0

        def traffic() -> None:
            nonlocal done
            with Client(server.endpoint, timeout=10) as other:
                while not stop.is_set():
                    other.query("SELECT 1")
                    done += 1

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            status, text = get(server, "/metrics")
            assert status == 200
            before, types = parse(text)
            with client.transaction().begin() as tx:  # op begin, then a query on its lease
                tx.query("SELECT 1")
                with pytest.raises(psycopg.errors.DivisionByZero):  # outcome "sql"
                    client.query("SELECT 1/0")
                during, _ = parse(get(server, "/metrics")[1])
            while done < 50:
                time.sleep(0.01)
            after, _ = parse(get(server, "/metrics")[1])
        finally:
            stop.set()
            worker.join(timeout=30)

    ok = (("op", "query"), ("outcome", "ok"))
    assert types["dbpool_server_requests"] == "counter"
    assert types["dbpool_server_request_seconds"] == "histogram"
    assert types["dbpool_checkouts"] == "counter"
    assert types["dbpool_connections"] == "gauge"
    assert after["dbpool_server_requests_total"][ok] - before.get(
        "dbpool_server_requests_total", {}).get(ok, 0) >= 40
    assert after["dbpool_server_requests_total"][(("op", "query"), ("outcome", "sql"))] == 1
    assert after["dbpool_server_requests_total"][(("op", "begin"), ("outcome", "ok"))] == 1
    assert after["dbpool_server_request_seconds_count"][()] > before[
        "dbpool_server_request_seconds_count"][()]
    assert during["dbpool_server_open"][(("kind", "lease"),)] == 1
    assert after["dbpool_server_open"][(("kind", "lease"),)] == 0
    assert after["dbpool_server_clients"][()] >= 2
    assert after["dbpool_server_received_bytes_total"][()] > before[
        "dbpool_server_received_bytes_total"][()]
    assert after["dbpool_server_sent_bytes_total"][()] > before[
        "dbpool_server_sent_bytes_total"][()]
    assert after["dbpool_server_client_inflight"][(("client", "anonymous"),)] >= 0
    pool = (("pool", "dbpool"),)
    assert after["dbpool_checkouts_total"][pool] > before["dbpool_checkouts_total"][pool]
    assert after["dbpool_pool_size"][pool] == 2
    assert after["dbpool_breaker_state"][(("pool", "dbpool"), ("state", "closed"))] == 1
    assert sum(after["dbpool_connections"][(("pool", "dbpool"), ("state", s))]
               for s in ("idle", "in_use", "connecting", "down")) == 2


def test_ready_follows_the_database_and_healthcheck_agrees(pg_cluster: PgCluster) -> None:
    backoff_max = 1.0
    with ServerProcess(pg_cluster.conninfo(), "--metrics-bind", "127.0.0.1:0",
                       "--backoff-min", "0.1", "--backoff-max", str(backoff_max),
                       "--breaker-threshold", "1", pool_size=2) as server:
        assert get(server, "/health/live") == (200, "live\n")
        deadline = time.monotonic() + 10
        while get(server, "/health/ready")[0] != 200:
            assert time.monotonic() < deadline, get(server, "/health/ready")
            time.sleep(0.05)
        assert healthcheck(server).returncode == 0
        pg_cluster.stop(mode="immediate")
        with Client(server.endpoint, timeout=5) as client:
            deadline = time.monotonic() + 15
            while get(server, "/health/ready")[0] != 503:
                try:  # traffic finds the dead connections sooner than pings do
                    client.query("SELECT 1")
                except Exception:
                    pass
                assert time.monotonic() < deadline, "ready never turned 503"
                time.sleep(0.05)
        status, body = get(server, "/health/ready")
        assert status == 503 and "default: circuit open" in body
        down = healthcheck(server)
        assert down.returncode == 1 and "503" in down.stdout
        assert get(server, "/health/live")[0] == 200  # the loop still runs
        pg_cluster.start()
        back = time.monotonic()
        while get(server, "/health/ready")[0] != 200:
            assert time.monotonic() - back <= backoff_max + 1.0, get(server, "/health/ready")
            time.sleep(0.02)
        assert healthcheck(server).returncode == 0
        assert get(server, "/nope")[0] == 404
