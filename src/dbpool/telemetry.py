"""Telemetry: named events that any callable can subscribe to.

In the manner of Erlang's ``:telemetry``, which DBConnection uses::

    from dbpool import telemetry

    def on_error(event, measurements, metadata):
        print(metadata["pool"], metadata["error"])

    telemetry.attach("my-handler", ["connection_error"], on_error)

Events (``metadata`` always has ``pool``, the pool's name):

======================  ==========================  ===========================
event                   measurements                metadata
======================  ==========================  ===========================
``connection_error``    ``count=1``                 ``error`` (ConnectionError);
                                                    ``index`` when a connect failed
``connected``           ``count=1``                 ``event`` (ConnectionEvent)
``disconnected``        ``count=1``                 ``event`` (ConnectionEvent)
``checkout``            ``queue_time`` (seconds,    ``index`` (the connection's
                        from the checkout's start)  position in the pool)
``checkin``             ``usage_time`` (seconds     ``index``
                        lent)
``health``              ``count=1``                 ``state``, ``previous``,
                                                    ``reason`` (the circuit
                                                    breaker; pool/breaker.py)
======================  ==========================  ===========================

Handlers run synchronously in the thread that emits, so keep them quick.  A
handler that raises is logged and skipped; it never breaks the pool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

__all__ = ["Handler", "attach", "detach", "emit", "enabled"]

logger = logging.getLogger("dbpool.telemetry")

Handler: TypeAlias = Callable[[str, Mapping[str, float], Mapping[str, Any]], object]

_lock = threading.Lock()
_handlers: dict[str, tuple[frozenset[str], Handler]] = {}
# event -> handlers, rebuilt on attach/detach so that emit takes no lock.
_by_event: dict[str, tuple[Handler, ...]] = {}
#: The events with at least one handler.  Changed in place, never rebound,
#: so a hot path may hold it and test ``event in listened`` without a call.
listened: set[str] = set()


def attach(handler_id: str, events: Iterable[str], handler: Handler) -> None:
    """Call ``handler(event, measurements, metadata)`` for each of ``events``.

    Raises ValueError if ``handler_id`` is already attached.
    """
    with _lock:
        if handler_id in _handlers:
            raise ValueError(f"telemetry handler {handler_id!r} is already attached")
        _handlers[handler_id] = (frozenset(events), handler)
        _rebuild()


def detach(handler_id: str) -> bool:
    """Remove a handler; return whether it was attached."""
    with _lock:
        found = _handlers.pop(handler_id, None) is not None
        _rebuild()
        return found


def enabled(event: str) -> bool:
    """Whether any handler listens to ``event`` (lets hot paths skip building one)."""
    return event in listened


def emit(event: str, measurements: Mapping[str, float], metadata: Mapping[str, Any]) -> None:
    """Call every handler attached to ``event``."""
    for handler in _by_event.get(event, ()):
        try:
            handler(event, measurements, metadata)
        except Exception:
            logger.exception("telemetry handler %r raised on %s", handler, event)


def _rebuild() -> None:
    global _by_event
    table: dict[str, list[Handler]] = {}
    for events, handler in _handlers.values():
        for event in events:
            table.setdefault(event, []).append(handler)
    _by_event = {event: tuple(handlers) for event, handlers in table.items()}
    # Add before removing: a reader may see a superset for a moment (emit then
    # finds no handler), never miss an event that stays listened to.
    listened.update(_by_event)
    listened.intersection_update(_by_event)
