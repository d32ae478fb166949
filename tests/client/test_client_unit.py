"""Unit tests of dbpool.client against a scripted ROUTER stub (no server, no database).

The stub runs in a thread of its own: it records every request, answers it
as its handler says (by default with a plausible reply per op) and can hold
requests to answer later, out of order or never.  Tests wait on its queues
and events, not on sleeps; only the checks that something does *not* happen
wait out a short interval.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import queue
import select
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import zmq
from psycopg import errors as pg_errors
from zmq.utils.monitor import recv_monitor_message

from dbpool.client import AsyncClient, Client, Event
from dbpool.client import sync as sync_client
from dbpool.client._base import events_endpoint
from dbpool.client.commands import format_result, query_command, status_command
from dbpool.driver import Column, Result
from dbpool.errors import (
    ConnectionError,
    PoolStoppedError,
    ProtocolError,
    TransactionError,
)
from dbpool.wire import packb, unpackb

WAIT = 5.0  # the longest any awaited event may take before a test fails

Handler = Callable[["Stub", bytes, dict[str, Any]], "list[Any] | None"]


def result_map(sql: str, command: str = "SELECT 1") -> dict[str, Any]:
    return {"columns": [["sql", 25], ["n", 23]], "rows": [[sql, 1]], "rowcount": 1,
            "command": command}


_STUB_NUMBERS = itertools.count()


class Stub:
    """A ROUTER that answers requests as a script says, in a thread of its own.

    ``handler(stub, routing_id, request)`` returns the replies to send (maps
    are packed, bytes sent as they are), or None to send nothing (the stub
    keeps the request in :attr:`held`).  Every request lands in
    :attr:`requests` and in ``ops[op]``.
    """

    def __init__(self, handler: Handler | None = None, *, heartbeat_timeout: float = 10.0,
                 events: str = "tcp://0.0.0.0:1") -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.handler: Handler = handler or Stub.answer
        self.heartbeat_timeout = heartbeat_timeout
        self.events = events
        self.requests: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ops: defaultdict[str, queue.Queue[dict[str, Any]]] = defaultdict(queue.Queue)
        self.frames: list[list[bytes]] = []
        self.held: queue.Queue[tuple[bytes, dict[str, Any]]] = queue.Queue()
        self.handshakes: queue.Queue[int] = queue.Queue()
        self.routing_ids: set[bytes] = set()
        self._commands: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]] | None] = \
            queue.Queue()
        # Unique per stub: an id() can come back while a freed stub still holds its name.
        self._wake_addr = f"inproc://stub-{next(_STUB_NUMBERS)}"
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.bind(self._wake_addr)
        self._push = self.ctx.socket(zmq.PUSH)
        self._push.connect(self._wake_addr)
        self._push_lock = threading.Lock()
        self._router: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self.port = 0
        self._bind()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._run, name="stub-router", daemon=True)
        self._thread.start()

    # -- in the stub's thread (or before it starts) --

    def _bind(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CLOSED)
        try:
            if self.port:
                router.bind(f"tcp://127.0.0.1:{self.port}")
            else:
                self.port = router.bind_to_random_port("tcp://127.0.0.1")
        except BaseException:
            router.disable_monitor()
            monitor.close(linger=0)
            router.close(linger=0)
            raise
        self._router, self._monitor = router, monitor

    def _monitor_event(self, sock: zmq.Socket[bytes]) -> int:
        event = int(recv_monitor_message(sock)["event"])
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshakes.put(event)
        return event

    def _unbind(self) -> None:
        router, monitor = self._router, self._monitor
        self._router = self._monitor = None
        if router is None or monitor is None:
            return
        # libzmq closes a listener asynchronously: unbind, and wait until it is
        # closed, so that the port can be bound again at once.
        router.unbind(f"tcp://127.0.0.1:{self.port}")
        monitor.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
        while self._monitor_event(monitor) != zmq.EVENT_CLOSED:
            pass
        router.disable_monitor()
        router.close(linger=0)
        monitor.close(linger=0)

    def send(self, routing_id: bytes, reply: Any) -> None:
        """Send one reply (stub thread only)."""
        assert self._router is not None
        body = reply if isinstance(reply, bytes) else packb(reply)
        self._router.send_multipart([routing_id, body])

    def _run(self) -> None:
        try:
            while True:
                poller = zmq.Poller()
                poller.register(self._pull, zmq.POLLIN)
                if self._router is not None:
                    poller.register(self._router, zmq.POLLIN)
                if self._monitor is not None:
                    poller.register(self._monitor, zmq.POLLIN)
                for sock, _ in poller.poll():
                    if sock is self._pull:
                        self._pull.recv()
                        command = self._commands.get_nowait()
                        if command is None:
                            return
                        fn, done = command
                        done.put(fn())
                    elif sock is self._monitor and self._monitor is not None:
                        self._monitor_event(self._monitor)
                    elif sock is self._router and self._router is not None:
                        self._request(self._router.recv_multipart())
        finally:
            self._unbind()
            self._pull.close(linger=0)

    def _request(self, frames: list[bytes]) -> None:
        self.frames.append(frames)
        routing_id, body = frames[0], frames[-1]
        self.routing_ids.add(routing_id)
        msg = unpackb(body)
        self.requests.put(msg)
        self.ops[msg["op"]].put(msg)
        replies = self.handler(self, routing_id, msg)
        if replies is None:
            self.held.put((routing_id, msg))
            return
        for reply in replies:
            self.send(routing_id, reply)

    def answer(self, routing_id: bytes, msg: dict[str, Any]) -> list[Any]:
        """The default script: a plausible ``ok`` for every op."""
        return [{"id": msg["id"], "ok": self.value(msg)}]

    def value(self, msg: dict[str, Any]) -> Any:
        op = msg["op"]
        if msg.get("begin") is True:  # a transaction's first request, with its begin
            return {"lease": self.value({"op": "begin"}),
                    "result": self.value({**msg, "begin": None})}
        if op == "ping":
            return "pong"
        if op == "status":
            return {"version": 1, "server": {"requests": 1}, "pool": {"size": 2},
                    "events": self.events, "health": "ok"}
        if op in ("query", "execute"):
            return result_map(msg["sql"])
        if op == "batch":
            sqls = [msg["sql"]] * len(msg["params_seq"]) if "sql" in msg \
                else [sql for sql, _ in msg["statements"]]
            return {"results": [result_map(sql) for sql in sqls]}
        if op == "begin":
            return {"lease": "L1", "heartbeat_timeout": self.heartbeat_timeout,
                    "expires_in": 300.0}
        if op in ("commit", "rollback"):
            return result_map(op, op.upper())
        if op == "heartbeat":
            return {"leases": 1}
        if op == "stream":
            return {"stream": "S1", "result": result_map("page 0"), "done": False}
        if op == "fetch":
            return {"stream": "S1", "result": result_map("page 1"), "done": True}
        return None

    # -- from the test's thread --

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the stub's thread and return what it returns."""
        done: queue.Queue[Any] = queue.Queue()
        self._commands.put((fn, done))
        with self._push_lock:
            self._push.send(b"")
        return done.get(timeout=WAIT)

    def unbind(self) -> None:
        """Close the ROUTER socket, as a server that stops."""
        self.call(self._unbind)

    def rebind(self) -> None:
        """Close the ROUTER and bind a new one on the same port: a server restart."""
        def restart() -> None:
            self._unbind()
            self._bind()
        self.call(restart)

    def reply_held(self, routing_id: bytes, reply: Any) -> None:
        self.call(lambda: self.send(routing_id, reply))

    def next_op(self, op: str) -> dict[str, Any]:
        return self.ops[op].get(timeout=WAIT)

    def close(self) -> None:
        self._commands.put(None)
        with self._push_lock:
            self._push.send(b"")
            self._push.close(linger=0)
        self._thread.join(WAIT)


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.close()


