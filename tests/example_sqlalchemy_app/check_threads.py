"""Work the app does on other threads lands in the test's sandbox, sessions and all."""

from __future__ import annotations

import threading

import app
import pytest
from conftest import LE_GUIN
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from dbpool.errors import OwnershipError
from dbpool.pool.ownership.owners import propagate_callers
from dbpool.pool.ownership.pytest_plugin import Sandbox


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_import_on_an_executor(le_guin: int, workers: int) -> None:
    catalogue = {f"author {i}": [f"book {i}a", f"book {i}b"] for i in range(10)}
    ids = app.import_catalogue(catalogue, workers=workers)
    assert len(set(ids.values())) == 10
    assert (app.count_authors(), app.count_books()) == (11, 22)


def test_failed_import_keeps_the_other_authors(le_guin: int) -> None:
    catalogue = {"Gene Wolfe": ["Peace"], "Octavia E. Butler": ["Kindred", ""],
                 "Iain M. Banks": ["Excession"]}
    with pytest.raises(IntegrityError):
        app.import_catalogue(catalogue, workers=2)
    assert sorted(app.catalogue()) == sorted([LE_GUIN[0], "Gene Wolfe", "Iain M. Banks"])


def test_a_thread_sees_what_the_test_wrote(le_guin: int) -> None:
    seen: list[tuple[str, ...]] = []

    def work() -> None:
        shelf = app.shelf(LE_GUIN[0])  # committed to the sandbox only
        assert shelf is not None
        seen.append(shelf.titles)
        app.add_books(shelf.id, ["from a thread"])

    thread = threading.Thread(target=propagate_callers(work))
    thread.start()
    thread.join(timeout=30)
    assert seen == [LE_GUIN[1]]
    assert app.count_books() == 3


def test_a_threads_session_sees_the_tests_session(le_guin: int) -> None:
    with app.session() as db:
        db.add(app.Author(name="Gene Wolfe"))
        db.commit()  # closes the session's connection too, so the thread can have it
    names: list[list[str]] = []

    def work() -> None:
        with app.session() as db:
            names.append(list(db.scalars(select(app.Author.name).order_by(app.Author.id))))

    thread = threading.Thread(target=propagate_callers(work))
    thread.start()
    thread.join(timeout=30)
    assert names == [[LE_GUIN[0], "Gene Wolfe"]]


@pytest.mark.parametrize("posts", [1, 3, 5])
def test_allowed_cataloguer(le_guin: int, dbpool_sandbox: Sandbox, posts: int) -> None:
    cataloguer = app.Cataloguer()
    cataloguer.start()
    try:
        assert dbpool_sandbox.allow(cataloguer) == "ok"
        futures = [cataloguer.post(le_guin, f"post {i}") for i in range(posts)]
        ids = [future.result(timeout=30) for future in futures]
    finally:
        cataloguer.close()
    assert len({book_id for batch in ids for book_id in batch}) == posts
    assert app.count_books() == 2 + posts


def test_cataloguer_not_allowed_is_refused(le_guin: int) -> None:
    cataloguer = app.Cataloguer()
    cataloguer.start()
    try:
        refused = cataloguer.post(le_guin, "sneaky").exception(timeout=30)
    finally:
        cataloguer.close()
    assert isinstance(refused, OwnershipError)
    assert app.count_books() == 2
