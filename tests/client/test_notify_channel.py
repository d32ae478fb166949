"""A remote subscriber's view of one channel (client/events.py ``Channel``), without I/O:
what it hands the caller, and the gaps it reports itself."""

from __future__ import annotations

from typing import Any

from dbpool.client.events import Channel, Event

ANSWER = {"pool": "main", "channel": "orders", "topic": "notify:main:orders\0", "since": 7,
          "seq": 0}


def event(name: str, seq: int, since: int = 7, **data: Any) -> Event:
    return Event("notify:main:orders\0", name, {"event": name, "pool": "main",
                                                  "channel": "orders", "seq": seq,
                                                  "since": since, **data})


def test_notifications_pass_and_marks_do_not() -> None:
    channel = Channel(ANSWER)
    assert channel.take(event("listening", 1, nonce="n")) == []
    out = channel.take(event("notification", 2, payload="p"))
    assert [(e.topic, e.name, e.data["payload"]) for e in out] == [("notify", "notification", "p")]
    assert channel.joined(event("listening", 3, nonce="n"), "n")
    assert not channel.joined(event("listening", 3, nonce="other"), "n")


def test_a_skipped_number_is_a_gap_before_the_event() -> None:
    channel = Channel(ANSWER)
    channel.take(event("notification", 1))
    out = channel.take(event("notification", 5))
    assert [e.name for e in out] == ["gap", "notification"]
    assert "3 events missed" in out[0].data["reason"]
    assert [e.name for e in channel.take(event("notification", 6))] == ["notification"]


def test_a_new_beginning_is_a_gap() -> None:
    channel = Channel(ANSWER)
    channel.take(event("notification", 1))
    assert channel.renewed({**ANSWER, "since": 7}) is None
    gap = channel.renewed({**ANSWER, "since": 8})
    assert gap is not None and gap.name == "gap" and "afresh" in gap.data["reason"]
    # The events of the new beginning count from their own start.
    assert [e.name for e in channel.take(event("notification", 1, since=8))] == ["notification"]
    # An event of yet another beginning (a restarted server) is a gap too.
    out = channel.take(event("notification", 1, since=9))
    assert [e.name for e in out] == ["gap", "notification"]
