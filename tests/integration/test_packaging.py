"""The installed distribution: names, layout, console script, embedded default."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dbpool.errors import ConfigurationError, ConnectionError


def test_subpackages_import_under_dbpool_only() -> None:
    # Run from / so that the repo root is not on sys.path, as for a user.
    code = (
        "import importlib.util as u, dbpool.pool, dbpool.actors, dbpool.client;"
        "print([u.find_spec(n) is None for n in ('pool', 'actors', 'client')])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items()
                                          if k != "PYTHONPATH"})
    assert out.stdout.strip() == "[True, True, True]"


def test_distribution_metadata_and_console_script() -> None:
    dist = importlib.metadata.distribution("dbpool")
    requires = " ".join(dist.requires or [])
    for dependency in ("pykka", "psycopg", "pyzmq", "msgpack", "pgserver"):
        assert dependency in requires
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts["dbpool"] == "dbpool.cli:main"
    # Nothing lands in site-packages as a top-level pool/actors/client.
    site = Path(sysconfig.get_paths()["purelib"])
    assert not any((site / name).exists() for name in ("pool", "actors", "client"))


def test_package_ships_py_typed() -> None:
    import dbpool

    assert (Path(dbpool.__file__).parent / "py.typed").exists()


def test_demo_command_runs_queries_and_shows_events(pg_dsn: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dbpool", "demo", "--dsn", pg_dsn, "--pool-size", "2",
         "--threads", "2", "--queries", "5"],
        capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.count("connected: backend pid") >= 2
    assert "ran 10 queries from 2 threads" in out.stdout
    assert out.stdout.count("disconnected: backend pid") == 2


def test_without_a_dsn_the_embedded_postgresql_is_used(tmp_path: Path) -> None:
    pytest.importorskip("pgserver")
    env = {**os.environ, "DBPOOL_EMBEDDED_DIR": str(tmp_path / "pgdata")}
    env.pop("DBPOOL_DSN", None)
    out = subprocess.run(
        [sys.executable, "-m", "dbpool", "demo", "--pool-size", "1", "--threads", "1",
         "--queries", "3"], capture_output=True, text=True, timeout=120, env=env, check=True)
    assert "starting the embedded PostgreSQL" in out.stdout
    assert "connected to PostgreSQL" in out.stdout
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()


def test_missing_embedded_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from dbpool import embedded

    monkeypatch.setitem(sys.modules, "pgserver", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'dbpool\[embedded\]'"):
        embedded.embedded_conninfo()


def test_connection_error_keeps_its_reason_across_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(ConnectionError("dropped", reason="queue_timeout")))
    assert isinstance(error, ConnectionError) and error.reason == "queue_timeout"
    assert str(error) == "dropped"
