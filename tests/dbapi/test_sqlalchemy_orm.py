"""SQLAlchemy on dbpool, both ways (issue 19).

- ``in-process``: SQLAlchemy's own postgresql+psycopg dialect on a dbpool
  pool, ``dbpool.dbapi.sqlalchemy.create_engine(pool)``;
- ``remote``: the ``postgresql+dbpool://`` dialect through ``dbpool serve``.

On each: an ORM round trip (tables, related objects, a join, a rolled-back
session, savepoints), and 8 threads' sessions at once, which show as dbpool's
checkouts in its metrics (the service's: its leases and its pool's
checkouts).  In-process, a connection SQLAlchemy returns inside a transaction
comes back clean.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import ForeignKey, String, select, text  # noqa: E402
from sqlalchemy.orm import (  # noqa: E402
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
)

from dbpool.client import Client  # noqa: E402
from dbpool.dbapi.sqlalchemy import create_engine  # noqa: E402
from dbpool.pgdriver import PgDriver  # noqa: E402
from dbpool.pool import Pool  # noqa: E402
from tests.support.remote import ServerProcess  # noqa: E402

SUFFIX = uuid.uuid4().hex[:8]


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = f"sa_author_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = f"sa_book_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey(f"sa_author_{SUFFIX}.id"))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture
def pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=4, name=f"sa-{SUFFIX}") as started:
        yield started


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[ServerProcess]:
    with ServerProcess(pg_dsn, pool_size=4) as started:
        yield started


#: What a test reads of dbpool's checkouts, whichever way the engine goes.
Checkouts = Callable[[], int]


@pytest.fixture(params=["in-process", "remote"])
def engine_and_checkouts(
    request: pytest.FixtureRequest, pool: Pool
) -> Iterator[tuple[sqlalchemy.Engine, Checkouts]]:
    if request.param == "in-process":
        engine = create_engine(pool)

        def checkouts() -> int:
            return int(pool.metrics()["checkouts"])
    else:
        server: ServerProcess = request.getfixturevalue("server")
        host_port = server.endpoint.removeprefix("tcp://")
        engine = sqlalchemy.create_engine(f"postgresql+dbpool://{host_port}/")
        client = Client(server.endpoint)
        request.addfinalizer(client.close)

        def checkouts() -> int:  # each transaction is a lease, a checkout of the pool's
            return int(client.status()["server"]["leases"])
    Base.metadata.create_all(engine)
    yield engine, checkouts
    Base.metadata.drop_all(engine)
    engine.dispose()


def test_an_orm_round_trip(engine_and_checkouts: tuple[sqlalchemy.Engine, Checkouts],
                           pool: Pool) -> None:
    engine = engine_and_checkouts[0]
    with Session(engine) as session:
        session.add(Author(name="Le Guin", books=[Book(title="The Dispossessed"),
                                                  Book(title="The Lathe of Heaven")]))
        session.commit()
    with Session(engine) as session:
        rows = session.execute(select(Author.name, Book.title).join(Book.author)
                               .order_by(Book.title)).all()
        assert rows == [("Le Guin", "The Dispossessed"), ("Le Guin", "The Lathe of Heaven")]
        session.add(Author(name="never"))
        session.flush()
        session.rollback()  # a rolled-back session
        assert session.scalar(select(sqlalchemy.func.count(Author.id))) == 1
        with session.begin_nested():  # a savepoint, kept
            session.add(Author(name="kept"))
        nested = session.begin_nested()  # a savepoint, rolled back
        session.add(Author(name="undone"))
        nested.rollback()
        session.commit()
        names = session.scalars(select(Author.name).order_by(Author.name)).all()
        assert names == ["Le Guin", "kept"]
    assert pool.metrics()["connections"]["in_use"] == 0


def test_sessions_from_8_threads_are_dbpool_checkouts(
    engine_and_checkouts: tuple[sqlalchemy.Engine, Checkouts]
) -> None:
    engine, checkouts = engine_and_checkouts
    before = checkouts()
    errors: list[BaseException] = []
    started = threading.Barrier(8)

    def work() -> None:
        try:
            started.wait(30)  # all 8 at once
            for _ in range(10):
                with Session(engine) as session:
                    assert session.execute(text("SELECT 1")).scalar() == 1
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert checkouts() - before >= 80


def test_a_connection_returned_in_a_transaction_comes_back_clean(pg_dsn: str) -> None:
    with Pool.start(pg_dsn, pool_size=1, name=f"sa-one-{SUFFIX}") as one:
        single = create_engine(one)
        Base.metadata.create_all(single)
        conn = single.connect()
        conn.execute(text(f"INSERT INTO {Author.__tablename__} (name) VALUES ('dangling')"))
        conn.close()  # SQLAlchemy rolls back and gives it to dbpool
        with one.checkout() as back:  # the one connection: back in dbpool's own mode
            assert back.driver_state.conn.autocommit is True
            assert back.status() == "idle"
            assert back.query(f"SELECT count(*) FROM {Author.__tablename__}").rows == [(0,)]
        Base.metadata.drop_all(single)
        single.dispose()


# -- the in-process engine's own pool ------------------------------------------------


def test_the_connect_events_run_once_per_dbpool_connection(pool: Pool) -> None:
    engine = create_engine(pool)
    connects: list[object] = []
    sqlalchemy.event.listen(engine, "connect", lambda dbapi_conn, record: connects.append(1))
    before = pool.metrics()["checkouts"]
    for _ in range(20):
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    assert pool.metrics()["checkouts"] - before == 20  # each one a dbpool checkout
    assert 1 <= len(connects) <= 4  # but a record per connection, not per checkout
    engine.dispose()


def test_raw_connection_is_a_dbapi_connection_with_a_transaction(
    pool: Pool, pg_dsn: str
) -> None:
    engine = create_engine(pool)
    Base.metadata.create_all(engine)
    try:
        raw = engine.raw_connection()
        cur = raw.cursor()
        cur.execute(f"INSERT INTO {Author.__tablename__} (name) VALUES ('uncommitted')")
        raw.rollback()
        cur.execute(f"SELECT count(*) FROM {Author.__tablename__}")
        assert cur.fetchone() == (0,)
        raw.close()
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_the_engines_isolation_level_holds_on_every_checkout(pool: Pool, pg_dsn: str) -> None:
    serializable = create_engine(pool, isolation_level="SERIALIZABLE")
    for _ in range(3):
        with serializable.connect() as conn:
            assert conn.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
    with serializable.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == "repeatable read"
    with serializable.connect() as conn:  # the engine's level again
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
    serializable.dispose()
    autocommit = create_engine(pool, isolation_level="AUTOCOMMIT")
    for _ in range(3):
        with autocommit.connect() as conn:  # no transaction is begun: each statement commits
            assert conn.execute(text("SELECT now() = statement_timestamp()")).scalar()
    autocommit.dispose()
    with pool.checkout() as back:  # the connection is dbpool's again, in its own mode
        assert back.driver_state.conn.autocommit is True
        assert back.status() == "idle"


def test_hold_timeout_bounds_how_long_sqlalchemy_holds_a_connection(pool: Pool) -> None:
    engine = create_engine(pool, hold_timeout=0.3)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1  # an idle connection: lent at once
        # SQLAlchemy drives psycopg itself: it sees the revoked session go, as psycopg's
        # error, long before the statement would have ended.
        with pytest.raises(sqlalchemy.exc.OperationalError):
            conn.execute(text("SELECT pg_sleep(30)"))
    assert pool.metrics()["deadlines"] == 1
    engine.dispose()


class _LateWake(PgDriver):
    """A driver whose wake-up of a revoked holder comes late, as when the revoking
    thread is preempted: it first gives the holder up to 0.5 s to fail by itself."""

    def __init__(self) -> None:
        self.holder_failed = threading.Event()

    def interrupt(self, state: Any) -> None:
        self.holder_failed.wait(0.5)
        super().interrupt(state)


def test_a_revoked_holder_finds_its_connection_lost_however_late_the_wake_up(
    pg_dsn: str
) -> None:
    # The revoke's cancel goes only after the holder is woken: had it gone first,
    # the holder would see a plain cancel, SQLAlchemy would keep the connection
    # as valid, and its close would roll back on a dead socket and raise.
    driver = _LateWake()
    with Pool.start(pg_dsn, driver=driver, pool_size=1, name=f"sa-late-{SUFFIX}") as pool:
        engine = create_engine(pool, hold_timeout=0.3)
        with engine.connect() as conn:
            with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
                try:
                    conn.execute(text("SELECT pg_sleep(30)"))
                finally:
                    driver.holder_failed.set()
            assert caught.value.connection_invalidated
        assert pool.metrics()["deadlines"] == 1
        assert pool.query("SELECT 1").rows == [(1,)]
        engine.dispose()
