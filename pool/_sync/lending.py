# Generated from pool/_async/lending.py by .ci/generate_sync.py (the unasync
# package's rewrite of async code as sync code): do not edit; edit the
# source and run `python .ci/generate_sync.py`.  CI fails when this file is stale.
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
    from ..connection import Connection
    from ..core import PoolCore
    from ..loans import Location

__all__ = ["lend"]


def lend(
    core: PoolCore, timeout: float, queue: bool, where: Location | None, caller: Any = None
) -> Connection:
    """Check out a connection (see :meth:`~dbpool.pool.pool.Pool.checkout`).

    ``caller`` is for the ownership pool, which lends the connection of that
    owner; a plain pool ignores it.
    """
    started = time.monotonic()
    try:
        while True:
            slot = core.queue.get(started, timeout, queue)
            conn = core.accept(slot, started, timeout, where)
            if conn is not None:
                return conn
    except ConnectionError as error:
        core.report_failure(error)
        raise
