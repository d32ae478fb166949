"""The messages dbpool's actors tell each other.

Connection actors receive :class:`Connect`, :class:`Probe`, :class:`Reconnect`
and :class:`Ping`.  The pool actor receives :class:`Listen` and
:class:`Unlisten` from its handle and passes them to its LISTEN/NOTIFY relay,
and the rest from its connection actors.
All are immutable; none carries a password.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .listeners import ConnectionEvent, Listener
from .slot import Slot

__all__ = [
    "Connect",
    "ConnectFailed",
    "ConnectionCrashed",
    "ConnectionGaveUp",
    "Listen",
    "Notify",
    "Parked",
    "Ping",
    "Probe",
    "Reconnect",
    "Retire",
    "Unlisten",
]


@dataclass(frozen=True, slots=True)
class Connect:
    """Try to connect.  ``attempt`` lets a stale, scheduled Connect be ignored."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Probe:
    """Connect now, whatever the circuit breaker says: the pool chose this connection
    to probe the database, or to reopen as the pool ramps back up."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Drop the connection in ``slot`` for ``error``, then connect again.

    ``backoff`` waits one backoff step before the first new attempt; without
    it the first attempt is immediate, as DBConnection does after a
    disconnect.  ``taken``: the pool took the connection from the slot
    already (a revoke left it to its holder to close); the actor reports it
    disconnected, through the pool actor like every other disconnection.
    """

    slot: Slot
    generation: int
    error: BaseException
    backoff: bool = False
    taken: bool = False


@dataclass(frozen=True, slots=True)
class Ping:
    """Ping the idle connection in ``slot``, then return it to the pool."""

    slot: Slot


@dataclass(frozen=True, slots=True)
class Notify:
    """A connection event for the pool actor to deliver to listeners."""

    event: ConnectionEvent


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """A connect attempt failed with ``error`` (already free of secrets)."""

    index: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class ConnectionGaveUp:
    """``backoff_type="stop"``: connection ``index`` failed and will not retry."""

    index: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class ConnectionCrashed:
    """Connection actor ``index`` died of an unexpected exception."""

    index: int
    error: BaseException
    actor: Any


@dataclass(frozen=True, slots=True)
class Retire:
    """The pool shrank past this connection: close it and report :class:`Parked`
    (the pool then stops the actor)."""

    slot: Slot


@dataclass(frozen=True, slots=True)
class Parked:
    """Connection ``index`` is down and waits for the pool's :class:`Probe`: the
    circuit breaker did not let it try on its own."""

    index: int


@dataclass(frozen=True, slots=True, eq=False)
class Listen:
    """Subscribe ``listener`` to ``channel``'s notifications; ``ready`` is done
    once the relay's connection listens to the channel (or failed with why not)."""

    channel: str
    listener: Listener
    ready: Future[None]


@dataclass(frozen=True, slots=True, eq=False)
class Unlisten:
    """Unsubscribe ``target`` (an ActorRef or callable given to Listen) from
    ``channel``; None: every subscriber of the channel."""

    channel: str
    target: Any = None
    #: Done once no event goes to ``target`` any more.
    done: Future[None] | None = None