@pytest.fixture
def client(stub: Stub) -> Iterator[Client]:
    with Client(stub.endpoint, timeout=2.0) as c:
        yield c


# -- requests and replies --------------------------------------------------------------


def test_request_is_one_frame_with_version_id_op_and_the_call_timeout(
        stub: Stub, client: Client) -> None:
    result = client.query("SELECT %s", [1])
    assert isinstance(result, Result)
    assert result.rows == [("SELECT %s", 1)]
    assert result.columns == [Column("sql", 25), Column("n", 23)]
    assert (result.rowcount, result.command) == (1, "SELECT 1")
    client.execute("SELECT %(x)s", {"x": 2}, timeout=1.5)

    first, second = stub.frames
    assert len(first) == 2 and len(second) == 2  # [routing id, body]: one frame sent
    assert unpackb(first[1]) == {"v": 1, "id": 1, "op": "query", "sql": "SELECT %s",
                                 "params": [1]}
    assert unpackb(second[1]) == {"v": 1, "id": 2, "op": "execute", "sql": "SELECT %(x)s",
                                  "params": {"x": 2}, "timeout": 1.5}


def test_ping_status_and_batch_forms(stub: Stub, client: Client) -> None:
    assert 0 < client.ping() < WAIT
    assert client.status()["health"] == "ok"
    results = client.batch("INSERT %s", [[1], [2]])
    assert [r.rows for r in results] == [[("INSERT %s", 1)]] * 2
    results = client.batch([("A", [1]), ("B", None), "C"])
    assert [r.rows[0][0] for r in results] == ["A", "B", "C"]
    ops = [stub.requests.get(timeout=WAIT) for _ in range(4)]
    assert "timeout" not in ops[0] and ops[0]["op"] == "ping"
    assert ops[2]["params_seq"] == [[1], [2]] and "statements" not in ops[2]
    assert ops[3]["statements"] == [["A", [1]], ["B", None], ["C", None]]
    with pytest.raises(TypeError):
        client.batch("X")
    with pytest.raises(TypeError, match="wire format cannot carry"):
        client.query("SELECT %s", [object()])
    assert client.query("SELECT 2").rows[0][0] == "SELECT 2"  # the packer recovered


