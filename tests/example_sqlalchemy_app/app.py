"""A library catalogue on SQLAlchemy's ORM: the second example application for dbpool's sandbox.

Authors and their books live in two related tables, named after
``$EXAMPLE_SA_APP_PREFIX`` (``library`` by default): ``<prefix>_authors`` and
``<prefix>_books``.  The application talks to PostgreSQL through SQLAlchemy
sessions on one module-level dbpool pool::

    app.start("host=db user=library")      # production: a plain pool
    app.start(dsn, testing=True)           # under test: see below
    app.add_author("Ursula K. Le Guin", ["The Dispossessed"])

The engine is :func:`dbpool.dbapi.sqlalchemy.create_engine` on the pool.
``start(dsn, testing=True)`` starts the pool with ``pool="ownership"`` and
``ownership_mode="manual"``; the ``dbpool_sandbox`` fixture then gives each
test a connection inside a transaction rolled back at teardown, and the
engine makes every session's transaction a savepoint in it (see
conftest.py).  The application code does not change: its commits, its
rollbacks on error, its ``begin_nested()`` savepoints and the sessions of the
threads it starts all work as in production, and nothing is committed.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

import sqlalchemy
from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Identity,
    String,
    UniqueConstraint,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from dbpool.dbapi.sqlalchemy import create_engine
from dbpool.pool import Pool
from dbpool.pool.ownership.owners import CallersThreadPoolExecutor

PREFIX = os.environ.get("EXAMPLE_SA_APP_PREFIX", "library")
if not re.fullmatch(r"[a-z_][a-z0-9_]{0,50}", PREFIX):
    raise ValueError(
        f"EXAMPLE_SA_APP_PREFIX must be a short plain lower-case identifier, not {PREFIX!r}")

#: An author may have at most this many books.
QUOTA = 12


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = f"{PREFIX}_authors"

    id: Mapped[int] = mapped_column(Identity(start=1000), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    books: Mapped[list[Book]] = relationship(
        back_populates="author", cascade="all, delete-orphan", order_by="Book.id")


class Book(Base):
    __tablename__ = f"{PREFIX}_books"
    __table_args__ = (
        UniqueConstraint("author_id", "title"),
        CheckConstraint("title <> ''", name=f"{PREFIX}_books_title_not_blank"),
    )

    id: Mapped[int] = mapped_column(Identity(start=1000), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(
        ForeignKey(f"{PREFIX}_authors.id", ondelete="CASCADE"), index=True)
    author: Mapped[Author] = relationship(back_populates="books")


@dataclass(frozen=True)
class Shelf:
    """An author and their titles, in the order they were catalogued."""

    id: int
    name: str
    titles: tuple[str, ...]


class QuotaExceeded(Exception):
    """The author would have more than :data:`QUOTA` books."""


#: The application's pool, engine and session factory, set by :func:`start`.
pool: Pool | None = None
engine: sqlalchemy.Engine | None = None
_sessions: sessionmaker[Session] | None = None


def start(dsn: str, *, testing: bool = False) -> Pool:
    """Start the pool and the engine; ``testing=True`` makes the pool the sandbox's kind."""
    global pool, engine, _sessions
    options: dict[str, Any] = {"pool": "ownership", "ownership_mode": "manual"} if testing else {}
    pool = Pool.start(dsn, name="library", pool_size=4, **options)
    engine = create_engine(pool)
    # Objects stay readable after their session commits and closes.
    _sessions = sessionmaker(engine, expire_on_commit=False)
    return pool


def stop() -> None:
    global pool, engine, _sessions
    if engine is not None:
        engine.dispose()
    if pool is not None:
        pool.stop()
    pool, engine, _sessions = None, None, None


def session() -> Session:
    """A new session on the application's engine."""
    if _sessions is None:
        raise RuntimeError("the library is not started: call app.start(dsn) first")
    return _sessions()


def create_schema() -> None:
    """Create the tables if they are missing (safe when several processes race to)."""
    with session() as db, db.begin():
        db.execute(select(func.pg_advisory_xact_lock(func.hashtext(PREFIX))))
        Base.metadata.create_all(db.connection())


# -- writes -----------------------------------------------------------------


def add_author(name: str, titles: Sequence[str] = (), *, author_id: int | None = None) -> int:
    """Catalogue an author with their books and commit; ``author_id`` keeps an imported id."""
    with session() as db:
        author = Author(name=name, books=[Book(title=title) for title in titles])
        if author_id is not None:
            author.id = author_id
        db.add(author)
        db.commit()
        return author.id


