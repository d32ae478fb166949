"""CURVE authentication of ``dbpool serve``, against real server processes and PostgreSQL.

What is checked (issue 17, docs/protocol.md "Authentication"):

- ``dbpool keygen`` writes pyzmq certificate files, the secret one private;
- the two CURVE settings go together; binding beyond loopback without them
  is refused with one line and a non-zero exit, unless ``--insecure``, which
  starts and warns;
- an authorized client (sync and asyncio, key files or Z85 text, arguments
  or environment) runs queries and gets events;
- a random key, no key, or the wrong server key fails at once with
  ``reason="unauthorized"`` (within 2 s, not the request timeout), and an
  unauthorized subscriber gets no events;
- 1,000 connection attempts with random keys and with none get no reply and
  no event, while an authorized client works throughout without an error;
- a key removed and SIGHUP sent: that client's next request is refused on the
  connection it already had; the others see no error during the reload.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from dbpool.client import AsyncClient, Client
from dbpool.errors import ConfigurationError, ConnectionError
from dbpool.keys import load_key_pair, write_key_pair
from dbpool.wire import packb
from tests.support.events import wait_for
from tests.support.remote import ServerProcess

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


class Keys:
    """A server key pair and a folder of authorized client keys, as keygen writes them."""

    def __init__(self, root: Path, clients: tuple[str, ...] = ("app", "reports")) -> None:
        self.root = root
        self.server_public, self.server_secret = write_key_pair("server", root / "server")
        self.authorized = root / "authorized"
        self.authorized.mkdir()
        self.secrets: dict[str, Path] = {}
        for name in clients:
            public, secret = write_key_pair(name, root / "clients")
            (self.authorized / public.name).write_bytes(public.read_bytes())
            self.secrets[name] = secret

    def server_args(self) -> tuple[str, ...]:
        return ("--curve-secret-key", str(self.server_secret),
                "--authorized-keys", str(self.authorized))

    def client(self, server: ServerProcess, name: str = "app", **kwargs: Any) -> Client:
        return Client(server.endpoint, events=server.events, server_key=str(self.server_public),
                      client_key=str(self.secrets[name]), **kwargs)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def server(pg_dsn: str, keys: Keys) -> Iterator[ServerProcess]:
    with ServerProcess(pg_dsn, *keys.server_args(), pool_size=2) as process:
        yield process


def drop_a_connection(client: Client) -> None:
    """Have the server lose a connection: a ``disconnected`` event follows."""
    try:
        client.query("SELECT pg_terminate_backend(pg_backend_pid())")
    except ConnectionError:
        pass


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dbpool", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# -- keys and configuration --------------------------------------------------------------


def test_keygen_writes_a_pair_that_loads_and_keeps_the_secret_private(tmp_path: Path) -> None:
    done = run_cli("keygen", "app", "--dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "keys" / "app.key", tmp_path / "keys" / "app.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = load_key_pair(str(secret), "client_key")
    assert zmq.auth.load_certificate(str(public))[0] == pair.public
    assert zmq.curve_public(pair.secret) == pair.public
    assert pair.secret.decode() not in repr(pair)
    again = run_cli("keygen", "app", "--dir", str(tmp_path / "keys"))
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert load_key_pair(str(secret), "client_key") == pair  # untouched


def test_a_public_key_file_is_no_client_key(tmp_path: Path) -> None:
    public, _ = write_key_pair("app", tmp_path)
    with pytest.raises(ConfigurationError, match="holds no secret key"):
        Client("tcp://127.0.0.1:1", server_key=str(public), client_key=str(public))
    with pytest.raises(ConfigurationError, match="client_key"):
        Client("tcp://127.0.0.1:1", server_key=str(public))


def test_curve_settings_go_together(keys: Keys) -> None:
    done = run_cli("serve", "--curve-secret-key", str(keys.server_secret))
    assert done.returncode == 2
    assert "CURVE needs authorized_keys too (--authorized-keys)" in done.stderr


def test_an_exposed_bind_without_keys_is_refused_in_one_line(pg_dsn: str) -> None:
    done = run_cli("serve", "--dsn", pg_dsn, "--bind", "tcp://0.0.0.0:*")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "refusing to serve tcp://0.0.0.0:* without authentication" in lines[0]
    assert "--insecure" in lines[0]
    events = run_cli("serve", "--dsn", pg_dsn, env={"DBPOOL_EVENTS_BIND": "tcp://*:0"})
    assert events.returncode != 0 and "tcp://*:0" in events.stderr


def test_insecure_starts_on_an_exposed_bind_and_warns(pg_dsn: str) -> None:
    with ServerProcess(pg_dsn, "--insecure", bind="tcp://0.0.0.0:*") as server:
        assert "with no authentication (insecure)" in server.output()
        port = server.endpoint.rsplit(":", 1)[1]
        with Client(f"tcp://127.0.0.1:{port}", timeout=10) as client:
            assert client.query("SELECT 1").rows == [(1,)]


# -- who gets in ---------------------------------------------------------------------------


def test_an_authorized_client_queries_and_subscribes(server: ServerProcess, keys: Keys) -> None:
    with keys.client(server, timeout=10) as client, client.subscribe("") as sub:
        assert client.query("SELECT 1").rows == [(1,)]
        with client.transaction() as tx:
            assert tx.query("SELECT 2").rows == [(2,)]

        def an_event_arrives() -> bool:
            drop_a_connection(client)
            return sub.get(timeout=0.5) is not None

        wait_for(an_event_arrives, 10, "a connection event")


def test_keys_as_z85_text_and_from_the_environment(
    server: ServerProcess, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = load_key_pair(str(keys.secrets["app"]), "client_key")
    server_public = zmq.auth.load_certificate(str(keys.server_public))[0]
    assert server_public is not None
    with Client(server.endpoint, timeout=10, server_key=server_public.decode(),
                client_key=pair.secret.decode()) as client:
        assert client.query("SELECT 1").rows == [(1,)]
    monkeypatch.setenv("DBPOOL_SERVER_KEY", str(keys.server_public))
    monkeypatch.setenv("DBPOOL_CLIENT_KEY", str(keys.secrets["reports"]))
    with Client(server.endpoint, timeout=10) as client:
        assert client.query("SELECT 1").rows == [(1,)]
    done = run_cli("query", "SELECT 41 + 1", "--endpoint", server.endpoint)
    assert done.returncode == 0 and "42" in done.stdout, done.stderr


@pytest.mark.parametrize("who", ["random key", "no key", "wrong server key"])
def test_a_refused_client_is_told_at_once(
    server: ServerProcess, keys: Keys, tmp_path: Path, who: str
) -> None:
    kwargs: dict[str, str] = {}
    if who == "random key":
        _, secret = write_key_pair("stranger", tmp_path / "stranger")
        kwargs = {"server_key": str(keys.server_public), "client_key": str(secret)}
    elif who == "wrong server key":
        other, _ = write_key_pair("other", tmp_path / "other")
        kwargs = {"server_key": str(other), "client_key": str(keys.secrets["app"])}
    with Client(server.endpoint, timeout=15, **kwargs) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionError) as caught:
            client.query("SELECT 1")
        assert time.monotonic() - started < 2.0
    assert caught.value.reason == "unauthorized"
    assert server.endpoint in str(caught.value)
    if who == "no key":  # a mismatch of mechanisms, or a handshake cut short
        assert "CURVE" in str(caught.value) and "server_key" in str(caught.value)


def test_the_async_client_is_told_at_once_and_an_authorized_one_works(
    server: ServerProcess, keys: Keys, tmp_path: Path
) -> None:
    _, secret = write_key_pair("stranger", tmp_path / "stranger")

    async def main() -> None:
        async with AsyncClient(server.endpoint, timeout=15, server_key=str(keys.server_public),
                               client_key=str(secret)) as refused:
            started = time.monotonic()
            with pytest.raises(ConnectionError) as caught:
                await refused.query("SELECT 1")
            assert time.monotonic() - started < 2.0
            assert caught.value.reason == "unauthorized"
        async with AsyncClient(server.endpoint, timeout=10, server_key=str(keys.server_public),
                               client_key=str(keys.secrets["app"])) as client:
            assert (await client.query("SELECT 1")).rows == [(1,)]

    asyncio.run(main())


def test_an_unauthorized_subscriber_gets_no_events(
    server: ServerProcess, keys: Keys, tmp_path: Path
) -> None:
    _, secret = write_key_pair("stranger", tmp_path / "stranger")
    with keys.client(server, timeout=10) as client, \
            Client(server.endpoint, events=server.events, server_key=str(keys.server_public),
                   client_key=str(secret)) as stranger, \
            client.subscribe("") as authorized, stranger.subscribe("") as unauthorized:

        def disconnect_seen() -> bool:
            drop_a_connection(client)
            return authorized.get(timeout=0.5) is not None

        wait_for(disconnect_seen, 10, "a connection event for the authorized subscriber")
        for _ in range(3):  # more events, all seen by the authorized subscriber
            drop_a_connection(client)
            assert authorized.get(timeout=5) is not None
        assert unauthorized.get(timeout=0.5) is None


def test_a_thousand_strangers_get_nothing_while_the_authorized_client_works(
    server: ServerProcess, keys: Keys
) -> None:
    errors: list[BaseException] = []
    done = threading.Event()
    served = 0

    def work() -> None:
        nonlocal served
        with keys.client(server, timeout=10) as client:
            while not done.is_set():
                try:
                    assert client.query("SELECT 1").rows == [(1,)]
                    served += 1
                except BaseException as error:
                    errors.append(error)

    worker = threading.Thread(target=work)
    worker.start()
    context = zmq.Context()
    body = packb({"v": 1, "id": 1, "op": "query", "sql": "SELECT 1"})
    replies = events = 0
    try:
        for batch in range(10):
            sockets = []
            for index in range(100):
                keyed = (batch * 100 + index) % 2 == 0
                for kind in (zmq.DEALER, zmq.SUB):
                    sock = context.socket(kind)
                    sock.linger = 0
                    if keyed:  # a key of its own, unknown to the server
                        public, secret = zmq.curve_keypair()
                        sock.curve_serverkey = load_key_pair(
                            str(keys.server_secret), "server").public
                        sock.curve_publickey, sock.curve_secretkey = public, secret
                    if kind == zmq.SUB:
                        sock.setsockopt(zmq.SUBSCRIBE, b"")
                        sock.connect(server.events)
                    else:
                        sock.connect(server.endpoint)
                        try:  # queued until a handshake that never ends...
                            sock.send(body, zmq.NOBLOCK)
                        except zmq.Again:  # ...or refused already: nothing to send it to
                            pass
                    sockets.append(sock)
            poller = zmq.Poller()
            for sock in sockets:
                poller.register(sock, zmq.POLLIN)
            deadline = time.monotonic() + 0.5
            while (left := deadline - time.monotonic()) > 0:
                for sock, _ in poller.poll(left * 1000):
                    sock.recv_multipart()
                    if sock.type == zmq.SUB:
                        events += 1
                    else:
                        replies += 1
            for sock in sockets:
                sock.close()
    finally:
        done.set()
        worker.join(timeout=30)
        context.term()
    assert (replies, events) == (0, 0)
    assert errors == [] and served > 0


def test_a_removed_key_is_refused_after_sighup_on_its_open_connection(
    server: ServerProcess, keys: Keys
) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def other_client() -> None:
        with keys.client(server, "reports", timeout=10) as client:
            while not stop.is_set():
                try:
                    client.query("SELECT 1")
                except BaseException as error:
                    errors.append(error)

    with keys.client(server, "app", timeout=10) as app:
        assert app.query("SELECT 1").rows == [(1,)]  # connected and authenticated
        worker = threading.Thread(target=other_client)
        worker.start()
        try:
            (keys.authorized / "app.key").unlink()
            os.kill(server.pid, signal.SIGHUP)
            server.wait_output(r"authorized keys reloaded: 1 key\(s\); added none, removed app")
            with pytest.raises(ConnectionError) as caught:
                app.query("SELECT 1")
            assert caught.value.reason == "unauthorized"
        finally:
            stop.set()
            worker.join(timeout=30)
    assert errors == []
    with keys.client(server, "reports", timeout=10) as reports:
        assert reports.query("SELECT 1").rows == [(1,)]
