"""COPY, in-process and through ``dbpool serve``, against the machine's PostgreSQL.

In-process (``pool.copy_to``/``pool.copy_from``, a checked-out
``Connection``, a pool transaction, and ``AsyncConnection``) and remote
(``Client``/``AsyncClient``, outside and inside a transaction), the same
promises:

- data copied in and then out round-trips, in text and binary format, and
  is what psycopg's own ``cursor.copy()`` reads;
- parameters are merged into the statement (COPY takes none);
- data that raises aborts the COPY: no row is taken, the connection goes on;
- a ``copy_to`` left early cancels the COPY and the connection (or lease)
  goes on; inside a transaction the transaction is failed, as with psycopg;
- a COPY the wrong way round, or a statement that is no COPY, is refused
  with :class:`~dbpool.errors.StatementNotAllowed`, the latter before
  anything runs; a bad row is psycopg's ``InvalidTextRepresentation``;
- remotely, a COPY sent through ``query``/``execute``/``batch``/``stream`` is
  refused at once while other clients are served, another request on a
  lease whose COPY runs gets ``ProtocolError(code="busy")``, and 100 MB in
  and 100 MB out leave the server's resident memory nearly where it was.

The server is a ``python -m dbpool serve`` child process
(:class:`tests.support.remote.ServerProcess`); nothing is mocked.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any

import psycopg
import psycopg.errors as pg_errors
import pytest

from dbpool import copy_data
from dbpool.client import AsyncClient, Client
from dbpool.errors import ProtocolError, RolledBack, StatementNotAllowed
from dbpool.pool import Pool
from tests.support.events import wait_for
from tests.support.remote import ServerProcess

TIMEOUT = 10.0
FORMATS = {"text": "", "binary": " (FORMAT binary)"}
#: Rows with what text COPY must escape: tabs, newlines, backslashes, NULLs, non-ASCII.
ROWS: list[tuple[int, str | None]] = [
    (1, "plain"), (2, "tab\there"), (3, "new\nline"), (4, "back\\slash"), (5, None),
    (6, ""), (7, "\\N"), (8, "é ü 你好 🐘"), (9, "carriage\rreturn"), (10, "x" * 10_000),
]
#: A COPY out whose rows are produced as they are sent: long enough to need a cancel.
ENDLESS = "COPY (SELECT generate_series(1, 2000000000)) TO STDOUT"

# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection of the test's own: the reference, and the look from outside."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


def _new_table(direct: psycopg.Connection[Any], prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    direct.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    return name


@pytest.fixture
def src(direct: psycopg.Connection[Any]) -> Iterator[str]:
    """A table ``(id int primary key, v text)`` holding :data:`ROWS`, dropped afterwards."""
    name = _new_table(direct, "copy_src")
    with direct.cursor() as cur:
        cur.executemany(f"INSERT INTO {name} (id, v) VALUES (%s, %s)", ROWS)
    yield name
    direct.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def dst(direct: psycopg.Connection[Any]) -> Iterator[str]:
    """An empty table like :func:`src`, dropped afterwards."""
    name = _new_table(direct, "copy_dst")
    yield name
    direct.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture(scope="module")
def pool(pg_dsn: str) -> Iterator[Pool]:
    """An in-process pool of one connection: every call runs on the same backend."""
    started = Pool.start(pg_dsn, pool_size=1)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def server(pg_dsn: str) -> Iterator[ServerProcess]:
    """A ``dbpool serve`` of two connections: one can be busy while another serves."""
    with ServerProcess(pg_dsn, "--grace", "2", pool_size=2) as srv:
        with Client(srv.endpoint, timeout=TIMEOUT) as client:
            wait_for(lambda: client.status()["pool"]["ready_conn_count"] == 2, 10,
                     "the pool to connect")
        yield srv
        assert srv.terminate() == 0, srv.output()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.endpoint, timeout=TIMEOUT) as c:
        yield c


# -- helpers -------------------------------------------------------------------------------


def rows_of(direct: psycopg.Connection[Any], table: str) -> list[tuple[Any, ...]]:
    return direct.execute(f"SELECT id, v FROM {table} ORDER BY id").fetchall()


def psycopg_copy_out(direct: psycopg.Connection[Any], sql: str) -> bytes:
    """What psycopg's own ``cursor.copy()`` reads for ``sql``."""
    with direct.cursor() as cur, cur.copy(sql) as copy:
        return b"".join(bytes(block) for block in copy)


