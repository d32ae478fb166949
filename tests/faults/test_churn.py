"""Client churn against ``dbpool serve``: its memory must level off.

The issue: three rounds of 2,000 short-lived clients plus 2,000 idle sockets
raised the server's RSS from 46 MB to 102, then 133, then 143 MB, and it was
never given back.  Each round here:

- connects ``idle`` DEALER sockets that send nothing (in batches of
  :data:`CONNECT_BATCH`), and waits until the server counts them all
  (``status`` -> ``server.clients``);
- runs ``clients`` short-lived clients on :data:`WORKERS` threads: each
  connects a new socket, sends ``ping`` and a ``query``, every fourth also a
  transaction (``begin``, a query in it, ``commit``), and closes; every tenth
  is a :class:`dbpool.client.Client` rather than a bare DEALER;
- closes the idle sockets, waits until the server has seen every client
  leave (``server.clients`` back to the one status socket), then reads the
  server's ``VmRSS`` from ``/proc/<pid>/status`` once it holds still
  (:func:`steady_rss`).

What grew was not Python objects nor libzmq's routing tables: it was memory
libzmq had freed, about 30 KB per connection, that glibc kept resident in
the arena of libzmq's I/O thread (``malloc_trim`` gives it back).  See
``dbpool.server.memory`` once the fix is in.

:func:`run_churn` is also the measuring tool: it prints one line per round
and returns the RSS figures.  Everything is on loopback; every loop is
bounded in count and every wait in time.
"""

from __future__ import annotations

import resource
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import pytest
import zmq

from dbpool import wire
from dbpool.client import Client
from dbpool.protocol import VERSION
from tests.support.events import wait_for
from tests.support.remote import ServerProcess

#: Threads that run the short-lived clients (the machine has few cores; more
#: threads only contend for the GIL).
WORKERS = 8
#: Idle sockets connect this many at a time, each batch counted by the server
#: before the next: libzmq listens with a backlog of 100, and a larger burst
#: of connects overflows it (the kernel then drops SYNs, and connects take
#: seconds of retransmits).
CONNECT_BATCH = 64
#: Seconds a client waits for one reply.
REPLY_TIMEOUT = 20.0
#: Seconds one round's short-lived clients may take, all together, per 1,000 clients.
ROUND_SECONDS_PER_1000 = 60.0
#: File descriptors per idle socket in this process: its TCP connection and
#: its mailbox.
FDS_PER_SOCKET = 2
#: Seconds the server may take to count connects and disconnects.
SETTLE_TIMEOUT = 60.0
#: The server's RSS is read once it has stayed within RSS_STEADY bytes for
#: RSS_WINDOW seconds (it gives freed memory back a moment after clients
#: leave), or after RSS_TIMEOUT seconds at most.
RSS_WINDOW = 1.0
RSS_STEADY = 256 * 1024
RSS_TIMEOUT = 10.0
MB = 1024 * 1024


# -- measuring ------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def steady_rss(pid: int) -> int:
    """The RSS of process ``pid`` once it stopped changing (see :data:`RSS_WINDOW`)."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + RSS_TIMEOUT
    while True:
        now = time.monotonic()
        samples.append((now, rss_bytes(pid)))
        recent = [rss for at, rss in samples if at >= now - RSS_WINDOW]
        if now - samples[0][0] >= RSS_WINDOW and max(recent) - min(recent) <= RSS_STEADY:
            return samples[-1][1]
        if now > deadline:
            return samples[-1][1]
        time.sleep(0.05)


def _ensure_fds(sockets: int) -> None:
    """Raise this process's soft file limit for ``sockets`` open sockets, or skip."""
    needed = FDS_PER_SOCKET * sockets + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _call(sock: zmq.Socket[bytes], rid: int, op: str, **fields: Any) -> Any:
    """Send one request on ``sock`` and return its ``ok`` value; fail on anything else."""
    sock.send(wire.packb({"v": VERSION, "id": rid, "op": op, **fields}))
    reply = wire.unpackb(sock.recv())
    assert isinstance(reply, dict), reply
    assert reply.get("id") == rid and "error" not in reply, f"{op}: {reply!r}"
    return reply["ok"]


def _dealer(context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT * 1000))
    sock.connect(endpoint)
    return sock


def _short_lived(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, index: int) -> None:
    """One client that connects, sends a few requests and goes away."""
    sql = "SELECT %s::int AS n"
    if index % 10 == 9:  # the real client, as an application would use it
        with Client(endpoint, timeout=REPLY_TIMEOUT, context=context) as client:
            client.ping()
            assert client.query(sql, [index]).rows == [(index,)]
        return
    sock = _dealer(context, endpoint)
    try:
        _call(sock, 1, "ping")
        assert _call(sock, 2, "query", sql=sql, params=[index])["rows"] == [[index]]
        if index % 4 == 0:
            session = uuid.uuid4().hex
            lease = _call(sock, 3, "begin", session=session)["lease"]
            _call(sock, 4, "query", sql=sql, params=[index], lease=lease, session=session)
            _call(sock, 5, "commit", lease=lease, session=session)
    finally:
        sock.close(linger=0)


