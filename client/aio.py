"""The asyncio client: :class:`AsyncClient`, :class:`AsyncTransaction`, :class:`AsyncStream`.

An :class:`AsyncClient` belongs to the event loop it first sends from.  It
has one ``DEALER`` socket (``zmq.asyncio``) and a reader task that hands
each reply to the request waiting for its ``id``, so any number of tasks may
have requests in flight at once; the server answers them in the order they
complete.

When a request times out, the socket it used is retired: new requests go
out on a new socket (to the next endpoint, if there are several) and the
old one is closed as soon as the requests still in flight on it have ended,
so a late reply finds nobody and nothing stale is left behind.  Heartbeats
for open transactions and streams come from a task of the client's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Sequence,
)
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import zmq
import zmq.asyncio

from dbpool.copy_data import BLOCK_SIZE, CopyData, blocks
from dbpool.driver import Result
from dbpool.errors import ConnectionError, ProtocolError, TransactionError
from dbpool.protocol import VERSION
from dbpool.wire import WireError, make_packer, unpackb

from ._base import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_ROWS,
    DEFAULT_PAGE_BYTES,
    DEFAULT_TIMEOUT,
    DEFAULT_TOPICS,
    Keepalive,
    Params,
    Statement,
    batch_fields,
    check_timeout,
    closed_error,
    configure_socket,
    copy_page,
    copy_started,
    error_from_reply,
    events_endpoint,
    lease_map,
    malformed_reply,
    new_session,
    normalize_endpoints,
    normalize_topics,
    page_map,
    request,
    to_result,
    to_results,
)
from .events import AsyncSubscription

__all__ = ["AsyncClient", "AsyncCopyTo", "AsyncStream", "AsyncTransaction"]

PageT = TypeVar("PageT")

logger = logging.getLogger("dbpool.client.aio")

_unpackb = unpackb
_to_result = to_result
_VERSION = VERSION
_Again = zmq.Again
_ZMQError = zmq.ZMQError


class _Channel:
    """A request socket, its reader task and the futures of its requests in flight."""

    __slots__ = ("endpoint", "pending", "reader", "retired", "send", "sock")

    def __init__(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.send: Callable[[bytes], Awaitable[Any]] = sock.send
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.retired = False


class AsyncClient:
    """An asyncio client of ``dbpool serve``: :class:`~dbpool.client.Client`'s API as coroutines.

    The arguments are :class:`~dbpool.client.Client`'s; ``context`` may be a
    ``zmq.asyncio.Context`` or a plain one (shadowed).  Sockets and tasks are
    made on first use, inside the loop.  Use ``async with`` or ``await
    client.close()``.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] = DEFAULT_ENDPOINT,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        events: str | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        #: The request endpoints, in the order they are tried.
        self.endpoints: tuple[str, ...] = normalize_endpoints(endpoint)
        #: Seconds a request waits for its reply unless the call says otherwise.
        self.timeout: float = check_timeout(timeout)
        #: This client's session id, sent with every lease and stream request.
        self.session: str = new_session()
        self._events = events
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
        self._chan: _Channel | None = None
        self._channels: set[_Channel] = set()
        self._index = 0
        self._last_id = 0
        self._closed = False
        self._subscriptions: weakref.WeakSet[AsyncSubscription] = weakref.WeakSet()
        self._heartbeat = _Heartbeat(self)

    # -- sockets ------------------------------------------------------------------------

    def _open_channel(self) -> _Channel:
        if self._closed:
            raise closed_error()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an AsyncClient belongs to the event loop it was first used in")
        endpoint = self.endpoints[self._index]
        sock = self._context.socket(zmq.DEALER)
        try:
            configure_socket(sock, self.timeout)
            sock.connect(endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        ch = _Channel(endpoint, sock)
        ch.reader = loop.create_task(self._read(ch), name=f"dbpool-client-reader {endpoint}")
        self._chan = ch
        self._channels.add(ch)
        logger.debug("connected a request socket to %s", endpoint)
        return ch

    def _close_channel(self, ch: _Channel) -> None:
        """Close ``ch`` now; its requests still in flight raise ConnectionError."""
        self._channels.discard(ch)
        if self._chan is ch:
            self._chan = None
        if ch.reader is not None:
            ch.reader.cancel()
        ch.sock.close(linger=0)
        for fut in ch.pending.values():
            if not fut.done():
                fut.set_exception(closed_error() if self._closed else ConnectionError(
                    f"the socket to {ch.endpoint} was closed", reason="error"))

    def _retire(self, ch: _Channel) -> None:
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
        """Resolve the future of each reply's request; drop replies nobody awaits."""
        recv = ch.sock.recv
        pending = ch.pending
        try:
            while True:
                data = await recv()
                try:
                    reply = _unpackb(data)
                    fut = pending.get(reply["id"])
                except (WireError, TypeError, KeyError) as exc:
                    logger.warning("dropped a malformed reply from %s: %s", ch.endpoint, exc)
                    continue
                if fut is None:
                    if reply["id"] is None and "error" in reply:
                        logger.warning("the server at %s could not read a request: %r",
                                       ch.endpoint, reply["error"])
                    else:
                        logger.debug("dropped a reply to request %r", reply["id"])
                    continue
                if not fut.done():
                    fut.set_result(reply)
        except zmq.ZMQError as exc:
            if not ch.sock.closed:
                logger.error("the reader of %s failed: %s", ch.endpoint, exc)
                self._retire(ch)
                self._close_channel(ch)

    # -- the request loop ---------------------------------------------------------------

    async def _call(self, msg: dict[str, Any], timeout: float | None) -> Any:
        """Send ``msg`` with a new id and return the ``ok`` value of its reply.

        As :meth:`dbpool.client.Client._call`: waits ``timeout`` seconds (or
        :attr:`timeout`), raises the reply's error, ConnectionError with
        ``reason="timeout"``, or TypeError for a value the wire cannot carry.
        """
        ch = self._chan
        if ch is None:
            ch = self._open_channel()
        rid = self._last_id = self._last_id + 1
        msg["id"] = rid
        try:
            body = self._pack(msg)
        except BaseException:
            self._reset_packer()
            raise
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()  # type: ignore[union-attr]
        pending = ch.pending
        pending[rid] = fut
        wait = self.timeout if timeout is None else timeout
        sent = False
        try:
            async with asyncio.timeout(wait):
                await ch.send(body)
                sent = True
                reply = await fut
        except (TimeoutError, _Again):
            raise self._timed_out(ch, msg, wait, sent=sent) from None
        except _ZMQError as exc:
            if self._closed:
                raise closed_error() from None
            raise ConnectionError(f"socket error on {ch.endpoint}: {exc}", reason="error") \
                from None
        finally:
            del pending[rid]
            if ch.retired and not pending:
                self._close_channel(ch)
        if "error" not in reply:
            try:
                return reply["ok"]
            except KeyError:
                raise malformed_reply(ch.endpoint, msg["op"], "neither 'ok' nor 'error'") \
                    from None
        raise error_from_reply(reply)

    def _timed_out(self, ch: _Channel, msg: dict[str, Any], wait: float,
                   *, sent: bool) -> ConnectionError:
        endpoint, op = ch.endpoint, msg.get("op")
        if sent:
            text = f"no reply from {endpoint} to {op!r} within {wait:g} s"
        else:
            text = f"could not send {op!r} to {endpoint} within {wait:g} s: not connected"
        logger.debug("%s; retiring the socket", text)
        self._retire(ch)
        return ConnectionError(text, reason="timeout")

    # -- requests -----------------------------------------------------------------------

    async def query(self, sql: str, params: Params = None, *,
                    timeout: float | None = None) -> Result:
        """Run one statement and return its result (see :meth:`Client.query`)."""
        if timeout is None:
            return _to_result(await self._call(
                {"v": _VERSION, "op": "query", "sql": sql, "params": params}, None))
        return _to_result(await self._call(
            {"v": _VERSION, "op": "query", "sql": sql, "params": params, "timeout": timeout},
            timeout))

    async def execute(self, sql: str, params: Params = None, *,
                      timeout: float | None = None) -> Result:
        """Run one statement prepared on the server (see :meth:`Client.execute`)."""
        return await self._statement("execute", sql, params, timeout, None)

    async def batch(self, sql_or_statements: str | Iterable[Statement | str],
                    params_seq: Iterable[Params] | None = None, *,
                    timeout: float | None = None) -> list[Result]:
        """Run statements in one round trip (see :meth:`Client.batch`)."""
        return await self._batch(sql_or_statements, params_seq, timeout, None)

    def stream(self, sql: str, params: Params = None, *, max_rows: int = DEFAULT_MAX_ROWS,
               timeout: float | None = None) -> AsyncStream:
        """An :class:`AsyncStream` of ``sql``'s rows (``async for`` / ``async with``).

        Nothing is sent until the first page is asked for.
        """
        return AsyncStream(self, sql, params, max_rows, timeout, None)

    def copy_to(self, sql: str, params: Params = None, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                timeout: float | None = None) -> AsyncCopyTo:
        """An :class:`AsyncCopyTo` of a ``COPY ... TO STDOUT`` (see :meth:`Client.copy_to`)."""
        return AsyncCopyTo(self, sql, params, page_bytes, timeout, None)

    async def copy_from(self, sql: str, data: CopyData, params: Params = None, *,
                        block_bytes: int = BLOCK_SIZE, timeout: float | None = None) -> Result:
        """Run a ``COPY ... FROM STDIN`` (see :meth:`Client.copy_from`); ``data`` may also
        be an async iterable of bytes or str."""
        return await _copy_from(self, sql, data, params, block_bytes, timeout, None)

    def transaction(self, *, timeout: float | None = None) -> AsyncTransaction:
        """An :class:`AsyncTransaction`, begun by ``async with`` or ``await``.

        ``async with client.transaction() as tx`` commits when the block
        ends normally and rolls back when it raises; ``tx = await
        client.transaction()`` begins it and leaves the end to the caller.
        """
        return AsyncTransaction(self, timeout)

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round-trip a ``ping``; return the seconds it took."""
        msg = request("ping")
        if timeout is not None:
            msg["timeout"] = timeout
        start = time.perf_counter()
        await self._call(msg, timeout)
        return time.perf_counter() - start

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's status map (see :meth:`Client.status`)."""
        msg = request("status")
        if timeout is not None:
            msg["timeout"] = timeout
        value = await self._call(msg, timeout)
        if not isinstance(value, dict):
            raise malformed_reply(self._endpoint(), "status", f"not a map: {value!r:.200}")
        return value

    async def events_endpoint(self) -> str:
        """The events endpoint :meth:`subscribe` connects to.

        See :meth:`dbpool.client.Client.events_endpoint`.
        """
        if self._events is not None:
            return self._events
        events = (await self.status()).get("events")
        if not isinstance(events, str):
            raise ProtocolError(f"the server reports no events endpoint: {events!r}",
                                code="malformed")
        return events_endpoint(events, self._endpoint())

    def subscribe(self, topics: str | Iterable[str] = DEFAULT_TOPICS) -> AsyncSubscription:
        """An :class:`~dbpool.client.events.AsyncSubscription` to the server's events.

        It connects on ``await``, ``async with`` or its first ``get``.
        """
        names = normalize_topics(topics)
        if self._closed:
            raise closed_error()
        sub = AsyncSubscription(self._context, self.events_endpoint, names)
        self._subscriptions.add(sub)
        return sub

    async def close(self) -> None:
        """Close the sockets and subscriptions and stop the heartbeat and reader tasks.

        Idempotent.  Requests in flight and later ones raise ConnectionError.
        """
        if self._closed:
            return
        self._closed = True
        await self._heartbeat.stop()
        readers = [ch.reader for ch in self._channels if ch.reader is not None]
        for ch in list(self._channels):
            self._close_channel(ch)
        if readers:
            await asyncio.gather(*readers, return_exceptions=True)
        for sub in list(self._subscriptions):
            await sub.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AsyncClient {', '.join(self.endpoints)} {state}>"

    # -- shared by AsyncTransaction and AsyncStream -------------------------------------

    def _endpoint(self) -> str:
        ch = self._chan
        return ch.endpoint if ch is not None else self.endpoints[self._index]

    async def _statement(self, op: str, sql: str, params: Params, timeout: float | None,
                         lease: str | None) -> Result:
        msg: dict[str, Any] = {"v": _VERSION, "op": op, "sql": sql, "params": params}
        if lease is not None:
            msg["lease"] = lease
            msg["session"] = self.session
        if timeout is not None:
            msg["timeout"] = timeout
        return _to_result(await self._call(msg, timeout))

    async def _batch(self, sql_or_statements: str | Iterable[Statement | str],
                     params_seq: Iterable[Params] | None, timeout: float | None,
                     lease: str | None) -> list[Result]:
        msg = {"v": _VERSION, **batch_fields(sql_or_statements, params_seq)}
        if lease is not None:
            msg["lease"] = lease
            msg["session"] = self.session
        if timeout is not None:
            msg["timeout"] = timeout
        return to_results(await self._call(msg, timeout))


class AsyncTransaction:
    """A transaction on a leased connection: :class:`~dbpool.client.Transaction` for asyncio.

    Begun by ``async with`` (which commits on a normal exit and rolls back
    when the block raises, unless it was ended inside) or by ``await``.
    Calls before it began or after it ended raise
    :class:`~dbpool.errors.TransactionError`.
    """

    def __init__(self, client: AsyncClient, timeout: float | None) -> None:
        self._client = client
        self._timeout = timeout
        #: The lease id the server gave (None until begun).
        self.lease: str | None = None
        #: Seconds without a request after which the server ends the lease.
        self.heartbeat_timeout: float | None = None
        #: Seconds the lease may last at most, as the server said at begin.
        self.expires_in: float | None = None
        self._state = "new"
        self._keepalive = 0.0

    @property
    def active(self) -> bool:
        """True from begin until :meth:`commit` or :meth:`rollback`."""
        return self._state == "active"

    async def begin(self) -> AsyncTransaction:
        """Begin the transaction (op ``begin``) unless it already began; return it."""
        if self._state == "active":
            return self
        if self._state != "new":
            raise TransactionError("the transaction has ended", status="idle")
        self._state = "beginning"
        client = self._client
        msg = request("begin", session=client.session)
        if self._timeout is not None:
            msg["timeout"] = self._timeout
        try:
            value = await client._call(msg, self._timeout)
            self.lease, self.heartbeat_timeout, self.expires_in = lease_map(
                value, client._endpoint())
        except BaseException:
            self._state = "new"
            raise
        self._state = "active"
        self._keepalive = client._heartbeat.add(self.heartbeat_timeout)
        return self

    def __await__(self) -> Generator[Any, None, AsyncTransaction]:
        return self.begin().__await__()

    def _lease(self) -> str:
        if self._state != "active" or self.lease is None:
            if self._state == "ended":
                raise TransactionError("the transaction has ended", status="idle")
            raise TransactionError("the transaction has not begun", status="idle")
        return self.lease

    async def query(self, sql: str, params: Params = None, *,
                    timeout: float | None = None) -> Result:
        """Run one statement in the transaction."""
        return await self._client._statement("query", sql, params, timeout, self._lease())

    async def execute(self, sql: str, params: Params = None, *,
                      timeout: float | None = None) -> Result:
        """Run one prepared statement in the transaction."""
        return await self._client._statement("execute", sql, params, timeout, self._lease())

    async def batch(self, sql_or_statements: str | Iterable[Statement | str],
                    params_seq: Iterable[Params] | None = None, *,
                    timeout: float | None = None) -> list[Result]:
        """Run a batch in the transaction."""
        return await self._client._batch(sql_or_statements, params_seq, timeout,
                                         self._lease())

    def stream(self, sql: str, params: Params = None, *, max_rows: int = DEFAULT_MAX_ROWS,
               timeout: float | None = None) -> AsyncStream:
        """An :class:`AsyncStream` on the transaction's connection."""
        return AsyncStream(self._client, sql, params, max_rows, timeout, self._lease())

    def copy_to(self, sql: str, params: Params = None, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                timeout: float | None = None) -> AsyncCopyTo:
        """An :class:`AsyncCopyTo` in the transaction."""
        return AsyncCopyTo(self._client, sql, params, page_bytes, timeout, self._lease())

    async def copy_from(self, sql: str, data: CopyData, params: Params = None, *,
                        block_bytes: int = BLOCK_SIZE, timeout: float | None = None) -> Result:
        """A ``COPY ... FROM STDIN`` in the transaction."""
        return await _copy_from(self._client, sql, data, params, block_bytes, timeout,
                                self._lease())

    async def commit(self, *, timeout: float | None = None) -> Result:
        """Commit (op ``commit``) and end the transaction, even if the commit fails."""
        return await self._end("commit", timeout)

    async def rollback(self, *, timeout: float | None = None) -> Result:
        """Roll back (op ``rollback``) and end the transaction, even if that fails."""
        return await self._end("rollback", timeout)

    async def _end(self, op: str, timeout: float | None) -> Result:
        lease = self._lease()
        self._state = "ended"
        client = self._client
        try:
            msg = request(op, lease=lease, session=client.session)
            if timeout is not None:
                msg["timeout"] = timeout
            return to_result(await client._call(msg, timeout))
        finally:
            client._heartbeat.remove(self._keepalive)

    async def __aenter__(self) -> AsyncTransaction:
        return await self.begin()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._state != "active":
            return
        if exc_type is None:
            await self.commit()
            return
        try:
            await self.rollback()
        except ConnectionError as error:
            if error.reason == "lease_expired":  # the server ended it and rolled it back
                logger.debug("lease %s had ended before its rollback: %s", self.lease, error)
            else:
                logger.warning("rollback of lease %s after %s failed: %s", self.lease,
                               exc_type.__name__, error)
        except Exception as error:
            logger.warning("rollback of lease %s after %s failed: %r", self.lease,
                           exc_type.__name__, error)

    def __repr__(self) -> str:
        return f"<AsyncTransaction {self.lease or '(not begun)'} {self._state}>"


class _AsyncPaged(Generic[PageT]):
    """What an :class:`AsyncStream` and an :class:`AsyncCopyTo` share: pages asked for
    one request at a time, heartbeats while the server holds it open, ``close``.

    A subclass names its ``kind`` (the key of ``close``), its first and next
    requests, and reads its pages.
    """

    kind = ""

    def __init__(self, client: AsyncClient, timeout: float | None, lease: str | None) -> None:
        self._client = client
        self._timeout = timeout
        self._lease = lease
        #: The server's id of it, once it started.
        self.id: str | None = None
        self._done = False
        self._closed = False
        self._keepalive: float | None = None

    @property
    def done(self) -> bool:
        """True once the last page was read (the server ended it)."""
        return self._done

    @property
    def closed(self) -> bool:
        """True once it is done or closed."""
        return self._closed or self._done

    def _first(self) -> dict[str, Any]:
        raise NotImplementedError

    def _next(self) -> dict[str, Any]:
        raise NotImplementedError

    def _read_page(self, value: Any, op: str) -> tuple[str, PageT, bool]:
        """``(id, page, done)`` of a reply."""
        raise NotImplementedError

    async def fetch(self) -> PageT | None:
        """The next page, or None once it is done or closed."""
        if self._done or self._closed:
            return None
        client = self._client
        if self.id is None:
            msg = self._first()
            if self._lease is not None:
                msg["lease"] = self._lease
        else:
            msg = self._next()
        if self._timeout is not None:
            msg["timeout"] = self._timeout
        value = await client._call(msg, self._timeout)
        page_id, page, done = self._read_page(value, msg["op"])
        if self.id is None:
            self.id = page_id
            if not done:
                self._keepalive = client._heartbeat.add(None)
        if done:
            self._done = True
            self._release()
        return page

    async def __aiter__(self) -> AsyncIterator[PageT]:
        finished = False
        try:
            while (page := await self.fetch()) is not None:
                if page:  # a COPY's last page may be empty; a Result always counts
                    yield page
            finished = True
        finally:
            if not finished:
                await self._close_quietly()

    async def close(self, *, timeout: float | None = None) -> None:
        """End it; sends ``close`` if the server still has it open."""
        if self._closed:
            return
        self._closed = True
        if self.id is None or self._done:
            return
        client = self._client
        try:
            msg = request("close", session=client.session, **{self.kind: self.id})
            if timeout is not None:
                msg["timeout"] = timeout
            await client._call(msg, timeout)
        finally:
            self._release()

    async def _close_quietly(self) -> None:
        try:
            await self.close()
        except Exception as error:
            logger.warning("closing %s %s failed: %r", self.kind, self.id, error)

    def _release(self) -> None:
        if self._keepalive is not None:
            self._client._heartbeat.remove(self._keepalive)
            self._keepalive = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self._close_quietly()

    def __repr__(self) -> str:
        state = "done" if self._done else "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.id or '(not started)'} {state}>"


class AsyncStream(_AsyncPaged[Result]):
    """The pages of a server-side cursor: :class:`~dbpool.client.Stream` for asyncio.

    ``async for page in stream`` yields a :class:`~dbpool.driver.Result`
    per page, :meth:`rows` the rows; leaving ``async with`` closes the
    stream (as does leaving an iteration early, when the iteration is
    finalized); :meth:`fetch` pages by hand.
    """

    kind = "stream"

    def __init__(self, client: AsyncClient, sql: str, params: Params, max_rows: int,
                 timeout: float | None, lease: str | None) -> None:
        super().__init__(client, timeout, lease)
        self._sql = sql
        self._params = params
        self._max_rows = max_rows

    def _first(self) -> dict[str, Any]:
        return request("stream", sql=self._sql, params=self._params, max_rows=self._max_rows,
                       session=self._client.session)

    def _next(self) -> dict[str, Any]:
        return request("fetch", stream=self.id, session=self._client.session)

    def _read_page(self, value: Any, op: str) -> tuple[str, Result, bool]:
        stream_id, result, done = page_map(value, self._client._endpoint(), op)
        return stream_id, to_result(result), done

    async def rows(self) -> AsyncIterator[tuple[Any, ...]]:
        """Every row of the stream's remaining pages."""
        async for page in self:
            for row in page.rows:
                yield row


class AsyncCopyTo(_AsyncPaged[bytes]):
    """The data of a ``COPY ... TO STDOUT``: :class:`~dbpool.client.CopyTo` for asyncio.

    ``async for page in copy`` yields ``bytes`` pages; leaving ``async with``
    (or an iteration, early) cancels the COPY on the server.
    """

    kind = "copy"

    def __init__(self, client: AsyncClient, sql: str, params: Params, page_bytes: int,
                 timeout: float | None, lease: str | None) -> None:
        super().__init__(client, timeout, lease)
        self._sql = sql
        self._params = params
        self._page_bytes = page_bytes
        #: The COPY's result, once all its data has arrived.
        self.result: Result | None = None

    def _first(self) -> dict[str, Any]:
        return request("copy_out", sql=self._sql, params=self._params,
                       page_bytes=self._page_bytes, session=self._client.session)

    def _next(self) -> dict[str, Any]:
        return request("copy_read", copy=self.id, session=self._client.session)

    def _read_page(self, value: Any, op: str) -> tuple[str, bytes, bool]:
        copy_id, data, done, result = copy_page(value, self._client._endpoint(), op)
        if done:
            self.result = result
        return copy_id, data, done

    async def read(self) -> bytes:
        """All the (remaining) data at once."""
        return b"".join([page async for page in self])


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


async def _copy_from(client: AsyncClient, sql: str, data: CopyData | AsyncIterable[bytes | str],
                     params: Params, block_bytes: int, timeout: float | None,
                     lease: str | None) -> Result:
    """The ``copy_in``, ``copy_write``... ``copy_end`` exchange of ``copy_from``."""
    session = client.session
    msg = request("copy_in", sql=sql, params=params, session=session)
    if lease is not None:
        msg["lease"] = lease
    if timeout is not None:
        msg["timeout"] = timeout
    copy_id, block_bytes = copy_started(await client._call(msg, timeout), client._endpoint(),
                                        block_bytes)
    keepalive = client._heartbeat.add(None)
    try:
        try:
            async for block in _ablocks(data, block_bytes):
                msg = request("copy_write", copy=copy_id, session=session, data=block)
                if timeout is not None:
                    msg["timeout"] = timeout
                await client._call(msg, timeout)
        except BaseException as error:
            msg = request("close", copy=copy_id, session=session)
            try:
                await client._call(msg, timeout)
            except Exception as error2:
                logger.warning("aborting copy %s after %r failed: %r", copy_id, error, error2)
            raise
        msg = request("copy_end", copy=copy_id, session=session)
        if timeout is not None:
            msg["timeout"] = timeout
        return to_result(await client._call(msg, timeout))
    finally:
        client._heartbeat.remove(keepalive)


async def _ablocks(data: CopyData | AsyncIterable[bytes | str],
                   size: int) -> AsyncIterator[bytes]:
    """:func:`dbpool.copy_data.blocks`, for an async iterable too."""
    if not isinstance(data, AsyncIterable):
        for block in blocks(data, size):
            yield block
        return
    pending: list[bytes | str] = []
    held = 0
    async for piece in data:
        pending.append(piece)
        held += len(piece)
        if held >= size:
            for block in blocks(pending, size):
                yield block
            pending, held = [], 0
    for block in blocks(pending, size):
        yield block
