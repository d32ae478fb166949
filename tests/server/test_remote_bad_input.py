"""``dbpool serve`` against bad input: hand-made frames on raw ZeroMQ sockets.

The server runs in a child process (:class:`~tests.support.remote.ServerProcess`)
and the tests talk to it with raw ``DEALER`` (and ``REQ``) sockets, sending
frames built by hand: not msgpack, not a map, bad ids, versions, operations
and fields, too many frames, too many bytes, other sessions' leases, ended
leases, failing SQL, clients that vanish and clients that flood.  Each test
checks the exact error reply that ``docs/protocol.md`` promises and then
that the server is still alive and serving and that nothing leaked: no
connection held by the front end, no lease or stream open, every connection
back in the pool (:func:`assert_healthy`).

Most tests share one server (``--max-message-size 4096``, pool of 4); the
tests that need other flags, or that would leave the shared server dirty
(a dead pool, a crash), start their own.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import msgpack
import pytest
import zmq

from dbpool import wire
from tests.support.compiled import replaces_methods
from tests.support.pgcluster import PgCluster
from tests.support.remote import ServerProcess

MAX_MESSAGE_SIZE = 4096
POOL_SIZE = 4
#: Generous deadlines: they bound a wait, they never pace one.
REPLY_TIMEOUT = 10.0
IDLE_TIMEOUT = 10.0
PROTOCOL_KEYS = {"kind", "code", "message"}


# -- sockets -------------------------------------------------------------------------


class Client:
    """One raw ZeroMQ socket to the server, with request-id bookkeeping.

    Replies to other ids read while waiting for one are kept in ``stash``,
    so that a test can tell whether a reply ever arrived.
    """

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, kind: int = zmq.DEALER) -> None:
        self.kind = kind
        self.sock: zmq.Socket[Any] = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT * 1000))
        self.sock.connect(endpoint)
        self.next_id = 1
        self.sent = 0  # requests this client sent (the server counts them all)
        self.stash: dict[Any, list[dict[str, Any]]] = {}

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # raw frames

    def send_frames(self, *frames: bytes) -> None:
        self.sent += 1
        self.sock.send_multipart(list(frames))

    def recv_frames(self, timeout: float = REPLY_TIMEOUT) -> list[bytes]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout}s")
        return self.sock.recv_multipart()

    def recv_reply(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """The next reply, which must be exactly one frame holding a map."""
        frames = self.recv_frames(timeout)
        assert len(frames) == 1, f"a reply is one frame (after the REQ delimiter): {frames!r}"
        reply = wire.unpackb(frames[0])
        assert type(reply) is dict, reply
        return reply

    def raw(self, *frames: bytes) -> dict[str, Any]:
        """Send frames; the next reply (for inputs whose reply has no id of ours)."""
        self.send_frames(*frames)
        return self.recv_reply()

    # requests

    def send(self, rid: Any = None, **fields: Any) -> Any:
        """Send ``{"v": 1, "id": rid, **fields}`` (``v`` and ``id`` overridable)."""
        if rid is None:
            rid, self.next_id = self.next_id, self.next_id + 1
        body = {"v": 1, "id": rid, **fields}
        self.send_frames(wire.packb(body))
        return rid

    def reply(self, rid: Any, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """The reply to request ``rid``; others read meanwhile go to ``stash``."""
        deadline = time.monotonic() + timeout
        while not self.stash.get(rid):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply to request {rid!r} within {timeout}s; "
                                     f"others: {self.stash!r:.500}")
            reply = self.recv_reply(left)
            self.stash.setdefault(reply.get("id"), []).append(reply)
        return self.stash[rid].pop(0)

    def call(self, **fields: Any) -> dict[str, Any]:
        return self.reply(self.send(**fields))

    def ok(self, **fields: Any) -> Any:
        reply = self.call(**fields)
        assert "ok" in reply, reply
        return reply["ok"]


def expect_protocol(reply: dict[str, Any], rid: int | None, code: str) -> str:
    """Assert ``reply`` is exactly ``{"id": rid, "error": {protocol, code, message}}``."""
    assert set(reply) == {"id", "error"}, reply
    if rid is None:
        assert reply["id"] is None, reply
    else:
        assert type(reply["id"]) is int and reply["id"] == rid, reply
    error = reply["error"]
    assert set(error) == PROTOCOL_KEYS, reply
    assert error["kind"] == "protocol", reply
    assert error["code"] == code, reply
    message = error["message"]
    assert type(message) is str and message, reply
    return message


def expect_bad_request(reply: dict[str, Any], rid: int, field: str) -> str:
    message = expect_protocol(reply, rid, "bad_request")
    assert f"'{field}'" in message, f"the message does not name {field!r}: {message!r}"
    return message


def expect_sql(reply: dict[str, Any], rid: int, cls: str, sqlstate: str | None) -> dict[str, Any]:
    assert set(reply) == {"id", "error"}, reply
    assert reply["id"] == rid, reply
    error = reply["error"]
    assert error["kind"] == "sql", reply
    assert error["class"] == cls, reply
    assert error["sqlstate"] == sqlstate, reply
    return error


# -- health --------------------------------------------------------------------------


def wait_idle(client: Client, pool_size: int = POOL_SIZE,
              timeout: float = IDLE_TIMEOUT) -> dict[str, Any]:
    """Poll ``status`` until nothing is held, open or queued and the pool is full."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.ok(op="status")
        server, pool = status["server"], status["pool"]
        idle = (server["connections_held"] == 0 and server["open_leases"] == 0
                and server["open_streams"] == 0 and server["queued"] == 0
                and pool["ready_conn_count"] == pool_size
                and pool["checkout_queue_length"] == 0)
        if idle:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not become idle within {timeout}s: "
                                 f"server={server!r} ready={pool['ready_conn_count']}")
        time.sleep(0.01)  # a polling interval, bounded by the deadline above


