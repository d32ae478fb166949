"""What a client asks of ``dbpool serve``: its requests, transactions, streams and copies.

This file is the one source of the client's requests: the asyncio client
(:mod:`dbpool.client.aio`) uses it as it is, and the sync client
(:mod:`dbpool.client.sync`) uses ``client/_sync/requests.py``, generated from
it by ``.ci/generate_sync.py`` (``async``/``await`` dropped, ``Async`` names
renamed).  Each client adds only its transport: how a request map travels
(``_call``), where it goes (``_endpoint``), and the heartbeats
(``_heartbeat``).

Messages and replies are described in ``docs/protocol.md``; the pieces
without I/O are in :mod:`dbpool.client._base`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeAlias, TypeVar

from dbpool.copy_data import BLOCK_SIZE, CopyData
from dbpool.driver import Result
from dbpool.errors import ConnectionError, ProtocolError, TransactionError
from dbpool.keys import client_keys
from dbpool.protocol import VERSION, check_channel

from .._base import (
    DEFAULT_MAX_ROWS,
    DEFAULT_PAGE_BYTES,
    Params,
    Statement,
    batch_fields,
    check_timeout,
    copy_page,
    copy_started,
    events_endpoint,
    lease_map,
    malformed_reply,
    new_session,
    normalize_endpoints,
    page_map,
    request,
    spread_endpoints,
    to_result,
    to_results,
)
from .._data import ablocks
from ..events import AsyncSubscription
from .notifications import AsyncNotifications

__all__ = ["AsyncCopyTo", "AsyncRequests", "AsyncStream", "AsyncTransaction"]

logger = logging.getLogger("dbpool.client")

PageT = TypeVar("PageT")
#: A request's ``readonly``: False, True (a replica if one can serve) or ``"replica"``.
ReadOnly: TypeAlias = "bool | Literal['replica']"
_VERSION = VERSION
_to_result = to_result


class Heartbeats(Protocol):
    """What a client's heartbeats offer: hold an entry while a lease, stream or copy
    is open (see :class:`dbpool.client._base.Keepalive`)."""

    def add(self, heartbeat_timeout: float | None) -> float: ...

    def remove(self, key: float) -> None: ...


class AsyncRequests:
    """The requests of a client (see the module docstring); its transport adds the rest."""

    #: The request endpoints, in the order they are tried.
    endpoints: tuple[str, ...]
    #: Seconds a request waits for its reply unless the call says otherwise.
    timeout: float
    #: This client's session id (128 random bits), sent with every lease, stream
    #: and copy request.
    session: str
    _events: str | None
    _heartbeat: Heartbeats
    _closed: bool

    def _identify(self, endpoint: str | Sequence[str], timeout: float, events: str | None,
                  server_key: str | None, client_key: str | None, pool: str | None,
                  connect_timeout: float, spread: bool = True, look_up: bool = True) -> None:
        """Set what every client starts with: endpoints, timeouts, session, events, keys,
        the pool its requests name, and the endpoint it starts with (:attr:`start`).

        With ``look_up`` false the endpoints' names are not looked up here: the
        client spreads them itself before it first connects (the asyncio client,
        which must not block its event loop on DNS)."""
        #: Seconds a request waits for a connection before ``no_server``.
        self.connect_timeout = check_timeout(connect_timeout)
        if pool is not None and (not isinstance(pool, str) or not pool):
            raise ValueError(f"pool must be a pool's name, not {pool!r}")
        #: The server's pool this client's requests go to (None: the server's default).
        self.pool = pool
        #: The endpoints as given: names are looked up again when none answers.
        self.given_endpoints = normalize_endpoints(endpoint)
        #: The endpoints requests go to: those given, with each name that resolves to
        #: several addresses spread into one endpoint per address (spread_endpoints).
        self.endpoints = (spread_endpoints(self.given_endpoints) if look_up
                          else self.given_endpoints)
        self._spread = spread
        #: The index of the endpoint this client starts with: a random one with
        #: ``spread`` (clients spread over the endpoints, as libpq's
        #: ``load_balance_hosts=random``), else the first.
        self.start = random.randrange(len(self.endpoints)) if spread else 0
        self.timeout = check_timeout(timeout)
        self.session = new_session()
        self._events = events
        #: The CURVE keys (see :mod:`dbpool.keys`), or None without CURVE.
        self.keys = client_keys(server_key, client_key)

    async def _call(self, msg: dict[str, Any], timeout: float | None) -> Any:
        """Send ``msg`` with a new id and return the ``ok`` value of its reply.

        Waits ``timeout`` seconds, or :attr:`timeout` when None; raises the
        reply's error, ConnectionError(reason="timeout") when no reply came,
        TypeError for a value the wire cannot carry.
        """
        raise NotImplementedError

    def _endpoint(self) -> str:
        """The endpoint requests go to now."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        """Whether the client was closed."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {', '.join(self.endpoints)} {state}>"

    async def query(self, sql: str, params: Params = None, *,
                    timeout: float | None = None, readonly: ReadOnly = False) -> Result:
        """Run one statement and return its result (op ``query``).

        ``timeout`` is the seconds to wait for the reply, also sent to the
        server as the time the request may take there (default: the
        client's :attr:`timeout`, and the pool's own on the server).
        ``readonly=True`` lets the server run it on one of the pool's read
        replicas, else on the primary; ``"replica"`` only on a replica
        (``ConnectionError(reason="unavailable")`` if none can serve).  The
        same holds for :meth:`execute`, :meth:`batch` and :meth:`transaction`.
        """
        if readonly:
            return await self._statement("query", sql, params, timeout, None, readonly)
        if timeout is None:
            return _to_result(await self._call(
                {"v": _VERSION, "op": "query", "sql": sql, "params": params}, None))
        return _to_result(await self._call(
            {"v": _VERSION, "op": "query", "sql": sql, "params": params, "timeout": timeout},
            timeout))

    async def execute(self, sql: str, params: Params = None, *,
                      timeout: float | None = None, readonly: ReadOnly = False) -> Result:
        """Run one statement prepared on the server (op ``execute``).

        The server prepares it on each connection the first time it runs
        there and executes it by name afterwards.
        """
        return await self._statement("execute", sql, params, timeout, None, readonly)

    async def batch(self, sql_or_statements: str | Iterable[Statement | str],
                    params_seq: Iterable[Params] | None = None, *,
                    timeout: float | None = None, readonly: ReadOnly = False) -> list[Result]:
        """Run statements in one round trip on one connection (op ``batch``).

        ``batch(sql, params_seq)`` runs ``sql`` once per parameter set;
        ``batch([(sql, params), ...])`` runs the statements given.  Outside a
        transaction the batch is atomic; the error of a failed statement
        has its position as ``index``.
        """
        return await self._batch(sql_or_statements, params_seq, timeout, None, readonly)

    def stream(self, sql: str, params: Params = None, *, max_rows: int = DEFAULT_MAX_ROWS,
               timeout: float | None = None) -> AsyncStream:
        """A stream of ``sql``'s rows, ``max_rows`` per page (op ``stream``).

        Nothing is sent until the first page is asked for.
        """
        return AsyncStream(self, sql, params, max_rows, timeout, None)

    def copy_to(self, sql: str, params: Params = None, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                timeout: float | None = None) -> AsyncCopyTo:
        """The data of a ``COPY ... TO STDOUT`` as ``bytes`` pages (op ``copy_out``).

        The COPY runs on a connection of its own.  Nothing is sent until the
        first page is asked for.
        """
        return AsyncCopyTo(self, sql, params, page_bytes, timeout, None)

    async def copy_from(self, sql: str, data: CopyData | AsyncIterable[bytes | str],
                        params: Params = None, *, block_bytes: int = BLOCK_SIZE,
                        timeout: float | None = None) -> Result:
        """Run a ``COPY ... FROM STDIN`` with ``data`` (op ``copy_in``); return its result.

        ``data`` is bytes or str, an iterable of them, or a file object
        (:mod:`dbpool.copy_data`); it goes in blocks of about ``block_bytes``
        (or fewer, if the server takes no block that large), one in flight
        at a time, so memory stays bounded on both sides.  If ``data``
        raises, the COPY takes no row and the error goes on.
        """
        return await _copy_from(self, sql, data, params, block_bytes, timeout, None)

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round-trip a ``ping``; return the seconds it took."""
        msg = request("ping")
        if timeout is not None:
            msg["timeout"] = timeout
        start = time.perf_counter()
        await self._call(msg, timeout)
        return time.perf_counter() - start

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's status map (``version``, ``server``, ``pools``, ``pool`` (the
        default), ``events``, ``health``)."""
        msg = request("status")
        if timeout is not None:
            msg["timeout"] = timeout
        value = await self._call(msg, timeout)
        if not isinstance(value, dict):
            raise malformed_reply(self._endpoint(), "status", f"not a map: {value!r:.200}")
        return value

    async def admin(self, command: str, *, pool: str | None = None, name: str | None = None,
                    seconds: float | None = None, timeout: float | None = None) -> Any:
        """Run an admin operation (op ``admin``); the client must be an admin.

        ``command`` is ``pause``, ``resume``, ``drain``, ``disconnect_all`` or
        ``status`` (of ``pool``, or of every pool), ``clients``, ``reload``,
        or ``kick`` (the client ``name``).  ``seconds`` is ``drain``'s wait
        and ``disconnect_all``'s spread.  Returns the operation's answer
        (``docs/protocol.md``, "Admin operations"); a non-admin gets
        :class:`~dbpool.errors.PermissionDenied`.
        """
        msg = request("admin", command=command)
        for key, value in (("target", pool), ("name", name), ("seconds", seconds),
                           ("timeout", timeout)):
            if value is not None:
                msg[key] = value
        return await self._call(msg, timeout)

    def subscribe(self, topics: str | Iterable[str]) -> AsyncSubscription:
        """A subscription to the server's events (each client makes its own kind)."""
        raise NotImplementedError

    async def listen(self, channel: str, *, timeout: float | None = None) -> AsyncNotifications:
        """The notifications of ``channel`` on this client's pool: every
        ``NOTIFY channel`` committed after this returns (op ``listen``).

        The server listens through its pool's relay (one connection for all
        channels) and publishes each notification on its event socket, to
        the clients that may use the pool.  Returns once the server listens
        and this subscription hears it; ``timeout`` (default: the client's)
        bounds that wait.  ``channel`` is a name as PostgreSQL takes it
        quoted.  See :class:`~dbpool.client._async.notifications.AsyncNotifications`
        (the sync client's is ``Notifications``).
        """
        check_channel(channel)
        wait = self.timeout if timeout is None else check_timeout(timeout)

        async def listen(nonce: str | None) -> Any:
            msg = request("listen", channel=channel)
            if nonce is not None:
                msg["nonce"] = nonce
            return await self._call(msg, wait)

        return await AsyncNotifications.open(listen, self.subscribe, wait)

    async def events_endpoint(self) -> str:
        """The events endpoint a subscription connects to.

        The ``events`` the client was made with, else the one the server
        reports in its status, with a wildcard host replaced by the host
        of the request endpoint.
        """
        if self._events is not None:
            return self._events
        events = (await self.status()).get("events")
        if not isinstance(events, str):
            raise ProtocolError(f"the server reports no events endpoint: {events!r}",
                                code="malformed")
        return events_endpoint(events, self._endpoint())

    async def _statement(self, op: str, sql: str, params: Params, timeout: float | None,
                         lease: str | None, readonly: ReadOnly = False) -> Result:
        msg: dict[str, Any] = {"v": _VERSION, "op": op, "sql": sql, "params": params}
        return _to_result(await self._call(self._addressed(msg, timeout, lease, readonly),
                                            timeout))

    async def _batch(self, sql_or_statements: str | Iterable[Statement | str],
                     params_seq: Iterable[Params] | None, timeout: float | None,
                     lease: str | None, readonly: ReadOnly = False) -> list[Result]:
        msg = {"v": _VERSION, **batch_fields(sql_or_statements, params_seq)}
        return to_results(await self._call(self._addressed(msg, timeout, lease, readonly),
                                           timeout))

    def _addressed(self, msg: dict[str, Any], timeout: float | None, lease: str | None,
                   readonly: ReadOnly = False) -> dict[str, Any]:
        """``msg`` with where it runs (a lease, or a replica) and its timeout."""
        if readonly:
            msg["readonly"] = readonly
        if lease is not None:
            msg["lease"] = lease
            msg["session"] = self.session
        if timeout is not None:
            msg["timeout"] = timeout
        return msg


