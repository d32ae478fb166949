"""An in-process pool's metrics in Prometheus' text format (dbpool.pool.prometheus).

A pool on the real PostgreSQL is registered on a registry of its own; the
scrape is parsed with prometheus_client's own parser, and the series must
be there with their labels and types, and move with the traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dbpool.errors import ConnectionError
from dbpool.pool import Pool
from dbpool.pool.prometheus import register

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample of a scrape, by sample name then sorted labels; and each family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples, types


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())[0]


@pytest.fixture
def pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=2, name="metered") as started:
        started.query("SELECT 1")
        yield started


def test_a_registered_pool_reports_its_series_and_they_move(pool: Pool) -> None:
    registry = CollectorRegistry()
    collector = register(pool, registry=registry)
    before = scrape(registry)
    label = (("pool", "metered"),)
    for _ in range(5):
        pool.query("SELECT 1")
    with pool.checkout() as conn:
        conn.query("SELECT 1")
        during = scrape(registry)
    after, types = parse(generate_latest(registry).decode())

    assert types["dbpool_checkouts"] == "counter"
    assert types["dbpool_queue_wait_seconds"] == "histogram"
    assert types["dbpool_connections"] == "gauge"
    assert after["dbpool_checkouts_total"][label] - before["dbpool_checkouts_total"][label] == 6
    assert during["dbpool_connections"][(("pool", "metered"), ("state", "in_use"))] == 1
    assert after["dbpool_connections"][(("pool", "metered"), ("state", "in_use"))] == 0
    assert after["dbpool_connections"][(("pool", "metered"), ("state", "idle"))] == 2
    assert after["dbpool_pool_size"][label] == 2
    assert after["dbpool_breaker_state"][(("pool", "metered"), ("state", "closed"))] == 1
    assert after["dbpool_breaker_state"][(("pool", "metered"), ("state", "open"))] == 0
    assert after["dbpool_connects_total"][label] >= 2
    assert after["dbpool_connect_seconds_count"][label] >= 2
    assert after["dbpool_connect_seconds_sum"][label] > 0
    assert after["dbpool_usage_seconds_count"][label] - before[
        "dbpool_usage_seconds_count"][label] == 6
    buckets = after["dbpool_queue_wait_seconds_bucket"]
    assert buckets[(("le", "+Inf"), ("pool", "metered"))] == \
        after["dbpool_queue_wait_seconds_count"][label]
    for name in ("queue_timeouts", "codel_drops", "connect_errors", "disconnects",
                 "recycles", "deadlines"):
        assert f"dbpool_{name}_total" in after, name
    registry.unregister(collector)
    assert "dbpool_checkouts_total" not in scrape(registry)


def test_an_open_circuit_and_a_timeout_show(pool: Pool) -> None:
    registry = CollectorRegistry()
    register(pool, registry=registry)
    label = (("pool", "metered"),)
    pool.open_circuit()
    try:
        with pytest.raises(ConnectionError):
            pool.query("SELECT 1")
        opened = scrape(registry)
    finally:
        pool.close_circuit()
    assert opened["dbpool_breaker_state"][(("pool", "metered"), ("state", "open"))] == 1
    assert opened["dbpool_unavailable_total"][label] >= 1
    with pool.checkout(), pool.checkout(), pytest.raises(ConnectionError):
        pool.query("SELECT 1", timeout=0.05)
    assert scrape(registry)["dbpool_queue_timeouts_total"][label] >= 1


def test_a_shared_budget_and_elastic_sizing_show(pg_dsn: str) -> None:
    with Pool.start(pg_dsn, min_size=1, max_size=3, name="budgeted",
                    max_server_connections=2,
                    budget_name=f"prometheus-{id(pg_dsn)}") as budgeted:
        budgeted.query("SELECT 1")
        budgeted.resize(3)  # one more than the budget: it waits for a slot
        registry = CollectorRegistry()
        register(budgeted, registry=registry)
        label = (("pool", "budgeted"),)
        held = (("pool", "budgeted"), ("state", "held"))
        wanting = (("pool", "budgeted"), ("state", "wanting"))
        samples = scrape(registry)
        deadline = time.monotonic() + 10
        while (samples["dbpool_budget_slots"][held], samples["dbpool_budget_slots"][wanting]) \
                != (2, 1):
            assert time.monotonic() < deadline, samples["dbpool_budget_slots"]
            samples = scrape(registry)
        assert samples["dbpool_pool_size"][label] == 3
        assert samples["dbpool_grown_total"][label] == 0
        assert "dbpool_shrunk_total" in samples
