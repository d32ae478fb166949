"""The server's events: :class:`Event`, :class:`Subscription`, :class:`AsyncSubscription`,
and what a subscriber knows of one channel's notifications: :class:`Channel`
(the subscriptions themselves are in ``client/_async/notifications.py``).

``dbpool serve`` publishes events on a ``PUB`` socket as two frames,
``[topic, body]`` (``docs/protocol.md``, "Events").  A subscription is a
``SUB`` socket subscribed to topic prefixes; each message becomes an
:class:`Event`.  A message that is not a valid event (wrong frame count, a
body that is not a map with a string ``event``) is logged and skipped.

Like every ZeroMQ socket, a subscription belongs to one thread (or, for
:class:`AsyncSubscription`, one event loop); :meth:`Subscription.close`
must not be called while another thread waits in :meth:`Subscription.get`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio

from dbpool.errors import ConnectionError
from dbpool.keys import ClientKeys
from dbpool.protocol import LISTEN_TTL
from dbpool.wire import WireError, unpackb

__all__ = ["RENEW_EVERY", "AsyncSubscription", "Channel", "Event", "Subscription",
           "parse_event"]

logger = logging.getLogger("dbpool.client.events")

#: Events a subscription may have waiting, unread (the server keeps as many more).
RECEIVE_HWM = 50_000


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its ``topic`` (``"connection"``, ``"pool"``, ``"telemetry"``),
    its ``name`` (the body's ``event``: ``"connected"``, ``"stopped"``, ...) and
    ``data``, the whole body map (``event``, ``pool``, ``time`` and the
    event's own keys)."""

    topic: str
    name: str
    data: dict[str, Any]


def parse_event(frames: Sequence[bytes]) -> Event | None:
    """The event in a message's frames, or None (logged) if it is not one."""
    if len(frames) != 2:
        logger.warning("dropped an event message of %d frames (expected 2)", len(frames))
        return None
    topic = bytes(frames[0]).decode("ascii", "replace")
    try:
        body = unpackb(frames[1])
    except WireError as exc:
        logger.warning("dropped a malformed %s event: %s", topic, exc)
        return None
    if not isinstance(body, dict) or not isinstance(body.get("event"), str):
        logger.warning("dropped a %s event without a name: %r", topic, body)
        return None
    return Event(topic, body["event"], body)


def _configure(sock: zmq.Socket[Any], endpoint: str, topics: Sequence[str],
               keys: ClientKeys | None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    # A burst of notifications must not overflow libzmq's default of 1,000.
    sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.connect(endpoint)


class Subscription:
    """A blocking subscription to a server's events (``Client.subscribe``).

    :meth:`get` waits for the next event; iterating yields events until the
    subscription is closed.  A context manager; :meth:`close` is idempotent.
    """

    def __init__(self, context: zmq.Context[Any], endpoint: str, topics: Sequence[str],
                 keys: ClientKeys | None = None) -> None:
        #: The events endpoint this subscription is connected to.
        self.endpoint = endpoint
        #: The topic prefixes subscribed to.
        self.topics = tuple(topics)
        self._sock: zmq.Socket[Any] = context.socket(zmq.SUB)
        try:
            _configure(self._sock, endpoint, self.topics, keys)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        logger.debug("subscribed to %s on %s", self.topics, endpoint)

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: until one comes).

        Returns None if none came in time or the subscription is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._sock.closed:
            if deadline is None:
                ready = self._poller.poll()
            else:
                ready = self._poller.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000)))
            if not ready:
                return None
            event = parse_event(self._sock.recv_multipart(zmq.NOBLOCK))
            if event is not None:
                return event
        return None

    def __iter__(self) -> Iterator[Event]:
        while (event := self.get()) is not None:
            yield event

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return bool(self._sock.closed)

    def close(self) -> None:
        """Close the socket.  Idempotent."""
        if not self._sock.closed:
            self._sock.close(linger=0)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.endpoint} {list(self.topics)}>"


