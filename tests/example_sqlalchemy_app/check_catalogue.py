"""The library's reads and writes, each test in its own sandbox.

Every test catalogues author 1 first (the ``le_guin`` fixture): without the
sandbox the second test to do so would fail on the primary key, and every
count would include other tests' rows.
"""

from __future__ import annotations

import app
import pytest
from conftest import LE_GUIN
from sqlalchemy import insert, select, text

from dbpool.pool.ownership.pytest_plugin import Sandbox


def test_le_guin_is_catalogued(le_guin: int) -> None:
    assert le_guin == 1
    assert app.shelf(LE_GUIN[0]) == app.Shelf(1, *LE_GUIN)
    assert (app.count_authors(), app.count_books()) == (1, 2)


@pytest.mark.parametrize("books", [0, 1, 3, 10])
def test_add_author_with_books(le_guin: int, books: int) -> None:
    titles = tuple(f"Kindred, part {i}" for i in range(books))
    author_id = app.add_author("Octavia E. Butler", titles)
    assert author_id >= 1000  # drawn from the identity, unlike author 1
    assert app.shelf("Octavia E. Butler") == app.Shelf(author_id, "Octavia E. Butler", titles)
    assert app.count_books() == 2 + books


@pytest.mark.parametrize("authors", [1, 2, 5])
def test_authors_are_catalogued_in_order(le_guin: int, authors: int) -> None:
    ids = [app.add_author(f"author {i}", [f"book {i}"]) for i in range(authors)]
    assert ids == sorted(ids) and len(set(ids)) == authors
    assert app.count_authors() == authors + 1
    assert app.count_books() == authors + 2


def test_catalogue_joins_authors_and_books(le_guin: int) -> None:
    app.add_author("Octavia E. Butler", ["Kindred", "Dawn"])
    app.add_author("Gene Wolfe")
    assert app.catalogue() == {
        "Gene Wolfe": [],
        "Octavia E. Butler": ["Kindred", "Dawn"],
        LE_GUIN[0]: list(LE_GUIN[1]),
    }


def test_rename_author(le_guin: int) -> None:
    app.rename_author(le_guin, "U. K. Le Guin")
    assert app.shelf(LE_GUIN[0]) is None
    assert app.shelf("U. K. Le Guin") == app.Shelf(1, "U. K. Le Guin", LE_GUIN[1])


def test_move_book_between_authors(le_guin: int) -> None:
    butler = app.add_author("Octavia E. Butler", ["Kindred"])
    with app.session() as db:
        book_id = db.scalars(select(app.Book.id).where(app.Book.title == "The Dispossessed")).one()
    app.move_book(book_id, butler)
    assert app.catalogue() == {"Octavia E. Butler": ["The Dispossessed", "Kindred"],
                               LE_GUIN[0]: ["The Left Hand of Darkness"]}


def test_remove_author_removes_their_books(le_guin: int) -> None:
    butler = app.add_author("Octavia E. Butler", ["Kindred", "Dawn", "Imago"])
    app.remove_author(butler)
    assert app.count_authors() == 1
    assert app.count_books() == 2


@pytest.mark.parametrize("first", [0, 1])
def test_relationship_loads_books_in_order(le_guin: int, first: int) -> None:
    titles = ["Dawn", "Adulthood Rites", "Imago"]
    titles = titles[first:] + titles[:first]
    butler = app.add_author("Octavia E. Butler", titles)
    with app.session() as db:
        author = db.get_one(app.Author, butler)
        assert [book.title for book in author.books] == titles
        assert {book.author.name for book in author.books} == {"Octavia E. Butler"}


def test_the_tests_own_session_sees_the_apps_commits(le_guin: int) -> None:
    with app.session() as db:
        assert db.get_one(app.Author, 1).name == LE_GUIN[0]
        db.add(app.Author(name="Gene Wolfe", books=[app.Book(title="Peace")]))
        db.commit()  # a savepoint, released into the test's transaction
    assert app.shelf("Gene Wolfe") is not None
    assert app.count_books() == 3


def test_core_statements_share_the_sandbox(le_guin: int) -> None:
    assert app.engine is not None
    with app.engine.begin() as conn:
        conn.execute(insert(app.Author).values(name="Gene Wolfe"))
        assert conn.execute(text(f"SELECT count(*) FROM {app.Author.__tablename__}")).scalar() == 2
    assert app.count_authors() == 2


def test_the_sandbox_and_the_engine_share_the_connection(
    le_guin: int, dbpool_sandbox: Sandbox
) -> None:
    dbpool_sandbox.query(f"INSERT INTO {app.Author.__tablename__} (id, name) VALUES (2, 'seeded')")
    assert app.shelf("seeded") == app.Shelf(2, "seeded", ())
    app.add_books(2, ["grown"])
    assert dbpool_sandbox.query(f"SELECT count(*) FROM {app.Book.__tablename__}").rows == [(3,)]