class AsyncTransaction:
    """A transaction on a connection the server leased to this client's session.

    :meth:`begin` sends ``begin`` at once.  Entered as a context manager, the
    transaction begins with its first request instead: that request carries
    ``begin: true`` and the server opens the lease and runs it in one round
    trip (:attr:`lease` is None until then, and a block that sends nothing
    begins nothing).  Its :meth:`query`, :meth:`execute`, :meth:`batch`,
    :meth:`stream` and copies run on the leased connection.  :meth:`commit` or
    :meth:`rollback` ends it; calls before it began or after it ended raise
    :class:`~dbpool.errors.TransactionError`.  As a context manager it
    commits on a normal exit and rolls back when the block raises, unless it
    was ended inside.  While it is open the client sends heartbeats for it.
    """

    def __init__(self, client: AsyncRequests, timeout: float | None,
                 readonly: ReadOnly = False) -> None:
        self._client = client
        self._timeout = timeout
        self._readonly = readonly
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
        """True from begin (or entering the ``with`` block) until :meth:`commit` or
        :meth:`rollback`."""
        return self._state in ("active", "deferred")

    async def begin(self) -> Self:
        """Begin the transaction (op ``begin``) unless it already began; return it."""
        if self._state == "active":
            return self
        if self._state not in ("new", "deferred"):
            raise TransactionError("the transaction has ended", status="idle")
        before, self._state = self._state, "beginning"
        client = self._client
        msg = request("begin", session=client.session)
        if self._readonly:
            msg["readonly"] = self._readonly
        if self._timeout is not None:
            msg["timeout"] = self._timeout
        try:
            value = await client._call(msg, self._timeout)
            self._opened(value)
        except BaseException:
            self._state = before
            raise
        return self

    async def _first(self, msg: dict[str, Any], timeout: float | None) -> Any:
        """Send the deferred transaction's first request with its begin (``begin:
        true``); return the request's own ``ok`` value.  A statement that fails
        still began the transaction (its error names the lease): it is then open
        and aborted, as it would be after a separate ``begin``."""
        client = self._client
        msg["begin"] = True
        msg["session"] = client.session
        if self._readonly:
            msg["readonly"] = self._readonly
        self._state = "beginning"
        try:
            value = await client._call(msg, timeout)
        except BaseException as error:
            lease = getattr(error, "lease", None)
            if lease is None:  # it never began: the next request begins it
                self._state = "deferred"
                raise
            self._opened(lease)
            raise
        if not isinstance(value, dict) or "result" not in value:
            self._state = "deferred"
            raise ProtocolError(f"malformed reply to a request with its begin from "
                                f"{client._endpoint()}: {value!r:.200}", code="malformed")
        self._opened(value.get("lease"))
        return value["result"]

    def _opened(self, value: Any) -> None:
        """The server's lease map: the transaction is open."""
        client = self._client
        self.lease, self.heartbeat_timeout, self.expires_in = lease_map(
            value, client._endpoint())
        self._state = "active"
        self._keepalive = client._heartbeat.add(self.heartbeat_timeout)

    async def _begun(self) -> str:
        """The lease, the transaction begun for it if it was deferred (a stream's first
        page asks: its request cannot carry the begin)."""
        await self.begin()
        return self._lease()

    def _lease(self) -> str:
        if self._state != "active" or self.lease is None:
            if self._state == "ended":
                raise TransactionError("the transaction has ended", status="idle")
            raise TransactionError("the transaction has not begun", status="idle")
        return self.lease

    async def query(self, sql: str, params: Params = None, *,
                    timeout: float | None = None) -> Result:
        """Run one statement in the transaction."""
        msg = {"v": _VERSION, "op": "query", "sql": sql, "params": params}
        return _to_result(await self._run(msg, timeout))

    async def execute(self, sql: str, params: Params = None, *,
                      timeout: float | None = None, readonly: ReadOnly = False) -> Result:
        """Run one prepared statement in the transaction."""
        msg = {"v": _VERSION, "op": "execute", "sql": sql, "params": params}
        return _to_result(await self._run(msg, timeout))

    async def batch(self, sql_or_statements: str | Iterable[Statement | str],
                    params_seq: Iterable[Params] | None = None, *,
                    timeout: float | None = None) -> list[Result]:
        """Run a batch in the transaction."""
        msg = {"v": _VERSION, **batch_fields(sql_or_statements, params_seq)}
        return to_results(await self._run(msg, timeout))

    async def _run(self, msg: dict[str, Any], timeout: float | None) -> Any:
        """Send a request of the transaction, on its lease or, while it waits for its
        first request, with its begin; return the reply's ``ok`` value."""
        client = self._client
        if self._state == "deferred":
            return await self._first(client._addressed(msg, timeout, None), timeout)
        return await client._call(client._addressed(msg, timeout, self._lease()), timeout)

    def stream(self, sql: str, params: Params = None, *, max_rows: int = DEFAULT_MAX_ROWS,
               timeout: float | None = None) -> AsyncStream:
        """A stream on the transaction's connection."""
        return AsyncStream(self._client, sql, params, max_rows, timeout, self._pending())

    def copy_to(self, sql: str, params: Params = None, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                timeout: float | None = None) -> AsyncCopyTo:
        """A ``COPY ... TO STDOUT`` in the transaction."""
        return AsyncCopyTo(self._client, sql, params, page_bytes, timeout, self._pending())

    async def copy_from(self, sql: str, data: CopyData | AsyncIterable[bytes | str],
                        params: Params = None, *, block_bytes: int = BLOCK_SIZE,
                        timeout: float | None = None) -> Result:
        """A ``COPY ... FROM STDIN`` in the transaction."""
        return await _copy_from(self._client, sql, data, params, block_bytes, timeout,
                                await self._begun())

    def _pending(self) -> str | AsyncTransaction:
        """What a stream or copy runs in: the lease, or this transaction while its begin
        waits for a request (the stream's first page then begins it)."""
        return self if self._state == "deferred" else self._lease()

    async def commit(self, *, timeout: float | None = None) -> Result:
        """Commit (op ``commit``) and end the transaction, even if the commit fails."""
        return await self._end("commit", timeout)

    async def rollback(self, *, timeout: float | None = None) -> Result:
        """Roll back (op ``rollback``) and end the transaction, even if that fails."""
        return await self._end("rollback", timeout)

    async def _end(self, op: str, timeout: float | None) -> Result:
        if self._state == "deferred":  # it never began: nothing to end on the server
            self._state = "ended"
            return Result([], [], -1, op.upper())
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

    def deferred(self) -> Self:
        """Have it begin with its first request (see the class), unless it began."""
        if self._state == "new":
            self._state = "deferred"
        return self

    async def __aenter__(self) -> Self:
        if self._state in ("new", "deferred"):
            return self.deferred()
        return await self.begin()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._state == "deferred":  # nothing was sent: nothing began
            self._state = "ended"
            return
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
        return f"<{type(self).__name__} {self.lease or '(not begun)'} {self._state}>"


