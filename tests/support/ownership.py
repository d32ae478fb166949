"""Helpers for the ownership-pool tests (ports of db_connection's integration_test/ownership).

An Elixir process becomes a :class:`Peer`: a thread that runs the functions
it is sent, one at a time, until told to exit.  A plain peer has no callers
chain (the tests' ``async_no_callers``); ``Peer(..., callers=True)`` is
started through :func:`~dbpool.pool.ownership.owners.propagate_callers`, as
``Task.async`` inherits ``$callers``.

Blocking work on the database (the scripted driver's ``receive :continue``)
is a :class:`Gate`: an advisory lock held by an admin session, which pooled
statements wait on with ``pg_advisory_xact_lock`` until the gate opens.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import psycopg
import pytest

from dbpool.actors.listeners import ConnectionEvent
from dbpool.errors import OwnershipError
from dbpool.pool import Pool
from dbpool.pool.ownership.owners import Owner, propagate_callers

from .events import Recorder, kind

T = TypeVar("T")

#: How long a peer call or an asynchronous change may take before the test fails.
WAIT = 10.0


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until ``predicate()`` holds (state the manager changes asynchronously)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def start_pool(
    dsn: str, pools: list[Pool], *, size: int = 1, **options: Any
) -> tuple[Pool, Recorder[ConnectionEvent]]:
    """An ownership pool (manual mode, ownership logged at DEBUG), once all connected.

    As the Elixir tests' ``TestPool``: ``pool_size: 1, ownership_log: :debug``.
    """
    events: Recorder[ConnectionEvent] = Recorder()
    options.setdefault("ownership_mode", "manual")
    options.setdefault("ownership_log", "DEBUG")
    pool = Pool.start(dsn, pool_size=size, pool="ownership",
                      connection_listeners=[events], **options)
    pools.append(pool)
    events.wait_count(kind("connected"), size)
    wait_for(lambda: pool.connection_metrics()[0]["ready_conn_count"] == size)
    return pool, events


def backend_pid(pool: Pool, caller: Owner | None = None, timeout: float = WAIT) -> int:
    """``P.run(pool, fn, opts)``: run on the caller's connection; its server process id."""
    pid: int = pool.run(lambda conn: conn.query("SELECT pg_backend_pid()").rows[0][0],
                        caller=caller, timeout=timeout)
    return pid


def assert_checked_out(pool: Pool, caller: Owner | None = None) -> int:
    """The manager tests' ``assert_checked_out``: a run succeeds; returns the backend pid."""
    return backend_pid(pool, caller)


def refute_checked_out(pool: Pool, caller: Owner | None = None) -> OwnershipError:
    """The manager tests' ``refute_checked_out``: a run raises OwnershipError."""
    with pytest.raises(OwnershipError, match="cannot find an owned connection") as info:
        pool.run(lambda conn: None, caller=caller)
    return info.value


def proxies(pool: Pool) -> list[dict[str, Any]]:
    """The proxy entries of ``connection_metrics()``: one per live ownership."""
    return [m for m in pool.connection_metrics() if m["source"][0] == "proxy"]


def gauges(pool: Pool) -> list[tuple[str, int, int]]:
    """``connection_metrics()`` as ``(source kind, ready_conn_count, checkout_queue_length)``."""
    return [(m["source"][0], m["ready_conn_count"], m["checkout_queue_length"])
            for m in pool.connection_metrics()]


def events_of(events: Recorder[ConnectionEvent], name: str) -> list[ConnectionEvent]:
    return [e for e in events.values() if e.kind == name]


class Peer:
    """A thread that runs the functions it is sent, in order: an Elixir process."""

    def __init__(self, name: str, *, callers: bool = False) -> None:
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue())
        target = propagate_callers(self._loop) if callers else self._loop
        self.thread = threading.Thread(target=target, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self._inbox.get()) is not None:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
            del item, fn, future

    def send(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the peer; the future has its result or exception."""
        future: Future[T] = Future()
        self._inbox.put((fn, future))
        return future

    def call(self, fn: Callable[[], T], timeout: float = WAIT) -> T:
        """Run ``fn`` on the peer and wait for it (``Task.await``)."""
        return self.send(fn).result(timeout)

    def exit(self, timeout: float = WAIT) -> None:
        """End the thread (the owner exits) and wait until it has."""
        self._inbox.put(None)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} did not exit"


def run_in_thread(fn: Callable[[], T], *, callers: bool = False, name: str = "task") -> T:
    """``Task.await(async_no_callers(fn))`` (or ``Task.async`` with ``callers=True``)."""
    peer = Peer(name, callers=callers)
    try:
        return peer.call(fn)
    finally:
        peer.exit()


#: The ``peers`` fixture: ``make(name, callers=False) -> Peer``.
PeerFactory = Callable[..., Peer]


class Gate:
    """An advisory lock held by an admin session: pooled statements wait on it."""

    def __init__(self, dsn: str) -> None:
        self.key = uuid.uuid4().int & 0x7FFF_FFFF_FFFF_FFFF
        self._admin = psycopg.connect(dsn, autocommit=True)
        self._admin.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        self._open = False

    @property
    def sql(self) -> str:
        """A statement that blocks until the gate opens (or it is cancelled)."""
        return f"SELECT pg_advisory_xact_lock({self.key})"

    def waiting(self) -> bool:
        """Whether a session is blocked on the gate right now."""
        rows = self._admin.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
            (self.key >> 32, self.key & 0xFFFF_FFFF)).fetchone()
        return bool(rows and rows[0])

    def open(self) -> None:
        if not self._open:
            self._open = True
            self._admin.execute("SELECT pg_advisory_unlock(%s)", (self.key,))

    def close(self) -> None:
        self.open()
        self._admin.close()


def backend_alive(dsn: str, pid: int) -> bool:
    """Whether PostgreSQL still has a session with this backend pid."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            (pid,)).fetchone()
    return bool(row and row[0])


def terminate_backend(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


__all__ = [
    "WAIT", "Gate", "Peer", "assert_checked_out", "backend_alive", "backend_pid", "events_of",
    "gauges", "kind", "proxies", "refute_checked_out", "run_in_thread", "start_pool",
    "terminate_backend", "wait_for",
]
