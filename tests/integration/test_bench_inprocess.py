"""The in-process benchmark runs end to end and judges its targets itself."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from dbpool.bench.inprocess import SCENARIOS, TARGETS, judge


def _row(threads: int, **ratio: float) -> dict[str, Any]:
    return {"threads": threads, "ratio": {k.replace("_over_", "/"): v for k, v in ratio.items()}}


def test_each_target_is_judged_on_its_own_row() -> None:
    judged = {t["name"]: t for t in judge([
        _row(1, dbpool_over_psycopg=0.97, dbpool_over_psycopg_pool=1.2),
        _row(64, dbpool_over_psycopg=1.0, dbpool_over_psycopg_pool=1.5)])}
    assert judged["threads_64"]["status"] == "PASS" and judged["threads_64"]["value"] == 1.5
    assert judged["threads_1"]["status"] == "FAIL" and judged["threads_1"]["value"] == 0.97
    missing = {t["name"]: t["status"] for t in judge([_row(1, dbpool_over_psycopg=1.1)])}
    assert missing == {"threads_64": "NOT MEASURED", "threads_1": "PASS"}


def test_a_short_run_measures_every_scenario_and_judges_every_target(pg_dsn: str) -> None:
    script = ("import sys; from dbpool.bench.inprocess import run; "
              "run(sys.argv[1], duration=0.05, rounds=1, as_json=True)")
    done = subprocess.run([sys.executable, "-c", script, pg_dsn], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert [r["threads"] for r in report["scenarios"]] == [t for t, _ in SCENARIOS]
    for row in report["scenarios"]:
        assert all(v > 0 for v in row["qps"].values()), row
    statuses = {t["name"]: t["status"] for t in report["targets"]}
    assert set(statuses) == {name for name, *_ in TARGETS}
    assert all(s in ("PASS", "FAIL") for s in statuses.values()), statuses
    assert report["ok"] == all(s == "PASS" for s in statuses.values())
