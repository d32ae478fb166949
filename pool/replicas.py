"""Read replicas: which replica serves a read-only call, and how far behind each one is.

A pool started with ``replicas=[conninfo, ...]`` keeps, beside its own
connections to the primary, one pool per replica (each with its own
connection actors and its own circuit breaker).  A call marked
``readonly=True`` goes to a replica that can serve it, the least busy
first (the smallest share of its connections lent); if none can, to the
primary.  ``readonly="replica"`` never goes to the primary: with no
replica to serve, it fails with ``ConnectionError(reason="unavailable")``.

A replica can serve while its circuit is closed, it is not lagging, and no
call failed on it for lack of a connection in the last second.  Its lag is
measured every ``idle_interval`` by a thread of the pool's own
(:class:`ReplicaSet`): 0 when it has replayed all the WAL it received, else
the seconds since the last transaction it replayed (or since it started, if
none yet).  Past
``max_replica_lag`` it leaves the rotation until it catches up; until the
first measure it is not in rotation either.  A replica that was promoted
(``pg_is_in_recovery()`` false) counts as up to date.

A read that fails on a replica because its connection was lost, before or
while it ran, runs again on the primary (unless ``readonly="replica"``): a
read may run twice, a write never goes there.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import psycopg

from dbpool.errors import ConnectionError

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["ReadOnly", "ReplicaSet", "lost_connection"]

logger = logging.getLogger("dbpool.pool.replicas")

#: A call's ``readonly``: False (the primary), True (a replica, else the
#: primary) or ``"replica"`` (a replica or an error).
ReadOnly: TypeAlias = "bool | Literal['replica']"

_LAG = ("SELECT CASE WHEN NOT pg_is_in_recovery() "
        "OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0.0 "
        "ELSE EXTRACT(EPOCH FROM now() - COALESCE(pg_last_xact_replay_timestamp(), "
        "pg_postmaster_start_time())) "
        "END::float8")
#: Seconds a replica on which a call lost its connection stays out of rotation.
_COOL_DOWN = 1.0


@dataclass
class _Replica:
    pool: Pool
    #: Seconds behind the primary at the last measure; None: not measured (yet).
    lag: float | None = None
    #: Out of rotation until then (monotonic): a call lost its connection on it.
    cooling_until: float = 0.0


class ReplicaSet:
    """A pool's replicas, their lag, and the choice of one (see the module docstring)."""

    def __init__(self, replicas: Sequence[Pool], max_lag: float | None,
                 interval: float, timeout: float, name: str) -> None:
        self._replicas = [_Replica(pool) for pool in replicas]
        self.max_lag = max_lag
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._measured = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{name}-replica-lag",
                                        daemon=True)
        self._thread.start()

    @property
    def pools(self) -> list[Pool]:
        return [replica.pool for replica in self._replicas]

    def choose(self) -> Pool | None:
        """The least busy replica that can serve now, or None."""
        now = time.monotonic()
        best: list[tuple[float, float, Pool]] = []
        for replica in self._replicas:
            pool = replica.pool
            if not self._serves(replica, now):
                continue
            metrics = pool.connection_metrics()[0]
            size = max(1, pool.options.pool_size)
            busy = 1.0 - metrics["ready_conn_count"] / size + metrics["checkout_queue_length"]
            best.append((busy, random.random(), pool))
        return min(best)[2] if best else None

    def failed(self, pool: Pool, error: BaseException) -> None:
        """A call lost its connection on ``pool``: out of rotation for a moment."""
        for replica in self._replicas:
            if replica.pool is pool:
                replica.cooling_until = time.monotonic() + _COOL_DOWN
                logger.warning("%s: a read lost its connection (%s); it leaves the rotation "
                               "for %g s", pool.name, " ".join(str(error).split()), _COOL_DOWN)

    def status(self) -> list[dict[str, Any]]:
        """Each replica's name, health, lag and whether it is in rotation now."""
        now = time.monotonic()
        return [{"name": r.pool.name, "health": r.pool.health, "lag": r.lag,
                 "in_rotation": self._serves(r, now)} for r in self._replicas]

    def wait_measured(self, timeout: float) -> bool:
        """Block until every replica's lag was measured once (tests, start-up)."""
        return self._measured.wait(timeout)

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)
        for pool in self.pools:
            pool.close(timeout)

    def _serves(self, replica: _Replica, now: float) -> bool:
        lag = replica.lag
        return (lag is not None and (self.max_lag is None or lag <= self.max_lag)
                and replica.cooling_until <= now and replica.pool.health == "closed")

    def _watch(self) -> None:
        while not self._stop.is_set():
            for replica in self._replicas:
                replica.lag = self._measure(replica)
            if all(replica.lag is not None for replica in self._replicas):
                self._measured.set()
            self._stop.wait(self._interval)

    def _measure(self, replica: _Replica) -> float | None:
        pool = replica.pool
        if not pool.alive or pool.health != "closed":
            return None
        try:
            lag = pool.query(_LAG, timeout=self._timeout, queue=True).rows[0][0]
        except Exception as error:  # unreachable, timed out: out of rotation until measured
            logger.debug("%s: lag not measured: %s", pool.name, error)
            return None
        if self.max_lag is not None and lag > self.max_lag and (
                replica.lag is None or replica.lag <= self.max_lag):
            logger.warning("%s: %.1f s behind the primary, past max_replica_lag (%g s): out "
                           "of rotation until it catches up", pool.name, lag, self.max_lag)
        return float(lag)


def lost_connection(error: BaseException) -> bool:
    """Whether a call failed for lack of a connection (a read may then run elsewhere)."""
    if isinstance(error, ConnectionError):
        return True
    return isinstance(error, psycopg.OperationalError) and not isinstance(
        error, psycopg.errors.QueryCanceled)
