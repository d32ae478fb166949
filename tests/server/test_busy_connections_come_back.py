"""A connection the service keeps busy still goes back when its pool wants it.

``dbpool serve`` keeps a borrowed connection while it has requests in flight,
and a little after (a checkout and checkin saved per request).  A connection
whose pipeline never empties would so be kept for ever: past the pool's
``max_lifetime``, and past a shrink, so that a live resize never finished.
The load here is one client whose requests always overlap on each connection
(a few tasks, each statement 10 ms, fewer than the pipeline holds): nothing
ever waits in a queue, so nothing else makes the server give a connection back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dbpool.client import AsyncClient, Client
from tests.support.events import wait_for
from tests.support.remote import ServerProcess

_SLOW = "SELECT pg_backend_pid() FROM pg_sleep(0.01)"


@contextmanager
def overlapping_load(endpoint: str, tasks: int, seen: Callable[[int], None]) -> Iterator[None]:
    """``tasks`` asyncio tasks on one client running :data:`_SLOW` back to back
    until the block ends; each backend pid goes to ``seen``.  Any error fails
    the test at the end."""
    stop = threading.Event()
    errors: list[BaseException] = []

    async def task(client: AsyncClient) -> None:
        while not stop.is_set():
            seen((await client.query(_SLOW)).rows[0][0])

    async def run() -> None:
        async with AsyncClient(endpoint, timeout=10) as client:
            await asyncio.gather(*(task(client) for _ in range(tasks)))

    def thread() -> None:
        try:
            asyncio.run(run())
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=thread, daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert errors == []


def test_a_busy_connection_is_replaced_past_max_lifetime(pg_dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "dbpool.toml"
    config.write_text("[pool]\nmax_lifetime = [0.3, 0.5]\n")
    pids: set[int] = set()
    with ServerProcess(pg_dsn, "--config", str(config), pool_size=1) as server, \
            overlapping_load(server.endpoint, 3, pids.add):
        # With one connection, every pid seen after the first is a replacement.
        wait_for(lambda: len(pids) >= 3, 15, "the busy connection to be replaced twice")


def test_a_shrink_completes_under_steady_load(pg_dsn: str, tmp_path: Path) -> None:
    name = f"busy-{uuid.uuid4().hex[:8]}"
    dsn = f"{pg_dsn} application_name={name}"
    config = tmp_path / "dbpool.toml"
    base = f'dsn = "{dsn}"\n[clients.anonymous]\nadmin = true\n'
    config.write_text("pool_size = 3\n" + base)
    pids: set[int] = set()
    with ServerProcess(dsn, "--config", str(config), pool_size=None) as server, \
            Client(server.endpoint, timeout=10) as observer:

        def pool() -> dict[str, object]:
            status: dict[str, object] = observer.status()["pools"]["default"]
            return status

        def up() -> int:
            connections = pool()["connections"]
            assert isinstance(connections, dict)
            return int(connections["idle"] + connections["in_use"])

        wait_for(lambda: up() == 3, 10, "three connections")
        with overlapping_load(server.endpoint, 6, pids.add):
            wait_for(lambda: len(pids) == 3, 10, "the load to use every connection")
            config.write_text("pool_size = 1\n" + base)
            os.kill(server.pid, signal.SIGHUP)
            wait_for(lambda: pool()["pool_size"] == 1 and up() == 1, 10,
                     "the pool to shrink to one connection under load")
