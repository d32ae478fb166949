"""The app's failures roll back what they must, and the test carries on in its sandbox."""

from __future__ import annotations

import app
import psycopg
import pytest

from dbpool.errors import RolledBack
from dbpool.pool.ownership.pytest_plugin import AsyncSandbox, Sandbox


@pytest.mark.parametrize("blank_at", [0, 1, 2])
def test_blank_body_refuses_the_whole_batch(dbpool_sandbox: Sandbox, blank_at: int) -> None:
    app.sign("ada", "welcome", entry_id=1)
    bodies = ["one", "two", "three"]
    bodies[blank_at] = ""
    with pytest.raises(psycopg.errors.CheckViolation):
        app.sign_all("ada", bodies)
    assert app.count() == 1
    app.sign("ada", "still here")
    assert app.count() == 2


def test_quota_refuses_the_batch(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    with pytest.raises(app.QuotaExceeded):
        app.sign_all("ada", [f"note {i}" for i in range(app.QUOTA)])
    assert app.count() == 1
    app.sign_all("ada", [f"note {i}" for i in range(app.QUOTA - 1)])
    assert app.count() == app.QUOTA


def test_failed_batch_keeps_an_earlier_one(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    app.sign_all("ada", ["one", "two", "three"])
    with pytest.raises(psycopg.errors.CheckViolation):
        app.sign_all("ada", ["four", ""])
    assert [entry.body for entry in app.entries()] == ["welcome", "one", "two", "three"]


def test_duplicate_id_outside_a_transaction(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    with pytest.raises(psycopg.errors.UniqueViolation):
        app.sign("grace", "me first", entry_id=1)
    assert app.entries() == [app.Entry(1, "ada", "welcome")]
    app.sign("grace", "after you")
    assert app.count() == 2


def test_bad_statement_outside_a_transaction(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    with pytest.raises(psycopg.errors.SyntaxError):
        dbpool_sandbox.query("SELEC 1")
    assert app.db().status() == "idle"
    assert app.count() == 1


def test_failed_statement_inside_the_app_transaction(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    with pytest.raises(psycopg.errors.UniqueViolation), app.db().transaction() as conn:
        conn.query(f"INSERT INTO {app.TABLE} (author, body) VALUES ('grace', 'hi')")
        conn.query(f"INSERT INTO {app.TABLE} (id, author, body) VALUES (1, 'grace', 'again')")
    assert app.db().status() == "idle"
    assert app.entries() == [app.Entry(1, "ada", "welcome")]


def test_explicit_rollback(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    with pytest.raises(RolledBack), app.db().transaction() as conn:
        conn.query(f"DELETE FROM {app.TABLE}")
        conn.rollback("changed my mind")
    assert app.count() == 1


@pytest.mark.asyncio
async def test_async_quota_refuses_one_entry(dbpool_async_sandbox: AsyncSandbox) -> None:
    await dbpool_async_sandbox.query(
        f"INSERT INTO {app.TABLE} (id, author, body) VALUES (1, 'ada', 'welcome')")
    await app.asign_all("ada", [f"note {i}" for i in range(app.QUOTA - 1)])
    with pytest.raises(app.QuotaExceeded):
        await app.asign("ada", "one too many")
    assert await app.acount("ada") == app.QUOTA
    assert await app.db().astatus() == "idle"
