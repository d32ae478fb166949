"""An elastic pool behind ``dbpool serve``: its growth and shrinking reach the
subscribers of the ``pool`` topic, and its status (issue 21, elastic sizing).

A real server process with a configuration file, real PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dbpool.client import Client, Event, Subscription
from tests.support.remote import ServerProcess


def test_an_elastic_pool_reports_its_growth_and_shrinking(pg_dsn: str, tmp_path: Path) -> None:
    path = tmp_path / "dbpool.toml"
    path.write_text("""
[pool]
min_size = 1
max_size = 4
max_idle = 0.5
""")
    with ServerProcess(pg_dsn, "--config", str(path), pool_size=None) as server, \
            Client(server.endpoint, events=server.events, timeout=20) as client, \
            client.subscribe("pool") as events:
        assert client.status()["pool"]["pool_size"] == 1
        stop = threading.Event()

        def burst() -> None:
            with Client(server.endpoint, timeout=20) as worker:
                while not stop.is_set():
                    worker.query("SELECT pg_sleep(0.02)")

        # The subscription joins a moment after it connects: until it hears an event.
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the subscription never joined"
            client.admin("resume")  # a health event, changing nothing
            event = events.get(0.2)
            if event is not None and event.name == "health":
                break
        workers = [threading.Thread(target=burst) for _ in range(6)]
        for worker in workers:
            worker.start()
        seen: list[Event] = []
        try:
            _wait_resize(events, seen, "grow", 20)
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)
        _wait_resize(events, seen, "shrink", 10)
        grow = next(e for e in seen if e.data["reason"] == "grow")
        assert grow.data["size"] == grow.data["previous"] + 1 and grow.data["pool"]
        deadline = time.monotonic() + 10
        while client.status()["pool"]["pool_size"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status = client.status()["pool"]
        assert (status["min_size"], status["max_size"]) == (1, 4)
        assert status["grown"] >= 1 and status["shrunk"] == status["grown"]


def _wait_resize(events: Subscription, seen: list[Event], reason: str, seconds: float) -> None:
    """Collect ``resize`` events into ``seen`` until one with ``reason`` came."""
    deadline = time.monotonic() + seconds
    while not any(e.data.get("reason") == reason for e in seen):
        assert time.monotonic() < deadline, seen
        event = events.get(1)
        if event is not None and event.name == "resize":
            seen.append(event)
