"""A pytest plugin: every test in its own transaction, rolled back at teardown.

This is Ecto's SQL Sandbox for applications that use dbpool.  Enable it
with ``pytest -p dbpool.pool.ownership.pytest_plugin``, or in a ``conftest.py``::

    pytest_plugins = ["dbpool.pool.ownership.pytest_plugin"]

Fixtures:

- ``dbpool_pool`` (session scope): the ownership pool the sandbox uses.  By
  default it is started from ``--dbpool-dsn``, else ``$DBPOOL_DSN``, else the
  embedded PostgreSQL, with ``pool="ownership"`` and
  ``ownership_mode="manual"``.  Override it in your ``conftest.py`` to return
  your application's own pool, started with those two options under test.
- ``dbpool_sandbox``: the test's sandboxed connection, owned by the test's
  thread from setup to teardown; yields a :class:`Sandbox`.
- ``dbpool_async_sandbox``: the same for async tests (pytest-asyncio,
  anyio, or ``asyncio.run`` inside a test); yields an :class:`AsyncSandbox`.

What sees the sandbox:

- every call on the pool from the test's thread, and from asyncio tasks
  running on it or created by it;
- other threads the test allows (``sandbox.allow(thread)``), or starts with
  :func:`~dbpool.pool.ownership.owners.propagate_callers` or a
  :class:`~dbpool.pool.ownership.owners.CallersThreadPoolExecutor`;
- SQLAlchemy sessions on :func:`dbpool.dbapi.sqlalchemy.create_engine` of
  the pool, in the test's thread and in those threads: their commits and
  rollbacks are savepoints in the test's transaction (see
  :mod:`dbpool.dbapi.sqlalchemy.engine`).

With pytest-xdist every worker process has its own pool and every test its
own transaction, so parallel tests never see each other's writes.  Two
tests that write the same unique key still wait for each other's rollback,
as any two transactions would.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from dbpool.driver import Params, Result
from dbpool.pool import Pool
from dbpool.pool.ownership import sandbox
from dbpool.pool.ownership.owners import Owner
from dbpool.pool.ownership.pool import OwnershipPool

__all__ = ["AsyncSandbox", "Sandbox"]


@dataclass(frozen=True)
class Sandbox:
    """A test's sandboxed connection: calls on :attr:`pool` from its thread use it."""

    pool: OwnershipPool
    owner: Owner

    def query(self, sql: str, params: Params = None) -> Result:
        """Run one statement in the sandbox."""
        return self.pool.query(sql, params, caller=self.owner)

    def allow(self, other: Owner) -> str:
        """Let another thread or task use the sandbox."""
        return self.pool.ownership_allow(self.owner, other)


@dataclass(frozen=True)
class AsyncSandbox:
    """:class:`Sandbox` for async tests: the calls are awaitables."""

    pool: OwnershipPool
    owner: Owner

    async def query(self, sql: str, params: Params = None) -> Result:
        """Run one statement in the sandbox."""
        return await self.pool.aquery(sql, params, caller=self.owner)

    def allow(self, other: Owner) -> str:
        """Let another thread or task use the sandbox."""
        return self.pool.ownership_allow(self.owner, other)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dbpool", "dbpool SQL sandbox")
    group.addoption("--dbpool-dsn", default=None,
                    help="PostgreSQL conninfo for the default dbpool_pool fixture "
                         "(default: $DBPOOL_DSN, else the embedded PostgreSQL)")


@pytest.fixture(scope="session")
def dbpool_pool(request: pytest.FixtureRequest) -> Iterator[OwnershipPool]:
    """The ownership pool the sandbox fixtures use (override it to use your own)."""
    dsn = request.config.getoption("dbpool_dsn") or os.environ.get("DBPOOL_DSN")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    pool = Pool.start(dsn, pool="ownership", ownership_mode="manual", pool_size=2,
                      name=f"dbpool-sandbox-{worker}")
    try:
        yield pool
    finally:
        pool.stop()


def _sandboxed(pool: OwnershipPool) -> Iterator[Any]:
    """Check out a sandbox for the test's thread; yield its owner; roll it back."""
    if not isinstance(pool, OwnershipPool):
        raise pytest.UsageError(
            f"dbpool_pool must return an ownership pool (Pool.start(..., pool='ownership')), "
            f"got {pool!r}")
    owner = threading.current_thread()
    answer = sandbox.checkout(pool, owner)
    if answer != "ok":
        raise pytest.UsageError(
            f"the test's thread already has a connection of {pool.name!r} ({answer}); "
            "check it in before using the dbpool sandbox fixtures")
    try:
        yield owner
    finally:
        sandbox.checkin(pool, owner)


@pytest.fixture
def dbpool_sandbox(dbpool_pool: OwnershipPool) -> Iterator[Sandbox]:
    """This test's connection, inside a transaction rolled back at teardown."""
    for owner in _sandboxed(dbpool_pool):
        yield Sandbox(dbpool_pool, owner)


@pytest.fixture
def dbpool_async_sandbox(dbpool_pool: OwnershipPool) -> Iterator[AsyncSandbox]:
    """:func:`dbpool_sandbox` for async tests.

    The owner is the test's thread, which runs the test's event loop: the
    test's tasks use the sandbox through it.
    """
    for owner in _sandboxed(dbpool_pool):
        yield AsyncSandbox(dbpool_pool, owner)
