"""Backoff sequences and validation, as DBConnection.Backoff defines them."""

from __future__ import annotations

import random

import pytest

from dbpool.actors import backoff
from dbpool.errors import ConfigurationError


def test_stop_means_no_backoff() -> None:
    assert backoff.new("stop") is None


def test_exp_doubles_from_min_up_to_max_and_reset_starts_over() -> None:
    b = backoff.new("exp", 0.1, 1.0)
    assert b is not None
    assert [b.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.1


def test_rand_stays_within_bounds_and_uses_whole_milliseconds() -> None:
    b = backoff.new("rand", 0.2, 0.3, rng=random.Random(7))
    assert b is not None
    delays = [b.next() for _ in range(200)]
    assert all(0.2 <= d <= 0.3 for d in delays)
    assert all(round(d * 1000) == d * 1000 for d in delays)
    assert len(set(delays)) > 20  # really random, not a constant


def test_rand_exp_follows_decorrelated_jitter_bounds() -> None:
    b = backoff.new("rand_exp", 1.0, 30.0, rng=random.Random(3))
    assert b is not None
    lower = 10_000  # max(min, max div 3) in ms
    prev = 1_000
    for _ in range(100):
        delay = round(b.next() * 1000)
        assert min(prev, lower) <= delay <= min(prev * 3, 30_000)
        prev = delay
    b.reset()
    assert 1_000 <= round(b.next() * 1000) <= 3_000


def test_rand_exp_grows_towards_max() -> None:
    b = backoff.new("rand_exp", 0.01, 10.0, rng=random.Random(1))
    assert b is not None
    delays = [b.next() for _ in range(50)]
    assert max(delays) > 1.0  # left the minimum far behind
    assert max(delays) <= 10.0


def test_defaults_are_one_and_thirty_seconds() -> None:
    b = backoff.new()
    assert b is not None and b.type == "rand_exp" and (b.min, b.max) == (1.0, 30.0)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(None, 0.5, (0.5, 0.5)), (None, 5.0, (1.0, 5.0)), (60.0, None, (60.0, 60.0)),
     (2.0, None, (2.0, 30.0))],
)
def test_one_bound_moves_the_other_default(low: float | None, high: float | None,
                                           expected: tuple[float, float]) -> None:
    b = backoff.new("exp", low, high)
    assert b is not None and (b.min, b.max) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"backoff_type": "linear"}, "unknown backoff_type 'linear'"),
     ({"backoff_min": -1.0, "backoff_max": 1.0}, "minimum -1.0 is not 0 or a positive number"),
     ({"backoff_min": 1.0, "backoff_max": "x"}, "maximum 'x' is not 0 or a positive number"),
     ({"backoff_min": 3.0, "backoff_max": 2.0}, "minimum 3.0 is greater than maximum 2.0")],
)
def test_invalid_options_raise_configuration_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        backoff.new(**kwargs)  # type: ignore[arg-type]
