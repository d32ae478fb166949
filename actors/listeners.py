"""Connection listeners: who hears that a connection connected or disconnected.

They also hear of the pool's health: a :class:`HealthEvent` for every change
of its circuit breaker's state (see :mod:`dbpool.pool.breaker`), and a
:class:`ResizeEvent` for every change of its size.  The same
kinds of listener subscribe to a channel's notifications with
``pool.listen``: they hear a :class:`NotificationEvent` for each ``NOTIFY``
and a :class:`NotificationGap` when some may have been missed (see
:mod:`dbpool.actors.relay`).

A listener is a pykka :class:`~pykka.ActorRef` (it is *told* the event) or a
callable (it is *called* with the event), optionally paired with a tag:
``listeners=[ref, on_event, (ref2, "replica-a")]``.  The tag rides along in
:attr:`ConnectionEvent.tag`, as DBConnection's ``{:connected, pid, tag}``.

Delivery never harms the pool: a dead actor or a callable that raises is
logged and skipped.  Callables run on the pool actor's thread, so they must
be quick; hand long work to an actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

import pykka

__all__ = [
    "ConnectionEvent", "Event", "EventKind", "HealthEvent", "Listener", "ListenerSpec",
    "NotificationEvent", "NotificationGap", "ResizeEvent", "deliver", "normalize",
]

logger = logging.getLogger("dbpool.actors.listeners")

EventKind = Literal["connected", "disconnected"]


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A connection of pool :attr:`pool` (index :attr:`index`) connected or disconnected.

    :attr:`connection` is the connection actor's ActorRef; :attr:`backend_pid`
    is the server process that served it (None if never connected);
    :attr:`reason` says why a connection disconnected.
    """

    kind: EventKind
    pool: str
    index: int
    connection: Any
    backend_pid: int | None
    tag: Any = None
    reason: str | None = None
    #: For ``connected``: the seconds the connect took.
    duration: float | None = None


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """Pool :attr:`pool`'s health changed from :attr:`previous` to :attr:`state`.

    States are the circuit breaker's (``closed``, ``open``, ``half_open``; see
    :mod:`dbpool.pool.breaker`); :attr:`reason` says why, and is also set
    (``paused``, ``resumed``, ``drained``) for pause, resume and drain,
    which leave the state as it was.
    """

    pool: str
    state: str
    previous: str
    reason: str | None = None
    tag: Any = None

    @property
    def kind(self) -> str:
        """``"health"``: lets a listener tell it from a ConnectionEvent by ``kind``."""
        return "health"


@dataclass(frozen=True, slots=True)
class ResizeEvent:
    """Pool :attr:`pool` now keeps :attr:`size` connections, from :attr:`previous`.

    :attr:`reason`: ``grow`` or ``shrink`` (elastic sizing, see
    :mod:`dbpool.pool.elastic`), or ``resize`` (:meth:`~dbpool.pool.Pool.resize`).
    """

    pool: str
    size: int
    previous: int
    reason: str
    tag: Any = None

    @property
    def kind(self) -> str:
        """``"resize"``."""
        return "resize"


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """A ``NOTIFY`` on :attr:`channel` with :attr:`payload`, sent by the session
    whose server process is :attr:`backend_pid`, heard by pool :attr:`pool`."""

    pool: str
    channel: str
    payload: str
    backend_pid: int
    tag: Any = None

    @property
    def kind(self) -> str:
        """``"notification"``."""
        return "notification"


@dataclass(frozen=True, slots=True)
class NotificationGap:
    """Notifications on :attr:`channel` may have been missed: the listening
    connection was lost (:attr:`reason`) and is listening again.

    PostgreSQL keeps no notification for a session that is not listening,
    so whatever was sent in between is gone: a subscriber that keeps state
    from notifications should read it afresh.
    """

    pool: str
    channel: str
    reason: str
    tag: Any = None

    @property
    def kind(self) -> str:
        """``"gap"``."""
        return "gap"


#: Everything a listener may hear.
Event: TypeAlias = (
    "ConnectionEvent | HealthEvent | ResizeEvent | NotificationEvent | NotificationGap")
Target: TypeAlias = "pykka.ActorRef[Any] | Callable[[ConnectionEvent], object]"
ListenerSpec: TypeAlias = "Target | tuple[Target, Any]"


@dataclass(frozen=True, slots=True)
class Listener:
    target: Any
    tag: Any = None


def normalize(specs: Iterable[ListenerSpec] | None) -> tuple[Listener, ...]:
    """Turn the ``connection_listeners`` option into :class:`Listener` values."""
    listeners = []
    for spec in specs or ():
        target, tag = spec if isinstance(spec, tuple) else (spec, None)
        if not (isinstance(target, pykka.ActorRef) or callable(target)):
            raise TypeError(f"a listener must be an ActorRef or a callable: {target!r}")
        listeners.append(Listener(target, tag))
    return tuple(listeners)


def deliver(listeners: Sequence[Listener], event: Event) -> None:
    """Send ``event`` to every listener, each with its own tag."""
    for listener in listeners:
        tagged = event if listener.tag is None else replace(event, tag=listener.tag)
        try:
            if isinstance(listener.target, pykka.ActorRef):
                listener.target.tell(tagged)
            else:
                listener.target(tagged)
        except pykka.ActorDeadError:
            logger.warning("listener %r is dead; event %r dropped", listener.target, event)
        except Exception:
            logger.exception("listener %r raised on %r", listener.target, event)


