"""server/psycopg_internals.py: the fast path is the one in use, and the fallbacks work.

The fast path uses psycopg's private query classes and libpq's
``PQsendPipelineSync``; the fallbacks (psycopg's public ``mogrify``,
``PQpipelineSync``) serve other versions.  Each statement below runs through
both and through a plain psycopg cursor, which must all agree.
"""

from __future__ import annotations

import datetime
import select
import uuid
from collections.abc import Iterator
from decimal import Decimal
from importlib import metadata
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg.adapt import Transformer
from psycopg.types.json import Jsonb

from dbpool.server import psycopg_internals
from dbpool.server.psycopg_internals import TESTED, Converter, send_pipeline_sync

STATEMENTS: list[tuple[str, Any]] = [
    ("SELECT %s::int + 1", [41]),
    ("SELECT %(a)s::text || %(b)s::text", {"a": "x'y", "b": "z\\"}),
    ("SELECT %s, %s, %s", [None, True, Decimal("1.50")]),
    ("SELECT %s::date, %s::timestamptz", [datetime.date(2026, 12, 4),
                                         datetime.datetime(2026, 12, 4, 10, 0,
                                                           tzinfo=datetime.UTC)]),
    ("SELECT %s::uuid, %s::jsonb", [uuid.UUID(int=7), Jsonb({"k": [1, 2]})]),
    ("SELECT %s::int[]", [[1, None, 3]]),
    ("SELECT 'no parameters'", None),
]


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


def run(conn: psycopg.Connection[Any], converter: Converter, sql: str, params: Any,
        flush: bool = False) -> list[tuple[Any, ...]]:
    """``sql`` through the converter and libpq's pipeline, rows loaded by psycopg."""
    pgconn = conn.pgconn
    text, values, types, formats = converter.convert(sql, params)
    pgconn.enter_pipeline_mode()
    try:
        pgconn.send_query_params(text, values, param_types=types, param_formats=formats)
        send_pipeline_sync(pgconn, flush=flush)
        while pgconn.flush():
            select.select([], [pgconn.socket], [], 5)
        results = []
        while True:
            if pgconn.is_busy():
                select.select([pgconn.socket], [], [], 5)
                pgconn.consume_input()
                continue
            result = pgconn.get_result()
            if result is not None and result.status == pq.ExecStatus.PIPELINE_SYNC:
                break
            if result is not None:
                results.append(result)
    finally:
        pgconn.exit_pipeline_mode()
    (result,) = results
    assert result.status == pq.ExecStatus.TUPLES_OK, result.error_message
    tx = Transformer(conn)
    tx.set_pgresult(result)
    return tx.load_rows(0, result.ntuples, tuple)


def test_the_installed_psycopg_is_the_tested_one_and_the_fast_path_is_in_use() -> None:
    major, minor = (int(part) for part in metadata.version("psycopg").split(".")[:2])
    assert TESTED[0] <= (major, minor) < TESTED[1]
    assert psycopg_internals.FAST


@pytest.mark.parametrize(("sql", "params"), STATEMENTS)
@pytest.mark.parametrize("fallback", [False, True], ids=["private", "public"])
def test_both_converters_give_what_a_cursor_gives(
    conn: psycopg.Connection[Any], sql: str, params: Any, fallback: bool
) -> None:
    converter = Converter(conn, Transformer(conn), fallback=fallback)
    assert converter.binds is not fallback
    expected = conn.execute(sql, params).fetchall()
    assert run(conn, converter, sql, params) == expected
    assert run(conn, converter, sql, params, flush=True) == expected  # PQpipelineSync too


@pytest.mark.parametrize("fallback", [False, True], ids=["private", "public"])
def test_both_merge_parameters_into_a_copy_statement(
    conn: psycopg.Connection[Any], fallback: bool
) -> None:
    converter = Converter(conn, Transformer(conn), fallback=fallback)
    statement = converter.merge("COPY (SELECT %s::int, %s::text) TO STDOUT", [7, "a'b"])
    with conn.cursor().copy(statement) as copy:
        assert b"".join(bytes(block) for block in copy) == b"7\ta'b\n"
