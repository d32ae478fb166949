"""The ownership manager on real PostgreSQL: a port of db_connection's
``integration_test/ownership/manager_test.exs``.

An Elixir process is a thread (:class:`~tests.support.ownership.Peer`) or an
asyncio task; ``async_no_callers`` is a plain thread, ``Task.async`` a
thread started through ``propagate_callers`` (or a task made by the owner).
Where the Elixir test reads the scripted driver's record, these read what
PostgreSQL shows: ``pg_backend_pid()``, the pool's connection events and
``connection_metrics()``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any

import pytest

from dbpool.errors import ConnectionError
from dbpool.pgdriver import PgDriver
from dbpool.pool import Pool
from dbpool.pool.ownership.owners import CallersThreadPoolExecutor
from tests.support.events import Recorder
from tests.support.ownership import (
    WAIT,
    Gate,
    PeerFactory,
    assert_checked_out,
    backend_alive,
    events_of,
    kind,
    proxies,
    refute_checked_out,
    run_in_thread,
    start_pool,
    terminate_backend,
    wait_for,
)


def me() -> threading.Thread:
    return threading.current_thread()


def owner_re(thread: threading.Thread) -> str:
    """How the ownership log names a thread owner."""
    return re.escape(f"thread {thread.name!r} ({thread.ident})")


# -- modes -----------------------------------------------------------------


def test_requires_explicit_checkout_on_manual_mode(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports manager_test.exs: 'requires explicit checkout on manual mode'."""
    pool, _ = start_pool(pg_dsn, pools)
    refute_checked_out(pool)
    assert pool.ownership_checkout() == "ok"
    assert_checked_out(pool)
    assert pool.ownership_checkin() == "ok"
    refute_checked_out(pool)
    assert pool.ownership_checkin() == "not_found"


