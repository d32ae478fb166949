"""A channel's notifications from ``dbpool serve``: :class:`AsyncNotifications`.

This file is the one source: the asyncio client uses it as it is, and the
sync client uses ``client/_sync/notifications.py``, generated from it by
``.ci/generate_sync.py``.  What the events mean, and the gaps, are worked
out without I/O by :class:`~dbpool.client.events.Channel`; this adds the
subscription, the join and the renewals (``docs/protocol.md``,
"Notifications").
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

from dbpool.errors import ConnectionError

from .. import events
from ..events import AsyncSubscription, Channel, Event

__all__ = ["AsyncNotifications"]

logger = logging.getLogger("dbpool.client.events")

#: Seconds to wait for the ``listening`` event before asking again (see _join).
JOIN_STEP = 0.2


class AsyncNotifications:
    """A channel's notifications from the server (``client.listen``).

    :meth:`get` waits for the next :class:`~dbpool.client.events.Event`:
    ``notification`` (``data`` has ``payload``, ``backend_pid``, ``channel``,
    ``pool``) or ``gap`` (``data["reason"]``: some may have been missed;
    re-read what they tell about).  Iterating yields them until closed.
    Between events, ``get`` renews the server's ``LISTEN`` every few
    seconds: a subscription left unread for a minute lets the server stop
    listening, and the next ``get`` reports that as a gap.  Like any
    subscription, it belongs to one thread (or event loop).
    """

    def __init__(self, listen: Callable[[str | None], Awaitable[Any]],
                 subscribe: Callable[[str], AsyncSubscription], channel: Channel,
                 timeout: float) -> None:
        self._listen = listen
        self._subscribe = subscribe
        self._timeout = timeout
        self._sub = subscribe(channel.topic)
        self._channel = channel
        #: The pool and channel listened to.
        self.pool, self.channel = channel.pool, channel.channel
        self._ready: deque[Event] = deque()
        self._renewed = time.monotonic()

    @classmethod
    async def open(cls, listen: Callable[[str | None], Awaitable[Any]],
                   subscribe: Callable[[str], AsyncSubscription],
                   timeout: float) -> AsyncNotifications:
        """Listen, subscribe, and return once the subscription hears the channel."""
        deadline = time.monotonic() + timeout
        channel = Channel(await listen(None))
        notes = cls(listen, subscribe, channel, timeout)
        try:
            await notes._join(deadline)
        except BaseException:
            await notes.close()
            raise
        return notes

    async def _join(self, deadline: float) -> None:
        """Return once this subscription hears the channel's events.

        ZeroMQ joins a subscriber a moment after it subscribes: until then the
        server's events pass it by.  So ask for a ``listening`` mark, and
        again until one arrives.
        """
        while True:
            nonce = secrets.token_hex(8)
            self._renewal(await self._listen(nonce))
            step = min(deadline, time.monotonic() + JOIN_STEP)
            while (event := await self._sub.get(max(0.0, step - time.monotonic()))) is not None:
                self._ready.extend(self._channel.take(event))
                if self._channel.joined(event, nonce):
                    self._renewed = time.monotonic()
                    return
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"the events of channel {self.channel!r} did not arrive from "
                    f"{self._sub.endpoint}", reason="timeout")

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: until one comes).

        Returns None if none came in time or the subscription is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._sub.closed:
            if self._ready:
                return self._ready.popleft()
            now = time.monotonic()
            if now - self._renewed >= events.RENEW_EVERY:
                await self._renew(now)
                continue
            wait = self._renewed + events.RENEW_EVERY - now
            if deadline is not None:
                if now >= deadline:
                    return None
                wait = min(wait, deadline - now)
            event = await self._sub.get(max(0.0, wait))
            if event is not None:
                self._ready.extend(self._channel.take(event))
        return None

    async def _renew(self, now: float) -> None:
        self._renewed = now
        try:
            answer = await self._listen(None)
            self._renewal(answer)
            if self._channel.moved(answer):
                # The client moved to another server: hear that one's events now.
                logger.info("listen on %r moved to %s", self.channel, self._channel.events)
                await self._sub.close()
                self._sub = self._subscribe(self._channel.topic)
                await self._join(time.monotonic() + self._timeout)
        except (ConnectionError, TimeoutError) as error:  # the server is away: try again
            logger.info("listen on %r not renewed: %s", self.channel, error)
            self._renewed = now - events.RENEW_EVERY + 1.0

    def _renewal(self, answer: Any) -> None:
        gap = self._channel.renewed(answer)
        if gap is not None:
            self._ready.append(gap)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the client closed)."""
        return self._sub.closed

    async def close(self) -> None:
        """Stop hearing the channel (the server stops listening once nobody renews)."""
        await self._sub.close()

    async def __aenter__(self) -> AsyncNotifications:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.pool}:{self.channel}>"
