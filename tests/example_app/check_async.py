"""Async code under test: the test's tasks share its sandbox."""

from __future__ import annotations

import asyncio

import app
import psycopg
import pytest

from dbpool.pool.ownership.pytest_plugin import AsyncSandbox

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
async def test_concurrent_signing(dbpool_async_sandbox: AsyncSandbox, n: int) -> None:
    app.sign("ada", "welcome", entry_id=1)
    ids = await app.asign_all("grace", [f"note {i}" for i in range(n)])
    assert len(set(ids)) == n
    assert await app.acount("grace") == n
    assert await app.acount("ada") == 1
    rows = await dbpool_async_sandbox.query(f"SELECT count(*) FROM {app.TABLE}")
    assert rows.rows == [(n + 1,)]


async def test_tasks_created_by_the_test(dbpool_async_sandbox: AsyncSandbox) -> None:
    await dbpool_async_sandbox.query(
        f"INSERT INTO {app.TABLE} (id, author, body) VALUES (1, 'ada', 'welcome')")
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(app.asign("grace", f"note {i}")) for i in range(4)]
    assert len({task.result() for task in tasks}) == 4
    assert await app.acount("grace") == 4


async def test_blocking_call_on_a_worker_thread(dbpool_async_sandbox: AsyncSandbox) -> None:
    assert await asyncio.to_thread(app.sign, "ada", "welcome", entry_id=1) == 1
    await app.asign("ada", "and hello")
    assert await asyncio.to_thread(app.count) == 2


async def test_one_failed_task_leaves_the_others(dbpool_async_sandbox: AsyncSandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    outcomes = await asyncio.gather(*(app.asign("grace", body) for body in ["a", "", "c"]),
                                    return_exceptions=True)
    assert isinstance(outcomes[1], psycopg.errors.CheckViolation)
    assert await app.acount("grace") == 2
    assert await app.db().astatus() == "idle"


async def test_failed_async_transaction(dbpool_async_sandbox: AsyncSandbox) -> None:
    await dbpool_async_sandbox.query(
        f"INSERT INTO {app.TABLE} (id, author, body) VALUES (1, 'ada', 'welcome')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        async with app.db().atransaction() as conn:
            await conn.query(f"INSERT INTO {app.TABLE} (author, body) VALUES ('grace', 'hi')")
            await conn.query(f"INSERT INTO {app.TABLE} (id, author, body) "
                             "SELECT id, author, body FROM " + app.TABLE)
    assert await app.acount("grace") == 0
    assert await app.acount("ada") == 1
