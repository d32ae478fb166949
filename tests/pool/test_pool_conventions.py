"""The pool reads like Python: close(), a context manager, errors code already catches,
two kinds of pool with their own calls, options a type checker can check."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbpool.errors import ConnectionError
from dbpool.pool import OwnershipPool, Pool, PoolOptions, PoolStartOptions
from tests.support.events import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_a_pool_started_in_a_with_block_is_closed_at_its_end(pg_dsn: str) -> None:
    with Pool.start(pg_dsn, pool_size=1) as pool:
        assert pool.query("SELECT 1").rows == [(1,)]
        assert pool.alive
    assert not pool.alive
    with pytest.raises(ConnectionError) as info:
        pool.query("SELECT 1")
    assert info.value.reason == "stopped"


def test_close_closes_the_pool_and_stop_is_its_alias(pg_dsn: str) -> None:
    pool = Pool.start(pg_dsn, pool_size=1)
    pool.close()
    assert not pool.alive
    pool.close()  # closing a closed pool does nothing
    assert Pool.stop is Pool.close


def test_close_prepared_releases_a_prepared_statement(pg_dsn: str) -> None:
    with Pool.start(pg_dsn, pool_size=1) as pool:
        query = pool.prepare("conventions_q", "SELECT $1::int")
        assert pool.execute(query, [5]).rows == [(5,)]
        pool.close_prepared(query)
        count = "SELECT count(*) FROM pg_prepared_statements WHERE name = 'conventions_q'"
        assert pool.query(count).rows == [(0,)]


@pytest.mark.parametrize("catch", [psycopg.OperationalError, builtins.ConnectionError])
def test_a_queue_timeout_and_an_open_circuit_are_caught_as_psycopg_and_python_would(
    pg_dsn: str, catch: type[Exception]
) -> None:
    with Pool.start(pg_dsn, pool_size=1) as pool, pool.checkout():
        with pytest.raises(catch) as timed_out:
            pool.query("SELECT 1", timeout=0.1)
        assert isinstance(timed_out.value, ConnectionError)
        assert timed_out.value.reason == "queue_timeout"
    with Pool.start(pg_dsn, pool_size=1) as pool:
        pool.open_circuit()
        wait_for(lambda: pool.health == "open", 5, "the circuit to open")
        with pytest.raises(catch) as unavailable:
            pool.query("SELECT 1")
        assert isinstance(unavailable.value, ConnectionError)
        assert unavailable.value.reason == "unavailable"


def test_only_an_ownership_pool_has_the_ownership_calls(pg_dsn: str) -> None:
    with Pool.start(pg_dsn, pool_size=1) as plain:
        assert type(plain) is Pool
        for call in ("ownership_checkout", "ownership_checkin", "ownership_allow",
                     "ownership_mode"):
            assert not hasattr(plain, call), call
        assert len(plain.connection_metrics()) == 1
    with Pool.start(pg_dsn, pool="ownership", pool_size=1) as owned:
        assert isinstance(owned, OwnershipPool)
        assert owned.ownership_checkout() == "ok"
        assert owned.query("SELECT 1").rows == [(1,)]
        assert owned.ownership_checkin() == "ok"


def test_the_typed_options_are_the_pool_options() -> None:
    # PoolStartOptions mirrors PoolOptions for type checkers: keep them in step.
    typed = PoolStartOptions.__optional_keys__ | PoolStartOptions.__required_keys__
    assert typed == {f.name for f in fields(PoolOptions)} - {"pool"}


def _mypy_tree(tmp_path: Path) -> Path:
    """The package as mypy must see it (the root folders mapped as in pyproject)."""
    tree = tmp_path / "tree"
    package = tree / "dbpool"
    package.mkdir(parents=True)
    for entry in (ROOT / "src" / "dbpool").iterdir():
        (package / entry.name).symlink_to(entry)
    for layer in ("actors", "pool", "server", "client", "bench"):
        (package / layer).symlink_to(ROOT / layer)
    return tree


def test_mypy_rejects_a_misspelt_option_and_ownership_calls_on_a_plain_pool(
    tmp_path: Path,
) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent("""\
        from dbpool.pool import OwnershipPool, Pool

        pool = Pool.start("host=db", pool_szie=4)
        owned: OwnershipPool = Pool.start("host=db", pool="ownership")
        plain = Pool.start("host=db", pool_size=4)
        plain.ownership_checkout()
        with plain.transaction() as conn:
            conn.query("SELECT 1")
        answer: int = plain.transaction(lambda conn: conn.query("SELECT 1"))
    """))
    env: dict[str, Any] = {**os.environ, "MYPYPATH": str(_mypy_tree(tmp_path))}
    found = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir",
         str(tmp_path / "cache"), str(snippet)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    errors = [line for line in found.stdout.splitlines() if ": error:" in line]
    assert any("snippet.py:3:" in line and "pool_szie" in line for line in errors), found.stdout
    assert any("snippet.py:6:" in line and "ownership_checkout" in line for line in errors), \
        found.stdout
    # transaction(fn) is typed as fn's result: a Result is not an int.
    assert any("snippet.py:9:" in line and "Result" in line for line in errors), found.stdout
    assert {line.split(":")[1] for line in errors} == {"3", "6", "9"}, found.stdout  # the rest
    # is well typed
