"""Elastic sizing: when a pool with ``min_size < max_size`` grows and shrinks.

HikariCP keeps a minimum and a maximum; asyncpg and psycopg_pool users ask
for the same.  The pool actor asks :func:`next_size` every ``queue_target``
seconds, with what it sees, and resizes to the answer (growing opens a
connection in the background; shrinking retires the highest indexes, idle
ones at once and lent ones at checkin, as :meth:`~dbpool.pool.Pool.resize`
does):

- **grow** by one while the longest waiting checkout has waited more than
  ``queue_target``, every connection of the current size is up (one at a
  time: the last one grown must have connected), and the pool is healthy
  (circuit closed, not paused): a database that refuses connections gets
  no more of them;
- **shrink** by the fewest connections that were idle at any of its looks
  over the last ``max_idle`` seconds (:class:`IdleWindow`): that many were
  not needed all that time.  Down to ``min_size``, while nobody waits, and
  only once the window covers ``max_idle`` since the last change.  (As
  psycopg_pool judges it, but over a sliding window, and without a cost on
  the checkout path: the pool actor counts at its looks.)

Each change is a :class:`~dbpool.actors.listeners.ResizeEvent` to the
listeners, telemetry's ``resize`` event, and the ``grown`` or ``shrunk``
counter of the pool's metrics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["IdleWindow", "Sizing", "next_size"]


@dataclass(frozen=True, slots=True)
class Sizing:
    """What the pool actor sees when it asks (see the module docstring)."""

    size: int
    min_size: int
    max_size: int
    #: Connections up now.
    up: int
    #: Circuit closed and not paused.
    healthy: bool
    #: Seconds the longest waiting checkout has waited (0 if none waits).
    longest_wait: float
    queue_target: float
    #: Connections idle throughout the last ``max_idle`` (see IdleWindow).
    unused: int


def next_size(seen: Sizing) -> int:
    """The size the pool should have now."""
    if seen.longest_wait > 0:
        if (seen.longest_wait > seen.queue_target and seen.size < seen.max_size
                and seen.healthy and seen.up >= seen.size):
            return seen.size + 1
        return seen.size
    return max(seen.min_size, seen.size - seen.unused)


class IdleWindow:
    """The idle counts the pool actor saw over the last ``span`` seconds."""

    def __init__(self, span: float, now: float) -> None:
        self.span = span
        self._since = now
        #: (when, idle count), oldest first; each count lower than every later one.
        self._lows: deque[tuple[float, int]] = deque()

    def sample(self, now: float, idle: int) -> None:
        lows = self._lows
        while lows and lows[-1][1] >= idle:  # a later, lower count hides it
            lows.pop()
        lows.append((now, idle))
        while lows[0][0] < now - self.span:
            lows.popleft()

    def low(self, now: float) -> int:
        """The fewest idle seen over the whole last ``span`` (0 until it covers it)."""
        if now - self._since < self.span or not self._lows:
            return 0
        return self._lows[0][1]

    def restart(self, now: float) -> None:
        """The size changed: judge afresh from now."""
        self._since = now
        self._lows.clear()
