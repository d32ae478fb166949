"""Clients spread over several ``dbpool serve`` processes, and move off a dead one
(issue 21, spreading): real server processes, real PostgreSQL.

- 1,200 clients given the same three endpoints send their requests to all
  three within ±20% of a third each (a random start each: 4.9 standard
  deviations of room, so chance alone fails it about once in a million);
- with six clients busy over the three servers, one server killed with
  SIGKILL costs no more than the requests in flight on it: every later
  request succeeds on the other two.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from dbpool.client import Client
from dbpool.errors import ConnectionError
from tests.support.remote import ServerProcess


@pytest.fixture
def servers(pg_dsn: str) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for _ in range(3):
            started.append(ServerProcess(pg_dsn, pool_size=2))
        yield started
    finally:
        for server in started:
            server.kill()


def _requests(server: ServerProcess) -> int:
    with Client(server.endpoint, timeout=10) as client:
        return int(client.status()["server"]["requests"])


def test_clients_spread_over_every_endpoint(servers: list[ServerProcess]) -> None:
    endpoints = [server.endpoint for server in servers]
    before = [_requests(server) for server in servers]
    clients = 1200
    for _ in range(clients):
        with Client(endpoints, timeout=10) as client:
            client.query("SELECT 1")
    # Each count also has the one status request that reads it.
    served = [_requests(server) - b - 1 for server, b in zip(servers, before, strict=True)]
    assert sum(served) == clients
    for count in served:
        assert abs(count - clients / 3) <= 0.2 * clients / 3, served


def test_a_killed_server_costs_only_its_requests_in_flight(
        servers: list[ServerProcess]) -> None:
    endpoints = [server.endpoint for server in servers]
    victim = servers[0]
    killed = threading.Event()
    lock = threading.Lock()
    failures: list[tuple[str, str]] = []
    after_kill: list[int] = []  # requests that succeeded after the kill, per client

    def work(index: int) -> None:
        ok_after = 0
        # Two clients start on each server (the victim's included), then move on.
        mine = endpoints[index % 3:] + endpoints[:index % 3]
        with Client(mine, timeout=5, connect_timeout=2, spread=False) as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and ok_after < 50:
                try:
                    client.query("SELECT pg_sleep(0.005)")
                except ConnectionError as error:
                    with lock:
                        failures.append((str(index), error.reason))
                    continue
                if killed.is_set():
                    ok_after += 1
        with lock:
            after_kill.append(ok_after)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 10
    while _requests(victim) < 50:  # the victim's clients are busy on it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.kill()
    killed.set()
    for worker in workers:
        worker.join(60)
    # At most one request in flight per client, and only on the victim.
    assert len(failures) <= len(workers), failures
    assert {reason for _, reason in failures} <= {"timeout"}, failures
    assert len({index for index, _ in failures}) == len(failures)  # one each at most
    assert after_kill == [50] * len(workers)  # every client went on, on the others
