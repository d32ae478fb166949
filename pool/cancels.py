"""Cancels sent without waiting: at most :data:`CANCEL_THREADS` threads send them.

A cancel is a new connection to the server and may wait on the network (up
to the driver's own timeout).  A revoke at a deadline and ``dbpool serve``'s
timeouts must not wait for it, and a partition must not pile up threads:
:meth:`Canceller.cancel` prepares the cancel at once (``driver.prepare_cancel``,
no I/O, so the connection may be closed right after) and hands the sending
to a small pool of threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

__all__ = ["CANCEL_THREADS", "Canceller"]

logger = logging.getLogger("dbpool.pool")

#: Threads that send cancels, at most.
CANCEL_THREADS = 4


class Canceller:
    """The cancel threads of one pool (see the module docstring)."""

    __slots__ = ("_threads",)

    def __init__(self, name: str) -> None:
        self._threads = ThreadPoolExecutor(CANCEL_THREADS, thread_name_prefix=f"{name}-cancel")

    def cancel(self, driver: Any, state: Any) -> None:
        """Cancel the statement running on a connection, without waiting for it."""
        self.send(self.prepare(driver, state))

    def prepare(self, driver: Any, state: Any) -> Callable[[], object] | None:
        """The cancel of the statement running on a connection, made now (no I/O), to
        :meth:`send` later, even after the connection is closed; None if it cannot
        be made."""
        prepare = getattr(driver, "prepare_cancel", None)
        try:
            send: Callable[[], object] = (
                prepare(state) if prepare is not None else partial(driver.cancel, state))
        except Exception:
            logger.debug("preparing a cancel failed", exc_info=True)
            return None
        return send

    def send(self, send: Callable[[], object] | None) -> None:
        """Send a cancel :meth:`prepare` made, on a cancel thread."""
        if send is None:
            return
        try:
            self._threads.submit(_send, send)
        except RuntimeError:  # shut down: the pool is stopping
            pass

    def shutdown(self) -> None:
        """Send no more (the pool stopped); cancels on their way may finish."""
        self._threads.shutdown(wait=False, cancel_futures=True)


def _send(send: Callable[[], object]) -> None:
    try:
        send()
    except Exception as error:  # the statement may have ended; the network may be down
        logger.debug("a cancel failed: %s", error)
