"""LISTEN/NOTIFY for remote clients (``Client.listen``; server/notify.py, server/events.py).

Real PostgreSQL; the front end runs on a thread of the test (so that the
test can also subscribe in-process to the same pool), or, with CURVE and
several pools, as a ``dbpool serve`` process.  What is checked (issue 21):

- 10,000 ``NOTIFY``s, from 4 threads through the pool and from a remote
  client through the server, reach an in-process and a remote subscriber,
  all of them, in order per sender;
- after the relay's connection is terminated, the remote subscriber gets a
  gap, and notifications again within ``backoff_max`` + 1 s;
- a client hears only the pools it may use: ``listen`` on another pool is
  refused, and a raw subscriber to every topic gets no notification of it;
- ``AsyncClient.listen`` hears them as ``Client.listen`` does;
- bad ``listen`` requests get ``bad_request`` and the server serves on;
- the server stops listening when nobody renews, and the subscriber that
  comes back reports a gap.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import zmq

import dbpool.client.events as client_events
import dbpool.server.notify as server_notify
from dbpool.client import AsyncClient, Client, Event
from dbpool.errors import ConnectionError, PermissionDenied, ProtocolError
from dbpool.pool import Pool
from dbpool.wire import packb, unpackb
from tests.server.test_curve import Keys
from tests.support.frontend import front_end
from tests.support.remote import ServerProcess

RELAY_APP = "dbpool-test-remote-relay"


def _name_relay(opts: dict[str, Any]) -> dict[str, Any]:
    return {**opts, "application_name": RELAY_APP} if opts["pool_index"] == -1 else opts


@pytest.fixture
def pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=4, configure=_name_relay, backoff_min=0.1,
                    backoff_max=0.5) as started:
        yield started


def _channel(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def _by_sender(payloads: list[str]) -> dict[str, list[int]]:
    by_sender: dict[str, list[int]] = defaultdict(list)
    for payload in payloads:
        sender, seq = payload.split(":")
        by_sender[sender].append(int(seq))
    return dict(by_sender)


def test_ten_thousand_notifications_reach_an_in_process_and_a_remote_subscriber(
        pool: Pool) -> None:
    channel = _channel("remote")
    per_sender, threads = 2_000, 4
    total = per_sender * (threads + 1)
    heard: list[Any] = []
    all_heard = threading.Event()

    def in_process(event: Any) -> None:
        heard.append(event)
        if len(heard) >= total:
            all_heard.set()

    pool.listen(channel, in_process)
    with front_end(pool) as front, Client(front.endpoint, timeout=10) as client, \
            client.listen(channel) as notes:

        def through_the_pool(sender: int) -> None:
            for seq in range(per_sender):
                pool.query("SELECT pg_notify(%s, %s)", [channel, f"{sender}:{seq}"])

        def through_the_server() -> None:
            with Client(front.endpoint, timeout=10) as sender:
                for seq in range(per_sender):
                    sender.query("SELECT pg_notify(%s, %s)", [channel, f"remote:{seq}"])

        senders = [threading.Thread(target=through_the_pool, args=(t,)) for t in range(threads)]
        senders.append(threading.Thread(target=through_the_server))
        for sender in senders:
            sender.start()
        remote: list[Event] = []
        deadline = time.monotonic() + 120
        while len(remote) < total and time.monotonic() < deadline:
            event = notes.get(5)
            if event is not None:
                remote.append(event)
        for sender in senders:
            sender.join(60)
        assert all_heard.wait(30), f"in-process: {len(heard)} of {total}"
    assert [e.name for e in remote].count("notification") == total, (
        f"remote: {len(remote)} events, gaps: {[e.data for e in remote if e.name == 'gap']}")
    expected = {str(t): list(range(per_sender)) for t in range(threads)}
    expected["remote"] = list(range(per_sender))
    assert _by_sender([e.payload for e in heard]) == expected
    assert _by_sender([e.data["payload"] for e in remote]) == expected
    assert all(e.topic == "notify" and e.data["channel"] == channel
               and e.data["pool"] == "default" for e in remote)


def test_a_lost_relay_connection_is_a_gap_for_remote_subscribers_too(
        pool: Pool, pg_dsn: str) -> None:
    channel = _channel("gap")
    backoff_max = pool.options.backoff_max
    assert backoff_max is not None
    with front_end(pool) as front, Client(front.endpoint, timeout=10) as client, \
            client.listen(channel) as notes, psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_notify(%s, 'before')", [channel])
        before = notes.get(5)
        assert before is not None and before.data["payload"] == "before"
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = %s", [RELAY_APP]).fetchall()
        assert killed == [(True,)]
        gap = notes.get(backoff_max + 5)
        assert gap is not None and gap.name == "gap" and gap.data["reason"], gap
        sent = time.monotonic()
        admin.execute("SELECT pg_notify(%s, 'after')", [channel])
        after = notes.get(backoff_max + 1)
        assert after is not None and after.data["payload"] == "after"
        assert time.monotonic() - sent < backoff_max + 1


def test_the_asyncio_client_listens_too(pool: Pool) -> None:
    channel = _channel("aio")

    async def main(endpoint: str) -> list[str]:
        async with AsyncClient(endpoint, timeout=10) as client, \
                await client.listen(channel) as notes:
            for n in range(3):
                await client.query("SELECT pg_notify(%s, %s)", [channel, str(n)])
            payloads = []
            async for event in notes:
                payloads.append(event.data["payload"])
                if len(payloads) == 3:
                    break
            return payloads

    with front_end(pool) as front:
        assert asyncio.run(asyncio.wait_for(main(front.endpoint), 30)) == ["0", "1", "2"]


def test_bad_listen_requests_get_bad_request_and_the_server_serves_on(pool: Pool) -> None:
    with front_end(pool) as front, Client(front.endpoint, timeout=5) as client:
        for channel in (None, 7, "", "x" * 64, "nul\0byte"):
            with pytest.raises((ProtocolError, TypeError, ValueError)):
                client.listen(channel)  # type: ignore[arg-type]
        # The same, past the client's own checks: straight onto the wire.
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
            raw.connect(front.endpoint)
            for rid, fields in enumerate([{"channel": 7}, {"channel": "x" * 64},
                                          {"channel": "ok", "nonce": 5},
                                          {"channel": "ok", "nonce": "n" * 65}, {}]):
                raw.send(packb({"v": 1, "id": rid, "op": "listen", **fields}))
                assert raw.poll(5000)
                reply = unpackb(raw.recv())
                assert reply["error"]["code"] == "bad_request", reply
        assert client.query("SELECT 1").rows == [(1,)]


def test_the_server_stops_listening_when_nobody_renews_and_a_late_subscriber_hears_a_gap(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_notify, "LISTEN_TTL", 0.5)
    monkeypatch.setattr(client_events, "RENEW_EVERY", 3600.0)  # this one sleeps
    channel = _channel("ttl")
    with front_end(pool) as front, Client(front.endpoint, timeout=5) as client, \
            client.listen(channel) as notes:
        assert client.status()["server"]["listening"] == 1
        deadline = time.monotonic() + 10
        while len(front.listens) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(front.listens) == 0, "the server still listens"
        assert client.status()["server"]["listening"] == 0
        # It wakes up: its next renewal finds the server listening afresh.
        monkeypatch.setattr(client_events, "RENEW_EVERY", 0.0)
        gap = notes.get(5)
        assert gap is not None and gap.name == "gap" and "afresh" in gap.data["reason"]
        monkeypatch.setattr(client_events, "RENEW_EVERY", 3600.0)
        client.query("SELECT pg_notify(%s, 'again')", [channel])
        again = notes.get(5)
        assert again is not None and again.data["payload"] == "again"


# -- several pools, with CURVE ---------------------------------------------------

pytest_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path, ("app", "ops"))


@pytest.fixture
def server(pg_dsn: str, keys: Keys, tmp_path: Path) -> Iterator[ServerProcess]:
    path = tmp_path / "dbpool.toml"
    path.write_text(f"""