def assert_healthy(server: ServerProcess, ctx: zmq.Context[Any]) -> dict[str, Any]:
    """The server process lives, a fresh client's query works, and nothing leaked."""
    assert server.process.poll() is None, f"the server exited:\n{server.output()}"
    with Client(ctx, server.endpoint) as probe:
        result = probe.ok(op="query", sql="SELECT %s::int + 1 AS answer", params=[41])
        assert result["rows"] == [[42]], result
        assert result["columns"][0][0] == "answer", result
        status = wait_idle(probe, server.pool_size)
    assert status["version"] == 1
    assert status["health"] == "closed"
    return status


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[ServerProcess]:
    with ServerProcess(pg_dsn, "--max-message-size", str(MAX_MESSAGE_SIZE),
                       pool_size=POOL_SIZE) as srv:
        yield srv


@pytest.fixture
def client(ctx: zmq.Context[Any], server: ServerProcess) -> Iterator[Client]:
    with Client(ctx, server.endpoint) as c:
        yield c


# -- not a request -------------------------------------------------------------------


_MSGPACK_ERRORS = {
    "reserved_byte_c1": b"\xc1",
    "truncated_map": wire.packb({"v": 1, "id": 7, "op": "ping"})[:-3],
    "random_bytes": random.Random(20240611).randbytes(64),
    "trailing_bytes": wire.packb({"v": 1, "id": 7, "op": "ping"}) + b"\x00",
    "map32_claims_4g_entries": b"\xdf\xff\xff\xff\xff",
    "str32_claims_4g_bytes": b"\xdb\xff\xff\xff\xff",
    "nested_3000_deep": b"\x91" * 3000 + b"\xc0",
    "empty_frame": b"",
}


@pytest.mark.parametrize("body", list(_MSGPACK_ERRORS.values()), ids=list(_MSGPACK_ERRORS))
def test_bytes_that_are_not_msgpack_are_malformed(
        server: ServerProcess, ctx: zmq.Context[Any], client: Client, body: bytes) -> None:
    # An empty frame is the same case: zero bytes are not a msgpack value.
    message = expect_protocol(client.raw(body), None, "malformed")
    assert message.startswith("malformed msgpack: "), message
    assert_healthy(server, ctx)


_BAD_EXT = {
    "unknown_ext_type": (msgpack.ExtType(99, b"x"), "unknown msgpack ext type 99"),
    "bad_date_ext": (msgpack.ExtType(3, b"not-a-date"), "bad data for ext type 3 (date)"),
    "bad_bigint_ext": (msgpack.ExtType(1, b"12x"), "ext type 1 (int) is not decimal text"),
    "bad_uuid_ext": (msgpack.ExtType(7, b"short"), "bad data for ext type 7 (UUID)"),
}


@pytest.mark.parametrize("value,expected", list(_BAD_EXT.values()), ids=list(_BAD_EXT))
def test_undecodable_ext_value_is_malformed(server: ServerProcess, ctx: zmq.Context[Any],
                                            client: Client, value: Any, expected: str) -> None:
    body = msgpack.packb({"v": 1, "id": 3, "op": "query", "sql": "SELECT %s",
                          "params": [value]}, use_bin_type=True)
    message = expect_protocol(client.raw(body), None, "malformed")
    assert expected in message, message
    assert_healthy(server, ctx)


@pytest.mark.parametrize("value,name", [([1, 2, 3], "list"), (5, "int"), ("ping", "str"),
                                        (None, "NoneType")],
                         ids=["array", "int", "str", "nil"])
def test_msgpack_that_is_not_a_map_is_malformed(server: ServerProcess, ctx: zmq.Context[Any],
                                                client: Client, value: Any, name: str) -> None:
    reply = client.raw(wire.packb(value))
    assert expect_protocol(reply, None, "malformed") == f"a request is a map, not {name}"
    assert_healthy(server, ctx)


# -- ids, versions, operations ----------------------------------------------------------


_BAD_IDS: dict[str, dict[str, Any]] = {
    "missing": {},
    "nil": {"id": None},
    "string": {"id": "7"},
    "float": {"id": 7.0},
    "negative": {"id": -1},
    "bool_true": {"id": True},
    "bool_false": {"id": False},
    "over_2_64_minus_1": {"id": 2**64},  # msgpack cannot: wire sends ext 1 (bigint)
    "huge": {"id": 10**30},
    "array": {"id": [1]},
}


@pytest.mark.parametrize("fields", list(_BAD_IDS.values()), ids=list(_BAD_IDS))
def test_bad_id_gets_nil_id(server: ServerProcess, ctx: zmq.Context[Any], client: Client,
                            fields: dict[str, Any]) -> None:
    reply = client.raw(wire.packb({"v": 1, "op": "ping", **fields}))
    assert expect_protocol(reply, None, "bad_request") == (
        "'id' must be an integer from 0 to 2**64-1")
    assert_healthy(server, ctx)


@pytest.mark.parametrize("rid", [0, 2**63, 2**64 - 1])
def test_ids_at_the_edges_are_echoed(client: Client, rid: int) -> None:
    reply = client.raw(wire.packb({"v": 1, "id": rid, "op": "ping"}))
    assert reply == {"id": rid, "ok": "pong"}
    assert type(reply["id"]) is int


@pytest.mark.parametrize("fields", [{}, {"v": 2}, {"v": 0}, {"v": "1"}, {"v": None},
                                    {"v": True}, {"v": 1.0}, {"v": [1]}],
                         ids=["missing", "2", "0", "string", "nil", "bool_true", "float_1",
                              "array"])
def test_unsupported_version(server: ServerProcess, ctx: zmq.Context[Any], client: Client,
                             fields: dict[str, Any]) -> None:
    # v is the int 1: msgpack true and 1.0 are other versions, though Python finds them
    # equal to 1.
    reply = client.raw(wire.packb({"id": 11, "op": "ping", **fields}))
    message = expect_protocol(reply, 11, "unsupported_version")
    assert f"protocol version {fields.get('v')!r} is not supported" in message, message
    assert "version 1" in message, message  # it names the versions the server speaks
    assert_healthy(server, ctx)


@pytest.mark.parametrize("op", ["drop_everything", "PING", "", 5, None, b"ping", ["ping"],
                                True],
                         ids=["unknown", "wrong_case", "empty", "int", "nil", "bin", "array",
                              "bool"])