class _AsyncPaged(Generic[PageT]):
    """What a stream and a copy out share: pages asked for one request at a time,
    heartbeats while the server holds it open, and ``close``.

    A subclass names its ``kind`` (the key of ``close``), its first and next
    requests, and reads its pages.
    """

    kind = ""

    def __init__(self, client: AsyncRequests, timeout: float | None,
                 lease: str | AsyncTransaction | None) -> None:
        self._client = client
        self._timeout = timeout
        #: The lease it runs in, or the transaction that begins with it (deferred).
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
            if isinstance(self._lease, AsyncTransaction):
                self._lease = await self._lease._begun()
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
    """The pages of a server-side cursor (ops ``stream``, ``fetch``, ``close``).

    Iterating yields one :class:`~dbpool.driver.Result` per page (at most
    ``max_rows`` rows); :meth:`rows` yields the rows themselves.  The
    ``stream`` request goes out with the first page asked for.  Leaving an
    iteration early (``break``, an exception) closes the stream, as does
    the end of a ``with`` block; :meth:`fetch` pages by hand.  While the
    stream is open the client sends heartbeats for it.
    """

    kind = "stream"

    def __init__(self, client: AsyncRequests, sql: str, params: Params, max_rows: int,
                 timeout: float | None, lease: str | AsyncTransaction | None) -> None:
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
    """The data of a ``COPY ... TO STDOUT`` run by the server (ops ``copy_out``,
    ``copy_read``, ``close``).

    Iterating yields ``bytes`` pages of up to ``page_bytes``, fetched one at
    a time as they are asked for, so memory stays bounded on both sides;
    :meth:`read` returns all of it; :attr:`result` (``rowcount``: rows sent)
    is set once the data has all arrived.  Leaving an iteration early
    (``break``, an exception), :meth:`close` or the end of a ``with`` block
    cancels the COPY on the server.  While it is open the client sends
    heartbeats for it.
    """

    kind = "copy"

    def __init__(self, client: AsyncRequests, sql: str, params: Params, page_bytes: int,
                 timeout: float | None, lease: str | AsyncTransaction | None) -> None:
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


async def _copy_from(client: AsyncRequests, sql: str,
                     data: CopyData | AsyncIterable[bytes | str], params: Params,
                     block_bytes: int, timeout: float | None, lease: str | None) -> Result:
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
            async for block in ablocks(data, block_bytes):
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
