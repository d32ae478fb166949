"""The lent connection: what a caller holds between checkout and checkin.

A :class:`Connection` runs driver callbacks directly on the caller's thread;
nothing goes through an actor.  It is valid only until its loan ends, and a
loan ends exactly once, by whichever comes first:

- the caller checks it in (leaving the ``with`` block);
- its deadline passes: the pool cancels the running statement, gives the
  slot a fresh connection, and the caller's next call raises
  ``ConnectionError(reason="deadline")`` (the old connection is closed then,
  on the caller's own thread, so no two threads ever use it at once);
- it is abandoned: garbage-collected, or its thread ended, while lent.  The
  pool rolls it back and takes it back, and logs where it was checked out.

After that every call raises ``ConnectionError`` rather than touch a
connection that may now be another caller's.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from dbpool.actors.slot import Slot
from dbpool.driver import Error, Ok, Outcome, Params, Query, Result
from dbpool.errors import ConnectionError, TransactionStatus

from .loans import Loan

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["AsyncConnection", "Connection"]

T = TypeVar("T")
_NO_OPTS: dict[str, Any] = {}


class Connection:
    """A connection lent to the current caller.  Not thread-safe: one borrower."""

    __slots__ = ("_core", "_driver_state", "_loan", "_slot")

    def __init__(self, core: PoolCore, slot: Slot, loan: Loan) -> None:
        self._core = core
        self._slot = slot
        self._loan = loan
        self._driver_state = slot.driver_state

    # -- queries ---------------------------------------------------------

    def query(self, sql: str, params: Params = None) -> Result:
        """Run one statement and return its :class:`~dbpool.driver.Result`.

        A SQL error raises the ``psycopg.errors`` class the server reported
        and leaves the connection usable.
        """
        outcome = self._core.driver.handle_execute(Query(sql), params, _NO_OPTS, self._state())
        if type(outcome) is Ok:  # the common case, without a call to _unwrap
            return outcome.value
        return self._unwrap(outcome)

    def status(self) -> TransactionStatus:
        """``"idle"``, ``"transaction"`` or ``"error"``."""
        return self._unwrap(self._core.driver.handle_status(_NO_OPTS, self._state()))

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL server process serving this connection."""
        pid: int | None = getattr(self._state(), "backend_pid", None)
        return pid

    @property
    def index(self) -> int:
        """The connection's position in its pool."""
        return self._slot.index

    # -- internals -------------------------------------------------------

    def _state(self) -> Any:
        if not self._loan.claim:
            self._raise_ended()
        if self._slot.broken is not None:
            raise ConnectionError(
                "connection is closed because of an error, disconnect or timeout")
        return self._driver_state

    def _raise_ended(self) -> NoReturn:
        revoked = self._loan.revoked
        if revoked is not None:
            self._close_revoked(revoked)
            raise revoked
        raise ConnectionError(
            "outdated connection: its checkout has ended, so it may now serve another caller")

    def _unwrap(self, outcome: Outcome[T]) -> T:
        if isinstance(outcome, Ok):
            return outcome.value
        if not self._loan.claim:  # revoked while the call ran (its deadline passed)
            self._raise_ended()
        if isinstance(outcome, Error):
            raise outcome.error
        self._lose(outcome.error)

    def _lose(self, error: BaseException) -> NoReturn:
        """The driver says the connection is gone: mark it for reconnect and raise."""
        self._slot.broken = error
        raise ConnectionError(f"connection lost: {' '.join(str(error).split())}") from error

    def _end(self) -> Slot | None:
        """End the loan: return the slot, cleaned, or None if the pool took it already.

        A connection left inside a transaction (open or failed) is rolled
        back; if that fails, the slot is marked broken so that it is replaced.
        """
        loan = self._loan
        try:
            loan.claim.pop()  # loan.take(), inlined: the hot path
        except IndexError:
            if loan.revoked is not None:
                self._close_revoked(loan.revoked)
            return None
        self._driver_state = None  # ours no longer; nothing below may close it
        core, slot = self._core, self._slot
        core.loans.pop(slot.index, None)  # core.forget(loan)
        core.clean(slot)
        return slot

    def _needs_cleaning(self) -> bool:
        """Whether checkin will have to roll back (which is I/O)."""
        if not self._loan.claim or self._slot.broken is not None:
            return False
        status = self._core.driver.handle_status(_NO_OPTS, self._driver_state)
        return not (isinstance(status, Ok) and status.value == "idle")

    def _close_revoked(self, error: BaseException) -> None:
        """Close the connection the deadline took from us, on this (its owner's) thread."""
        state, self._driver_state = self._driver_state, None
        if state is not None:
            self._core.driver.disconnect(error, state)

    def __del__(self) -> None:
        # Garbage-collected while lent: hand it back through the pool's watcher
        # (no I/O and no locks here: this may run in the middle of any code).
        loan = self._loan
        if loan.claim and loan.take():
            self._core.watcher.abandoned(loan, "it was garbage-collected while checked out")

    def __repr__(self) -> str:
        state = "lent" if self._loan.claim else "ended"
        return f"<dbpool Connection {self._core.name}#{self._slot.index} {state}>"


class AsyncConnection:
    """A lent connection for asyncio code: every call runs on a worker thread.

    The calls of one connection run one at a time, in order, so the event
    loop is never blocked by the database.
    """

    __slots__ = ("_conn", "_pending")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pending: asyncio.Future[Any] | None = None

    async def query(self, sql: str, params: Params = None) -> Result:
        """See :meth:`Connection.query`."""
        return await self._in_thread(self._conn.query, sql, params)

    async def status(self) -> TransactionStatus:
        """See :meth:`Connection.status`."""
        return await self._in_thread(self._conn.status)

    @property
    def backend_pid(self) -> int | None:
        return self._conn.backend_pid

    @property
    def index(self) -> int:
        return self._conn.index

    @property
    def sync(self) -> Connection:
        """The underlying :class:`Connection` (blocking calls; use in a thread)."""
        return self._conn

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, functools.partial(fn, *args))
        self._pending = future
        # Shielded: if the task is cancelled, the call still finishes before
        # checkin (see _settle), so two threads never share the connection.
        return await asyncio.shield(future)

    async def _settle(self) -> None:
        """Wait for a call abandoned by a cancelled task to finish."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            await asyncio.wait([pending])

    def __repr__(self) -> str:
        return f"<dbpool AsyncConnection {self._conn!r}>"