def _run_clients(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, count: int,
                 deadline: float) -> None:
    def worker(first: int) -> int:
        done = 0
        for index in range(first, count, WORKERS):
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {first}: out of time after {done} clients")
            _short_lived(context, endpoint, index)
            done += 1
        return done

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="churn") as pool:
        assert sum(pool.map(worker, range(WORKERS))) == count


class Churn:
    """Drives rounds of churn against one running server (see the module docstring)."""

    def __init__(self, server: ServerProcess, *,
                 report: Callable[[str], None] = print) -> None:
        self.server = server
        self.report = report
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # The idle sockets and the clients' sockets, each with a mailbox of its own.
        self.context.set(zmq.MAX_SOCKETS, 16384)
        self.status_sock = _dealer(self.context, server.endpoint)
        self._rid = 0
        self.rss: list[int] = []

    def clients(self) -> int:
        """The server's count of connected clients (the status socket is one)."""
        self._rid += 1
        clients = _call(self.status_sock, self._rid, "status")["server"]["clients"]
        assert isinstance(clients, int)
        return clients

    def wait_clients(self, count: int, what: str, step: float = 0.05) -> None:
        wait_for(lambda: self.clients() == count, SETTLE_TIMEOUT, what, step=step)

    def start(self) -> None:
        self.wait_clients(1, "the status socket to be counted")
        self.rss.append(steady_rss(self.server.pid))
        self.report(f"churn: start rss {self.rss[0] / MB:.1f} MB")

    def round(self, clients: int, idle: int) -> int:
        """One round; returns the server's RSS after it, in bytes."""
        times = [time.monotonic()]
        idle_socks: list[zmq.Socket[bytes]] = []
        try:
            while len(idle_socks) < idle:
                for _ in range(min(CONNECT_BATCH, idle - len(idle_socks))):
                    idle_socks.append(_dealer(self.context, self.server.endpoint))
                self.wait_clients(1 + len(idle_socks), f"{len(idle_socks)} idle sockets to "
                                  "connect", step=0.005)
            times.append(time.monotonic())
            deadline = time.monotonic() + ROUND_SECONDS_PER_1000 * max(1, clients) / 1000
            _run_clients(self.context, self.server.endpoint, clients, deadline)
            times.append(time.monotonic())
        finally:
            for sock in idle_socks:
                sock.close(linger=0)
        self.wait_clients(1, "every client of the round to leave")
        times.append(time.monotonic())
        at_once = rss_bytes(self.server.pid)
        rss = steady_rss(self.server.pid)
        times.append(time.monotonic())
        self.rss.append(rss)
        phases = "/".join(f"{b - a:.1f}" for a, b in pairwise(times))
        self.report(f"churn: round {len(self.rss) - 1}: rss {rss / MB:.1f} MB "
                    f"({(rss - self.rss[-2]) / MB:+.1f}; {at_once / MB:.1f} as the last "
                    f"client left) in {phases}s (idle/clients/leave/steady)")
        return rss

    def close(self) -> None:
        """Close every socket still open (all of them are, if a round failed)."""
        self.context.destroy(linger=0)


def run_churn(dsn: str, rounds: int, clients: int, idle: int, *,
              env: dict[str, str] | None = None,
              report: Callable[[str], None] = print) -> list[int]:
    """Start ``dbpool serve`` on ``dsn`` (``env`` added to its environment) and run
    ``rounds`` rounds of churn.

    Returns the server's RSS in bytes: at the start, then after each round.
    """
    _ensure_fds(idle + WORKERS + 1)
    with ServerProcess(dsn, env=env) as server:
        churn = Churn(server, report=report)
        try:
            churn.start()
            for _ in range(rounds):
                churn.round(clients, idle)
        finally:
            churn.close()
        assert server.process.poll() is None, server.output()
        assert "Traceback" not in server.output(), server.output()
        return churn.rss


def _line(rss: list[int]) -> str:
    return " ".join(f"{value / MB:.1f}" for value in rss) + " MB"


# -- the tests ------------------------------------------------------------------------


def test_churn_short(pg_dsn: str) -> None:
    """Three rounds of 300 clients and 300 idle sockets: rounds 2 and 3 add < 2 MB.

    Round 1 pays for what a server allocates once (its code paths' caches,
    libpq's buffers, the pools of Python's allocator).  Before the fix,
    rounds 2 and 3 kept 4.8 and 2.9 MB more of freed libzmq memory; with
    it they add 0.0-0.3 MB.  What may legitimately remain per round is
    small: the front end remembers the ids of ended leases (75 a round here,
    about 200 bytes each, at most 10,000), and the allocators' free lists
    vary by a few hundred KB.  2 MB leaves room for that noise several times
    over and is well below the leak's 7.7 MB.
    """
    rss = run_churn(pg_dsn, rounds=3, clients=300, idle=300)
    assert rss[-1] - rss[1] < 2 * MB, f"RSS per round: {_line(rss)}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_churn_ten_rounds(pg_dsn: str) -> None:
    """The issue's requirement: ten rounds of 2,000 short-lived clients and 2,000
    idle sockets; the RSS grows by less than 5 MB over the last five rounds."""
    rss = run_churn(pg_dsn, rounds=10, clients=2000, idle=2000)
    assert rss[-1] - rss[-6] < 5 * MB, f"RSS per round: {_line(rss)}"