def test_replies_with_another_id_are_dropped() -> None:
    def script(stub: Stub, rid: bytes, msg: dict[str, Any]) -> list[Any]:
        return [{"id": msg["id"] + 100, "ok": result_map("stale")},
                {"id": msg["id"], "ok": result_map("mine")}]

    stub = Stub(script)
    try:
        with Client(stub.endpoint, timeout=2.0) as client:
            assert client.query("x").rows[0][0] == "mine"
            assert client.query("x", timeout=1.0).rows[0][0] == "mine"
    finally:
        stub.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "libzmq"])
def test_timeout_raises_and_a_late_reply_is_ignored_by_the_next_request(direct: bool) -> None:
    first: list[bool] = []

    def script(stub: Stub, rid: bytes, msg: dict[str, Any]) -> list[Any] | None:
        if not first:
            first.append(True)
            return None  # held: no reply within the timeout
        # The late reply, to the old socket (gone) and, as if misrouted, to the new one.
        old_rid, old = stub.held.get_nowait()
        late = {"id": old["id"], "ok": result_map("late")}
        stub.send(old_rid, late)
        return [late, {"id": msg["id"], "ok": result_map(msg["sql"])}]

    stub = Stub(script)
    try:
        with Client(stub.endpoint, timeout=0.3, direct=direct) as client:
            start = time.monotonic()
            with pytest.raises(ConnectionError) as info:
                client.query("first")
            assert info.value.reason == "timeout"
            assert stub.endpoint in str(info.value) and "'query'" in str(info.value)
            assert 0.25 < time.monotonic() - start < WAIT
            stub.handshakes.get(timeout=WAIT)  # the first socket's
            assert client.query("second").rows[0][0] == "second"
            assert len(stub.routing_ids) == 2  # the timed-out socket was replaced
    finally:
        stub.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "libzmq"])