class AsyncSubscription:
    """An asyncio subscription to a server's events (``AsyncClient.subscribe``).

    The socket connects on ``await sub``, ``async with sub`` or the first
    :meth:`get` (the endpoint may need a ``status`` request first).
    ``async for event in sub`` yields events until the subscription is
    closed.  :meth:`close` is a coroutine and idempotent.
    """

    def __init__(self, context: zmq.asyncio.Context, endpoint: Callable[[], Awaitable[str]],
                 topics: Sequence[str], keys: ClientKeys | None = None) -> None:
        self._context = context
        self._keys = keys
        self._resolve = endpoint
        #: The topic prefixes subscribed to.
        self.topics = tuple(topics)
        #: The events endpoint, once connected.
        self.endpoint: str | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._closed = False

    async def connect(self) -> AsyncSubscription:
        """Connect the socket now (if not yet); return the subscription."""
        if self._closed:
            raise RuntimeError("the subscription is closed")
        if self._sock is None:
            endpoint = await self._resolve()
            if self._sock is None and not self._closed:
                sock = self._context.socket(zmq.SUB)
                try:
                    _configure(sock, endpoint, self.topics, self._keys)
                except BaseException:
                    sock.close(linger=0)
                    raise
                self._sock, self.endpoint = sock, endpoint
                logger.debug("subscribed to %s on %s", self.topics, endpoint)
        return self

    def __await__(self) -> Generator[Any, None, AsyncSubscription]:
        return self.connect().__await__()

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: until one comes).

        Returns None if none came in time or the subscription is closed.
        """
        if self._closed:
            return None
        await self.connect()
        sock = self._sock
        assert sock is not None
        try:
            async with asyncio.timeout(timeout):
                while not sock.closed:
                    event = parse_event(await sock.recv_multipart())
                    if event is not None:
                        return event
        except TimeoutError:
            return None
        except (zmq.ZMQError, asyncio.CancelledError):
            # close() cancels a pending receive; a cancelled task still raises.
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                return None
            raise
        return None

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def close(self) -> None:
        """Close the socket.  Idempotent."""
        self._closed = True
        if self._sock is not None and not self._sock.closed:
            self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncSubscription:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncSubscription {self.endpoint or '(not connected)'} {list(self.topics)}>"


#: Seconds between a subscriber's ``listen`` requests, which keep the server
#: listening (it stops LISTEN_TTL after the last one), and which find out soon
#: that a restarted server must be asked to listen again.
RENEW_EVERY = min(5.0, LISTEN_TTL / 3)


class Channel:
    """What a subscriber to one channel knows, without I/O (both clients use it).

    Built from the answer to ``listen``.  :meth:`take` turns what arrives on
    the channel's topic into the events to hand the caller: notifications,
    the server's gaps, and a gap of its own when a sequence number was
    skipped (events dropped for a slow reader) or the server began to
    listen afresh (``since`` changed: it restarted, or was not renewed).
    """

    def __init__(self, answer: Any) -> None:
        try:
            self.pool: str = answer["pool"]
            self.channel: str = answer["channel"]
            self.topic: str = answer["topic"]
            self.since: int = answer["since"]
            #: The event endpoint the answering server publishes on.
            self.events: str | None = answer.get("events")
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConnectionError(f"malformed answer to listen: {answer!r:.200}") from exc
        #: The sequence number of the last event seen (None: none yet).
        self.seq: int | None = None

    def moved(self, answer: Any) -> bool:
        """Whether the answer came from another server than the events heard so far
        (the client moved to another endpoint): the subscription must follow."""
        events = answer.get("events") if isinstance(answer, dict) else None
        if events is None or events == self.events:
            return False
        self.events = events
        return True

    def renewed(self, answer: Any) -> Event | None:
        """A gap if the answer to a renewing ``listen`` shows a new beginning."""
        since = answer.get("since") if isinstance(answer, dict) else None
        if since is None or since == self.since:
            return None
        self.since, self.seq = since, None
        return self._gap("the server began to listen afresh (it restarted, or no listen "
                         "request renewed the channel in time)")

    def take(self, event: Event) -> list[Event]:
        """The events to hand the caller for ``event``, in order."""
        data = event.data
        seq, since = data.get("seq"), data.get("since")
        out: list[Event] = []
        if isinstance(since, int) and since != self.since:
            if event.name == "listening":
                return out  # a mark of a beginning this subscriber has not heard of yet
            self.since, self.seq = since, None
            out.append(self._gap("the server began to listen afresh (it restarted)"))
        if isinstance(seq, int):
            if self.seq is not None and seq > self.seq + 1:
                out.append(self._gap(f"{seq - self.seq - 1} events missed: this subscriber "
                                     "read too slowly"))
            if self.seq is None or seq > self.seq:
                self.seq = seq
        if event.name in ("notification", "gap"):
            out.append(Event("notify", event.name, data))
        return out

    def joined(self, event: Event, nonce: str) -> bool:
        """Whether ``event`` is the ``listening`` mark of the request with ``nonce``."""
        return event.name == "listening" and event.data.get("nonce") == nonce

    def _gap(self, reason: str) -> Event:
        return Event("notify", "gap", {"event": "gap", "pool": self.pool,
                                       "channel": self.channel, "reason": reason,
                                       "time": time.time()})
