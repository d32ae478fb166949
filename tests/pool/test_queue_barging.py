"""Bounded barging in the checkout queue, on a clock the test moves.

While the longest waiter has waited less than the barge window, a checkin
leaves its slot idle for a caller already running; once the head has waited
the window out, checkins are its, and a timer hands over what barging left
idle.  The pool's default window is half its CoDel ``queue_target``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import dbpool.pool.queue as queue_module
from dbpool.actors.slot import Slot
from dbpool.pool.options import PoolOptions
from dbpool.pool.queue import CheckoutQueue

WINDOW = 0.025


class Clock:
    """``time.monotonic`` as the test sets it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(queue_module, "time", clock)
    return clock


class Timers:
    """The queue's ``call_later``: timers the test fires."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], object]]] = []

    def __call__(self, delay: float, callback: Callable[[], object]) -> None:
        self.pending.append((delay, callback))

    def fire(self) -> list[float]:
        fired, self.pending = self.pending, []
        for _, callback in fired:
            callback()
        return [delay for delay, _ in fired]


def lent(queue: CheckoutQueue, index: int) -> Slot:
    """A slot that was put in the queue and taken out again: lent now."""
    slot = Slot(index, None)
    assert queue.put(slot)
    taken = queue.try_get()
    assert taken is slot
    return slot


def waiter(queue: CheckoutQueue) -> list[Any]:
    """A queued waiter; the list receives the slot (or error) it is served."""
    served: list[Any] = []
    queue.wait(lambda slot, error: served.append(slot if error is None else error))
    return served


@pytest.fixture
def timers() -> Timers:
    return Timers()


def checked_in_while_waiting(clock: Clock, timers: Timers, after: float
                             ) -> tuple[CheckoutQueue, Slot, list[Any]]:
    """A queue whose one slot is checked in ``after`` seconds into a waiter's wait,
    inside the window: the waiter is not served at once."""
    queue = CheckoutQueue(barge_window=WINDOW, call_later=timers)
    slot = lent(queue, 0)
    served = waiter(queue)
    clock.now += after
    queue.put(slot)
    assert served == []
    return queue, slot, served


def test_within_the_window_a_checkin_is_left_for_a_running_caller(
    clock: Clock, timers: Timers
) -> None:
    queue, slot, served = checked_in_while_waiting(clock, timers, WINDOW / 2)
    assert queue.try_get() is slot  # the running caller takes it...
    assert served == []  # ...and the waiter sleeps on
    assert timers.pending and timers.pending[0][0] == WINDOW


def test_past_the_window_checkins_go_to_the_longest_waiter(
    clock: Clock, timers: Timers
) -> None:
    queue = CheckoutQueue(barge_window=WINDOW, call_later=timers)
    slot = lent(queue, 0)
    first, second = waiter(queue), waiter(queue)
    clock.now += WINDOW + 0.001
    queue.put(slot)
    assert first == [slot] and second == []
    assert queue.try_get() is None  # no barging past a waiter that waited the window out


def test_a_slot_nobody_barged_for_goes_to_the_waiter_when_the_timer_fires(
    clock: Clock, timers: Timers
) -> None:
    queue, slot, served = checked_in_while_waiting(clock, timers, 0.001)
    clock.now += WINDOW
    assert timers.fire() == [WINDOW]
    assert served == [slot]
    assert queue.try_get() is None


def test_a_zero_window_is_strict_fifo(clock: Clock, timers: Timers) -> None:
    queue = CheckoutQueue(barge_window=0.0, call_later=timers)
    slot = lent(queue, 0)
    served = waiter(queue)
    queue.put(slot)
    assert served == [slot]
    assert queue.try_get() is None


def test_the_default_window_is_half_the_queue_target() -> None:
    assert PoolOptions().barge_seconds == PoolOptions().queue_target / 2 == 0.025
    assert PoolOptions(queue_target=0.2).barge_seconds == 0.1
    assert PoolOptions(barge_window=0).barge_seconds == 0
    assert PoolOptions(barge_window=0.01, queue_target=0.2).barge_seconds == 0.01


def test_a_waiter_queued_first_is_served_before_those_already_waiting(clock: Clock) -> None:
    # The connection budget's reservation borrows this way (dbpool.pool.budget): it is
    # served by the next checkin, yet does not move the queue's longest wait, and
    # CoDel, which drops the others, leaves it be.
    queue = CheckoutQueue(barge_window=0.0, target=0.01, interval=0.05)
    slot = lent(queue, 0)
    earlier = waiter(queue)
    clock.now += 0.1
    first: list[Any] = []
    queue.wait(lambda slot, error: first.append(slot if error is None else error), first=True)
    assert queue.longest_wait(clock.now) == pytest.approx(0.1)
    for _ in range(3):
        clock.now += 0.06
        queue.poll()
    assert first == [] and len(earlier) == 1 and isinstance(earlier[0], Exception)
    queue.put(slot)
    assert first == [slot]
