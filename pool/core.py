"""What a pool's parts share: the driver, the options and the checkout queue.

:class:`PoolCore` is the meeting point of the pool actor (lifecycle), the
connection actors (via the release callback) and callers (checkout and
checkin on their own threads).  It holds no policy of its own beyond
checkin: where a returned slot goes next.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from dbpool import telemetry
from dbpool.actors.listeners import ConnectionEvent, Listener, deliver, normalize
from dbpool.actors.messages import Reconnect
from dbpool.actors.scheduler import Scheduler
from dbpool.actors.slot import Slot
from dbpool.driver import Driver

from .options import PoolOptions
from .queue import CheckoutQueue

__all__ = ["PoolCore"]

logger = logging.getLogger("dbpool.pool")

Monitor = Callable[[BaseException | None], object]


class PoolCore:
    """The state one pool's actors and callers share."""

    def __init__(self, driver: Driver[Any], options: PoolOptions) -> None:
        self.name = options.name
        self.driver = driver
        self.options = options
        self.queue = CheckoutQueue()
        self.scheduler = Scheduler(name=f"{options.name}-scheduler")
        self.listeners: tuple[Listener, ...] = normalize(options.connection_listeners)
        self.stopped = threading.Event()
        #: Why the pool stopped: None for a requested stop, else the error.
        self.exit_error: BaseException | None = None
        self._monitors: list[Monitor] = []
        self._monitor_lock = threading.Lock()

    def checkin(self, slot: Slot) -> None:
        """Take back a lent slot: broken ones to their actor, good ones to the queue."""
        if slot.broken is not None:
            slot.lent_at = None
            self.reconnect(slot, slot.broken)
        elif not self.queue.put(slot):
            self.dispose(slot)

    def reconnect(self, slot: Slot, error: BaseException) -> None:
        """Have the slot's actor drop the connection and connect again at once."""
        try:
            slot.actor.tell(Reconnect(slot, slot.generation, error))
        except Exception:  # the actor is gone: the pool is stopping
            self.dispose(slot)

    def dispose(self, slot: Slot) -> None:
        """Close a slot's connection here and now (the pool is stopping)."""
        state, slot.driver_state = slot.driver_state, None
        if state is not None:
            self.driver.disconnect(self.queue.closed, state)

    # -- events ----------------------------------------------------------

    def deliver(self, event: ConnectionEvent) -> None:
        """Give a connection event to the listeners and to telemetry."""
        deliver(self.listeners, event)
        telemetry.emit(event.kind, {"count": 1}, {"pool": self.name, "event": event})

    # -- monitors --------------------------------------------------------

    def add_monitor(self, monitor: Monitor) -> None:
        """Call ``monitor(exit_error)`` once the pool has stopped (at once if it has)."""
        with self._monitor_lock:
            if not self.stopped.is_set():
                self._monitors.append(monitor)
                return
        _call_monitor(monitor, self.exit_error)

    def mark_stopped(self, error: BaseException | None) -> None:
        with self._monitor_lock:
            self.exit_error = error
            self.stopped.set()
            monitors, self._monitors = self._monitors, []
        for monitor in monitors:
            _call_monitor(monitor, error)


def _call_monitor(monitor: Monitor, error: BaseException | None) -> None:
    try:
        monitor(error)
    except Exception:
        logger.exception("pool monitor %r raised", monitor)
