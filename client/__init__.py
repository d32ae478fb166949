"""The client library of ``dbpool serve``: :class:`Client` and :class:`AsyncClient`.

Both speak the wire protocol of ``docs/protocol.md`` over ZeroMQ::

    from dbpool.client import Client

    with Client("tcp://127.0.0.1:7432") as client:
        result = client.query("SELECT id, name FROM users WHERE id = %s", [42])
        result.rows                      # [(42, 'ada')]
        with client.transaction() as tx:  # commit on exit, rollback on exception
            tx.execute("UPDATE users SET name = %s WHERE id = %s", ["bob", 42])
        with client.stream("SELECT * FROM big", max_rows=1000) as stream:
            for row in stream.rows():
                ...
        with client.subscribe(("pool",)) as sub:
            event = sub.get(timeout=5)    # Event(topic, name, data) or None

:class:`AsyncClient` has the same API as coroutines (``await
client.query(...)``, ``async with client.transaction() as tx``, ``async for
page in client.stream(...)``, ``async for event in client.subscribe(...)``).

Results are :class:`dbpool.driver.Result` objects, as in-process.  Errors
are raised as they would be in-process: a SQL error as the
``psycopg.errors`` class for its SQLSTATE, with ``diag`` filled in; a pool
error as :class:`dbpool.errors.ConnectionError` with its ``reason``.  A
request that gets no reply within its timeout raises ``ConnectionError``
with ``reason="timeout"``.

Threads and event loops
-----------------------
A :class:`Client` may be shared by threads: each thread uses a ``DEALER``
socket of its own, created on its first request (``threading.local``), and
:meth:`Client.close` closes them all (call it once the other threads are
done with the client).  A transaction, stream or subscription is used by
one thread at a time.  Heartbeats for open transactions and streams come
from a daemon thread with its own socket.

An :class:`AsyncClient` belongs to one event loop (the one it is first
used in).  It has one socket and a reader task that matches replies to
requests by id, so many tasks may have requests in flight at once.

Timeouts, reconnects and heartbeats
-----------------------------------
Sockets are set ``IMMEDIATE`` (a request is only queued on a live
connection), ``LINGER=0`` and reconnect every 100 ms backing off to 1 s,
so after a server restart the next request works without the caller doing
anything.  After a timeout the socket is replaced, so a late reply is never
taken for another request's, and with several endpoints the client moves
to the next one.  A ``timeout`` passed to a call is also sent to the
server; the client's own default is not.

While a transaction or a stream is open the client sends a ``heartbeat``
every third of the server's ``heartbeat_timeout`` (from the ``begin``
reply; 10 s until one was seen), so the server keeps the lease.
"""

from dbpool.driver import Column, Result

from .aio import AsyncClient, AsyncCopyTo, AsyncStream, AsyncTransaction
from .events import AsyncSubscription, Event, Subscription
from .sync import Client, CopyTo, Stream, Transaction

__all__ = [
    "AsyncClient",
    "AsyncCopyTo",
    "AsyncStream",
    "AsyncSubscription",
    "AsyncTransaction",
    "Client",
    "Column",
    "CopyTo",
    "Event",
    "Result",
    "Stream",
    "Subscription",
    "Transaction",
]
