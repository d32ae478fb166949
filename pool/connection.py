"""The lent connection: what a caller holds between checkout and checkin.

A :class:`Connection` runs driver callbacks directly on the caller's thread;
nothing goes through an actor.  It is valid only until its checkout ends:
after that every call raises ``ConnectionError`` ("outdated connection")
rather than touch a connection that may now be another caller's.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

from dbpool.actors.slot import Slot
from dbpool.driver import Error, Ok, Outcome, Params, Query, Result
from dbpool.errors import ConnectionError, TransactionStatus

from .core import PoolCore

__all__ = ["Connection"]

T = TypeVar("T")
_NO_OPTS: dict[str, Any] = {}


class Connection:
    """A connection lent to the current caller.  Not thread-safe: one borrower."""

    __slots__ = ("_core", "_generation", "_open", "_slot")

    def __init__(self, core: PoolCore, slot: Slot) -> None:
        self._core = core
        self._slot = slot
        self._generation = slot.generation
        self._open = True

    # -- queries ---------------------------------------------------------

    def query(self, sql: str, params: Params = None) -> Result:
        """Run one statement and return its :class:`~dbpool.driver.Result`.

        A SQL error raises the ``psycopg.errors`` class the server reported
        and leaves the connection usable.
        """
        return self._unwrap(self._core.driver.handle_execute(
            Query(sql), params, _NO_OPTS, self._state()))

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
        slot = self._slot
        if not self._open or slot.generation != self._generation:
            raise ConnectionError(
                "outdated connection: its checkout has ended, so it may now serve another caller")
        if slot.broken is not None:
            raise ConnectionError(
                "connection is closed because of an error, disconnect or timeout")
        return slot.driver_state

    def _unwrap(self, outcome: Outcome[T]) -> T:
        if isinstance(outcome, Ok):
            return outcome.value
        if isinstance(outcome, Error):
            raise outcome.error
        self._lose(outcome.error)

    def _lose(self, error: BaseException) -> NoReturn:
        """The driver says the connection is gone: mark it for reconnect and raise."""
        self._slot.broken = error
        raise ConnectionError(f"connection lost: {' '.join(str(error).split())}") from error

    def _end(self) -> Slot:
        """End the loan; the caller gives the returned slot back."""
        self._open = False
        return self._slot

    def __repr__(self) -> str:
        state = "open" if self._open else "ended"
        return f"<dbpool Connection {self._core.name}#{self._slot.index} {state}>"