def in_pieces(data: bytes, size: int = 7) -> Iterator[bytes]:
    """``data`` cut into small pieces, as a generator of rows would give it."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def failing(*pieces: bytes | str, error: BaseException) -> Iterator[bytes | str]:
    """Data that gives ``pieces``, then raises ``error``."""
    yield from pieces
    raise error


def many_rows(count: int, start: int = 1000) -> bytes:
    """``count`` text rows of :func:`dst`'s shape, ids from ``start``: more than a block
    (:data:`dbpool.copy_data.BLOCK_SIZE`) when ``count`` is large, so that some of the
    data has reached the server before what comes next."""
    return b"".join(b"%d\t%s\n" % (i, b"r" * 40) for i in range(start, start + count))


def wait_server_idle(client: Client) -> dict[str, Any]:
    """Wait until the server holds no lease, stream or copy and has every connection
    back in the pool; return that status."""
    def idle() -> dict[str, Any] | None:
        status = client.status()
        server = status["server"]
        if (server["open_leases"] == 0 and server["open_streams"] == 0
                and server["open_copies"] == 0 and server["connections_held"] == 0
                and status["pool"]["ready_conn_count"] == 2):
            return status
        return None

    status: dict[str, Any] = wait_for(idle, 5, "the server to be idle")
    return status


def backend_busy_with(direct: psycopg.Connection[Any], text: str) -> bool:
    """Whether some session other than ``direct`` is running a statement containing
    ``text``."""
    row = direct.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND pid <> "
        "pg_backend_pid() AND strpos(query, %s) > 0", [text]).fetchone()
    assert row is not None
    return bool(row[0])


# -- in-process: round trips ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pool_copy_round_trips_as_psycopg(
    pool: Pool, direct: psycopg.Connection[Any], src: str, dst: str, fmt: str
) -> None:
    options = FORMATS[fmt]
    blocks = list(pool.copy_to(f"COPY {src} TO STDOUT{options}"))
    assert all(isinstance(block, bytes) for block in blocks)
    data = b"".join(blocks)
    assert data == psycopg_copy_out(direct, f"COPY {src} TO STDOUT{options}")
    result = pool.copy_from(f"COPY {dst} FROM STDIN{options}", in_pieces(data))
    assert (result.rowcount, result.command) == (len(ROWS), f"COPY {len(ROWS)}")
    assert rows_of(direct, dst) == ROWS


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_connection_copy_round_trips_in_every_data_form(
    pool: Pool, direct: psycopg.Connection[Any], src: str, dst: str, fmt: str
) -> None:
    options = FORMATS[fmt]
    with pool.checkout() as conn:
        copy = conn.copy_to(f"COPY {src} TO STDOUT{options}")
        data = copy.read()
        assert copy.result is not None and copy.result.rowcount == len(ROWS)
        assert conn.copy_from(f"COPY {dst} FROM STDIN{options}", data).rowcount == len(ROWS)
        assert conn.query(f"SELECT count(*) FROM {dst}").rows == [(len(ROWS),)]
        conn.query(f"TRUNCATE {dst}")
        assert conn.copy_from(f"COPY {dst} FROM STDIN{options}",
                              bytearray(data)).rowcount == len(ROWS)
        conn.query(f"TRUNCATE {dst}")
        assert conn.copy_from(f"COPY {dst} FROM STDIN{options}",
                              in_pieces(data, 1)).rowcount == len(ROWS)
        if fmt == "text":
            conn.query(f"TRUNCATE {dst}")
            assert conn.copy_from(f"COPY {dst} FROM STDIN", data.decode()).rowcount == len(ROWS)
        assert conn.status() == "idle"
    assert rows_of(direct, dst) == ROWS


def test_copy_in_a_pool_transaction_commits_or_rolls_back_with_it(
    pool: Pool, direct: psycopg.Connection[Any], src: str, dst: str
) -> None:
    data = psycopg_copy_out(direct, f"COPY {src} TO STDOUT")
    with pool.transaction() as conn:
        assert conn.copy_from(f"COPY {dst} FROM STDIN", data).rowcount == len(ROWS)
        assert b"".join(conn.copy_to(f"COPY {dst} TO STDOUT")) == data
        assert b"".join(pool.copy_to(f"COPY {dst} TO STDOUT")) == data  # the held connection
        assert rows_of(direct, dst) == []  # not committed yet
    assert rows_of(direct, dst) == ROWS
    with pytest.raises(RolledBack), pool.transaction() as conn:
        conn.query(f"DELETE FROM {dst}")
        conn.copy_from(f"COPY {dst} FROM STDIN", data)
        conn.rollback("undo")
    assert rows_of(direct, dst) == ROWS


@pytest.mark.asyncio
@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_async_connection_copy_round_trips(
    pool: Pool, direct: psycopg.Connection[Any], src: str, dst: str, fmt: str
) -> None:
    options = FORMATS[fmt]
    async with pool.acheckout() as conn:
        blocks = [block async for block in conn.copy_to(f"COPY {src} TO STDOUT{options}")]
        data = b"".join(blocks)
        assert data == psycopg_copy_out(direct, f"COPY {src} TO STDOUT{options}")
        result = await conn.copy_from(f"COPY {dst} FROM STDIN{options}", in_pieces(data))
        assert result.rowcount == len(ROWS)
        assert (await conn.query(f"SELECT count(*) FROM {dst}")).rows == [(len(ROWS),)]
        assert await conn.status() == "idle"
    assert rows_of(direct, dst) == ROWS


@pytest.mark.asyncio
async def test_async_pool_copy_from_checks_out_for_the_copy_and_joins_a_transaction(
    pool: Pool, direct: psycopg.Connection[Any], src: str, dst: str
) -> None:
    data = psycopg_copy_out(direct, f"COPY {src} TO STDOUT")
    result = await pool.acopy_from(f"COPY {dst} FROM STDIN", in_pieces(data))
    assert (result.rowcount, result.command) == (len(ROWS), f"COPY {len(ROWS)}")
    assert rows_of(direct, dst) == ROWS
    with pytest.raises(RolledBack):
        async with pool.atransaction() as conn:
            await conn.query(f"DELETE FROM {dst}")
            await pool.acopy_from(f"COPY {dst} FROM STDIN", data)  # the held connection
            assert (await conn.query(f"SELECT count(*) FROM {dst}")).rows == [(len(ROWS),)]
            conn.rollback("undo")
    assert rows_of(direct, dst) == ROWS


def test_params_are_merged_into_the_statement(pool: Pool) -> None:
    assert b"".join(pool.copy_to("COPY (SELECT %s::int) TO STDOUT", [42])) == b"42\n"
    assert b"".join(pool.copy_to("COPY (SELECT %s::int, %s::text) TO STDOUT",
                                 [7, "a\tb'c"])) == b"7\ta\\tb'c\n"
    with pool.checkout() as conn:
        assert conn.copy_to("COPY (SELECT %(n)s::int * 2) TO STDOUT", {"n": 21}).read() \
            == b"42\n"


def test_params_are_merged_into_copy_from(
    pool: Pool, direct: psycopg.Connection[Any], dst: str
) -> None:
    result = pool.copy_from(f"COPY {dst} FROM STDIN WITH (NULL %s)", "1\tnothing\n2\tx\n",
                            ["nothing"])
    assert result.rowcount == 2
    assert rows_of(direct, dst) == [(1, None), (2, "x")]


# -- in-process: failures ---------------------------------------------------------------------


def test_data_that_raises_aborts_the_copy_and_the_connection_goes_on(
    pool: Pool, direct: psycopg.Connection[Any], dst: str
) -> None:
    with pool.checkout() as conn:
        pid = conn.query("SELECT pg_backend_pid()").rows[0][0]
        with pytest.raises(KeyError, match="boom"):
            conn.copy_from(f"COPY {dst} FROM STDIN",
                           failing(many_rows(10_000), many_rows(10, 1), error=KeyError("boom")))
        assert conn.status() == "idle"
        assert conn.query(f"SELECT count(*) FROM {dst}").rows == [(0,)]
        assert conn.copy_from(f"COPY {dst} FROM STDIN", b"2\ttwo\n").rowcount == 1
    with pytest.raises(ValueError, match="bad data"):
        pool.copy_from(f"COPY {dst} FROM STDIN",
                       failing(many_rows(10_000).decode(), "3\tthree\n",
                               error=ValueError("bad data")))
    assert rows_of(direct, dst) == [(2, "two")]
    assert pool.query("SELECT pg_backend_pid()").rows == [(pid,)]


def test_a_copy_to_left_early_is_cancelled_and_the_connection_goes_on(
    pool: Pool, direct: psycopg.Connection[Any]
) -> None:
    marker = f"early_{uuid.uuid4().hex[:8]}"
    sql = f"COPY (SELECT generate_series(1, 2000000000) AS {marker}) TO STDOUT"
    with pool.checkout() as conn:
        pid = conn.query("SELECT pg_backend_pid()").rows[0][0]
        started = time.monotonic()
        with conn.copy_to(sql) as copy:
            assert next(iter(copy)) == b"1\n"
            assert backend_busy_with(direct, marker)
        assert time.monotonic() - started < 5
        assert not backend_busy_with(direct, marker)
        assert conn.status() == "idle"
        assert conn.query("SELECT 1").rows == [(1,)]
        for block in conn.copy_to(sql):  # a break ends it too
            assert block == b"1\n"
            break
        assert conn.query("SELECT pg_backend_pid()").rows == [(pid,)]
    for block in pool.copy_to(sql):  # and the pool's own checkout
        assert block == b"1\n"
        break
    assert pool.query("SELECT pg_backend_pid()").rows == [(pid,)]
    assert not backend_busy_with(direct, marker)


def test_a_copy_to_left_early_in_a_transaction_fails_it(pool: Pool) -> None:
    with pytest.raises(RolledBack), pool.transaction() as conn:
        with conn.copy_to(ENDLESS) as copy:
            next(iter(copy))
        assert conn.status() == "error"
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            conn.query("SELECT 1")
    assert pool.query("SELECT 1").rows == [(1,)]


@pytest.mark.asyncio
async def test_async_copy_failures_leave_the_connection_usable(
    pool: Pool, direct: psycopg.Connection[Any], dst: str
) -> None:
    async with pool.acheckout() as conn:
        with pytest.raises(KeyError):
            await conn.copy_from(f"COPY {dst} FROM STDIN", failing("1\tx\n", error=KeyError("k")))
        async with aclosing(conn.copy_to(ENDLESS)) as blocks:
            async for block in blocks:
                assert block == b"1\n"
                break
        assert await conn.status() == "idle"
        with pytest.raises(StatementNotAllowed):
            await conn.copy_from(f"COPY {dst} TO STDOUT", "1\tx\n")
        assert (await conn.query("SELECT 1")).rows == [(1,)]
    assert rows_of(direct, dst) == []


def test_a_copy_the_wrong_way_round_is_refused_and_the_connection_goes_on(
    pool: Pool, direct: psycopg.Connection[Any], src: str, dst: str
) -> None:
    with pool.checkout() as conn:
        with pytest.raises(StatementNotAllowed) as info:
            conn.copy_to(f"COPY {dst} FROM STDIN").read()
        assert info.value.scope == "copy"
        assert conn.status() == "idle"
        with pytest.raises(StatementNotAllowed) as info:
            conn.copy_from(f"COPY {src} TO STDOUT", b"1\tx\n")
        assert info.value.scope == "copy"
        assert conn.status() == "idle"
        assert conn.query("SELECT 1").rows == [(1,)]
    with pytest.raises(StatementNotAllowed):
        pool.copy_from(f"COPY {src} TO STDOUT", b"1\tx\n")
    assert rows_of(direct, dst) == []


def test_a_statement_that_is_no_copy_is_refused_before_anything_runs(
    pool: Pool, direct: psycopg.Connection[Any], dst: str
) -> None:
    consumed: list[bytes] = []

    def data() -> Iterator[bytes]:
        consumed.append(b"x")
        yield b"1\tx\n"

    insert = f"INSERT INTO {dst} (id) VALUES (1)"
    with pool.checkout() as conn:
        with pytest.raises(StatementNotAllowed) as info:
            conn.copy_to(insert)
        assert info.value.scope == "copy" and "copy_to()" in str(info.value)
        with pytest.raises(StatementNotAllowed) as info:
            conn.copy_from(insert, data())
        assert info.value.scope == "copy" and "copy_from()" in str(info.value)
    with pytest.raises(StatementNotAllowed):
        pool.copy_from(f"SELECT 1 /* COPY {dst} FROM STDIN */", data())
    with pytest.raises(StatementNotAllowed):
        list(pool.copy_to(f"SELECT 'COPY {dst} TO STDOUT'"))
    assert consumed == []
    assert rows_of(direct, dst) == []


def test_a_bad_row_is_the_psycopg_error_and_takes_no_row(
    pool: Pool, direct: psycopg.Connection[Any], dst: str
) -> None:
    with pool.checkout() as conn:
        with pytest.raises(pg_errors.InvalidTextRepresentation) as info:
            conn.copy_from(f"COPY {dst} FROM STDIN", "1\tfine\nnot-a-number\tbad\n")
        assert isinstance(info.value, psycopg.DataError)
        assert info.value.sqlstate == "22P02"
        assert conn.status() == "idle"
        assert conn.query("SELECT 1").rows == [(1,)]
    assert rows_of(direct, dst) == []


def test_query_refuses_copy_in_process(pool: Pool, src: str) -> None:
    for sql in (f"COPY {src} TO STDOUT", f"/* a comment */ COPY {src} TO STDOUT",
                f"-- a comment\ncopy {src} to stdout"):
        with pytest.raises(StatementNotAllowed) as info:
            pool.query(sql)
        assert info.value.scope == "copy"
        with pool.checkout() as conn:
            with pytest.raises(StatementNotAllowed):
                conn.query(sql)
            assert conn.status() == "idle"
        with pytest.raises(StatementNotAllowed), pool.transaction() as conn:
            conn.query(sql)
    assert pool.query("SELECT 1").rows == [(1,)]


# -- what copy_from takes --------------------------------------------------------------------


@pytest.mark.parametrize(("data", "sizes"), [
    (b"x" * 100, [30, 30, 30, 10]),                      # one large piece is cut
    (["a" * 10, "b" * 25, "c" * 5], [10, 30]),           # small pieces are joined
    (io.BytesIO(b"y" * 70), [30, 30, 10]),               # a file is read a block at a time
    ([b"", "é" * 20, memoryview(b"z" * 5)], [30, 15]),   # str is UTF-8; empty pieces skipped
])
def test_copy_data_is_cut_into_blocks_no_larger_than_asked(data: Any, sizes: list[int]) -> None:
    blocks = list(copy_data.blocks(data, 30))
    assert [len(block) for block in blocks] == sizes
    assert all(isinstance(block, bytes) for block in blocks)


# -- remote: round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_remote_copy_round_trips_as_psycopg(
    client: Client, direct: psycopg.Connection[Any], src: str, dst: str, fmt: str
) -> None:
    options = FORMATS[fmt]
    copy = client.copy_to(f"COPY {src} TO STDOUT{options}", page_bytes=20)
    pages = list(copy)
    assert len(pages) >= 4 and all(isinstance(page, bytes) for page in pages)
    assert all(len(page) <= 20 + 10_100 for page in pages)  # a page, and one row more
    data = b"".join(pages)
    assert data == psycopg_copy_out(direct, f"COPY {src} TO STDOUT{options}")
    assert copy.result is not None
    assert (copy.result.rowcount, copy.result.command) == (len(ROWS), f"COPY {len(ROWS)}")
    result = client.copy_from(f"COPY {dst} FROM STDIN{options}", in_pieces(data, 5),
                              block_bytes=64)
    assert (result.rowcount, result.command) == (len(ROWS), f"COPY {len(ROWS)}")
    assert rows_of(direct, dst) == ROWS
    wait_server_idle(client)


def test_remote_copy_fits_a_server_with_small_messages(
    pg_dsn: str, direct: psycopg.Connection[Any], src: str, dst: str
) -> None:
    # The client's default page (1 MiB) and block (256 KiB) are more than such a
    # server takes in one message: the server pages within its limit and tells the
    # client the block size to send.
    big = "x" * 3000
    direct.execute(f"INSERT INTO {src} SELECT 1000 + i, %s FROM generate_series(1, 100) i",
                   [big])
    expected = psycopg_copy_out(direct, f"COPY {src} TO STDOUT")
    assert len(expected) > 4 * 65536
    with ServerProcess(pg_dsn, "--max-message-size", "65536", pool_size=1) as small, \
            Client(small.endpoint, timeout=TIMEOUT) as client:
        pages = list(client.copy_to(f"COPY {src} TO STDOUT"))
        assert b"".join(pages) == expected
        assert all(len(page) <= 65536 // 2 + 3100 for page in pages)  # a page, a row more
        result = client.copy_from(f"COPY {dst} FROM STDIN", expected)
        assert result.rowcount == len(ROWS) + 100
        assert small.terminate() == 0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_remote_copy_in_a_transaction(
    client: Client, direct: psycopg.Connection[Any], src: str, dst: str, fmt: str
) -> None:
    options = FORMATS[fmt]
    data = psycopg_copy_out(direct, f"COPY {src} TO STDOUT{options}")
    with client.transaction() as tx:
        assert tx.copy_from(f"COPY {dst} FROM STDIN{options}", data).rowcount == len(ROWS)
        assert tx.query(f"SELECT count(*) FROM {dst}").rows == [(len(ROWS),)]
        assert tx.copy_to(f"COPY {dst} TO STDOUT{options}", page_bytes=100).read() == data
        assert rows_of(direct, dst) == []  # not committed yet
    assert rows_of(direct, dst) == ROWS
    with client.transaction() as tx:
        tx.query(f"DELETE FROM {dst}")
        tx.copy_from(f"COPY {dst} FROM STDIN{options}", data)
        tx.rollback()
    assert rows_of(direct, dst) == ROWS
    wait_server_idle(client)


@pytest.mark.asyncio
@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_async_remote_copy_round_trips_outside_and_inside_a_transaction(
    server: ServerProcess, direct: psycopg.Connection[Any], src: str, dst: str, fmt: str
) -> None:
    options = FORMATS[fmt]

    async def pieces(data: bytes) -> AsyncIterator[bytes]:
        for piece in in_pieces(data, 11):
            yield piece

    async with AsyncClient(server.endpoint, timeout=TIMEOUT) as client:
        copy = client.copy_to(f"COPY {src} TO STDOUT{options}", page_bytes=500)
        data = await copy.read()
        assert data == psycopg_copy_out(direct, f"COPY {src} TO STDOUT{options}")
        assert copy.result is not None and copy.result.rowcount == len(ROWS)
        result = await client.copy_from(f"COPY {dst} FROM STDIN{options}", pieces(data))
        assert result.rowcount == len(ROWS)
        assert rows_of(direct, dst) == ROWS
        async with client.transaction() as tx:
            await tx.query(f"DELETE FROM {dst}")
            assert (await tx.copy_from(f"COPY {dst} FROM STDIN{options}", data)).rowcount \
                == len(ROWS)
            async with tx.copy_to(f"COPY {dst} TO STDOUT{options}") as out:
                assert b"".join([page async for page in out]) == data
            assert rows_of(direct, dst) == ROWS  # the DELETE is not committed yet
            await tx.rollback()
    assert rows_of(direct, dst) == ROWS


def test_remote_params_are_merged(client: Client, direct: psycopg.Connection[Any],
                                  dst: str) -> None:
    assert client.copy_to("COPY (SELECT %s::int) TO STDOUT", [42]).read() == b"42\n"
    assert client.copy_to("COPY (SELECT %(a)s::text, %(b)s::int) TO STDOUT",
                          {"a": "x\ty", "b": 3}).read() == b"x\\ty\t3\n"
    with client.transaction() as tx:
        assert tx.copy_to("COPY (SELECT %s::int) TO STDOUT", [7]).read() == b"7\n"
        tx.copy_from(f"COPY {dst} FROM STDIN WITH (NULL %s)", "1\tnothing\n", ["nothing"])
    assert rows_of(direct, dst) == [(1, None)]


# -- remote: failures --------------------------------------------------------------------------


def test_remote_data_that_raises_aborts_the_copy(
    client: Client, direct: psycopg.Connection[Any], dst: str
) -> None:
    with pytest.raises(KeyError, match="boom"):
        client.copy_from(f"COPY {dst} FROM STDIN", failing(many_rows(100), error=KeyError("boom")),
                         block_bytes=1)
    assert rows_of(direct, dst) == []
    assert client.copy_from(f"COPY {dst} FROM STDIN", b"2\ttwo\n").rowcount == 1
    with client.transaction() as tx:
        with pytest.raises(KeyError):
            tx.copy_from(f"COPY {dst} FROM STDIN", failing(b"3\tx\n", error=KeyError("k")),
                         block_bytes=1)
        with pytest.raises(pg_errors.InFailedSqlTransaction):  # as psycopg: the COPY failed it
            tx.query("SELECT 1")
        assert tx.rollback().command == "ROLLBACK"
    assert rows_of(direct, dst) == [(2, "two")]
    wait_server_idle(client)


def test_remote_copy_to_closed_early_is_cancelled(
    client: Client, direct: psycopg.Connection[Any]
) -> None:
    marker = f"early_{uuid.uuid4().hex[:8]}"
    sql = f"COPY (SELECT generate_series(1, 2000000000) AS {marker}) TO STDOUT"
    started = time.monotonic()
    with client.copy_to(sql, page_bytes=1000) as copy:
        first = copy.fetch()
        assert first is not None and first.startswith(b"1\n2\n")
        assert client.status()["server"]["open_copies"] == 1
    assert time.monotonic() - started < 5
    wait_for(lambda: not backend_busy_with(direct, marker), 5, "the COPY to be cancelled")
    for page in client.copy_to(sql, page_bytes=1000):  # a break ends it too
        assert page.startswith(b"1\n")
        break
    wait_server_idle(client)
    assert not backend_busy_with(direct, marker)
    assert client.query("SELECT 1").rows == [(1,)]


def test_remote_copy_to_closed_early_in_a_transaction_fails_it(
    client: Client, direct: psycopg.Connection[Any]
) -> None:
    marker = f"early_{uuid.uuid4().hex[:8]}"
    with client.transaction() as tx:
        with tx.copy_to(f"COPY (SELECT generate_series(1, 2000000000) AS {marker}) TO STDOUT",
                        page_bytes=1000) as copy:
            assert copy.fetch() is not None
        with pytest.raises(pg_errors.InFailedSqlTransaction):
            tx.query("SELECT 1")
        assert not backend_busy_with(direct, marker)
        assert tx.commit().command == "ROLLBACK"
    wait_server_idle(client)


@pytest.mark.asyncio
async def test_async_remote_copy_failures(
    server: ServerProcess, direct: psycopg.Connection[Any], dst: str
) -> None:
    async def raising() -> AsyncIterator[str]:
        yield "1\tx\n"
        raise KeyError("async boom")

    async with AsyncClient(server.endpoint, timeout=TIMEOUT) as client:
        with pytest.raises(KeyError):
            await client.copy_from(f"COPY {dst} FROM STDIN", raising(), block_bytes=1)
        started = time.monotonic()
        async with client.copy_to(ENDLESS, page_bytes=1000) as copy:
            async for page in copy:
                assert page.startswith(b"1\n")
                break
        assert time.monotonic() - started < 5
        with pytest.raises(pg_errors.InvalidTextRepresentation):
            await client.copy_from(f"COPY {dst} FROM STDIN", "x\ty\n")
        with pytest.raises(StatementNotAllowed):
            await client.copy_from(f"SELECT 1 /* COPY {dst} FROM STDIN */", "1\tx\n")
        async with client.transaction() as tx:
            with pytest.raises(ProtocolError) as info:
                async with tx.copy_to(ENDLESS, page_bytes=1000) as copy:
                    await copy.fetch()
                    await tx.query("SELECT 1")
            assert info.value.code == "busy"
            with pytest.raises(pg_errors.InFailedSqlTransaction):
                await tx.query("SELECT 1")
            await tx.rollback()
        assert (await client.query("SELECT 1")).rows == [(1,)]
    assert rows_of(direct, dst) == []


def test_remote_copy_to_the_wrong_way_round_is_refused(
    client: Client, direct: psycopg.Connection[Any], dst: str
) -> None:
    with pytest.raises(StatementNotAllowed) as info:
        client.copy_to(f"COPY {dst} FROM STDIN").read()
    assert info.value.scope == "copy"
    assert "COPY FROM STDIN" in str(info.value)
    with client.transaction() as tx:
        with pytest.raises(StatementNotAllowed):
            tx.copy_to(f"COPY {dst} FROM STDIN").read()
        with pytest.raises(pg_errors.InFailedSqlTransaction):  # the stopped COPY failed it
            tx.query("SELECT 1")
        tx.rollback()
    assert client.query("SELECT 1").rows == [(1,)]
    assert rows_of(direct, dst) == []
    wait_server_idle(client)


def test_remote_copy_from_the_wrong_way_round_is_refused_and_the_server_goes_on(
    pg_dsn: str, src: str
) -> None:
    """A regression test: before 5789124 the server never answered, its loop spinning
    on libpq's endless COPY_OUT results, for every client."""
    with ServerProcess(pg_dsn, "--grace", "1", pool_size=1) as srv:
        try:
            with Client(srv.endpoint, timeout=3.0) as client:
                for data in (b"", b"1\tx\n"):
                    with pytest.raises(StatementNotAllowed) as info:
                        client.copy_from(f"COPY {src} TO STDOUT", data)
                    assert info.value.scope == "copy"
                    assert "COPY TO STDOUT" in str(info.value)
                    assert client.query("SELECT 1").rows == [(1,)]
                with client.transaction() as tx:
                    with pytest.raises(StatementNotAllowed):
                        tx.copy_from(f"COPY {src} TO STDOUT", b"")
                    tx.rollback()
                assert client.query("SELECT count(*) FROM " + src).rows == [(len(ROWS),)]
            assert srv.terminate() == 0, srv.output()
        finally:
            srv.kill()  # a spinning server answers no SIGTERM


