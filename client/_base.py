"""What the sync and async clients share: requests, replies, results and endpoints.

Nothing here does I/O.  The functions are the pieces of ``docs/protocol.md``
that do not depend on how a socket is driven: building a request map, turning
a reply into a value or an exception, a result map into a
:class:`~dbpool.driver.Result`, and endpoints into the ones to connect to.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, TypeAlias

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from dbpool import curve
from dbpool.driver import Column, Result
from dbpool.errors import ConnectionError, ProtocolError
from dbpool.keys import HANDSHAKE_EVENTS, MECHANISM_MISMATCH, ClientKeys, handshake_failure
from dbpool.protocol import VERSION, error_from_map
from dbpool.zmtp import Handshake, HandshakeError, NullHandshake

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_ENDPOINT",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAX_ROWS",
    "DEFAULT_PAGE_BYTES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOPICS",
    "VERSION",
    "Handshakes",
    "Keepalive",
    "Params",
    "Statement",
    "batch_fields",
    "check_timeout",
    "closed_error",
    "configure_socket",
    "copy_page",
    "copy_started",
    "direct_address",
    "direct_handshake",
    "error_from_reply",
    "events_endpoint",
    "handshake_monitor",
    "lease_map",
    "malformed_reply",
    "new_session",
    "no_server",
    "normalize_endpoints",
    "normalize_topics",
    "page_map",
    "reply_value",
    "request",
    "spread_endpoints",
    "timed_out",
    "to_result",
    "to_results",
    "unresolved",
]

logger = logging.getLogger("dbpool.client")

#: The server's default request endpoint (``dbpool serve``).
DEFAULT_ENDPOINT = "tcp://127.0.0.1:7432"
#: Seconds a client waits for a reply unless told otherwise.
DEFAULT_TIMEOUT = 15.0
#: Seconds a request waits for a connection to a server before ``no_server``.
DEFAULT_CONNECT_TIMEOUT = 2.0
#: The server's default ``heartbeat_timeout``: used for streams outside a
#: transaction until a ``begin`` reply has said what the server's is.
DEFAULT_HEARTBEAT_TIMEOUT = 10.0
#: Rows per stream page unless told otherwise (the server's default too).
DEFAULT_MAX_ROWS = 500
#: Bytes per copy_to page unless told otherwise (the server's default too).
DEFAULT_PAGE_BYTES = 1 << 20
#: The event topics a subscription gets unless told otherwise: all of them.
DEFAULT_TOPICS: tuple[str, ...] = ("connection", "pool", "telemetry")

#: Query parameters: a sequence for ``%s``, a mapping for ``%(name)s``, or None.
Params: TypeAlias = Sequence[Any] | Mapping[str, Any] | None
#: One statement of a batch: ``(sql, params)``.
Statement: TypeAlias = tuple[str, Params]

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", "::", "[::]", ""})


def new_session() -> str:
    """A new session id: 128 random bits as 32 hex digits, as the protocol asks."""
    return secrets.token_hex(16)


def normalize_endpoints(endpoint: str | Sequence[str]) -> tuple[str, ...]:
    """The endpoints as a tuple; raise ValueError for none or one without ``://``."""
    endpoints = (endpoint,) if isinstance(endpoint, str) else tuple(endpoint)
    if not endpoints:
        raise ValueError("a client needs at least one endpoint")
    for item in endpoints:
        if not isinstance(item, str) or "://" not in item:
            raise ValueError(f"not a ZeroMQ endpoint (transport://address): {item!r}")
    return endpoints


def check_timeout(timeout: float) -> float:
    """``timeout`` as a float; raise ValueError unless it is positive and finite."""
    value = float(timeout)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return value


def normalize_topics(topics: str | Iterable[str]) -> tuple[str, ...]:
    """The topic prefixes to subscribe to; ``""`` subscribes to every topic."""
    result = (topics,) if isinstance(topics, str) else tuple(topics)
    if not result:
        raise ValueError('no topics to subscribe to (use "" for all of them)')
    for topic in result:
        if not isinstance(topic, str):
            raise TypeError(f"a topic is a str, not {type(topic).__name__}")
    return result


