"""The library's test configuration: dbpool's SQL sandbox under the app's SQLAlchemy engine.

Every test takes ``dbpool_sandbox``: its thread owns a connection of the
app's pool inside a transaction rolled back at teardown, and the app's
engine (``dbpool.dbapi.sqlalchemy.create_engine``) makes each session's
transaction a savepoint in it.  Tests therefore see only their own rows,
also under ``pytest -n``.

Every test starts by cataloguing :data:`LE_GUIN` with author id 1 (the
``le_guin`` fixture), so that without the sandbox the second test to do so
would fail on the primary key.  Making it each test's first write also keeps
parallel tests from deadlocking: one holding that key runs to its end while
the others wait for its rollback, holding nothing yet.

The plugin is enabled by ``-p dbpool.pool.ownership.pytest_plugin`` in this suite's
pytest.ini rather than by ``pytest_plugins`` here: this conftest sits below
the repository's own test directory, whose collection imports it too, and
pytest refuses ``pytest_plugins`` in a conftest that is not top-level.

``EXAMPLE_SA_APP_DSN`` names the server (the local one by default).
``EXAMPLE_SA_APP_NO_SANDBOX=1`` is a negative control for dbpool's own tests:
the sandbox fixture then gives a plain owned connection, whose writes commit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import app
import pytest

from dbpool.pool import OwnershipPool
from dbpool.pool.ownership.pytest_plugin import Sandbox

DSN = os.environ.get("EXAMPLE_SA_APP_DSN",
                     "host=127.0.0.1 port=5432 user=postgres dbname=postgres")

#: The author every test catalogues first, as author 1, and their books.
LE_GUIN = ("Ursula K. Le Guin", ("The Dispossessed", "The Left Hand of Darkness"))


@pytest.fixture(scope="session")
def dbpool_pool() -> Iterator[OwnershipPool]:
    """The app's pool, started for testing: the sandbox fixtures use it."""
    pool = app.start(DSN, testing=True)
    try:
        assert isinstance(pool, OwnershipPool)
        # The schema must outlive the tests: create it on a plain owned connection.
        pool.ownership_checkout()
        try:
            app.create_schema()
        finally:
            pool.ownership_checkin()
        yield pool
    finally:
        app.stop()


@pytest.fixture
def le_guin(dbpool_sandbox: Sandbox) -> int:
    """Author 1, with two books: each test's first write (see the module docstring)."""
    name, titles = LE_GUIN
    return app.add_author(name, titles, author_id=1)


if os.environ.get("EXAMPLE_SA_APP_NO_SANDBOX") == "1":

    @pytest.fixture
    def dbpool_sandbox(dbpool_pool: OwnershipPool) -> Iterator[Sandbox]:
        owner = threading.current_thread()
        dbpool_pool.ownership_checkout(owner)
        try:
            yield Sandbox(dbpool_pool, owner)
        finally:
            dbpool_pool.ownership_checkin(owner)
