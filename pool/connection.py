"""The lent connection: what a caller holds between checkout and checkin.

A :class:`Connection` runs driver callbacks directly on the caller's thread;
nothing goes through an actor.  It is valid only until its checkout ends:
after that every call raises ``ConnectionError`` ("outdated connection")
rather than touch a connection that may now be another caller's.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn, TypeVar

from dbpool.actors.slot import Slot
from dbpool.driver import Error, Ok, Outcome, Params, Query, Result
from dbpool.errors import ConnectionError, TransactionStatus

from .core import PoolCore

__all__ = ["Connection"]

logger = logging.getLogger("dbpool.pool")

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
        """End the loan and return the slot, never dirty.

        A connection left inside a transaction (open or failed) is rolled
        back; if that fails, the slot is marked broken so that it is replaced.
        """
        slot = self._slot
        if self._open and slot.broken is None:
            self._roll_back_if_dirty(slot)
        self._open = False
        return slot

    def _roll_back_if_dirty(self, slot: Slot) -> None:
        driver, state = self._core.driver, slot.driver_state
        status = driver.handle_status(_NO_OPTS, state)
        if not isinstance(status, Ok):
            slot.broken = status.error
            return
        if status.value == "idle":
            return
        outcome = driver.handle_rollback(_NO_OPTS, state)
        if isinstance(outcome, Ok):
            logger.warning("%s: connection %d was checked in with status %r; rolled back",
                           self._core.name, slot.index, status.value)
            return
        slot.broken = getattr(outcome, "error", None) or ConnectionError(
            f"connection checked in with status {status.value!r} could not be rolled back")

    def __repr__(self) -> str:
        state = "open" if self._open else "ended"
        return f"<dbpool Connection {self._core.name}#{self._slot.index} {state}>"
