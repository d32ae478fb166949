"""The remote benchmark runs end to end: every contender, every measurement, the targets.

A short run (one process, short turns, 50 idle clients) in a child process,
as ``dbpool bench --remote --json`` runs: it starts PgBouncer and ``dbpool
serve`` itself.  The numbers of so short a run mean nothing; what is checked
is that every contender was measured and every target was judged.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dbpool.bench.remote import Turn, _print_report, _report
from dbpool.bench.servers import find_pgbouncer


def test_a_short_remote_benchmark_measures_every_contender_and_judges_every_target(
    pg_dsn: str,
) -> None:
    if find_pgbouncer() is None:
        pytest.skip("pgbouncer is not installed (CI installs it)")
    script = (
        "import sys; from dbpool.bench.remote import run_remote; "
        "run_remote(sys.argv[1], processes=[1], duration=0.3, rounds=1, as_json=True, "
        "idle_clients=50, tasks=16, overload_seconds=0)"
    )
    done = subprocess.run([sys.executable, "-c", script, pg_dsn], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"):])
    (scenario,) = report["scenarios"]
    for contender in ("psycopg", "pgbouncer", "dbpool"):
        assert scenario["qps"][contender] > 0, (contender, scenario)
    # Where each contender's CPU went, per query.  A direct connection has no pooler,
    # and its backend's CPU leaves with it at the end of its turn: only its client's.
    cpu = scenario["cpu_us_per_query"]
    for contender in ("pgbouncer", "dbpool"):
        assert all(cpu[contender][where] > 0 for where in ("client", "server", "postgres")), cpu
    assert cpu["psycopg"]["client"] > 0, cpu
    assert cpu["psycopg"]["server"] is None and cpu["psycopg"]["postgres"] is None, cpu
    assert report["pgbouncer"]["version"]
    assert report["latency_us"]["dbpool"] > 0 and report["latency_us"]["pgbouncer"] > 0
    assert report["batch"]["dbpool_statements_per_second"] > 0
    idle = report["idle_clients"]
    assert idle["clients"] == 50 and idle["pongs"] == 50, idle
    statuses = {t["name"]: t["status"] for t in report["targets"]}
    for n in (4, 16, 64):  # those process counts were not asked for
        assert statuses[f"throughput_{n}"] == "SKIPPED"
    assert statuses["latency_1"] in ("PASS", "FAIL")
    assert statuses["batch_100"] in ("PASS", "FAIL")
    many = report["many_tasks"]
    assert many["tasks"] == 16
    assert many["qps"]["dbpool"] > 0 and many["qps"]["pgbouncer"] > 0, many
    for contender in ("dbpool", "pgbouncer"):
        cpu = many["cpu_us_per_query"][contender]
        assert cpu["client"] > 0 and cpu["server"] > 0 and cpu["postgres"] > 0, many
    assert statuses["asyncio_tasks"] in ("PASS", "FAIL")
    tpcb = report["tpcb"]
    for contender in ("dbpool_transaction", "dbpool_batch", "pgbouncer"):
        assert tpcb["tps"][contender] > 0, tpcb
    assert statuses["tpcb_transaction"] in ("PASS", "FAIL")
    assert statuses["tpcb_batch"] in ("PASS", "FAIL")
    assert statuses["overload_p99"] == "SKIPPED"  # its own test runs it (test_bench_overload)


def test_the_report_judges_by_the_median_round_and_shows_every_rounds_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Three rounds at 4 processes whose ratios are 0.5, 1.5 and 1.0 (in that order):
    # the target is judged on their median, and each round's ratio is kept and shown.
    rates = {"pgbouncer": [100.0, 100.0, 100.0], "dbpool": [50.0, 150.0, 100.0],
             "dbpool_curve": [45.0, 120.0, 100.0]}
    turns = [Turn(name, 4, 4, round_, statements=int(rate), seconds=1.0, per_second=rate)
             for name, by_round in rates.items() for round_, rate in enumerate(by_round)]
    report = _report(turns, [4], 1.0, 3, None, {}, None, None, None, None)
    (scenario,) = report["scenarios"]
    assert scenario["dbpool/pgbouncer"] == 1.0
    assert scenario["rounds"]["dbpool/pgbouncer"] == [0.5, 1.5, 1.0]
    assert scenario["rounds"]["curve/plain"] == [0.9, 0.8, 1.0]
    assert scenario["curve/plain"] == 0.9
    statuses = {t["name"]: (t["status"], t["value"]) for t in report["targets"]}
    assert statuses["throughput_4"] == ("PASS", 1.0)
    _print_report({**report, "elapsed_seconds": 9.0})
    printed = capsys.readouterr().out
    assert "        4  dbpool/pgbouncer: 0.50 1.00 1.50" in printed, printed
    assert "        4       curve/plain: 0.80 0.90 1.00" in printed, printed
