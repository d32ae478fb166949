"""PgConnection's wait polls for an answer that comes soon (dbpool.spin).

Whether a thread slept is read from psycopg: every wait PgConnection does not
poll out itself reaches psycopg's ``waiting.wait``, which sleeps on the
socket.  (The kernel's count of a thread's sleeps would not do: when the
scheduler puts the client and its PostgreSQL backend on one CPU, the answer
is there before the client looks, and a client that would sleep does not.)
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import Any

import psycopg
import psycopg.waiting
import pytest

from dbpool.client import Client
from dbpool.errors import ConfigurationError
from dbpool.pgdriver import PgDriver, PgState
from dbpool.pool import Pool, PoolOptions
from dbpool.spin import CLIENT_SPIN, DEFAULT_SPIN

driver = PgDriver()
#: Far above a loopback round trip, even on a loaded 2-core machine: the tests
#: must not depend on how fast this machine answers.
SPIN = 0.01


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], object]], int]:
    """``sleeps(work)``: how many waits of the calling thread went to psycopg's
    waiting (its sleeps on the socket) while ``work`` ran."""
    handed: Counter[int] = Counter()
    real_wait = psycopg.waiting.wait

    def counting_wait(gen: Generator[Any, Any, Any], fileno: int, *args: Any,
                      **kwargs: Any) -> Any:
        def counted() -> Generator[Any, Any, Any]:
            try:
                wait = next(gen)
                while True:
                    handed[threading.get_ident()] += 1
                    wait = gen.send((yield wait))
            except StopIteration as stop:
                return stop.value

        return real_wait(counted(), fileno, *args, **kwargs)

    monkeypatch.setattr(psycopg.waiting, "wait", counting_wait)

    def count(work: Callable[[], object]) -> int:
        me = threading.get_ident()
        before = handed[me]
        work()
        return handed[me] - before

    return count


def _selects(state: PgState, n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            state.cursor.execute("SELECT 1")
            assert state.cursor.fetchall() == [(1,)]
    return run


@pytest.fixture
def connect(pg_dsn: str) -> Iterator[Callable[[float], PgState]]:
    states: list[PgState] = []

    def make(spin: float) -> PgState:
        state = driver.connect({"conninfo": pg_dsn, "pool_index": 0, "spin": spin})
        states.append(state)
        return state

    yield make
    for state in states:
        driver.disconnect(None, state)


def _wait_until_running(pg_dsn: str, pid: int) -> None:
    """Until PostgreSQL shows backend ``pid`` running a statement (bounded)."""
    deadline = time.monotonic() + 10
    with psycopg.connect(pg_dsn, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            row = watcher.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                  [pid]).fetchone()
            if row is not None and row[0] == "active":
                return
    raise AssertionError(f"backend {pid} never ran its statement")


def test_a_lone_thread_polls_for_its_answers_and_without_spin_sleeps_for_each(
    connect: Callable[[float], PgState], sleeps: Callable[[Callable[[], object]], int],
) -> None:
    assert sleeps(_selects(connect(0.0), 200)) >= 200
    assert sleeps(_selects(connect(SPIN), 200)) <= 10  # an answer later than 3 x SPIN


def test_a_thread_sleeps_while_another_thread_waits_on_the_database(
    connect: Callable[[float], PgState], pg_dsn: str,
    sleeps: Callable[[Callable[[], object]], int],
) -> None:
    long, short = connect(SPIN), connect(SPIN)
    failed: list[BaseException] = []

    def sleep_in_the_database() -> None:
        try:
            long.cursor.execute("SELECT pg_sleep(30)")
        except psycopg.errors.QueryCanceled:
            pass
        except BaseException as error:
            failed.append(error)

    waiter = threading.Thread(target=sleep_in_the_database)
    waiter.start()
    try:
        _wait_until_running(pg_dsn, long.conn.info.backend_pid)
        slept = sleeps(_selects(short, 100))
    finally:
        long.conn.cancel_safe()
        waiter.join(10)
    assert not failed
    assert slept >= 100, slept


def test_a_thread_sleeps_right_after_another_thread_waited_then_polls_again(
    connect: Callable[[float], PgState], sleeps: Callable[[Callable[[], object]], int],
) -> None:
    # A wide window (3 x 0.1 s): the other thread's wait ends well inside it.
    other, mine = connect(0.1), connect(0.1)
    worker = threading.Thread(target=_selects(other, 1))
    worker.start()
    worker.join()
    assert sleeps(_selects(mine, 1)) >= 1  # the other thread waited just now
    assert sleeps(_selects(mine, 20)) == 0  # now the last one to wait was this thread


def test_a_statement_too_big_to_send_at_once_runs_while_polled_for(
    connect: Callable[[float], PgState], sleeps: Callable[[Callable[[], object]], int],
) -> None:
    state = connect(SPIN)
    big = "x" * 20_000_000  # far more than a socket buffer: psycopg waits to write
    state.cursor.execute("SELECT length(%s)", [big])
    assert state.cursor.fetchall() == [(len(big),)]
    _selects(state, 20)()  # the average, raised by the big one, falls again
    # and the statements after it are polled for as before:
    assert sleeps(_selects(state, 20)) == 0


def test_long_round_trips_turn_polling_off_until_short_ones_bring_the_average_down(
    connect: Callable[[float], PgState], sleeps: Callable[[Callable[[], object]], int],
) -> None:
    state = connect(SPIN)
    state.cursor.execute("SELECT pg_sleep(0.1)")  # the average: a quarter of 0.1 s
    # 0.025, then about 0.019, 0.014 and 0.011 s: each above SPIN, so each sleeps.
    assert sleeps(_selects(state, 4)) >= 4
    _selects(state, 20)()  # the average falls far below SPIN
    assert sleeps(_selects(state, 100)) <= 5


def test_a_thread_polling_for_its_answer_is_woken_by_an_interrupt(
    connect: Callable[[float], PgState], pg_dsn: str,
) -> None:
    state = connect(1.0)  # polls for up to 3 s: the interrupt must end it sooner
    raised: list[BaseException] = []
    ended = threading.Event()

    def sleep_in_the_database() -> None:
        try:
            state.cursor.execute("SELECT pg_sleep(30)")
        except BaseException as error:
            raised.append(error)
        ended.set()

    waiter = threading.Thread(target=sleep_in_the_database)
    waiter.start()
    _wait_until_running(pg_dsn, state.conn.info.backend_pid)
    driver.interrupt(state)  # what a deadline revoke does to a stuck holder
    assert ended.wait(2.0), "still polling after the interrupt"
    waiter.join()
    assert len(raised) == 1 and isinstance(raised[0], psycopg.OperationalError), raised


def test_the_pool_option_reaches_its_connections(
    pg_dsn: str, sleeps: Callable[[Callable[[], object]], int],
) -> None:
    def run(pool: Pool) -> Callable[[], None]:
        def queries() -> None:
            with pool.checkout() as conn:
                for _ in range(200):
                    conn.query("SELECT 1")
        return queries

    polling = Pool.start(pg_dsn, pool_size=1, spin=SPIN, name="spin-on")
    sleeping = Pool.start(pg_dsn, pool_size=1, spin=0, name="spin-off")
    try:
        polled, slept = sleeps(run(polling)), sleeps(run(sleeping))
    finally:
        polling.stop()
        sleeping.stop()
    assert slept >= 200, slept
    assert polled <= 10, polled


@pytest.mark.parametrize("spin", [-0.001, 1.5, "0.1", None, True])
def test_a_spin_out_of_range_or_not_a_number_is_refused(spin: object) -> None:
    with pytest.raises(ConfigurationError, match="spin"):
        PoolOptions(spin=spin)  # type: ignore[arg-type]


def test_spin_defaults_below_the_remote_clients_and_zero_is_allowed() -> None:
    # The client's round trip crosses the server too: it polls up to a longer one.
    assert PoolOptions().spin == DEFAULT_SPIN < CLIENT_SPIN
    assert inspect.signature(Client).parameters["spin"].default == CLIENT_SPIN
    assert PoolOptions(spin=0).spin == 0
