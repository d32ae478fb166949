"""Reconnect backoff, as DBConnection.Backoff computes it (in seconds).

Types:

- ``"stop"``: no retry; :func:`new` returns None and the failure propagates.
- ``"exp"``: ``min, 2*min, 4*min, ...`` capped at ``max``.
- ``"rand"``: uniform in ``[min, max]`` every time.
- ``"rand_exp"`` (default): decorrelated jitter.  Each delay is uniform in
  ``[min(prev, lower), min(3*prev, max)]`` where ``lower = max(min, max/3)``
  and ``prev`` is the previous delay (``min`` after a reset).

DBConnection draws whole milliseconds; so does this module, returning
seconds, so the sequences are the same numbers divided by 1000.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, cast

from dbpool.errors import ConfigurationError

__all__ = ["DEFAULT_MAX", "DEFAULT_MIN", "Backoff", "BackoffType", "new"]

BackoffType = Literal["stop", "exp", "rand", "rand_exp"]
DEFAULT_MIN = 1.0
DEFAULT_MAX = 30.0
_TYPES = ("stop", "exp", "rand", "rand_exp")


@dataclass(slots=True)
class Backoff:
    """Backoff state for one connection.  Not thread-safe; one owner only."""

    type: BackoffType
    min_ms: int
    max_ms: int
    rng: random.Random = field(default_factory=random.Random, repr=False)
    # exp: the previous delay (None before the first); rand_exp: (prev, lower).
    _state: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.reset()

    @property
    def min(self) -> float:
        return self.min_ms / 1000

    @property
    def max(self) -> float:
        return self.max_ms / 1000

    def next(self) -> float:
        """Return the next delay in seconds and advance the state."""
        if self.type == "rand":
            return self._rand(self.min_ms, self.max_ms) / 1000
        if self.type == "exp":
            prev = cast(int | None, self._state)
            delay = self.min_ms if prev is None else min(prev * 2, self.max_ms)
            self._state = delay
            return delay / 1000
        prev, lower = cast(tuple[int, int], self._state)
        delay = self._rand(min(prev, lower), min(prev * 3, self.max_ms))
        self._state = (delay, lower)
        return delay / 1000

    def reset(self) -> None:
        """Start again from the shortest delay (after a successful connect)."""
        if self.type == "exp":
            self._state = None
        elif self.type == "rand_exp":
            self._state = (self.min_ms, max(self.min_ms, self.max_ms // 3))

    def _rand(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)


def new(
    backoff_type: str = "rand_exp",
    backoff_min: float | None = None,
    backoff_max: float | None = None,
    *,
    rng: random.Random | None = None,
) -> Backoff | None:
    """Validate the options and return a :class:`Backoff`, or None for ``"stop"``.

    As in DBConnection, giving only one bound moves the other default out of
    its way: ``backoff_max=0.5`` alone means ``min=0.5``; ``backoff_min=60``
    alone means ``max=60``.

    Raises :class:`~dbpool.errors.ConfigurationError` for an unknown type, a
    negative or non-numeric bound, or ``min > max``.
    """
    if backoff_type not in _TYPES:
        raise ConfigurationError(
            f"unknown backoff_type {backoff_type!r}; expected one of {', '.join(_TYPES)}"
        )
    if backoff_type == "stop":
        return None
    low, high = _min_max(backoff_min, backoff_max)
    low_ms, high_ms = _millis("minimum", low), _millis("maximum", high)
    if low_ms > high_ms:
        raise ConfigurationError(f"backoff minimum {low} is greater than maximum {high}")
    return Backoff(cast(BackoffType, backoff_type), low_ms, high_ms, rng or random.Random())


def _min_max(low: float | None, high: float | None) -> tuple[float, float]:
    if low is None and high is None:
        return DEFAULT_MIN, DEFAULT_MAX
    if low is None:
        assert high is not None
        return min(DEFAULT_MIN, high), high
    if high is None:
        return low, max(low, DEFAULT_MAX)
    return low, high


def _millis(which: str, seconds: float) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ConfigurationError(f"backoff {which} {seconds!r} is not 0 or a positive number")
    return round(seconds * 1000)
