"""Which endpoints a client spreads over (client/_base.py ``spread_endpoints``), the
move to the next endpoint when one refuses the connection, and the names looked up
again when none answers: for the sync client and the asyncio one."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from typing import Any

from dbpool.client import Client
from dbpool.client._base import spread_endpoints


def resolver(table: dict[str, list[tuple[int, str]]]) -> Any:
    def resolve(host: str, port: int, type: int = 0) -> list[Any]:
        if host not in table:
            raise socket.gaierror(f"unknown host {host}")
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))
                for family, address in table[host]]
    return resolve


def test_a_name_with_several_addresses_is_one_endpoint_each() -> None:
    resolve = resolver({
        "pool.svc": [(socket.AF_INET, "10.0.0.1"), (socket.AF_INET, "10.0.0.2"),
                     (socket.AF_INET, "10.0.0.2"), (socket.AF_INET6, "fd00::1")],
        "one.svc": [(socket.AF_INET, "10.0.0.9")],
        "six.svc": [(socket.AF_INET6, "fd00::1"), (socket.AF_INET6, "fd00::2")],
    })
    assert spread_endpoints(["tcp://pool.svc:7432"], resolve) == (
        "tcp://10.0.0.1:7432", "tcp://10.0.0.2:7432")
    assert spread_endpoints(["tcp://six.svc:7432"], resolve) == (
        "tcp://[fd00::1]:7432", "tcp://[fd00::2]:7432")
    # One address, no answer, or not a name: as it is (libzmq resolves it again later).
    kept = ["tcp://one.svc:7432", "tcp://nowhere.svc:7432", "tcp://127.0.0.1:7432",
            "tcp://[::1]:7432", "tcp://localhost:7432", "ipc:///tmp/dbpool",
            "tcp://*:7432"]
    assert spread_endpoints(kept, resolve) == tuple(kept)
    assert spread_endpoints(["tcp://10.0.0.1:7432", "tcp://pool.svc:7432"], resolve) == (
        "tcp://10.0.0.1:7432", "tcp://10.0.0.2:7432")


def test_clients_start_on_every_endpoint_unless_told_not_to() -> None:
    endpoints = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]
    starts = {Client(endpoints, spread=True).start for _ in range(60)}
    assert starts == {0, 1, 2}
    assert {Client(endpoints, spread=False).start for _ in range(10)} == {0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_endpoint_is_left_at_once_for_the_next(pg_dsn: str) -> None:
    from tests.support.remote import ServerProcess

    with ServerProcess(pg_dsn, pool_size=1) as server:
        dead = f"tcp://127.0.0.1:{_free_port()}"
        with Client([dead, server.endpoint], timeout=5, connect_timeout=4,
                    spread=False) as client:
            started = time.monotonic()
            assert client.query("SELECT 1").rows == [(1,)]
            assert time.monotonic() - started < 1.0  # not connect_timeout


def _before_a_rolling_update(monkeypatch: Any) -> dict[str, list[tuple[int, str]]]:
    """``pool.test`` resolves to two loopback addresses where nothing listens (the pods
    before a rolling update); the table returned is what it resolves to."""
    table = {"pool.test": [(socket.AF_INET, "127.0.0.4"), (socket.AF_INET, "127.0.0.5")]}
    fake, real = resolver(table), socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in table:
            return fake(host, port)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def _after_it(table: dict[str, list[tuple[int, str]]]) -> None:
    """The new pods: the server's address (127.0.0.3) and one where nothing listens."""
    table["pool.test"] = [(socket.AF_INET, "127.0.0.3"), (socket.AF_INET, "127.0.0.6")]


