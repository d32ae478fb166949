"""Savepoints (``session.begin_nested()``) inside the app's transactions, inside the sandbox."""

from __future__ import annotations

import app
import pytest
from conftest import LE_GUIN
from sqlalchemy import func, select


@pytest.mark.parametrize(("titles", "refused"), [
    (["Lavinia", "Powers"], []),
    (["Lavinia", "", "Powers"], [""]),
    (["Lavinia", "Lavinia", "Powers"], ["Lavinia"]),
    ([LE_GUIN[1][0], "Powers", ""], [LE_GUIN[1][0], ""]),
], ids=["all good", "a blank", "a duplicate", "two bad"])
def test_best_effort_keeps_the_titles_that_fit(
    le_guin: int, titles: list[str], refused: list[str]
) -> None:
    added, rejected = app.add_books_best_effort(le_guin, titles)
    assert rejected == refused
    assert len(added) == len(titles) - len(refused)
    shelf = app.shelf(LE_GUIN[0])
    assert shelf is not None
    assert len(shelf.titles) == 2 + len(added)
    assert app.count_books() == 2 + len(added)


def test_best_effort_with_nothing_that_fits(le_guin: int) -> None:
    assert app.add_books_best_effort(le_guin, ["", *LE_GUIN[1]]) == ([], ["", *LE_GUIN[1]])
    assert app.count_books() == 2


def test_nested_savepoints_in_the_tests_session(le_guin: int) -> None:
    with app.session() as db:
        with db.begin_nested():  # kept
            db.add(app.Author(name="kept"))
        nested = db.begin_nested()  # rolled back
        db.add(app.Author(name="undone"))
        db.flush()
        nested.rollback()
        with db.begin_nested(), db.begin_nested():  # two deep, kept
            db.add(app.Author(name="deep"))
        db.commit()
    assert sorted(app.catalogue()) == sorted([LE_GUIN[0], "kept", "deep"])


def test_a_savepoint_rolled_back_after_the_app_committed(le_guin: int) -> None:
    app.add_books(le_guin, ["Lavinia"])
    with app.session() as db:
        nested = db.begin_nested()
        db.delete(db.get_one(app.Author, le_guin))
        db.flush()
        assert db.scalar(select(func.count(app.Book.id))) == 0  # the cascade, flushed
        nested.rollback()
        db.commit()
    assert app.count_books() == 3
