"""The app's failures roll back what they must, and the test carries on in its sandbox."""

from __future__ import annotations

import app
import pytest
from conftest import LE_GUIN
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError


@pytest.mark.parametrize("blank_at", [0, 1, 2])
def test_blank_title_refuses_the_whole_batch(le_guin: int, blank_at: int) -> None:
    titles = ["Lavinia", "Powers", "Gifts"]
    titles[blank_at] = ""
    with pytest.raises(IntegrityError, match="title_not_blank"):
        app.add_books(le_guin, titles)
    assert app.count_books() == 2
    app.add_books(le_guin, ["Lavinia"])
    assert app.count_books() == 3


def test_duplicate_title_refuses_the_batch(le_guin: int) -> None:
    with pytest.raises(IntegrityError, match="UniqueViolation"):
        app.add_books(le_guin, ["Lavinia", LE_GUIN[1][0]])
    assert app.shelf(LE_GUIN[0]) == app.Shelf(1, *LE_GUIN)


def test_quota_refuses_the_batch(le_guin: int) -> None:
    room = app.QUOTA - len(LE_GUIN[1])
    with pytest.raises(app.QuotaExceeded):
        app.add_books(le_guin, [f"volume {i}" for i in range(room + 1)])
    assert app.count_books() == 2
    app.add_books(le_guin, [f"volume {i}" for i in range(room)])
    assert app.count_books() == app.QUOTA


def test_failed_batch_keeps_an_earlier_one(le_guin: int) -> None:
    app.add_books(le_guin, ["Lavinia", "Powers"])
    with pytest.raises(IntegrityError):
        app.add_books(le_guin, ["Gifts", ""])
    shelf = app.shelf(LE_GUIN[0])
    assert shelf is not None and shelf.titles == (*LE_GUIN[1], "Lavinia", "Powers")


def test_duplicate_author_is_refused(le_guin: int) -> None:
    with pytest.raises(IntegrityError, match="UniqueViolation"):
        app.add_author(LE_GUIN[0], ["A Wizard of Earthsea"])
    assert (app.count_authors(), app.count_books()) == (1, 2)
    app.add_author("Octavia E. Butler")
    assert app.count_authors() == 2


def test_unknown_author_is_refused(le_guin: int) -> None:
    with pytest.raises(IntegrityError, match="ForeignKeyViolation"):
        app.add_books(999_999, ["Orphan"])
    assert app.count_books() == 2


def test_rename_to_a_taken_name_changes_nothing(le_guin: int) -> None:
    butler = app.add_author("Octavia E. Butler")
    with pytest.raises(IntegrityError):
        app.rename_author(butler, LE_GUIN[0])
    assert set(app.catalogue()) == {LE_GUIN[0], "Octavia E. Butler"}


def test_session_rollback_in_the_test(le_guin: int) -> None:
    with app.session() as db:
        db.add(app.Author(name="never"))
        db.flush()
        assert db.scalar(select(func.count(app.Author.id))) == 2
        db.rollback()
        assert db.get(app.Author, 1) is not None  # ...and the rollback kept author 1
    assert app.count_authors() == 1
    assert app.shelf("never") is None


def test_a_failed_core_transaction_commits_nothing(le_guin: int) -> None:
    # As on PostgreSQL, a transaction in which a statement failed rolls back at commit.
    assert app.engine is not None
    with app.engine.begin() as conn:
        conn.execute(insert(app.Author).values(name="Gene Wolfe"))
        with pytest.raises(IntegrityError):
            conn.execute(insert(app.Author).values(id=1, name="impostor"))
    assert app.count_authors() == 1
    with app.engine.begin() as conn:  # and the next one works
        conn.execute(text(f"DELETE FROM {app.Book.__tablename__}"))
    assert app.count_books() == 0
