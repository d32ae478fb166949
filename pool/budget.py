"""One connection budget across servers, kept by PostgreSQL itself.

Several ``dbpool serve`` processes (or in-process pools), on one host or
many, can share a ``max_server_connections`` for one database without any
other infrastructure: each of their connections holds a session-level
advisory lock on one of the budget's slots, ``(key, 0)`` to
``(key, max_server_connections - 1)``, where ``key`` comes from the
``budget_name``.  PostgreSQL releases a session's advisory locks when the
session ends, also when the process that held it died, so a killed
server's slots become free as soon as its sessions end, and the other
servers take them up.

A connection claims a slot right after it connects, before anyone may use
it (:meth:`Budget.claim`).  With none free it closes again, at once, and
its actor tries again after a backoff step; it counts as *wanting* a slot
meanwhile (:meth:`Budget.wanting`, in the pool's metrics as ``budget``).
The slots are tried from a random one, so that servers do not all contend
for slot 0.  An idle connection's ping checks that it still holds its slot
(:meth:`Budget.holds`): a session that released it
(``pg_advisory_unlock_all()``, ``DISCARD ALL``) is replaced.  In the
service, such statements run only in a transaction of one client, whose
connection is replaced when it ends.
"""

from __future__ import annotations

import logging
import random
import threading
import zlib
from typing import Any

import psycopg

from dbpool.errors import ConfigurationError
from dbpool.pgdriver import PgDriver, PgState

__all__ = ["Budget"]

logger = logging.getLogger("dbpool.pool.budget")

_TRY = "SELECT pg_try_advisory_lock(%s, %s)"
# A two-number advisory lock shows in pg_locks as classid, objid, objsubid = 2.
_HOLDS = ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
          "AND pid = pg_backend_pid() AND classid = %s::oid AND objsubid = 2 "
          "AND objid < %s)")


class Budget:
    """The slots of budget ``name`` (``size`` of them) for one pool's connections."""

    def __init__(self, name: str, size: int, driver: Any) -> None:
        if not isinstance(driver, PgDriver):
            raise ConfigurationError(
                "max_server_connections needs the psycopg driver (PgDriver): the budget is "
                f"held as PostgreSQL advisory locks, not with {type(driver).__name__}")
        self.name = name
        self.size = size
        #: The first number of the budget's advisory locks (a signed 32-bit int).
        self.key = zlib.crc32(f"dbpool budget {name}".encode()) & 0x7FFFFFFF
        self._lock = threading.Lock()
        self._wanting: set[int] = set()

    def claim(self, index: int, state: PgState) -> bool:
        """Take a free slot for connection ``index`` on its new session; False if none
        is free (the caller closes the session).  A database error propagates."""
        start = random.randrange(self.size)
        cursor = state.cursor
        for step in range(self.size):
            cursor.execute(_TRY, (self.key, (start + step) % self.size))
            row = cursor.fetchone()
            if row is not None and row[0]:
                with self._lock:
                    self._wanting.discard(index)
                return True
        with self._lock:
            self._wanting.add(index)
        return False

    def holds(self, state: PgState) -> bool:
        """Whether ``state``'s session still holds a slot of this budget."""
        try:
            row = state.cursor.execute(_HOLDS, (self.key, self.size)).fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])

    def forget(self, index: int) -> None:
        """Connection ``index`` is gone for good (the pool shrank or stopped)."""
        with self._lock:
            self._wanting.discard(index)

    def wanting(self) -> int:
        """How many of the pool's connections wait for a slot now."""
        with self._lock:
            return len(self._wanting)
