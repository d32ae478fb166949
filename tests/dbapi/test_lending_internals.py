"""``dbpool.dbapi.lending.set_autocommit``: psycopg's setter at the cost of an assignment.

It writes psycopg's own attribute; these cases hold it to the psycopg
version installed: the mode it sets is the one psycopg reports and acts on,
and in a transaction it refuses as psycopg does.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from dbpool.dbapi.lending import set_autocommit


def test_it_sets_the_mode_psycopg_reports_and_acts_on(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as raw:
        set_autocommit(raw, False)
        assert raw.autocommit is False
        raw.execute("SELECT 1")
        assert raw.info.transaction_status == TransactionStatus.INTRANS  # implicit BEGIN
        raw.rollback()
        set_autocommit(raw, True)
        assert raw.autocommit is True
        raw.execute("SELECT 1")
        assert raw.info.transaction_status == TransactionStatus.IDLE


def test_in_a_transaction_it_refuses_as_psycopg_does(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as raw:
        raw.execute("SELECT 1")
        with pytest.raises(psycopg.ProgrammingError, match="autocommit"):
            set_autocommit(raw, True)
        assert raw.autocommit is False