def test_send_timeout_when_down_and_the_next_request_works_after_a_restart(
        stub: Stub, direct: bool) -> None:
    with Client(stub.endpoint, timeout=0.3, direct=direct) as client:
        assert client.ping() > 0
        stub.handshakes.get(timeout=WAIT)
        stub.unbind()
        with pytest.raises(ConnectionError) as info:
            client.query("x")
        # Sent before libzmq saw the server go (no reply: timeout), or after (no
        # connection to send on: no_server); which one is a race of libzmq's.
        assert info.value.reason in ("timeout", "no_server")
        stub.rebind()  # found again by the next request, within its connect_timeout
        assert client.query("after").rows[0][0] == "after"


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "libzmq"])
def test_reconnects_after_the_server_socket_is_rebound(stub: Stub, direct: bool) -> None:
    with Client(stub.endpoint, timeout=2.0, direct=direct) as client:
        assert client.query("before").rows[0][0] == "before"
        stub.handshakes.get(timeout=WAIT)
        stub.rebind()
        if direct:  # libzmq closes the old connection in its own time: wait for that
            direct_socket = client._ch.direct
            assert direct_socket is not None
            assert select.select([direct_socket.fileno()], [], [], WAIT)[0]
        else:
            stub.handshakes.get(timeout=WAIT)  # libzmq reconnected on its own
        # A direct connection finds the old one closed before it sends, and connects again.
        assert client.query("after").rows[0][0] == "after"
        assert len(stub.routing_ids) == 2


def test_several_endpoints_move_on_after_a_timeout(stub: Stub) -> None:
    dead = Stub(lambda s, r, m: None)
    try:
        with Client([dead.endpoint, stub.endpoint], timeout=2.0, spread=False) as client:
            with pytest.raises(ConnectionError, match=f"{dead.endpoint} to 'query' within 0.2 s"):
                client.query("x", timeout=0.2)
            assert dead.next_op("query")["timeout"] == 0.2
            assert client.query("y").rows[0][0] == "y"
    finally:
        dead.close()


def test_each_thread_has_its_own_socket(stub: Stub, client: Client) -> None:
    client.ping()
    results: list[str] = []
    thread = threading.Thread(target=lambda: results.append(client.query("t").rows[0][0]))
    thread.start()
    thread.join(WAIT)
    assert results == ["t"]
    assert len(stub.routing_ids) == 2
    assert len(client._sockets) == 1  # the ended thread's socket was closed with it


def test_closed_client_raises(stub: Stub) -> None:
    client = Client(stub.endpoint, timeout=1.0)
    client.close()
    client.close()
    with pytest.raises(ConnectionError, match="closed"):
        client.ping()


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "check"), [
    ({"kind": "sql", "class": "UniqueViolation", "sqlstate": "23505",
      "message": "duplicate key value violates unique constraint \"t_pkey\"",
      "detail": "Key (id)=(1) already exists.", "hint": None},
     lambda e: isinstance(e, pg_errors.UniqueViolation) and e.sqlstate == "23505"
     and e.diag.message_detail == "Key (id)=(1) already exists."),
    ({"kind": "connection", "reason": "queue_timeout", "message": "waited"},
     lambda e: type(e) is ConnectionError and e.reason == "queue_timeout"),
    ({"kind": "connection", "reason": "stopped", "message": "stopped"},
     lambda e: isinstance(e, PoolStoppedError)),
    ({"kind": "transaction", "status": "error", "message": "aborted"},
     lambda e: isinstance(e, TransactionError) and e.status == "error"),
    ({"kind": "protocol", "code": "lease_not_owned", "message": "not yours"},
     lambda e: isinstance(e, ProtocolError) and e.code == "lease_not_owned"),
    ({"kind": "sql", "sqlstate": "42601", "message": "syntax", "index": 1},
     lambda e: isinstance(e, pg_errors.SyntaxError) and getattr(e, "index", None) == 1),
])
def test_error_maps_raise_the_matching_exception(
        error: dict[str, Any], check: Callable[[Exception], bool]) -> None:
    stub = Stub(lambda s, r, m: [{"id": m["id"], "error": error}])
    try:
        with Client(stub.endpoint, timeout=2.0) as client:
            with pytest.raises(Exception) as info:
                client.query("x")
            assert check(info.value), info.value
            assert isinstance(info.value, psycopg.Error | ConnectionError | TransactionError
                              | ProtocolError)
    finally:
        stub.close()