def test_does_not_require_explicit_checkout_on_automatic_mode(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'does not require explicit checkout on automatic mode'."""
    pool, _ = start_pool(pg_dsn, pools)
    refute_checked_out(pool)
    assert pool.ownership_mode("auto") == "ok"
    assert_checked_out(pool)
    assert len(proxies(pool)) == 1  # the first use checked one out for this thread


def test_respects_ownership_timeout_on_automatic_mode(
    pg_dsn: str, pools: list[Pool], gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """Ports manager_test.exs: 'respects ownership timeout on automatic mode'.

    The Elixir client sleeps forever on its connection and the ownership
    timeout kills it; here the client waits on the database and the timeout
    cancels its statement, replaces the connection and fails its next call.
    """
    caplog.set_level(logging.WARNING, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools, ownership_timeout=0.3)

    def task() -> tuple[int | None, ConnectionError]:
        refute_checked_out(pool)
        assert pool.ownership_mode("auto") == "ok"
        with pool.checkout() as conn:
            pid = conn.backend_pid
            with pytest.raises(ConnectionError) as info:
                conn.query(gate.sql)  # blocks until the ownership times out
        return pid, info.value

    pid, error = run_in_thread(task)
    assert "timed out because it owned the connection for longer than 0.3s" in str(error)
    assert "timed out because it owned the connection for longer than 0.3s" in caplog.text
    events.wait_count(kind("connected"), 2)
    assert [e.backend_pid for e in events_of(events, "disconnected")] == [pid]
    wait_for(lambda: not backend_alive(pg_dsn, pid or 0))


def test_returns_already_when_already_checked_out(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports manager_test.exs: 'returns {:already, status} when already checked out'."""
    pool, _ = start_pool(pg_dsn, pools)
    assert pool.ownership_checkout() == "ok"
    assert pool.ownership_checkout() == "already_owner"


def test_connection_may_be_shared_with_other_processes(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'connection may be shared with other processes'."""
    pool, _ = start_pool(pg_dsn, pools)
    pool_2, _ = start_pool(pg_dsn, pools)
    parent = me()

    assert run_in_thread(lambda: pool.ownership_allow(parent, me())) == "not_found"

    assert pool.ownership_checkout() == "ok"
    assert pool.ownership_allow(parent, parent) == "already_owner"

    assert pool_2.ownership_checkout() == "ok"
    assert pool_2.ownership_allow(parent, parent, unallow_existing=True) == "ok"
    assert pool_2.ownership_allow(parent, parent) == "already_allowed"

    def child() -> None:
        assert pool.ownership_allow(parent, me()) == "ok"
        assert pool.ownership_allow(parent, me()) == "already_allowed"
        assert pool.ownership_checkin() == "not_owner"

        # Switch the allowance to another pool and back again.
        assert pool_2.ownership_allow(parent, me(), unallow_existing=True) == "ok"
        assert pool_2.ownership_allow(parent, me()) == "already_allowed"
        assert pool.ownership_allow(parent, me(), unallow_existing=True) == "ok"

        grandparent = me()
        assert run_in_thread(lambda: pool.ownership_allow(grandparent, me())) == "ok"

    run_in_thread(child)


def test_owner_that_reallowed_itself_still_releases_its_connection_on_exit(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Follows manager_test.exs: 'connection may be shared with other processes', where
    the owner allows itself on its own connection with ``unallow_existing: true``.

    That leaves the owner listed as merely allowed.  In DBConnection the proxy
    monitors its owner, so the owner's exit still ends the ownership and the
    connection goes back to the pool.
    """
    pool, _ = start_pool(pg_dsn, pools)
    owner = peers("owner")

    def reallow_self() -> tuple[str, str]:
        assert pool.ownership_checkout() == "ok"
        return (pool.ownership_allow(me(), me(), unallow_existing=True),
                pool.ownership_allow(me(), me()))

    assert owner.call(reallow_self) == ("ok", "already_allowed")
    owner.exit()
    # pool_size=1: this needs the connection the ended owner gives back.
    assert pool.ownership_checkout(timeout=3) == "ok"


def test_owner_exit_automatically_checks_the_connection_back_in(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: "owner's crash automatically checks the connection back in".

    A thread cannot be killed: the owner's thread ending is the crash.
    """
    pool, _ = start_pool(pg_dsn, pools)
    allowed = peers("allowed")
    owner = peers("owner")
    assert owner.call(pool.ownership_checkout) == "ok"
    assert owner.call(lambda: pool.ownership_allow(owner.thread, allowed.thread)) == "ok"
    pid = allowed.call(lambda: assert_checked_out(pool))

    owner.exit()

    # pool_size=1: this waits for the connection the ended owner gives back.
    assert pool.ownership_checkout(timeout=5) == "ok"
    assert assert_checked_out(pool) == pid  # given back, not replaced
    allowed.call(lambda: refute_checked_out(pool))


def test_owner_task_crash_checks_the_connection_back_in(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: "owner's crash automatically checks the connection back in",
    with an asyncio task as the owner that crashes."""
    pool, _ = start_pool(pg_dsn, pools)

    async def owner() -> None:
        assert pool.ownership_checkout() == "ok"
        assert (await pool.aquery("SELECT 1")).rows == [(1,)]
        raise RuntimeError("crash")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="crash"):
            await asyncio.create_task(owner())

    asyncio.run(main())
    assert pool.ownership_checkout(timeout=5) == "ok"
    assert_checked_out(pool)


def test_owner_checkin_automatically_revokes_allowed_access(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: "owner's checkin automatically revokes allowed access"."""
    pool, _ = start_pool(pg_dsn, pools)
    parent = me()
    owner = peers("owner")

    def checkout_allow_checkin() -> None:
        assert pool.ownership_checkout() == "ok"
        assert pool.ownership_allow(me(), parent) == "ok"
        assert_checked_out(pool, caller=parent)
        assert pool.ownership_checkin() == "ok"

    owner.call(checkout_allow_checkin)  # the owner lives on (:timer.sleep(:infinity))
    refute_checked_out(pool)


def test_owner_checkout_automatically_with_caller_option(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: "owner's checkout automatically with caller option"."""
    pool, _ = start_pool(pg_dsn, pools)
    parent = me()

    assert pool.ownership_mode("manual") == "ok"
    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)
    assert run_in_thread(lambda: assert_checked_out(pool, caller=parent)) == pid

    assert pool.ownership_mode(("shared", parent)) == "ok"
    assert run_in_thread(lambda: assert_checked_out(pool, caller=parent)) == pid

    assert pool.ownership_mode("auto") == "ok"
    assert pool.ownership_checkout() == "ok"
    assert run_in_thread(lambda: assert_checked_out(pool, caller=parent)) == pid
    assert assert_checked_out(pool, caller=parent) == pid


def test_automatically_allows_caller_with_caller_option(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'automatically allows caller process with caller option'."""
    pool, _ = start_pool(pg_dsn, pools)
    parent = me()

    assert pool.ownership_mode("manual") == "ok"
    run_in_thread(lambda: refute_checked_out(pool, caller=parent))

    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)
    assert pool.ownership_mode(("shared", parent)) == "ok"

    def untracked_fn() -> tuple[int, int]:
        untracked = me()
        theirs = run_in_thread(lambda: assert_checked_out(pool, caller=untracked))
        return theirs, assert_checked_out(pool)

    assert run_in_thread(untracked_fn) == (pid, pid)

    assert pool.ownership_checkin() == "ok"
    assert pool.ownership_mode("auto") == "ok"
    run_in_thread(lambda: assert_checked_out(pool, caller=parent))
    # The thread's call checked a connection out for the caller, the parent.
    [entry] = proxies(pool)
    assert entry["owner"] == f"thread {parent.name!r} ({parent.ident})"
    assert_checked_out(pool, caller=parent)


def test_setting_mode_checks_in_previous_connections(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: 'setting mode checks in previous connections'."""
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")
    task = peers("task")
    pid = task.call(lambda: assert_checked_out(pool))
    assert len(proxies(pool)) == 1

    assert pool.ownership_mode("manual") == "ok"
    task.call(lambda: refute_checked_out(pool))
    assert proxies(pool) == []
    # Checked in, not dropped: the same session serves the next owner.
    assert pool.ownership_checkout(timeout=5) == "ok"
    assert assert_checked_out(pool) == pid
    assert events_of(events, "disconnected") == []


def test_setting_mode_checks_in_previous_connections_even_during_checkout(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory, gate: Gate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ports manager_test.exs: 'setting mode checks in previous connections even during
    checkout'.  The connection in use is taken from its client and replaced."""
    caplog.set_level(logging.DEBUG, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools, ownership_mode="auto")
    task = peers("task")
    assert task.call(pool.ownership_checkout) == "ok"
    in_use: list[int | None] = []
    started = threading.Event()

    def use() -> None:
        with pool.checkout() as conn:
            in_use.append(conn.backend_pid)
            started.set()
            conn.query(gate.sql)  # :checked_out, then Process.sleep(:infinity)

    running = task.send(use)
    assert started.wait(WAIT)
    wait_for(gate.waiting)

    assert pool.ownership_mode("manual") == "ok"
    assert pool.ownership_checkout(timeout=5) == "ok"

    with pytest.raises(ConnectionError, match="checked in the connection owned by"):
        running.result(WAIT)
    new_pid = assert_checked_out(pool)
    assert new_pid != in_use[0]
    assert [e.backend_pid for e in events_of(events, "disconnected")] == in_use
    assert re.search(
        f"{owner_re(me())} checked in the connection owned by {owner_re(task.thread)}",
        caplog.text)


def test_lookup_by_owner_does_not_wait_for_the_manager(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: 'uses ETS when the pool is named (with pid access)'.

    DBConnection's callers find their proxy in the manager's ETS table, not
    by a message.  Here the manager is kept busy (in another owner's
    pre_checkin, which it runs) while the owner and an allowed thread use
    their connection: that works only if their lookup needs no message.
    """
    pool, _ = start_pool(pg_dsn, pools, size=2)
    parent = me()
    entered, release = threading.Event(), threading.Event()

    def busy_pre_checkin(reason: Any, driver: Any, state: Any) -> tuple[Any, Any]:
        entered.set()
        release.wait(WAIT)
        return driver, state

    blocker = peers("blocker")
    assert blocker.call(lambda: pool.ownership_checkout(pre_checkin=busy_pre_checkin)) == "ok"
    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)
    task = peers("task")
    assert task.call(lambda: pool.ownership_allow(parent, me())) == "ok"

    checkin = blocker.send(pool.ownership_checkin)
    try:
        assert entered.wait(WAIT)  # the manager is inside busy_pre_checkin
        assert task.call(lambda: assert_checked_out(pool)) == pid
        assert run_in_thread(lambda: assert_checked_out(pool, caller=parent)) == pid
        assert not checkin.done()
    finally:
        release.set()
    assert checkin.result(WAIT) == "ok"

    assert pool.ownership_checkin() == "ok"
    task.call(lambda: refute_checked_out(pool))


# Ports manager_test.exs: 'uses ETS when the pool is named (with named access)'.
# Not ported: dbpool has no registry of pool names; a Pool handle is the only way
# to reach a pool, so "by name" and "by pid" are the same test (above).  That the
# pool's name shows in its errors is tested below ('includes label ...').


# -- the callers chain ---------------------------------------------------------


def test_performs_callers_checkout_on_manual_mode(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports manager_test.exs: 'performs callers checkout on manual mode' (threads)."""
    pool, _ = start_pool(pg_dsn, pools)
    assert pool.ownership_mode("manual") == "ok"
    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)

    def child() -> tuple[int, int]:
        mine = assert_checked_out(pool)
        return mine, run_in_thread(lambda: assert_checked_out(pool), callers=True)

    assert run_in_thread(child, callers=True) == (pid, pid)
    with CallersThreadPoolExecutor(max_workers=1) as executor:
        assert executor.submit(assert_checked_out, pool).result(WAIT) == pid
    # Without the chain (async_no_callers), the same call finds nothing.
    run_in_thread(lambda: refute_checked_out(pool))


def test_performs_callers_checkout_on_manual_mode_with_tasks(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'performs callers checkout on manual mode' (asyncio tasks
    inherit the chain of the task that made them)."""
    pool, _ = start_pool(pg_dsn, pools)

    async def pid_of_caller() -> int:
        pid: int = (await pool.aquery("SELECT pg_backend_pid()")).rows[0][0]
        return pid

    async def child() -> tuple[int, int]:
        return await pid_of_caller(), await asyncio.create_task(pid_of_caller())

    async def owner() -> tuple[int, tuple[int, int]]:
        assert pool.ownership_checkout() == "ok"
        return await pid_of_caller(), await asyncio.create_task(child())

    mine, (theirs, nested) = asyncio.run(owner())
    assert mine == theirs == nested


def test_performs_callers_checkout_on_manual_mode_through_allowance(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'performs callers checkout on manual mode through allowance'."""
    pool, _ = start_pool(pg_dsn, pools)
    assert pool.ownership_mode("manual") == "ok"
    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)
    parent = me()

    def allowed() -> tuple[int, int]:
        assert pool.ownership_allow(parent, me()) == "ok"
        mine = assert_checked_out(pool)
        return mine, run_in_thread(lambda: assert_checked_out(pool), callers=True)

    assert run_in_thread(allowed) == (pid, pid)


def test_does_not_perform_callers_checkout_on_auto_mode(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'does not perform callers checkout on auto mode'.

    The Elixir test proves it by a second connect in the driver's record; here
    the child's session is another backend than the parent's.
    """
    pool, _ = start_pool(pg_dsn, pools, size=2, ownership_mode="auto")

    def parent(conn: Any) -> tuple[int, int]:
        mine: int = conn.query("SELECT pg_backend_pid()").rows[0][0]
        return mine, run_in_thread(lambda: assert_checked_out(pool), callers=True)

    mine, theirs = pool.run(parent)
    assert mine != theirs
    wait_for(lambda: len(proxies(pool)) == 1)  # the child's ownership ended with it


# -- shared mode ---------------------------------------------------------------


def test_does_not_require_explicit_checkout_on_shared_mode(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'does not require explicit checkout on shared mode'."""
    pool, _ = start_pool(pg_dsn, pools)
    parent = me()

    # Cannot share if not owner.
    assert pool.ownership_mode(("shared", parent)) == "not_found"

    # Check out but do not share yet.
    assert pool.ownership_checkout() == "ok"
    pid = assert_checked_out(pool)
    run_in_thread(lambda: refute_checked_out(pool))

    # Cannot change the mode from an allowed thread either.
    def allowed() -> None:
        assert pool.ownership_allow(parent, me()) == "ok"
        assert pool.ownership_mode(("shared", me())) == "not_owner"

    run_in_thread(allowed)

    # Finally enable shared mode.
    assert pool.ownership_mode(("shared", parent)) == "ok"
    assert run_in_thread(lambda: assert_checked_out(pool)) == pid


def test_shared_mode_checks_in_previous_connections(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: 'shared mode checks in previous connections'."""
    pool, events = start_pool(pg_dsn, pools, size=2)
    task = peers("task")
    assert task.call(pool.ownership_checkout) == "ok"
    task.call(lambda: assert_checked_out(pool))

    assert pool.ownership_checkout() == "ok"
    assert pool.ownership_mode(("shared", me())) == "ok"
    [entry] = proxies(pool)  # the task's ownership was checked in
    assert entry["owner"].startswith("thread 'MainThread'")
    assert pool.ownership_checkin() == "ok"
    error = task.call(lambda: refute_checked_out(pool))
    assert "mode 'manual'" in str(error)  # shared mode ended with its owner's checkin
    assert events_of(events, "disconnected") == []


def test_shared_mode_can_be_set_back_to_manual(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: 'shared mode can be set back to manual'."""
    pool, _ = start_pool(pg_dsn, pools)
    owner = peers("owner")
    assert owner.call(pool.ownership_checkout) == "ok"
    assert owner.call(lambda: pool.ownership_mode(("shared", me()))) == "ok"

    assert_checked_out(pool)
    assert pool.ownership_mode("manual") == "ok"
    refute_checked_out(pool)
    assert pool.ownership_checkout(timeout=5) == "ok"  # pool_size=1: it was checked in


def test_shared_mode_automatically_rolls_back_to_manual_on_owner_exit(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: 'shared mode automatically rolls back to manual on owner
    crash' (the owner thread ends)."""
    pool, _ = start_pool(pg_dsn, pools)
    task = peers("task")
    assert task.call(pool.ownership_checkout) == "ok"
    assert task.call(lambda: pool.ownership_mode(("shared", me()))) == "ok"
    assert pool.ownership_mode(("shared", me())) == "already_shared"

    task.exit()
    # The Elixir test traces the manager's :DOWN; the connection coming back
    # to the pool is the last thing the manager does about the exit.
    wait_for(lambda: pool.connection_metrics()[0]["ready_conn_count"] == 1)

    error = refute_checked_out(pool)
    assert "mode 'manual'" in str(error)
    assert pool.ownership_checkout() == "ok"
    assert pool.ownership_mode(("shared", me())) == "ok"


def test_shared_mode_is_not_permanent(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: 'shared mode is not permanent'."""
    pool, _ = start_pool(pg_dsn, pools)
    assert pool.ownership_checkout() == "ok"
    assert pool.ownership_mode(("shared", me())) == "ok"
    task = peers("task")
    task.call(lambda: assert_checked_out(pool))
    assert pool.ownership_mode("manual") == "ok"
    task.call(lambda: refute_checked_out(pool))


# -- callbacks -----------------------------------------------------------------


@pytest.mark.parametrize("given_to", ["ownership_checkout", "pool"])
def test_allows_post_checkout_callback(
    pg_dsn: str, pools: list[Pool], given_to: str
) -> None:
    """Ports manager_test.exs: 'allows post_checkout callback' (given to the checkout, or
    as the pool's option)."""
    seen: Recorder[tuple[Any, Any]] = Recorder()

    def post_checkout(driver: Any, state: Any) -> tuple[Any, Any]:
        seen((driver, state))
        return driver, state

    options: dict[str, Any] = {"post_checkout": post_checkout}
    if given_to == "pool":
        pool, _ = start_pool(pg_dsn, pools, **options)
        assert pool.ownership_checkout() == "ok"
    else:
        pool, _ = start_pool(pg_dsn, pools)
        assert pool.ownership_checkout(**options) == "ok"
    pid = assert_checked_out(pool)
    [(driver, state)] = seen.values()
    assert isinstance(driver, PgDriver)  # the pool's own driver and session
    assert state.backend_pid == pid


def test_allows_pre_checkin_callback(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports manager_test.exs: 'allows pre_checkin callback'."""
    pool, events = start_pool(pg_dsn, pools)
    seen: Recorder[tuple[Any, Any, Any]] = Recorder()

    def pre_checkin(reason: Any, driver: Any, state: Any) -> tuple[Any, Any]:
        seen((reason, driver, state))
        return driver, state

    assert pool.ownership_checkout(pre_checkin=pre_checkin) == "ok"
    pid = assert_checked_out(pool)
    assert seen.values() == []
    assert pool.ownership_checkin() == "ok"
    [(reason, driver, state)] = seen.values()
    assert reason == "checkin"
    assert isinstance(driver, PgDriver)
    assert state.backend_pid == pid
    assert events_of(events, "disconnected") == []


class Wrapper:
    """A driver standing in for the pool's (as the sandbox's does): it records the calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr):
            self.calls.append(name)
        return attr


class Unknown:
    """A driver with no callbacks at all: Elixir's ``Unknown`` module."""


def test_allows_connection_to_be_replaced_on_post_checkout_pre_checkin(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'allows connection to be replaced on post_checkout/
    pre_checkin', with a working replacement: the owner's calls go through it, and
    pre_checkin gives the pool its own driver back."""
    pool, events = start_pool(pg_dsn, pools)
    wrappers: list[Wrapper] = []
    seen: Recorder[tuple[Any, Any]] = Recorder()

    def post_checkout(driver: Any, state: Any) -> tuple[Any, Any]:
        wrappers.append(Wrapper(driver))
        return wrappers[-1], state

    def pre_checkin(reason: Any, driver: Any, state: Any) -> tuple[Any, Any]:
        seen((reason, driver))
        return driver.inner, state

    assert pool.ownership_checkout(post_checkout=post_checkout, pre_checkin=pre_checkin) == "ok"
    assert_checked_out(pool)
    [wrapper] = wrappers
    assert "handle_execute" in wrapper.calls
    assert pool.ownership_checkin() == "ok"
    assert seen.values() == [("checkin", wrapper)]

    # The pool's connection is back with its own driver.
    calls = len(wrapper.calls)
    assert pool.ownership_checkout() == "ok"
    assert_checked_out(pool)
    assert len(wrapper.calls) == calls
    assert events_of(events, "disconnected") == []


def test_connection_replaced_by_unusable_driver_is_dropped_and_reconnected(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: 'allows connection to be replaced on post_checkout/
    pre_checkin', as written: post_checkout swaps in ``Unknown``, whose every callback
    is missing.

    The owner's use fails with the driver's error (Elixir: UndefinedFunctionError for
    ``Unknown.handle_status/2``); pre_checkin then sees the connection leave (Elixir:
    ``{:stop, _}``; dbpool's name for it is ``("disconnect", error)``) and hands back
    the pool's driver; the connection is replaced and the pool serves again.
    """
    pool, events = start_pool(pg_dsn, pools)
    posts: Recorder[tuple[Any, int]] = Recorder()
    pres: Recorder[tuple[Any, Any]] = Recorder()

    def post_checkout(driver: Any, state: Any) -> tuple[Any, Any]:
        posts((driver, state.backend_pid))
        return Unknown(), state

    def pre_checkin(reason: Any, driver: Any, state: Any) -> tuple[Any, Any]:
        pres((reason, driver))
        return posts.values()[0][0], state

    # The driver's error shows at the checkout (dbpool checks the status when the
    # checkout gives the connection back) or else at the first use.
    with pytest.raises(AttributeError, match="Unknown"):
        pool.ownership_checkout(post_checkout=post_checkout, pre_checkin=pre_checkin, timeout=2)
        pool.run(lambda conn: None, timeout=2)
    _ = pool.ownership_checkin()

    [(reason, driver), *_] = pres.wait_count(lambda _: True, 1)
    assert isinstance(driver, Unknown)
    assert reason[0] == "disconnect" and isinstance(reason[1], AttributeError)
    first_pid = posts.values()[0][1]
    events.wait_until(lambda values: any(
        e.kind == "disconnected" and e.backend_pid == first_pid for e in values))
    assert pool.ownership_checkout(timeout=2) == "ok"
    assert assert_checked_out(pool) not in {pid for _, pid in posts.values()}


def test_disconnects_on_bad_post_checkout(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    """Ports manager_test.exs: 'disconnects on bad post_checkout'."""
    caplog.set_level(logging.ERROR, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools)
    posts: Recorder[int] = Recorder()

    def post_checkout(driver: Any, state: Any) -> tuple[Any, Any]:
        posts(state.backend_pid)
        raise RuntimeError("oops")

    with pytest.raises(RuntimeError, match="oops"):
        pool.ownership_checkout(post_checkout=post_checkout)
    assert pool.ownership_checkin() == "not_found"
    [pid] = posts.values()
    events.wait_count(kind("connected"), 2)  # :reconnected
    assert [e.backend_pid for e in events_of(events, "disconnected")] == [pid]
    assert "disconnected: post_checkout raised RuntimeError: oops" in caplog.text


def test_disconnects_on_bad_pre_checkin(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    """Ports manager_test.exs: 'disconnects on bad pre_checkin'."""
    caplog.set_level(logging.ERROR, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools)
    reasons: Recorder[Any] = Recorder()

    def pre_checkin(reason: Any, driver: Any, state: Any) -> tuple[Any, Any]:
        reasons(reason)
        raise RuntimeError("oops")

    assert pool.ownership_checkout(pre_checkin=pre_checkin) == "ok"
    pid = assert_checked_out(pool)
    assert pool.ownership_checkin() == "ok"
    assert reasons.values() == ["checkin"]
    events.wait_count(kind("connected"), 2)
    assert [e.backend_pid for e in events_of(events, "disconnected")] == [pid]
    assert "disconnected: pre_checkin raised RuntimeError: oops" in caplog.text


def test_disconnects_on_bad_pre_checkin_on_disconnect(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    """Ports manager_test.exs: 'disconnects on bad pre_checkin on disconnect'.

    The scripted driver's ``{:disconnect, ...}`` is a session terminated on
    the server.
    """
    caplog.set_level(logging.ERROR, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools)
    reasons: Recorder[Any] = Recorder()

    def pre_checkin(reason: Any, driver: Any, state: Any) -> tuple[Any, Any]:
        reasons(reason)
        raise RuntimeError("oops")

    assert pool.ownership_checkout(pre_checkin=pre_checkin) == "ok"
    pid = assert_checked_out(pool)
    terminate_backend(pg_dsn, pid)
    wait_for(lambda: not backend_alive(pg_dsn, pid))
    with pytest.raises(ConnectionError, match="connection lost"):
        pool.run(lambda conn: conn.query("SELECT 1"))
    _ = pool.ownership_checkin()

    [reason] = reasons.wait_count(lambda _: True, 1)
    assert reason[0] == "disconnect"
    events.wait_count(kind("connected"), 2)
    assert "disconnected: pre_checkin raised RuntimeError: oops" in caplog.text
    assert pool.ownership_checkout(timeout=5) == "ok"
    assert assert_checked_out(pool) != pid


class BadReturn(Wrapper):
    """A driver whose statements answer with a value no driver may return."""

    def handle_execute(self, *args: Any) -> Any:
        return "oops"


def test_bad_pre_checkin_after_a_driver_failure(
    pg_dsn: str, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    """Ports manager_test.exs: 'stops on bad pre_checkin on stop'.

    dbpool has no ``{:stop, err}``: a connection whose driver misbehaved
    (Elixir: ``bad return value: :oops``) is dropped and replaced, and its
    actor lives on.  pre_checkin sees ``("disconnect", error)``; when it
    raises, the connection is still replaced and the pool keeps serving.
    """
    caplog.set_level(logging.ERROR, logger="dbpool.ownership")
    pool, events = start_pool(pg_dsn, pools)
    reasons: Recorder[Any] = Recorder()

    def pre_checkin(reason: Any, driver: Any, state: Any) -> tuple[Any, Any]:
        reasons(reason)
        raise RuntimeError("oops")

    assert pool.ownership_checkout(
        post_checkout=lambda driver, state: (BadReturn(driver), state),
        pre_checkin=pre_checkin) == "ok"
    with pytest.raises(ConnectionError, match="bad return value: 'oops'"):
        pool.run(lambda conn: conn.query("SELECT 1"))
    _ = pool.ownership_checkin()

    [reason] = reasons.wait_count(lambda _: True, 1)
    assert reason[0] == "disconnect"
    assert "bad return value" in str(reason[1])
    events.wait_count(kind("connected"), 2)
    assert "disconnected: pre_checkin raised RuntimeError: oops" in caplog.text
    assert pool.alive
    assert pool.ownership_checkout(timeout=5) == "ok"
    assert_checked_out(pool)


# -- errors ----------------------------------------------------------------------


def test_includes_pool_name_in_ownership_error(pg_dsn: str, pools: list[Pool]) -> None:
    """Ports manager_test.exs: 'includes label in ownership error when label is provided'.

    BEAM process labels have no analogue: the pool's ``name`` is its label.
    """
    pool, _ = start_pool(pg_dsn, pools, name="TestRepo")
    error = refute_checked_out(pool)
    assert str(error).startswith("TestRepo: cannot find an owned connection")
    assert "using ownership mode 'manual'" in str(error)


def test_unallow_existing_cleans_up_old_owner_so_its_exit_does_not_revoke_the_allowance(
    pg_dsn: str, pools: list[Pool], peers: PeerFactory
) -> None:
    """Ports manager_test.exs: "unallow_existing cleans up old owner so its exit doesn't
    revoke the new allowance"."""
    pool, _ = start_pool(pg_dsn, pools, size=2)
    worker = peers("worker")

    owner_a = peers("owner_a")
    assert owner_a.call(pool.ownership_checkout) == "ok"
    assert owner_a.call(lambda: pool.ownership_allow(me(), worker.thread)) == "ok"

    owner_b = peers("owner_b")
    assert owner_b.call(pool.ownership_checkout) == "ok"
    assert owner_b.call(
        lambda: pool.ownership_allow(me(), worker.thread, unallow_existing=True)) == "ok"
    pid_b = owner_b.call(lambda: assert_checked_out(pool))
    assert assert_checked_out(pool, caller=worker.thread) == pid_b

    owner_a.exit()
    wait_for(lambda: len(proxies(pool)) == 1)  # the manager has handled owner_a's exit

    assert assert_checked_out(pool, caller=worker.thread) == pid_b
    assert worker.call(lambda: assert_checked_out(pool)) == pid_b


def test_does_not_require_a_name_to_produce_an_ownership_error(
    pg_dsn: str, pools: list[Pool]
) -> None:
    """Ports manager_test.exs: "doesn't require a label to produce an ownership error"."""
    pool, _ = start_pool(pg_dsn, pools)
    error = refute_checked_out(pool)
    assert "cannot find an owned connection" in str(error)
    assert "using ownership mode 'manual'" in str(error)
