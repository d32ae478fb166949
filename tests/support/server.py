"""Ask a PostgreSQL server what it sees, over a connection of the test's own."""

from __future__ import annotations

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