def test_malformed_replies_raise_protocol_error() -> None:
    replies: list[Any] = [b"\xc1", {"id": 2}, {"id": 3, "ok": {"rows": []}}, [1, 2]]
    stub = Stub(lambda s, r, m: [replies[m["id"] - 1]])
    try:
        with Client(stub.endpoint, timeout=2.0) as client:
            for _ in replies:
                with pytest.raises(ProtocolError) as info:
                    client.query("x")
                assert info.value.code == "malformed"
    finally:
        stub.close()


# -- transactions, heartbeats, streams -------------------------------------------------


def test_transaction_commits_on_exit_with_lease_and_session(stub: Stub, client: Client) -> None:
    with client.transaction() as tx:
        assert tx.lease is None and tx.active  # it begins with its first request
        tx.query("q1")
        assert tx.lease == "L1"
        tx.execute("q2", [1])
        tx.batch("q3", [[1]])
        tx.query("q4")
    assert not tx.active
    first = stub.next_op("query")
    assert first["begin"] is True and "lease" not in first
    assert first["session"] == client.session and len(client.session) == 32
    for op in ("execute", "batch", "query", "commit"):
        msg = stub.next_op(op)
        assert (msg["lease"], msg["session"]) == ("L1", client.session), op
    assert stub.ops["begin"].empty() and stub.ops["rollback"].empty()
    with pytest.raises(TransactionError):
        tx.query("after")


def test_transaction_rolls_back_on_exception_and_reraises(stub: Stub, client: Client) -> None:
    with pytest.raises(KeyError), client.transaction() as tx:
        tx.query("q")
        raise KeyError("boom")
    msg = stub.next_op("rollback")
    assert (msg["lease"], msg["session"]) == ("L1", client.session)
    assert stub.ops["commit"].empty()


def test_explicit_rollback_ends_the_transaction(stub: Stub, client: Client) -> None:
    with client.transaction() as tx:
        assert tx.rollback().command == "ROLLBACK"
        with pytest.raises(TransactionError):
            tx.commit()
    assert stub.ops["commit"].empty()


def test_heartbeats_while_a_transaction_is_open_and_not_after() -> None:
    stub = Stub(heartbeat_timeout=0.15)  # a heartbeat every 50 ms
    try:
        client = Client(stub.endpoint, timeout=2.0)
        tx = client.transaction().begin()
        for _ in range(3):
            assert stub.next_op("heartbeat")["session"] == client.session
        tx.commit()
        stub.next_op("commit")
        time.sleep(0.3)  # a negative check: six intervals without a heartbeat
        assert stub.ops["heartbeat"].qsize() <= 1  # at most one already on its way
        thread = client._heartbeat._thread
        assert thread is not None and thread.is_alive()
        start = time.monotonic()
        client.close()
        assert not thread.is_alive() and time.monotonic() - start < 0.5
    finally:
        stub.close()


