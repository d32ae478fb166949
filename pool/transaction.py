"""Transactions on a lent connection: begin, commit, rollback and nesting.

DBConnection's ``transaction/3`` in Python form.  ``conn.transaction()``
returns a :class:`Transaction`, a context manager (``conn.transaction(fn)``
wraps ``fn(conn)`` in one):

- entering the outermost block sends ``BEGIN``;
- leaving it normally sends ``COMMIT``; leaving it by an exception sends
  ``ROLLBACK`` and lets the exception go on;
- ``conn.rollback(reason)`` leaves the innermost block at once: the block
  raises :class:`~dbpool.errors.RolledBack` carrying ``reason``;
- a block inside another (or ``pool.transaction`` inside a transaction of
  the same caller) is a pass-through: nothing is sent to the server.  If it
  rolls back, the connection is marked *failed*: every later call but
  ``close`` raises ``ConnectionError("transaction rolling back ...")`` and the
  outermost block ends with ``ROLLBACK`` and ``RolledBack("rollback")``
  (unless an exception is already leaving it);
- a transaction that failed on the server (a SQL error inside it, status
  ``"error"``) cannot commit: it is rolled back and raises
  ``RolledBack("rollback")``;
- ``BEGIN`` on a connection not idle, or ``COMMIT`` on one not in a
  transaction, raises :class:`~dbpool.errors.TransactionError` with the
  status found, and the connection is replaced;
- a ``ROLLBACK`` that finds the connection lost, or not in a transaction,
  has the connection replaced, and the block ends as it would have
  (``RolledBack``, or the exception leaving it); it is logged all the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from dbpool.driver import Error, WrongStatus
from dbpool.errors import ConnectionError, RolledBack, TransactionError

from .logentry import LogFn

if TYPE_CHECKING:
    from .connection import AsyncConnection, Connection

__all__ = ["AsyncTransaction", "RollbackSignal", "Transaction"]

T = TypeVar("T")


class RollbackSignal(BaseException):
    """Raised by ``conn.rollback(reason)``; the innermost transaction turns it into RolledBack.

    A BaseException, so that ``except Exception`` in the caller's code does not
    swallow it on its way out, as DBConnection's ``throw`` would not be.
    """

    def __init__(self, reason: object) -> None:
        super().__init__(reason)
        self.reason = reason


class Transaction:
    """A transaction block on one lent connection.  See the module docstring."""

    __slots__ = ("_conn", "_log", "_outermost")

    def __init__(self, conn: Connection, log: LogFn | None = None) -> None:
        self._conn = conn
        self._log = log
        self._outermost = False

    def __enter__(self) -> Connection:
        conn = self._conn
        tracked = conn._tracking()
        if tracked.depth == 0:
            self._send("begin")
            self._outermost = True
        tracked.depth += 1
        return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        tracked = conn._tracking()
        tracked.depth -= 1
        if not self._outermost:
            if isinstance(exc, RollbackSignal):
                tracked.failed = True
                raise RolledBack(exc.reason) from None
            if exc is not None:
                tracked.failed = True  # the outer block can only roll back now
                return
            if tracked.failed:
                raise RolledBack("rollback")
            return
        failed, tracked.failed = tracked.failed, False
        if isinstance(exc, RollbackSignal):
            self._roll_back(quietly=False)
            raise RolledBack(exc.reason) from None
        if exc is not None:
            self._roll_back(quietly=True)
            return
        # An inner rollback, a lost connection, or a statement that failed
        # inside (status "error"): there is nothing to commit.
        if failed or conn._broken is not None or conn.status() == "error":
            self._roll_back(quietly=False)
            raise RolledBack("rollback")
        try:
            self._send("commit")
        except TransactionError as error:
            if error.status != "error" or conn._broken is not None:
                raise
            # The driver found the transaction failed: as DBConnection does,
            # roll it back and keep the connection.
            self._roll_back(quietly=False)
            raise RolledBack("rollback") from None

    def _send(self, call: str) -> Any:
        """BEGIN, COMMIT or ROLLBACK; TransactionError if the status does not allow it.

        The connection is then replaced, except for a COMMIT refused because
        the transaction failed (status ``"error"``), which the caller rolls back.
        """
        conn = self._conn
        callback = getattr(conn._driver, f"handle_{call}")

        def run(opts: Any, state: Any) -> Any:
            outcome = callback(opts, state)
            if isinstance(outcome, WrongStatus):
                error = TransactionError(_wrong_status(call, outcome.status),
                                         status=outcome.status)
                if not (call == "commit" and outcome.status == "error"):
                    conn.mark_broken(error)  # its state is not what we think: replace it
                return Error(error)  # raised by the caller, after the log entry
            return outcome

        return conn._call(call, call.upper(), None, self._log, run, while_failed=True)

    def _roll_back(self, quietly: bool) -> None:
        """Send ROLLBACK and log it, even on a lost connection (whose checkin replaces it).

        A connection lost, or found not in a transaction, is replaced and the
        block ends as it would have (DBConnection's rule); another error is
        raised.  ``quietly``: an exception is already leaving the block and
        stays the one raised; a failed rollback then only marks the
        connection broken.
        """
        try:
            self._send("rollback")
        except (ConnectionError, TransactionError):  # the slot is broken already
            pass
        except Exception:
            if not quietly:
                raise
            self._conn.mark_broken(RuntimeError("rollback failed"))


def _wrong_status(call: str, status: str) -> str:
    """DBConnection's TransactionError messages, naming the call that met them."""
    return f"cannot {call}: " + {
        "idle": "transaction is not started",
        "transaction": "transaction is already started",
        "error": "transaction is aborted",
    }[status]


class AsyncTransaction:
    """A transaction block for asyncio: :class:`Transaction` with its I/O on a worker thread."""

    def __init__(self, conn: AsyncConnection, log: LogFn | None = None) -> None:
        self._conn = conn
        self._tx = Transaction(conn.sync, log)

    async def __aenter__(self) -> AsyncConnection:
        await self._conn._in_thread(self._tx.__enter__)
        return self._conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._conn._in_thread(self._tx.__exit__, exc_type, exc, tb)

    async def run(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self as conn:
            return await fn(conn)
