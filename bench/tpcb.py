"""The real-transaction row of ``dbpool bench --remote``: pgbench's TPC-B-like transaction.

One client (this process, one thread) runs pgbench's built-in transaction in
a loop, in turns of ``duration`` seconds, three ways:

- ``dbpool_transaction``: :class:`dbpool.client.Client` through ``dbpool
  serve``, ``with client.transaction() as tx:`` and the five statements one
  ``tx.query`` at a time, committed as the block ends (seven round trips, as
  pgbench's own ``BEGIN`` ... ``END``);
- ``dbpool_batch``: the same client, the five statements in one
  ``client.batch`` (outside a transaction a batch is atomic: the whole
  transaction in one round trip);
- ``pgbouncer``: a psycopg connection to a PgBouncer in transaction mode,
  ``with conn.transaction():`` and the statements one at a time.

The transaction, with ``aid``, ``tid``, ``bid`` and ``delta`` drawn at random
as pgbench does at scale :data:`SCALE`::

    UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
    SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
    UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
    UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
    INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
        VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);

The tables are pgbench's, in the benchmark's database: reused if they hold
scale 1's rows, else made with ``pgbench -i`` (or, without the pgbench
binary, with SQL of our own to the same effect).  ``pgbench_history`` is
emptied once the warm-up is over, so that it holds the measured turns' rows
only and does not grow from run to run.

Both poolers keep :data:`POOL_SIZE` server connections.  Each turn also
reports where the CPU went, in microseconds per transaction: in the client
process (this one), in the pooler's process (``dbpool serve`` or PgBouncer)
and in PostgreSQL's processes.  The contenders take turns in an order that
rotates from round to round; a rate is the median over rounds, a ratio the
median of the per-round ratios.  The targets, in transactions per second
against PgBouncer's: dbpool's transaction at least as many
(:data:`TRANSACTION_THRESHOLD`), dbpool's batch at least three times as many
(:data:`BATCH_THRESHOLD`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .servers import (
    Backend,
    PairedTurn,
    ServerError,
    cpu_now,
    median_cpu,
    median_ratio,
    one_line,
    start_poolers,
)
from .table import cell, ratio

if TYPE_CHECKING:
    from dbpool.client import Client

__all__ = ["BATCH_THRESHOLD", "CONTENDERS", "POOL_SIZE", "SCALE", "TRANSACTION_THRESHOLD",
           "find_pgbench", "prepare_tables", "print_tpcb", "run_tpcb"]

logger = logging.getLogger("dbpool.bench.tpcb")

#: pgbench's scale factor: branches; ten tellers and 100,000 accounts per branch.
SCALE = 1
TELLERS_PER_BRANCH = 10
ACCOUNTS_PER_BRANCH = 100_000
#: Server connections behind either pooler (pgbench's tables are tiny: a few suffice).
POOL_SIZE = 4
#: dbpool's transactions/s over PgBouncer's, at least: statement by statement...
TRANSACTION_THRESHOLD = 1.0
#: ... and as one batch.
BATCH_THRESHOLD = 3.0
CONTENDERS = ("dbpool_transaction", "dbpool_batch", "pgbouncer")
#: Seconds a client may wait for one answer before the turn counts as failed.
REQUEST_TIMEOUT = 30.0
#: Seconds each contender runs before the rounds, after its checked transaction.
WARM_UP = 0.2

UPDATE_ACCOUNT = "UPDATE pgbench_accounts SET abalance = abalance + %s WHERE aid = %s"
SELECT_BALANCE = "SELECT abalance FROM pgbench_accounts WHERE aid = %s"
UPDATE_TELLER = "UPDATE pgbench_tellers SET tbalance = tbalance + %s WHERE tid = %s"
UPDATE_BRANCH = "UPDATE pgbench_branches SET bbalance = bbalance + %s WHERE bid = %s"
INSERT_HISTORY = ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                  "VALUES (%s, %s, %s, %s, CURRENT_TIMESTAMP)")
#: Where the SELECT is among a transaction's statements.
SELECT_INDEX = 1

#: The tables and the rows each must hold at :data:`SCALE`.
TABLE_ROWS = {
    "pgbench_branches": SCALE,
    "pgbench_tellers": TELLERS_PER_BRANCH * SCALE,
    "pgbench_accounts": ACCOUNTS_PER_BRANCH * SCALE,
    "pgbench_history": None,  # any number: emptied at setup
}
# pgbench's own definitions (fillfactor 100), the primary keys added after the
# rows are in, as ``pgbench -i`` does: the sizes, and so the work, are the same.
_CREATE_SQL = [
    "DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_history, "
    "pgbench_tellers",
    "CREATE TABLE pgbench_branches (bid int NOT NULL, bbalance int, filler char(88))",
    "CREATE TABLE pgbench_tellers (tid int NOT NULL, bid int, tbalance int, filler char(84))",
    "CREATE TABLE pgbench_accounts (aid int NOT NULL, bid int, abalance int, filler char(84))",
    "CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, "
    "filler char(22))",
    f"INSERT INTO pgbench_branches (bid, bbalance) SELECT b, 0 FROM generate_series(1, {SCALE}) b",
    f"INSERT INTO pgbench_tellers (tid, bid, tbalance) "
    f"SELECT t, (t - 1) / {TELLERS_PER_BRANCH} + 1, 0 "
    f"FROM generate_series(1, {TELLERS_PER_BRANCH * SCALE}) t",
    # pgbench fills the accounts' filler with '' (84 blanks), the others' with NULL.
    f"INSERT INTO pgbench_accounts (aid, bid, abalance, filler) "
    f"SELECT a, (a - 1) / {ACCOUNTS_PER_BRANCH} + 1, 0, '' "
    f"FROM generate_series(1, {ACCOUNTS_PER_BRANCH * SCALE}) a",
    "ALTER TABLE pgbench_branches ADD PRIMARY KEY (bid)",
    "ALTER TABLE pgbench_tellers ADD PRIMARY KEY (tid)",
    "ALTER TABLE pgbench_accounts ADD PRIMARY KEY (aid)",
]

Statement = tuple[str, tuple[int, ...]]
#: One way to run a transaction: its statements in, the SELECT's rows out.
Transaction = Callable[[Sequence[Statement]], list[tuple[Any, ...]]]
#: A contender: how it runs a transaction, and the pid of its pooler's process.
Contender = tuple[Transaction, int]


class WrongResult(RuntimeError):
    """A contender's transaction did not do what pgbench's does."""


def find_pgbench() -> str | None:
    """The pgbench binary: on ``$PATH``, else the newest under ``/usr/lib/postgresql``."""
    found = shutil.which("pgbench")
    if found:
        return found

    def version(path: str) -> tuple[int, ...]:
        name = path.split(os.sep)[-3]  # /usr/lib/postgresql/<version>/bin/pgbench
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates = [path for path in glob.glob("/usr/lib/postgresql/*/bin/pgbench")
                  if os.access(path, os.X_OK)]
    return max(candidates, key=version) if candidates else None


def _tables_ready(conn: psycopg.Connection[Any]) -> bool:
    for table, rows in TABLE_ROWS.items():
        if conn.execute("SELECT to_regclass(%s)", [table]).fetchone() in (None, (None,)):
            return False
        if rows is not None:
            # The names are ours (TABLE_ROWS), not input: formatting them in is safe.
            counted = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            if counted is None or counted[0] != rows:
                logger.warning("%s holds %s rows, not scale %s's %s: making the tables "
                               "afresh", table, counted and counted[0], SCALE, rows)
                return False
    return True


def _pgbench_init(pgbench: str, dsn: str) -> None:
    params = conninfo_to_dict(dsn)
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:  # in the environment, not on a command line others can read
        env["PGPASSWORD"] = str(password)
    done = subprocess.run([pgbench, "-i", "-s", str(SCALE), "-q", make_conninfo("", **params)],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench -i exited with status {done.returncode}: "
                           f"{' '.join(done.stderr.split()[-40:])}")


def prepare_tables(dsn: str, pgbench: str | None) -> str:
    """Make sure pgbench's tables hold scale :data:`SCALE`'s rows at ``dsn``; say how.

    Tables that do are reused (``"reused"``); otherwise they are made afresh
    with ``pgbench -i`` (``"pgbench -i"``) if ``pgbench`` is a binary, else
    with SQL of our own (``"SQL"``).  ``pgbench_history`` is not emptied here:
    :func:`run_tpcb` does it after its warm-up.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        if _tables_ready(conn):
            return "reused"
        if pgbench is None:
            with conn.transaction():
                for sql in _CREATE_SQL:
                    conn.execute(sql)
            conn.execute("VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts, "
                         "pgbench_history")
            how = "SQL"
        else:
            _pgbench_init(pgbench, dsn)
            how = "pgbench -i"
        if not _tables_ready(conn):
            raise RuntimeError(f"the tables made with {how} do not hold scale {SCALE}'s rows")
    logger.info("pgbench tables at scale %s made with %s", SCALE, how)
    return how