def test_the_first_heartbeat_goes_out_one_interval_after_the_begin() -> None:
    # The heartbeat thread's socket is IMMEDIATE: one connected only when the first
    # heartbeat is due refuses it, and the server would hear of the session only
    # two intervals after the begin, a third of its timeout before expiry.
    interval = 0.5
    stub = Stub(heartbeat_timeout=3 * interval)
    try:
        with Client(stub.endpoint, timeout=2.0) as client:
            client.transaction().begin()
            begun = time.monotonic()
            stub.next_op("heartbeat")
            # One interval, give or take the thread's scheduling; never under two before.
            assert time.monotonic() - begun < 1.9 * interval
            assert client._heartbeat.sent == 1
    finally:
        stub.close()


class _RefusingSocket:
    """A heartbeat socket whose first ``refusals`` sends find no connection."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.attempts: queue.Queue[float] = queue.Queue()

    def send(self, body: bytes, flags: int = 0) -> None:
        self.attempts.put(time.monotonic())
        if self.refusals:
            self.refusals -= 1
            raise zmq.Again()

    def recv(self, flags: int = 0) -> bytes:
        raise zmq.Again()

    def close(self, linger: int | None = None) -> None:
        pass


class _HeartbeatOwner:
    """What the heartbeat thread asks of its client, with a refusing socket."""

    def __init__(self, sock: _RefusingSocket) -> None:
        self.session = "s"
        self.closed = False
        self.sock = sock

    def _current_endpoint(self) -> str:
        return "tcp://127.0.0.1:1"

    def _new_socket(self, endpoint: str, *, register: bool = True) -> tuple[Any, None]:
        return self.sock, None


def test_a_heartbeat_that_finds_no_connection_is_tried_again_soon() -> None:
    interval = 1.0
    sock = _RefusingSocket(refusals=1)
    owner = _HeartbeatOwner(sock)
    heartbeat = sync_client._Heartbeat(owner)  # type: ignore[arg-type]
    heartbeat.add(3 * interval)
    try:
        refused = sock.attempts.get(timeout=WAIT)
        sent = sock.attempts.get(timeout=WAIT)
        # A tenth of an interval later; a whole one before, which would leave the server
        # a third of its timeout.
        assert sent - refused < 0.9 * interval
        assert heartbeat.sent == 1
    finally:
        heartbeat.stop()


def test_stream_pages_rows_and_close(stub: Stub, client: Client) -> None:
    with client.stream("SELECT big", [1], max_rows=10) as stream:
        assert [page.rows[0][0] for page in stream] == ["page 0", "page 1"]
        assert stream.done
    msg = stub.next_op("stream")
    assert (msg["max_rows"], msg["session"], msg["params"]) == (10, client.session, [1])
    assert "lease" not in msg
    assert stub.next_op("fetch")["stream"] == "S1"
    assert stub.ops["close"].empty()

    with client.transaction() as tx, tx.stream("SELECT big") as stream:
        for _ in stream.rows():
            break  # leaving early closes the stream
    msg = stub.next_op("close")
    assert (msg["stream"], msg["session"]) == ("S1", client.session)
    assert stub.ops["stream"].get(timeout=WAIT)["lease"] == "L1"


# -- events ----------------------------------------------------------------------------


def test_subscribe_gets_events_from_the_reported_endpoint() -> None:
    pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stub = Stub(events=f"tcp://0.0.0.0:{port}")
    try:
        with Client(stub.endpoint, timeout=2.0) as client, \
                client.subscribe(("pool", "connection")) as sub:
            assert sub.endpoint == f"tcp://127.0.0.1:{port}"
            body = packb({"event": "started", "pool": "p", "time": 1.0, "state": "up"})
            deadline = time.monotonic() + WAIT
            event = None
            while event is None and time.monotonic() < deadline:  # until the SUB has joined
                pub.send_multipart([b"pool", body])
                event = sub.get(timeout=0.05)
            assert event == Event("pool", "started", {"event": "started", "pool": "p",
                                                      "time": 1.0, "state": "up"})
            while sub.get(timeout=0.05) is not None:  # drain the extra copies
                pass
            pub.send_multipart([b"telemetry", body])  # not subscribed
            pub.send_multipart([b"connection", b"\xc1"])  # malformed: skipped
            pub.send_multipart([b"connection", packb({"event": "connected", "index": 0,
                                                      "pool": "p", "time": 2.0})])
            event = sub.get(timeout=WAIT)
            assert event is not None and (event.topic, event.name) == ("connection", "connected")
            assert event.data["index"] == 0
            assert sub.get(timeout=0.05) is None
    finally:
        pub.close(linger=0)
        stub.close()


def test_events_endpoint_wildcards() -> None:
    assert events_endpoint("tcp://0.0.0.0:7433", "tcp://db.example:7432") == \
        "tcp://db.example:7433"
    assert events_endpoint("tcp://*:7433", "tcp://[::1]:7432") == "tcp://[::1]:7433"
    assert events_endpoint("tcp://[::]:7433", "tcp://10.0.0.5:7432") == "tcp://10.0.0.5:7433"
    assert events_endpoint("tcp://10.1.1.1:7433", "tcp://h:7432") == "tcp://10.1.1.1:7433"
    assert events_endpoint("ipc:///tmp/ev", "tcp://h:7432") == "ipc:///tmp/ev"


# -- the async client ------------------------------------------------------------------


def test_async_concurrent_requests_answered_out_of_order() -> None:
    count = 8

    def script(stub: Stub, rid: bytes, msg: dict[str, Any]) -> list[Any] | None:
        if stub.held.qsize() + 1 < count:
            return None
        held = [stub.held.get_nowait() for _ in range(count - 1)] + [(rid, msg)]
        for routing_id, request in reversed(held):
            stub.send(routing_id, {"id": request["id"], "ok": result_map(request["sql"])})
        return []

    async def main(stub: Stub) -> None:
        async with AsyncClient(stub.endpoint, timeout=2.0) as client:
            results = await asyncio.gather(*(client.query(f"q{i}") for i in range(count)))
            assert [r.rows[0][0] for r in results] == [f"q{i}" for i in range(count)]
            assert len(stub.routing_ids) == 1  # one socket for all of them

    stub = Stub(script)
    try:
        asyncio.run(main(stub))
    finally:
        stub.close()


def test_async_requests_on_a_connected_socket_time_out_each_at_its_own_deadline() -> None:
    # Requests sent straight out share one timer (AsyncClient._expiring): a short
    # timeout made after a long one must still end first, and on time.
    def script(stub: Stub, rid: bytes, msg: dict[str, Any]) -> list[Any] | None:
        if msg["op"] == "query" and msg["sql"].startswith("slow"):
            return None
        return stub.answer(rid, msg)

    async def main(stub: Stub) -> None:
        async with AsyncClient(stub.endpoint, timeout=2.0) as client:
            assert (await client.query("fast")).rows[0][0] == "fast"  # now connected
            long = asyncio.ensure_future(client.query("slow long", timeout=30.0))
            await asyncio.sleep(0)  # sent
            started = time.monotonic()
            with pytest.raises(ConnectionError) as info:
                await client.query("slow short", timeout=0.3)
            assert info.value.reason == "timeout"
            assert 0.25 < time.monotonic() - started < 3.0
            assert not long.done()
            long.cancel()

    stub = Stub(script)
    try:
        asyncio.run(main(stub))
    finally:
        stub.close()


def test_async_timeout_transaction_stream_and_heartbeats() -> None:
    def script(stub: Stub, rid: bytes, msg: dict[str, Any]) -> list[Any] | None:
        if msg["op"] == "query" and msg["sql"] == "slow":
            return None
        return stub.answer(rid, msg)

    async def main(stub: Stub) -> None:
        async with AsyncClient(stub.endpoint, timeout=2.0) as client:
            with pytest.raises(ConnectionError) as info:
                await client.query("slow", timeout=0.2)
            assert info.value.reason == "timeout"
            assert stub.next_op("query")["timeout"] == 0.2
            assert (await client.query("fast")).rows[0][0] == "fast"
            assert len(stub.routing_ids) == 2  # the timed-out socket was replaced

            async with client.transaction() as tx:
                await tx.query("in tx")
                hb = await asyncio.to_thread(stub.next_op, "heartbeat")
                assert hb["session"] == client.session
                pages = [page.rows[0][0] async for page in tx.stream("s")]
                assert pages == ["page 0", "page 1"]
            assert not tx.active
            with pytest.raises(TransactionError):
                await tx.query("after")
            with pytest.raises(RuntimeError):
                async with client.transaction() as failed:
                    await failed.query("before the boom")
                    raise RuntimeError("boom")
            assert stub.next_op("query")["sql"] == "fast"
            first = stub.next_op("query")  # the transaction's first request began it
            assert first["sql"] == "in tx" and first["begin"] is True
            assert "lease" not in first and first["session"] == client.session
            assert stub.next_op("commit")["lease"] == "L1"
            assert stub.next_op("rollback")["session"] == client.session

    stub = Stub(script, heartbeat_timeout=0.15)
    try:
        asyncio.run(main(stub))
    finally:
        stub.close()


def test_async_subscribe() -> None:
    pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stub = Stub(events=f"tcp://*:{port}")

    async def main() -> None:
        async with AsyncClient(stub.endpoint, timeout=2.0) as client, \
                client.subscribe("pool") as sub:
            body = packb({"event": "stopped", "pool": "p", "time": 1.0})
            event = None
            for _ in range(100):
                pub.send_multipart([b"pool", body])
                event = await sub.get(timeout=0.05)
                if event is not None:
                    break
            assert event is not None and event.name == "stopped"

    try:
        asyncio.run(main())
    finally:
        pub.close(linger=0)
        stub.close()


# -- commands --------------------------------------------------------------------------


def test_query_and_status_commands(stub: Stub, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert query_command(stub.endpoint, "SELECT %s", ["a"], 2.0, out) == 0
    assert out.getvalue() == (
        "    sql    | n\n"
        "-----------+---\n"
        " SELECT %s | 1\n"
        "SELECT 1\n")
    assert stub.next_op("query")["params"] == ["a"]

    out = io.StringIO()
    assert status_command(stub.endpoint, 2.0, True, out) == 0
    assert json.loads(out.getvalue())["health"] == "ok"
    out = io.StringIO()
    assert status_command(stub.endpoint, 2.0, False, out) == 0
    assert "server:\n  requests: 1\n" in out.getvalue()

    stub.handler = lambda s, r, m: [{"id": m["id"], "error": {
        "kind": "sql", "sqlstate": "42P01", "message": "relation \"t\" does not exist",
        "hint": "create it"}}]
    assert query_command(stub.endpoint, "SELECT * FROM t", None, 2.0, io.StringIO()) == 1
    err = capsys.readouterr().err
    assert 'ERROR:  relation "t" does not exist' in err and "HINT:  create it" in err


def test_format_result_nulls_arrays_and_numbers() -> None:
    result = Result([Column("id", 23), Column("tags", 1009), Column("doc", 3802)],
                    [(1, ["a", None], {"k": 1}), (10, [], None)], 2, "SELECT 2")
    assert format_result(result) == (
        " id |   tags   |   doc\n"
        "----+----------+----------\n"
        "  1 | {a,NULL} | {\"k\": 1}\n"
        " 10 | {}       |\n"
        "SELECT 2\n")
    assert format_result(Result([], [], 3, "INSERT 0 3")) == "INSERT 0 3\n"
