"""The blocking client: :class:`Client`, :class:`Transaction`, :class:`Stream` and
:class:`CopyTo`.

Threads
-------
A :class:`Client` may be shared by threads.  Each thread talks to the server
through a ``DEALER`` socket of its own, made on the thread's first request
(ZeroMQ sockets are not thread-safe) and kept in a ``threading.local``;
:meth:`Client.close` closes them all, and must not race with requests still
running in other threads.  A :class:`Transaction` or :class:`Stream` is used
by one thread at a time.  Heartbeats go out from a daemon thread with a
socket of its own, started when the first transaction or stream opens and
stopped by :meth:`Client.close`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import zmq

from dbpool.copy_data import BLOCK_SIZE, CopyData, blocks
from dbpool.driver import Result
from dbpool.errors import ConnectionError, ProtocolError, TransactionError
from dbpool.protocol import VERSION
from dbpool.wire import WireError, make_packer, packb, unpackb

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
    events_endpoint,
    lease_map,
    malformed_reply,
    new_session,
    normalize_endpoints,
    normalize_topics,
    page_map,
    reply_value,
    request,
    to_result,
    to_results,
)
from .events import Subscription

__all__ = ["Client", "CopyTo", "Stream", "Transaction"]

logger = logging.getLogger("dbpool.client.sync")

PageT = TypeVar("PageT")

_Again = zmq.Again
_ZMQError = zmq.ZMQError
_NOBLOCK = zmq.NOBLOCK
_POLLOUT = zmq.POLLOUT
_monotonic = time.monotonic
_unpackb = unpackb
_to_result = to_result
_VERSION = VERSION


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


class _Holder:
    """Closes a thread's socket when the thread's locals go (the thread ended)."""

    __slots__ = ("client", "sock")

    def __init__(self, client: Client, sock: zmq.Socket[Any]) -> None:
        self.client = weakref.ref(client)
        self.sock = sock

    def __del__(self) -> None:
        try:
            client = self.client()
            if client is not None:
                client._forget(self.sock)
            self.sock.close(linger=0)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class _Channel(threading.local):
    """One thread's request socket and what the request loop needs of it.

    Made on the thread's first attribute access; the bound methods are
    cached so that a request costs no attribute lookups on the socket.
    """

    sock: zmq.Socket[bytes]
    endpoint: str
    send: Callable[..., Any]
    recv: Callable[..., bytes]
    poll: Callable[[int], list[tuple[Any, int]]]
    pack: Callable[[Any], bytes]
    reset_packer: Callable[[], None]
    last_id: int
    holder: _Holder

    def __init__(self, owner: weakref.ref[Client]) -> None:
        client = owner()
        if client is None:
            raise closed_error()
        self.last_id = 0
        packer = make_packer()
        self.pack = packer.pack
        self.reset_packer = packer.reset
        client._attach(self)


class Client:
    """A blocking client of ``dbpool serve``.

    ``endpoint`` is the server's request endpoint, or a list of them: the
    client uses one at a time and moves to the next after a request times
    out.  ``timeout`` is the seconds a request waits for its reply unless
    the call passes its own ``timeout`` (which is then also sent to the
    server, as the time the request may take there).  ``events`` is the
    server's events endpoint for :meth:`subscribe`; by default the client
    asks the server (``status``).  ``context`` is the ZeroMQ context to make
    sockets in (default: the process's shared one).

    Every client has a session id (:attr:`session`, 128 random bits) that
    its transactions and streams belong to.  A request that gets no reply
    within its timeout raises :class:`~dbpool.errors.ConnectionError` with
    ``reason="timeout"``; the thread's socket is then replaced, so a reply
    that comes later is dropped, and libzmq reconnects by itself, so a
    restarted server answers the next request.

    See the module docstring for threads.  Use it as a context manager or
    call :meth:`close`.
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
        self._context: zmq.Context[Any] = context if context is not None \
            else zmq.Context.instance()
        self._timeout_ms = _ms(self.timeout)
        self._lock = threading.Lock()
        self._index = 0
        self._closed = False
        self._sockets: set[zmq.Socket[Any]] = set()
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._heartbeat = _Heartbeat(self)
        self._ch = _Channel(weakref.ref(self))

    # -- sockets ------------------------------------------------------------------------

    def _new_socket(self, endpoint: str, *, register: bool = True) -> zmq.Socket[Any]:
        """A configured DEALER connected to ``endpoint``; closed by close() if registered."""
        sock: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        try:
            configure_socket(sock, self.timeout)
            sock.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
            sock.connect(endpoint)
            with self._lock:
                if self._closed:
                    raise closed_error()
                if register:
                    self._sockets.add(sock)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _current_endpoint(self) -> str:
        return self.endpoints[self._index]

    def _attach(self, ch: _Channel) -> None:
        """Give ``ch`` a new socket on the current endpoint."""
        endpoint = self.endpoints[self._index]
        sock = self._new_socket(endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        ch.holder = _Holder(self, sock)
        ch.sock = sock
        ch.endpoint = endpoint
        ch.send = sock.send
        ch.recv = sock.recv
        ch.poll = poller.poll
        logger.debug("connected a request socket to %s", endpoint)

    def _forget(self, sock: zmq.Socket[Any]) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def _replace(self, ch: _Channel) -> None:
        """Close ``ch``'s socket and give it a new one (the next endpoint, if several)."""
        old = ch.sock
        with self._lock:
            self._sockets.discard(old)
            closed = self._closed
            count = len(self.endpoints)
            if count > 1 and self.endpoints[self._index] == ch.endpoint:
                self._index = (self._index + 1) % count
                logger.warning("no reply from %s: moving to %s",
                               ch.endpoint, self.endpoints[self._index])
        old.close(linger=0)
        if not closed:
            self._attach(ch)

    # -- the request loop ---------------------------------------------------------------

    def _call(self, msg: dict[str, Any], timeout: float | None) -> Any:
        """Send ``msg`` with a new id and return the ``ok`` value of its reply.

        Waits ``timeout`` seconds, or :attr:`timeout` when None; raises the
        reply's error, ConnectionError(reason="timeout") when no reply came,
        TypeError for a value the wire cannot carry.
        """
        ch = self._ch
        rid = ch.last_id = ch.last_id + 1
        msg["id"] = rid
        try:
            body = ch.pack(msg)
        except BaseException:
            ch.reset_packer()
            raise
        if timeout is None:
            try:
                ch.send(body)
            except _Again:
                raise self._timed_out(ch, msg, self.timeout, sent=False) from None
            except _ZMQError as exc:
                raise self._socket_error(ch, exc) from None
            try:
                data = ch.recv()
            except _Again:
                raise self._timed_out(ch, msg, self.timeout, sent=True) from None
            except _ZMQError as exc:
                raise self._socket_error(ch, exc) from None
        else:
            data = self._exchange(ch, msg, body, timeout)
        try:
            reply = _unpackb(data)
            if reply["id"] == rid and "error" not in reply:
                return reply["ok"]
        except (WireError, TypeError, KeyError):
            pass
        return self._settle(ch, msg, data, timeout)

    def _exchange(self, ch: _Channel, msg: dict[str, Any], body: bytes, timeout: float) -> bytes:
        """Send and receive within ``timeout`` seconds, however the socket is set."""
        deadline = _monotonic() + timeout
        try:
            try:
                ch.send(body, _NOBLOCK)
            except _Again:
                if not ch.sock.poll(_ms(timeout), _POLLOUT):
                    raise self._timed_out(ch, msg, timeout, sent=False) from None
                try:
                    ch.send(body, _NOBLOCK)
                except _Again:
                    raise self._timed_out(ch, msg, timeout, sent=False) from None
            if not ch.poll(_ms(deadline - _monotonic())):
                raise self._timed_out(ch, msg, timeout, sent=True)
            return ch.recv(_NOBLOCK)
        except _ZMQError as exc:
            raise self._socket_error(ch, exc) from None

    def _settle(self, ch: _Channel, msg: dict[str, Any], data: bytes,
                timeout: float | None) -> Any:
        """The slow path: errors, malformed replies and replies to other requests."""
        rid, op = msg["id"], msg["op"]
        wait = self.timeout if timeout is None else timeout
        deadline = _monotonic() + wait
        while True:
            try:
                reply = _unpackb(data)
            except WireError as exc:
                raise malformed_reply(ch.endpoint, op, str(exc)) from None
            if not isinstance(reply, Mapping):
                raise malformed_reply(ch.endpoint, op, f"not a map: {reply!r:.200}")
            got = reply.get("id")
            if got == rid or (got is None and "error" in reply):
                return reply_value(reply, ch.endpoint, op)
            logger.debug("dropped a reply to request %r while waiting for %d", got, rid)
            try:
                if not ch.poll(_ms(deadline - _monotonic())):
                    raise self._timed_out(ch, msg, wait, sent=True)
                data = ch.recv(_NOBLOCK)
            except _ZMQError as exc:
                raise self._socket_error(ch, exc) from None

    def _timed_out(self, ch: _Channel, msg: Mapping[str, Any], wait: float,
                   *, sent: bool) -> ConnectionError:
        endpoint, op = ch.endpoint, msg.get("op")
        if sent:
            text = f"no reply from {endpoint} to {op!r} within {wait:g} s"
        else:
            text = f"could not send {op!r} to {endpoint} within {wait:g} s: not connected"
        logger.debug("%s; replacing the socket", text)
        self._replace(ch)
        return ConnectionError(text, reason="timeout")

    def _socket_error(self, ch: _Channel, exc: zmq.ZMQError) -> ConnectionError:
        if self._closed:
            return closed_error()
        return ConnectionError(f"socket error on {ch.endpoint}: {exc}", reason="error")

    # -- requests -----------------------------------------------------------------------

    def query(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Result:
        """Run one statement and return its result (op ``query``).

        ``timeout`` is the seconds to wait for the reply, also sent to the
        server as the time the request may take there (default: the
        client's :attr:`timeout`, and the pool's own on the server).
        """
        if timeout is None:
            return _to_result(self._call(
                {"v": _VERSION, "op": "query", "sql": sql, "params": params}, None))
        return _to_result(self._call(
            {"v": _VERSION, "op": "query", "sql": sql, "params": params, "timeout": timeout},
            timeout))

    def execute(self, sql: str, params: Params = None, *,
                timeout: float | None = None) -> Result:
        """Run one statement prepared on the server (op ``execute``).

        The server prepares it on each connection the first time it runs
        there and executes it by name afterwards.
        """
        return self._statement("execute", sql, params, timeout, None)

    def batch(self, sql_or_statements: str | Iterable[Statement | str],
              params_seq: Iterable[Params] | None = None, *,
              timeout: float | None = None) -> list[Result]:
        """Run statements in one round trip on one connection (op ``batch``).

        ``batch(sql, params_seq)`` runs ``sql`` once per parameter set;
        ``batch([(sql, params), ...])`` runs the statements given.  Outside a
        transaction the batch is atomic; the error of a failed statement
        has its position as ``index``.
        """
        return self._batch(sql_or_statements, params_seq, timeout, None)

    def stream(self, sql: str, params: Params = None, *, max_rows: int = DEFAULT_MAX_ROWS,
               timeout: float | None = None) -> Stream:
        """A :class:`Stream` of ``sql``'s rows, ``max_rows`` per page (op ``stream``).

        Nothing is sent until the first page is asked for.
        """
        return Stream(self, sql, params, max_rows, timeout, None)

    def copy_to(self, sql: str, params: Params = None, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                timeout: float | None = None) -> CopyTo:
        """The data of a ``COPY ... TO STDOUT`` as ``bytes`` pages (op ``copy_out``).

        The COPY runs on a connection of its own.  Nothing is sent until the
        first page is asked for.  See :class:`CopyTo`.
        """
        return CopyTo(self, sql, params, page_bytes, timeout, None)

    def copy_from(self, sql: str, data: CopyData, params: Params = None, *,
                  block_bytes: int = BLOCK_SIZE, timeout: float | None = None) -> Result:
        """Run a ``COPY ... FROM STDIN`` with ``data`` (op ``copy_in``); return its result.

        ``data`` is bytes or str, an iterable of them, or a file object
        (:mod:`dbpool.copy_data`); it goes in blocks of about ``block_bytes``,
        one in flight at a time, so memory stays bounded on both sides.  If
        ``data`` raises, the COPY takes no row and the error goes on.
        """
        return _copy_from(self, sql, data, params, block_bytes, timeout, None)

    def transaction(self, *, timeout: float | None = None) -> Transaction:
        """Begin a transaction now (op ``begin``) and return it.

        As a context manager the transaction commits when the block ends
        normally and rolls back when it raises (the exception propagates).
        While it is open the client sends heartbeats for it.
        """
        msg = request("begin", session=self.session)
        if timeout is not None:
            msg["timeout"] = timeout
        value = self._call(msg, timeout)
        lease, heartbeat, expires = lease_map(value, self._ch.endpoint)
        return Transaction(self, lease, heartbeat, expires)

    def ping(self, *, timeout: float | None = None) -> float:
        """Round-trip a ``ping``; return the seconds it took."""
        msg = request("ping")
        if timeout is not None:
            msg["timeout"] = timeout
        start = time.perf_counter()
        self._call(msg, timeout)
        return time.perf_counter() - start

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's status map (``version``, ``server``, ``pool``, ``events``, ``health``)."""
        msg = request("status")
        if timeout is not None:
            msg["timeout"] = timeout
        value = self._call(msg, timeout)
        if not isinstance(value, dict):
            raise malformed_reply(self._ch.endpoint, "status", f"not a map: {value!r:.200}")
        return value

    def events_endpoint(self) -> str:
        """The events endpoint :meth:`subscribe` connects to.

        The ``events`` the client was made with, else the one the server
        reports in its status, with a wildcard host replaced by the host
        of the request endpoint.
        """
        if self._events is not None:
            return self._events
        events = self.status().get("events")
        if not isinstance(events, str):
            raise ProtocolError(f"the server reports no events endpoint: {events!r}",
                                code="malformed")
        return events_endpoint(events, self._ch.endpoint)

    def subscribe(self, topics: str | Iterable[str] = DEFAULT_TOPICS) -> Subscription:
        """A :class:`~dbpool.client.events.Subscription` to the server's events.

        ``topics`` are prefixes (``"connection"``, ``"pool"``,
        ``"telemetry"``; ``""`` for all).  The subscription is connected on
        return, but ZeroMQ may take a moment to join: events published in
        that moment are missed.
        """
        names = normalize_topics(topics)
        if self._closed:
            raise closed_error()
        sub = Subscription(self._context, self.events_endpoint(), names)
        self._subscriptions.add(sub)
        return sub

    def close(self) -> None:
        """Close every socket and subscription and stop the heartbeat thread.

        Idempotent.  Requests after close raise ConnectionError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sockets = list(self._sockets)
            self._sockets.clear()
        self._heartbeat.stop()
        for sock in sockets:
            sock.close(linger=0)
        for sub in list(self._subscriptions):
            sub.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Client {', '.join(self.endpoints)} {state}>"

    # -- shared by Transaction and Stream -----------------------------------------------

    def _statement(self, op: str, sql: str, params: Params, timeout: float | None,
                   lease: str | None) -> Result:
        msg: dict[str, Any] = {"v": _VERSION, "op": op, "sql": sql, "params": params}
        if lease is not None:
            msg["lease"] = lease
            msg["session"] = self.session
        if timeout is not None:
            msg["timeout"] = timeout
        return _to_result(self._call(msg, timeout))

    def _batch(self, sql_or_statements: str | Iterable[Statement | str],
               params_seq: Iterable[Params] | None, timeout: float | None,
               lease: str | None) -> list[Result]:
        msg = {"v": _VERSION, **batch_fields(sql_or_statements, params_seq)}
        if lease is not None:
            msg["lease"] = lease
            msg["session"] = self.session
        if timeout is not None:
            msg["timeout"] = timeout
        return to_results(self._call(msg, timeout))


class Transaction:
    """A transaction on a connection the server leased to this client's session.

    Made by :meth:`Client.transaction`.  Its :meth:`query`,
    :meth:`execute`, :meth:`batch` and :meth:`stream` run on the leased
    connection.  :meth:`commit` or :meth:`rollback` ends it; after that
    every call raises :class:`~dbpool.errors.TransactionError`.  As a
    context manager it commits on a normal exit and rolls back when the
    block raises, unless it was ended inside the block.
    """

    def __init__(self, client: Client, lease: str, heartbeat_timeout: float,
                 expires_in: float | None) -> None:
        self._client = client
        #: The lease id the server gave.
        self.lease = lease
        #: Seconds without a request after which the server ends the lease.
        self.heartbeat_timeout = heartbeat_timeout
        #: Seconds the lease may last at most, as the server said at begin.
        self.expires_in = expires_in
        self._active = True
        self._keepalive = client._heartbeat.add(heartbeat_timeout)

    @property
    def active(self) -> bool:
        """True until :meth:`commit` or :meth:`rollback` was called."""
        return self._active

    def _lease(self) -> str:
        if not self._active:
            raise TransactionError("the transaction has ended", status="idle")
        return self.lease

    def query(self, sql: str, params: Params = None, *, timeout: float | None = None) -> Result:
        """Run one statement in the transaction (see :meth:`Client.query`)."""
        return self._client._statement("query", sql, params, timeout, self._lease())

    def execute(self, sql: str, params: Params = None, *,
                timeout: float | None = None) -> Result:
        """Run one prepared statement in the transaction (see :meth:`Client.execute`)."""
        return self._client._statement("execute", sql, params, timeout, self._lease())

    def batch(self, sql_or_statements: str | Iterable[Statement | str],
              params_seq: Iterable[Params] | None = None, *,
              timeout: float | None = None) -> list[Result]:
        """Run a batch in the transaction (see :meth:`Client.batch`)."""
        return self._client._batch(sql_or_statements, params_seq, timeout, self._lease())

    def stream(self, sql: str, params: Params = None, *, max_rows: int = DEFAULT_MAX_ROWS,
               timeout: float | None = None) -> Stream:
        """A :class:`Stream` on the transaction's connection."""
        return Stream(self._client, sql, params, max_rows, timeout, self._lease())

    def copy_to(self, sql: str, params: Params = None, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                timeout: float | None = None) -> CopyTo:
        """A :class:`CopyTo` in the transaction (see :meth:`Client.copy_to`)."""
        return CopyTo(self._client, sql, params, page_bytes, timeout, self._lease())

    def copy_from(self, sql: str, data: CopyData, params: Params = None, *,
                  block_bytes: int = BLOCK_SIZE, timeout: float | None = None) -> Result:
        """A ``COPY ... FROM STDIN`` in the transaction (see :meth:`Client.copy_from`)."""
        return _copy_from(self._client, sql, data, params, block_bytes, timeout, self._lease())

    def commit(self, *, timeout: float | None = None) -> Result:
        """Commit (op ``commit``) and end the transaction, even if the commit fails."""
        return self._end("commit", timeout)

    def rollback(self, *, timeout: float | None = None) -> Result:
        """Roll back (op ``rollback``) and end the transaction, even if that fails."""
        return self._end("rollback", timeout)

    def _end(self, op: str, timeout: float | None) -> Result:
        lease = self._lease()
        self._active = False
        client = self._client
        try:
            msg = request(op, lease=lease, session=client.session)
            if timeout is not None:
                msg["timeout"] = timeout
            return to_result(client._call(msg, timeout))
        finally:
            client._heartbeat.remove(self._keepalive)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._active:
            return
        if exc_type is None:
            self.commit()
            return
        try:
            self.rollback()
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
        return f"<Transaction {self.lease} {'active' if self._active else 'ended'}>"


class _Paged(Generic[PageT]):
    """What a :class:`Stream` and a :class:`CopyTo` share: pages asked for one request at
    a time, heartbeats while the server holds the stream or copy open, and ``close``.

    A subclass names its ``kind`` (the key of ``close``), its first and next
    requests, and reads its pages.
    """

    kind = ""

    def __init__(self, client: Client, timeout: float | None, lease: str | None) -> None:
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

    def fetch(self) -> PageT | None:
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
        page_id, page, done = self._read_page(client._call(msg, self._timeout), msg["op"])
        if self.id is None:
            self.id = page_id
            if not done:
                self._keepalive = client._heartbeat.add(None)
        if done:
            self._done = True
            self._release()
        return page

    def __iter__(self) -> Iterator[PageT]:
        finished = False
        try:
            while (page := self.fetch()) is not None:
                if page:  # a COPY's last page may be empty; a Result always counts
                    yield page
            finished = True
        finally:
            if not finished:
                self._close_quietly()

    def close(self, *, timeout: float | None = None) -> None:
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
            client._call(msg, timeout)
        finally:
            self._release()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception as error:
            logger.warning("closing %s %s failed: %r", self.kind, self.id, error)

    def _release(self) -> None:
        if self._keepalive is not None:
            self._client._heartbeat.remove(self._keepalive)
            self._keepalive = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_quietly()

    def __repr__(self) -> str:
        state = "done" if self._done else "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.id or '(not started)'} {state}>"


class Stream(_Paged[Result]):
    """The pages of a server-side cursor (ops ``stream``, ``fetch``, ``close``).

    Iterating yields one :class:`~dbpool.driver.Result` per page (at most
    ``max_rows`` rows); :meth:`rows` yields the rows themselves.  The
    ``stream`` request goes out with the first page asked for.  Leaving an
    iteration early (``break``, an exception) closes the stream, as does
    the end of a ``with`` block; :meth:`fetch` pages by hand.  While the
    stream is open the client sends heartbeats for it.
    """

    kind = "stream"

    def __init__(self, client: Client, sql: str, params: Params, max_rows: int,
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
        stream_id, result, done = page_map(value, self._client._ch.endpoint, op)
        return stream_id, to_result(result), done

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """Every row of the stream's remaining pages."""
        for page in self:
            yield from page.rows


class CopyTo(_Paged[bytes]):
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

    def __init__(self, client: Client, sql: str, params: Params, page_bytes: int,
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
        copy_id, data, done, result = copy_page(value, self._client._ch.endpoint, op)
        if done:
            self.result = result
        return copy_id, data, done

    def read(self) -> bytes:
        """All the (remaining) data at once."""
        return b"".join(self)


def _copy_from(client: Client, sql: str, data: CopyData, params: Params, block_bytes: int,
               timeout: float | None, lease: str | None) -> Result:
    """The ``copy_in``, ``copy_write``... ``copy_end`` exchange of ``copy_from``."""
    session = client.session
    msg = request("copy_in", sql=sql, params=params, session=session)
    if lease is not None:
        msg["lease"] = lease
    if timeout is not None:
        msg["timeout"] = timeout
    copy_id, block_bytes = copy_started(client._call(msg, timeout), client._ch.endpoint,
                                        block_bytes)
    keepalive = client._heartbeat.add(None)
    try:
        try:
            for block in blocks(data, block_bytes):
                msg = request("copy_write", copy=copy_id, session=session, data=block)
                if timeout is not None:
                    msg["timeout"] = timeout
                client._call(msg, timeout)
        except BaseException as error:
            msg = request("close", copy=copy_id, session=session)
            try:
                client._call(msg, timeout)
            except Exception as error2:
                logger.warning("aborting copy %s after %r failed: %r", copy_id, error, error2)
            raise
        msg = request("copy_end", copy=copy_id, session=session)
        if timeout is not None:
            msg["timeout"] = timeout
        return to_result(client._call(msg, timeout))
    finally:
        client._heartbeat.remove(keepalive)


class _Heartbeat:
    """The heartbeat thread of one client.

    :meth:`add` and :meth:`remove` count what needs heartbeats (see
    :class:`~dbpool.client._base.Keepalive`); the thread, started at the
    first :meth:`add`, sends ``heartbeat`` for the session every third of
    the heartbeat timeout while anything is held and waits on an event
    otherwise, so :meth:`stop` ends it at once.  The heartbeats are not
    awaited: their replies are read and dropped before the next one goes
    out, and a heartbeat that cannot be sent (no connection) is skipped.
    """

    def __init__(self, client: Client) -> None:
        self._client = weakref.ref(client)
        self._session = client.session
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._state = Keepalive()
        self._since = 0.0
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: Heartbeats sent so far.
        self.sent = 0

    def add(self, heartbeat_timeout: float | None) -> float:
        with self._lock:
            if not self._state:
                self._since = _monotonic()
            key = self._state.add(heartbeat_timeout)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(
                    target=self._run, name="dbpool-client-heartbeat", daemon=True)
                self._thread.start()
        self._wake.set()
        return key

    def remove(self, key: float) -> None:
        with self._lock:
            self._state.remove(key)
        self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        sock: zmq.Socket[Any] | None = None
        endpoint = ""
        ids = 0
        last = 0.0
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    if self._stopped:
                        return
                    interval = self._state.interval()
                    since = self._since
                if interval is None:
                    self._wake.wait()
                    continue
                delay = max(last, since) + interval - _monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                client = self._client()
                if client is None or client.closed:
                    return
                current = client._current_endpoint()
                if sock is None or current != endpoint:
                    if sock is not None:
                        sock.close(linger=0)
                    sock = client._new_socket(current, register=False)
                    endpoint = current
                del client
                self._drain(sock)
                ids += 1
                body = packb({"v": _VERSION, "id": ids, "op": "heartbeat",
                              "session": self._session})
                try:
                    sock.send(body, _NOBLOCK)
                except _Again:
                    logger.debug("heartbeat skipped: not connected to %s", endpoint)
                else:
                    self.sent += 1
                last = _monotonic()
        except Exception:
            logger.exception("the heartbeat thread failed; leases may expire")
        finally:
            if sock is not None:
                sock.close(linger=0)

    @staticmethod
    def _drain(sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                data = sock.recv(_NOBLOCK)
            except _Again:
                return
            try:
                reply = unpackb(data)
            except WireError:
                logger.warning("malformed heartbeat reply dropped")
                continue
            if isinstance(reply, Mapping) and "error" in reply:
                logger.warning("heartbeat failed: %r", reply["error"])
            else:
                logger.debug("heartbeat reply %r", reply)
