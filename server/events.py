"""The server's event socket: a PUB that lets each subscriber see only its pools' notifications.

Events go out on one ZeroMQ socket as ``[topic, body]`` (``docs/protocol.md``,
"Events").  A plain ``PUB`` sends a subscriber whatever its prefixes match,
and the prefix ``""`` matches everything, notifications of every pool
included; but a client may hear ``NOTIFY``s only of the pools it may use,
as it may query only those.  So the socket is an ``XPUB`` in manual mode:
libzmq hands each subscription (and unsubscription) to the server, with the
subscriber's CURVE name, and applies only what the server applies for that
subscriber (:func:`allowed`):

- a notification topic ``notify:POOL:...`` only if the client may use POOL;
- a prefix of one, short of a whole pool name (``notify:`` or ``notify:a``),
  as the topics ``notify:POOL:`` of the pools it matches and may use;
- a prefix of ``notify:`` itself (``""``, ``"n"`` ... ``"notify"``) as the
  other topics it matches, and ``notify:POOL:`` for each pool it may use;
- anything else as it is: it matches no notification.

When a subscriber goes, libzmq forgets what was applied for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

import zmq

from dbpool.protocol import EVENT_TOPICS, NOTIFY_TOPIC

__all__ = ["EventSocket", "allowed"]

logger = logging.getLogger("dbpool.server.events")

_NOTIFY = NOTIFY_TOPIC.encode()
_OTHERS = tuple(topic.encode() for topic in EVENT_TOPICS)
#: Messages a slow subscriber may have waiting before it misses some (it can
#: tell: each notification carries its channel's sequence number).
SEND_HWM = 50_000
#: The longest subscription message taken (a pool's name and a channel's fit well).
MAX_SUBSCRIPTION = 1024
#: Subscriptions applied per :meth:`EventSocket.read`: a flood of them waits its
#: turn behind the requests (:attr:`EventSocket.pending` brings the loop back).
READ_BATCH = 256


def allowed(topic: bytes, pools: Iterable[str], may_use: Callable[[str], bool]) -> list[bytes]:
    """The topics to apply for a subscriber that asked for ``topic`` (see the module)."""
    if topic.startswith(_NOTIFY):
        rest = topic[len(_NOTIFY):]
        pool, sep, _ = rest.partition(b":")
        if sep:
            name = pool.decode("utf-8", "replace")
            return [topic] if name in pools and may_use(name) else []
        return [_NOTIFY + name.encode() + b":" for name in sorted(pools)
                if name.encode().startswith(rest) and may_use(name)]
    if _NOTIFY.startswith(topic):
        return [*(other for other in _OTHERS if other.startswith(topic)),
                *(_NOTIFY + name.encode() + b":" for name in sorted(pools) if may_use(name))]
    return [topic]


class EventSocket:
    """The bound ``XPUB``: :meth:`publish` sends, :meth:`read` applies subscriptions.

    ``may_use(user_id)`` gives the predicate on pool names of the subscriber
    whose CURVE User-Id that is (None without CURVE); ``pools()`` names the
    pools served now.
    """

    def __init__(self, sock: zmq.Socket[Any], pools: Callable[[], Iterable[str]],
                 may_use: Callable[[str | None], Callable[[str], bool]]) -> None:
        self.sock = sock
        self._pools = pools
        self._may_use = may_use
        #: Subscriptions are left to apply (the socket's descriptor, edge-triggered,
        #: will not say so again): the loop calls :meth:`read` before it sleeps.
        self.pending = False

    @staticmethod
    def configure(sock: zmq.Socket[Any]) -> None:
        """Set an ``XPUB``'s options before it binds."""
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.XPUB_MANUAL, 1)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        # A subscription is a topic: a subscriber that sends more is cut off.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION)

    @property
    def fd(self) -> int:
        """The descriptor to poll (edge-triggered: :meth:`read` re-arms it)."""
        return cast(int, self.sock.getsockopt(zmq.FD))

    def publish(self, topic: bytes, body: bytes) -> None:
        try:
            self.sock.send_multipart([topic, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            logger.debug("front end: event dropped", exc_info=True)

    def read(self) -> None:
        """Apply every subscription waiting, each for the subscriber that sent it."""
        try:
            self._read()
        except zmq.ZMQError:  # closed (a rebind that failed): nothing to apply
            self.pending = False
            logger.debug("front end: event socket unreadable", exc_info=True)

    def _read(self) -> None:
        sock = self.sock
        self.pending = True  # until the socket says it has nothing more
        for _ in range(READ_BATCH):
            if not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self.pending = False
                return
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.pending = False
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                continue  # not a subscription: subscribers send nothing else
            try:
                user = cast("str | None", frame.get("User-Id"))
            except zmq.ZMQError:  # no CURVE: no name
                user = None
            topics = allowed(data[1:], list(self._pools()), self._may_use(user))
            option = zmq.SUBSCRIBE if data[0] == 1 else zmq.UNSUBSCRIBE
            for topic in topics:  # each applies to the subscriber of the last message read
                sock.setsockopt(option, topic)
            if data[0] == 1 and data[1:].startswith(_NOTIFY) and not topics:
                logger.debug("front end: a subscriber (%s) may not hear %r",
                             user or "anonymous", data[1:80].decode("utf-8", "replace"))

    def close(self) -> None:
        self.sock.close(linger=0)