def configure_socket(sock: zmq.Socket[Any], timeout: float, keys: ClientKeys | None) -> None:
    """Set the options every request socket has (see the package docstring), and
    ``keys`` for a server that uses CURVE.

    ``IMMEDIATE`` queues messages only on completed connections, so a send
    to a server that is down waits (up to ``SNDTIMEO``) instead of queueing
    a request that would run much later; ``LINGER=0`` lets a closed socket
    drop what it still holds; the reconnect interval starts at 100 ms and
    backs off to 1 s, so a restarted server is found again within a second.
    """
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.setsockopt(zmq.SNDTIMEO, max(1, round(timeout * 1000)))
    if keys is not None:
        keys.apply(sock)


#: How much a failed handshake's event says (see Handshakes).
_TELLING: dict[int, int] = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: 3,
                            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: 2}
#: What a request socket's monitor reports: how each handshake ended.
_HANDSHAKE_EVENTS = HANDSHAKE_EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED


def handshake_monitor(sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
    """A monitor of how ``sock``'s handshakes end (call before it connects)."""
    return sock.get_monitor_socket(_HANDSHAKE_EVENTS, f"inproc://dbpool-handshakes-{new_session()}")


class Handshakes:
    """What a request socket's monitor has said of its handshakes: :attr:`refused`
    is the error of a refused one, unless a later one succeeded (see
    :func:`dbpool.keys.handshake_failure`).

    Of several failures the most telling is kept: a refused key, then a
    mechanism mismatch, then a handshake that failed without saying why
    (what a retry after a refusal may report).
    """

    __slots__ = ("endpoint", "keyed", "rank", "refused")

    def __init__(self, endpoint: str, keyed: bool) -> None:
        self.endpoint = endpoint
        self.keyed = keyed
        self.refused: ConnectionError | None = None
        self.rank = 0

    def feed(self, frames: list[bytes]) -> ConnectionError | None:
        """Take one monitor message; return :attr:`refused` after it."""
        event = parse_monitor_message(frames)
        error = handshake_failure(event["event"], event["value"], self.endpoint, self.keyed)
        if error is None:
            self.refused, self.rank = None, 0
        elif (telling := _TELLING.get(event["event"], 1)) >= self.rank:
            self.refused, self.rank = error, telling
        return self.refused

    def read(self, monitor: zmq.Socket[Any]) -> ConnectionError | None:
        """Take every message waiting on a (blocking) ``monitor``; return :attr:`refused`."""
        while True:
            try:
                self.feed(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return self.refused


def unresolved(endpoint: str) -> ConnectionError | None:
    """The error for an endpoint whose host name does not resolve, else None."""
    split = _split_tcp(endpoint)
    if split is None:
        return None
    _, host, port = split
    host = host.strip("[]")
    if host in _WILDCARD_HOSTS or host == "localhost" or _is_address(host):
        return None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return ConnectionError(f"{endpoint}: the host name {host!r} does not resolve "
                               f"({error.strerror})", reason="no_server")
    except (OSError, UnicodeError):
        return None  # let libzmq say what it makes of it
    return None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def timed_out(endpoint: str, op: object, wait: float, sent: bool) -> ConnectionError:
    """The error for a request with no reply within ``wait`` seconds: ``timeout`` if it
    was sent (a live server that did not answer), else ``no_server`` (no connection)."""
    if sent:
        return ConnectionError(f"no reply from {endpoint} to {op!r} within {wait:g} s",
                               reason="timeout")
    return ConnectionError(f"could not send {op!r} to {endpoint} within {wait:g} s: no "
                           "connection to a server", reason="no_server")


def no_server(endpoint: str, waited: float) -> ConnectionError:
    """The error for a request that found no server to connect to."""
    return ConnectionError(f"no server at {endpoint}: no connection within {waited:g} s "
                           "(nothing listening there, or unreachable)", reason="no_server")


def closed_error() -> ConnectionError:
    """The error a request on a closed client raises."""
    return ConnectionError("the dbpool client is closed", reason="error")


def malformed_reply(endpoint: str, op: str, detail: str) -> ProtocolError:
    """The error for a reply the client cannot read."""
    return ProtocolError(f"malformed reply from {endpoint} to {op!r}: {detail}", code="malformed")


def error_from_reply(reply: Mapping[str, Any]) -> Exception:
    """The exception for an error reply (``error_from_map``).

    A batch's error map carries ``index``, the statement that failed: it is
    set as the exception's ``index`` attribute and added as a note.  The error
    of a transaction's first request sent with its begin carries ``lease``,
    the transaction it began: set as ``lease`` (see ``AsyncTransaction._first``).
    """
    error = reply["error"]
    if not isinstance(error, Mapping):
        return ProtocolError(f"malformed error in reply: {error!r:.200}", code="malformed")
    exc = error_from_map(error)
    lease = error.get("lease")
    if lease is not None:  # a transaction's first request failed in it: it began
        exc.lease = lease  # type: ignore[attr-defined]
    index = error.get("index")
    if isinstance(index, int):
        try:
            exc.index = index  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - an exception class with slots
            pass
        exc.add_note(f"(statement {index} of the batch)")
    return exc


def reply_value(reply: Any, endpoint: str, op: str) -> Any:
    """The ``ok`` value of a reply map that answers the request; raise its error.

    This is the slow path: the request loops call it only for replies that
    are not a plain success.
    """
    if not isinstance(reply, Mapping):
        raise malformed_reply(endpoint, op, f"not a map: {reply!r:.200}")
    if "error" in reply:
        raise error_from_reply(reply)
    if "ok" in reply:
        return reply["ok"]
    raise malformed_reply(endpoint, op, "neither 'ok' nor 'error'")


def _columns(raw: Sequence[Sequence[Any]]) -> list[Column]:
    return [Column(name, oid) for name, oid in raw]


def to_result(value: Any) -> Result:
    """A :class:`~dbpool.driver.Result` from a result map.

    Rows become tuples; columns become :class:`~dbpool.driver.Column` objects
    when first read (most callers never read them).  Raises ProtocolError
    for a map without the four keys.
    """
    try:
        return Result(partial(_columns, value["columns"]), [tuple(row) for row in value["rows"]],
                      value["rowcount"], value["command"])
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed result in reply: {exc!r}", code="malformed") from None


def to_results(value: Any) -> list[Result]:
    """The results of a batch reply (``{"results": [result, ...]}``)."""
    try:
        results = value["results"]
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed batch reply: {exc!r}", code="malformed") from None
    return [to_result(item) for item in results]


def batch_fields(
    sql_or_statements: str | Iterable[Statement | str],
    params_seq: Iterable[Params] | None,
) -> dict[str, Any]:
    """The request keys of a batch.

    ``batch(sql, params_seq)`` runs one statement once per parameter set
    (``sql`` and ``params_seq``); ``batch([(sql, params), ...])`` runs the
    statements given (``statements``; a bare string is a statement without
    parameters).  Raises TypeError for a mix of the two forms.
    """
    if isinstance(sql_or_statements, str):
        if params_seq is None:
            raise TypeError("batch(sql, params_seq) needs params_seq")
        return {"op": "batch", "sql": sql_or_statements, "params_seq": list(params_seq)}
    if params_seq is not None:
        raise TypeError("batch(statements) takes no params_seq: each statement has its own")
    statements: list[list[Any]] = []
    for item in sql_or_statements:
        if isinstance(item, str):
            statements.append([item, None])
        else:
            sql, params = item
            statements.append([sql, params])
    return {"op": "batch", "statements": statements}


def _split_tcp(endpoint: str) -> tuple[str, str, str] | None:
    """``(scheme, host, port)`` of a tcp-like endpoint, else None."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ws", "wss"):
        return None
    host, colon, port = rest.rpartition(":")
    if not colon:
        return None
    return scheme, host.rpartition(";")[2], port  # tcp://source;host:port


Resolver = Any  # socket.getaddrinfo's signature


def spread_endpoints(endpoints: Sequence[str],
                     resolve: Resolver | None = None) -> tuple[str, ...]:
    """The endpoints a client spreads over: each ``tcp://name:port`` whose name
    resolves to several addresses of one family (a Kubernetes headless Service, a
    DNS round robin) becomes one endpoint per address; anything else stays as it is.

    A name that does not resolve stays too: the client says so when it connects.
    ``localhost`` stays a name (it resolves to 127.0.0.1 and ::1 alike).
    """
    lookup: Resolver = socket.getaddrinfo if resolve is None else resolve
    spread: list[str] = []
    for endpoint in endpoints:
        split = _split_tcp(endpoint)
        host = split[1] if split is not None else ""
        if (split is None or split[0] != "tcp" or ";" in endpoint or host in ("", "*")
                or host == "localhost" or host.startswith("[") or _is_address(host)):
            spread.append(endpoint)
            continue
        try:
            infos = lookup(host, int(split[2]), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            spread.append(endpoint)
            continue
        by_family: dict[int, list[str]] = {}
        for family, _, _, _, address in infos:
            found = by_family.setdefault(family, [])
            if address[0] not in found:
                found.append(address[0])
        addresses = max(by_family.values(), key=len, default=[])
        if len(addresses) < 2:
            spread.append(endpoint)
            continue
        for address in addresses:
            shown = f"[{address}]" if ":" in address else address
            spread.append(f"tcp://{shown}:{split[2]}")
    return tuple(dict.fromkeys(spread))


#: Seconds between connection attempts of a direct connection (libzmq's
#: ``RECONNECT_IVL`` as the client sets it).
RECONNECT_INTERVAL = 0.1


def after_failed_connect(error: BaseException, silent_once: bool,
                         endpoints: int) -> Literal["again", "refused", "retry"]:
    """What a direct connection does after a failed attempt (``error``, an ``OSError``
    or a :class:`~dbpool.zmtp.HandshakeError`): ``"again"`` at once, ``"refused"``
    (the server will not have us: ``unauthorized``), or ``"retry"`` (after
    :data:`RECONNECT_INTERVAL`, or on another endpoint).

    A peer that closed without a word (``silent``) may be refusing our mechanism
    or going away: once more tells, as a server gone refuses the connection
    outright.  With other endpoints to try, a silent one is passed over.
    """
    if isinstance(error, HandshakeError):
        if error.silent and not silent_once:
            return "again"
        if not (error.silent and endpoints > 1):
            return "refused"
        return "retry"
    if silent_once and endpoints == 1 and not isinstance(error, ConnectionRefusedError):
        return "refused"  # silent, then cut off: a server that will not have us
    return "retry"


def refused(endpoint: str, error: BaseException, keyed: bool) -> ConnectionError:
    """``unauthorized``: the server at ``endpoint`` refused a direct connection's
    handshake with ``error``, as libzmq's monitor would tell it: a ZAP status
    (our key is not authorized), another security mechanism, or a failed
    handshake (``keyed``: the client has CURVE keys)."""
    status = error.status if isinstance(error, HandshakeError) else None
    if status is not None and status.isdigit():
        event, value = zmq.EVENT_HANDSHAKE_FAILED_AUTH, int(status)
    elif isinstance(error, HandshakeError) and error.mismatch:
        event, value = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, MECHANISM_MISMATCH
    else:
        event, value = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, 0
    failure = handshake_failure(event, value, endpoint, keyed=keyed)
    assert failure is not None
    return failure


def direct_handshake(keys: ClientKeys | None) -> Callable[[], Handshake] | None:
    """What makes a direct connection's handshake: ``NULL`` without ``keys``, CURVE
    with them, or None when only libzmq can (keys, and no PyNaCl: see the ``curve``
    extra)."""
    if keys is None:
        return NullHandshake
    if not curve.AVAILABLE:
        return None
    server, public, secret = (z85.decode(keys.server), z85.decode(keys.client.public),
                              z85.decode(keys.client.secret))
    return partial(curve.CurveClient, server, public, secret)


def direct_address(endpoint: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp://host:port`` endpoint the sync client can speak ZMTP
    to itself (:mod:`dbpool.client.direct`), else None: another transport, a source
    address (libzmq's ``source;host``), a wildcard host, no port."""
    split = _split_tcp(endpoint)
    if split is None or split[0] != "tcp" or ";" in endpoint:
        return None
    _, host, port = split
    if not port.isdigit() or host in ("", "*"):
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


def events_endpoint(events: str, request_endpoint: str) -> str:
    """The events endpoint to connect to, given the one the server reported.

    A server bound to all interfaces reports a wildcard host (``0.0.0.0``,
    ``*`` or ``::``); that host is replaced by the host of the request
    endpoint the client reached it through.
    """
    parts = _split_tcp(events)
    if parts is None or parts[1] not in _WILDCARD_HOSTS:
        return events
    scheme, _, port = parts
    request = _split_tcp(request_endpoint)
    host = request[1] if request is not None and request[1] not in _WILDCARD_HOSTS \
        else "127.0.0.1"
    return f"{scheme}://{host}:{port}"


def request(op: str, **fields: Any) -> dict[str, Any]:
    """A request map without its id (the client adds it when it sends)."""
    return {"v": VERSION, "op": op, **fields}


def lease_map(value: Any, endpoint: str) -> tuple[str, float, float | None]:
    """``(lease, heartbeat_timeout, expires_in)`` of a ``begin`` reply."""
    try:
        lease = value["lease"]
        heartbeat = float(value.get("heartbeat_timeout") or DEFAULT_HEARTBEAT_TIMEOUT)
        expires = value.get("expires_in")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise malformed_reply(endpoint, "begin", repr(exc)) from None
    if not isinstance(lease, str) or not heartbeat > 0:
        raise malformed_reply(endpoint, "begin", f"bad lease map {value!r:.200}")
    return lease, heartbeat, float(expires) if isinstance(expires, int | float) else None


def page_map(value: Any, endpoint: str, op: str) -> tuple[str, Any, bool]:
    """``(stream, result map, done)`` of a ``stream`` or ``fetch`` reply."""
    try:
        return str(value["stream"]), value["result"], bool(value["done"])
    except (KeyError, TypeError) as exc:
        raise malformed_reply(endpoint, op, repr(exc)) from None


def copy_started(value: Any, endpoint: str, block_bytes: int) -> tuple[str, int]:
    """The copy id of a ``copy_in`` reply, and the block size to send: ``block_bytes``,
    or less if the server takes no block that large."""
    try:
        copy = str(value["copy"])
        largest = value.get("block_bytes")
    except (KeyError, TypeError, AttributeError) as exc:
        raise malformed_reply(endpoint, "copy_in", repr(exc)) from None
    if isinstance(largest, int) and largest > 0:
        block_bytes = min(block_bytes, largest)
    return copy, block_bytes


def copy_page(value: Any, endpoint: str, op: str) -> tuple[str, bytes, bool, Result | None]:
    """``(copy, data, done, result)`` of a ``copy_out`` or ``copy_read`` reply; the
    result (``COPY n``) comes with the last page."""
    try:
        copy, data, done = str(value["copy"]), value["data"], bool(value["done"])
        result = value.get("result")
    except (KeyError, TypeError, AttributeError) as exc:
        raise malformed_reply(endpoint, op, repr(exc)) from None
    if not isinstance(data, bytes):
        raise malformed_reply(endpoint, op, f"copy data is {type(data).__name__}, not bytes")
    return copy, data, done, to_result(result) if result is not None else None


class Keepalive:
    """The heartbeat bookkeeping of one client (no I/O, no locking).

    Every open transaction and stream holds one entry, keyed by its
    heartbeat timeout: the ``begin`` reply's for a transaction, the last
    one a server reported (else :data:`DEFAULT_HEARTBEAT_TIMEOUT`) for a
    stream.  While any entry is held the client sends a heartbeat every
    third of the smallest timeout held.
    """

    __slots__ = ("_counts", "known_timeout")

    def __init__(self) -> None:
        self._counts: dict[float, int] = {}
        #: The heartbeat timeout the server last reported.
        self.known_timeout = DEFAULT_HEARTBEAT_TIMEOUT

    def add(self, heartbeat_timeout: float | None) -> float:
        """Hold an entry; return its key, for :meth:`remove`."""
        if heartbeat_timeout is not None:
            self.known_timeout = heartbeat_timeout
            key = heartbeat_timeout
        else:
            key = self.known_timeout
        self._counts[key] = self._counts.get(key, 0) + 1
        return key

    def remove(self, key: float) -> None:
        """Release an entry that :meth:`add` returned."""
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def __bool__(self) -> bool:
        return bool(self._counts)

    def interval(self) -> float | None:
        """Seconds between heartbeats, or None while nothing is held."""
        return min(self._counts) / 3 if self._counts else None
