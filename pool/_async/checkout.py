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

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from ..connection import AsyncConnection, LostBeforeEffect
from ..loans import Location, caller_location
from ..logentry import LogFn
from ..transaction import AsyncTransaction

if TYPE_CHECKING:
    from ..core import AsyncHoldToken, PoolCore
    from ..ownership.owners import Owner

__all__ = ["AsyncCheckout", "AsyncPoolTransaction"]

T = TypeVar("T")


class AsyncCheckout:
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
        self._conn: AsyncConnection | None = None
        self._token: AsyncHoldToken | None = None

    async def __aenter__(self) -> AsyncConnection:
        core = self._core
        conn = await core.alend(self._timeout, self._queue, self._where or caller_location(),
                                self._caller)
        self._conn = conn
        if self._hold:
            self._token = core.ahold(conn)
        return conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            if self._token is not None:
                self._core.aunhold(self._token)
            await self._core.checkin.atake_back(conn)


class AsyncPoolTransaction:
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
        self._checkout: AsyncCheckout | None = None
        self._tx: AsyncTransaction | None = None

    async def __aenter__(self) -> AsyncConnection:
        core = self._core
        held = core.aheld_conn()
        if held is not None:  # nested: a pass-through on this caller's connection
            self._tx = AsyncTransaction(held, self._log)
            return await self._tx.__aenter__()
        retries = core.options.checkout_retries
        while True:
            checkout = AsyncCheckout(core, self._timeout, self._queue, self._where, hold=True,
                                     caller=self._caller)
            conn = await checkout.__aenter__()
            tx = AsyncTransaction(conn, self._log)
            try:
                await tx.__aenter__()
            except LostBeforeEffect:  # BEGIN found it closed by the server: take another
                await checkout.__aexit__(None, None, None)
                if retries <= 0:
                    raise
                retries -= 1
                continue
            except BaseException:
                await checkout.__aexit__(None, None, None)
                raise
            self._checkout, self._tx = checkout, tx
            return conn

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tx is not None
        try:
            await self._tx.__aexit__(exc_type, exc, tb)
        finally:
            if self._checkout is not None:
                await self._checkout.__aexit__(None, None, None)

    async def run(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``fn(conn)`` in this block: committed if it returns, rolled back if it raises."""
        async with self as conn:
            return await fn(conn)
