"""Remote LISTEN: the served pools' notifications, published on the event socket.

A client's ``listen`` request (``docs/protocol.md``, "Notifications") makes
the pool it names listen to a channel, through the pool's own relay
(:mod:`dbpool.actors.relay`), and is answered once the ``LISTEN`` is in
force.  Each notification then goes out on the event socket under the
topic ``notify:POOL:CHANNEL`` and a NUL byte, as a ``notification`` event;
a ``gap`` event follows a lost listening connection.  Who may subscribe to
which topics is the event socket's business (:mod:`dbpool.server.events`):
a client hears only the pools it may use.

Each channel's events carry ``seq``, counting from 1 since the server began
to listen to the channel; a subscriber that sees a number skipped knows it
missed events (it read too slowly).  The answer to ``listen`` carries
``since``, which names that beginning.

ZeroMQ does not tell the server which subscribers remain, so a channel is
kept by its ``listen`` requests: the server stops listening to it
:data:`~dbpool.protocol.LISTEN_TTL` seconds after the last one.  A client
renews well before.  If it comes back later (its process slept), the
answer's ``since`` has changed, and the client reports a gap.

A ``listen`` request with a ``nonce`` is followed by a ``listening`` event
with that nonce on the channel's topic, once the ``LISTEN`` is in force:
ZeroMQ joins a new subscriber a moment after it subscribes, and the client
waits for that event to know it hears every notification from then on.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from dbpool.actors.listeners import NotificationEvent, NotificationGap
from dbpool.protocol import LISTEN_TTL, error_map, notify_topic

from .served_pool import ServedPool

__all__ = ["MAX_CHANNELS", "RemoteListens"]

logger = logging.getLogger("dbpool.server.notify")

#: Channels the server listens to for remote clients, at most, in all: each is
#: a LISTEN on the pools' relays and a list PostgreSQL walks at every NOTIFY,
#: so a client that asks for channel after channel must not grow it for ever.
MAX_CHANNELS = 1000



@dataclass(frozen=True, slots=True)
class _Waiter:
    """A ``listen`` request waiting for its LISTEN to be in force."""

    answer: Callable[[Any], object]
    fail: Callable[[dict[str, Any]], object]
    nonce: str | None
    deadline: float


@dataclass(eq=False)
class _Channel:
    """One channel of one pool that remote clients listen to."""

    served: ServedPool
    name: str
    topic: bytes
    #: Random, new each time the server begins to listen to the channel.
    since: int
    renewed: float
    #: The callable subscribed to the pool's relay for this channel.
    listener: Callable[[Any], None] | None = None
    ready: bool = False
    waiting: list[_Waiter] = field(default_factory=list)
    seq: int = 0


class RemoteListens:
    """The channels remote clients listen to, for the front end's loop (not thread-safe).

    ``post`` runs a callable on the loop (from any thread); ``publish(topic,
    event)`` sends an event.
    """

    def __init__(self, post: Callable[[Callable[[], None]], None],
                 publish: Callable[[bytes, dict[str, Any]], None],
                 events: Callable[[], str]) -> None:
        self._post = post
        self._publish = publish
        #: The event socket's endpoint, as the status map gives it: an answer says
        #: where its notifications go out (a client that moved servers follows).
        self._events = events
        self._channels: dict[tuple[str, str], _Channel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def listen(self, served: ServedPool, channel: str, nonce: str | None, deadline: float,
               answer: Callable[[Any], object], fail: Callable[[dict[str, Any]], object]) -> None:
        """Listen to ``channel`` on ``served`` (or keep listening); ``answer`` the
        request once in force, or ``fail`` it with an error map (at ``deadline``,
        a ``connection``/``timeout`` one)."""
        now = time.monotonic()
        key = (served.name, channel)
        entry = self._channels.get(key)
        if entry is None and len(self._channels) >= MAX_CHANNELS:
            fail({"kind": "connection", "reason": "client_limit",
                  "message": f"the server listens to {MAX_CHANNELS} channels already, its "
                             "limit; unused ones go 60 s after their last listen request"})
            return
        if entry is None:
            entry = self._channels[key] = _Channel(
                served, channel, notify_topic(served.name, channel), secrets.randbits(52), now)
            if not self._start(entry, fail):
                return
        entry.renewed = now
        if entry.ready:
            self._confirm(entry, answer, nonce)
        else:
            entry.waiting.append(_Waiter(answer, fail, nonce, deadline))

    def expire(self, now: float) -> None:
        """Fail ``listen`` requests past their deadline; stop listening to channels
        no ``listen`` request renewed for LISTEN_TTL, or of a pool no longer served."""
        for key, entry in list(self._channels.items()):
            late = [waiter for waiter in entry.waiting if waiter.deadline <= now]
            for waiter in late:
                entry.waiting.remove(waiter)
                waiter.fail({"kind": "connection", "reason": "timeout",
                             "message": f"{entry.served.name}: not listening to "
                                        f"{entry.name!r} within the request's timeout"})
            if (entry.served.removed or now - entry.renewed > LISTEN_TTL) and not entry.waiting:
                logger.info("front end: no client renewed %r on pool %s; no longer listening",
                            entry.name, entry.served.name)
                self._drop(key, entry)

    def close(self) -> None:
        for key, entry in list(self._channels.items()):
            self._drop(key, entry)

    # -- on the loop -------------------------------------------------------

    def _start(self, entry: _Channel, fail: Callable[[dict[str, Any]], object]) -> bool:
        post = self._post

        def heard(event: Any) -> None:  # on the relay's thread
            post(lambda: self._heard(entry, event))

        entry.listener = heard
        try:
            ready = entry.served.pool.start_listening(entry.name, heard)
        except Exception as error:  # the pool is stopped
            del self._channels[(entry.served.name, entry.name)]
            fail(error_map(error))
            return False

        def done(future: Future[None]) -> None:  # on the relay's (or this) thread
            post(lambda: self._ready(entry, future.exception()))

        ready.add_done_callback(done)
        return True

    def _ready(self, entry: _Channel, error: BaseException | None) -> None:
        key = (entry.served.name, entry.name)
        if self._channels.get(key) is not entry:
            return  # dropped meanwhile
        waiting, entry.waiting = entry.waiting, []
        if error is not None:
            del self._channels[key]
            for waiter in waiting:
                waiter.fail(error_map(error))
            return
        entry.ready = True
        for waiter in waiting:
            self._confirm(entry, waiter.answer, waiter.nonce)

    def _confirm(self, entry: _Channel, answer: Callable[[Any], object],
                 nonce: str | None) -> None:
        answer({"pool": entry.served.name, "channel": entry.name,
                "topic": entry.topic.decode(), "since": entry.since, "seq": entry.seq,
                "events": self._events()})
        if nonce is not None:
            self._send(entry, {"event": "listening", "nonce": nonce})

    def _heard(self, entry: _Channel, event: Any) -> None:
        if self._channels.get((entry.served.name, entry.name)) is not entry:
            return  # dropped: what the relay had on its way goes nowhere
        if isinstance(event, NotificationEvent):
            self._send(entry, {"event": "notification", "payload": event.payload,
                               "backend_pid": event.backend_pid})
        elif isinstance(event, NotificationGap):
            self._send(entry, {"event": "gap", "reason": event.reason})

    def _send(self, entry: _Channel, event: dict[str, Any]) -> None:
        entry.seq += 1
        self._publish(entry.topic, {**event, "pool": entry.served.name, "channel": entry.name,
                                    "since": entry.since, "seq": entry.seq,
                                    "time": time.time()})

    def _drop(self, key: tuple[str, str], entry: _Channel) -> None:
        del self._channels[key]
        if entry.listener is not None:
            entry.served.pool.stop_listening(entry.name, entry.listener)
