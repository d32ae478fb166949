"""SQLAlchemy's rollbacks on a dbpool pool are sent without waiting for the answer
(dbpool.pgconnection): the transaction ends on the server at once, and whoever
uses the connection next (SQLAlchemy itself, the DB-API connection under it,
or the pool's next borrower) reads the answer first."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import text  # noqa: E402

from dbpool.dbapi.sqlalchemy import create_engine  # noqa: E402
from dbpool.pool import Pool  # noqa: E402
from tests.support.server import advisory_lock_free  # noqa: E402

LOCK = 640_772


@pytest.fixture
def pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=1, name="sa-rollback") as pool:
        yield pool


def test_closing_ends_the_transaction_and_the_next_borrower_reads_the_answer(
    pool: Pool, pg_dsn: str
) -> None:
    engine = create_engine(pool)
    with engine.connect() as c:
        c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK})
        raw: Any = c.connection.dbapi_connection
    assert raw.rollback_pending  # given back before the ROLLBACK's answer came
    assert advisory_lock_free(pg_dsn, LOCK)  # but the transaction ended on the server
    assert pool.query("SELECT 1").rows == [(1,)]  # the next borrower settles it
    assert not raw.rollback_pending
    engine.dispose()


def test_a_connection_rolled_back_and_used_again_reads_the_answer_first(
    pool: Pool, table: str
) -> None:
    engine = create_engine(pool)
    with engine.connect() as c:
        c.execute(text(f"INSERT INTO {table} (x) VALUES (1)"))
        c.rollback()
        raw: Any = c.connection.dbapi_connection
        assert raw.rollback_pending
        # SQLAlchemy's next transaction, and the DB-API connection used directly.
        assert c.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0
        c.rollback()
        with raw.cursor() as cur:
            cur.execute("SELECT 2")
            assert cur.fetchone() == (2,)
        c.execute(text(f"INSERT INTO {table} (x) VALUES (2)"))
        c.commit()
    assert pool.query(f"SELECT x FROM {table}").rows == [(2,)]
    engine.dispose()
