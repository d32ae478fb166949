"""The circuit breaker: fail fast while the database is down, probe, ramp back up.

The pool's health (:attr:`dbpool.pool.Pool.health`) is one of:

- ``closed``: serving.
- ``open``: the database is unavailable.  Every checkout fails at once with
  ``ConnectionError(reason="unavailable")``, and callers already waiting are
  failed now rather than at their timeouts.  Connections that fail to connect
  do not retry on their own: they *park*, and one of them at a time probes
  the database, once per backoff step.
- ``half_open``: that probe is connecting.

Transitions, all made on the pool actor's thread:

- ``closed`` → ``open`` when a connect attempt fails while no connection is
  up, or after ``breaker_threshold`` consecutive failed attempts;
- ``open`` → ``half_open`` when the backoff step has passed: one parked
  connection is told to connect (if none has parked yet, the first to park);
- ``half_open`` → ``closed`` when it connected.  Then the pool ramps up
  (slow start): each connection that connects lets two more parked ones try,
  so the database sees 1, 3, 7... connections come back, not all at once;
- ``half_open`` → ``open`` when it failed, for another backoff step;
- :meth:`Breaker.open` (``pool.open_circuit()``) opens it by hand, with no
  probing, for maintenance; :meth:`Breaker.close` closes it again.

``backoff_type="stop"`` has no breaker: the first failed connect stops the
pool, as before, for users who supervise it themselves.

Reconnect failures are logged here, not by each connection: one ERROR line
per ``reconnect_log_interval`` with the number of failed attempts and the
last error, a WARNING when the circuit opens and an INFO when it closes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from dbpool import telemetry
from dbpool.actors import backoff as backoff_mod
from dbpool.actors.listeners import HealthEvent, deliver
from dbpool.errors import ConnectionError

from .options import PoolOptions
from .queue import CheckoutQueue

__all__ = ["Breaker", "Health"]

logger = logging.getLogger("dbpool.pool.breaker")

Health = Literal["closed", "open", "half_open"]


class Breaker:
    """The circuit breaker of one pool (see the module docstring).

    Its pool actor calls every method but :attr:`may_connect`, and attaches
    ``probe(index)``, which tells connection ``index`` to connect now, and
    ``schedule(delay, token)``, which has :meth:`probe_due` called after
    ``delay`` seconds.
    """

    def __init__(self, name: str, options: PoolOptions, queue: CheckoutQueue,
                 listeners: Any) -> None:
        self.name = name
        self.queue = queue
        self.listeners = listeners
        self._probe: Callable[[int], None] = _unattached
        self._schedule: Callable[[float, int], None] = _unattached
        self.enabled = options.backoff_type != "stop"
        self.threshold = options.breaker_threshold
        self.log_interval = options.reconnect_log_interval
        backoff = backoff_mod.new(
            "exp" if options.backoff_type == "stop" else options.backoff_type,
            options.backoff_min, options.backoff_max)
        assert backoff is not None  # only "stop" has none
        self.backoff = backoff
        #: Read by connection actors without a lock: may they connect on their own?
        self.state: Health = "closed"
        self.manual = False
        #: ``drain`` disconnected everything: nobody reconnects until resume.
        self.drained = False
        self.failures = 0  # consecutive failed connect attempts
        self.up: set[int] = set()  # connections that are connected
        self.parked: list[int] = []  # connections waiting for a probe
        self._token = 0  # the probe timer that counts
        self._probe_wanted = False  # a step passed while none was parked
        self._logged_at = 0.0
        self._unlogged = 0

    def attach(self, probe: Callable[[int], None],
               schedule: Callable[[float, int], None]) -> None:
        """Connect the breaker to the pool actor (its ``probe`` and ``schedule``)."""
        self._probe = probe
        self._schedule = schedule

    @property
    def may_connect(self) -> bool:
        """Whether a connection may try to connect on its own (else it parks)."""
        return self.state == "closed" and not self.drained

    # -- what the pool actor hears -----------------------------------------

    def connected(self, index: int) -> None:
        self.up.add(index)
        self.failures = 0
        if self.state != "closed" and not self.manual:
            self._close("the database is back: a connection succeeded")
        self._ramp()

    def disconnected(self, index: int) -> None:
        self.up.discard(index)

    def forget(self, index: int) -> None:
        """Connection ``index`` is gone for good (the pool shrank)."""
        self.up.discard(index)
        if index in self.parked:
            self.parked.remove(index)

    def parked_connection(self, index: int) -> None:
        if index not in self.parked:
            self.parked.append(index)
        if self.manual or self.drained:
            return
        if self.state == "closed":
            self._ramp()  # closed meanwhile: it may go at once, ramp permitting
        elif self.state == "open" and self._probe_wanted:
            self._start_probe()  # the step passed with nobody parked: it probes

    def connect_failed(self, index: int, error: BaseException) -> None:
        self.failures += 1
        self._log_failure(error)
        if not self.enabled or self.manual:
            return
        if self.state == "half_open":
            self._open(f"the probe failed: {error}")
        elif self.state == "closed" and (not self.up or self.failures >= self.threshold):
            self._open(str(error))

    def crashed(self, index: int, error: BaseException) -> None:
        """A connection actor crashed (its pool restarts it, and it parks): if it was
        the probe, the probe failed."""
        if self.state == "half_open" and not self.manual:
            self._open(f"the probe crashed: {type(error).__name__}: {error}")

    def probe_due(self, token: int) -> None:
        """A backoff step passed while open: let one parked connection try.

        If none has parked yet (they were still failing on their own when the
        circuit opened), the first to park is the probe.  A drained pool
        probes nothing: :meth:`resume` starts again.
        """
        if token != self._token or self.state != "open" or self.manual or self.drained:
            return
        if not self.parked:
            self._probe_wanted = True
            return
        self._start_probe()

    def _start_probe(self) -> None:
        self._probe_wanted = False
        self._set("half_open", "probing the database")
        self._probe(self.parked.pop(0))

    # -- manual control -----------------------------------------------------

    def open(self, reason: str = "opened by hand") -> None:
        """Open the circuit without probing (maintenance) until :meth:`close`."""
        self.manual = True
        self._token += 1
        self._open(reason, manual=True)

    def close(self) -> None:
        """Close a circuit opened by hand (or open): serve, and reconnect gradually."""
        self.manual = False
        self._token += 1
        if self.state != "closed":
            self._close("closed by hand")
        self._ramp()

    def drain(self) -> None:
        self.drained = True
        self.emit(self.state, "drained")

    def resume(self) -> None:
        self.drained = False
        self.emit(self.state, "resumed")
        if self.state == "open" and not self.manual:
            self._schedule_probe()  # probing stopped while drained
        self._ramp()

    # -- inside -------------------------------------------------------------

    def _open(self, reason: str, manual: bool = False) -> None:
        if self.state == "closed":
            logger.warning("%s: circuit open: %s; checkouts fail at once until the database "
                           "is back", self.name, reason)
        self._set("open", reason)
        self.queue.set_unavailable(ConnectionError(
            f"{self.name}: the database is unavailable (circuit open: {reason})",
            reason="unavailable"))
        if not manual:
            self._schedule_probe()

    def _close(self, reason: str) -> None:
        logger.info("%s: circuit closed: %s", self.name, reason)
        self.backoff.reset()
        self._set("closed", reason)
        self.queue.set_unavailable(None)

    def _ramp(self) -> None:
        """Slow start: let up to two more parked connections connect."""
        if self.state != "closed" or self.manual or self.drained:
            return
        for _ in range(min(2, len(self.parked))):
            self._probe(self.parked.pop(0))

    def _schedule_probe(self) -> None:
        self._probe_wanted = False
        self._token += 1
        self._schedule(self.backoff.next(), self._token)

    def _set(self, state: Health, reason: str) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        if state == "half_open":
            logger.debug("%s: circuit half open: %s", self.name, reason)
        self.emit(previous, reason)

    def emit(self, previous: str, reason: str | None) -> None:
        """Tell listeners and telemetry the health (also for pause/resume/drain)."""
        event = HealthEvent(self.name, self.state, previous, reason)
        deliver(self.listeners, event)
        telemetry.emit("health", {"count": 1}, {"pool": self.name, "state": self.state,
                                                "previous": previous, "reason": reason})

    def _log_failure(self, error: BaseException) -> None:
        """One line per ``reconnect_log_interval``, with a count, not one per attempt."""
        now = time.monotonic()
        self._unlogged += 1
        if now - self._logged_at < self.log_interval:
            return
        fields = {"pool": self.name, "reason": getattr(error, "reason", "error"),
                  "attempts": self._unlogged}
        if self._logged_at == 0.0 or self._unlogged == 1:
            logger.error("%s", error, extra=fields)
        else:
            logger.error("%s: %d connection attempts failed in the last %.0fs; the last: %s",
                         self.name, self._unlogged, now - self._logged_at, error, extra=fields)
        self._logged_at = now
        self._unlogged = 0


def _unattached(*args: object) -> None:
    raise RuntimeError("the circuit breaker is not attached to a pool actor")