def test_remote_a_statement_that_is_no_copy_is_refused_before_anything_runs(
    client: Client, direct: psycopg.Connection[Any], dst: str
) -> None:
    consumed: list[bytes] = []

    def data() -> Iterator[bytes]:
        consumed.append(b"x")
        yield b"1\tx\n"

    insert = f"INSERT INTO {dst} (id) VALUES (1)"
    with pytest.raises(StatementNotAllowed) as info:
        client.copy_to(insert).read()
    assert info.value.scope == "copy" and "copy_out()" in str(info.value)
    with pytest.raises(StatementNotAllowed) as info:
        client.copy_from(insert, data())
    assert info.value.scope == "copy" and "copy_in()" in str(info.value)
    with client.transaction() as tx:
        with pytest.raises(StatementNotAllowed):
            tx.copy_from(insert, data())
        with pytest.raises(StatementNotAllowed):
            tx.copy_to(f"SELECT 'COPY {dst} TO STDOUT'").read()
        assert tx.query("SELECT 1").rows == [(1,)]  # the refusal did not fail it
    assert consumed == []
    assert rows_of(direct, dst) == []
    wait_server_idle(client)


def test_remote_a_bad_row_is_the_psycopg_error(
    client: Client, direct: psycopg.Connection[Any], dst: str
) -> None:
    with pytest.raises(pg_errors.InvalidTextRepresentation) as info:
        client.copy_from(f"COPY {dst} FROM STDIN", "1\tfine\nnot-a-number\tbad\n")
    assert isinstance(info.value, psycopg.DataError) and info.value.sqlstate == "22P02"
    assert 'invalid input syntax for type integer: "not-a-number"' in str(info.value)
    with client.transaction() as tx:
        with pytest.raises(pg_errors.InvalidTextRepresentation):
            tx.copy_from(f"COPY {dst} FROM STDIN", "x\ty\n")
        tx.rollback()
    assert client.copy_from(f"COPY {dst} FROM STDIN", "1\tfine\n").rowcount == 1
    assert rows_of(direct, dst) == [(1, "fine")]
    wait_server_idle(client)


