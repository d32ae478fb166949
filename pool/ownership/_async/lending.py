"""How an ownership pool lends a connection: through the caller's proxy.

The pool finds the proxy of the caller's connection (making one in auto
mode); the proxy lends its connection to its clients in turn.  The first
client that needs a connection takes one from the pool for the proxy,
``post_checkout`` runs on it, and then it waits its turn in the proxy's
one-slot queue like the others.  A proxy that ends while a caller is on its
way in sends it back to look its owner up again, within its deadline.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dbpool.errors import ConnectionError

from ..proxy import ProxyGone, Reacquire

if TYPE_CHECKING:
    from ...connection import AsyncConnection
    from ...loans import Location
    from ..core import OwnershipCore
    from ..proxy import Proxy

__all__ = ["alend", "alend_from"]


async def alend(
    core: OwnershipCore, timeout: float, queue: bool, where: Location | None, caller: Any = None
) -> AsyncConnection:
    """Check out the connection of ``caller`` (the current owner by default)."""
    started = time.monotonic()
    try:
        while True:
            proxy = core.proxy_for(caller, where)
            try:
                return await alend_from(proxy, started, timeout, queue, where)
            except ProxyGone:
                core.check_time_left(started, timeout)
    except ConnectionError as error:
        core.report_failure(error)
        raise


async def alend_from(
    proxy: Proxy, started: float, timeout: float, queue: bool, where: Location | None
) -> AsyncConnection:
    """Lend the proxy's connection to this caller, taking one from the pool if needed.

    Raises :class:`~dbpool.pool.ownership.proxy.ProxyGone` if the proxy ends
    meanwhile.
    """
    while True:
        if proxy.claim_acquire():
            await _atake(proxy, started, timeout, queue)
        try:
            slot = await proxy.queue.aget(started, timeout, queue)
        except Reacquire:
            continue
        return proxy.alend_slot(slot, started, timeout, where)


async def _atake(proxy: Proxy, started: float, timeout: float, queue: bool) -> None:
    """Take a connection from the pool for the proxy (this caller claimed the taking)."""
    pool_queue = proxy.core.queue
    try:
        slot = await pool_queue.aget(started, timeout, queue)
        while not proxy.usable(slot):
            slot = await pool_queue.aget(started, timeout, queue)
    except BaseException:
        proxy.acquire_failed()
        raise
    await proxy.ainstall(slot)
