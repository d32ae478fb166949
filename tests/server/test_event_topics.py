"""Which event topics a subscriber gets (server/events.py ``allowed``): notifications
only of the pools it may use, whatever prefix it asks for."""

from __future__ import annotations

from dbpool.server.events import allowed

POOLS = ["a", "ab", "b"]


def only_a(pool: str) -> bool:
    return pool in ("a", "ab")


def test_a_whole_notification_topic_needs_its_pool() -> None:
    assert allowed(b"notify:a:orders\0", POOLS, only_a) == [b"notify:a:orders\0"]
    assert allowed(b"notify:b:orders\0", POOLS, only_a) == []
    assert allowed(b"notify:b:", POOLS, only_a) == []
    assert allowed(b"notify:nope:x", POOLS, only_a) == []


def test_a_prefix_short_of_a_pool_name_becomes_the_pools_it_may_use() -> None:
    assert allowed(b"notify:a", POOLS, only_a) == [b"notify:a:", b"notify:ab:"]
    assert allowed(b"notify:", POOLS, only_a) == [b"notify:a:", b"notify:ab:"]
    assert allowed(b"notify:", POOLS, lambda pool: True) == [
        b"notify:a:", b"notify:ab:", b"notify:b:"]


def test_every_topic_is_the_other_topics_and_the_pools_it_may_use() -> None:
    assert allowed(b"", POOLS, only_a) == [
        b"connection", b"pool", b"telemetry", b"notify:a:", b"notify:ab:"]
    assert allowed(b"no", POOLS, only_a) == [b"notify:a:", b"notify:ab:"]
    assert allowed(b"n", POOLS, lambda pool: False) == []


def test_other_topics_pass_as_they_are() -> None:
    assert allowed(b"pool", POOLS, lambda pool: False) == [b"pool"]
    assert allowed(b"p", POOLS, lambda pool: False) == [b"p"]
    assert allowed(b"connection", POOLS, only_a) == [b"connection"]
    assert allowed(b"\xff\x00junk", POOLS, only_a) == [b"\xff\x00junk"]
