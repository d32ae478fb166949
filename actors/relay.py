"""The LISTEN/NOTIFY relay: one connection per pool that holds every ``LISTEN``.

A transaction pooler cannot let a caller ``LISTEN`` on a pooled connection:
the connection goes back to the pool, and its notifications to whoever
borrows it next.  So a pool that has subscribers keeps one more connection,
outside ``pool_size`` and never lent, in this actor.  It ``LISTEN``s to
every channel that has a subscriber and hands each notification to the
channel's subscribers (listeners as in :mod:`dbpool.actors.listeners`).
``NOTIFY`` itself needs no help: any connection sends it, pooled or not.

Contract:

- The pool actor starts the relay at the first :class:`~dbpool.actors.messages.Listen`
  and stops it with the pool.  It connects as the pool's connections do
  (``configure``, the connect options, ``pool_index`` -1) and backs off
  the same way between failed attempts.
- ``Listen(channel, listener, ready)`` adds a subscriber; the channel's
  first makes the connection ``LISTEN``.  ``ready`` is done once the
  ``LISTEN`` is in force: at once if it already is, else when the
  connection is up.  ``Unlisten`` removes one (or all); the channel's last
  ``UNLISTEN``s.
- Between messages the relay waits on its connection for up to
  ``idle_interval``; the pool wakes it (:class:`Waker`) when it tells it a
  message, so a subscriber never waits for the wait to end.
- Each channel's subscribers receive a
  :class:`~dbpool.actors.listeners.NotificationEvent` for each notification,
  in the order the connection received them: PostgreSQL delivers them in
  commit order, so each sender's arrive in the order it sent them.
- When the connection is lost (or a ping gets no answer within
  ``ping_timeout``), the relay reconnects, ``LISTEN``s again to every
  channel, and only then tells each subscriber
  :class:`~dbpool.actors.listeners.NotificationGap`: what was sent while
  nobody listened is lost, as PostgreSQL defines it.  Notifications after
  the gap event are delivered again.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

import pykka

from dbpool.driver import Disconnect, Notification, Ok, Outcome
from dbpool.errors import ConnectionError, PoolStoppedError

from . import backoff as backoff_mod
from .connection import ConnectionConfig, connect_error, one_line, open_session
from .listeners import Listener, NotificationEvent, NotificationGap, deliver
from .messages import Connect, Listen, Unlisten

__all__ = ["RELAY_INDEX", "THREAD_NAME", "NotifyRelay", "Waker"]

logger = logging.getLogger("dbpool.actors.relay")

#: The ``pool_index`` the relay's connection has in ``configure``'s options.
RELAY_INDEX = -1
#: The start of the relay's thread's name (pykka names it after the class).
THREAD_NAME = "NotifyRelay"


class Waker:
    """A socket pair: a thread that tells the relay a message wakes its wait."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def wake(self) -> None:
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # full: the relay is awake anyway; closed: it has stopped

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class _Wait:
    """Tick: wait on the connection for notifications (told by the relay to itself)."""