def test_unknown_or_non_string_op(server: ServerProcess, ctx: zmq.Context[Any],
                                  client: Client, op: Any) -> None:
    reply = client.raw(wire.packb({"v": 1, "id": 21, "op": op}))
    message = expect_protocol(reply, 21, "unknown_op")
    assert message.startswith(f"unknown operation {op!r}; known: "), message
    assert "ping" in message and "query" in message, message
    assert_healthy(server, ctx)


def test_missing_op(server: ServerProcess, ctx: zmq.Context[Any], client: Client) -> None:
    reply = client.raw(wire.packb({"v": 1, "id": 22}))
    assert expect_protocol(reply, 22, "unknown_op").startswith("unknown operation None")
    assert_healthy(server, ctx)


# -- fields ----------------------------------------------------------------------------

# (field the message must name, request fields)
_BAD_FIELDS: dict[str, tuple[str, dict[str, Any]]] = {
    "sql_int": ("sql", {"op": "query", "sql": 5}),
    "sql_empty": ("sql", {"op": "query", "sql": ""}),
    "sql_missing": ("sql", {"op": "execute"}),
    "sql_bin": ("sql", {"op": "query", "sql": b"SELECT 1"}),
    "params_string": ("params", {"op": "query", "sql": "SELECT %s", "params": "1"}),
    "params_int": ("params", {"op": "execute", "sql": "SELECT %s", "params": 1}),
    "timeout_negative": ("timeout", {"op": "query", "sql": "SELECT 1", "timeout": -1}),
    "timeout_zero": ("timeout", {"op": "query", "sql": "SELECT 1", "timeout": 0}),
    "timeout_string": ("timeout", {"op": "ping", "timeout": "5"}),
    "timeout_bool": ("timeout", {"op": "ping", "timeout": True}),
    "timeout_nan": ("timeout", {"op": "ping", "timeout": float("nan")}),
    "session_missing_for_begin": ("session", {"op": "begin"}),
    "session_empty_for_begin": ("session", {"op": "begin", "session": ""}),
    "session_int_for_heartbeat": ("session", {"op": "heartbeat", "session": 1}),
    "session_missing_for_stream": ("session", {"op": "stream", "sql": "SELECT 1"}),
    "lease_int": ("lease", {"op": "query", "sql": "SELECT 1", "lease": 5, "session": "s"}),
    "lease_missing_for_commit": ("lease", {"op": "commit", "session": "s"}),
    "lease_bin_for_rollback": ("lease", {"op": "rollback", "lease": b"x", "session": "s"}),
    "stream_missing_for_fetch": ("stream", {"op": "fetch", "session": "s"}),
    "stream_int_for_close": ("stream", {"op": "close", "stream": 3, "session": "s"}),
    "statements_not_list": ("statements", {"op": "batch", "statements": "SELECT 1"}),
    "statements_empty": ("statements", {"op": "batch", "statements": []}),
    "statements_item_single": ("statements", {"op": "batch", "statements": [["SELECT 1"]]}),
    "statements_item_triple": ("statements", {"op": "batch",
                                              "statements": [["SELECT 1", None, 1]]}),
    "statements_item_string": ("statements", {"op": "batch", "statements": ["SELECT 1"]}),
    "statements_item_sql_int": ("statements", {"op": "batch", "statements": [[1, None]]}),
    "statements_item_params": ("params", {"op": "batch",
                                          "statements": [["SELECT 1", None],
                                                         ["SELECT %s", "x"]]}),
    "params_seq_empty": ("params_seq", {"op": "batch", "sql": "SELECT %s", "params_seq": []}),
    "params_seq_missing": ("params_seq", {"op": "batch", "sql": "SELECT 1"}),
    "params_seq_map": ("params_seq", {"op": "batch", "sql": "SELECT 1", "params_seq": {}}),
    "params_seq_item": ("params", {"op": "batch", "sql": "SELECT %s", "params_seq": [[1], 2]}),
    "batch_sql_missing": ("sql", {"op": "batch", "params_seq": [[1]]}),
    "max_rows_zero": ("max_rows", {"op": "stream", "sql": "SELECT 1", "session": "s",
                                   "max_rows": 0}),
    "max_rows_negative": ("max_rows", {"op": "stream", "sql": "SELECT 1", "session": "s",
                                       "max_rows": -5}),
    "max_rows_string": ("max_rows", {"op": "stream", "sql": "SELECT 1", "session": "s",
                                     "max_rows": "10"}),
    "max_rows_float": ("max_rows", {"op": "stream", "sql": "SELECT 1", "session": "s",
                                    "max_rows": 10.0}),
}


@pytest.mark.parametrize("field,fields", list(_BAD_FIELDS.values()), ids=list(_BAD_FIELDS))
def test_wrong_field_is_bad_request_naming_it(server: ServerProcess, ctx: zmq.Context[Any],
                                              client: Client, field: str,
                                              fields: dict[str, Any]) -> None:
    reply = client.reply(client.send(**fields))
    expect_bad_request(reply, client.next_id - 1, field)
    assert_healthy(server, ctx)


# -- frames and sizes -------------------------------------------------------------------


@pytest.mark.parametrize("frames,delimited", [
    ([wire.packb({"v": 1, "id": 1, "op": "ping"}), b"extra"], False),
    ([b"a", b"b", b"c"], False),
    ([b"", wire.packb({"v": 1, "id": 1, "op": "ping"}), b"extra"], True),
    ([b"", b"a", b"b", b"c"], True),
], ids=["body_and_extra", "three_frames", "delimiter_body_and_extra",
        "delimiter_and_three_frames"])
def test_multi_frame_request_is_bad_frames(server: ServerProcess, ctx: zmq.Context[Any],
                                           client: Client, frames: list[bytes],
                                           delimited: bool) -> None:
    """A leading empty frame is a delimiter (a REQ socket's): echoed, and not counted."""
    client.send_frames(*frames)
    reply_frames = client.recv_frames()
    assert len(reply_frames) == (2 if delimited else 1), reply_frames
    if delimited:
        assert reply_frames[0] == b"", reply_frames
    message = expect_protocol(wire.unpackb(reply_frames[-1]), None, "bad_frames")
    assert message == f"a request is one frame; got {len(frames) - delimited}"
    assert_healthy(server, ctx)


