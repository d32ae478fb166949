"""SQLAlchemy's third-party dialect compliance suite against ``postgresql+dbpool://``.

The suite (``sqlalchemy.testing.suite``, run the way external dialects run
it: ``tests/sqlalchemy_suite``) needs SQLAlchemy's own pytest plugin, so it
runs in a pytest of its own, against ``dbpool serve`` on a database made for
it.  This test holds it to the issue's bar: at least 90% of the tests it
selects pass, and every skip gives one of the reasons the dialect's
``Requirements`` class declares (none is SQLAlchemy's bare "marked as skip").
The counts are printed for the README.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.remote import ServerProcess

pytest.importorskip("sqlalchemy")

from dbpool.dbapi.sqlalchemy import requirements

SUITE = Path(__file__).resolve().parents[1] / "sqlalchemy_suite"
_SUMMARY = re.compile(r"^=* ?(\d+ \w+(?:, \d+ \w+)*) in [\d.]+s", re.M)
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] .*?: (?:'[^']*' : )?(.*)$", re.M)


@pytest.fixture
def suite_database(pg_dsn: str) -> Iterator[str]:
    """A new database with the two schemas the suite expects; dropped afterwards."""
    name = f"dbpool_sa_suite_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA test_schema; CREATE SCHEMA test_schema_2")
        yield dsn
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def counts(output: str) -> dict[str, int]:
    """``{"passed": n, "failed": n, ...}`` from pytest's summary line."""
    match = _SUMMARY.findall(output)
    assert match, f"no pytest summary in:\n{output[-3000:]}"
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", match[-1])}


@pytest.mark.timeout(900)  # 25 s alone; a busy 2-core CI machine may take several times that
def test_sqlalchemy_dialect_compliance_suite(suite_database: str) -> None:
    with ServerProcess(suite_database, pool_size=8) as server:
        host_port = server.endpoint.removeprefix("tcp://")
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-c", str(SUITE / "setup.cfg"),
             "--rootdir", str(SUITE), str(SUITE / "test_suite.py"),
             "--dburi", f"postgresql+dbpool://{host_port}/", "-q", "-rs", "-p", "no:xdist"],
            capture_output=True, text=True, timeout=600, cwd=SUITE)
    output = run.stdout + run.stderr
    found = counts(output)
    passed, skipped = found.get("passed", 0), found.get("skipped", 0)
    selected = passed + skipped + found.get("failed", 0) + found.get("error", 0) \
        + found.get("errors", 0)
    print(f"SQLAlchemy dialect suite: {found} (passed {passed / selected:.1%} of {selected})")
    assert selected > 1000, output[-3000:]
    assert passed >= 0.9 * selected, output[-5000:]
    declared = {value for value in vars(requirements).values() if isinstance(value, str)}
    reasons = set(_SKIPPED.findall(output))
    assert len(reasons) > 0
    undeclared = {reason for reason in reasons
                  if not any(reason.startswith(text) or text in reason for text in declared)}
    assert not undeclared, f"skips without a reason the Requirements class gives: {undeclared}"
