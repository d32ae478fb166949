"""The asyncio client: :class:`AsyncClient`, :class:`AsyncTransaction`, :class:`AsyncStream`.

An :class:`AsyncClient` belongs to the event loop it first sends from.  It
has one ``DEALER`` connection, whose replies go to the requests waiting for
their ``id``, so any number of tasks may have requests in flight at once;
the server answers them in the order they complete.  To a plain
``tcp://host:port`` endpoint the connection speaks ZMTP on the loop's own
transport (:mod:`dbpool.client.direct_async`), with CURVE keys too when
PyNaCl is installed (:mod:`dbpool.curve`); other endpoints, clients with
keys but without PyNaCl, and ``direct=False`` use a ``zmq.asyncio`` socket
and a reader task.  A direct connection that the server closes fails
the requests in flight on it at once (``reason="timeout"``: they may have
run), as the sync client's does.

When a request times out, the socket it used is retired: new requests go
out on a new socket (to the next endpoint, if there are several) and the
old one is closed as soon as the requests still in flight on it have ended,
so a late reply finds nobody and nothing stale is left behind.  Heartbeats
for open transactions and streams come from a task of the client's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import (
    Callable,
    Generator,
    Iterable,
    Sequence,
)
from types import TracebackType
from typing import Any, Literal, TypeAlias, TypeVar, cast

import zmq
import zmq.asyncio

from dbpool.errors import ConnectionError
from dbpool.protocol import VERSION
from dbpool.wire import WireError, make_packer, unpackb
from dbpool.zmtp import HandshakeError

from ._async.requests import AsyncCopyTo, AsyncRequests, AsyncStream
from ._async.requests import AsyncTransaction as _AsyncTransaction
from ._base import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    DEFAULT_TOPICS,
    RECONNECT_INTERVAL,
    Handshakes,
    Keepalive,
    after_failed_connect,
    closed_error,
    configure_socket,
    direct_address,
    direct_handshake,
    error_from_reply,
    handshake_monitor,
    malformed_reply,
    no_server,
    normalize_topics,
    refused,
    request,
    spread_endpoints,
    timed_out,
    to_result,
    unresolved,
)
from .direct_async import AsyncZmtpConnection
from .events import AsyncSubscription

__all__ = ["AsyncClient", "AsyncCopyTo", "AsyncStream", "AsyncTransaction"]

PageT = TypeVar("PageT")

logger = logging.getLogger("dbpool.client.aio")

_unpackb = unpackb
_to_result = to_result
_VERSION = VERSION
_Again = zmq.Again
_NOBLOCK = zmq.NOBLOCK
_EVENTS = zmq.EVENTS
_POLLIN = zmq.POLLIN
_ZMQError = zmq.ZMQError


class _Expired(Exception):
    """A request's time ran out (see AsyncClient._expiring)."""


#: Hands one reply of a channel's to the future of its request.
Resolve = Callable[["_Channel | _DirectChannel", bytes], None]


class _Requests:
    """What either kind of channel has: its endpoint, the futures of its requests in
    flight, its tasks, and whether it takes no new requests (``retired``)."""

    __slots__ = ("endpoint", "pending", "reader", "resolved", "retired", "watcher")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.retired = False
        #: Whether the endpoint's host name was found to resolve.
        self.resolved = False