def test_dealer_may_send_the_req_delimiter(client: Client) -> None:
    """A DEALER that adds the empty delimiter itself gets it echoed, as a REQ would."""
    client.send_frames(b"", wire.packb({"v": 1, "id": 5, "op": "ping"}))
    frames = client.recv_frames()
    assert frames[0] == b"" and len(frames) == 2, frames
    assert wire.unpackb(frames[1]) == {"id": 5, "ok": "pong"}
    client.send_frames(b"", b"")  # a delimiter and an empty body: malformed, delimiter echoed
    frames = client.recv_frames()
    assert frames[0] == b"" and len(frames) == 2, frames
    expect_protocol(wire.unpackb(frames[1]), None, "malformed")


def _request_of_size(size: int, rid: int) -> bytes:
    """A valid query whose body is exactly ``size`` bytes."""
    def body(pad: int) -> bytes:
        return wire.packb({"v": 1, "id": rid, "op": "query", "sql": "SELECT length(%s)",
                           "params": ["x" * pad]})
    pad = size - len(body(0))
    while len(body(pad)) > size:  # the str header grows with the string
        pad -= 1
    data = body(pad)
    assert len(data) == size, (len(data), size)
    return data


def test_body_at_the_limit_is_served_and_one_over_is_too_large(
        server: ServerProcess, ctx: zmq.Context[Any], client: Client) -> None:
    at_limit = _request_of_size(MAX_MESSAGE_SIZE, 31)
    reply = client.raw(at_limit)
    assert reply["id"] == 31 and "ok" in reply, reply
    assert reply["ok"]["rows"][0][0] > MAX_MESSAGE_SIZE - 100

    over = _request_of_size(MAX_MESSAGE_SIZE + 1, 32)
    message = expect_protocol(client.raw(over), None, "too_large")
    assert message == (f"request of {MAX_MESSAGE_SIZE + 1} bytes is over the server's "
                       f"max_message_size of {MAX_MESSAGE_SIZE}")
    # Up to 4x the limit libzmq still delivers it, and it is answered without decoding
    # (these bytes are not msgpack at all).
    message = expect_protocol(client.raw(b"\xc1" * (4 * MAX_MESSAGE_SIZE)), None, "too_large")
    assert f"request of {4 * MAX_MESSAGE_SIZE} bytes" in message
    assert client.ok(op="ping") == "pong"  # the same connection keeps serving
    assert_healthy(server, ctx)


def test_frame_far_over_four_times_the_limit_drops_only_that_peer(
        server: ServerProcess, ctx: zmq.Context[Any], client: Client) -> None:
    """Observed (libzmq ZMQ_MAXMSGSIZE = 4 x max_message_size on the ROUTER): a frame of
    64 KiB is never answered; libzmq closes that peer's TCP connection, so what the peer
    sent right behind it on that connection is lost too; the DEALER reconnects by itself
    and its later requests are answered.  A client with a request in flight meanwhile gets
    its reply."""
    with Client(ctx, server.endpoint) as other:
        slow = other.send(op="query", sql="SELECT pg_sleep(0.2), 'other' AS who")
        assert other.ok(op="ping") == "pong"  # connected, and the slow query is in
        client.send_frames(b"\x00" * (16 * MAX_MESSAGE_SIZE))
        # Ping on the dropped peer's socket until its reconnection is served.
        deadline = time.monotonic() + REPLY_TIMEOUT
        pings: list[int] = []
        while True:
            assert time.monotonic() < deadline, "the dropped DEALER was never served again"
            pings.append(client.send(op="ping"))
            if client.sock.poll(100):  # bounds each attempt; the reply ends the loop
                break
        # Every reply is a pong to one of the pings: none answers the huge frame.  A last
        # ping, read up to its own reply, also collects late pongs to earlier pings.
        last = client.send(op="ping")
        seen = []
        while not seen or seen[-1] != last:
            reply = client.recv_reply()
            assert reply.get("ok") == "pong" and reply["id"] in (*pings, last), reply
            seen.append(reply["id"])
        assert len(seen) == len(set(seen)), seen
        reply = other.reply(slow)
        assert reply["ok"]["rows"][0][1] == "other", reply
    assert_healthy(server, ctx)


def wait_clients(client: Client, predicate: Any, timeout: float = 3.0) -> int:
    """Poll ``status`` until ``predicate(server.clients)``; return that count."""
    deadline = time.monotonic() + timeout
    while True:
        clients = client.ok(op="status")["server"]["clients"]
        if predicate(clients):
            return clients
        assert time.monotonic() < deadline, f"status says {clients} clients"
        time.sleep(0.01)  # a polling interval


def test_status_counts_clients_as_they_come_and_go(pg_dsn: str,
                                                   ctx: zmq.Context[Any]) -> None:
    """Its own server: nobody else's connections come and go meanwhile."""
    with ServerProcess(pg_dsn, "--max-message-size", str(MAX_MESSAGE_SIZE),
                       pool_size=2) as srv, Client(ctx, srv.endpoint) as client:
        assert client.ok(op="ping") == "pong"
        wait_clients(client, lambda n: n == 1)
        others = [Client(ctx, srv.endpoint) for _ in range(3)]
        try:
            for other in others:
                assert other.ok(op="ping") == "pong"
            wait_clients(client, lambda n: n == 4)
        finally:
            for other in others:
                other.close()
        wait_clients(client, lambda n: n == 1)
        # A peer libzmq drops for a frame over 4 x max_message_size is gone too.
        with Client(ctx, srv.endpoint) as dropped:
            assert dropped.ok(op="ping") == "pong"
            wait_clients(client, lambda n: n == 2)
            dropped.sock.setsockopt(zmq.RECONNECT_IVL, -1)  # stay gone once dropped
            dropped.send_frames(b"\x00" * (16 * MAX_MESSAGE_SIZE))
            wait_clients(client, lambda n: n == 1, timeout=10.0)


