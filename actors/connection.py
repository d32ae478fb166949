"""The connection actor: one pykka actor per pooled connection.

The actor owns its connection's lifecycle and nothing else.  It connects
(calling ``configure`` before every attempt), runs ``after_connect``, backs
off and retries on failure, pings when the pool finds it idle, and drops and
re-opens the connection when told to.  Once connected it hands its
:class:`~dbpool.actors.slot.Slot` to the pool's checkout queue; from then on
callers borrow the slot directly, and queries never pass through this
actor's mailbox.

While the pool's circuit breaker is open (see :mod:`dbpool.pool.breaker`),
a connection that is down does not retry on its own: it tells the pool it
is parked and waits for a :class:`~dbpool.actors.messages.Probe`.

Failures are of two kinds, as in DBConnection:

- *expected* (the database refused or dropped us): logged without secrets,
  then retried after a backoff step, or, with ``backoff_type="stop"``,
  reported to the pool, which stops;
- *unexpected* (``configure`` raised, a bug): the actor crashes and the pool
  actor restarts it, up to ``max_restarts`` within ``max_seconds``.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka
from psycopg.conninfo import conninfo_to_dict

from dbpool.driver import Driver, Ok
from dbpool.errors import ConnectionError

from . import backoff as backoff_mod
from .listeners import ConnectionEvent, EventKind
from .messages import (
    Connect,
    ConnectFailed,
    ConnectionCrashed,
    ConnectionGaveUp,
    Notify,
    Parked,
    Ping,
    Probe,
    Reconnect,
    Retire,
)
from .scheduler import Scheduler
from .slot import Slot

__all__ = ["ConnectionActor", "ConnectionConfig", "connect_error", "one_line", "open_session"]

logger = logging.getLogger("dbpool.actors.connection")


@dataclass(frozen=True)
class ConnectionConfig:
    """What a connection actor needs from its pool; shared by all of them."""

    pool_name: str
    driver: Driver[Any]
    connect_opts: Mapping[str, Any]
    scheduler: Scheduler
    #: Hands a ready slot to the pool's checkout queue; False if the pool takes no
    #: connections now (it is stopping, or drained): the actor closes it and parks.
    release: Callable[[Slot], bool]
    #: Delivers an event directly, for when the pool actor has already stopped.
    deliver: Callable[[ConnectionEvent], None]
    configure: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
    #: Runs the user's after_connect on a slot (the pool wraps it in a Connection).
    after_connect: Callable[[Slot], None] | None = None
    after_connect_timeout: float = 15.0
    backoff_type: str = "rand_exp"
    backoff_min: float | None = None
    backoff_max: float | None = None
    show_sensitive_data_on_connection_error: bool = False
    #: ``(min, max)`` seconds: each connection's lifetime is drawn from it.
    max_lifetime: tuple[float, float] | None = None
    #: Whether a connection may try to connect on its own; when not (the
    #: pool's circuit breaker is open), it parks until the pool sends Probe.
    may_connect: Callable[[], bool] = lambda: True
    #: With a shared budget (dbpool.pool.budget): ``claim(index, open)`` opens a
    #: session with ``open`` within the budget (None: no slot free, nothing left
    #: open), and ``holds(state)`` checks at pings that it still holds its slot.
    claim: Callable[[int, Callable[[], Any]], Any | None] | None = None
    holds: Callable[[Any], bool] | None = None
    #: Seconds between a connection's tries for a budget slot (jittered).
    claim_interval: float = 1.0


class ConnectionActor(pykka.ThreadingActor):
    """Keeps one connection open for pool ``pool_ref``, in slot ``slot``."""

    use_daemon_thread = True  # see PoolActor: its pool stops it at exit

    def __init__(self, slot: Slot, config: ConnectionConfig, pool_ref: pykka.ActorRef[Any]) -> None:
        super().__init__()
        self.slot = slot
        self.config = config
        self.pool_ref = pool_ref
        self.backoff = backoff_mod.new(config.backoff_type, config.backoff_min, config.backoff_max)
        self._attempt = 0

    # -- pykka hooks -----------------------------------------------------

    def on_start(self) -> None:
        self.slot.actor = self.actor_ref
        self._schedule_connect(0.0)

    def on_receive(self, message: Any) -> Any:
        match message:
            case Connect(attempt) if attempt == self._attempt:
                self._connect()
            case Probe() if self.slot.driver_state is None:
                self._attempt += 1  # overtakes any scheduled Connect
                self._connect(probe=True)
            case Reconnect(slot, generation, error, backoff, taken) if (
                slot is self.slot and generation == slot.generation
            ):
                if taken:
                    self._notify("disconnected", reason=one_line(error))
                self._reconnect(error, backoff=backoff)
            case Ping(slot) if slot is self.slot and slot.driver_state is not None:
                self._ping()
            case Retire(slot) if slot is self.slot:
                self._attempt += 1  # no connect after this
                self._close(ConnectionError("the pool shrank", reason="stopped"))
                self._tell_pool(Parked(self.slot.index))
            case Connect() | Reconnect() | Ping() | Probe():
                pass  # stale: overtaken by a newer attempt or connection
            case _:
                logger.warning("%s: connection %d ignored unknown message %r",
                               self.config.pool_name, self.slot.index, message)

    def on_stop(self) -> None:
        self._attempt += 1  # invalidate any scheduled Connect
        if self.slot.lent_at is None:
            self._close(ConnectionError("the pool is stopping", reason="stopped"))

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        error = exception_value or RuntimeError("connection actor failed")
        if self.slot.lent_at is None:
            self._close(error)
        self._tell_pool(ConnectionCrashed(self.slot.index, error, self.actor_ref))

    # -- lifecycle -------------------------------------------------------

    def _connect(self, probe: bool = False) -> None:
        if not probe and not self.config.may_connect():
            self._tell_pool(Parked(self.slot.index))
            return
        opts: dict[str, Any] = {**self.config.connect_opts, "pool_index": self.slot.index}
        if self.config.configure is not None:
            # An exception here is a crash on purpose: the pool restarts us.
            opts = dict(self.config.configure(opts))
        started = time.monotonic()
        try:
            state = open_session(self.config, self.slot.index, opts)
        except Exception as exc:
            self._connect_failed(self._connect_error(exc, opts))
            return
        if state is None:  # no budget slot free: try again, jittered so that servers take turns
            logger.debug("%s: connection %d found no free budget slot",
                         self.config.pool_name, self.slot.index)
            self._schedule_connect(self.config.claim_interval * random.uniform(0.5, 1.5))
            return
        lifetime = self.config.max_lifetime
        self.slot.mark_connected(
            state, random.uniform(*lifetime) if lifetime is not None else float("inf"))
        self._notify("connected", duration=time.monotonic() - started)
        if self.config.after_connect is not None:
            failure = self._run_after_connect()
            if failure is not None:
                self._reconnect(failure, backoff=True)
                return
        if self.backoff is not None:
            self.backoff.reset()
        self._release()

    def _connect_failed(self, error: ConnectionError) -> None:
        # The pool logs failures, at most one line per reconnect_log_interval.
        logger.debug("%s", error)
        self._tell_pool(ConnectFailed(self.slot.index, error))
        if self.backoff is None:
            self._tell_pool(ConnectionGaveUp(self.slot.index, error))
        elif not self.config.may_connect():
            self._tell_pool(Parked(self.slot.index))
        else:
            self._schedule_connect(self.backoff.next())

    def _reconnect(self, error: BaseException, *, backoff: bool) -> None:
        logger.info("%s: connection %d disconnected: %s",
                    self.config.pool_name, self.slot.index, one_line(error))
        self._close(error)
        if self.backoff is None:
            self._tell_pool(ConnectionGaveUp(self.slot.index, error))
        else:
            self._schedule_connect(self.backoff.next() if backoff else 0.0)

    def _ping(self) -> None:
        outcome = self.config.driver.ping(self.slot.driver_state)
        if not isinstance(outcome, Ok):
            self._reconnect(outcome.error, backoff=False)
        elif self.config.holds is not None and not self.config.holds(self.slot.driver_state):
            # Its session let the budget slot go: it must not serve beyond the budget.
            self._reconnect(ConnectionError("the connection no longer holds its budget slot"),
                            backoff=False)
        else:
            self._release()

    def _release(self) -> None:
        if not self.config.release(self.slot):  # the pool is stopping, or was drained
            self._close(ConnectionError("the pool takes no connections (stopping or drained)",
                                        reason="stopped"))
            self._tell_pool(Parked(self.slot.index))

    def _close(self, error: BaseException) -> None:
        """Disconnect if connected and tell the listeners."""
        state = self.slot.driver_state
        if state is None:
            return
        self.slot.driver_state = None
        self.config.driver.disconnect(error, state)
        self._notify("disconnected", reason=one_line(error))

    def _schedule_connect(self, delay: float) -> None:
        self._attempt += 1  # a Connect scheduled before is stale from now on
        self.config.scheduler.tell_soon(delay, self.actor_ref, Connect(self._attempt))

    def _run_after_connect(self) -> BaseException | None:
        """Run after_connect on its own thread so that its timeout can be enforced."""
        assert self.config.after_connect is not None
        run, slot, timeout = self.config.after_connect, self.slot, self.config.after_connect_timeout
        done = threading.Event()
        failure: list[BaseException] = []

        def target() -> None:
            try:
                run(slot)
            except BaseException as exc:
                failure.append(exc)
            finally:
                done.set()

        name = f"{self.config.pool_name}-after-connect-{slot.index}"
        threading.Thread(target=target, name=name, daemon=True).start()
        if done.wait(timeout):
            return failure[0] if failure else None
        # Stop the statement it is running, then give it a moment to notice
        # before the connection is closed under it.
        cancel = getattr(self.config.driver, "cancel", None)
        if cancel is not None:
            try:
                cancel(slot.driver_state)
            except Exception:
                logger.debug("cancel after after_connect timeout failed", exc_info=True)
        done.wait(min(timeout, 5.0))
        return ConnectionError(
            f"{self.config.pool_name}: after_connect on connection {slot.index} "
            f"timed out after {timeout:g}s"
        )

    # -- helpers ---------------------------------------------------------

    def _notify(self, kind: EventKind, *, reason: str | None = None,
                duration: float | None = None) -> None:
        event = ConnectionEvent(kind, self.config.pool_name, self.slot.index, self.actor_ref,
                                self.slot.backend_pid, reason=reason, duration=duration)
        try:
            self.pool_ref.tell(Notify(event))
        except pykka.ActorDeadError:  # the pool is stopping us: deliver it ourselves
            self.config.deliver(event)

    def _tell_pool(self, message: Any) -> None:
        try:
            self.pool_ref.tell(message)
        except pykka.ActorDeadError:
            pass  # the pool is stopping; nothing left to report to

    def _connect_error(self, exc: Exception, opts: Mapping[str, Any]) -> ConnectionError:
        return connect_error(
            self.config, f"connection {self.slot.index} failed to connect", exc, opts)


def open_session(config: ConnectionConfig, index: int, opts: Mapping[str, Any]) -> Any | None:
    """Connect with ``opts`` for connection ``index`` (the driver's state); within the
    pool's budget, if it has one, and None when no slot of it is free now."""
    driver = config.driver
    if config.claim is None:
        return driver.connect(opts)
    return config.claim(index, lambda: driver.connect(opts))


def connect_error(config: ConnectionConfig, what: str, exc: Exception,
                  opts: Mapping[str, Any]) -> ConnectionError:
    """A ConnectionError for a failed connect (``what`` happened in pool
    ``config.pool_name``), with no secret in it or its chain."""
    where = f"{config.pool_name}: {what}"
    detail = f"{type(exc).__name__}: {one_line(exc)}"
    if config.show_sensitive_data_on_connection_error:
        error = ConnectionError(f"{where}: {detail}")
        error.__cause__ = exc
        return error
    for secret in _secrets(config.connect_opts) | _secrets(opts):
        detail = detail.replace(secret, "******")
    return ConnectionError(f"{where}: {detail}")


#: The password of a URI as written, percent-escapes and all (libpq quotes it
#: back that way when an escape is invalid).
_URI_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:?]*:([^@/?]+)@", re.IGNORECASE)


def _secrets(opts: Mapping[str, Any]) -> set[str]:
    """The password values in ``opts``, including one inside a conninfo string or URI."""
    found = {str(opts["password"])} if opts.get("password") else set()
    conninfo = opts.get("conninfo")
    if conninfo:
        written = _URI_PASSWORD.match(str(conninfo))
        if written is not None:
            found.add(written.group(1))
        try:
            password = conninfo_to_dict(str(conninfo)).get("password")
        except Exception:
            # Unparseable: the whole string may hold a password, so hide it all.
            found.add(str(conninfo))
        else:
            if password:
                found.add(str(password))
    return {s for s in found if s}


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__

