"""``dbpool serve`` starts honestly (issue 18):

- a bind that fails (the port is taken, on the request, events or metrics
  endpoint) exits 2 within 2 s with one line naming the endpoint, and no
  database connection was opened;
- with a database that does not answer, it says ``listening`` but never
  ``ready``, logs what it waits for and why, and ``--wait-for-database 3``
  exits 1 after 3 s;
- ``ready`` comes once every pool has a connection up;
- ``--log-format json`` lines parse as JSON, and an outage logs a bounded
  number of lines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.remote import ServerProcess


@pytest.fixture
def silent_database() -> Iterator[tuple[socket.socket, str]]:
    """A TCP port that accepts connections and never answers: a DSN that cannot connect,
    and the listener, to see whether anything connected."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        yield listener, f"host=127.0.0.1 port={port} user=nobody connect_timeout=1"
    finally:
        listener.close()


def connections_to(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def serve(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dbpool", "serve", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())
    return done, time.monotonic() - started


@pytest.mark.parametrize("flag", ["--bind", "--events-bind", "--metrics-bind"])
def test_a_taken_port_exits_2_at_once_before_any_database_connection(
    silent_database: tuple[socket.socket, str], flag: str
) -> None:
    listener, dsn = silent_database
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    endpoint = f"127.0.0.1:{port}" if flag == "--metrics-bind" else f"tcp://127.0.0.1:{port}"
    others = {"--bind": "tcp://127.0.0.1:*", "--events-bind": "tcp://127.0.0.1:*"}
    others.pop(flag, None)
    args = [arg for pair in others.items() for arg in pair]
    try:
        done, seconds = serve("--dsn", dsn, *args, flag, endpoint)
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    assert seconds < 2.0  # the interpreter's start included
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and endpoint in lines[0] and "cannot bind" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert connections_to(listener) == 0


def test_a_dead_database_is_never_ready_and_wait_for_database_gives_up(
    silent_database: tuple[socket.socket, str]
) -> None:
    _, dsn = silent_database
    done, seconds = serve("--dsn", dsn, "--bind", "tcp://127.0.0.1:*", "--events-bind",
                          "tcp://127.0.0.1:*", "--wait-for-database", "3", "--backoff-max",
                          "0.5", "--pool-size", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert 3.0 <= seconds < 10.0
    assert "dbpool serve: listening on" in done.stdout
    assert "ready" not in done.stdout
    assert "no database within --wait-for-database 3 s" in done.stderr
    assert "waiting for the database" in done.stderr
    assert f"pool default at host=127.0.0.1 port={dsn.split('port=')[1].split()[0]}" \
        in done.stderr


def test_waiting_is_logged_and_ready_follows_the_first_connection(pg_dsn: str) -> None:
    with ServerProcess(pg_dsn, pool_size=2) as server:
        server.wait_output("ready: every pool has a connection up")
        output = server.output()
        assert output.index("dbpool serve: listening on") < output.index(
            "dbpool serve: ready on")


@pytest.mark.parametrize("outage", [
    8.0, pytest.param(30.0, marks=pytest.mark.slow, id="30s")])
def test_json_logs_parse_and_an_outage_logs_a_bounded_number_of_lines(
    silent_database: tuple[socket.socket, str], outage: float
) -> None:
    _, dsn = silent_database
    server = ServerProcess(dsn, "--log-format", "json", "--backoff-min", "0.05",
                           "--backoff-max", "0.2", pool_size=2, wait_ready=False)
    try:
        time.sleep(outage)  # the behaviour under test is what a stretch of time logs
    finally:
        server.terminate()
    lines = [line for line in server.output().splitlines()
             if line.strip() and not line.startswith("dbpool serve:")]
    entries = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    failures = [entry for entry in entries if entry.get("reason") and entry.get("pool")]
    assert failures, "no connect failure logged with its pool and reason"
    # Hundreds of failed connects: the log says so a few times a minute, not hundreds.
    assert len(entries) <= 3 + outage / 5 * 3 + outage / 10 * 2, entries
