"""One connection budget across servers, kept by PostgreSQL itself.

Several ``dbpool serve`` processes (or in-process pools), on one host or
many, can share a ``max_server_connections`` for one database without any
other infrastructure: each of their connections holds a session-level
advisory lock on one of the budget's slots, ``(key, 0)`` to
``(key, size - 1)``, where ``key`` comes from the ``budget_name``.
PostgreSQL releases a session's advisory locks when the session ends, also
when the process that held it died, so a killed server's slots become free
as soon as its sessions end, and the other servers take them up.

A session has to exist before it can take a lock, so a new connection must
not simply connect and try: while the budget is full, every such try would
be one backend too many for a moment.  A pool that already holds a slot
therefore **reserves before it connects** (:meth:`Budget.connect`):

1. it borrows one of its own connections (the next one checked in) and
   there takes the reservation lock ``(key, size + k)`` of a slot ``k``
   that it then finds free;
2. only then does it open the new session, which takes slot ``k`` itself;
3. the borrowed connection lets the reservation go, and goes back.

While the budget is full, step 1 finds nothing and no session is opened.  A
pool that holds no slot at all (it is starting, or lost every connection)
has no session to reserve with: one of its connections *probes*, at most
once per ``idle_interval``, connecting and taking a slot whose reservation
is free.  Only a pool that joins a budget that is already full can thus
exceed it, by one session for a few milliseconds once per
``idle_interval``.  For a hard limit that
PostgreSQL enforces before a session starts, also give the role a
``CONNECTION LIMIT``.

A probe takes the slot, then checks that its reservation is free; a
reservation is taken, then its slot checked free.  Each side holds its own
lock while it checks the other's, so the two can never both succeed.

Slots go to whoever takes them first.  So that servers started together
share the budget, a pool that had no slot grows past its first one only
``idle_interval`` times two after taking it.

With no slot to be had, the connection counts as *wanting* one
(:meth:`Budget.wanting`, in the pool's metrics as ``budget``), and its
actor tries again after ``idle_interval`` (jittered).  An idle connection's
ping checks that it still holds its slot (:meth:`Budget.holds`): a session
that released it (``pg_advisory_unlock_all()``, ``DISCARD ALL``) is
replaced.  In the service, such statements run only in a transaction of one
client, whose connection is replaced when it ends.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Set
from typing import TYPE_CHECKING, Any

import psycopg

from dbpool.errors import ConfigurationError
from dbpool.pgdriver import PgDriver, PgState

if TYPE_CHECKING:
    from .connection import Connection
    from .lender import Lender

__all__ = ["Budget"]

logger = logging.getLogger("dbpool.pool.budget")

#: The slots in the order to try them: from a random one, so that servers do
#: not all contend for slot 0.
_ORDER = "SELECT (%(start)s + i) %% %(size)s AS k FROM generate_series(0, %(size)s - 1) AS i"
#: A probe: the first slot it takes whose reservation is free (it checks that
#: while it holds the slot, and keeps the slot only if so).
_PROBE = (f"SELECT k FROM ({_ORDER}) AS slots WHERE CASE "
          "WHEN pg_try_advisory_lock(%(key)s, k) THEN CASE "
          "WHEN pg_try_advisory_lock(%(key)s, %(size)s + k) "
          "THEN pg_advisory_unlock(%(key)s, %(size)s + k) "
          "ELSE NOT pg_advisory_unlock(%(key)s, k) END "
          "ELSE false END LIMIT 1")
#: A reservation, on the borrowed connection: the first slot (not its own)
#: whose reservation it takes and which it then finds free (it keeps the
#: reservation only if so).
_RESERVE = (f"SELECT k FROM ({_ORDER}) AS slots WHERE k <> %(own)s AND CASE "
            "WHEN pg_try_advisory_lock(%(key)s, %(size)s + k) THEN CASE "
            "WHEN pg_try_advisory_lock(%(key)s, k) THEN pg_advisory_unlock(%(key)s, k) "
            "ELSE NOT pg_advisory_unlock(%(key)s, %(size)s + k) END "
            "ELSE false END LIMIT 1")
_UNRESERVE = "SELECT pg_advisory_unlock(%s, %s)"
_TAKE = "SELECT pg_try_advisory_lock(%s, %s)"
# A two-number advisory lock shows in pg_locks as classid, objid, objsubid = 2.
_HOLDS = ("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted "
          "AND pid = pg_backend_pid() AND classid = %s::oid AND objsubid = 2 "
          "AND objid < %s LIMIT 1")

#: How long a new session may wait for its reserved slot: a probe elsewhere may
#: hold it for a moment (until it sees the reservation and lets it go).
_TAKE_WITHIN = 2.0


class Budget:
    """The slots of budget ``name`` (``size`` of them) for one pool's connections.

    ``lender`` lends the pool's idle connections (to reserve with), and
    ``up`` is the set of the pool's connected connections' indices.
    """

    def __init__(self, name: str, size: int, driver: Any, *, lender: Lender, up: Set[int],
                 interval: float) -> None:
        if not isinstance(driver, PgDriver):
            raise ConfigurationError(
                "max_server_connections needs the psycopg driver (PgDriver): the budget is "
                f"held as PostgreSQL advisory locks, not with {type(driver).__name__}")
        self.name = name
        self.size = size
        #: The first number of the budget's advisory locks (a signed 32-bit int).
        self.key = zlib.crc32(f"dbpool budget {name}".encode()) & 0x7FFFFFFF
        self._driver = driver
        self._lender = lender
        self._up = up
        self._interval = interval
        self._lock = threading.Lock()
        self._wanting: set[int] = set()
        #: One probe at a time per pool, and one per ``interval``: its other
        #: connections reserve through the one that took a slot.
        self._probing = threading.Lock()
        self._probed_at = -float("inf")
        #: When the pool last took a slot while it held none (see the docstring).
        self._first_at = -float("inf")
        #: The slot each connection's session holds, by connection index.
        self._slots: dict[int, int] = {}
        #: One reservation at a time per pool; while it waits for a connection to
        #: reserve with, the index of the one it asked back (see asks_back), or -1.
        self._reserving = threading.Lock()
        self._asked: int | None = None

    def connect(self, index: int, open_session: Callable[[], PgState]) -> PgState | None:
        """Open a session for connection ``index`` with ``open_session``, within the
        budget; None if no slot is free now (nothing is left open: try again later).

        A failure to connect, or a database error on the new session, propagates.
        """
        if not self._others_up(index):
            now = time.monotonic()
            if now - self._probed_at < self._interval or not self._probing.acquire(
                    blocking=False):
                return self._outcome(index, None)  # another connection probes
            try:
                self._probed_at = now
                state = self._probe(index, open_session)
                if state is not None:
                    self._first_at = time.monotonic()
                return self._outcome(index, state)
            finally:
                self._probing.release()
        if (time.monotonic() - self._first_at < 2 * self._interval  # others may be starting
                or not self._reserving.acquire(blocking=False)):  # another one reserves
            return self._outcome(index, None)
        try:
            return self._outcome(index, self._reserve_and_open(index, open_session))
        finally:
            self._reserving.release()

    def _others_up(self, index: int) -> bool:
        up = self._up
        return len(up) > (index in up)

    def _outcome(self, index: int, state: PgState | None) -> PgState | None:
        with self._lock:
            if state is None:
                self._wanting.add(index)
            else:
                self._wanting.discard(index)
        return state

    def _probe(self, index: int, open_session: Callable[[], PgState]) -> PgState | None:
        state = open_session()
        try:
            row = state.cursor.execute(_PROBE, self._params()).fetchone()
        except BaseException as exc:
            self._driver.disconnect(exc, state)
            raise
        if row is None:
            self._driver.disconnect(None, state)
            return None
        self._slots[index] = int(row[0])
        return state

    def _reserve_and_open(self, index: int,
                          open_session: Callable[[], PgState]) -> PgState | None:
        holder = self._borrow()
        if holder is None:
            return None
        slot = None
        try:
            slot = self._reserve(holder)
            if slot is None:
                return None
            state = open_session()
            try:
                taken = self._take(state, slot)
            except BaseException as exc:
                self._driver.disconnect(exc, state)
                raise
            if not taken:
                self._driver.disconnect(None, state)
                return None
            self._slots[index] = slot
            return state
        finally:
            self._end(holder, slot)

    def _borrow(self) -> Connection | None:
        """One of the pool's connections, ahead of the callers waiting, up to
        ``interval``; None if none came.  A borrower that keeps connections
        (``dbpool serve``'s front end) is asked for one back meanwhile."""
        lender = self._lender
        conn = lender.try_borrow()
        if conn is not None:
            return conn
        came = threading.Event()
        offered: list[Any] = []

        def offer(slot: Any, error: BaseException | None) -> None:
            offered.append(slot)
            came.set()

        try:
            waiter = lender.wait(offer, first=True)
        except Exception:  # the queue takes no waiters now
            return None
        with self._lock:
            self._asked = -1
        try:
            if not came.wait(self._interval) and lender.cancel_wait(waiter):
                return None
            came.wait()
        finally:
            with self._lock:
                self._asked = None
        return lender.take(offered[0]) if offered[0] is not None else None

    def asks_back(self, index: int) -> bool:
        """Whether the budget wants lent connection ``index`` back for a moment: while
        it waits for one to reserve with, it asks the first one this is called for."""
        if self._asked is None:  # the common case, without the lock
            return False
        with self._lock:
            if self._asked == -1:
                self._asked = index
            return self._asked == index

    def _end(self, holder: Connection, slot: int | None) -> None:
        """Let reservation ``slot`` (if any) go on ``holder``, and give it back."""
        if slot is not None:
            try:
                holder.driver_state.cursor.execute(_UNRESERVE, (self.key, self.size + slot))
            except psycopg.Error as exc:  # replaced: the reservation ends with its session
                holder.mark_broken(exc)
        self._lender.give_back(holder)

    def _reserve(self, holder: Connection) -> int | None:
        """Reserve a free slot on ``holder``; its number, or None."""
        state = holder.driver_state
        own = self._slots.get(holder.index, -1)
        try:
            row = state.cursor.execute(_RESERVE, {**self._params(), "own": own}).fetchone()
        except psycopg.Error as exc:
            logger.debug("%s: reserving a budget slot failed", self.name, exc_info=True)
            holder.mark_broken(exc)  # replaced: whatever it held ends with its session
            return None
        return None if row is None else int(row[0])

    def _take(self, state: PgState, slot: int) -> bool:
        """Take reserved ``slot`` on the new session ``state``."""
        deadline = time.monotonic() + _TAKE_WITHIN
        while True:
            row = state.cursor.execute(_TAKE, (self.key, slot)).fetchone()
            if row is not None and row[0]:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)

    def _params(self) -> dict[str, int]:
        return {"key": self.key, "size": self.size, "start": random.randrange(self.size)}

    def holds(self, state: PgState) -> bool:
        """Whether ``state``'s session still holds a slot of this budget."""
        try:
            row = state.cursor.execute(_HOLDS, (self.key, self.size)).fetchone()
        except psycopg.Error:
            return False
        return row is not None

    def forget(self, index: int) -> None:
        """Connection ``index`` is gone for good (the pool shrank or stopped)."""
        with self._lock:
            self._wanting.discard(index)
        self._slots.pop(index, None)

    def wanting(self) -> int:
        """How many of the pool's connections wait for a slot now."""
        with self._lock:
            return len(self._wanting)