def _draw(rng: random.Random) -> list[Statement]:
    """One transaction's statements, with pgbench's random draws."""
    aid = rng.randint(1, ACCOUNTS_PER_BRANCH * SCALE)
    tid = rng.randint(1, TELLERS_PER_BRANCH * SCALE)
    bid = rng.randint(1, SCALE)
    delta = rng.randint(-5000, 5000)
    return [(UPDATE_ACCOUNT, (delta, aid)), (SELECT_BALANCE, (aid,)),
            (UPDATE_TELLER, (delta, tid)), (UPDATE_BRANCH, (delta, bid)),
            (INSERT_HISTORY, (tid, bid, aid, delta))]


def _balance(rows: list[tuple[Any, ...]]) -> int:
    """The SELECT's one balance; WrongResult if it did not return one row of one int."""
    if len(rows) != 1 or len(rows[0]) != 1 or not isinstance(rows[0][0], int):
        raise WrongResult(f"the SELECT returned {rows!r}, not one balance")
    balance: int = rows[0][0]
    return balance


def _dbpool_transaction(client: Client) -> Transaction:
    def run(statements: Sequence[Statement]) -> list[tuple[Any, ...]]:
        with client.transaction() as tx:
            results = [tx.query(sql, params) for sql, params in statements]
        return results[SELECT_INDEX].rows

    return run


