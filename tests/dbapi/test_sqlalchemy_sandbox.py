"""SQLAlchemy sessions under dbpool's SQL sandbox (dbpool.dbapi.sqlalchemy on an ownership pool).

- The acceptance test: the library example (tests/example_sqlalchemy_app, an
  ORM application with two related tables, 46 tests that all write them)
  runs under pytest-xdist and passes, and leaves its tables empty; without
  the sandbox the same tests fail and leave rows behind (the negative control).
- The mechanism, in-process: on a sandboxed connection SQLAlchemy's commit
  is a savepoint released into the sandbox's transaction (seen inside, not
  committed), its rollback returns to where its transaction began, a thread's
  session sees the test's rows, and the connection goes back still in the
  sandbox.  The lender's transaction calls on a plain pool are psycopg's.
"""

from __future__ import annotations

import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import Engine, String, func, insert, select, text  # noqa: E402
from sqlalchemy.exc import IntegrityError  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from dbpool.dbapi.lending import Lender  # noqa: E402
from dbpool.dbapi.sqlalchemy import create_engine  # noqa: E402
from dbpool.pool import OwnershipPool, Pool  # noqa: E402
from dbpool.pool.ownership import sandbox  # noqa: E402
from dbpool.pool.ownership.owners import propagate_callers  # noqa: E402
from tests.support import examples  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "example_sqlalchemy_app"
#: The example's tests (check_*.py).
EXAMPLE_TESTS = 46
SUFFIX = uuid.uuid4().hex[:8]


def committed_count(dsn: str, table: str) -> int:
    """The rows of ``table`` that another connection sees."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


# -- the example application's suite -------------------------------------------


@pytest.fixture
def example_prefix(pg_dsn: str) -> Iterator[str]:
    """A table prefix of the example's own; the tables its run creates are dropped after."""
    prefix = f"library_{uuid.uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {prefix}_books, {prefix}_authors")


