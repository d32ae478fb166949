"""The real-transaction row of the remote benchmark runs end to end, and commits what it counts.

A short run (one round of short turns) against a private cluster of its own,
so that nothing else writes to pgbench's tables meanwhile: it starts
PgBouncer and ``dbpool serve`` itself and makes the tables with ``pgbench
-i`` (or its own SQL where there is no pgbench).  The numbers of so short a
run mean nothing; what is checked is that every contender ran transactions
and that every transaction counted was committed whole.
"""

from __future__ import annotations

import psycopg
import pytest

from dbpool.bench.servers import Backend, find_pgbouncer
from dbpool.bench.tpcb import CONTENDERS, TABLE_ROWS, prepare_tables, print_tpcb, run_tpcb
from tests.support.pgcluster import PgCluster


def test_every_contender_commits_each_transaction_it_counts_whole(
    pg_cluster: PgCluster, capsys: pytest.CaptureFixture[str],
) -> None:
    bouncer = find_pgbouncer()
    if bouncer is None:
        pytest.skip("pgbouncer is not installed (CI installs it)")
    dsn = pg_cluster.conninfo()
    unavailable: dict[str, str] = {}
    report = run_tpcb(dsn, Backend.resolve(dsn), bouncer, duration=0.3, rounds=1,
                      unavailable=unavailable)
    assert unavailable == {}
    for contender in CONTENDERS:
        assert report["tps"][contender] > 0, (contender, report)
    assert isinstance(report["transaction/pgbouncer"], float), report
    assert isinstance(report["batch/pgbouncer"], float), report
    for turn in report["turns"]:
        assert turn["errors"] == [], turn
    committed = sum(turn["done"] for turn in report["turns"])
    with psycopg.connect(dsn) as conn:
        # run_tpcb empties the history after its warm-up: one row per measured transaction.
        history = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()
        # Fresh tables start at zero and each transaction adds its delta to one account,
        # one teller and one branch: the three sums stay equal only if every UPDATE ran.
        sums = conn.execute("SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                            "(SELECT sum(tbalance) FROM pgbench_tellers), "
                            "(SELECT sum(bbalance) FROM pgbench_branches)").fetchone()
    assert history == (committed,)
    assert sums is not None and sums[0] == sums[1] == sums[2], sums
    print_tpcb(report)
    printed = capsys.readouterr().out
    assert "TPC-B" in printed and "transaction/pgbouncer" in printed, printed


def test_without_pgbench_its_own_sql_makes_the_tables_which_are_then_reused(
    pg_cluster: PgCluster,
) -> None:
    dsn = pg_cluster.conninfo()
    assert prepare_tables(dsn, pgbench=None) == "SQL"
    with psycopg.connect(dsn) as conn:
        for table, rows in TABLE_ROWS.items():
            counted = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert counted == (rows or 0,), table
        keys = conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'p' "
                            "AND conrelid::regclass::text LIKE 'pgbench_%'").fetchone()
        assert keys == (3,)
    assert prepare_tables(dsn, pgbench=None) == "reused"
