"""The Django test project (tests/django_project) passes its own suite on ENGINE
"dbpool.django": ``manage.py test`` in a subprocess, as a Django user runs it.

Its test database is named for this run only, so parallel runs and xdist
workers never share one, and is dropped here if the run left it behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

pytest.importorskip("django")

PROJECT = Path(__file__).resolve().parents[1] / "django_project"

#: bookshop/tests.py: 6 TestCase tests and 3 TransactionTestCase tests.
EXPECTED_TESTS = 9


@pytest.fixture
def database_name(pg_dsn: str) -> Iterator[str]:
    """A database name of this run's; its test database is gone afterwards."""
    name = f"dbpool_dj_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                      .format(sql.Identifier(f"test_{name}")))


def test_the_projects_own_suite_passes_on_the_engine(pg_dsn: str, database_name: str) -> None:
    env = {**os.environ, "DBPOOL_TEST_DSN": pg_dsn, "DBPOOL_DJANGO_DB": database_name,
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # manage.py names the project's own
    run = subprocess.run(
        [sys.executable, "manage.py", "test", "bookshop", "--noinput", "-v", "2"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=90)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    ran = re.search(r"^Ran (\d+) tests? in ", output, re.MULTILINE)
    assert ran is not None, output
    assert int(ran.group(1)) == EXPECTED_TESTS, output
    assert re.search(r"^OK$", output, re.MULTILINE), output
    # Django dropped its test database itself: nothing held it open (DROP
    # DATABASE fails while a pooled session is connected to it).
    assert f"Destroying test database for alias 'default' ('test_{database_name}')" in output
    with psycopg.connect(pg_dsn) as admin:
        left = admin.execute("SELECT datname FROM pg_database WHERE datname = %s",
                             [f"test_{database_name}"]).fetchall()
    assert left == []
