"""How a plain pool lends a connection to a caller that waits for one.

A checkout takes a slot from the queue (waiting, up to its deadline, if
there is none), the driver's checkout callback accepts it, and the core
makes it a loan (:meth:`~dbpool.pool.core.PoolCore.accept`).  A slot whose
connection died while idle is replaced by its actor and the caller takes
the next one.  A failed checkout emits the ``connection_error`` event and
raises the queue's :class:`~dbpool.errors.ConnectionError`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dbpool.errors import ConnectionError

if TYPE_CHECKING:
    from ..connection import AsyncConnection
    from ..core import PoolCore
    from ..loans import Location

__all__ = ["alend"]


async def alend(
    core: PoolCore, timeout: float, queue: bool, where: Location | None, caller: Any = None
) -> AsyncConnection:
    """Check out a connection (see :meth:`~dbpool.pool.pool.Pool.checkout`).

    ``caller`` is for the ownership pool, which lends the connection of that
    owner; a plain pool ignores it.
    """
    started = time.monotonic()
    try:
        while True:
            slot = await core.queue.aget(started, timeout, queue)
            conn = core.aaccept(slot, started, timeout, where)
            if conn is not None:
                return conn
    except ConnectionError as error:
        core.report_failure(error)
        raise