# -- REQ clients ------------------------------------------------------------------------


def test_req_socket_gets_normal_replies(server: ServerProcess, ctx: zmq.Context[Any]) -> None:
    with Client(ctx, server.endpoint, zmq.REQ) as req:
        assert req.raw(wire.packb({"v": 1, "id": 1, "op": "ping"})) == {"id": 1, "ok": "pong"}
        reply = req.raw(wire.packb({"v": 1, "id": 2, "op": "query",
                                    "sql": "SELECT %s::text AS t", "params": ["via REQ"]}))
        assert reply["id"] == 2 and reply["ok"]["rows"] == [["via REQ"]], reply
        # Error replies carry the delimiter too (a REQ socket drops a reply without one).
        expect_protocol(req.raw(b"\xc1"), None, "malformed")
        expect_protocol(req.raw(b"\x00" * (MAX_MESSAGE_SIZE + 1)), None, "too_large")
        expect_bad_request(req.raw(wire.packb({"v": 1, "id": 3, "op": "query"})), 3, "sql")
        assert req.raw(wire.packb({"v": 1, "id": 4, "op": "ping"})) == {"id": 4, "ok": "pong"}
    assert_healthy(server, ctx)


def test_req_socket_multi_frame_request_gets_bad_frames(server: ServerProcess,
                                                        ctx: zmq.Context[Any]) -> None:
    """The reply carries the REQ's delimiter, or libzmq's REQ socket would discard it and
    the client would wait forever."""
    with Client(ctx, server.endpoint, zmq.REQ) as req:
        req.send_frames(wire.packb({"v": 1, "id": 1, "op": "ping"}), b"extra")
        message = expect_protocol(req.recv_reply(), None, "bad_frames")
        assert message == "a request is one frame; got 2"
        assert req.raw(wire.packb({"v": 1, "id": 2, "op": "ping"})) == {"id": 2, "ok": "pong"}
    assert_healthy(server, ctx)


# -- leases and streams -----------------------------------------------------------------


def test_lease_of_another_session_is_not_owned_and_changes_nothing(
        server: ServerProcess, ctx: zmq.Context[Any], client: Client) -> None:
    lease = client.ok(op="begin", session="session-a")["lease"]
    intruder = {"lease": lease, "session": "session-b"}
    # A failing statement: had it run, session A's transaction would be aborted.
    for fields in ({"op": "query", "sql": "SELECT 1/0"},
                   {"op": "execute", "sql": "SELECT 1/0"},
                   {"op": "batch", "statements": [["SELECT 1/0", None]]},
                   {"op": "stream", "sql": "SELECT 1/0"},
                   {"op": "commit"}, {"op": "rollback"}):
        reply = client.call(**fields, **intruder)
        message = expect_protocol(reply, client.next_id - 1, "lease_not_owned")
        assert message == "the lease belongs to another client session"
    status = client.ok(op="status")["server"]
    assert status["open_leases"] == 1 and status["open_streams"] == 0, status
    owner = {"lease": lease, "session": "session-a"}
    assert client.ok(op="query", sql="SELECT 'still fine'", **owner)["rows"] == [
        ["still fine"]]
    assert client.ok(op="commit", **owner)["command"] == "COMMIT"
    assert_healthy(server, ctx)


def test_stream_of_another_session_is_not_owned(server: ServerProcess, ctx: zmq.Context[Any],
                                                client: Client) -> None:
    page = client.ok(op="stream", sql="SELECT generate_series(1, 10)", session="owner",
                     max_rows=3)
    assert page["done"] is False and page["result"]["rows"] == [[1], [2], [3]]
    for op in ("fetch", "close"):
        reply = client.call(op=op, stream=page["stream"], session="thief")
        message = expect_protocol(reply, client.next_id - 1, "lease_not_owned")
        assert message == "the stream belongs to another client session"
    page = client.ok(op="fetch", stream=page["stream"], session="owner")
    assert page["result"]["rows"] == [[4], [5], [6]]
    assert client.ok(op="close", stream=page["stream"], session="owner") is None
    assert_healthy(server, ctx)


def expect_expired(reply: dict[str, Any], rid: int, kind: str, why: str) -> None:
    assert reply == {"id": rid, "error": {
        "kind": "connection", "reason": "lease_expired",
        "message": f"the {kind} has ended ({why})"}}, reply


_NEVER_GIVEN = "or the server restarted since it began"


def test_unknown_lease_and_stream_ids_are_expired(server: ServerProcess,
                                                  ctx: zmq.Context[Any],
                                                  client: Client) -> None:
    """An id the server does not know is answered as an ended one (docs/protocol.md,
    Leases): the server cannot tell one it never gave out from one before a restart."""
    for fields in ({"op": "query", "sql": "SELECT 1"}, {"op": "execute", "sql": "SELECT 1"},
                   {"op": "batch", "statements": [["SELECT 1", None]]}, {"op": "commit"},
                   {"op": "rollback"}, {"op": "stream", "sql": "SELECT 1"}):
        reply = client.call(**fields, lease="no-such-lease", session="s")
        expect_expired(reply, client.next_id - 1, "lease", _NEVER_GIVEN)
    for op in ("fetch", "close"):
        reply = client.call(op=op, stream="no-such-stream", session="s")
        expect_expired(reply, client.next_id - 1, "stream", _NEVER_GIVEN)
    # A lease id is not a stream id, nor the other way round.
    lease = client.ok(op="begin", session="s")["lease"]
    reply = client.call(op="fetch", stream=lease, session="s")
    expect_expired(reply, client.next_id - 1, "stream", _NEVER_GIVEN)
    page = client.ok(op="stream", sql="SELECT generate_series(1, 5)", session="s", max_rows=2)
    reply = client.call(op="query", sql="SELECT 1", lease=page["stream"], session="s")
    expect_expired(reply, client.next_id - 1, "lease", _NEVER_GIVEN)
    # Neither was touched by the mix-up.
    page = client.ok(op="fetch", stream=page["stream"], session="s")
    assert page["result"]["rows"] == [[3], [4]], page
    assert client.ok(op="close", stream=page["stream"], session="s") is None
    assert client.ok(op="query", sql="SELECT 7", lease=lease, session="s")["rows"] == [[7]]
    assert client.ok(op="rollback", lease=lease, session="s")["command"] == "ROLLBACK"
    assert_healthy(server, ctx)


