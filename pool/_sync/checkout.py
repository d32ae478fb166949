# Generated from pool/_async/checkout.py by .ci/generate_sync.py (the unasync
# package's rewrite of async code as sync code): do not edit; edit the
# source and run `python .ci/generate_sync.py`.  CI fails when this file is stale.
"""The context managers of a checkout and of a pool transaction.

:class:`AsyncCheckout` lends one connection for the length of a block and
hands it to the checkin at the end.  With ``hold`` (run and transaction),
calls on the pool from the same thread or task use its connection while it
is open; a plain checkout does not hold, so the pool's other calls still
take connections of their own.

:class:`AsyncPoolTransaction` is a checkout and a transaction on it, or,
inside another block holding a connection, a pass-through transaction on
that connection (see :mod:`dbpool.pool.transaction` for the nesting rules).
A ``BEGIN`` that finds the connection closed by the server is retried on
another connection, up to the pool's ``checkout_retries``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from ..connection import Connection, LostBeforeEffect
from ..loans import Location, caller_location
from ..logentry import LogFn
from ..transaction import Transaction

if TYPE_CHECKING:
    from ..core import HoldToken, PoolCore
    from ..ownership.owners import Owner

__all__ = ["Checkout", "PoolTransaction"]

T = TypeVar("T")


class Checkout:
    """What :meth:`~dbpool.pool.pool.Pool.checkout` returns (see the module docstring)."""

    __slots__ = ("_caller", "_conn", "_core", "_hold", "_queue", "_timeout", "_token", "_where")

    def __init__(
        self, core: PoolCore, timeout: float | None, queue: bool | None,
        where: Location | None = None, hold: bool = False, caller: Owner | None = None,
    ) -> None:
        self._core = core
        self._caller = caller
        self._hold = hold
        self._timeout = core.options.timeout if timeout is None else timeout
        self._queue = core.options.queue if queue is None else queue
        self._where = where
        self._conn: Connection | None = None
        self._token: HoldToken | None = None

    def __enter__(self) -> Connection:
        core = self._core
        conn = core.lend(self._timeout, self._queue, self._where or caller_location(),
                                self._caller)
        self._conn = conn
        if self._hold:
            self._token = core.hold(conn)
        return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            if self._token is not None:
                self._core.unhold(self._token)
            self._core.checkin.take_back(conn)


class PoolTransaction:
    """What :meth:`~dbpool.pool.pool.Pool.transaction` returns: a checkout (unless
    nested) and a transaction on it."""

    def __init__(
        self, core: PoolCore, log: LogFn | None, where: Location | None,
        timeout: float | None, queue: bool | None, caller: Owner | None = None,
    ) -> None:
        self._core = core
        self._log = log
        self._where = where
        self._timeout = timeout
        self._queue = queue
        self._caller = caller
        self._checkout: Checkout | None = None
        self._tx: Transaction | None = None

    def __enter__(self) -> Connection:
        core = self._core
        held = core.held_conn()
        if held is not None:  # nested: a pass-through on this caller's connection
            self._tx = Transaction(held, self._log)
            return self._tx.__enter__()
        retries = core.options.checkout_retries
        while True:
            checkout = Checkout(core, self._timeout, self._queue, self._where, hold=True,
                                     caller=self._caller)
            conn = checkout.__enter__()
            tx = Transaction(conn, self._log)
            try:
                tx.__enter__()
            except LostBeforeEffect:  # BEGIN found it closed by the server: take another
                checkout.__exit__(None, None, None)
                if retries <= 0:
                    raise
                retries -= 1
                continue
            except BaseException:
                checkout.__exit__(None, None, None)
                raise
            self._checkout, self._tx = checkout, tx
            return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tx is not None
        try:
            self._tx.__exit__(exc_type, exc, tb)
        finally:
            if self._checkout is not None:
                self._checkout.__exit__(None, None, None)

    def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn(conn)`` in this block: committed if it returns, rolled back if it raises."""
        with self as conn:
            return fn(conn)
