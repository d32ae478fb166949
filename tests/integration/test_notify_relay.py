"""LISTEN/NOTIFY through the pool (``pool.listen``; dbpool.actors.relay), on real PostgreSQL.

Every case runs against each pool kind (``pool_kind``, see tests/support/pools.py).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import psycopg
import pykka
import pytest

from dbpool.actors.listeners import NotificationEvent, NotificationGap
from dbpool.errors import ConnectionError, RolledBack
from dbpool.pool import Pool
from tests.support.events import Recorder
from tests.support.pools import POOL_KINDS, kind_options

pytestmark = pytest.mark.parametrize("pool_kind", POOL_KINDS, indirect=True)

#: The relay's connection gets this application_name (configure sees pool_index -1).
RELAY_APP = "dbpool-test-relay"


def _name_relay(opts: dict[str, Any]) -> dict[str, Any]:
    if opts["pool_index"] == -1:
        return {**opts, "application_name": RELAY_APP}
    return opts


def _start(dsn: str, pools: list[Pool], **options: Any) -> Pool:
    pool = Pool.start(dsn, **{"pool_size": 4, "configure": _name_relay,
                              **kind_options(pools), **options})
    pools.append(pool)
    return pool


class Counter:
    """A listener that keeps what it hears and says when it heard ``n`` notifications."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.events: list[Any] = []
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if sum(1 for e in self.events if e.kind == "notification") >= self.n:
            self.done.set()

    def notifications(self) -> list[NotificationEvent]:
        return [e for e in self.events if isinstance(e, NotificationEvent)]