def run_example_suite(
    dsn: str, prefix: str, *args: str, sandboxed: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the example's suite on ``dsn`` (see :func:`tests.support.examples.run_example_suite`)."""
    return examples.run_example_suite(EXAMPLE, "EXAMPLE_SA_APP_", {"DSN": dsn, "PREFIX": prefix},
                                      *args, sandboxed=sandboxed)


@pytest.mark.timeout(120)
def test_the_sqlalchemy_example_passes_in_parallel_and_leaves_its_tables_empty(
    pg_dsn: str, example_prefix: str
) -> None:
    result = run_example_suite(pg_dsn, example_prefix, "-n", "4")
    output = result.stdout + result.stderr
    for table in (f"{example_prefix}_authors", f"{example_prefix}_books"):
        # Every write was rolled back, whatever else happened; and the tests did
        # write (they drew ids, which a rollback does not give back).
        assert committed_count(pg_dsn, table) == 0, output
        assert examples.identity_used(pg_dsn, table), output
    assert result.returncode == 0, output
    assert re.search(r"\b4 workers\b", output), output
    assert re.search(rf"\b{EXAMPLE_TESTS} passed\b", output), output


@pytest.mark.timeout(120)
def test_without_the_sandbox_the_sqlalchemy_example_fails_and_leaves_rows(
    pg_dsn: str, example_prefix: str
) -> None:
    # The negative control: the same tests on plain owned connections, one process.
    # The first to catalogue author 1 commits it; the others then collide with it.
    result = run_example_suite(pg_dsn, example_prefix, "check_catalogue.py",
                               "-k", "add_author_with_books", sandboxed=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert re.search(r"\b1 passed, 13 deselected, 3 errors\b", output), output
    assert "UniqueViolation" in output
    assert committed_count(pg_dsn, f"{example_prefix}_authors") == 2  # author 1 and Butler
    assert committed_count(pg_dsn, f"{example_prefix}_books") == 2


# -- the mechanism ----------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = f"sa_sandbox_note_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(50), unique=True)


@pytest.fixture(scope="module")
def pool(pg_dsn: str) -> Iterator[OwnershipPool]:
    started = Pool.start(pg_dsn, pool="ownership", ownership_mode="manual", pool_size=2,
                         name=f"sa-sandbox-{SUFFIX}")
    assert isinstance(started, OwnershipPool)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def notes(pg_dsn: str) -> Iterator[str]:
    """Note's table, committed and empty; dropped afterwards."""
    admin = sqlalchemy.create_engine("postgresql+psycopg://", poolclass=NullPool,
                                     creator=lambda: psycopg.connect(pg_dsn))
    Base.metadata.create_all(admin)
    try:
        yield Note.__tablename__
    finally:
        Base.metadata.drop_all(admin)
        admin.dispose()


@pytest.fixture
def sandboxed(pool: OwnershipPool, notes: str) -> Iterator[OwnershipPool]:
    """``pool``, with a sandbox checked out for this thread (checked in afterwards).

    It takes ``notes`` so as to be torn down first: dropping the table waits for
    the sandbox's transaction, which holds locks on it.
    """
    assert sandbox.checkout(pool) == "ok"
    try:
        yield pool
    finally:
        assert sandbox.checkin(pool) == "ok"


@pytest.fixture
def engine(sandboxed: OwnershipPool) -> Iterator[Engine]:
    engine = create_engine(sandboxed)
    yield engine
    engine.dispose()


def bodies(session: Session) -> list[str]:
    return list(session.scalars(select(Note.body).order_by(Note.id)))


def txid(pool: Pool) -> int:
    """The id of the server transaction the sandbox runs in."""
    return int(pool.query("SELECT txid_current()").rows[0][0])


def test_a_commit_is_kept_in_the_sandbox_and_not_committed(
    pg_dsn: str, sandboxed: OwnershipPool, engine: Engine, notes: str
) -> None:
    before = txid(sandboxed)
    with Session(engine) as session:
        session.add_all([Note(id=1, body="one"), Note(id=2, body="two")])
        session.commit()
    with Session(engine) as session:
        assert bodies(session) == ["one", "two"]  # kept, for the test's next sessions...
    assert committed_count(pg_dsn, notes) == 0  # ...but not committed
    assert txid(sandboxed) == before  # still the sandbox's one transaction
    assert sandboxed.status() == "idle"


def test_a_rollback_returns_to_where_its_transaction_began(
    pg_dsn: str, engine: Engine, notes: str
) -> None:
    with Session(engine) as session:
        session.add(Note(id=1, body="kept"))
        session.commit()
        session.add(Note(id=2, body="flushed"))
        session.flush()
        assert bodies(session) == ["kept", "flushed"]
        session.rollback()
        assert bodies(session) == ["kept"]
        session.add(Note(id=3, body="kept"))  # a duplicate: the flush fails...
        with pytest.raises(IntegrityError, match="UniqueViolation"):
            session.flush()
        session.rollback()  # ...and the rollback leaves the session usable
        session.add(Note(id=3, body="after"))
        session.commit()
        assert bodies(session) == ["kept", "after"]
    with engine.connect() as conn:  # a rollback on a connection that stays open
        conn.execute(insert(Note).values(id=4, body="undone"))
        conn.rollback()
        assert conn.execute(select(Note.body).order_by(Note.id)).scalars().all() == [
            "kept", "after"]
    assert committed_count(pg_dsn, notes) == 0


def test_a_savepoint_nests_in_the_sessions_transaction(engine: Engine) -> None:
    with Session(engine) as session:
        session.add(Note(id=1, body="outer"))
        with session.begin_nested():
            session.add(Note(id=2, body="kept"))
        nested = session.begin_nested()
        session.add(Note(id=3, body="undone"))
        session.flush()
        nested.rollback()
        session.commit()
        assert bodies(session) == ["outer", "kept"]


def test_a_threads_session_sees_the_tests_uncommitted_rows(
    pg_dsn: str, sandboxed: OwnershipPool, engine: Engine, notes: str
) -> None:
    with Session(engine) as session:
        session.add(Note(id=1, body="from the test"))
        session.commit()
    seen: list[list[str]] = []

    def work() -> None:
        with Session(engine) as session:
            seen.append(bodies(session))
            session.add(Note(id=2, body="from the thread"))
            session.commit()

    thread = threading.Thread(target=propagate_callers(work))
    thread.start()
    thread.join(timeout=30)
    assert seen == [["from the test"]]
    with Session(engine) as session:
        assert bodies(session) == ["from the test", "from the thread"]
    assert committed_count(pg_dsn, notes) == 0


def test_a_commit_after_a_failed_statement_rolls_back_as_postgresql_does(
    sandboxed: OwnershipPool, engine: Engine
) -> None:
    before = txid(sandboxed)
    with engine.begin() as conn:
        conn.execute(insert(Note).values(id=1, body="kept"))
    with engine.begin() as conn:  # commits at the end of the block
        conn.execute(insert(Note).values(id=2, body="lost"))
        with pytest.raises(IntegrityError):
            conn.execute(insert(Note).values(id=1, body="duplicate"))
    with engine.connect() as conn:
        assert conn.execute(select(Note.body)).scalars().all() == ["kept"]
    assert txid(sandboxed) == before


@pytest.mark.parametrize("reset", ["rollback", None])
def test_the_connection_goes_back_in_the_sandbox(
    sandboxed: OwnershipPool, notes: str, reset: str | None
) -> None:
    # With reset None SQLAlchemy closes without rolling back: dbpool's checkin does.
    engine = create_engine(sandboxed, pool_reset_on_return=reset)
    before = txid(sandboxed)
    conn = engine.connect()
    raw = conn.connection.dbapi_connection
    assert isinstance(raw, psycopg.Connection)
    conn.execute(insert(Note).values(id=1, body="committed"))
    conn.commit()
    conn.execute(insert(Note).values(id=2, body="left open"))
    conn.close()
    assert raw.autocommit is True  # dbpool's own mode, which the sandbox never left
    assert raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS  # the sandbox's
    assert sandboxed.status() == "idle"
    assert sandboxed.query(f"SELECT body FROM {notes}").rows == [("committed",)]
    assert txid(sandboxed) == before
    with Session(engine) as session:  # and the next checkout's transactions work
        session.add(Note(id=2, body="later"))
        session.commit()
        assert bodies(session) == ["committed", "later"]


def test_transaction_settings_are_the_sandboxs(engine: Engine,
                                              sandboxed: OwnershipPool) -> None:
    repeatable = create_engine(sandboxed, isolation_level="REPEATABLE READ")
    with Session(repeatable) as session:  # the setting is ignored: the sandbox has begun
        session.add(Note(id=1, body="one"))
        session.commit()
        assert session.scalar(text("SHOW transaction_isolation")) == "read committed"
    with engine.connect() as conn:
        conn = conn.execution_options(postgresql_readonly=True)
        assert conn.execute(select(func.count(Note.id))).scalar() == 1
    with engine.connect() as conn, pytest.raises(psycopg.NotSupportedError, match="AUTOCOMMIT"):
        conn.execution_options(isolation_level="AUTOCOMMIT")


def test_the_lenders_transactions_on_a_plain_pool_are_psycopgs(
    pg_dsn: str, notes: str
) -> None:
    with Pool.start(pg_dsn, pool_size=1, name=f"sa-plain-{SUFFIX}") as plain:
        lender = Lender(plain)
        raw: Any = lender.lend()
        try:
            assert not lender.sandboxed(raw)
            assert raw.autocommit is True  # lent in dbpool's mode
            lender.begin(raw)  # an explicit BEGIN
            raw.execute(f"INSERT INTO {notes} VALUES (1, 'committed')")
            assert committed_count(pg_dsn, notes) == 0
            lender.commit(raw)
            assert committed_count(pg_dsn, notes) == 1
            lender.begin(raw)
            raw.execute(f"INSERT INTO {notes} VALUES (2, 'rolled back')")
            lender.rollback(raw)
            assert raw.execute(f"SELECT id FROM {notes}").fetchall() == [(1,)]
            raw.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            raw.read_only = True
            lender.begin(raw)  # with the connection's modes, as psycopg would
            assert raw.execute("SHOW transaction_isolation").fetchone() == ("serializable",)
            assert raw.execute("SHOW transaction_read_only").fetchone() == ("on",)
            lender.rollback(raw)
            raw.isolation_level = raw.read_only = None
            lender.begin(raw)
            raw.execute(f"INSERT INTO {notes} VALUES (3, 'given back open')")
        finally:  # also when an assertion failed: the table's drop would wait for it
            lender.give_back(raw)
        assert raw.autocommit is True
    assert committed_count(pg_dsn, notes) == 1


def test_dbapi_connections_in_the_sandbox_commit_into_it(
    sandboxed: OwnershipPool, notes: str, pg_dsn: str
) -> None:
    from dbpool import dbapi

    conn = dbapi.connect(pool=sandboxed)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {notes} VALUES (1, 'kept')")
    conn.commit()  # a savepoint released into the sandbox's transaction
    cur.execute(f"INSERT INTO {notes} VALUES (2, 'undone')")
    conn.rollback()
    with pytest.raises(dbapi.IntegrityError):
        cur.execute(f"INSERT INTO {notes} VALUES (1, 'again')")
    conn.commit()  # of a failed transaction: rolled back, as PostgreSQL's COMMIT
    cur.execute(f"SELECT body FROM {notes} ORDER BY id")
    assert cur.fetchall() == [("kept",)]  # the test sees its rows
    conn.close()
    assert committed_count(pg_dsn, notes) == 0  # nothing committed
