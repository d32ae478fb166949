"""Using a pool from other pykka actors, by message.

The pool actor (``pool.ref``) accepts :class:`RunQuery`.  It never runs the
query on its own thread: a worker checks out a connection, runs the
statement and checks the connection back in, so the pool actor's mailbox
(supervision, timers, events) never waits on the database, and an actor
that asks cannot deadlock it.

Ask, and get a future of the result at once::

    future = pool.ref.ask(RunQuery("SELECT %s::int", [42]))
    result = future.get(timeout=5)      # a Result, or raises the error

Or tell, and receive the answer as a message (nothing blocks)::

    pool.ref.tell(RunQuery("SELECT 1", reply_to=self.actor_ref, tag="q1"))
    # ... later, in on_receive: QueryReply(tag="q1", result=..., error=None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbpool.driver import Params, Result

__all__ = ["QueryReply", "RunQuery"]


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Run one statement on a pooled connection.

    ``timeout`` defaults to the pool's.  With ``reply_to`` (an ActorRef) the
    answer is told to it as a :class:`QueryReply` carrying ``tag``; without
    it, ``ask`` returns a pykka Future of the :class:`~dbpool.driver.Result`.
    """

    sql: str
    params: Params = None
    timeout: float | None = None
    reply_to: Any = None
    tag: Any = None


@dataclass(frozen=True, slots=True)
class QueryReply:
    """The answer to a :class:`RunQuery` sent with ``reply_to``."""

    tag: Any
    result: Result | None
    error: BaseException | None
