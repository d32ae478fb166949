"""Restart intensity, the one piece of an OTP supervisor that pykka lacks.

The pool actor supervises its connection actors.  When one crashes, the pool
asks :meth:`RestartIntensity.allow`; as long as no more than
``max_restarts`` restarts happened in the last ``max_seconds`` it restarts
the actor, otherwise the pool stops with an error that its monitors see.
The defaults (3 in 5 s) are DBConnection's, which are OTP's.
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["RestartIntensity"]


class RestartIntensity:
    """Counts restarts in a sliding window of ``max_seconds``."""

    def __init__(self, max_restarts: int = 3, max_seconds: float = 5.0) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._restarts: deque[float] = deque()

    def allow(self, now: float | None = None) -> bool:
        """Record a restart and say whether it is within the intensity."""
        now = time.monotonic() if now is None else now
        while self._restarts and self._restarts[0] <= now - self.max_seconds:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True
