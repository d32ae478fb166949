"""Start pools for tests and wait until they are ready."""

from __future__ import annotations

from typing import Any

from dbpool.actors.listeners import ConnectionEvent
from dbpool.pool import Pool

from .events import Recorder, kind


def start_named(
    dsn: str, pools: list[Pool], app: str, size: int = 1, **options: Any
) -> tuple[Pool, Recorder[ConnectionEvent]]:
    """A pool whose sessions carry ``application_name=app``, once all ``size`` connected.

    The pool is appended to ``pools`` (the fixture that stops them); the
    recorder has every connection event from the start.
    """
    events: Recorder[ConnectionEvent] = Recorder()
    pool = Pool.start(dsn, pool_size=size, connection_listeners=[events],
                      connect_kwargs={"application_name": app}, **options)
    pools.append(pool)
    events.wait_count(kind("connected"), size)
    return pool, events
