"""``dbpool bench --stream-rows``: the streaming memory benchmark's own checks.

The 10-million-row figure comes from the benchmark command (see docs/guide/queries.md);
these tests check that the command streams every row and that its memory
gauge does see growth, so that a leaking stream could not pass unnoticed.
"""

from __future__ import annotations

import pytest

from dbpool.bench import inprocess as bench
from dbpool.cli import main


def test_the_stream_benchmark_reads_every_row_and_reports_its_memory(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = bench.stream(pg_dsn, rows=100_000, max_rows=1000)
    assert report["rows"] == 100_000
    assert report["batches"] == 100
    assert report["within_limit"] is True
    assert 0 <= report["peak_rss_growth_mb"] < report["limit_mb"]
    assert "100,000 rows in 100 batches" in capsys.readouterr().out


def test_the_memory_gauge_sees_a_peak_that_is_already_gone() -> None:
    bench._reset_peak_rss()
    before = bench._rss_bytes()
    block = bytearray(64 * 2**20)  # zero-filled: every page is touched
    del block
    assert bench._peak_rss_bytes() - before >= 60 * 2**20


def test_the_command_fails_when_the_growth_reaches_the_limit(pg_dsn: str) -> None:
    # A limit of 0 MB cannot be met: the exit status says so.
    assert main(["bench", "--dsn", pg_dsn, "--stream-rows", "1000",
                 "--rss-limit-mb", "0"]) == 1
    assert main(["bench", "--dsn", pg_dsn, "--stream-rows", "1000"]) == 0