def add_books(author_id: int, titles: Sequence[str]) -> list[int]:
    """Add several books to an author, all or none.

    A blank or duplicate title, or going over the quota, rolls the whole
    batch back and raises.
    """
    with session() as db:
        try:
            books = [Book(author_id=author_id, title=title) for title in titles]
            db.add_all(books)
            db.flush()
            owned = db.scalar(select(func.count(Book.id)).where(Book.author_id == author_id))
            if owned is not None and owned > QUOTA:
                raise QuotaExceeded(f"author {author_id} would have {owned} books")
            db.commit()
        except BaseException:
            db.rollback()
            raise
        return [book.id for book in books]


def add_books_best_effort(author_id: int, titles: Sequence[str]) -> tuple[list[int], list[str]]:
    """Add each book in a savepoint of its own: keep those that fit, report the others.

    Returns the new books' ids and the titles refused (blank, or a duplicate).
    """
    added: list[int] = []
    refused: list[str] = []
    with session() as db:
        for title in titles:
            try:
                with db.begin_nested():
                    book = Book(author_id=author_id, title=title)
                    db.add(book)
                added.append(book.id)
            except IntegrityError:
                refused.append(title)  # only this book's savepoint was rolled back
        db.commit()
    return added, refused


def rename_author(author_id: int, name: str) -> None:
    with session() as db:
        author = db.get_one(Author, author_id)
        author.name = name
        db.commit()


def move_book(book_id: int, to_author_id: int) -> None:
    with session() as db:
        book = db.get_one(Book, book_id)
        book.author = db.get_one(Author, to_author_id)
        db.commit()


def remove_author(author_id: int) -> None:
    """Remove an author and, through the relationship's cascade, their books."""
    with session() as db:
        db.delete(db.get_one(Author, author_id))
        db.commit()


def import_catalogue(catalogue: Mapping[str, Sequence[str]], workers: int = 4) -> dict[str, int]:
    """Catalogue each author on a thread pool, each in a session of its own thread.

    The executor passes on the caller's connection (under test: the sandbox).
    Every author is tried; then the first failure, if any, is raised.
    """
    with CallersThreadPoolExecutor(max_workers=workers) as executor:
        futures = {name: executor.submit(add_author, name, titles)
                   for name, titles in catalogue.items()}
    return {name: future.result() for name, future in futures.items()}


class Cataloguer(threading.Thread):
    """A long-lived worker that adds the books posted to it (from a scanner, say).

    Nothing starts it on a caller's behalf: under test, allow it on the
    sandbox (``dbpool_sandbox.allow(cataloguer)``).
    """

    def __init__(self) -> None:
        super().__init__(name="library-cataloguer", daemon=True)
        self._jobs: SimpleQueue[tuple[int, str, Future[list[int]]] | None] = SimpleQueue()

    def post(self, author_id: int, title: str) -> Future[list[int]]:
        future: Future[list[int]] = Future()
        self._jobs.put((author_id, title, future))
        return future

    def close(self) -> None:
        self._jobs.put(None)
        self.join()

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            author_id, title, future = job
            try:
                future.set_result(add_books(author_id, [title]))
            except Exception as error:
                future.set_exception(error)


# -- reads ----------------------------------------------------------------


def shelf(name: str) -> Shelf | None:
    """The author called ``name`` and their titles, or None."""
    with session() as db:
        author = db.scalar(select(Author).where(Author.name == name)
                           .options(selectinload(Author.books)))
        if author is None:
            return None
        return Shelf(author.id, author.name, tuple(book.title for book in author.books))


def catalogue() -> dict[str, list[str]]:
    """Every author's titles (authors without books included), through a join."""
    with session() as db:
        rows = db.execute(select(Author.name, Book.title)
                          .outerjoin(Author.books).order_by(Author.name, Book.id)).all()
    result: dict[str, list[str]] = {}
    for name, title in rows:
        result.setdefault(name, [])
        if title is not None:
            result[name].append(title)
    return result


def count_authors() -> int:
    with session() as db:
        return db.scalar(select(func.count(Author.id))) or 0


def count_books() -> int:
    with session() as db:
        return db.scalar(select(func.count(Book.id))) or 0