# -- remote: COPY through the other operations, busy leases -------------------------------------


class Bystander:
    """A client that queries in a loop on a thread of its own, counting its answers."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.answers = 0
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()
        self.wait_answer()

    def _run(self) -> None:
        with Client(self.endpoint, timeout=TIMEOUT) as client:
            for i in range(1_000_000):
                if self._stop.is_set():
                    return
                try:
                    assert client.query("SELECT %s::int", [i]).rows == [(i,)]
                except BaseException as error:
                    self.errors.append(error)
                    return
                with self._cond:
                    self.answers += 1
                    self._cond.notify_all()

    def wait_answer(self, timeout: float = 1.0) -> None:
        """Wait for one more answer than there is now."""
        with self._cond:
            seen = self.answers
            assert self._cond.wait_for(lambda: self.answers > seen or self.errors, timeout), \
                "the bystander got no answer"
        assert self.errors == []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()
        assert self.errors == []


@pytest.mark.parametrize("sql", [
    "COPY {t} TO STDOUT",
    "COPY {t} FROM STDIN",
    "/* a comment first */ COPY {t} TO STDOUT",
    "-- a comment first\ncopy {t} from stdin",
    "(COPY {t} TO STDOUT)",
])
def test_remote_copy_through_the_other_operations_is_refused_at_once(
    server: ServerProcess, client: Client, dst: str, sql: str
) -> None:
    statement = sql.format(t=dst)
    before = wait_server_idle(client)["pool"]
    bystander = Bystander(server.endpoint)
    try:
        with client.transaction() as tx:
            calls: list[tuple[str, Callable[[], Any]]] = [
                ("query", lambda: client.query(statement)),
                ("execute", lambda: client.execute(statement)),
                ("batch", lambda: client.batch([("SELECT 1", None), (statement, None)])),
                ("stream", lambda: client.stream(statement).fetch()),
                ("tx query", lambda: tx.query(statement)),
                ("tx execute", lambda: tx.execute(statement)),
                ("tx batch", lambda: tx.batch([("SELECT 1", None), (statement, None)])),
                ("tx stream", lambda: tx.stream(statement).fetch()),
            ]
            for name, call in calls:
                started = time.monotonic()
                with pytest.raises(StatementNotAllowed) as info:
                    call()
                assert time.monotonic() - started < 1.0, name
                assert info.value.scope == "copy", name
                assert "copy_to()" in str(info.value), name
                if "batch" in name:
                    assert info.value.index == 1  # type: ignore[attr-defined]
                bystander.wait_answer()
            assert tx.query("SELECT 2").rows == [(2,)]  # the lease is unharmed
    finally:
        bystander.stop()
    assert bystander.answers > len(calls)
    after = wait_server_idle(client)["pool"]
    # Refused before anything ran: no connection was lost or replaced.
    assert (after["connects"], after["disconnects"]) == (before["connects"],
                                                         before["disconnects"])


def test_remote_another_request_on_a_lease_while_its_copy_runs_is_busy(
    client: Client, direct: psycopg.Connection[Any], dst: str
) -> None:
    rows = 20_000
    with client.transaction() as tx:
        others: list[tuple[str, Callable[[], Any]]] = [
            ("query", lambda: tx.query("SELECT 1")),
            ("execute", lambda: tx.execute("SELECT 1")),
            ("batch", lambda: tx.batch(["SELECT 1"])),
            ("stream", lambda: tx.stream("SELECT 1").fetch()),
            ("copy_to", lambda: tx.copy_to("COPY (SELECT 1) TO STDOUT").read()),
            ("copy_from", lambda: tx.copy_from(f"COPY {dst} FROM STDIN", "1\tx\n")),
        ]

        def busy_everywhere() -> None:
            for name, call in others:
                with pytest.raises(ProtocolError) as info:
                    call()
                assert info.value.code == "busy", name
                assert "COPY is running" in str(info.value), name

        # out: a page taken, the rest still to come
        copy = tx.copy_to(f"COPY (SELECT generate_series(1, {rows})) TO STDOUT",
                          page_bytes=1000)
        first = copy.fetch()
        assert first is not None
        busy_everywhere()
        data = first + copy.read()  # read to its end: the transaction is unharmed
        assert data == b"".join(b"%d\n" % i for i in range(1, rows + 1))

        # in: between two blocks of data
        def data_in() -> Iterator[str]:
            yield "1\tone\n"
            busy_everywhere()
            yield "2\ttwo\n"

        assert tx.copy_from(f"COPY {dst} FROM STDIN", data_in(), block_bytes=1).rowcount == 2
        assert tx.query(f"SELECT count(*) FROM {dst}").rows == [(2,)]
    assert rows_of(direct, dst) == [(1, "one"), (2, "two")]
    wait_server_idle(client)


# -- remote: bounded memory --------------------------------------------------------------------


def _rss(pid: int) -> int:
    """The resident set size of process ``pid``, in bytes (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """Samples a process's resident memory on a thread until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = _rss(pid)
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss(self.pid))

    def stop(self) -> int:
        """Stop sampling; the rise of the peak over the base, in bytes."""
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.peak = max(self.peak, _rss(self.pid))
        return self.peak - self.base


MB = 1 << 20


@pytest.mark.parametrize("megabytes", [
    pytest.param(100, id="100MB"),
    pytest.param(1024, id="1GB", marks=pytest.mark.slow),
])
def test_remote_copy_memory_stays_bounded(
    pg_dsn: str, direct: psycopg.Connection[Any], megabytes: int
) -> None:
    sink = f"copy_sink_{uuid.uuid4().hex[:12]}"
    direct.execute(f"CREATE UNLOGGED TABLE {sink} (id int, v text)")
    try:
        _copy_a_lot(pg_dsn, sink, megabytes)
    finally:
        direct.execute(f"DROP TABLE {sink}")


def _copy_a_lot(pg_dsn: str, dst: str, megabytes: int) -> None:
    row = b"1\t" + b"x" * 1000 + b"\n"
    block = row * 1000
    blocks = megabytes * MB // len(block) + 1
    with ServerProcess(pg_dsn, "--grace", "2", pool_size=1) as srv, \
            Client(srv.endpoint, timeout=60.0) as client:
        # warm up: every code path of a COPY in and out has run once
        assert client.copy_from(f"COPY {dst} FROM STDIN", block).rowcount == 1000
        assert len(client.copy_to(f"COPY {dst} TO STDOUT").read()) == len(block)
        peak = PeakRss(srv.pid)
        try:
            result = client.copy_from(f"COPY {dst} FROM STDIN WHERE false",
                                      (block for _ in range(blocks)))
            moved = 0
            for page in client.copy_to(
                    "COPY (SELECT 1, repeat('x', 1000) FROM generate_series(1, %s)) "
                    "TO STDOUT", [blocks * 1000]):
                moved += len(page)
        finally:
            rise = peak.stop()
        assert result.rowcount == 0  # every row read, none kept (WHERE false)
        assert moved == blocks * len(block) >= megabytes * MB
        assert rise < 20 * MB, f"the server's RSS rose by {rise / MB:.1f} MB"
        assert client.query("SELECT 1").rows == [(1,)]
        assert srv.terminate() == 0, srv.output()
