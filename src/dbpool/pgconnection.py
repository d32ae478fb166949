"""psycopg's connection as the pool uses it: a ROLLBACK not waited for, and
answers polled for.

Polling: while its recent round trips were short, a connection's wait polls
its socket rather than sleep, as long as no other thread of the process
waits on one (:meth:`PgConnection.wait`, :mod:`dbpool.spin`).  A lone
caller's ``SELECT 1`` then costs the round trip alone, not the round trip
and a wake-up.

The ROLLBACK: a framework ends nearly every use of a connection with a ``ROLLBACK`` and
then gives it back: SQLAlchemy rolls back whatever its ``Connection`` began
when it is closed.  Waiting for that ``ROLLBACK``'s answer costs the caller
a round trip to the server for nothing it will look at.  So
:meth:`PgConnection.rollback_unawaited` sends ``ROLLBACK`` and returns at
once; the server ends the transaction (and releases its locks) as soon as the
command arrives, and the connection's next use reads the answer first:

- any psycopg operation on the connection, since all of them go through the
  connection's ``wait``, which settles first while the answer is pending;
- the pool's next checkout and ping of it (:class:`dbpool.pgdriver.PgDriver`),
  which settle with a deadline and replace the connection if the
  ``ROLLBACK`` failed (the connection was lost).

So the answer is read by the next borrower, usually without waiting, as it
has come in the meantime.  Until then libpq reports the connection busy
(``ACTIVE``); :attr:`PgConnection.rollback_pending` says why.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Generator
from typing import Any

import psycopg
from psycopg import pq
from psycopg.abc import RV, PQGen
from psycopg.rows import Row
from psycopg.waiting import Ready, Wait

from .spin import POLL_TIMES, moving_average

__all__ = ["PgConnection", "read_results", "wait_for"]

_IDLE = pq.TransactionStatus.IDLE
_ENDABLE = frozenset({pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR})
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_FOREVER = float("inf")
_monotonic = time.monotonic
_yield_cpu = os.sched_yield
_POLL_MASKS = {Wait.R: select.POLLIN, Wait.W: select.POLLOUT,
               Wait.RW: select.POLLIN | select.POLLOUT}
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_READY_R = int(Ready.R)
_READY_W = int(Ready.W)
#: The connections a thread waits on, in this process (set.add and discard are
#: atomic under the GIL, where a counter's += is not).
_WAITING: set[PgConnection[Any]] = set()
#: When a wait on a connection last ended, and in which thread: ``[time, thread id]``.
_LAST_WAIT: list[Any] = [0.0, None]
_get_ident = threading.get_ident


class PgConnection(psycopg.Connection[Row]):
    """The psycopg connection of a dbpool pool (see the module docstring)."""

    #: Whether the answer to an unawaited ``ROLLBACK`` is still to be read (read
    #: it, do not set it: a plain attribute, as the pool reads it at every checkout).
    rollback_pending = False
    #: The round trip (seconds) below which a thread polls for its answer rather
    #: than sleep (see :meth:`wait`); 0 never polls.  Set by the driver.
    spin = 0.0
    #: The recent waits' moving average (0 at first: the first answer is polled for).
    _round_trip = 0.0
    #: ``[socket, select.poll object, the events it is registered for]``, made once.
    _poller: list[Any] | None = None

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        """psycopg's wait, polling first for an answer that comes soon.

        While this connection's recent round trips took less than :attr:`spin`,
        and no other thread of the process waits on a dbpool connection or has
        just done so, the thread polls its socket, yielding the CPU between
        polls, for up to :data:`~dbpool.spin.POLL_TIMES` times that, and sleeps
        in psycopg's wait only after (why: :mod:`dbpool.spin`).  Threads that would poll side by
        side sleep instead: they would take the CPU, and the GIL, from each
        other and from the server (polling with 64 threads on 10 connections
        cost almost half of the pool's queries a second, and at 4 on 4 a third).
        A wait with a ``timeout`` (psycopg's own, for a cancel) never polls.
        """
        spin = self.spin
        if not spin or timeout is not None:
            return super().wait(gen, interval, timeout)
        started = _monotonic()
        waiting, last, me = _WAITING, _LAST_WAIT, _get_ident()
        waiting.add(self)
        if (self._round_trip < spin and len(waiting) == 1
                and (last[1] == me or started - last[0] > POLL_TIMES * spin)):
            gen = self._polled(gen, started + POLL_TIMES * spin)
        try:
            return super().wait(gen, interval, timeout)
        finally:
            waiting.discard(self)
            last[0] = ended = _monotonic()
            last[1] = me
            self._round_trip = moving_average(self._round_trip, ended - started)

    def _polled(self, gen: PQGen[RV], until: float) -> Generator[Wait, Ready | int, RV]:
        """``gen``, its waits polled for until ``until`` (``time.monotonic()``), and
        passed on to the caller's waiting after that."""
        fd = self.pgconn.socket
        poller = self._poller
        if poller is None or poller[0] != fd:
            poll = select.poll()
            poll.register(fd, _POLLIN)
            poller = self._poller = [fd, poll, _POLLIN]
        poll = poller[1]
        try:
            wait = next(gen)
            while True:
                ready = 0
                if (wanted := _POLL_MASKS[wait]) != poller[2]:
                    poll.modify(fd, wanted)
                    poller[2] = wanted
                while True:
                    if events := poll.poll(0):
                        event = events[0][1]
                        # An error or hang-up: reading is what finds it (libpq raises).
                        ready = _READY_R if event & ~_POLLOUT else 0
                        if event & _POLLOUT:
                            ready |= _READY_W
                        break
                    if _monotonic() >= until or len(_WAITING) > 1:
                        break
                    _yield_cpu()
                if not ready:
                    ready = yield wait
                wait = gen.send(ready)
        except StopIteration as stop:
            result: RV = stop.value
            return result

    def rollback_unawaited(self) -> None:
        """End the transaction as :meth:`rollback` does, without waiting for the answer.

        Where psycopg's own rollback has more to do (a ``Transaction`` block
        or a two-phase transaction open, pipeline mode, a statement still
        running), this is :meth:`rollback` itself, and raises as it does.
        Outside a transaction it does nothing, as :meth:`rollback`.
        """
        status = self.pgconn.transaction_status
        if status == _IDLE:
            return
        if (status not in _ENDABLE or self._num_transactions or self._tpc
                or self._pipeline is not None):
            self.rollback()
            return
        with self.lock:
            pgconn = self.pgconn
            pgconn.send_query(b"ROLLBACK")
            while pgconn.flush() == 1:  # a few bytes: in practice never here
                wait_for(pgconn.socket, select.POLLOUT, _FOREVER)
            self.rollback_pending = True
            # psycopg forgets its prepared statements at every rollback (it deallocates
            # them at the next use: see settle()); so do we, as it would.
            self._prepared.clear()
            # Every psycopg operation calls self.wait() first.  Only while the answer
            # is pending does it find this instance's wait, which settles first; the
            # rest of the time psycopg's own serves, and a query pays nothing for it.
            vars(self)["wait"] = self._settle_then_wait

    def settle(self, deadline: float = _FOREVER) -> None:
        """Read the answer to an unawaited ``ROLLBACK``, waiting for it until
        ``deadline`` (``time.monotonic()``); raise its error if it failed, or
        ``psycopg.OperationalError`` if the deadline passed first.  Does
        nothing if none is pending."""
        if not self.rollback_pending:
            return
        self.rollback_pending = False
        vars(self).pop("wait", None)  # psycopg's wait again (see rollback_unawaited)
        results = read_results(self.pgconn, deadline)
        if results is None:
            raise psycopg.OperationalError("no answer to a ROLLBACK in time: connection unusable")
        for result in results:
            if result.status != _COMMAND_OK:
                raise psycopg.errors.error_from_result(result, encoding=self.info.encoding)
        self.wait(self._prepared.maintain_gen(self))

    def _settle_then_wait(
        self, gen: PQGen[Any], interval: float = 0.1, timeout: float | None = None
    ) -> Any:
        """psycopg's :meth:`psycopg.Connection.wait`, once an unawaited ``ROLLBACK``
        has been settled: the connection's ``wait`` while one is pending."""
        self.settle()
        return self.wait(gen, interval, timeout)


def read_results(pgconn: pq.abc.PGconn, deadline: float) -> list[pq.abc.PGresult] | None:
    """The results of the command sent on ``pgconn``, read through libpq with a
    poll, or None if ``deadline`` (``time.monotonic()``) passed first.

    Driven by hand, not by psycopg's waiting, so that a network that drops
    packets fails at the deadline instead of hanging the caller.
    """
    while pgconn.flush() == 1:
        if not wait_for(pgconn.socket, select.POLLOUT, deadline):
            return None
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        if not wait_for(pgconn.socket, select.POLLIN, deadline):
            return None
    results = []
    while (result := pgconn.get_result()) is not None:
        results.append(result)
    return results


def wait_for(fd: int, event: int, deadline: float) -> bool:
    """Wait until ``fd`` is ready for ``event``; False if the deadline passed first."""
    poller = select.poll()
    poller.register(fd, event)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if poller.poll(None if left == _FOREVER else left * 1000):
            return True
