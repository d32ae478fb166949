"""CoDel, as DBConnection's connection pool sheds load: the judgement, without the queue.

A queue that uses it asks :meth:`Codel.serve` before serving its head,
tells :meth:`Codel.empty` when it has nobody left to serve, and calls
:meth:`Codel.poll` every ``interval`` or so:

- it tracks the smallest wait seen during each ``interval``;
- if that minimum stayed above ``target`` for a whole interval, the queue is
  *slow*: waiters that have waited more than ``2 * target`` are dropped
  rather than served, and a poll drops them all when the queue made no
  progress since the last poll.

Two queues judge with it: the pool's checkout queue (:mod:`.queue`) and the
service's queue of remote requests waiting for a connection
(:mod:`dbpool.server.served_pool`).  It holds no lock: its queue's does.
"""

from __future__ import annotations

__all__ = ["Codel"]


class Codel:
    """CoDel's state for one queue (see the module docstring); times are monotonic."""

    __slots__ = ("_poll_last_sent", "delay", "interval", "next", "slow", "target")

    def __init__(self, target: float, interval: float, now: float) -> None:
        self.target = target
        self.interval = interval
        #: The smallest wait seen this interval.
        self.delay = 0.0
        self.slow = False
        #: When the current interval ends.
        self.next = now
        self._poll_last_sent = now

    def serve(self, now: float, since: float, oldest: float | None = None) -> bool:
        """Whether to serve the next waiter, waiting since ``since``: False to drop it
        (the queue is slow and it waited more than ``2 * target``).

        ``oldest`` is when the longest waiter arrived, for a queue that does not
        serve its longest waiter first (one that takes clients in turn): the
        queue's standing wait is that one's, not the next waiter's.
        """
        delay = now - since
        standing = delay if oldest is None else now - oldest
        if now >= self.next:
            # First dequeue of an interval: judge the last one, serve the head.
            self.slow = self.delay > self.target
            self.next = now + self.interval
            self.delay = standing
            return True
        if self.slow and delay > 2 * self.target:
            return False
        if standing < self.delay:
            self.delay = standing
        return True

    def empty(self, now: float) -> None:
        """The queue had nobody left to serve."""
        if now >= self.next:
            self.slow = self.delay > self.target
            self.next = now + self.interval
        self.delay = 0.0

    def poll(self, now: float, head_since: float | None) -> float | None:
        """The periodic check, given when the head of the queue arrived (None: empty).

        Returns a cutoff when the queue is stuck and slow: every waiter that
        arrived before it is to be dropped.  None drops nobody.
        """
        if head_since is None:
            self._poll_last_sent = now
            return None
        last_sent, self._poll_last_sent = self._poll_last_sent, head_since
        if head_since > last_sent or now < self.next:
            return None  # progress since the last poll, or the interval is not over
        self.slow = self.delay > self.target
        self.delay = now - head_since
        self.next = now + self.interval
        return now - 2 * self.target if self.slow else None
