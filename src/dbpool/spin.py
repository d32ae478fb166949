"""Polling for an answer that comes soon, rather than sleeping until it lands.

A thread that sleeps on a socket is woken by the kernel when its answer
arrives; on a VM that wake-up costs about as much as a short query, and the
sender pays part of it.  A thread that polls, yielding the CPU between polls,
is awake when the answer lands.  Polling pays only while answers come soon
and a CPU is free to poll on, so both of dbpool's waiters poll only while
the recent round trips (their moving average) were shorter than ``spin``,
and then for at most :data:`POLL_TIMES` times ``spin``:

- the remote client's direct transport (:class:`dbpool.client.direct.ZmtpConnection`),
  which also sleeps for its next answers after a yield that came back late
  (:data:`LATE_YIELD`): the CPU then has more threads to run than it can,
  and polling among them only takes turns from the server;
- the pool's psycopg connections (:class:`dbpool.pgconnection.PgConnection`),
  and only while no other thread of the process waits on one or has just
  done so (threads polling side by side take the CPU and the GIL from each
  other).
"""

from __future__ import annotations

from dbpool.errors import ConfigurationError

__all__ = [
    "CLIENT_SPIN",
    "DEFAULT_SPIN",
    "LATE_YIELD",
    "POLL_TIMES",
    "SLEEPS_AFTER_LATE_YIELD",
    "checked_spin",
    "moving_average",
]

#: The pool's round trip (seconds) below which a waiter polls: a lone caller's
#: round trip to PostgreSQL nearby is about 100 µs, a busy server's more than 500 µs.
DEFAULT_SPIN = 0.0003
#: The remote client's: its round trip crosses ``dbpool serve`` too, and polling
#: still pays where the server is busy but keeps up.  Four client processes on a
#: 2-core VM whose round trips took 300-500 µs did 7-11% more queries per second
#: with this than with :data:`DEFAULT_SPIN`, and 16 threads of one process 36%
#: more; 64 processes, whose round trips are several milliseconds, did as many
#: (``docs/performance.md``).
CLIENT_SPIN = 0.001
#: How long an answer is polled for, in round trips of ``spin``.
POLL_TIMES = 3
#: A yield that lasts longer than this share of ``spin`` came back late: the CPU
#: ran other threads meanwhile, so there are more to run than CPUs, and a CPU
#: would not go idle for a sleeping waiter.  Sixteen client processes on 2 cores
#: came back after 560-1000 µs, their whole round trip; four, mostly within 150 µs.
LATE_YIELD = 0.25
#: Answers a waiter then sleeps for before it polls again.  Polling among more
#: runnable threads than CPUs only queues the waiter, and takes turns from the
#: server it waits on: sixteen client processes on 2 cores did 38% more queries
#: a second with this than polling on.  A poll now and then still pays: 256
#: answers asleep instead of 32 did 10% fewer (``docs/performance.md``).
SLEEPS_AFTER_LATE_YIELD = 32


def moving_average(average: float, sample: float) -> float:
    """The recent round trips' average, ``sample`` taken in: a quarter's weight, so
    that one long statement turns polling off for a few calls, not for good."""
    return average + (sample - average) * 0.25


def checked_spin(value: object) -> float:
    """``value`` as a ``spin`` (seconds, from 0 to 1); ``ConfigurationError`` (a
    ``ValueError``) for anything else, a bool included."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigurationError(f"spin must be from 0 to 1 second, got {value!r}")
    return float(value)