class CountingActor(pykka.ThreadingActor):
    """An actor subscriber: counts what it is told."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def on_receive(self, message: Any) -> Any:
        self.counter(message)


def _unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def test_ten_thousand_notifications_from_four_threads_reach_every_subscriber_in_order(
        pg_dsn: str, pools: list[Pool]) -> None:
    pool = _start(pg_dsn, pools)
    channel = _unique("orders")
    per_thread, threads = 2_500, 4
    total = per_thread * threads
    # A callable has to be quick: count without scanning.
    called = threading.Event()
    heard: list[NotificationEvent] = []

    def on_event(event: Any) -> None:
        heard.append(event)
        if len(heard) >= total:
            called.set()

    counter = Counter(total)
    actor = CountingActor.start(counter)
    try:
        pool.listen(channel, on_event)
        pool.listen(channel, (actor, "tagged"))

        def send(thread: int) -> None:
            for seq in range(per_thread):
                pool.query("SELECT pg_notify(%s, %s)", [channel, f"{thread}:{seq}"])

        workers = [threading.Thread(target=send, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert called.wait(30), f"heard {len(heard)} of {total}"
        assert counter.done.wait(30), f"the actor heard {len(counter.events)} of {total}"
        for received in (heard, counter.notifications()):
            assert len(received) == total
            by_sender: dict[str, list[int]] = defaultdict(list)
            for event in received:
                assert event.kind == "notification" and event.channel == channel
                thread, seq = event.payload.split(":")
                by_sender[thread].append(int(seq))
            assert {t: seqs for t, seqs in by_sender.items()} == {
                str(t): list(range(per_thread)) for t in range(threads)}
        assert all(e.tag == "tagged" for e in counter.notifications())
        assert all(e.pool == pool.name and e.backend_pid > 0 for e in heard)
    finally:
        actor.stop()


def test_notify_from_outside_the_pool_and_only_at_commit(pg_dsn: str, pools: list[Pool]) -> None:
    pool = _start(pg_dsn, pools)
    channel = _unique("Mixed Case")  # a channel is a name as written: no folding
    heard: Recorder[Any] = Recorder()
    pool.listen(channel, heard)
    with psycopg.connect(pg_dsn, autocommit=True) as outsider:
        with pytest.raises(RolledBack), pool.transaction() as tx:
            tx.query("SELECT pg_notify(%s, 'rolled back')", [channel])
            tx.rollback()
        with pool.transaction() as tx:
            tx.query("SELECT pg_notify(%s, 'committed')", [channel])
            # Not yet delivered: PostgreSQL sends it at commit.
            outsider.execute("SELECT pg_notify(%s, 'outsider')", [channel])
            pid = outsider.info.backend_pid
        values = heard.wait_count(lambda e: e.kind == "notification", 2)
    assert [(e.payload, e.backend_pid == pid) for e in values] == [
        ("outsider", True), ("committed", False)]


def test_unlisten_stops_delivery_and_a_failing_subscriber_hurts_no_other(
        pg_dsn: str, pools: list[Pool]) -> None:
    pool = _start(pg_dsn, pools)
    channel = _unique("c")
    kept: Recorder[Any] = Recorder()
    dropped: Recorder[Any] = Recorder()

    def raises(event: Any) -> None:
        raise RuntimeError("a subscriber's bug")

    pool.listen(channel, raises)
    pool.listen(channel, kept)
    pool.listen(channel, dropped)
    pool.query("SELECT pg_notify(%s, 'one')", [channel])
    dropped.wait_count(lambda e: e.kind == "notification", 1)
    pool.unlisten(channel, dropped)
    pool.query("SELECT pg_notify(%s, 'two')", [channel])
    kept.wait_count(lambda e: e.kind == "notification", 2)
    assert [e.payload for e in dropped.values()] == ["one"]
    # The last subscriber out: the relay's connection stops listening.
    pool.unlisten(channel)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            last = admin.execute(
                "SELECT query FROM pg_stat_activity WHERE application_name = %s",
                [RELAY_APP]).fetchall()
            if last and last[0][0].startswith("UNLISTEN"):
                break
            time.sleep(0.02)
        assert last and last[0][0].startswith("UNLISTEN"), last


def test_a_lost_listening_connection_means_a_gap_then_delivery_again(
        pg_dsn: str, pools: list[Pool]) -> None:
    backoff_max = 0.5
    pool = _start(pg_dsn, pools, backoff_min=0.1, backoff_max=backoff_max)
    channel = _unique("gap")
    heard: Recorder[Any] = Recorder()
    pool.listen(channel, heard)
    pool.query("SELECT pg_notify(%s, 'before')", [channel])
    heard.wait_count(lambda e: e.kind == "notification", 1)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s", [RELAY_APP]).fetchall()
        assert killed == [(True,)]
    terminated = time.monotonic()
    (gap,) = heard.wait_count(lambda e: e.kind == "gap", 1, timeout=backoff_max + 5)
    assert isinstance(gap, NotificationGap) and gap.channel == channel and gap.reason
    # Sent from now on, a notification arrives again within backoff_max + 1 s.
    pool.query("SELECT pg_notify(%s, 'after')", [channel])
    heard.wait_count(lambda e: e.kind == "notification", 2, timeout=backoff_max + 1)
    assert time.monotonic() - terminated < backoff_max + 1 + 1
    assert [e.payload for e in heard.values() if e.kind == "notification"] == [
        "before", "after"]
    assert [e.kind for e in heard.values()] == ["notification", "gap", "notification"]


def test_channel_names_are_checked_before_anything_is_sent(
        pg_dsn: str, pools: list[Pool]) -> None:
    pool = _start(pg_dsn, pools)
    with pytest.raises(TypeError):
        pool.listen(b"bytes", print)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pool.listen("", print)
    with pytest.raises(ValueError):
        pool.listen("x" * 64, print)  # PostgreSQL would cut it to 63 bytes
    with pytest.raises(TypeError):
        pool.listen("ok", 42)  # type: ignore[arg-type]
    heard: Recorder[Any] = Recorder()
    longest = "é" * 31 + "x"  # 63 bytes
    pool.listen(longest, heard)
    pool.query("SELECT pg_notify(%s, 'fits')", [longest])
    assert heard.wait_count(lambda e: e.kind == "notification", 1)[0].channel == longest


def test_listen_gives_up_at_its_timeout_when_the_database_is_unreachable(
        pools: list[Pool]) -> None:
    pool = _start("host=127.0.0.1 port=9 user=postgres connect_timeout=1", pools,
                  backoff_min=0.05, backoff_max=0.1)
    started = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        pool.listen("nowhere", print, timeout=0.5)
    assert info.value.reason == "timeout"
    assert 0.5 <= time.monotonic() - started < 3


def test_unlisten_and_stop_do_not_wait_for_the_relay(pg_dsn: str, pools: list[Pool]) -> None:
    pool = _start(pg_dsn, pools, timeout=5.0, idle_interval=5.0)
    started = time.monotonic()
    pool.unlisten("never-listened")  # no relay yet: nothing to wait for
    assert time.monotonic() - started < 1.0
    pool.listen(_unique("c"), print)
    started = time.monotonic()
    pool.close()  # the relay waits on its connection for idle_interval: woken, it stops
    assert time.monotonic() - started < 2.0


def test_a_listen_that_times_out_undoes_itself_only(pg_dsn: str, pools: list[Pool]) -> None:
    pool = _start(pg_dsn, pools)
    channel = _unique("twice")
    heard: Recorder[Any] = Recorder()
    pool.listen(channel, heard)
    try:  # no time to wait: it times out (and is undone) unless the relay is quicker
        pool.listen(channel, heard, timeout=0.0)
    except ConnectionError as error:
        assert error.reason == "timeout"
    pool.query("SELECT pg_notify(%s, 'still')", [channel])
    # The first subscription stands whatever became of the second.
    assert heard.wait_count(lambda e: e.kind == "notification", 1)[0].payload == "still"
