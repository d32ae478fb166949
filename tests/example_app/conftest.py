"""The guestbook's test configuration: dbpool's SQL sandbox on the app's own pool.

Every test that takes ``dbpool_sandbox`` (or ``dbpool_async_sandbox``) runs
on a connection of the app's pool inside a transaction that is rolled back
at teardown, so tests see only their own rows, also under ``pytest -n``.

The plugin is enabled by ``-p dbpool.pool.ownership.pytest_plugin`` in this suite's
pytest.ini rather than by ``pytest_plugins`` here: this conftest sits below
the repository's own test directory, whose collection imports it too, and
pytest refuses ``pytest_plugins`` in a conftest that is not top-level.

``EXAMPLE_APP_DSN`` names the server (the local one by default).
``EXAMPLE_APP_NO_SANDBOX=1`` is a negative control for dbpool's own tests:
the sandbox fixtures then give plain connections, whose writes commit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import app
import pytest

from dbpool.pool import Pool
from dbpool.pool.ownership.pytest_plugin import AsyncSandbox, Sandbox

DSN = os.environ.get("EXAMPLE_APP_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


@pytest.fixture(scope="session")
def dbpool_pool() -> Iterator[Pool]:
    """The app's pool, started for testing: the sandbox fixtures use it."""
    pool = app.start(DSN, testing=True)
    try:
        # The schema must outlive the tests: create it on a plain owned connection.
        pool.ownership_checkout()
        try:
            app.create_schema()
        finally:
            pool.ownership_checkin()
        yield pool
    finally:
        app.stop()


if os.environ.get("EXAMPLE_APP_NO_SANDBOX") == "1":

    def _unsandboxed(pool: Pool) -> Iterator[threading.Thread]:
        owner = threading.current_thread()
        pool.ownership_checkout(owner)
        try:
            yield owner
        finally:
            pool.ownership_checkin(owner)

    @pytest.fixture
    def dbpool_sandbox(dbpool_pool: Pool) -> Iterator[Sandbox]:
        for owner in _unsandboxed(dbpool_pool):
            yield Sandbox(dbpool_pool, owner)

    @pytest.fixture
    def dbpool_async_sandbox(dbpool_pool: Pool) -> Iterator[AsyncSandbox]:
        for owner in _unsandboxed(dbpool_pool):
            yield AsyncSandbox(dbpool_pool, owner)
