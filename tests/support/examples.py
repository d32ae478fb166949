"""Running an example application's own test suite, for the sandbox tests.

The example applications (``tests/example_app``, ``tests/example_sqlalchemy_app``)
each have a pytest suite of their own, run in a fresh interpreter with their
own ini file and rootdir, configured through environment variables that
start with their prefix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg


def run_example_suite(folder: Path, prefix: str, settings: dict[str, str], *args: str,
                      sandboxed: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``folder``'s suite with ``settings`` (``{PREFIX}NAME`` variables), and
    ``{PREFIX}NO_SANDBOX=1`` unless ``sandboxed``; nothing of this run's pytest leaks in."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTEST_", prefix))}
    env.update({prefix + name: value for name, value in settings.items()})
    if not sandboxed:
        env[prefix + "NO_SANDBOX"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(folder / "pytest.ini"),
         "--rootdir", str(folder), "-p", "no:randomly", *args],
        cwd=folder, env=env, capture_output=True, text=True, timeout=100, check=False)


def identity_used(dsn: str, table: str) -> bool:
    """Whether any id was ever drawn for ``table`` (a rollback does not give them back)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_sequence_last_value(pg_get_serial_sequence(%s, 'id'))",
                           [table]).fetchone()
    return row is not None and row[0] is not None