class _Channel(_Requests):
    """A request socket, its reader task and the futures of its requests in flight."""

    __slots__ = ("direct", "monitor", "resolve", "send", "sock")

    def __init__(self, endpoint: str, sock: zmq.asyncio.Socket,
                 monitor: zmq.asyncio.Socket, resolve: Resolve) -> None:
        super().__init__(endpoint)
        self.sock = sock
        #: The same socket without asyncio's futures: what can be sent or read now
        #: goes straight through (a future and its event bookkeeping cost more than
        #: the message).  Never closed itself, and never used once ``sock`` is.
        self.direct: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        #: Reports how ``sock``'s handshakes end (see dbpool.keys.handshake_failure).
        self.monitor = monitor
        self.resolve = resolve
        self.send: Callable[[bytes], asyncio.Future[Any]] = sock.send  # type: ignore[assignment]

    def send_now(self, body: bytes) -> bool:
        """Send ``body`` if it can go out at once (False: not connected yet, as
        IMMEDIATE holds messages until a connection is, or the queue is full)."""
        try:
            self.direct.send(body, _NOBLOCK)
        except _Again:
            return False
        # A send may take in replies without the socket's descriptor saying so
        # (ZeroMQ's is edge-triggered): read what came.
        if cast(int, self.direct.get(_EVENTS)) & _POLLIN:
            self.read_now()
        return True

    def read_now(self) -> None:
        """Resolve the requests whose replies have come, without waiting for more."""
        recv_now, resolve = self.direct.recv, self.resolve
        while True:
            try:
                data = recv_now(_NOBLOCK)
            except _Again:
                return
            resolve(self, data)

    def close(self) -> None:
        for task in (self.reader, self.watcher):
            if task is not None:
                task.cancel()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class _DirectChannel(_Requests):
    """A channel on a direct connection (:mod:`dbpool.client.direct_async`): as
    :class:`_Channel`, without libzmq.  Its ``reader`` is the task that connects."""

    __slots__ = ("address", "conn", "connected")

    def __init__(self, endpoint: str, address: tuple[str, int]) -> None:
        super().__init__(endpoint)
        self.address = address
        self.conn: AsyncZmtpConnection | None = None
        #: Done once connected; its error is a refused handshake's (its senders raise it).
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.connected.add_done_callback(_retrieved)

    def send_now(self, body: bytes) -> bool:
        conn = self.conn
        return conn is not None and conn.send(body)

    def send(self, body: bytes) -> asyncio.Future[Any]:
        """A future done once ``body`` was sent, connected first.  Its error is also
        its request's (or the request gave up on it), so nobody need retrieve it."""
        send = asyncio.ensure_future(self._send_connected(body))
        send.add_done_callback(_retrieved)
        return send

    async def _send_connected(self, body: bytes) -> None:
        try:
            await asyncio.shield(self.connected)
        except asyncio.CancelledError:
            if not self.connected.cancelled():
                raise  # this send itself was cancelled
            raise ConnectionError(f"the connection to {self.endpoint} was closed",
                                  reason="error") from None
        if not self.send_now(body):
            raise ConnectionError(f"the connection to {self.endpoint} closed before the "
                                  "request was sent", reason="no_server")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.conn is not None:
            self.conn.close()
        if not self.connected.done():
            self.connected.cancel()


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


#: Either kind of channel.
AnyChannel: TypeAlias = "_Channel | _DirectChannel"


