"""One client's long statement does not hold up another client's query.

While an idle connection is at hand, ``dbpool serve`` never queues a
request behind another client's statement on a busy one: that statement
may run long, and past its deadline the connection is dropped with every
request on it (issue 20 tried queueing short statements behind each other;
the fuzz campaign's victim then failed this way).  Real server process,
real PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from dbpool.client import Client
from tests.support.events import wait_for
from tests.support.remote import ServerProcess


@pytest.fixture
def server(pg_dsn: str) -> Iterator[ServerProcess]:
    served = ServerProcess(pg_dsn, pool_size=4)
    try:
        yield served
    finally:
        served.kill()


def test_a_request_does_not_wait_behind_a_long_statement(server: ServerProcess,
                                                         pg_dsn: str) -> None:
    """While one client's ``pg_sleep`` runs, another client's query takes an idle
    connection and answers before the sleep ends."""
    tag = "packing-long-statement"
    long_done = threading.Event()
    long_pid: list[int] = []

    def long_statement() -> None:
        with Client(server.endpoint, timeout=30) as client:
            long_pid.append(client.query(f"SELECT pg_backend_pid() /* {tag} */ "
                                         f"FROM pg_sleep(3)").rows[0][0])
        long_done.set()

    with Client(server.endpoint, timeout=10) as client:
        # Its connection has run short statements: packing would be allowed behind it.
        for _ in range(20):
            client.query("SELECT 1")
        runner = threading.Thread(target=long_statement, daemon=True)
        runner.start()
        with psycopg.connect(pg_dsn, autocommit=True) as watcher:
            def running_a_while() -> bool:
                row = watcher.execute(
                    "SELECT now() - query_start > interval '50 ms' FROM pg_stat_activity "
                    "WHERE query LIKE %s AND pid <> pg_backend_pid()",
                    (f"%{tag}%",)).fetchone()
                return bool(row and row[0])
            wait_for(running_a_while, timeout=10, what="the long statement to run")
            pid = client.query("SELECT pg_backend_pid()").rows[0][0]
            assert running_a_while(), "the query waited for the long statement to end"
    runner.join(30)
    assert long_done.is_set()
    assert long_pid and long_pid[0] != pid
