"""Give the memory that departed clients leave behind back to the operating system.

Every client connection costs the server about 30 KB inside libzmq: its
pipes' message queues (chunks of 256 messages, 16 KB each) and its
engine's buffers.  libzmq allocates most of it on its I/O thread, so glibc
serves it from that thread's arena.  When the client leaves the memory is
freed, but glibc gives an arena's free memory back to the system only
from the top of its heap: the free pages between chunks still in use stay
resident.  Each wave of clients lands partly on free pages that the ones
before did not touch, so the RSS of a server with churning clients grows
round after round towards the arena's whole size (about 130 MB after
2,000 idle sockets) and never falls (``tests/faults/test_churn.py``).
Python objects play no part in it.

:func:`malloc_trim` (glibc's; absent elsewhere) returns those free pages
(``madvise(MADV_DONTNEED)``): about 5 ms for 55 MB, 0.1 ms when there is
little to return.  :class:`Trimmer` calls it from the front end's loop
after clients left: once none has left for :data:`QUIET` seconds, and
while they keep leaving, every :data:`INTERVAL` seconds.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import cast

__all__ = ["INTERVAL", "QUIET", "Trimmer", "malloc_trim"]

#: Seconds without a departure before the memory is given back.
QUIET = 0.2
#: While clients keep leaving, the longest time between two trims (seconds).
INTERVAL = 1.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


#: ``malloc_trim(pad)``: give free memory back to the system; None if unavailable.
malloc_trim = _find_malloc_trim()


class Trimmer:
    """Decides when the front end gives freed memory back (see the module docstring).

    Call :meth:`tick` regularly with the number of clients that have left
    since the server started.  It trims once no client has left for
    ``quiet`` seconds, or ``interval`` seconds after the first departure
    since the last trim, whichever comes first.
    """

    def __init__(self, quiet: float = QUIET, interval: float = INTERVAL) -> None:
        self.quiet = quiet
        self.interval = interval
        #: How many times it trimmed.
        self.trims = 0
        self._seen = 0  # departures the previous tick saw
        self._last = 0.0  # when that count last changed
        self._first: float | None = None  # the first departure not trimmed for yet

    def tick(self, now: float, departures: int) -> None:
        if departures != self._seen:
            self._seen = departures
            self._last = now
            if self._first is None:
                self._first = now
        first = self._first
        if first is None or (now - self._last < self.quiet and now - first < self.interval):
            return
        self._first = None
        if malloc_trim is not None:
            self.trims += 1
            malloc_trim(0)
