"""CoDel's judgement (dbpool.pool.codel), on a clock the test moves by hand.

The pool's checkout queue and the service's queue of remote requests both
judge with it; these pin its rules down: the first dequeue of an interval is
served and closes the last interval; a queue whose least wait stayed above
the target for a whole interval is slow, and a slow queue drops waiters
older than twice the target; a poll drops them all when the queue made no
progress since the last poll.
"""

from __future__ import annotations

from dbpool.pool.codel import Codel

TARGET, INTERVAL = 0.05, 1.0


def test_a_fast_queue_serves_everyone() -> None:
    codel = Codel(TARGET, INTERVAL, now=0.0)
    assert codel.serve(0.0, since=0.0)  # the first interval's head
    for step in range(1, 40):
        now = step * 0.1
        assert codel.serve(now, since=now - 0.01)  # 10 ms waits: under the target
    assert not codel.slow


def test_waits_above_the_target_for_an_interval_make_it_slow_and_late_waiters_go() -> None:
    codel = Codel(TARGET, INTERVAL, now=0.0)
    assert codel.serve(0.0, since=-0.2)  # the head of an interval is served, however late
    assert codel.serve(0.5, since=0.3)   # 200 ms: late, but the queue is not slow yet
    assert codel.serve(1.0, since=0.9)   # a new interval: the last one's least wait was 200 ms
    assert codel.slow
    assert not codel.serve(1.2, since=1.05)  # 150 ms > 2 x target: dropped
    assert codel.serve(1.2, since=1.11)      # 90 ms: served


def test_one_short_wait_in_an_interval_keeps_it_from_being_slow() -> None:
    codel = Codel(TARGET, INTERVAL, now=0.0)
    codel.serve(0.0, since=-0.2)
    codel.serve(0.5, since=0.49)  # 10 ms: the interval's least wait
    codel.serve(1.0, since=0.8)
    assert not codel.slow
    assert codel.serve(1.5, since=1.2)  # 300 ms, served: the queue is not slow


def test_an_empty_queue_starts_the_next_interval_fresh() -> None:
    codel = Codel(TARGET, INTERVAL, now=0.0)
    codel.serve(0.0, since=-0.3)
    codel.empty(0.5)  # it caught up
    codel.serve(1.0, since=0.7)
    assert not codel.slow


def test_a_stuck_slow_queue_is_cut_back_by_the_poll() -> None:
    codel = Codel(TARGET, INTERVAL, now=0.0)
    codel.serve(0.0, since=-0.5)
    codel.serve(0.5, since=0.0)
    assert codel.poll(0.6, head_since=0.1) is None  # a new head since the last look
    # The same head as at the last poll (no progress), the interval over, and its
    # least wait 500 ms: everyone older than twice the target goes.
    cutoff = codel.poll(1.2, head_since=0.1)
    assert cutoff is not None and abs(cutoff - (1.2 - 2 * TARGET)) < 1e-9
    assert codel.poll(1.3, head_since=1.15) is None  # progress: nothing to drop
    assert codel.poll(1.4, head_since=None) is None  # empty: nothing to drop


def test_a_queue_served_in_turns_is_judged_by_its_longest_wait() -> None:
    # Clients taken in turn: a client with a short line is served 10 ms after it
    # asked while another's requests have waited 300 ms.  Judged by the requests
    # served, the queue would look fast; by the longest wait, it is slow.
    codel = Codel(TARGET, INTERVAL, now=0.0)
    codel.serve(0.0, since=-0.3, oldest=-0.3)
    for step in range(1, 10):
        now = step * 0.1
        assert codel.serve(now, since=now - 0.01, oldest=now - 0.3)
    codel.serve(1.0, since=0.99, oldest=0.7)
    assert codel.slow
    assert not codel.serve(1.1, since=0.9, oldest=0.9)  # 200 ms: dropped
