# Generated from pool/ownership/_async/lending.py by .ci/generate_sync.py (the unasync
# package's rewrite of async code as sync code): do not edit; edit the
# source and run `python .ci/generate_sync.py`.  CI fails when this file is stale.
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
    from ...connection import Connection
    from ...loans import Location
    from ..core import OwnershipCore
    from ..proxy import Proxy

__all__ = ["lend", "lend_from"]


def lend(
    core: OwnershipCore, timeout: float, queue: bool, where: Location | None, caller: Any = None
) -> Connection:
    """Check out the connection of ``caller`` (the current owner by default)."""
    started = time.monotonic()
    try:
        while True:
            proxy = core.proxy_for(caller, where)
            try:
                return lend_from(proxy, started, timeout, queue, where)
            except ProxyGone:
                core.check_time_left(started, timeout)
    except ConnectionError as error:
        core.report_failure(error)
        raise


def lend_from(
    proxy: Proxy, started: float, timeout: float, queue: bool, where: Location | None
) -> Connection:
    """Lend the proxy's connection to this caller, taking one from the pool if needed.

    Raises :class:`~dbpool.pool.ownership.proxy.ProxyGone` if the proxy ends
    meanwhile.
    """
    while True:
        if proxy.claim_acquire():
            _take(proxy, started, timeout, queue)
        try:
            slot = proxy.queue.get(started, timeout, queue)
        except Reacquire:
            continue
        return proxy.lend_slot(slot, started, timeout, where)


def _take(proxy: Proxy, started: float, timeout: float, queue: bool) -> None:
    """Take a connection from the pool for the proxy (this caller claimed the taking)."""
    pool_queue = proxy.core.queue
    try:
        slot = pool_queue.get(started, timeout, queue)
        while not proxy.usable(slot):
            slot = pool_queue.get(started, timeout, queue)
    except BaseException:
        proxy.acquire_failed()
        raise
    proxy.install(slot)