def _dbpool_batch(client: Client) -> Transaction:
    def run(statements: Sequence[Statement]) -> list[tuple[Any, ...]]:
        results = client.batch(statements)
        if len(results) != len(statements):
            raise WrongResult(f"the batch of {len(statements)} statements returned "
                              f"{len(results)} results")
        return results[SELECT_INDEX].rows

    return run


def _pgbouncer(conn: psycopg.Connection[Any]) -> Transaction:
    def run(statements: Sequence[Statement]) -> list[tuple[Any, ...]]:
        with conn.transaction():
            cursors = [conn.execute(sql, params) for sql, params in statements]
            return cursors[SELECT_INDEX].fetchall()

    return run


def _check(name: str, run: Transaction, admin: psycopg.Connection[Any],
           rng: random.Random) -> None:
    """One transaction of ``run``, checked against the tables read directly: it added one
    history row and its SELECT saw the account's new balance.  WrongResult if not: a
    contender that skips a statement would otherwise look fast."""
    statements = _draw(rng)
    aid = statements[SELECT_INDEX][1][0]

    def history() -> int:
        row = admin.execute("SELECT count(*) FROM pgbench_history").fetchone()
        return row[0] if row else -1

    before = history()
    seen = _balance(run(statements))
    added = history() - before
    row = admin.execute(SELECT_BALANCE, [aid]).fetchone()
    if added != 1:
        raise WrongResult(f"{name}: one transaction added {added} history rows, not 1")
    if row is None or row[0] != seen:
        raise WrongResult(f"{name}: the SELECT saw balance {seen}, the table holds "
                          f"{row and row[0]}")


def _drive(run: Transaction, duration: float,
           rng: random.Random) -> tuple[int, float, list[str]]:
    """``run`` in a loop until ``duration`` has passed: (transactions committed, seconds,
    errors).  The first error ends the loop."""
    done = 0
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + duration
    try:
        while time.perf_counter() < deadline:
            _balance(run(_draw(rng)))
            done += 1
    except Exception as exc:
        errors.append(one_line(exc))
    return done, time.perf_counter() - started, errors


def _turns(contenders: dict[str, Contender], duration: float, rounds: int,
           rng: random.Random) -> list[PairedTurn]:
    names = list(contenders)
    turns: list[PairedTurn] = []
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            run, pid = contenders[name]
            before = cpu_now(pid)
            done, seconds, errors = _drive(run, duration, rng)
            after = cpu_now(pid)
            if errors:
                logger.warning("%s, round %s: %s", name, round_ + 1, "; ".join(errors))
            turn = PairedTurn(name, round_, done, seconds, errors)
            turn.charge(before, after)
            turns.append(turn)
    return turns


def _warm_up(contenders: dict[str, Contender], admin: psycopg.Connection[Any],
             rng: random.Random, unavailable: dict[str, str]) -> None:
    """Check each contender once and warm it up; one that fails either is left out, with
    its reason in ``unavailable`` (as ``"tpcb <name>"``: the dict is shared with the other
    rows, for which ``"dbpool"`` or ``"pgbouncer"`` would mean the pooler is down)."""
    for name, (run, _) in list(contenders.items()):
        try:
            _check(name, run, admin, rng)
        except Exception as exc:
            logger.error("tpcb: %s left out: %s", name, one_line(exc))
            unavailable[f"tpcb {name}"] = one_line(exc)
            del contenders[name]
            continue
        _, _, errors = _drive(run, WARM_UP, rng)
        if errors:
            logger.error("tpcb: %s left out, its warm-up failed: %s", name, errors[0])
            unavailable[f"tpcb {name}"] = errors[0]
            del contenders[name]


