"""Work the app does on other threads lands in the test's sandbox."""

from __future__ import annotations

import threading

import app
import psycopg
import pytest

from dbpool.errors import OwnershipError
from dbpool.pool.ownership.owners import propagate_callers
from dbpool.pool.ownership.pytest_plugin import Sandbox


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_import_on_an_executor(dbpool_sandbox: Sandbox, workers: int) -> None:
    app.sign("ada", "welcome", entry_id=1)
    ids = app.import_entries("ada", [f"imported {i}" for i in range(12)], workers=workers)
    assert len(set(ids)) == 12
    assert app.count() == 13


def test_failed_import_keeps_the_other_entries(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    with pytest.raises(psycopg.errors.CheckViolation):
        app.import_entries("ada", ["one", "", "three", "four"], workers=2)
    assert sorted(entry.body for entry in app.entries()) == ["four", "one", "three", "welcome"]


def test_thread_started_with_propagate_callers(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    ids: list[int] = []

    def work() -> None:
        ids.append(app.sign("grace", "from a thread"))

    thread = threading.Thread(target=propagate_callers(work))
    thread.start()
    thread.join()
    assert len(ids) == 1
    assert app.entries("grace") == [app.Entry(ids[0], "grace", "from a thread")]
    assert app.count() == 2


@pytest.mark.parametrize("posts", [1, 3, 5])
def test_allowed_inbox(dbpool_sandbox: Sandbox, posts: int) -> None:
    app.sign("ada", "welcome", entry_id=1)
    inbox = app.Inbox()
    inbox.start()
    try:
        assert dbpool_sandbox.allow(inbox) == "ok"
        futures = [inbox.post("grace", f"post {i}") for i in range(posts)]
        ids = [future.result(timeout=10) for future in futures]
    finally:
        inbox.close()
    assert [entry.id for entry in app.entries("grace")] == ids
    assert app.count() == posts + 1


def test_inbox_not_allowed_is_refused(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    inbox = app.Inbox()
    inbox.start()
    try:
        refused = inbox.post("grace", "sneaky").exception(timeout=10)
    finally:
        inbox.close()
    assert isinstance(refused, OwnershipError)
    assert app.count() == 1