class NotifyRelay(pykka.ThreadingActor):
    """Relays pool ``config.pool_name``'s notifications.  See the module docstring."""

    use_daemon_thread = True  # see PoolActor: its pool stops it at exit

    def __init__(self, config: ConnectionConfig, waker: Waker, idle_interval: float) -> None:
        super().__init__()
        self.config = config
        self.driver: Any = config.driver
        self.waker = waker
        self.idle_interval = idle_interval
        # The relay never stops its pool: with backoff_type "stop" it still
        # retries, with the default kind of delays.
        backoff = backoff_mod.new(config.backoff_type if config.backoff_type != "stop"
                                  else "rand_exp", config.backoff_min, config.backoff_max)
        assert backoff is not None
        self.backoff = backoff
        self.subscribers: dict[str, list[Listener]] = {}
        #: Channels the connection listens to now.
        self.listening: set[str] = set()
        #: Subscriptions waiting for their channel's LISTEN, by channel.
        self.pending: dict[str, list[Future[None]]] = {}
        self.state: Any = None
        #: Why the connection was lost: a gap to report once listening again.
        self.down: str | None = None
        self._attempt = 0
        self._last_heard = 0.0

    # -- pykka hooks -----------------------------------------------------

    def on_start(self) -> None:
        self._schedule_connect(0.0)

    def on_receive(self, message: Any) -> Any:
        match message:
            case Listen(channel, listener, ready):
                self._subscribe(channel, listener, ready)
            case Unlisten(channel, target, done):
                self._unsubscribe(channel, target)
                if done is not None:
                    _done(done)
            case _Wait() if self.state is not None:
                try:
                    self._wait()
                except Exception as exc:  # a bug: lose the connection, never the subscribers
                    logger.exception("%s: the relay failed", self.config.pool_name)
                    self._lost(exc)
            case Connect(attempt) if attempt == self._attempt:
                self._connect()
            case _Wait() | Connect():
                pass  # stale: the connection it was for is gone
            case _:
                logger.warning("%s: the relay ignored unknown message %r",
                               self.config.pool_name, message)

    def on_stop(self) -> None:
        self._attempt += 1
        stopped = PoolStoppedError(f"{self.config.pool_name}: the pool is stopped")
        for futures in self.pending.values():
            for ready in futures:
                _fail(ready, stopped)
        self.pending.clear()
        self._disconnect(stopped)
        self.waker.close()

    def on_failure(self, *exc_info: Any) -> None:
        self.on_stop()

    # -- subscriptions ---------------------------------------------------

    def _subscribe(self, channel: str, listener: Listener, ready: Future[None]) -> None:
        self.subscribers.setdefault(channel, []).append(listener)
        if channel in self.listening:
            _done(ready)
            return
        self.pending.setdefault(channel, []).append(ready)
        if self.state is not None:
            self._listen([channel])

    def _unsubscribe(self, channel: str, target: Any) -> None:
        subscribers = self.subscribers.get(channel)
        if subscribers is None:
            return
        # A target (ActorRef or callable) goes with all its subscriptions to the
        # channel; a Listener, the subscription it is (Pool.listen's own undo).
        subscribers[:] = [] if target is None else [
            s for s in subscribers
            if s is not target and s.target is not target and s.target != target]
        if subscribers:
            return
        del self.subscribers[channel]
        for ready in self.pending.pop(channel, ()):
            _fail(ready, ConnectionError(f"unsubscribed from {channel!r} before it was "
                                         "listened to", reason="stopped"))
        if channel in self.listening:
            self.listening.discard(channel)
            outcome = self.driver.unlisten(self.state, channel)
            if isinstance(outcome, Disconnect):
                self._lost(outcome.error)

    def _listen(self, channels: Iterable[str]) -> bool:
        """LISTEN to ``channels`` and complete their pending subscriptions; False
        if the connection was lost meanwhile."""
        for channel in channels:
            outcome: Outcome[Any] = self.driver.listen(self.state, channel)
            if isinstance(outcome, Disconnect):
                self._lost(outcome.error)
                return False
            if not isinstance(outcome, Ok):
                waiting = self.pending.pop(channel, [])
                if not waiting:
                    # Its subscribers listened before (a reconnect): keep them, and
                    # try again later (a standby in recovery refuses LISTEN).
                    self._lost(outcome.error)
                    return False
                self.subscribers.pop(channel, None)  # refused, e.g. a role without rights
                for ready in waiting:
                    _fail(ready, outcome.error)
                continue
            self.listening.add(channel)
            for ready in self.pending.pop(channel, ()):
                _done(ready)
        return True

    # -- the connection ----------------------------------------------------

    def _connect(self) -> None:
        opts: dict[str, Any] = {**self.config.connect_opts, "pool_index": RELAY_INDEX}
        try:
            if self.config.configure is not None:
                opts = dict(self.config.configure(opts))
            # A shared budget counts this connection too (see dbpool.pool.budget).
            state = open_session(self.config, RELAY_INDEX, opts)
        except Exception as exc:
            error = connect_error(self.config, "the notification relay failed to connect",
                                  exc, opts)
            logger.warning("%s", error)
            self._schedule_connect(self.backoff.next())
            return
        if state is None:  # no budget slot free
            self._schedule_connect(self.config.claim_interval)
            return
        self.state = state
        logger.info("%s: the notification relay is connected", self.config.pool_name)
        self.backoff.reset()
        self._last_heard = time.monotonic()
        if not self._listen(list(self.subscribers)):
            return
        if self.down is not None:
            reason, self.down = self.down, None
            for channel, subscribers in list(self.subscribers.items()):
                deliver(subscribers, NotificationGap(self.config.pool_name, channel, reason))
        self.actor_ref.tell(_Wait())

    def _wait(self) -> None:
        """Wait for notifications (or a message), deliver them, and come back."""
        outcome: Outcome[list[Notification]] = self.driver.notifications(
            self.state, self.idle_interval, self.waker.fileno())
        self.waker.drain()
        if isinstance(outcome, Disconnect):
            self._lost(outcome.error)
            return
        now = time.monotonic()
        if isinstance(outcome, Ok) and outcome.value:
            self._last_heard = now
            pool = self.config.pool_name
            for note in outcome.value:
                subscribers = self.subscribers.get(note.channel)
                if subscribers:
                    deliver(subscribers, NotificationEvent(pool, note.channel, note.payload,
                                                           note.backend_pid))
        elif now - self._last_heard >= self.idle_interval:
            # Nothing heard for a while: make sure the connection still answers.
            ping = self.driver.ping(self.state)
            if isinstance(ping, Disconnect):
                self._lost(ping.error)
                return
            self._last_heard = now
        self.actor_ref.tell(_Wait())

    def _lost(self, error: BaseException) -> None:
        reason = one_line(error)
        logger.warning("%s: the notification relay lost its connection: %s",
                       self.config.pool_name, reason)
        if self.down is None:
            self.down = reason
        self._disconnect(error)
        self._schedule_connect(self.backoff.next())

    def _disconnect(self, error: BaseException) -> None:
        state, self.state = self.state, None
        self.listening.clear()
        if state is not None:
            self.driver.disconnect(error, state)

    def _schedule_connect(self, delay: float) -> None:
        self._attempt += 1  # a Connect scheduled before is stale from now on
        self.config.scheduler.tell_soon(delay, self.actor_ref, Connect(self._attempt))


def _done(ready: Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _fail(ready: Future[None], error: BaseException) -> None:
    if not ready.done():
        ready.set_exception(error)
