"""Recycling: which connections to replace though nothing is wrong with them.

``disconnect_all(interval)`` replaces every connection made before the call,
each at its own deterministic point of the interval (connection ``i`` at
``frac(i * golden ratio)`` of the way, an even stagger), so that the
database never sees them all reconnect at once; ``max_lifetime`` replaces a
connection once its drawn lifetime has passed; a drained pool replaces
(closes) every connection that comes back.  :class:`Recycler` answers
"why replace this one now?"; the checkin (:mod:`dbpool.pool.checkin`) and
the idle sweep ask it.
"""

from __future__ import annotations

import time

from dbpool.actors.slot import Slot

from .breaker import Breaker

__all__ = ["Recycler"]

_GOLDEN = 0.6180339887498949


class Recycler:
    """When to replace a healthy connection (see the module docstring)."""

    __slots__ = ("_breaker", "_flush", "recycling")

    def __init__(self, breaker: Breaker, max_lifetime: bool) -> None:
        self._breaker = breaker
        #: (start, interval) of the latest disconnect_all, if any.
        self._flush: tuple[float, float] | None = None
        #: Whether any connection may need recycling (read at every checkin).
        self.recycling = max_lifetime

    def disconnect_all(self, interval: float) -> None:
        """Recycle every connection made before now, staggered over ``interval`` seconds."""
        self._flush = (time.monotonic(), max(interval, 0.0))
        self.recycling = True

    def reason(self, slot: Slot) -> str | None:
        """Why the slot's connection should be replaced now, if it should."""
        if self._breaker.drained:
            return "the pool was drained"
        now = time.monotonic()
        flush = self._flush
        if flush is not None:
            start, interval = flush
            if slot.connected_at <= start and now >= start + interval * (
                (slot.index * _GOLDEN) % 1.0
            ):
                return "disconnect_all"
        if now >= slot.expires_at:
            return "max_lifetime exceeded"
        return None
