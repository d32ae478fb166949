"""Collect events from listeners and telemetry, and wait on them without sleeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Recorder(Generic[T]):
    """A callable that records what it is called with; tests wait on the record."""

    def __init__(self) -> None:
        self.items: list[tuple[float, T]] = []
        self._cond = threading.Condition()

    def __call__(self, item: T) -> None:
        with self._cond:
            self.items.append((time.monotonic(), item))
            self._cond.notify_all()

    def values(self) -> list[T]:
        with self._cond:
            return [item for _, item in self.items]

    def wait_until(self, predicate: Callable[[list[T]], bool], timeout: float = 5.0) -> list[T]:
        """Block until ``predicate(values)`` holds; fail the test on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate([item for _, item in self.items]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting; recorded: {self.items!r}")
                self._cond.wait(remaining)
            return [item for _, item in self.items]

    def wait_count(self, match: Callable[[T], bool], count: int, timeout: float = 5.0) -> list[T]:
        """Wait until ``count`` recorded items match; return the matching ones."""
        values = self.wait_until(lambda vs: sum(1 for v in vs if match(v)) >= count, timeout)
        return [v for v in values if match(v)]

    def times(self, match: Callable[[T], bool]) -> list[float]:
        with self._cond:
            return [t for t, item in self.items if match(item)]


def kind(name: str) -> Callable[[Any], bool]:
    """Match connection events of one kind ("connected", "disconnected")."""
    return lambda event: getattr(event, "kind", None) == name


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; fail
    after ``timeout`` seconds, naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)