[pools.a]
dsn = "{pg_dsn}"
pool_size = 1

[pools.b]
dsn = "{pg_dsn}"
pool_size = 1

[clients.app]
pools = ["a"]
""")
    with ServerProcess(pg_dsn, *keys.server_args(), "--config", str(path),
                       pool_size=1) as process:
        yield process


@pytest_curve
def test_a_client_hears_only_the_pools_it_may_use(server: ServerProcess, keys: Keys) -> None:
    channel = _channel("secret")
    with keys.client(server, "app", timeout=10, pool="b") as on_b, \
            pytest.raises(PermissionDenied):
        on_b.listen(channel)
    with keys.client(server, "ops", timeout=10, pool="b") as ops_b, \
            keys.client(server, "app", timeout=10, pool="a") as app_a, \
            ops_b.listen(channel) as ops_notes, app_a.listen(channel) as app_notes, \
            zmq.Context() as ctx, ctx.socket(zmq.SUB) as snoop:
        # The app's own raw subscriber to every topic, and to every notification.
        keys_app = Client(server.endpoint, server_key=str(keys.server_public),
                          client_key=str(keys.secrets["app"])).keys
        assert keys_app is not None
        keys_app.apply(snoop)
        for prefix in (b"", b"notify", b"notify:", b"notify:b", f"notify:b:{channel}".encode()):
            snoop.setsockopt(zmq.SUBSCRIBE, prefix)
        snoop.connect(server.events)
        # Wait until the snooper hears pool a's notifications: it is joined.
        seen: list[list[bytes]] = []
        deadline = time.monotonic() + 10
        while not any(b"notify:a:" in frames[0] for frames in seen):
            assert time.monotonic() < deadline, seen
            app_a.query("SELECT pg_notify(%s, 'for a')", [channel])
            while snoop.poll(100):
                seen.append(snoop.recv_multipart())
        ops_b.query("SELECT pg_notify(%s, 'for b')", [channel])
        # NOTIFY is per database, and both pools' relays listen on it: b's
        # listeners hear a's notifications as well.
        heard_b = _drain(ops_notes)
        assert [e.data["payload"] for e in heard_b][-1] == "for b"
        assert {e.data["pool"] for e in heard_b} == {"b"}
        while snoop.poll(500):
            seen.append(snoop.recv_multipart())
        assert any(e.data["payload"] == "for b" and e.data["pool"] == "a"
                   for e in _drain(app_notes))
        # ...but of pool b's topics, the app's raw subscriber got nothing.
        leaked = [frames for frames in seen if frames[0].startswith(b"notify:b")]
        assert leaked == []


def _drain(notes: Any) -> list[Event]:
    events = []
    while (event := notes.get(1)) is not None:
        events.append(event)
    return events


def test_a_subscriber_follows_its_client_to_another_server(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    channel = _channel("moved")
    with front_end(pool) as second:
        first_front = front_end(pool)
        first = first_front.__enter__()
        try:
            client = Client([first.endpoint, second.endpoint], timeout=5, spread=False)
            notes = client.listen(channel)
        except BaseException:
            first_front.__exit__(None, None, None)
            raise
        with client, notes:
            client.query("SELECT pg_notify(%s, 'on the first')", [channel])
            heard = notes.get(5)
            assert heard is not None and heard.data["payload"] == "on the first"
            first_front.__exit__(None, None, None)  # the first server goes away
            monkeypatch.setattr(client_events, "RENEW_EVERY", 0.0)
            client.query("SELECT 1")  # the client moves to the second server
            gap = notes.get(5)
            assert gap is not None and gap.name == "gap", gap
            monkeypatch.setattr(client_events, "RENEW_EVERY", 3600.0)
            client.query("SELECT pg_notify(%s, 'on the second')", [channel])
            again = notes.get(5)
            assert again is not None and again.data["payload"] == "on the second", again


def test_junk_subscriptions_and_a_channel_flood_hurt_no_other_client(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_notify, "MAX_CHANNELS", 3)
    channel = _channel("kept")
    with front_end(pool) as front, Client(front.endpoint, timeout=5) as client, \
            client.listen(channel) as notes, zmq.Context() as ctx, \
            ctx.socket(zmq.SUB) as junk, ctx.socket(zmq.SUB) as huge:
        junk.connect(front.events_endpoint)
        for n in range(3000):  # many subscriptions at once, some of other pools' topics
            junk.setsockopt(zmq.SUBSCRIBE, f"notify:nope{n}:x".encode() if n % 2
                            else f"junk-{n}".encode())
        huge.connect(front.events_endpoint)
        huge.setsockopt(zmq.SUBSCRIBE, b"x" * 5000)  # over the limit: cut off
        with Client(front.endpoint, timeout=5) as flooder:
            flooder.listen(_channel("a")).close()
            flooder.listen(_channel("b")).close()
            with pytest.raises(ConnectionError) as caught:
                flooder.listen(_channel("c"))
            assert caught.value.reason == "client_limit"
        client.query("SELECT pg_notify(%s, 'still here')", [channel])
        heard = notes.get(5)
        assert heard is not None and heard.data["payload"] == "still here"
        assert client.query("SELECT 1").rows == [(1,)]