class AsyncClient(AsyncRequests):
    """An asyncio client of ``dbpool serve``: :class:`~dbpool.client.Client`'s API as coroutines.

    The arguments are :class:`~dbpool.client.Client`'s; ``context`` may be a
    ``zmq.asyncio.Context`` or a plain one (shadowed).  Sockets and tasks are
    made on first use, inside the loop, and so is the lookup of the
    endpoints' names, which runs in a thread: making a client never blocks
    the loop.  Use ``async with`` or ``await client.close()``.
    """

    _heartbeat: _Heartbeat

    def __init__(
        self,
        endpoint: str | Sequence[str] = DEFAULT_ENDPOINT,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        events: str | None = None,
        context: zmq.Context[Any] | None = None,
        server_key: str | None = None,
        client_key: str | None = None,
        pool: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        spread: bool = True,
        direct: bool = True,
    ) -> None:
        # No DNS here: a constructor may run on the event loop (see _look_up).
        self._identify(endpoint, timeout, events, server_key, client_key, pool,
                       connect_timeout, spread, look_up=False)
        #: The lookup of the endpoints' names (see _look_up), once started.
        self._lookup: asyncio.Future[None] | None = None
        self._direct = direct
        #: What makes a direct connection's handshake, or None: libzmq's transport.
        self._handshake = direct_handshake(self.keys)
        if context is None:
            self._context: zmq.asyncio.Context = zmq.asyncio.Context.instance()
        elif isinstance(context, zmq.asyncio.Context):
            self._context = context
        else:
            self._context = zmq.asyncio.Context(shadow=context)
        packer = make_packer()
        self._pack = packer.pack
        self._reset_packer = packer.reset
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chan: AnyChannel | None = None
        self._channels: set[AnyChannel] = set()
        self._index = self.start
        self._last_id = 0
        self._closed = False
        self._subscriptions: weakref.WeakSet[AsyncSubscription] = weakref.WeakSet()
        #: Requests in flight with their deadlines, a line per timeout (see _expiring).
        self._expiries: dict[float, deque[tuple[float, asyncio.Future[dict[str, Any]]]]] = {}
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._heartbeat = _Heartbeat(self)

    # -- sockets ------------------------------------------------------------------------

    def _open_channel(self) -> AnyChannel:
        if self._closed:
            raise closed_error()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an AsyncClient belongs to the event loop it was first used in")
        endpoint = self.endpoints[self._index]
        address = (direct_address(endpoint) if self._direct and self._handshake is not None
                   else None)
        if address is not None:
            direct = _DirectChannel(endpoint, address)
            direct.reader = loop.create_task(self._connect_direct(direct),
                                             name=f"dbpool-client-connect {endpoint}")
            self._chan = direct
            self._channels.add(direct)
            return direct
        sock = self._context.socket(zmq.DEALER)
        monitor: zmq.asyncio.Socket | None = None
        try:
            configure_socket(sock, self.timeout, self.keys)
            monitor = cast(zmq.asyncio.Socket, handshake_monitor(sock))
            sock.connect(endpoint)
        except BaseException:
            if monitor is not None:
                monitor.close(linger=0)
            sock.close(linger=0)
            raise
        ch = _Channel(endpoint, sock, monitor, self._resolve)
        ch.reader = loop.create_task(self._read(ch), name=f"dbpool-client-reader {endpoint}")
        ch.watcher = loop.create_task(self._watch_handshakes(ch),
                                      name=f"dbpool-client-handshakes {endpoint}")
        self._chan = ch
        self._channels.add(ch)
        logger.debug("connected a request socket to %s", endpoint)
        return ch

    async def _connect_direct(self, ch: _DirectChannel) -> None:
        """Connect ``ch``, retrying every 100 ms as libzmq does, until connected or
        refused (the requests' own waits give up on it: see :meth:`_connect_failure`)."""
        host, port = ch.address
        silent_once = False
        started = time.monotonic()
        while True:
            try:
                assert self._handshake is not None
                ch.conn = await AsyncZmtpConnection.open(
                    host, port, functools.partial(self._resolve, ch),
                    functools.partial(self._direct_lost, ch), self._handshake())
                logger.debug("connected directly to %s", ch.endpoint)
                ch.connected.set_result(None)
                return
            except (HandshakeError, OSError) as exc:
                verdict = after_failed_connect(exc, silent_once, len(self.endpoints))
                if verdict == "refused":
                    ch.connected.set_exception(refused(ch.endpoint, exc, self.keys is not None))
                    return
                if len(self.endpoints) > 1 and isinstance(exc, ConnectionRefusedError):
                    # Another server may take it now: the next endpoint at once.
                    ch.connected.set_exception(
                        no_server(ch.endpoint, round(time.monotonic() - started, 1)))
                    return
            silent_once = verdict == "again"
            if not silent_once:
                await asyncio.sleep(RECONNECT_INTERVAL)

    def _direct_lost(self, ch: _DirectChannel, exc: BaseException | None) -> None:
        """The server closed ``ch``'s connection: its requests in flight fail now (they
        may have run), and the next request opens a new channel."""
        why = f" ({exc})" if exc is not None else ""
        for fut in ch.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(
                    f"{ch.endpoint} closed the connection before replying{why}: the "
                    "request may have run", reason="timeout"))
        logger.debug("%s closed the connection%s", ch.endpoint, why)
        self._retire(ch)
        self._close_channel(ch)

    def _close_channel(self, ch: AnyChannel) -> None:
        """Close ``ch`` now; its requests still in flight raise ConnectionError."""
        self._channels.discard(ch)
        if self._chan is ch:
            self._chan = None
        ch.close()
        for fut in ch.pending.values():
            if not fut.done():
                fut.set_exception(closed_error() if self._closed else ConnectionError(
                    f"the socket to {ch.endpoint} was closed", reason="error"))

    @staticmethod
    def _resolve(ch: AnyChannel, data: bytes) -> None:
        """Hand one reply to the future of its request."""
        try:
            reply = _unpackb(data)
            fut = ch.pending.get(reply["id"])
        except (WireError, TypeError, KeyError) as exc:
            logger.warning("dropped a malformed reply from %s: %s", ch.endpoint, exc)
            return
        if fut is None:
            if reply["id"] is None and "error" in reply:
                logger.warning("the server at %s could not read a request: %r",
                               ch.endpoint, reply["error"])
            else:
                logger.debug("dropped a reply to request %r", reply["id"])
            return
        if not fut.done():
            fut.set_result(reply)

    def _retire(self, ch: AnyChannel) -> None:
        """Send no more on ``ch``; close it once its last request in flight ends."""
        if ch.retired:
            return
        ch.retired = True
        if self._chan is ch:
            self._chan = None
            count = len(self.endpoints)
            if count > 1 and self.endpoints[self._index] == ch.endpoint:
                self._index = (self._index + 1) % count
                logger.warning("no reply from %s: moving to %s",
                               ch.endpoint, self.endpoints[self._index])

    async def _read(self, ch: _Channel) -> None:
        """Resolve the future of each reply's request; drop replies nobody awaits.

        Waits (asyncio) for a reply only when none is there: those that have
        come are read straight from the socket, without a future each."""
        recv = ch.sock.recv
        try:
            while True:
                self._resolve(ch, await recv())
                ch.read_now()
        except zmq.ZMQError as exc:
            if not ch.sock.closed:
                logger.error("the reader of %s failed: %s", ch.endpoint, exc)
                self._retire(ch)
                self._close_channel(ch)

    async def _watch_handshakes(self, ch: _Channel) -> None:
        """Fail the requests waiting to be sent on ``ch`` as soon as a handshake is refused."""
        handshakes = Handshakes(ch.endpoint, self.keys is not None)
        try:
            while True:
                refused = handshakes.feed(await ch.monitor.recv_multipart())
                if refused is not None:
                    for fut in ch.pending.values():
                        if not fut.done():
                            fut.set_exception(refused)
        except zmq.ZMQError:
            pass  # the monitor was closed with its channel

    # -- the request loop ---------------------------------------------------------------

    async def _call(self, msg: dict[str, Any], timeout: float | None) -> Any:
        """Send ``msg`` with a new id and return the ``ok`` value of its reply.

        As :meth:`dbpool.client.Client._call`: waits ``timeout`` seconds (or
        :attr:`timeout`), raises the reply's error, ConnectionError with
        ``reason="timeout"``, or TypeError for a value the wire cannot carry.
        """
        ch = self._chan
        if ch is None:
            lookup = self._lookup
            if lookup is None or not lookup.done():
                await self._look_up()
            ch = self._chan or self._open_channel()
        rid = self._last_id = self._last_id + 1
        msg["id"] = rid
        if self.pool is not None:
            msg["pool"] = self.pool
        try:
            body = self._pack(msg)
        except BaseException:
            self._reset_packer()
            raise
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()  # type: ignore[union-attr]
        ch.pending[rid] = fut
        wait = self.timeout if timeout is None else timeout
        sent = False
        send: asyncio.Future[Any] | None = None
        tries = len(self.endpoints)
        looked_up = False  # the endpoints' names, again, once every one failed
        try:
            if ch.send_now(body):  # the common case
                sent = True
                reply = await self._expiring(fut, wait)
            else:
                async with asyncio.timeout(wait):
                    while True:
                        send = ch.send(body)
                        if not send.done():
                            # Not connected (yet): a refused handshake fails fut; no
                            # connection within connect_timeout is no_server, and the next
                            # endpoint is tried.
                            error = await self._connect_failure(ch, send, fut)
                            if error is not None:
                                tries -= 1
                                if tries <= 0:
                                    if looked_up or not await self._resolve_again():
                                        raise error
                                    looked_up, tries = True, len(self.endpoints)
                                del ch.pending[rid]
                                if not ch.pending:
                                    self._close_channel(ch)
                                ch = self._open_channel()
                                ch.pending[rid] = fut
                                continue
                        await send
                        break
                    sent = True
                    reply = await fut
        except (TimeoutError, _Again, _Expired):
            raise self._timed_out(ch, msg, wait, sent=sent) from None
        except _ZMQError as exc:
            if self._closed:
                raise closed_error() from None
            raise ConnectionError(f"socket error on {ch.endpoint}: {exc}", reason="error") \
                from None
        finally:
            if send is not None and not sent:
                send.cancel()  # given up (timed out, cancelled): it must not go out later
            ch.pending.pop(rid, None)
            if ch.retired and not ch.pending:
                self._close_channel(ch)
        if "error" not in reply:
            try:
                return reply["ok"]
            except KeyError:
                raise malformed_reply(ch.endpoint, msg["op"], "neither 'ok' nor 'error'") \
                    from None
        raise error_from_reply(reply)

    def _expiring(self, fut: asyncio.Future[dict[str, Any]],
                  wait: float) -> asyncio.Future[dict[str, Any]]:
        """``fut``, failed with ``_Expired`` if it is not done in ``wait`` seconds.

        One timer for all requests in flight, not one each (asyncio's timers are
        a heap: with hundreds of requests in flight, pushing and cancelling one
        per request cost more than the rest of the request).  Requests with the
        same ``wait`` expire in the order they were made, so each ``wait`` has a
        line in that order, and the timer is set for the earliest head.
        """
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + wait
        line = self._expiries.get(wait)
        if line is None:
            line = self._expiries[wait] = deque()
        while line and line[0][1].done():  # answered: forget them
            line.popleft()
        if len(line) > 64 and len(line) > 4 * self._in_flight():
            # A slow head keeps answered ones behind it: drop those now and then.
            line = self._expiries[wait] = deque(e for e in line if not e[1].done())
        line.append((deadline, fut))
        timer = self._expiry_timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._expiry_timer = loop.call_at(deadline, self._expire)
        return fut

    def _in_flight(self) -> int:
        return sum(len(ch.pending) for ch in self._channels)

    def _expire(self) -> None:
        """Fail the requests whose time is up; set the timer for the next."""
        self._expiry_timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        earliest: float | None = None
        for wait, line in list(self._expiries.items()):
            while line:
                deadline, fut = line[0]
                if fut.done():
                    line.popleft()
                elif deadline <= now:
                    line.popleft()
                    fut.set_exception(_Expired())
                else:
                    break
            if not line:
                del self._expiries[wait]
            elif earliest is None or line[0][0] < earliest:
                earliest = line[0][0]
        if earliest is not None:
            self._expiry_timer = loop.call_at(earliest, self._expire)

    async def _connect_failure(self, ch: AnyChannel, send: asyncio.Future[Any],
                               fut: asyncio.Future[dict[str, Any]]) -> ConnectionError | None:
        """Wait for ``send`` to go out; None once it has.  Raises a refused handshake's
        error (which fails ``fut``); returns ``no_server`` (the channel retired) if no
        connection comes within :attr:`connect_timeout` or the host name does not resolve."""
        if not ch.resolved:
            loop = asyncio.get_running_loop()
            unknown = await loop.run_in_executor(None, unresolved, ch.endpoint)
            if unknown is not None:
                send.cancel()
                self._retire(ch)
                return unknown
            ch.resolved = True
        started = time.monotonic()
        await asyncio.wait((send, fut), timeout=self.connect_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if send.done():
            error = None if send.cancelled() else send.exception()
            if isinstance(error, ConnectionError) and error.reason == "no_server":
                self._retire(ch)  # refused, with other endpoints to try
                return error
            if error is not None and fut.done():
                await fut  # the channel's own error (closed, refused) for this request
            return None
        send.cancel()
        if fut.done():
            await fut  # raises the handshake's error
        error = no_server(ch.endpoint, round(time.monotonic() - started, 1))
        logger.debug("%s; retiring the socket", error)
        self._retire(ch)
        return error

    async def _look_up(self) -> None:
        """Spread the given endpoints (as the sync client does in its constructor), in
        a thread so that a slow DNS lookup does not stall the event loop: once, for
        the first request, which the requests made meanwhile wait for."""
        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = asyncio.ensure_future(self._spread_given())
        await asyncio.shield(lookup)  # one caller's cancellation is not the others'

    async def _spread_given(self) -> None:
        spread = await asyncio.get_running_loop().run_in_executor(
            None, spread_endpoints, self.given_endpoints)
        if spread != self.endpoints:
            self.endpoints = spread
            self._index = random.randrange(len(spread)) if self._spread else 0

    async def _resolve_again(self) -> bool:
        """Look the given endpoints' names up again (a rolling update gave the servers
        new addresses); whether the endpoints changed (then the next channel opens on
        one of the new ones)."""
        fresh = await asyncio.get_running_loop().run_in_executor(
            None, spread_endpoints, self.given_endpoints)
        if fresh == self.endpoints:
            return False
        self.endpoints = fresh
        self._index = random.randrange(len(fresh)) if self._spread else 0
        logger.warning("no server answered: the endpoints are now %s", ", ".join(fresh))
        return True

    def _timed_out(self, ch: AnyChannel, msg: dict[str, Any], wait: float,
                   *, sent: bool) -> ConnectionError:
        error = timed_out(ch.endpoint, msg.get("op"), wait, sent)
        logger.debug("%s; retiring the socket", error)
        self._retire(ch)
        return error

    def transaction(self, *, timeout: float | None = None,
                    readonly: bool | Literal["replica"] = False) -> AsyncTransaction:
        """An :class:`AsyncTransaction`, begun by ``async with`` or ``await``.

        ``async with client.transaction() as tx`` commits when the block
        ends normally and rolls back when it raises; ``tx = await
        client.transaction()`` begins it and leaves the end to the caller.
        """
        return AsyncTransaction(self, timeout, readonly)

    def _endpoint(self) -> str:
        ch = self._chan
        return ch.endpoint if ch is not None else self.endpoints[self._index]

    def subscribe(self, topics: str | Iterable[str] = DEFAULT_TOPICS) -> AsyncSubscription:
        """An :class:`~dbpool.client.events.AsyncSubscription` to the server's events.

        It connects on ``await``, ``async with`` or its first ``get``.
        """
        names = normalize_topics(topics)
        if self._closed:
            raise closed_error()
        sub = AsyncSubscription(self._context, self.events_endpoint, names, self.keys)
        self._subscriptions.add(sub)
        return sub

    async def close(self) -> None:
        """Close the sockets and subscriptions and stop the heartbeat and reader tasks.

        Idempotent.  Requests in flight and later ones raise ConnectionError.
        """
        if self._closed:
            return
        self._closed = True
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        await self._heartbeat.stop()
        readers = [task for ch in self._channels for task in (ch.reader, ch.watcher)
                   if task is not None]
        for ch in list(self._channels):
            self._close_channel(ch)
        if readers:
            await asyncio.gather(*readers, return_exceptions=True)
        for sub in list(self._subscriptions):
            await sub.close()


    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class AsyncTransaction(_AsyncTransaction):
    """A transaction on a leased connection: :class:`~dbpool.client.Transaction` for asyncio,
    which ``await`` also begins (``tx = await client.transaction()``)."""

    def __await__(self) -> Generator[Any, None, AsyncTransaction]:
        return self.begin().__await__()



class _Heartbeat:
    """The heartbeat task of one :class:`AsyncClient` (see the sync client's ``_Heartbeat``).

    Started by the first :meth:`add`; sends ``heartbeat`` every third of
    the smallest heartbeat timeout held, through the client's socket, each
    in a task of its own (a slow reply does not hold up the next one), and
    waits on an event while nothing is held.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._state = Keepalive()
        self._since = 0.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._beats: set[asyncio.Task[None]] = set()
        #: Heartbeats sent so far.
        self.sent = 0

    def add(self, heartbeat_timeout: float | None) -> float:
        if not self._state:
            self._since = time.monotonic()
        key = self._state.add(heartbeat_timeout)
        if not self._stopped and (self._task is None or self._task.done()):
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="dbpool-client-heartbeat")
        if self._wake is not None:
            self._wake.set()
        return key

    def remove(self, key: float) -> None:
        self._state.remove(key)
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        self._stopped = True
        tasks = [task for task in (self._task, *self._beats)
                 if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        last = 0.0
        while True:
            wake.clear()
            interval = self._state.interval()
            if interval is None:
                await wake.wait()
                continue
            delay = max(last, self._since) + interval - time.monotonic()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await wake.wait()
                except TimeoutError:
                    pass
                continue
            last = time.monotonic()
            # Not awaited here: a slow reply must not hold up the next heartbeat.
            beat = asyncio.get_running_loop().create_task(self._beat())
            self._beats.add(beat)
            beat.add_done_callback(self._beats.discard)

    async def _beat(self) -> None:
        client = self._client
        self.sent += 1
        try:
            value = await client._call(request("heartbeat", session=client.session), None)
        except Exception as exc:
            logger.warning("heartbeat failed: %s", exc)
        else:
            logger.debug("heartbeat reply %r", value)
