"""The blocking client: :class:`Client`, the transport of the requests in
``client/_sync/requests.py`` (:class:`Transaction`, :class:`Stream`,
:class:`CopyTo`), which are generated from their asyncio source.

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

Transport
---------
To a plain ``tcp://host:port`` endpoint, a thread's ``DEALER`` is
:class:`~dbpool.client.direct.ZmtpConnection`: ZeroMQ's wire
protocol spoken on a TCP socket by the calling thread itself, which saves
the two wake-ups of libzmq's I/O thread per round trip.  It behaves as the
libzmq socket does: it connects on the first request (retrying every
100 ms for ``connect_timeout``), reconnects after the server closed the
connection, and is replaced after a timeout.  One difference: when the
connection closes while a reply is awaited, the request fails at once
(``reason="timeout"``: no reply came) rather than at its deadline.  With
CURVE keys it speaks CURVE itself (:mod:`dbpool.curve`) when PyNaCl is
installed (the ``curve`` extra).  Other endpoints, and clients with keys but
without PyNaCl, use libzmq.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

import zmq

from dbpool.errors import ConnectionError
from dbpool.protocol import VERSION
from dbpool.spin import CLIENT_SPIN, checked_spin
from dbpool.wire import WireError, make_packer, packb, unpackb
from dbpool.zmtp import HandshakeError

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
    handshake_monitor,
    malformed_reply,
    no_server,
    normalize_topics,
    refused,
    reply_value,
    spread_endpoints,
    timed_out,
    to_result,
    unresolved,
)
from ._sync.requests import CopyTo, Requests, Stream, Transaction
from .direct import PeerClosed, ZmtpConnection
from .events import Subscription

__all__ = ["Client", "CopyTo", "Stream", "Transaction"]  # the last three: _sync.requests

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
#: The share of a heartbeat interval after which a heartbeat that could not be
#: sent (no connection yet) is tried again.
_HEARTBEAT_RETRY = 0.1


def _ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


class _Holder:
    """Closes a thread's socket when the thread's locals go (the thread ended)."""

    __slots__ = ("client", "monitor", "sock")

    def __init__(self, client: Client, sock: zmq.Socket[Any] | ZmtpConnection,
                 monitor: zmq.Socket[Any] | None) -> None:
        self.client = weakref.ref(client)
        self.sock = sock
        self.monitor = monitor

    def __del__(self) -> None:
        try:
            client = self.client()
            if client is not None:
                client._forget(self.sock)
            _close(self.sock)
            if self.monitor is not None:
                self.monitor.close(linger=0)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _close(sock: zmq.Socket[Any] | ZmtpConnection) -> None:
    if isinstance(sock, ZmtpConnection):
        sock.close()
    else:
        sock.close(linger=0)


class _Channel(threading.local):
    """One thread's request socket and what the request loop needs of it.

    Made on the thread's first attribute access; the bound methods are
    cached so that a request costs no attribute lookups on the socket.
    """

    sock: zmq.Socket[bytes]
    #: The monitor of ``sock``'s handshakes (see dbpool.keys.handshake_failure).
    monitor: zmq.Socket[bytes]
    #: The thread's direct connection, when it has one instead of ``sock``.
    direct: ZmtpConnection | None
    #: Whether the endpoint's host name was found to resolve.
    resolved: bool
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


class Client(Requests):
    """A blocking client of ``dbpool serve``.

    ``endpoint`` is the server's request endpoint, or a list of them (or a
    ``tcp://`` name that resolves to several addresses, as a Kubernetes
    headless Service does: one endpoint each).  The client uses one at a
    time: with ``spread`` (the default) a random one, so that clients spread
    over the servers, as libpq's ``load_balance_hosts=random``; else the
    first.  It moves to the next when a request times out or the server
    cannot be reached.  A client's transactions and streams stay on the
    server they began on.  ``timeout`` is the seconds a request waits for its reply unless
    the call passes its own ``timeout`` (which is then also sent to the
    server, as the time the request may take there).  ``events`` is the
    server's events endpoint for :meth:`subscribe`; by default the client
    asks the server (``status``).  ``context`` is the ZeroMQ context to make
    sockets in (default: the process's shared one).

    ``pool`` names the server's pool to use (``[pools.NAME]`` in its
    configuration; default: its ``default`` pool).

    A request that finds no connection to a server waits for one at most
    ``connect_timeout`` seconds (2), then raises ``ConnectionError`` with
    ``reason="no_server"`` naming the endpoint (and a host name that does not
    resolve says so at once); with several endpoints it tries the next at
    once.  ``direct=False`` keeps libzmq for every endpoint (see the module
    docstring: by default a thread speaks ZeroMQ's protocol itself on a
    ``tcp://`` endpoint).  On such a connection, while its recent round trips
    took less than ``spin`` seconds (1 ms), a thread waiting for its reply
    polls for it, for up to three times that, yielding the CPU between polls,
    instead of sleeping: a sleeping thread costs the server a wake-up per reply,
    which on a VM costs as much as a short query.  This halves a lone caller's
    round trip to a nearby server and spends the waiting time on the CPU; a
    busy server answers later than ``spin``, so its clients sleep.
    ``spin=0`` never polls.  ``reason="timeout"`` is for a request
    sent to a live server that did not answer in time.

    ``server_key`` (the server's public key) and ``client_key`` (this
    client's secret key) connect to a server that uses CURVE: each is a key
    file from ``dbpool keygen`` or the key as Z85 text, and they default to
    ``$DBPOOL_SERVER_KEY`` and ``$DBPOOL_CLIENT_KEY``.  A server that refuses
    the key (or wants one) fails the request at once with
    ``ConnectionError(reason="unauthorized")``, not after the timeout.

    Every client has a session id (:attr:`session`, 128 random bits) that
    its transactions and streams belong to.  A request that gets no reply
    within its timeout raises :class:`~dbpool.errors.ConnectionError` with
    ``reason="timeout"``; the thread's socket is then replaced, so a reply
    that comes later is dropped, and libzmq reconnects by itself, so a
    restarted server answers the next request.

    See the module docstring for threads.  Use it as a context manager or
    call :meth:`close`.
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
        spin: float = CLIENT_SPIN,
    ) -> None:
        #: Whether a thread may speak ZMTP itself (see the module docstring).
        self.direct = direct
        #: The round trip below which a thread polls for its reply (see the docstring).
        self.spin = checked_spin(spin)
        self._identify(endpoint, timeout, events, server_key, client_key, pool,
                       connect_timeout, spread)
        self._context: zmq.Context[Any] = context if context is not None \
            else zmq.Context.instance()
        self._timeout_ms = _ms(self.timeout)
        self._lock = threading.Lock()
        self._index = self.start
        self._closed = False
        self._sockets: set[zmq.Socket[Any] | ZmtpConnection] = set()
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._heartbeat = _Heartbeat(self)
        self._ch = _Channel(weakref.ref(self))

    # -- sockets ------------------------------------------------------------------------

    def _new_socket(self, endpoint: str, *, register: bool = True,
                    monitor: bool = False) -> tuple[zmq.Socket[Any], zmq.Socket[Any] | None]:
        """A configured DEALER connected to ``endpoint`` (closed by close() if registered),
        and with ``monitor`` the socket that reports how its handshakes end."""
        sock: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        watch = None
        try:
            configure_socket(sock, self.timeout, self.keys)
            sock.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
            if monitor:
                watch = handshake_monitor(sock)
            sock.connect(endpoint)
            with self._lock:
                if self._closed:
                    raise closed_error()
                if register:
                    self._sockets.add(sock)
        except BaseException:
            if watch is not None:
                watch.close(linger=0)
            sock.close(linger=0)
            raise
        return sock, watch

    def _current_endpoint(self) -> str:
        return self.endpoints[self._index]

    def _attach(self, ch: _Channel) -> None:
        """Give ``ch`` a new socket on the current endpoint: a direct connection
        where it can (see the module docstring), else a libzmq ``DEALER``."""
        endpoint = self.endpoints[self._index]
        ch.resolved = False
        ch.endpoint = endpoint
        handshake = direct_handshake(self.keys) if self.direct else None
        address = direct_address(endpoint) if handshake is not None else None
        if address is not None and handshake is not None:
            direct = ZmtpConnection(*address, handshake, self.spin)
            with self._lock:
                if self._closed:
                    raise closed_error()
                self._sockets.add(direct)
            ch.direct = direct
            ch.holder = _Holder(self, direct, None)
            return
        ch.direct = None
        sock, watch = self._new_socket(endpoint, monitor=True)
        assert watch is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        ch.holder = _Holder(self, sock, watch)
        ch.sock = sock
        ch.monitor = watch
        ch.send = sock.send
        ch.recv = sock.recv
        ch.poll = poller.poll
        logger.debug("connected a request socket to %s", endpoint)

    def _forget(self, sock: zmq.Socket[Any] | ZmtpConnection) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def _replace(self, ch: _Channel, why: str = "no reply") -> None:
        """Close ``ch``'s socket and give it a new one (the next endpoint, if several)."""
        old: zmq.Socket[Any] | ZmtpConnection
        if ch.direct is not None:
            old = ch.direct
        else:
            old = ch.sock
            ch.monitor.close(linger=0)
        with self._lock:
            self._sockets.discard(old)
            closed = self._closed
            count = len(self.endpoints)
            if count > 1 and self.endpoints[self._index] == ch.endpoint:
                self._index = (self._index + 1) % count
                logger.warning("%s: moving from %s to %s", why,
                               ch.endpoint, self.endpoints[self._index])
        _close(old)
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
        if self.pool is not None:
            msg["pool"] = self.pool
        try:
            body = ch.pack(msg)
        except BaseException:
            ch.reset_packer()
            raise
        direct = ch.direct
        if direct is not None:
            data = self._direct_exchange(ch, direct, msg, body,
                                         self.timeout if timeout is None else timeout)
        elif timeout is None:
            try:
                ch.send(body, _NOBLOCK)
            except _Again:  # not connected (yet): wait, watching the handshake
                data = self._exchange(ch, msg, body, self.timeout)
            except _ZMQError as exc:
                raise self._socket_error(ch, exc) from None
            else:
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
        tries = len(self.endpoints)
        try:
            while True:
                try:
                    ch.send(body, _NOBLOCK)
                    break
                except _Again:
                    pass
                try:
                    self._wait_connected(ch, deadline)
                except ConnectionError as error:  # with several endpoints: the next, at once
                    tries -= 1
                    if error.reason != "no_server" or tries <= 0 or _monotonic() >= deadline:
                        raise
                    continue
                try:
                    ch.send(body, _NOBLOCK)
                    break
                except _Again:
                    raise self._timed_out(ch, msg, timeout, sent=False) from None
            if not ch.poll(_ms(deadline - _monotonic())):
                raise self._timed_out(ch, msg, timeout, sent=True)
            return ch.recv(_NOBLOCK)
        except _ZMQError as exc:
            raise self._socket_error(ch, exc) from None

    def _direct_exchange(self, ch: _Channel, direct: ZmtpConnection, msg: dict[str, Any],
                         body: bytes, wait: float) -> bytes:
        """Send and receive on ``ch``'s direct connection within ``wait`` seconds,
        connecting first if it is not connected (or the server closed it)."""
        deadline = _monotonic() + wait
        if direct.connected:
            try:
                direct.idle_check()
            except PeerClosed:
                logger.debug("%s closed the connection: reconnecting", ch.endpoint)
                direct.close()
        for attempt in (1, 2):
            if not direct.connected:
                direct = self._direct_connect(ch, deadline)
            try:
                direct.send(body)
                break
            except (PeerClosed, OSError) as exc:
                # The connection died before the request was taken whole, so the
                # server never ran it: a fresh connection may carry it.
                direct.close()
                if self._closed:
                    raise closed_error() from None
                if attempt == 2:
                    raise ConnectionError(f"could not send {msg['op']!r} to {ch.endpoint}: "
                                          f"{exc}", reason="no_server") from None
        try:
            data = direct.recv(deadline)
        except (PeerClosed, OSError) as exc:
            direct.close()
            if self._closed:
                raise closed_error() from None
            raise ConnectionError(f"{ch.endpoint} closed the connection before replying to "
                                  f"{msg['op']!r} ({exc}): the request may have run",
                                  reason="timeout") from None
        if data is None:
            raise self._timed_out(ch, msg, wait, sent=True)
        return data

    def _direct_connect(self, ch: _Channel, deadline: float) -> ZmtpConnection:
        """Connect ``ch``'s direct connection, as :meth:`_wait_connected` waits for a
        libzmq one: ``no_server`` after :attr:`connect_timeout` (then, with several
        endpoints, the next one at once), ``unauthorized`` for a refused handshake."""
        count = len(self.endpoints)
        started, limit = self._connect_window(ch, deadline)
        failed = 0  # endpoints refused in a row
        silent_once = False
        while True:
            if self._closed:
                raise closed_error()
            direct = ch.direct
            assert direct is not None
            try:
                direct.connect(limit - _monotonic())
                logger.debug("connected directly to %s", ch.endpoint)
                return direct
            except (HandshakeError, OSError) as exc:
                if self._closed:
                    raise closed_error() from None
                verdict = after_failed_connect(exc, silent_once, count)
                if verdict == "refused":
                    raise refused(ch.endpoint, exc, self.keys is not None) from None
                if verdict == "again":
                    silent_once = True
                    continue
                reason = str(exc)
            logger.debug("no connection to %s: %s", ch.endpoint, reason)
            failed += 1
            silent_once = False
            if _monotonic() >= limit:
                raise no_server(ch.endpoint, round(_monotonic() - started, 1))
            if count > 1:
                # Another server may take it now: the next endpoint at once.
                self._replace(ch, why="no connection")
            if failed % count == 0:  # every one refused
                if self._resolve_again(ch):  # the names' addresses changed: try them now
                    count = len(self.endpoints)
                    continue
                time.sleep(min(RECONNECT_INTERVAL, max(0.0, limit - _monotonic())))

    def _resolve_again(self, ch: _Channel) -> bool:
        """Look the given endpoints' names up again (a rolling update gave the servers
        new addresses); if the endpoints changed, move ``ch`` to one of the new ones."""
        fresh = spread_endpoints(self.given_endpoints)
        with self._lock:
            if fresh == self.endpoints:
                return False
            self.endpoints = fresh
            self._index = random.randrange(len(fresh)) if self._spread else 0
        logger.warning("no server answered: the endpoints are now %s", ", ".join(fresh))
        self._replace(ch, why="new addresses")
        return True

    def _connect_window(self, ch: _Channel, deadline: float) -> tuple[float, float]:
        """``(now, until when)`` a connection may be waited for: :attr:`connect_timeout`,
        at most to ``deadline``; ``no_server`` at once for a host name that does not
        resolve (looked up once per socket)."""
        started = _monotonic()
        if not ch.resolved:
            error = unresolved(ch.endpoint)
            if error is not None:
                self._replace(ch)
                raise error
            ch.resolved = True
        return started, min(deadline, started + self.connect_timeout)

    def _next_reply(self, ch: _Channel, deadline: float) -> bytes | None:
        """The next reply on ``ch`` by ``deadline``, or None."""
        direct = ch.direct
        if direct is not None:
            try:
                return direct.recv(deadline)
            except (PeerClosed, OSError):
                direct.close()
                return None
        if not ch.poll(_ms(deadline - _monotonic())):
            return None
        return ch.recv(_NOBLOCK)

    def _wait_connected(self, ch: _Channel, deadline: float) -> None:
        """Wait until ``ch`` can send: raise ``unauthorized`` as soon as a handshake is
        refused, ``no_server`` when no connection comes within :attr:`connect_timeout`
        (or by ``deadline``), or at once for a host name that does not resolve."""
        started, limit = self._connect_window(ch, deadline)
        poller = zmq.Poller()
        poller.register(ch.sock, _POLLOUT)
        poller.register(ch.monitor, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(_ms(limit - _monotonic())))
            if not ready:
                error = no_server(ch.endpoint, round(_monotonic() - started, 1))
                logger.debug("%s; replacing the socket", error)
                self._replace(ch)
                raise error
            if ch.monitor in ready:
                refused = Handshakes(ch.endpoint, self.keys is not None).read(ch.monitor)
                if refused is not None:
                    raise refused
            if ch.sock in ready:
                return

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
                next_data = self._next_reply(ch, deadline)
            except _ZMQError as exc:
                raise self._socket_error(ch, exc) from None
            if next_data is None:
                raise self._timed_out(ch, msg, wait, sent=True)
            data = next_data

    def _timed_out(self, ch: _Channel, msg: Mapping[str, Any], wait: float,
                   *, sent: bool) -> ConnectionError:
        error = timed_out(ch.endpoint, msg.get("op"), wait, sent)
        logger.debug("%s; replacing the socket", error)
        self._replace(ch)
        return error

    def _socket_error(self, ch: _Channel, exc: zmq.ZMQError) -> ConnectionError:
        if self._closed:
            return closed_error()
        return ConnectionError(f"socket error on {ch.endpoint}: {exc}", reason="error")

    def transaction(self, *, timeout: float | None = None,
                    readonly: bool | Literal["replica"] = False) -> Transaction:
        """A transaction, which begins with its first request: that request carries
        the begin, one round trip for both (:meth:`Transaction.begin` begins it
        at once instead).  Its :attr:`~Transaction.lease` is None until then.

        As a context manager the transaction commits when the block ends
        normally and rolls back when it raises (the exception propagates).
        While it is open the client sends heartbeats for it.
        """
        return Transaction(self, timeout, readonly).deferred()

    def _endpoint(self) -> str:
        return self._ch.endpoint

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
        sub = Subscription(self._context, self.events_endpoint(), names, self.keys)
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
            _close(sock)
        for sub in list(self._subscriptions):
            sub.close()


    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Heartbeat:
    """The heartbeat thread of one client.

    :meth:`add` and :meth:`remove` count what needs heartbeats (see
    :class:`~dbpool.client._base.Keepalive`); the thread, started at the
    first :meth:`add`, sends ``heartbeat`` for the session every third of
    the heartbeat timeout while anything is held and waits on an event
    otherwise, so :meth:`stop` ends it at once.  The heartbeats are not
    awaited: their replies are read and dropped before the next one goes
    out.  The thread's socket is connected as soon as something is held, so
    the first heartbeat finds a connection; one that cannot be sent (no
    connection, as after a move to another endpoint) is tried again a tenth
    of an interval later.
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
                client = self._client()
                if client is None or client.closed:
                    return
                current = client._current_endpoint()
                if sock is None or current != endpoint:
                    # Connected as soon as something is held, not when the first
                    # heartbeat is due: the socket is IMMEDIATE, so a send on a
                    # connection still being made would be refused.
                    if sock is not None:
                        sock.close(linger=0)
                    sock, _ = client._new_socket(current, register=False)
                    endpoint = current
                del client
                delay = max(last, since) + interval - _monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                self._drain(sock)
                ids += 1
                body = packb({"v": _VERSION, "id": ids, "op": "heartbeat",
                              "session": self._session})
                last = _monotonic()
                try:
                    sock.send(body, _NOBLOCK)
                except _Again:
                    # Tried again a tenth of an interval later rather than a whole
                    # one, which would leave the server a third of its timeout.
                    logger.debug("heartbeat not sent yet: not connected to %s", endpoint)
                    last -= interval * (1 - _HEARTBEAT_RETRY)
                else:
                    self.sent += 1
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