def test_ended_lease_and_stream_are_expired(server: ServerProcess, ctx: zmq.Context[Any],
                                            client: Client) -> None:
    lease = client.ok(op="begin", session="s")["lease"]
    assert client.ok(op="commit", lease=lease, session="s")["command"] == "COMMIT"
    for fields in ({"op": "query", "sql": "SELECT 1"}, {"op": "commit"},
                   {"op": "rollback"}, {"op": "batch", "statements": [["SELECT 1", None]]}):
        reply = client.call(**fields, lease=lease, session="s")
        expect_expired(reply, client.next_id - 1, "lease", "ended")
    # A stream that ran to its end, and one closed early.
    page = client.ok(op="stream", sql="SELECT 1", session="s", max_rows=10)
    assert page["done"] is True
    reply = client.call(op="fetch", stream=page["stream"], session="s")
    assert reply["error"] == {"kind": "connection", "reason": "lease_expired",
                              "message": "the stream has ended (done)"}, reply
    page = client.ok(op="stream", sql="SELECT generate_series(1, 3)", session="s", max_rows=1)
    assert client.ok(op="close", stream=page["stream"], session="s") is None
    reply = client.call(op="fetch", stream=page["stream"], session="s")
    assert reply["error"] == {"kind": "connection", "reason": "lease_expired",
                              "message": "the stream has ended (closed)"}, reply
    assert_healthy(server, ctx)


# -- SQL errors ----------------------------------------------------------------------------


def test_sql_errors_break_nothing(server: ServerProcess, ctx: zmq.Context[Any],
                                  client: Client) -> None:
    disconnects = client.ok(op="status")["pool"]["disconnects"]
    for op in ("query", "execute"):
        error = expect_sql(client.call(op=op, sql="SELECT 1/0"), client.next_id - 1,
                           "DivisionByZero", "22012")
        assert error["message"] == "division by zero"
    reply = client.call(op="query", sql="SELEC 1")
    expect_sql(reply, client.next_id - 1, "SyntaxError", "42601")
    reply = client.call(op="query", sql="SELECT 1", params=[1])  # psycopg refuses it
    expect_sql(reply, client.next_id - 1, "ProgrammingError", None)
    reply = client.call(op="query", sql="SELECT %s", params=[msgpack.Timestamp(0)])
    expect_sql(reply, client.next_id - 1, "ProgrammingError", None)
    reply = client.call(op="batch", statements=[["SELECT 1", None], ["SELECT 1/0", None],
                                                 ["SELECT 3", None]])
    assert expect_sql(reply, client.next_id - 1, "DivisionByZero", "22012")["index"] == 1
    reply = client.call(op="batch", sql="SELECT 10 / %s", params_seq=[[1], [2], [0]])
    assert expect_sql(reply, client.next_id - 1, "DivisionByZero", "22012")["index"] == 2
    reply = client.call(op="stream", sql="SELECT 1/0", session="s")
    expect_sql(reply, client.next_id - 1, "DivisionByZero", "22012")
    reply = client.call(op="stream", sql="SELECT 1", session="s", max_rows=2**63)
    expect_sql(reply, client.next_id - 1, "SyntaxError", "42601")  # FETCH FORWARD 2**63
    # In a lease: the transaction is aborted, and the lease still ends cleanly.
    lease = client.ok(op="begin", session="s")["lease"]
    reply = client.call(op="query", sql="SELECT 1/0", lease=lease, session="s")
    expect_sql(reply, client.next_id - 1, "DivisionByZero", "22012")
    reply = client.call(op="query", sql="SELECT 1", lease=lease, session="s")
    expect_sql(reply, client.next_id - 1, "InFailedSqlTransaction", "25P02")
    assert client.ok(op="rollback", lease=lease, session="s")["command"] == "ROLLBACK"
    # A value the wire cannot carry.
    reply = client.call(op="query", sql="SELECT '10.0.0.1'::inet")
    assert "ipaddress.IPv4Address" in expect_protocol(reply, client.next_id - 1,
                                                      "unsupported_type")
    status = assert_healthy(server, ctx)
    # No statement error cost a connection.
    assert status["pool"]["disconnects"] == disconnects, status["pool"]


_UNLOADABLE = {
    "infinity_date": ("SELECT 'infinity'::date", "date too large"),
    "year_20000": ("SELECT '20000-01-01'::date", "date too large"),
    "huge_interval": ("SELECT interval '100000000 years'", "can't parse interval"),
}


@pytest.mark.parametrize("sql,expected", list(_UNLOADABLE.values()), ids=list(_UNLOADABLE))
def test_value_psycopg_cannot_load_is_a_data_error(server: ServerProcess,
                                                   ctx: zmq.Context[Any], client: Client,
                                                   sql: str, expected: str) -> None:
    """psycopg raises DataError loading these (as it would in-process); every operation
    answers with it, and nothing is left held."""
    def data_error(reply: dict[str, Any]) -> None:
        error = expect_sql(reply, client.next_id - 1, "DataError", None)
        assert expected in error["message"], error

    data_error(client.call(op="query", sql=sql))
    data_error(client.call(op="execute", sql=sql))
    data_error(client.call(op="batch", statements=[["SELECT 1", None], [sql, None]]))
    # In a lease: answered, and the lease lives on.
    lease = client.ok(op="begin", session="s")["lease"]
    data_error(client.call(op="query", sql=sql, lease=lease, session="s"))
    assert client.ok(op="query", sql="SELECT 2", lease=lease, session="s")["rows"] == [[2]]
    assert client.ok(op="rollback", lease=lease, session="s")["command"] == "ROLLBACK"
    # A stream's first page: answered, and the stream ended (not left holding its
    # connection until the session falls silent).
    data_error(client.call(op="stream", sql=sql, session="s"))
    status = client.ok(op="status")["server"]
    assert status["open_streams"] == 0, status
    # A later page: the stream ends, and says so afterwards.
    two_rows = f"SELECT x FROM (VALUES (1, NULL), (2, ({sql}))) AS v(n, x) ORDER BY n"
    page = client.ok(op="stream", sql=two_rows, session="s", max_rows=1)
    assert page["result"]["rows"] == [[None]] and page["done"] is False, page
    data_error(client.call(op="fetch", stream=page["stream"], session="s"))
    reply = client.call(op="fetch", stream=page["stream"], session="s")
    assert reply["error"]["reason"] == "lease_expired", reply
    assert_healthy(server, ctx)


