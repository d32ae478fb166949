"""Ask a PostgreSQL server what it sees, over a connection of the test's own."""

from __future__ import annotations

import time

import psycopg


def backends(dsn: str, application_name: str) -> dict[int, str]:
    """``{pid: application_name}`` of sessions whose name starts with ``application_name``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (application_name + "%",),
        ).fetchall()
    return dict(rows)


def active_queries(dsn: str, application_name: str) -> list[str]:
    """The statements still running in sessions named ``application_name``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
            (application_name,),
        ).fetchall()
    return [row[0] for row in rows]


def running_after(dsn: str, application_name: str, needle: str,
                  timeout: float = 5.0) -> list[str]:
    """The statements containing ``needle`` still running in sessions named
    ``application_name`` once none is, or ``timeout`` seconds have passed.

    For a cancel, which is sent to the server on its own connection and may
    arrive a moment after the caller it concerns has been told: the server's
    own view is asked again until the statement is gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        running = [q for q in active_queries(dsn, application_name) if needle in q]
        if not running or time.monotonic() >= deadline:
            return running


def advisory_lock_free(dsn: str, key: int, wait: str = "5s") -> bool:
    """Whether a session of the test's own can take transaction advisory lock ``key``,
    waiting up to ``wait`` (a PostgreSQL interval) for whoever holds it."""
    with psycopg.connect(dsn) as other:
        other.execute(f"SET lock_timeout = '{wait}'")
        try:
            other.execute("SELECT pg_advisory_xact_lock(%s)", [key])
        except psycopg.errors.LockNotAvailable:
            return False
        return True
