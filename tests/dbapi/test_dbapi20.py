"""dbpool.dbapi against the standard DB-API 2.0 compliance suite (issue 19).

``dbapi20.py`` is Stuart Bishop's suite, from the ``dbapi-compliance``
package on PyPI, the one psycopg runs too.  It runs twice: in-process (each
connection it makes borrows one from a pool on the real PostgreSQL) and
through a ``dbpool serve`` process (each connection a client; a transaction
a lease).  Where PEP 249 leaves a choice, the subclass overrides, as
psycopg's own ``tests/dbapi20.py`` does, and says why.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import dbapi20
import pytest

from dbpool import dbapi
from dbpool.pool import Pool
from tests.support.remote import ServerProcess


@pytest.fixture(scope="module", autouse=True)
def dbapi_pool(pg_dsn: str) -> Iterator[Pool]:
    with Pool.start(pg_dsn, pool_size=4, name="dbapi20") as pool:
        InProcessCompliance.connect_kw_args = {"pool": pool}
        yield pool


@pytest.fixture(scope="module", autouse=True)
def dbapi_server(pg_dsn: str) -> Iterator[ServerProcess]:
    with ServerProcess(pg_dsn, pool_size=2) as server:
        RemoteCompliance.connect_args = (server.endpoint,)
        yield server


def _ddl(prefix: str) -> tuple[str, str, str, str]:
    """The suite's DDL for ``prefix`` (its class body spells it with its own prefix)."""
    return (f"create table {prefix}booze (name varchar(20))",
            f"create table {prefix}barflys (name varchar(20), drink varchar(30))",
            f"drop table {prefix}booze", f"drop table {prefix}barflys")


class InProcessCompliance(dbapi20.DatabaseAPI20Test):  # type: ignore[misc]
    driver = dbapi
    connect_args = ()
    connect_kw_args: ClassVar[dict[str, Any]] = {}
    # The suite's tables are made per test and dropped after it; named per class and
    # process, so that the two classes, on two xdist workers, never share one.
    table_prefix = f"dbapi20test_ip_{uuid.uuid4().hex[:6]}_"
    ddl1, ddl2, xddl1, xddl2 = _ddl(table_prefix)

    # PEP 249 leaves multiple result sets to the driver: PostgreSQL's extended
    # protocol gives one per statement, so nextset() is always None (psycopg
    # overrides this test the same way).
    def test_nextset(self) -> None:
        con = self._connect()
        try:
            cur = con.cursor()
            cur.execute("SELECT 1")
            self.assertIsNone(cur.nextset())
        finally:
            con.close()

    # "Driver dependant": setoutputsize is accepted and ignored, results are
    # fetched whole (psycopg skips this test).
    def test_setoutputsize(self) -> None:
        con = self._connect()
        try:
            cur = con.cursor()
            cur.setoutputsize(1000, 0)
            cur.execute("SELECT 'x'")
            self.assertEqual(cur.fetchall(), [("x",)])
        finally:
            con.close()


class RemoteCompliance(InProcessCompliance):
    """The same suite and overrides, through ``dbpool serve``."""

    table_prefix = f"dbapi20test_rm_{uuid.uuid4().hex[:6]}_"
    ddl1, ddl2, xddl1, xddl2 = _ddl(table_prefix)

    connect_args: ClassVar[tuple[str, ...]] = ()
    connect_kw_args: ClassVar[dict[str, Any]] = {}