def wait_reply_or_exit(server: ServerProcess, client: Client, rid: int,
                       timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
    """The reply to ``rid``; fails at once, with the server's log, if the server exits."""
    deadline = time.monotonic() + timeout
    while not client.stash.get(rid):
        assert server.process.poll() is None, (
            f"the server exited ({server.process.poll()}):\n{server.output()}")
        assert time.monotonic() < deadline, f"no reply to request {rid} within {timeout}s"
        if client.sock.poll(50):  # bounds each wait; a reply or an exit ends the loop
            reply = client.recv_reply()
            client.stash.setdefault(reply.get("id"), []).append(reply)
    return client.stash[rid].pop(0)


def test_timeout_beyond_float_range_does_not_kill_the_server(
        pg_dsn: str, ctx: zmq.Context[Any]) -> None:
    with ServerProcess(pg_dsn, pool_size=2) as srv, Client(ctx, srv.endpoint) as client:
        rid = client.send(op="ping", timeout=10**400)
        reply = wait_reply_or_exit(srv, client, rid)
        # Either answer keeps the promise: a huge timeout is no timeout, or it is refused.
        if "ok" not in reply:
            expect_bad_request(reply, rid, "timeout")
        else:
            assert reply["ok"] == "pong", reply
        assert_healthy(srv, ctx)


def test_stream_with_unadaptable_params_frees_its_connection(
        pg_dsn: str, ctx: zmq.Context[Any]) -> None:
    srv = ServerProcess(pg_dsn, pool_size=2)
    try:
        with Client(ctx, srv.endpoint) as client:
            # As many as the pool has connections.
            for sql, params in (("SELECT %s", [{"a": 1}]), ("SELECT %(a)s", {"b": 1})):
                reply = client.call(op="stream", sql=sql, params=params, session="s")
                expect_sql(reply, client.next_id - 1, "ProgrammingError", None)
            # Then a plain query still gets a connection (a leak: queue_timeout).
            reply = client.call(op="query", sql="SELECT 1", timeout=1.0)
            assert reply.get("ok", {}).get("rows") == [[1]], reply
            wait_idle(client, pool_size=2, timeout=3.0)
        assert_healthy(srv, ctx)
    finally:
        srv.kill()  # a leaked connection would hold up a graceful stop for the grace period


# -- vanishing and flooding clients -------------------------------------------------------


def test_dead_client_with_requests_in_flight(server: ServerProcess,
                                             ctx: zmq.Context[Any]) -> None:
    """A DEALER sends 200 queries and closes (LINGER 0) without reading a reply."""
    with Client(ctx, server.endpoint) as probe:
        before = probe.ok(op="status")["server"]["requests"]
        probe_sent = probe.sent
        dead = Client(ctx, server.endpoint)
        for i in range(200):
            dead.send(op="query", sql="SELECT pg_sleep(0.01), %s::int", params=[i])
        # Close only once the server has every request (LINGER 0 drops unsent ones).
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            server_status = probe.ok(op="status")["server"]
            received = server_status["requests"] - before - (probe.sent - probe_sent)
            if received >= 200:
                break
            assert time.monotonic() < deadline, f"the server got {received} of 200"
            time.sleep(0.005)  # a polling interval
        assert received == 200, received
        busy = server_status["queued"] + server_status["connections_held"]
        dead.close()
        assert busy > 0, "the dead client's queries were done before it closed"
        # Its replies go nowhere; the server finishes its work and gives everything back.
        status = wait_idle(probe)
        assert status["server"]["requests"] - before - (probe.sent - probe_sent) == 200
    assert_healthy(server, ctx)


def test_flood_of_5000_requests_each_answered_once(server: ServerProcess,
                                                   ctx: zmq.Context[Any]) -> None:
    count = 5000
    with Client(ctx, server.endpoint) as flood:
        ids = [flood.send(op="query", sql="SELECT %s::int AS n", params=[i])
               for i in range(count)]
        answers: dict[int, int] = {}
        deadline = time.monotonic() + 30.0
        while len(answers) < count:
            reply = flood.recv_reply(timeout=max(0.0, deadline - time.monotonic()))
            rid = reply["id"]
            assert "ok" in reply, reply
            assert reply["ok"]["rows"] == [[rid - ids[0]]], reply
            answers[rid] = answers.get(rid, 0) + 1
            assert answers[rid] == 1, f"request {rid} answered twice"
        assert sorted(answers) == ids
        # A last round trip: no duplicate or stray reply is left on the socket.
        last = flood.send(op="ping")
        assert flood.recv_reply() == {"id": last, "ok": "pong"}
    assert_healthy(server, ctx)


# -- secrets --------------------------------------------------------------------------------


class RecordingClient(Client):
    """A :class:`Client` that keeps every frame it receives, in ``received``."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        super().__init__(ctx, endpoint)
        self.received: list[bytes] = []

    def recv_frames(self, timeout: float = REPLY_TIMEOUT) -> list[bytes]:
        frames = super().recv_frames(timeout)
        self.received.extend(frames)
        return frames


#: The server's log line for a pool connection that logged in with a password.
_SCRAM_LOGIN = re.compile(r'connection authenticated: identity="\S+" method=scram-sha-256')

#: Fail fast: two failed connects open the circuit, probes follow every 0.2 s at most.
_FAILING_POOL_TOML = """\
[pool]
backoff_min = 0.05
backoff_max = 0.2
breaker_threshold = 2
reconnect_log_interval = 0.1
"""


def test_dsn_password_never_leaks(pg_password_cluster: PgCluster, ctx: zmq.Context[Any]) -> None:
    """The cluster wants the DSN's password over TCP: the queries that work used it."""
    cluster = pg_password_cluster
    secret = cluster.password
    assert secret is not None
    dsn = cluster.conninfo()
    with ServerProcess(dsn, "--max-message-size", str(MAX_MESSAGE_SIZE),
                       pool_size=2) as srv:
        with RecordingClient(ctx, srv.endpoint) as c:
            def request(**fields: Any) -> dict[str, Any]:
                return c.raw(wire.packb({"v": 1, "id": 1, **fields}))

            expect_protocol(c.raw(b"\xc1"), None, "malformed")
            expect_protocol(c.raw(b"\x00" * (MAX_MESSAGE_SIZE + 1)), None, "too_large")
            expect_protocol(c.raw(b"a", b"b"), None, "bad_frames")
            expect_protocol(request(v=9, op="ping"), 1, "unsupported_version")
            expect_protocol(request(op="nope"), 1, "unknown_op")
            expect_protocol(request(op="query", sql=5), 1, "bad_request")
            reply = request(op="query", sql="SELECT 1", lease="x", session="s")
            assert reply["error"]["reason"] == "lease_expired", reply
            assert request(op="query", sql="SELECT 1/0")["error"]["kind"] == "sql"
            assert request(op="query", sql="SELECT 'fine'")["ok"]["rows"] == [["fine"]]
            status = request(op="status")
            assert status["ok"]["version"] == 1 and "pool" in status["ok"], status
            assert status["ok"]["health"] == "closed", status
        code = srv.terminate()
        output = srv.output()
    assert code == 0, output
    # The pool's connections logged in with the password (no TCP login is trusted).
    assert len(_SCRAM_LOGIN.findall(cluster.log_text())) >= 2, cluster.log_text()[-2000:]
    assert "starting dbpool" in output, output  # the log that names the database was read
    assert secret not in output, output
    assert c.received
    for frame in c.received:
        assert secret.encode() not in frame, frame
    assert secret not in repr(status)


def test_wrong_dsn_password_never_leaks(pg_password_cluster: PgCluster, ctx: zmq.Context[Any],
                                        tmp_path: Path) -> None:
    """PostgreSQL refuses the DSN's password: the pool fails to connect and its circuit
    opens, and the wrong password shows in no log line, reply, event or status."""
    cluster = pg_password_cluster
    wrong = "wr0ng-dsn-pw-6e1b"
    refusal = f'password authentication failed for user "{cluster.user}"'
    config = tmp_path / "serve.toml"
    config.write_text(_FAILING_POOL_TOML)
    events: list[list[bytes]] = []

    def seen(topic: str, name: str, **data: Any) -> bool:
        for frames in events:
            body = wire.unpackb(frames[1])
            if (frames[0] == topic.encode() and body.get("event") == name
                    and all(body.get(k) == v for k, v in data.items())):
                return True
        return False

    with ServerProcess(cluster.conninfo(password=wrong), "--config", str(config),
                       pool_size=2, wait_ready=False) as srv:
        sub: zmq.Socket[Any] = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(srv.events)
        try:
            # The circuit keeps probing while open, so events keep coming even
            # though the first ones went out before this socket joined.
            deadline = time.monotonic() + REPLY_TIMEOUT
            while not (seen("pool", "health", state="open")
                       and seen("telemetry", "connection_error")):
                left = deadline - time.monotonic()
                assert left > 0 and sub.poll(int(left * 1000)), f"events so far: {events!r}"
                events.append(sub.recv_multipart())
        finally:
            sub.close(linger=0)
        with RecordingClient(ctx, srv.endpoint) as c:
            reply = c.call(op="query", sql="SELECT 1")
            status = c.ok(op="status")
        code = srv.terminate()
        output = srv.output()
    assert code == 0, output
    # It failed for the reason meant: PostgreSQL refused the password it was sent.
    assert refusal in cluster.log_text()
    assert _SCRAM_LOGIN.search(cluster.log_text()) is None
    errors = [wire.unpackb(f[1]) for f in events if f[0] == b"telemetry"]
    assert errors and all(refusal in e["message"] for e in errors), errors
    assert "error" in reply and refusal in reply["error"]["message"], reply
    assert status["health"] in ("open", "half_open"), status
    assert status["pool"]["ready_conn_count"] == 0, status
    assert refusal in output, output  # the pool logged the failure, PostgreSQL's words and all
    assert "starting dbpool" in output, output
    assert wrong not in output, output
    assert c.received and events
    for frame in [*c.received, *(f for message in events for f in message)]:
        assert wrong.encode() not in frame, frame
    assert wrong not in repr(status) and wrong not in repr(reply)


@replaces_methods
def test_a_bug_outside_any_handler_costs_that_request_only(
    pg_dsn: str, ctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The front end on a thread of this process, with its error reply made to fail
    once (a bug where no handler catches it): the loop goes on and serves the next."""
    import threading

    from dbpool.pool import Pool
    from dbpool.server.config import ServeConfig
    from dbpool.server.frontend import FrontEnd

    with Pool.start(pg_dsn, pool_size=1) as pool:
        front = FrontEnd(pool, ServeConfig(bind="tcp://127.0.0.1:*",
                                           events_bind="tcp://127.0.0.1:*", grace=1.0))
        real = front._reply_error
        broken = [True]

        def reply_error(*args: Any) -> None:
            if broken:
                broken.clear()
                raise RuntimeError("an injected bug")
            real(*args)

        front._reply_error = reply_error  # type: ignore[method-assign]
        thread = threading.Thread(target=front.run, daemon=True)
        thread.start()
        try:
            with RecordingClient(ctx, front.endpoint) as c:
                c.send_frames(b"\xc1")  # malformed: its error reply raises
                reply = c.raw(wire.packb({"v": 1, "id": 2, "op": "ping"}))
                assert reply == {"id": 2, "ok": "pong"}
            assert thread.is_alive()
            assert "a request could not be handled" in caplog.text
        finally:
            front.stop()
            thread.join(10)
