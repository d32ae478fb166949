"""The slot: one connection's state as it moves between its actor and callers.

A slot is DBConnection's holder.  At any moment exactly one party owns it:
its connection actor (connecting, pinging, disconnecting), the pool's idle
queue, or the one caller it is lent to.  Ownership changes hands only
through the checkout queue or a message to the actor, so the driver state
inside is never used by two threads at once and needs no lock of its own.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Slot"]


class Slot:
    """One connection of a pool.  Attributes are read by the pool's sweeps."""

    __slots__ = (
        "actor",
        "backend_pid",
        "broken",
        "connected_at",
        "driver",
        "driver_state",
        "expires_at",
        "generation",
        "idle_since",
        "index",
        "lent_at",
    )

    def __init__(self, index: int, driver: Any = None) -> None:
        #: The position in the pool, 0..pool_size-1; stable across reconnects.
        self.index = index
        #: The connection actor's ActorRef (set when the actor starts).
        self.actor: Any = None
        #: The driver that callers use on ``driver_state``: the pool's, unless an
        #: ownership proxy's ``post_checkout`` swapped both while it holds the slot.
        self.driver: Any = driver
        #: The driver's state while connected, else None.
        self.driver_state: Any = None
        #: The server process of the current (or last) connection, if the driver says.
        self.backend_pid: int | None = None
        #: Bumped on every successful connect; tells a stale handle from a live one.
        self.generation = 0
        self.idle_since = 0.0
        #: When the current connection was made (monotonic).
        self.connected_at = 0.0
        #: When ``max_lifetime`` retires the current connection (monotonic).
        self.expires_at = float("inf")
        #: When it was lent (monotonic), or None while not lent.
        self.lent_at: float | None = None
        #: Why the current borrower found the connection unusable, if it did.
        self.broken: BaseException | None = None

    def mark_connected(self, driver_state: Any, lifetime: float = float("inf")) -> None:
        now = time.monotonic()
        self.driver_state = driver_state
        self.backend_pid = getattr(driver_state, "backend_pid", None)
        self.generation += 1
        self.connected_at = self.idle_since = now
        self.expires_at = now + lifetime
        self.broken = None

    def __repr__(self) -> str:
        connected = self.driver_state is not None
        return f"<Slot {self.index} gen={self.generation} connected={connected}>"
