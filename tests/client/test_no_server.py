"""A client that reaches no server fails fast and says so (issue 18).

- a closed port: ``ConnectionError(reason="no_server")`` naming the endpoint,
  within ``connect_timeout`` (2 s) + a margin, sync and asyncio;
- a host name that does not resolve: said at once;
- several endpoints, the first dead: the request goes to the next, and
  succeeds, within the connect timeout;
- a live server that does not answer in time is still ``timeout``.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from dbpool.client import AsyncClient, Client
from dbpool.errors import ConnectionError
from tests.support.remote import ServerProcess


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_a_closed_port_is_no_server_within_the_connect_timeout() -> None:
    endpoint = closed_port()
    with Client(endpoint, timeout=15) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as caught:
            client.query("SELECT 1")
        assert time.monotonic() - started <= 2.5
    assert caught.value.reason == "no_server" and endpoint in str(caught.value)


def test_the_async_client_too() -> None:
    endpoint = closed_port()

    async def main() -> tuple[ConnectionError, float]:
        async with AsyncClient(endpoint, timeout=15, connect_timeout=1.0) as client:
            started = time.monotonic()
            with pytest.raises(ConnectionError) as caught:
                await client.query("SELECT 1")
            return caught.value, time.monotonic() - started

    error, seconds = asyncio.run(main())
    assert error.reason == "no_server" and endpoint in str(error) and seconds <= 1.5


def test_a_host_name_that_does_not_resolve_says_so_at_once() -> None:
    endpoint = "tcp://no-such-host.invalid:7432"
    with Client(endpoint, timeout=15) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as caught:
            client.ping()
        assert time.monotonic() - started < 1.5
    assert caught.value.reason == "no_server"
    assert "'no-such-host.invalid' does not resolve" in str(caught.value)


def test_the_next_endpoint_is_tried_and_serves(pg_dsn: str) -> None:
    with ServerProcess(pg_dsn, pool_size=1) as server:
        endpoints = [closed_port(), server.endpoint]
        with Client(endpoints, timeout=15, connect_timeout=1.0) as client:
            started = time.monotonic()
            assert client.query("SELECT 1").rows == [(1,)]
            assert time.monotonic() - started <= 2.0
            assert client.query("SELECT 2").rows == [(2,)]  # it stays on the live one

        async def main() -> list[tuple[int]]:
            async with AsyncClient(endpoints, timeout=15, connect_timeout=1.0) as aclient:
                return (await aclient.query("SELECT 3")).rows

        assert asyncio.run(main()) == [(3,)]


def test_a_live_server_that_does_not_answer_in_time_is_timeout(pg_dsn: str) -> None:
    with ServerProcess(pg_dsn, pool_size=1) as server, \
            Client(server.endpoint, timeout=15) as client:
        with pytest.raises(ConnectionError) as caught:
            client.query("SELECT pg_sleep(2)", timeout=0.3)
        assert caught.value.reason == "timeout"
