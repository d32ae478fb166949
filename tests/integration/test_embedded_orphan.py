"""The embedded PostgreSQL is never left running unattended (issue 18).

``dbpool serve`` with no DSN starts the embedded PostgreSQL (the pgserver
wheel) in ``$DBPOOL_EMBEDDED_DIR``.  Killed with SIGKILL, it cannot stop it;
the next ``dbpool serve`` on the same folder adopts the server left running
(one postmaster for the folder, serving), and stops it when it exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbpool.client import Client

pytest.importorskip("pgserver")


def postmasters(folder: Path) -> list[int]:
    """The pids of the postgres processes whose data directory is ``folder``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (command and command[0].endswith(b"postgres") and b"-D" in command
                and command[command.index(b"-D") + 1] == str(folder).encode()):
            pids.append(int(entry.name))
    return pids


def start(folder: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dbpool", "serve", "--bind", "tcp://127.0.0.1:*",
         "--events-bind", "tcp://127.0.0.1:*", "--pool-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "DBPOOL_EMBEDDED_DIR": str(folder)})
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if line.startswith("dbpool serve: ready on "):
            return process, line.split()[4]
        assert time.monotonic() < deadline
    raise AssertionError(f"dbpool serve exited with {process.wait()}")


def test_a_killed_servers_database_is_adopted_then_stopped(tmp_path: Path) -> None:
    folder = (tmp_path / "pgdata").resolve()
    tmp_path.chmod(0o755)  # the embedded server runs as its own user when we are root
    first, endpoint = start(folder)
    try:
        with Client(endpoint, timeout=10) as client:
            client.query("CREATE TABLE kept (x int)")
            client.query("INSERT INTO kept VALUES (1)")
        assert len(postmasters(folder)) == 1
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert len(postmasters(folder)) == 1  # it could not stop it
        second, endpoint = start(folder)
        try:
            with Client(endpoint, timeout=10) as client:
                assert client.query("SELECT x FROM kept").rows == [(1,)]
            assert len(postmasters(folder)) == 1  # adopted, not a second one
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0
        deadline = time.monotonic() + 15
        while postmasters(folder):  # the adopter stopped it on its way out
            assert time.monotonic() < deadline, "the embedded PostgreSQL was left running"
            time.sleep(0.1)
    finally:
        for process in (first,):
            if process.poll() is None:
                process.kill()
        for pid in postmasters(folder):
            os.kill(pid, signal.SIGKILL)