def test_new_addresses_are_looked_up_when_no_endpoint_answers(
        pg_dsn: str, monkeypatch: Any) -> None:
    from tests.support.remote import ServerProcess

    port = _free_port()
    # The server listens on 127.0.0.3 only.
    with ServerProcess(pg_dsn, pool_size=1, bind=f"tcp://127.0.0.3:{port}") as server:
        table = _before_a_rolling_update(monkeypatch)
        with Client(f"tcp://pool.test:{port}", timeout=5, connect_timeout=4,
                    events=server.events) as client:
            assert set(client.endpoints) == {f"tcp://127.0.0.4:{port}",
                                             f"tcp://127.0.0.5:{port}"}
            _after_it(table)
            started = time.monotonic()
            assert client.query("SELECT 1").rows == [(1,)]
            assert time.monotonic() - started < 2.0
            assert f"tcp://127.0.0.3:{port}" in client.endpoints


def test_the_async_client_leaves_a_refused_endpoint_at_once_and_looks_names_up_again(
        pg_dsn: str, monkeypatch: Any) -> None:
    import asyncio

    from dbpool.client import AsyncClient
    from tests.support.remote import ServerProcess

    port = _free_port()
    with ServerProcess(pg_dsn, pool_size=1, bind=f"tcp://127.0.0.3:{port}") as server:
        table = _before_a_rolling_update(monkeypatch)
        lookups: Counter[str] = Counter()
        looked_up_before = socket.getaddrinfo

        def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
            lookups[host] += 1
            found = looked_up_before(host, port, *args, **kwargs)
            if host == "pool.test":
                _after_it(table)  # the rolling update happens after the first look
            return found

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

        async def run() -> None:
            # A dead endpoint before a live one: left at once, not after connect_timeout.
            async with AsyncClient([f"tcp://127.0.0.4:{port}", server.endpoint], timeout=5,
                                   connect_timeout=4, spread=False) as client:
                started = time.monotonic()
                assert (await client.query("SELECT 1")).rows == [(1,)]
                assert time.monotonic() - started < 1.0
            # Every address of the name refuses; then it resolves to the server's.
            async with AsyncClient(f"tcp://pool.test:{port}", timeout=5, connect_timeout=4,
                                   events=server.events) as client:
                # Not looked up yet: the first request does it, off the loop.
                assert client.endpoints == (f"tcp://pool.test:{port}",)
                looked_up = lookups["pool.test"]
                started = time.monotonic()
                assert (await client.query("SELECT 1")).rows == [(1,)]
                assert time.monotonic() - started < 2.0
                assert f"tcp://127.0.0.3:{port}" in client.endpoints
                # Once at the first request (the pods before the update), once again
                # when neither of their addresses answered.
                assert lookups["pool.test"] == looked_up + 2

        asyncio.run(run())


def test_the_async_client_looks_names_up_off_its_event_loop(
        pg_dsn: str, monkeypatch: Any) -> None:
    """A slow DNS lookup must not stall every task on the loop: the constructor looks
    nothing up (it may run on the loop), and the first request does it in a thread,
    once, however many requests start together."""
    import asyncio

    from dbpool.client import AsyncClient
    from tests.support.remote import ServerProcess

    port = _free_port()
    with ServerProcess(pg_dsn, pool_size=2, bind=f"tcp://127.0.0.3:{port}") as server:
        table = {"pool.test": [(socket.AF_INET, "127.0.0.3"), (socket.AF_INET, "127.0.0.3"),
                               (socket.AF_INET, "127.0.0.7")]}
        fake, real = resolver(table), socket.getaddrinfo
        threads: list[int] = []

        def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host not in table:
                return real(host, port, *args, **kwargs)
            threads.append(threading.get_ident())
            return fake(host, port)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

        async def run() -> None:
            loop_thread = threading.get_ident()
            client = AsyncClient(f"tcp://pool.test:{port}", timeout=5, connect_timeout=4,
                                 events=server.events, spread=False)
            try:
                assert threads == []
                results = await asyncio.gather(*(client.query("SELECT %s::int", [i])
                                                  for i in range(20)))
                assert [r.rows for r in results] == [[(i,)] for i in range(20)]
                assert len(threads) == 1 and loop_thread not in threads
                # Spread as the sync client spreads it in its constructor.
                assert client.endpoints == (f"tcp://127.0.0.3:{port}",
                                            f"tcp://127.0.0.7:{port}")
            finally:
                await client.close()

        asyncio.run(run())
