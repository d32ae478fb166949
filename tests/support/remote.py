"""``dbpool serve`` in a child process, for the remote tests.

:class:`ServerProcess` starts ``python -m dbpool serve`` with ports chosen by
libzmq (``tcp://127.0.0.1:*``), waits for its ready line (which names the
endpoints it bound) and stops it with SIGTERM.  Its output is collected so
that a test can read the server's log (:meth:`ServerProcess.output`).

:func:`restart` starts a new server on the endpoints of a stopped one, to
test that clients recover.

:class:`TransactionChild` is a client in a process of its own that holds a
transaction open until the test kills or stops it; :func:`pool_whole` and
:func:`expiry_line` tell when, and why, the server gave its connection back.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from dbpool.client import Client

_READY = re.compile(r"dbpool serve: ready on (\S+) \(events on (\S+)\)")
_LISTENING = re.compile(r"dbpool serve: listening on (\S+) \(events on (\S+)\)")
_METRICS = re.compile(r"metrics and health on http://(\S+)/\)")


class ServerProcess:
    """One ``dbpool serve`` child process (see the module docstring)."""

    def __init__(self, dsn: str, *args: str, bind: str = "tcp://127.0.0.1:*",
                 events_bind: str = "tcp://127.0.0.1:*", pool_size: int | None = 4,
                 env: dict[str, str] | None = None, start_timeout: float = 30.0,
                 wait_ready: bool = True) -> None:
        self.dsn = dsn
        self.args: Sequence[str] = args
        self.pool_size = pool_size
        sizing = [] if pool_size is None else ["--pool-size", str(pool_size)]
        command = [sys.executable, "-m", "dbpool", "serve", "--dsn", dsn, "--bind", bind,
                   "--events-bind", events_bind, *sizing, *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self._lines: list[str] = []
        #: Whether the start waits for "ready" (every pool connected) or "listening".
        self._wait_ready = wait_ready
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.endpoint = ""
        self.events = ""
        #: host:port of the HTTP metrics and health endpoint, if it serves one.
        self.metrics = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout):
            self.kill()
            raise RuntimeError(f"dbpool serve did not start:\n{self.output()}")
        if not self.endpoint:
            raise RuntimeError(f"dbpool serve exited:\n{self.output()}")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._lines.append(line)
            match = (_READY if self._wait_ready else _LISTENING).search(line)
            if match:
                self.endpoint, self.events = match.group(1), match.group(2)
                metrics = _METRICS.search(line)
                if metrics:
                    self.metrics = metrics.group(1)
                self._ready.set()
        self._ready.set()  # exited

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """Everything the server printed and logged so far."""
        with self._lock:
            return "".join(self._lines)

    def wait_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the server's output matches ``pattern`` (a regex)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the server's output:\n{self.output()}")
            time.sleep(0.02)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process.poll() is None:
            try:
                self.terminate(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def restart(server: ServerProcess, **kwargs: object) -> ServerProcess:
    """A new server on the same endpoints as ``server``, which must have stopped."""
    assert server.process.poll() is not None, "stop the old server first"
    return ServerProcess(server.dsn, *server.args, bind=server.endpoint,
                         events_bind=server.events, pool_size=server.pool_size,
                         **kwargs)  # type: ignore[arg-type]


def pool_whole(client: Client, size: int) -> bool:
    """Every connection is idle in the server's pool and no lease or stream is open."""
    status = client.status()
    return bool(status["pool"]["ready_conn_count"] == size
                and status["server"]["open_leases"] == 0
                and status["server"]["open_streams"] == 0)


def expiry_line(lease: str, session: str, why: str) -> str:
    """The regex of the server's log line for a lease it ends and rolls back."""
    return (rf"lease {re.escape(lease[:8])} of session {re.escape(session[:8])}\.\.\.: "
            rf"{why}; rolling back")


_HOLDER = """\
import sys
from dbpool.client import Client

endpoint, sql = sys.argv[1:3]
client = Client(endpoint, timeout=10)
tx = client.transaction()
result = tx.query(sql)
print("ready", client.session, tx.lease, result.rowcount, flush=True)
sys.stdin.read()  # hold the transaction open until killed
"""


class TransactionChild:
    """A client process that begins a transaction on ``endpoint``, runs ``sql`` in it
    and holds it open until it is killed (or its stdin closes).

    Ready once constructed: :attr:`session` and :attr:`lease` name the
    transaction, :attr:`rowcount` is what ``sql`` affected.  Use it as a
    context manager so that the process is killed whatever happens.
    """

    def __init__(self, endpoint: str, sql: str, *, timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, endpoint, sql],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, self.session, self.lease, rowcount = self._read_line(timeout).split()
        except BaseException:
            self.kill()
            raise
        self.rowcount = int(rowcount)

    def _read_line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the child printed nothing within {timeout:g}s")
        line = self.process.stdout.readline()
        if not line:
            assert self.process.stderr is not None
            raise AssertionError(
                f"the child exited ({self.process.wait()}): {self.process.stderr.read()}")
        return line

    def signal(self, signum: int) -> float:
        """Send ``signum``; return when (``time.monotonic()``), just after it was sent."""
        self.process.send_signal(signum)
        return time.monotonic()

    def kill(self) -> None:
        """SIGKILL (stopped or not) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()
