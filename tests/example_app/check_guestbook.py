"""The guestbook's reads and writes, each test in its own sandbox.

Every test signs entry 1: without the sandbox the second test to do so would
fail on the primary key, and every count would include other tests' rows.
"""

from __future__ import annotations

import app
import pytest

from dbpool.pool.ownership.pytest_plugin import Sandbox


@pytest.mark.parametrize("author", ["ada", "grace", "edsger", "barbara", "ken", "dennis",
                                    "margaret", "alan"])
def test_first_entry(dbpool_sandbox: Sandbox, author: str) -> None:
    assert app.sign(author, "welcome", entry_id=1) == 1
    assert app.entries() == [app.Entry(1, author, "welcome")]
    assert app.count() == 1


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_entries_come_in_order(dbpool_sandbox: Sandbox, n: int) -> None:
    ids = [app.sign("ada", "welcome", entry_id=1)]
    ids += [app.sign("ada", f"note {i}") for i in range(1, n)]
    assert ids == sorted(ids) and len(set(ids)) == n
    assert [entry.id for entry in app.entries()] == ids
    assert app.count() == n


@pytest.mark.parametrize("author", ["ada", "grace"])
def test_entries_by_author(dbpool_sandbox: Sandbox, author: str) -> None:
    app.sign("ada", "welcome", entry_id=1)
    app.sign_all("grace", ["one", "two"])
    expected = {"ada": 1, "grace": 2}[author]
    assert len(app.entries(author)) == expected
    assert {entry.author for entry in app.entries(author)} == {author}
    assert app.count() == 3


def test_committed_batch_stays_in_the_sandbox(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    ids = app.sign_all("ada", ["a", "b", "c"])  # its transaction is a savepoint here
    assert len(ids) == 3
    assert app.db().status() == "idle"
    assert app.count() == 4


def test_the_test_and_the_app_share_the_connection(dbpool_sandbox: Sandbox) -> None:
    dbpool_sandbox.query(
        f"INSERT INTO {app.TABLE} (id, author, body) VALUES (1, 'test', 'seeded')")
    assert app.entries() == [app.Entry(1, "test", "seeded")]
    app.sign("ada", "reply")
    assert dbpool_sandbox.query(f"SELECT count(*) FROM {app.TABLE}").rows == [(2,)]


@pytest.mark.parametrize("batch", [1, 7, 100])
def test_export_streams_every_entry(dbpool_sandbox: Sandbox, batch: int) -> None:
    app.sign("ada", "welcome", entry_id=1)
    app.sign_all("ada", [f"note {i}" for i in range(15)])
    exported = list(app.export(batch))
    assert len(exported) == 16
    assert exported == app.entries()
    assert app.db().status() == "idle"  # the stream's transaction is over


def test_export_many_rows(dbpool_sandbox: Sandbox) -> None:
    app.sign("ada", "welcome", entry_id=1)
    dbpool_sandbox.query(f"INSERT INTO {app.TABLE} (author, body) "
                         "SELECT 'visitor ' || n, 'hi' FROM generate_series(1, 250) AS n")
    exported = list(app.export(batch=64))
    assert [entry.id for entry in exported][:1] == [1]
    assert len(exported) == app.count() == 251