def run_tpcb(dsn: str, backend: Backend | None, bouncer_binary: str | None,
             duration: float, rounds: int,
             unavailable: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure the three contenders (those that start and pass their check); return the
    row's figures.

    A contender that cannot start, or whose checked first transaction goes
    wrong, is left out with its reason in ``unavailable``; its rate and
    ratio are then None.  Likewise all three if pgbench's tables cannot be made.
    """
    unavailable = {} if unavailable is None else unavailable
    rng = random.Random()
    turns: list[PairedTurn] = []
    try:
        prepare_tables(dsn, find_pgbench())
    except (psycopg.Error, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.error("tpcb: pgbench's tables could not be made: %s", one_line(exc))
        unavailable["tpcb"] = f"pgbench's tables could not be made: {one_line(exc)}"
    else:
        with contextlib.ExitStack() as stack:
            bouncer, server = start_poolers(stack, dsn, backend, bouncer_binary, POOL_SIZE,
                                            unavailable)
            contenders: dict[str, Contender] = {}
            if server is not None:
                try:
                    client = stack.enter_context(server.client(REQUEST_TIMEOUT))
                except ServerError as exc:
                    unavailable["tpcb dbpool"] = str(exc)
                else:
                    contenders["dbpool_transaction"] = (_dbpool_transaction(client), server.pid)
                    contenders["dbpool_batch"] = (_dbpool_batch(client), server.pid)
            if bouncer is not None and bouncer.proc is not None:
                # prepare_threshold=None: transaction pooling and psycopg's prepared
                # statements do not mix unless PgBouncer tracks them.
                try:
                    conn = stack.enter_context(psycopg.connect(
                        bouncer.dsn, autocommit=True, prepare_threshold=None,
                        connect_timeout=int(REQUEST_TIMEOUT)))
                except psycopg.Error as exc:
                    unavailable["tpcb pgbouncer"] = one_line(exc)
                else:
                    contenders["pgbouncer"] = (_pgbouncer(conn), bouncer.pid)
            admin = stack.enter_context(psycopg.connect(dsn, autocommit=True))
            _warm_up(contenders, admin, rng, unavailable)
            admin.execute("TRUNCATE pgbench_history")
            if contenders:
                turns = _turns(contenders, duration, rounds, rng)
    tps: dict[str, int | None] = {}
    for name in CONTENDERS:
        mine = [t for t in turns if t.contender == name and not t.errors]
        tps[name] = round(statistics.median(t.per_second for t in mine)) if mine else None
    cpu = {name: median_cpu(turns, name) for name in CONTENDERS}
    return {
        "pool_size": POOL_SIZE,
        "tps": tps,
        "transaction/pgbouncer": median_ratio(turns, "dbpool_transaction", "pgbouncer"),
        "batch/pgbouncer": median_ratio(turns, "dbpool_batch", "pgbouncer"),
        "cpu_us_per_transaction": cpu,
        "turns": [asdict(t) | {"per_second": round(t.per_second)} for t in turns],
    }


def print_tpcb(report: dict[str, Any]) -> None:
    """Print :func:`run_tpcb`'s report as a section of ``dbpool bench --remote``'s."""
    tps = report["tps"]
    print(f"\npgbench's TPC-B-like transaction (5 statements), 1 client, transactions/s "
          f"(pool of {report['pool_size']} behind either):")
    labels = {"dbpool_transaction": "dbpool client.transaction(), statement by statement",
              "dbpool_batch": "dbpool client.batch(), all 5 in one round trip",
              "pgbouncer": "pgbouncer, conn.transaction(), statement by statement"}
    width = max(map(len, labels.values())) + 1
    for name, label in labels.items():
        print(f"  {label + ':':<{width}} {cell(tps[name], 7)}")
    print(f"  transaction/pgbouncer: {ratio(report['transaction/pgbouncer'])} "
          f"(target {TRANSACTION_THRESHOLD:.2f}x)")
    print(f"  batch/pgbouncer:       {ratio(report['batch/pgbouncer'])} "
          f"(target {BATCH_THRESHOLD:.2f}x)")
    heading = "CPU µs per transaction (median):"
    print(f"  {heading:<{len(heading) + 1}}"
          + " ".join(f"{where:>8}" for where in ("client", "pooler", "postgres")))
    for name, cpu in report["cpu_us_per_transaction"].items():
        print(f"  {name + ':':>{len(heading) + 1}}" + " ".join(
            cell(cpu[where], 8, ".1f") for where in ("client", "server", "postgres")))
    errors = sorted({(t["contender"], error) for t in report["turns"] for error in t["errors"]})
    for name, error in errors:
        print(f"  error ({name}): {error}")
