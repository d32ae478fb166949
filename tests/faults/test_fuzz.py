"""A fuzz campaign against ``dbpool serve``, beside a well-behaved client.

The server runs as a child process (:class:`~tests.support.remote.ServerProcess`)
with a small ``--max-message-size`` (64 KiB), a one-second
``--heartbeat-timeout`` and a three-second ``--lease-max``, on a pool of
:data:`POOL_SIZE` connections whose ``application_name`` is the run's own, in
a database of the run's own (mutated SQL can create tables: ``SELECT 1 INTO
T`` is a truncation away; the PostgreSQL server is shared), dropped at the
end.  Everything is on loopback; every loop is bounded in count and every
wait in time.

**The fuzzer** (:class:`Fuzzer`, in the test's process) sends a fixed number
of frames over raw ZeroMQ sockets: a pool of ``DEALER`` sockets (one retired
and replaced now and then), two ``REQ`` sockets, and throwaway sockets for
clients that die.  It runs many *scenarios* at once, each a generator that
yields the frames it sends and receives the replies it waits for:

- random bytes, truncations and byte flips of valid requests, valid msgpack
  of the wrong shape (not a map, unhashable keys, deep nesting, unknown or
  corrupt ext types, trailing bytes);
- valid requests of every operation (the copy ops included) with fields
  mutated: dropped, retyped, unknown keys added, wrong versions, huge or
  negative ids, odd timeouts, random or foreign lease, session, stream and
  copy ids;
- frames over ``--max-message-size`` (answered ``too_large``), frames over
  four times it on throwaway sockets (libzmq drops the peer: no reply due),
  a request of exactly the limit (served), multipart junk on ``DEALER`` and
  ``REQ`` sockets;
- hostile *SQL* in ``query``, ``execute``, ``batch`` and ``stream``:
  transaction control, ``SET`` (session and ``LOCAL``), ``RESET``,
  ``LISTEN``, ``DECLARE ... WITH HOLD``, ``PREPARE``/``EXECUTE``/
  ``DEALLOCATE``, temporary tables, ``set_config(..., false)``, advisory
  locks, ``COPY``, ``DO`` blocks, failing statements and short
  ``pg_sleep``\\ s, often mutated (case, comments, parentheses, quoting,
  truncation...); outside a lease, and inside one after a valid ``begin``,
  a lease then committed, rolled back, abandoned (it must expire), kept
  alive past ``--lease-max``, or left by a client that closes its socket;
- ``copy_out``/``copy_read`` and ``copy_in``/``copy_write``/``copy_end``
  flows, in and out of leases, finished, closed or abandoned.

Probes among the statements (``SHOW search_path``, ``EXECUTE`` of a plan a
lease prepared, a temporary table's name...) must see, outside a lease, a
fresh session's state; statements of a non-statement scope must be refused
outside a lease (kind ``statement``), and one whose scope shows only past
leading empty statements (``;SET ...``: PostgreSQL skips them, see
:func:`scope_run`) must at least not run there; no reply may break the
protocol (one frame, a map with ``id`` and one of ``ok``/``error``, no
``internal`` error).

**The victim** (:func:`victim_process`, a process of its own so that its
latencies are not the fuzzer's GIL) runs a steady workload through
:class:`dbpool.client.Client` meanwhile: ``SELECT %s::int``, a prepared
``execute``, ``SHOW statement_timeout`` and ``SHOW search_path`` (the
defaults), a count of its own table, a transaction that inserts a row and
commits, and an atomic batch of inserts.  Every error or wrong answer
counts; it must see none.

**Fairness.**  Leases, streams and copies outside a lease each hold a pooled
connection; if the fuzzer held them all, the victim would starve waiting
for a connection: a fairness problem (the server has no per-client limit
yet; that is a later issue), not what this test is about.  So the test
makes it impossible here: the fuzzer holds at most :data:`FUZZ_HOLDS` of
the :data:`POOL_SIZE` connections.  It counts every request that may hold
one (mutated and byte-flipped ones included) until it ends or must have
expired (``--heartbeat-timeout`` after the session's last request,
``--lease-max`` at most, both short), and starts no new one beyond the
budget, which also bounds the rate of its ``begin`` requests.

**Afterwards**: the server answers ``ping`` and ``status``; every frame
within the size limit got exactly one reply (counted per socket, matched by
id where the id survived; a last ``ping`` on each socket finds strays); once
the status map shows no open lease, stream or copy, none of the server's
backends (found by its ``application_name`` and by the client ports of the
server process's sockets) is ``idle in transaction``; ``pool_size``
transactions held at once reach every pooled connection (distinct backend
pids, the very backends found above), each at a fresh session's settings
with no cursor, plan, listener, temporary table or advisory lock left; and
the victim's committed rows are all in its table.

The seed is printed (and set with ``DBPOOL_FUZZ_SEED``).  The short campaign
runs in the default suite; the full one (100,000 frames) is ``slow``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Generator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import psycopg
import pytest
import zmq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbpool import wire
from dbpool.client import Client
from dbpool.errors import ConnectionError as PoolConnectionError
from dbpool.protocol import OPS, VERSION
from dbpool.statement_scope import scope_of
from tests.support.events import wait_for
from tests.support.remote import ServerProcess

# -- the server's settings ----------------------------------------------------------------

#: Small, to keep oversize frames cheap: libzmq drops a peer over four times this.
MAX_MESSAGE_SIZE = 64 * 1024
POOL_SIZE = 10
HEARTBEAT_TIMEOUT = 1.0
LEASE_MAX = 3.0
#: The server's default request timeout (``--timeout``): bounds every wait there.
SERVER_TIMEOUT = 5.0

# -- the fuzzer's pace and budget -------------------------------------------------------------

#: Connections the fuzzer may hold at once (leases, streams and copies outside a
#: lease): POOL_SIZE - FUZZ_HOLDS stay for shared requests and the victim's
#: transactions.  Fairness between clients is not this test's subject (the server has
#: no per-client limit yet): without this budget abandoned leases could hold every
#: connection until they expire, and the victim would wait (see the module docstring).
FUZZ_HOLDS = 6
#: How long after its expiry a hold may still keep its connection (a tick of the
#: server's loop, its ROLLBACK, the replacement of a dirty connection).
HOLD_MARGIN = 0.3
DEALERS = 8
REQS = 2
#: Frames awaiting replies, in all and per DEALER socket: far below libzmq's
#: high-water mark (1000), past which a ROUTER drops replies.
WINDOW = 32
SOCKET_WINDOW = 12
#: Scenarios running at once.
RUNNING = 24
#: A DEALER socket is retired (closed once idle) and replaced every so many frames.
ROTATE_EVERY = 1500
#: Seconds the replies still due may take once every frame is sent.
STRAGGLERS = SERVER_TIMEOUT + 15.0

#: Frames, and the pace at which scenarios start (frames per second): slow enough for
#: leases to begin, expire and be replaced many times over while the victim runs.
SHORT_FRAMES = 3000
SHORT_RATE = 400.0
FULL_FRAMES = 100_000
FULL_RATE = 1500.0

#: Ids of requests whose replies are matched one by one start above TRACKED (uint64 on
#: the wire).  Requests mangled after packing (their id may not survive) get small ids
#: (LOOSE_IDS, uint16), which no byte edits they undergo turn into an issued tracked one.
TRACKED = 1 << 40
LOOSE_IDS = 50_000

#: Times the fuzzer sends a request it expects served when its own flood got it shed
#: (``queue_timeout``) instead.
SHED_RETRIES = 5

#: The victim's reply timeout (the server answers within SERVER_TIMEOUT anyway).
VICTIM_TIMEOUT = 20.0

Reply = dict[str, Any]
T = TypeVar("T")


# -- the SQL corpus -----------------------------------------------------------------------------
#
# Templates: <T> is the fuzzer's table, <TAG> the run's tag, <TMPn>/<CUR>/<PLAN>/<CH>
# names of temporary tables, a cursor, a plan and a channel; <NS> the run's advisory-lock
# namespace, <KEY> a random key, <N> a random count, <SLEEP> a short sleep.  Nothing here
# reaches beyond the run's own objects and sessions (no ALTER ROLE/SYSTEM/DATABASE, no
# file COPY, no pg_terminate_backend): the PostgreSQL server is shared.

TRANSACTION_SQL = [
    "BEGIN", "begin isolation level serializable", "START TRANSACTION READ ONLY", "COMMIT",
    "END", "COMMIT AND CHAIN", "ROLLBACK", "ABORT", "ROLLBACK AND CHAIN", "SAVEPOINT fz_sp",
    "RELEASE SAVEPOINT fz_sp", "ROLLBACK TO SAVEPOINT fz_sp", "/* hidden */ BEGIN",
    "(COMMIT)", "COMMIT PREPARED 'fz_none_<TAG>'",
]
#: Only where max_prepared_transactions = 0 (it fails there, and leaves nothing).
TWO_PHASE_SQL = ["PREPARE TRANSACTION 'fz_2pc_<TAG>'"]
SESSION_SQL = [
    "SET search_path = fz_nowhere_<TAG>", "SET SESSION search_path TO pg_catalog",
    "set statement_timeout = '1ms'", "SET statement_timeout TO 0",
    "SET application_name = 'fz_renamed_<TAG>'", "SET TIME ZONE 'Asia/Tokyo'",
    "SET work_mem = '1MB'", "SET idle_in_transaction_session_timeout = '200ms'",
    "SET SESSION AUTHORIZATION DEFAULT", "SET ROLE NONE", "RESET ALL", "RESET search_path",
    "SET LOCAL search_path = fz_local_<TAG>", "SET LOCAL statement_timeout = 50",
    "SET LOCAL lock_timeout = 10", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET CONSTRAINTS ALL DEFERRED",
    "LISTEN <CH>", "UNLISTEN *", "UNLISTEN <CH>", "NOTIFY <CH>, 'x'",
    "SELECT pg_notify('<CH>', 'y')",
    "DECLARE <CUR> CURSOR WITH HOLD FOR SELECT generate_series(1, 3)",
    "DECLARE <CUR>_2 CURSOR FOR SELECT 1", "FETCH 1 FROM <CUR>", "MOVE 1 IN <CUR>",
    "CLOSE <CUR>", "CLOSE ALL",
    "PREPARE <PLAN> AS SELECT 1", "PREPARE <PLAN>_2 (int) AS SELECT $1 + 1", "EXECUTE <PLAN>",
    "EXECUTE <PLAN>_2(41)", "DEALLOCATE <PLAN>", "DEALLOCATE ALL", "DEALLOCATE PREPARE <PLAN>_2",
    "CREATE TEMP TABLE <TMP1> (x int)",
    "CREATE TEMPORARY TABLE IF NOT EXISTS <TMP2> AS SELECT 1 AS x",
    "SELECT 1 AS x INTO TEMP <TMP3>", "CREATE TABLE pg_temp.<TMP4> (x int)",
    "INSERT INTO <TMP1> VALUES (1)", "SELECT * FROM pg_temp.<TMP1>", "DISCARD TEMP",
    "DISCARD ALL", "DISCARD PLANS",
    "SELECT set_config('search_path', 'fz_cfg_<TAG>', false)",
    "SELECT set_config('statement_timeout', '3ms', false)",
    "SELECT set_config('search_path', 'fz_cfg_local', true)",
    "SELECT pg_catalog.set_config('application_name', 'fz_cfg_<TAG>', false)",
    "SELECT \"set_config\"('search_path', 'fz_quoted', false)",
    "SELECT * FROM set_config('TimeZone', 'Pacific/Chatham', false)",
    "SELECT pg_advisory_lock(<NS>, <KEY>)", "SELECT pg_try_advisory_lock(<NS>, <KEY>)",
    "SELECT pg_advisory_lock_shared(<NS>, <KEY>)", "SELECT pg_advisory_unlock(<NS>, <KEY>)",
    "SELECT pg_advisory_unlock_all()", "SELECT pg_advisory_xact_lock(<NS>, <KEY>)",
    "SELECT setseed(0.5)",
]
COPY_SQL = [
    "COPY (SELECT 1) TO STDOUT", "COPY <T> (v) FROM STDIN", "copy <T> to stdout with (format csv)",
    "COPY (SELECT generate_series(1, <N>)) TO STDOUT",
]
DO_SQL = [
    "DO $$BEGIN PERFORM 1; END$$",
    "DO $$BEGIN EXECUTE 'SET search_path = fz_do_<TAG>'; END$$",
    "DO $$BEGIN RAISE EXCEPTION 'fz raised'; END$$",
    "DO $$BEGIN PERFORM pg_sleep(<SLEEP>); END$$",
    "DO $$BEGIN PERFORM set_config('statement_timeout', '7ms', false); END$$",
    "DO $fz$BEGIN CREATE TEMP TABLE fzt_<TAG>_do (x int); END$fz$",
    "DO LANGUAGE plpgsql $$ BEGIN PERFORM pg_advisory_lock(<NS>, <KEY>); END $$",
]
FAILING_SQL = [
    "SELECT 1/0", "SELEC 1", "SELECT * FROM fz_missing_<TAG>", "SELECT 'abc'::int",
    "SELECT 1; SELECT 2", "INSERT INTO <T> (v) VALUES ('not an int')", "SELECT $1",
    "SELECT %s::int", "SELECT %(missing)s", ";", " ", "SELECT 1 /* unterminated",
    "SELECT 'unterminated", "SELECT (", "SELECT * FROM <T> WHERE v = 1/0",
    "SELECT pg_sleep(<SLEEP>) FROM fz_missing_<TAG>",
]
WAIT_SQL = ["SELECT pg_sleep(<SLEEP>)", "SELECT pg_sleep(<SLEEP>), %s::text"]
PLAIN_SQL = [
    "SELECT %s::int", "SELECT 1", "SELECT %s, %s", "SELECT %(x)s::text",
    "SELECT generate_series(1, <N>)", "SELECT repeat('x', <N>)", "SELECT count(*) FROM <T>",
    "INSERT INTO <T> (v) VALUES (%s)", "INSERT INTO <T> (v) SELECT generate_series(1, 3)",
    "SELECT * FROM <T> LIMIT 5", "SELECT pg_backend_pid()", "SELECT txid_current()",
    "SELECT '(1,2)'::point", "SELECT 'infinity'::date", "SELECT '10000-01-01'::date",
    "SELECT ROW(1, 'a')", "SELECT 'NaN'::numeric, 1e400", "SELECT '{\"a\": [1, null]}'::jsonb",
    "SELECT ARRAY[1, NULL, 3]", "SELECT ARRAY[[1, 2], [3, 4]]", "SELECT now(), '1 day'::interval",
    "SELECT gen_random_uuid()", "SELECT 'x'::bytea", "EXPLAIN SELECT 1",
    "EXPLAIN ANALYZE CREATE TEMP TABLE fzt_<TAG>_e AS SELECT 1",
    "WITH t AS (SELECT set_config('search_path', 'fz_cte', false)) SELECT * FROM t",
    "SELECT 'BEGIN', 'SET search_path = x' AS not_a_set", "SELECT $$COMMIT$$",
    "VALUES (1, 'a'), (2, 'b')", "SELECT NULL", "TABLE <T> LIMIT 1",
]
#: Probes: sent unmutated, outside a lease, without parameters, each must see a fresh
#: session: ("default", setting), ("app", None), ("error", None) or ("rows", rows).
PROBES: dict[str, tuple[str, Any]] = {
    "SHOW search_path": ("default", "search_path"),
    "SHOW statement_timeout": ("default", "statement_timeout"),
    "SHOW TimeZone": ("default", "TimeZone"),
    "SHOW application_name": ("app", None),
    "SELECT current_user": ("default", "current_user"),
    "SELECT current_setting('work_mem')": ("default", "work_mem"),
    "SELECT current_setting('idle_in_transaction_session_timeout')":
        ("default", "idle_in_transaction_session_timeout"),
    "EXECUTE <PLAN>": ("error", None),
    "EXECUTE <PLAN>_2(41)": ("error", None),
    "FETCH 1 FROM <CUR>": ("error", None),
    "SELECT * FROM <TMP1>": ("error", None),
    "SELECT * FROM <TMP2>": ("error", None),
    "SELECT * FROM <TMP3>": ("error", None),
    "SELECT * FROM <TMP4>": ("error", None),
    "SELECT * FROM fzt_<TAG>_do": ("error", None),
    "SELECT * FROM fzt_<TAG>_e": ("error", None),
    "SELECT count(*) FROM pg_listening_channels()": ("rows", [[0]]),
    "SELECT count(*) FROM pg_cursors WHERE name <> ''": ("rows", [[0]]),
    "SELECT count(*) FROM pg_prepared_statements WHERE from_sql": ("rows", [[0]]),
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()":
        ("rows", [[0]]),
}
#: What the copy operations are given (never mutated but for case and comments).
COPY_OUT_SQL = [
    "COPY (SELECT generate_series(1, <N>)) TO STDOUT", "COPY <T> TO STDOUT",
    "COPY (SELECT repeat('x', <N>)) TO STDOUT (FORMAT csv)", "COPY (SELECT 1/0) TO STDOUT",
    "COPY fz_missing_<TAG> TO STDOUT", "COPY <T> TO STDOUT (FORMAT binary)",
    "COPY (SELECT pg_sleep(<SLEEP>)) TO STDOUT", "COPY <T> (v) FROM STDIN", "SELECT 1",
]
COPY_IN_SQL = [
    "COPY <T> (v) FROM STDIN", "COPY <T> (v) FROM STDIN (FORMAT csv)",
    "COPY fz_missing_<TAG> FROM STDIN", "COPY (SELECT 1) TO STDOUT", "SELECT 1",
]
STREAM_SQL = ["SELECT generate_series(1, <N>)", "SELECT * FROM <T>", "SELECT 1/0"]
#: A COPY statement the fuzzer may send to a copy op: to or from the client only.
_SAFE_COPY = re.compile(r"(?is)^(?!.*\bprogram\b)(?!.*\b(?:to|from)\s*')")

#: (weight, statements) by category, for pick_sql.
_CATEGORIES = ["transaction", "session", "copy", "do", "failing", "wait", "plain", "probe"]
_CATEGORY_WEIGHTS = [12, 30, 4, 6, 12, 5, 18, 13]

EDGE_INTS = [0, 1, -1, 2**31 - 1, -(2**31), 2**31, 2**63 - 1, -(2**63), 2**63, 2**64 - 1]
EDGE_FLOATS = [0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, 1e308, 5e-324]
EDGE_STRS = ["", "x", "é", "\x00", "a'b", '"q"', "%s", "%(x)s", "\\", "NaN", "1", "true",
             "{}", "😀", "\u202e", " ", "\n", "SELECT 1", "x" * 3000]
#: Ids that are not ids (or are at the edges): never in the tracked ranges.
WEIRD_IDS: list[Any] = [0, 1, 2**63, 2**64 - 1, -1, -(2**63), 1.5, "7", None, True, b"\x01",
                        [1], {"id": 1}, msgpack.ExtType(1, b"18446744073709551616"),
                        msgpack.ExtType(1, b"-5")]


_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*(?:[^*]|\*(?!/))*\*/|;)+")


def scope_run(sql: str) -> str:
    """The scope of what PostgreSQL runs for ``sql``: its parser skips empty statements
    (``;``), with blanks and comments, before the first one, so ``;SET x = 1`` runs a
    ``SET``.  (Comments are taken unnested here: close enough for the corpus.)"""
    scope = scope_of(sql)
    if scope != "statement":
        return scope
    match = _LEADING.match(sql)
    return scope_of(sql[match.end():]) if match and match.end() < len(sql) else scope


def expand(template: str, names: Names, rng: random.Random) -> str:
    """A corpus template with its placeholders filled."""
    sql = template
    for token, value in names.tokens.items():
        sql = sql.replace(token, value)
    if "<KEY>" in sql:
        sql = sql.replace("<KEY>", str(rng.randrange(1, 2**31)))
    if "<N>" in sql:
        sql = sql.replace("<N>", str(rng.choice([0, 1, 3, 100, 2000, 20000])))
    if "<SLEEP>" in sql:
        sql = sql.replace("<SLEEP>", rng.choice(["0", "0.001", "0.01", "0.02", "0.05"]))
    return sql


@dataclass(frozen=True)
class Names:
    """The names of one run's objects (unique, so that runs never meet)."""

    tag: str
    namespace: int

    @property
    def table(self) -> str:
        return f"fz_{self.tag}"

    @property
    def victim_table(self) -> str:
        return f"fzv_{self.tag}"

    @property
    def app(self) -> str:
        return f"dbpool_fz_{self.tag}"

    @property
    def database(self) -> str:
        return f"dbpool_fz_{self.tag}"

    @property
    def tokens(self) -> dict[str, str]:
        return {"<T>": self.table, "<TAG>": self.tag, "<CUR>": f"fzc_{self.tag}",
                "<PLAN>": f"fzp_{self.tag}", "<CH>": f"fzch_{self.tag}",
                "<NS>": str(self.namespace),
                **{f"<TMP{i}>": f"fzt_{self.tag}_{i}" for i in range(1, 5)}}


# -- the fuzzer's machinery -----------------------------------------------------------------------


class Hold:
    """A pooled connection the fuzzer may hold: a lease, or a stream or copy outside one."""

    __slots__ = ("released", "session", "started", "touched")

    def __init__(self, session: str, now: float) -> None:
        self.session = session
        self.started = now
        self.touched = now
        self.released = False

    def active(self, now: float) -> bool:
        """Until released, or until the server must have ended it by now."""
        ends = min(self.touched + HEARTBEAT_TIMEOUT, self.started + LEASE_MAX)
        return not self.released and now < ends + HOLD_MARGIN


@dataclass
class Out:
    """A frame a scenario sends (a multipart message, rather)."""

    frames: list[bytes]
    #: A tracked id: its reply is matched, and exactly one must come.
    rid: int | None = None
    #: The scenario waits for that reply (and receives it).
    wait: bool = True
    #: A reply is due (False: over four times the size limit, or the client dies).
    reply: bool = True
    sessions: tuple[str, ...] = ()
    op: str | None = None
    #: A hold this request may start or end: touched by its reply, released by an error.
    hold: Hold | None = None


@dataclass
class Pause:
    """A scenario's think time (the fuzz loop polls meanwhile)."""

    seconds: float


class Close:
    """Close the scenario's socket now: a client that dies with requests in flight."""


Action = Out | Pause | Close
Scenario = Generator[Action, Reply | None, T]


class FuzzSocket:
    """One of the fuzzer's sockets, with its counts of frames and replies."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, kind: int, name: str,
                 linger: int = 0) -> None:
        self.sock: zmq.Socket[Any] = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, linger)
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)
        self.sock.connect(endpoint)
        self.kind = kind
        self.name = name
        self.limit = 1 if kind == zmq.REQ else SOCKET_WINDOW
        self.sent = 0  # frames with a reply due
        self.replies = 0
        self.abandoned = 0  # replies due when the socket was closed
        self.users = 0  # scenarios running on it
        self.retiring = False
        self.closed = False
        self.recent: deque[str] = deque(maxlen=24)  # what it sent last, for reports

    @property
    def outstanding(self) -> int:
        return self.sent - self.replies - self.abandoned


@dataclass
class Running:
    gen: Scenario[None]
    kind: str
    sock: FuzzSocket
    rng: random.Random
    waiting: int | None = None
    paused_until: float | None = None
    pending: Out | None = None


@dataclass
class Sent:
    """A tracked request whose reply is due."""

    run: Running | None
    sock: FuzzSocket
    kind: str
    op: str | None
    at: float
    hold: Hold | None
    summary: str


@dataclass
class FuzzStats:
    frames: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    replies: int = 0
    ok: int = 0
    no_reply_due: int = 0
    abandoned: int = 0
    holds: int = 0
    expectations: int = 0
    #: Statements outside a lease whose scope shows only past leading empty statements.
    empty_prefixed: int = 0
    violations: list[str] = field(default_factory=list)
    protocol: list[str] = field(default_factory=list)  # replies that broke the protocol
    duration: float = 0.0


def error_code(error: Any) -> str:
    """``kind/detail`` of an error map: ``protocol/bad_request``, ``sql/DivisionByZero``."""
    if type(error) is not dict:
        return f"?/{type(error).__name__}"
    detail = (error.get("code") or error.get("reason") or error.get("class")
              or error.get("scope") or error.get("status"))
    return f"{error.get('kind')}/{detail}"


def _shed(reply: Reply | None) -> bool:
    """Whether ``reply`` says its request found no connection in time (CoDel shed it, or
    its timeout passed in the queue): overload, not refusal."""
    error = reply.get("error") if isinstance(reply, dict) else None
    return (isinstance(error, dict) and error.get("kind") == "connection"
            and error.get("reason") in ("queue_timeout", "deadline"))


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# -- the fuzzer ---------------------------------------------------------------------------------


class Fuzzer:
    """Sends ``limit`` frames to the server and keeps count (see the module docstring)."""

    def __init__(self, endpoint: str, names: Names, seed: int, limit: int, rate: float,
                 defaults: dict[str, str], two_phase: bool) -> None:
        self.endpoint = endpoint
        self.rate = rate
        self.names = names
        #: Chooses the scenarios and seeds each one's own generator (``rng`` while it
        #: runs), so that a scenario's frames depend on the seed and its place in the
        #: sequence, not on how the replies of others interleave.
        self.master = random.Random(seed)
        self.rng = random.Random(seed)
        self.limit = limit
        self.defaults = defaults
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.poller = zmq.Poller()
        self.sockets: list[FuzzSocket] = []
        self._by_zmq: dict[zmq.Socket[Any], FuzzSocket] = {}
        self.dealers: list[FuzzSocket] = []
        self.reqs: list[FuzzSocket] = []
        self._socket_count = 0
        for _ in range(DEALERS):
            self.dealers.append(self._socket(zmq.DEALER))
        for _ in range(REQS):
            self.reqs.append(self._socket(zmq.REQ))
        self.running: list[Running] = []
        self.pending: dict[int, Sent] = {}
        self.answered: set[int] = set()
        self.sent = 0
        self.in_flight = 0
        self._next_rid = 0
        self._next_loose = 0
        self.holds: list[Hold] = []
        self._holds_by_session: dict[str, list[Hold]] = {}
        self.leases: deque[tuple[str, str]] = deque(maxlen=64)  # (lease id, its session)
        self.streams: deque[tuple[str, str]] = deque(maxlen=64)
        self.copies: deque[tuple[str, str]] = deque(maxlen=64)
        self.sessions: deque[str] = deque(maxlen=64)
        self.stats = FuzzStats()
        corpus = {
            "transaction": TRANSACTION_SQL + (TWO_PHASE_SQL if two_phase else []),
            "session": SESSION_SQL, "copy": COPY_SQL, "do": DO_SQL, "failing": FAILING_SQL,
            "wait": WAIT_SQL, "plain": PLAIN_SQL, "probe": list(PROBES),
        }
        self.corpus = [corpus[name] for name in _CATEGORIES]
        self.probes = {expand(sql, names, self.rng): check for sql, check in PROBES.items()}
        self.scenarios: list[tuple[str, Callable[[FuzzSocket], Scenario[None]], bool]] = [
            ("random_bytes", self.sc_random_bytes, False),
            ("truncated", self.sc_truncated, False),
            ("byteflip", self.sc_byteflip, False),
            ("wrong_shape", self.sc_wrong_shape, False),
            ("mutated", self.sc_mutated, False),
            ("sql", self.sc_sql, False),
            ("lease", self.sc_lease, True),
            ("copy", self.sc_copy, True),
            ("stream", self.sc_stream, True),
            ("multipart", self.sc_multipart, False),
            ("req", self.sc_req, False),
            ("oversize", self.sc_oversize, False),
            ("valid", self.sc_valid, False),
            ("dies", self.sc_dies, True),
            ("oversize_drop", self.sc_oversize_drop, False),
        ]
        self.weights = [6, 5, 6, 6, 20, 24, 10, 4, 4, 3, 3, 2, 3, 1, 0.2]

    # -- sockets ---------------------------------------------------------------------------------

    def _socket(self, kind: int, linger: int = 0) -> FuzzSocket:
        self._socket_count += 1
        prefix = {zmq.DEALER: "dealer", zmq.REQ: "req"}[kind]
        sock = FuzzSocket(self.ctx, self.endpoint, kind, f"{prefix}{self._socket_count}", linger)
        self.sockets.append(sock)
        self._by_zmq[sock.sock] = sock
        self.poller.register(sock.sock, zmq.POLLIN)
        return sock

    def _close_socket(self, sock: FuzzSocket) -> None:
        if sock.closed:
            return
        left = sock.outstanding
        sock.abandoned += left
        self.in_flight -= left
        self.stats.abandoned += left
        for rid in [rid for rid, sent in self.pending.items() if sent.sock is sock]:
            del self.pending[rid]
        self.poller.unregister(sock.sock)
        sock.sock.close()
        sock.closed = True

    def _rotate(self) -> None:
        """Retire a DEALER (closed once idle) and put a new one in its place."""
        old = self.master.choice(self.dealers)
        old.retiring = True
        self.dealers.remove(old)
        self.dealers.append(self._socket(zmq.DEALER))

    def _close_retired(self) -> None:
        for sock in self.sockets:
            if sock.retiring and not sock.closed and sock.users == 0 and sock.outstanding == 0:
                self._close_socket(sock)

    # -- ids, holds ------------------------------------------------------------------------------

    def rid(self) -> int:
        self._next_rid += 1
        return TRACKED + self._next_rid

    def loose_rid(self) -> int:
        self._next_loose += 1
        return 1000 + self._next_loose % LOOSE_IDS

    def can_hold(self) -> bool:
        now = time.monotonic()
        self.holds = [hold for hold in self.holds if hold.active(now)]
        return len(self.holds) < FUZZ_HOLDS

    def hold(self, session: str) -> Hold:
        hold = Hold(session, time.monotonic())
        self.holds.append(hold)
        self._holds_by_session.setdefault(session, []).append(hold)
        self.stats.holds += 1
        return hold

    def _touch(self, sessions: tuple[str, ...], now: float) -> None:
        for session in sessions:
            holds = self._holds_by_session.get(session)
            if holds:
                live = [hold for hold in holds if hold.active(now)]
                for hold in live:
                    hold.touched = now
                if live:
                    self._holds_by_session[session] = live
                else:
                    del self._holds_by_session[session]

    def new_session(self) -> str:
        session = uuid.UUID(int=self.rng.getrandbits(128)).hex
        self.sessions.append(session)
        return session

    # -- expectations ------------------------------------------------------------------------------

    def expect(self, condition: bool, what: str, reply: Reply | None) -> None:
        self.stats.expectations += 1
        if not condition:
            self.stats.violations.append(f"{what}: got {reply!r:.400}")

    # -- the loop ------------------------------------------------------------------------------

    def run(self, time_budget: float) -> None:
        """Send every frame, then collect the replies still due (within STRAGGLERS)."""
        start = time.monotonic()
        deadline = start + time_budget
        straggling: float | None = None
        rotate_at = ROTATE_EVERY
        while True:
            now = time.monotonic()
            if self.sent >= self.limit:
                if straggling is None:
                    straggling = now + STRAGGLERS
                    for run in list(self.running):  # nothing more will be sent
                        if run.waiting is None:
                            self._stop(run)
                if not self.running and self.in_flight == 0:
                    break
                if now > straggling:
                    break
            elif now > deadline:
                self.stats.violations.append(
                    f"out of time: {self.sent} of {self.limit} frames sent in {time_budget}s")
                break
            if self.sent >= rotate_at:
                rotate_at += ROTATE_EVERY
                self._rotate()
            self._close_retired()
            allowed = min(self.limit, (now - start) * self.rate)
            while (self.sent < allowed and len(self.running) < RUNNING
                   and self.in_flight < WINDOW):
                self._start()
            for run in list(self.running):
                if run.waiting is None and (
                        run.pending is not None
                        or (run.paused_until is not None and run.paused_until <= now)):
                    self._advance(run, None)
            timeout = 100.0
            if self.sent < self.limit and len(self.running) < RUNNING \
                    and self.in_flight < WINDOW:  # the next start, at the pace
                timeout = max(0.0, (start + (self.sent + 1) / self.rate - now) * 1000)
            pauses = [run.paused_until for run in self.running if run.paused_until is not None]
            if pauses:
                timeout = min(timeout, max(0.0, (min(pauses) - now) * 1000))
            for sock, _ in self.poller.poll(timeout):
                self._receive(sock)
        self.stats.duration = time.monotonic() - start

    def _start(self) -> None:
        index = self.master.choices(range(len(self.scenarios)), self.weights)[0]
        self.rng = random.Random(self.master.getrandbits(64))
        kind, make, holds = self.scenarios[index]
        if holds and not self.can_hold():
            kind, make, holds = self.scenarios[5]  # sql, which holds nothing
        if kind in ("dies", "oversize_drop"):
            sock = self._socket(zmq.DEALER, linger=2000 if kind == "oversize_drop" else 0)
        elif kind == "req":
            free = [sock for sock in self.reqs if sock.users == 0 and sock.outstanding == 0]
            if not free:
                kind, make = "sql", self.sc_sql
                sock = self._dealer()
            else:
                sock = free[0]
        else:
            sock = self._dealer()
        run = Running(make(sock), kind, sock, self.rng)
        sock.users += 1
        self.running.append(run)
        self._advance(run, None)

    def _dealer(self) -> FuzzSocket:
        roomy = [sock for sock in self.dealers if sock.outstanding < sock.limit]
        return self.master.choice(roomy or self.dealers)

    def _advance(self, run: Running, value: Reply | None) -> None:
        """Run a scenario until it waits for a reply, a pause or room to send."""
        self.rng = run.rng
        run.paused_until = None
        while True:
            if run.pending is not None:
                action: Action = run.pending
                run.pending = None
            else:
                try:
                    action = run.gen.send(value)
                except StopIteration:
                    self._finish(run)
                    return
            value = None
            if isinstance(action, Close):
                self._close_socket(run.sock)
                continue
            if self.sent >= self.limit:
                self._stop(run)
                return
            if isinstance(action, Pause):
                run.paused_until = time.monotonic() + action.seconds
                return
            if action.reply and (run.sock.outstanding >= run.sock.limit
                                 or self.in_flight >= WINDOW):
                run.pending = action
                return
            if self._send(run, action) and action.wait:
                run.waiting = action.rid
                return  # (an untracked request moves on at once, with no reply)

    def _stop(self, run: Running) -> None:
        run.gen.close()
        self._finish(run)

    def _finish(self, run: Running) -> None:
        if run in self.running:
            self.running.remove(run)
            run.sock.users -= 1
            if run.kind in ("dies", "oversize_drop"):
                self._close_socket(run.sock)

    def _send(self, run: Running, out: Out) -> bool:
        """Send ``out``; whether its reply is tracked (matched by its id)."""
        sock = run.sock
        try:
            sock.sock.send_multipart(out.frames)
        except zmq.ZMQError as error:
            self.stats.violations.append(f"{sock.name}: send failed: {error}")
            return False
        now = time.monotonic()
        self.sent += 1
        self.stats.frames[run.kind] += 1
        if out.op is not None:
            self.stats.ops[out.op if out.op in OPS else "(not an op)"] += 1
        self._touch(out.sessions, now)
        summary = f"{run.kind}/{out.op}: {b'|'.join(out.frames)[:80]!r}"
        sock.recent.append(summary)
        if out.reply:
            sock.sent += 1
            self.in_flight += 1
        else:
            self.stats.no_reply_due += 1
        tracked = out.rid is not None and out.reply and self._readable(out.frames[-1], out.rid)
        if tracked:
            assert out.rid is not None
            self.pending[out.rid] = Sent(run if out.wait else None, sock, run.kind, out.op,
                                         now, out.hold, summary)
        return tracked

    @staticmethod
    def _readable(body: bytes, rid: int) -> bool:
        """Whether the server can read ``rid`` from ``body``: else it answers with a nil
        id (a body it cannot decode, or over the size limit), and no match is possible."""
        if len(body) > MAX_MESSAGE_SIZE:
            return False
        try:
            req = wire.unpackb(body)
        except wire.WireError:
            return False
        return type(req) is dict and type(req.get("id")) is int and req["id"] == rid

    def _receive(self, fsock: zmq.Socket[Any]) -> None:
        sock = self._by_zmq[fsock]
        while not sock.closed:  # a scenario may close it as a reply moves it on
            if sock.kind == zmq.REQ and sock.outstanding <= 0:
                return  # a REQ socket receives only after it sent
            try:
                frames = sock.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            sock.replies += 1
            self.in_flight -= 1
            self.stats.replies += 1
            if sock.outstanding < 0:
                self.stats.protocol.append(
                    f"{sock.name}: a reply more than was due: {frames!r:.200}")
            reply = self._decode(sock, frames)
            if reply is None:
                continue
            rid = reply.get("id")
            if type(rid) is int and TRACKED < rid <= TRACKED + self._next_rid:
                sent = self.pending.pop(rid, None)
                if sent is None:
                    what = "a second reply" if rid in self.answered else "a reply to no request"
                    self.stats.protocol.append(f"{sock.name}: {what} for id {rid}: {reply!r:.200}")
                    continue
                self.answered.add(rid)
                if sent.hold is not None:
                    if "error" in reply:
                        sent.hold.released = True
                    else:
                        sent.hold.started = sent.hold.touched = time.monotonic()
                run = sent.run
                if run is not None and run.waiting == rid and run in self.running:
                    run.waiting = None
                    self._advance(run, reply)

    def _decode(self, sock: FuzzSocket, frames: list[bytes]) -> Reply | None:
        if len(frames) == 2 and frames[0] == b"" and sock.kind == zmq.DEALER:
            frames = frames[1:]  # a reply to a request sent with a REQ's delimiter
        if len(frames) != 1:
            self.stats.protocol.append(f"{sock.name}: a reply of {len(frames)} frames: "
                                       f"{frames!r:.200}")
            return None
        try:
            reply = wire.unpackb(frames[0])
        except wire.WireError as error:
            self.stats.protocol.append(f"{sock.name}: an undecodable reply ({error}): "
                                       f"{frames[0]!r:.200}")
            return None
        if type(reply) is not dict or "id" not in reply or len(reply) != 2 \
                or not ("ok" in reply) ^ ("error" in reply):
            self.stats.protocol.append(f"{sock.name}: a reply of the wrong shape: {reply!r:.200}")
            return None
        if "error" in reply:
            code = error_code(reply["error"])
            self.stats.errors[code] += 1
            error = reply["error"]
            if code == "protocol/internal" or type(error) is not dict \
                    or type(error.get("message")) is not str:
                self.stats.protocol.append(f"{sock.name}: {code}: {reply!r:.300}")
        else:
            self.stats.ok += 1
        return reply

    # -- requests ------------------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return {"v": VERSION, "id": self.rid(), "op": op, **fields}

    def out(self, req: dict[str, Any], *, wait: bool = True, hold: Hold | None = None,
            sessions: tuple[str, ...] = ()) -> Out:
        """A request sent as is: tracked by its id."""
        session = req.get("session")
        if type(session) is str and not sessions:
            sessions = (session,)
        return Out([pack(req)], rid=req["id"], wait=wait, sessions=sessions,
                   op=str(req.get("op")), hold=hold)

    def pick_sql(self) -> tuple[str, bool]:
        """A statement, and whether it is the corpus's own (unmutated) text."""
        rng = self.rng
        if rng.random() < 0.04:
            length = rng.randint(1, 40)
            return "".join(rng.choice("SELECT setbgin;'\"$()-/*%\\ 01\n\x00é") for _ in
                           range(length)), False
        category = rng.choices(self.corpus, _CATEGORY_WEIGHTS)[0]
        sql = expand(rng.choice(category), self.names, rng)
        if rng.random() < 0.35:
            mutated = self.mutate_sql(sql)
            return mutated, mutated == sql
        return sql, True

    def mutate_sql(self, sql: str) -> str:
        rng = self.rng
        for _ in range(rng.randint(1, 2)):
            choice = rng.randrange(11)
            if choice == 0:
                sql = "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in sql)
            elif choice == 1:  # ";": PostgreSQL skips empty statements before the first
                sql = rng.choice(["/* fz */ ", "-- fz\n", "/* /* nested */ */", "(", "\n\t ",
                                  "/**/", ";", " ; ", ";;"]) + sql
            elif choice == 2:
                sql += rng.choice([";", " ;", " -- tail", ")", " /* open", "'", '"', "$$",
                                   "\x00", " %s", " %"])
            elif choice == 3:
                sql = "EXPLAIN " + sql
            elif choice == 4:
                at = rng.randrange(len(sql) + 1)
                sql = sql[:at] + rng.choice(" ;'\"$()-/*\\%\x00é\n") + sql[at:]
            elif choice == 5 and sql:
                at = rng.randrange(len(sql))
                sql = sql[:at] + sql[at + 1:]
            elif choice == 6:
                category = rng.choices(self.corpus, _CATEGORY_WEIGHTS)[0]
                sql = f"{sql}; {expand(rng.choice(category), self.names, rng)}"
            elif choice == 7:
                sql = sql.replace(" ", rng.choice(["/**/", "\n", "\t", "  "]))
            elif choice == 8:
                sql = sql.replace("set_config", rng.choice(
                    ['"set_config"', "pg_catalog.set_config", 'U&"\\0073et_config"',
                     "SET_CONFIG"]))
            elif choice == 9:
                sql = "WITH fz AS (SELECT 1) " + sql
            else:
                sql = sql[:rng.randrange(len(sql) + 1)]
        return sql

    def copy_sql(self, templates: list[str]) -> str:
        """A statement for a copy op: mutated in case and comments only, never a file."""
        sql = expand(self.rng.choice(templates), self.names, self.rng)
        if self.rng.random() < 0.2:
            sql = self.rng.choice(["/* c */ ", "(", ""]) + sql.lower()
        if not _SAFE_COPY.match(sql):  # cannot happen with these templates; a guard
            sql = "COPY (SELECT 1) TO STDOUT"
        return sql

    def value(self, depth: int = 0) -> Any:
        """A random wire value (ext types and msgpack timestamps included)."""
        rng = self.rng
        choice = rng.randrange(14 if depth < 3 else 10)
        if choice == 0:
            return None
        if choice == 1:
            return rng.random() < 0.5
        if choice == 2:
            return rng.randint(-1000, 1000)
        if choice == 3:
            return rng.choice(EDGE_INTS)
        if choice == 4:
            return rng.choice([*EDGE_FLOATS, rng.uniform(-1e6, 1e6)])
        if choice == 5:
            return rng.choice(EDGE_STRS)
        if choice == 6:
            return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(0, 30)))
        if choice == 7:
            return rng.randbytes(rng.randint(0, 40))
        if choice == 8:
            return self.ext()
        if choice == 9:
            return msgpack.Timestamp(rng.randrange(0, 2**33), rng.randrange(0, 10**9))
        if choice in (10, 13):
            return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]
        if choice == 11:
            return {rng.choice(["x", "a", "", "missing", "v"]): self.value(depth + 1)
                    for _ in range(rng.randint(0, 3))}
        return [[self.value(depth + 2)]]

    def ext(self) -> msgpack.ExtType:
        rng = self.rng
        code = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 10, 42, 127])  # negative: raw_ext
        good: dict[int, list[bytes]] = {
            1: [b"123456789012345678901234567890", b"-18446744073709551616", b"9" * 4400],
            2: [b"NaN", b"1.5", b"-Infinity", b"sNaN", b"1e-400"],
            3: [b"2024-02-29", b"9999-12-31", b"0001-01-01"],
            4: [b"12:34:56.789+05:30", b"23:59:59"],
            5: [b"2024-01-02T03:04:05+00:00[Europe/Paris]", b"2024-01-02T03:04:05",
                b"2024-01-02T03:04:05+00:00[Nowhere/Zone]"],
            6: [pack([1, 2, 3]), pack([10**9, 0, 0]), pack(["a"])],
            7: [rng.randbytes(16), rng.randbytes(15)],
            8: [b'{"a": [1, 2]}', b"{"],
            9: [b'[1, "x"]', b"nul"],
        }
        if code in good and rng.random() < 0.6:
            return msgpack.ExtType(code, rng.choice(good[code]))
        return msgpack.ExtType(code, rng.randbytes(rng.randint(0, 20)))

    def params_for(self, sql: str) -> Any:
        """Parameters for ``sql``: usually fitting, sometimes not; always list, map or nil."""
        rng = self.rng
        count = sql.count("%s")
        if "%(" in sql:
            return {"x": self.param(), **({"missing": 1} if rng.random() < 0.5 else {})}
        roll = rng.random()
        if roll < 0.75:
            return [self.param() for _ in range(count)] if count else rng.choice([None, []])
        if roll < 0.9:
            return [self.param() for _ in range(rng.randint(0, 3))]
        return rng.choice([None, {}, {"x": 1}, [[1, "a"]]])

    def param(self) -> Any:
        rng = self.rng
        if rng.random() < 0.6:
            return rng.choice([rng.randint(-100, 100), "text", None, 1.5, True, b"\x00\x01",
                               [1, 2, 3], "x" * rng.randint(0, 200)])
        return self.value(1)

    def random_id(self, known: deque[tuple[str, str]]) -> Any:
        rng = self.rng
        roll = rng.random()
        if known and roll < 0.5:
            return rng.choice(known)[0]
        if roll < 0.8:
            return uuid.UUID(int=rng.getrandbits(128)).hex[:22]
        return rng.choice(["", "x" * 10_000, 0, None, [1], b"lease", "dbpool_stream_x"])

    def random_session(self) -> Any:
        rng = self.rng
        roll = rng.random()
        if self.sessions and roll < 0.4:
            return rng.choice(self.sessions)
        if roll < 0.85:
            return uuid.UUID(int=rng.getrandbits(128)).hex
        return rng.choice(["", 0, None, "x" * 5000, ["s"]])

    def any_request(self, rid: int, holding: bool) -> dict[str, Any]:
        """A plausible request of any operation (holding ones only if ``holding``)."""
        rng = self.rng
        ops = sorted(OPS)
        if not holding:
            ops = [op for op in ops if op not in ("begin", "stream", "copy_out", "copy_in")]
        op = rng.choice(ops)
        req: dict[str, Any] = {"v": VERSION, "id": rid, "op": op}
        session = self.random_session()
        if op in ("query", "execute"):
            sql, _ = self.pick_sql()
            req.update(sql=sql, params=self.params_for(sql))
        elif op == "batch":
            if rng.random() < 0.5:
                sql, _ = self.pick_sql()
                req.update(sql=sql, params_seq=[self.params_for(sql)
                                                for _ in range(rng.randint(1, 3))])
            else:
                items = [self.pick_sql()[0] for _ in range(rng.randint(1, 4))]
                req["statements"] = [[sql, self.params_for(sql)] for sql in items]
        elif op in ("begin", "heartbeat"):
            req["session"] = session
        elif op in ("commit", "rollback"):
            req.update(lease=self.random_id(self.leases), session=session)
        elif op == "stream":
            sql = expand(rng.choice(STREAM_SQL), self.names, rng)
            req.update(sql=sql, params=None, session=session,
                       max_rows=rng.choice([1, 10, 500, 0, -1, 2**40]))
        elif op == "fetch":
            req.update(stream=self.random_id(self.streams), session=session)
        elif op == "close":
            key = rng.choice(["stream", "copy"])
            req.update({key: self.random_id(self.streams if key == "stream" else self.copies),
                        "session": session})
        elif op == "copy_out":
            req.update(sql=self.copy_sql(COPY_OUT_SQL), session=session,
                       page_bytes=rng.choice([1, 100, 4096, MAX_MESSAGE_SIZE // 2,
                                              MAX_MESSAGE_SIZE, 0, -1]))
        elif op == "copy_in":
            req.update(sql=self.copy_sql(COPY_IN_SQL), session=session,
                       page_bytes=rng.choice([100, MAX_MESSAGE_SIZE // 2, 1 << 20]))
        elif op in ("copy_read", "copy_end"):
            req.update(copy=self.random_id(self.copies), session=session)
        elif op == "copy_write":
            req.update(copy=self.random_id(self.copies), session=session,
                       data=rng.choice([b"1\n", "2\n", b"x\ty\n", b"", 7]))
        if op in ("query", "execute", "batch", "stream", "copy_out", "copy_in") \
                and rng.random() < 0.3:
            req["lease"] = self.random_id(self.leases)
            req["session"] = session
        if rng.random() < 0.2:
            req["timeout"] = rng.choice([0.001, 0.05, 1.0, 5.0])
        self._unpair(req)
        return req

    def _unpair(self, req: dict[str, Any]) -> None:
        """Never a lease, stream or copy id with its own session: mutations must not end
        another scenario's lease (its expectations would break)."""
        for key, known in (("lease", self.leases), ("stream", self.streams),
                           ("copy", self.copies)):
            if (req.get(key), req.get("session")) in known:
                req["session"] = uuid.UUID(int=self.rng.getrandbits(128)).hex

    def mutate_fields(self, req: dict[str, Any]) -> None:
        rng = self.rng
        choice = rng.randrange(9)
        if choice == 0 and req:
            del req[rng.choice(sorted(req, key=str))]
        elif choice == 1 and req:
            req[rng.choice(sorted(req, key=str))] = self.value()
        elif choice == 2:
            req[rng.choice(["extra", "", "lease", "stream", "copy", "params_seq", "statements",
                            "data", "max_rows", "page_bytes", "session", "sql", "ID", "Op"])] \
                = self.value()
        elif choice == 3:
            req["v"] = rng.choice([0, 2, -1, 255, 2**64 - 1, "1", 1.0, None, True, [1]])
        elif choice == 4:
            req["id"] = rng.choice(WEIRD_IDS)
        elif choice == 5:
            req["op"] = rng.choice([*sorted(OPS), "", "PING", "Query", "drop", " ping",
                                    "ping\x00", None, 1, ["ping"], b"ping"])
        elif choice == 6:
            req["timeout"] = rng.choice([0, -1, 1e-9, 0.001, math.nan, math.inf, -math.inf,
                                         1e308, 366 * 86400.0, "1", True, None, 2**63])
        elif choice == 7:
            key = rng.choice(["lease", "stream", "copy"])
            req[key] = self.random_id({"lease": self.leases, "stream": self.streams,
                                       "copy": self.copies}[key])
        else:
            req["session"] = self.random_session()
        self._unpair(req)

    def holding(self, req: dict[str, Any]) -> str | None:
        """The session of a request that may take a connection of its own, else None."""
        op, session = req.get("op"), req.get("session")
        if type(session) is not str or not session:
            return None
        if op == "begin" or (op in ("stream", "copy_out", "copy_in") and req.get("lease") is None):
            return session
        return None

    def _held(self, req: dict[str, Any]) -> Hold | None:
        """A hold for ``req`` if it may hold a connection; None, or the request made
        harmless (a ping), if the budget is spent."""
        session = self.holding(req)
        if session is None:
            return None
        if not self.can_hold():
            req["op"] = "ping"
            return None
        return self.hold(session)

    # -- scenarios: frames ------------------------------------------------------------------------

    def sc_random_bytes(self, sock: FuzzSocket) -> Scenario[None]:
        rng = self.rng
        size = rng.choice([0, 1, 2, rng.randint(3, 64), rng.randint(64, 2048)])
        data = rng.randbytes(size)
        if size and rng.random() < 0.5:
            data = bytes([rng.choice([0x80, 0x81, 0x8F, 0xDE, 0xDF, 0x91, 0xC1, 0xD9, 0xC7])]) \
                + data
        yield Out([data])

    def sc_truncated(self, sock: FuzzSocket) -> Scenario[None]:
        body = pack(self.any_request(self.loose_rid(), holding=False))
        yield Out([body[:self.rng.randrange(len(body))]])  # never decodes: touches nothing

    def sc_byteflip(self, sock: FuzzSocket) -> Scenario[None]:
        rng = self.rng
        req = self.any_request(self.loose_rid(), holding=self.can_hold())
        self._held(req)  # a flipped begin may still begin: count it
        body = bytearray(pack(req))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body))
            edit = rng.randrange(4)
            if edit == 0:
                body[at] ^= 1 << rng.randrange(8)
            elif edit == 1:
                body[at] = rng.choice([0x00, 0xFF, 0xC1, 0xC0, 0x7F, 0x80])
            elif edit == 2:
                body.insert(at, rng.randrange(256))
            elif len(body) > 1:
                del body[at]
        session = req.get("session")  # a flipped heartbeat may still name it
        yield Out([bytes(body)], sessions=(session,) if type(session) is str else ())

    def sc_wrong_shape(self, sock: FuzzSocket) -> Scenario[None]:
        rng = self.rng
        ping = pack({"v": VERSION, "id": self.loose_rid(), "op": "ping"})
        choices: list[Callable[[], bytes]] = [
            lambda: pack(self.value()),
            lambda: pack(rng.choice([{}, {"id": 1}, {"v": 1, "op": "ping"}, {"op": "ping"}])),
            lambda: pack({1: 2, None: "x", b"op": "ping", 1.5: []}),
            lambda: b"\x81\x91\x01\x01",  # a map whose key is an array (unhashable)
            lambda: b"\x91" * rng.choice([100, 1000, 30_000]) + b"\xc0",
            lambda: b"\xdf\xff\xff\xff\xff",
            lambda: b"\xdd\xff\xff\xff\xff" + b"\xc0" * 10,
            lambda: pack(self.ext()),
            lambda: pack({"v": VERSION, "id": self.loose_rid(), "op": "query",
                          "sql": "SELECT %s", "params": [self.ext()]}),
            lambda: pack([{"v": VERSION, "id": 1, "op": "ping"}]),
            lambda: ping + b"\x00",
            lambda: ping + ping,
            lambda: b"\x81\xa2op\xa3\xff\xfe\xfd",
            lambda: b"\xc7\x05\x2a" + rng.randbytes(5),
            lambda: pack({"v": VERSION, "id": self.loose_rid(), "op": "ping",
                          "x": [None] * 20_000}),
            lambda: self.raw_ext_request(),
        ]
        yield Out([rng.choice(choices)()])

    def raw_ext_request(self) -> bytes:
        """A query whose parameter is an ext value msgpack will not pack: a negative code
        (-1 is msgpack's timestamp, here of a wrong length or of random data)."""
        rng = self.rng
        code = rng.choice([-1, -1, -2, -128])
        data = rng.randbytes(rng.choice([1, 3, 4, 5, 8, 12, 13]))
        ext = bytes([0xC7, len(data), code & 0xFF]) + data
        head = pack("v") + pack(VERSION) + pack("id") + pack(self.loose_rid()) \
            + pack("op") + pack("query") + pack("sql") + pack("SELECT %s")
        return b"\x85" + head + pack("params") + b"\x91" + ext

    def sc_mutated(self, sock: FuzzSocket) -> Scenario[None]:
        rng = self.rng
        rid = self.rid()
        req = self.any_request(rid, holding=self.can_hold())
        for _ in range(rng.randint(1, 3)):
            self.mutate_fields(req)
        hold = self._held(req)
        try:
            body = pack(req)
        except (TypeError, ValueError, OverflowError):
            body = rng.randbytes(16)
        tracked = req.get("id") == rid and type(req.get("id")) is int
        session = req.get("session")
        sessions = (session,) if type(session) is str else ()
        yield Out([body], rid=rid if tracked else None, sessions=sessions,
                  op=str(req.get("op"))[:20], hold=hold)

    def sc_multipart(self, sock: FuzzSocket) -> Scenario[None]:
        rng = self.rng
        junk = [rng.randbytes(rng.randint(0, 30)) for _ in range(3)]
        rid = self.rid()
        ping = pack({"v": VERSION, "id": rid, "op": "ping"})
        shape = rng.randrange(6)
        if shape == 0:  # a DEALER that adds a REQ's delimiter: served
            reply = yield Out([b"", ping], rid=rid, op="ping")
            self.expect(reply is not None and reply.get("ok") == "pong",
                        "a delimited ping is served", reply)
            return
        frames = [[b"", junk[0], junk[1]], [junk[0] or b"x", junk[1]],
                  [junk[0] or b"x", *junk, b""], [b"", b""], [ping, ping]][shape - 1]
        yield Out(frames)

    def sc_req(self, sock: FuzzSocket) -> Scenario[None]:
        rng = self.rng
        shape = rng.randrange(4)
        if shape == 0:
            rid = self.rid()
            reply = yield self.out({"v": VERSION, "id": rid, "op": "query",
                                    "sql": "SELECT %s::text AS t", "params": ["via REQ"]})
            self.expect(reply is not None and reply.get("ok", {}).get("rows") == [["via REQ"]],
                        "a query through REQ is answered", reply)
        elif shape == 1:
            yield Out([rng.randbytes(rng.randint(0, 40))])
        elif shape == 2:
            yield Out([b"x", rng.randbytes(10)])  # the server sees two frames: bad_frames
        else:
            rid = self.rid()
            req = self.any_request(rid, holding=False)
            self.mutate_fields(req)
            try:
                body = pack(req)
            except (TypeError, ValueError, OverflowError):
                body = b"\xc1"
            yield Out([body], rid=rid if req.get("id") == rid else None, op=str(req.get("op")))

    def sized_query(self, size: int) -> tuple[int, bytes] | None:
        """A query request of exactly ``size`` bytes, or None."""
        rid = self.rid()
        pad = size
        for _ in range(6):
            body = pack({"v": VERSION, "id": rid, "op": "query", "sql": "SELECT 1 --" + "x" * pad})
            if len(body) == size:
                return rid, body
            pad += size - len(body)
        return None

    def sc_oversize(self, sock: FuzzSocket) -> Scenario[None]:
        rng = self.rng
        shape = rng.randrange(3)
        if shape == 0:  # exactly the limit: served
            for _ in range(SHED_RETRIES):
                sized = self.sized_query(MAX_MESSAGE_SIZE)
                if sized is None:
                    return
                rid, body = sized
                reply = yield Out([body], rid=rid, op="query")
                # The fuzzer floods its own pool: CoDel may shed this request, as it
                # would any other in a queue that stays long (the victim, another
                # client, keeps its turns).  Shed is not refused: try again.
                if not _shed(reply):
                    break
            self.expect(reply is not None and reply.get("ok", {}).get("rows") == [[1]],
                        "a request of max_message_size bytes is served", reply)
            return
        size = rng.choice([MAX_MESSAGE_SIZE + 1, rng.randint(MAX_MESSAGE_SIZE + 2,
                                                             4 * MAX_MESSAGE_SIZE)])
        sized = self.sized_query(size) if shape == 1 else None
        body = sized[1] if sized else rng.choice([b"\xc1", b"\x00", b"\x81"]) * size
        frames = [b"", body] if rng.random() < 0.2 else [body]
        # Not tracked: the server answers without reading the id (id nil).
        yield Out(frames)

    def sc_oversize_drop(self, sock: FuzzSocket) -> Scenario[None]:
        """Over four times the limit, on a socket of its own: libzmq drops the peer."""
        size = self.rng.randint(4 * MAX_MESSAGE_SIZE + 1, 5 * MAX_MESSAGE_SIZE)
        yield Out([self.rng.randbytes(64) * (size // 64 + 1)], reply=False)
        yield Close()

    def sc_valid(self, sock: FuzzSocket) -> Scenario[None]:
        op = self.rng.choice(["ping", "status", "heartbeat"])
        if op == "ping":
            reply = yield self.out(self.request("ping"))
            self.expect(reply is not None and reply.get("ok") == "pong", "ping answers pong",
                        reply)
        elif op == "status":
            reply = yield self.out(self.request("status"))
            ok = reply.get("ok") if reply else None
            self.expect(type(ok) is dict and ok.get("version") == VERSION,
                        "status answers its map", reply)
        else:
            reply = yield self.out(self.request("heartbeat", session=uuid.uuid4().hex))
            self.expect(reply is not None and reply.get("ok") == {"leases": 0},
                        "a heartbeat of an unknown session keeps nothing", reply)

    # -- scenarios: SQL ------------------------------------------------------------------------

    def statements(self) -> tuple[str, Any, bool]:
        sql, pristine = self.pick_sql()
        return sql, (None if sql in self.probes else self.params_for(sql)), pristine

    def sc_sql(self, sock: FuzzSocket) -> Scenario[None]:
        """Hostile SQL outside a lease."""
        rng = self.rng
        op = rng.choices(["query", "execute", "batch"], [45, 25, 30])[0]
        if op == "batch":
            items = [self.statements()[:2] for _ in range(rng.randint(1, 5))]
            if rng.random() < 0.3:
                sql = items[0][0]
                req = self.request("batch", sql=sql, params_seq=[self.params_for(sql)
                                                                 for _ in range(3)])
                items = [(sql, None)]
            else:
                req = self.request("batch", statements=[list(item) for item in items])
            reply = yield self.out(req)
            self.check_outside([sql for sql, _ in items], reply, batch=True)
            return
        sql, params, pristine = self.statements()
        req = self.request(op, sql=sql, params=params)
        if rng.random() < 0.1:
            req["timeout"] = rng.choice([0.005, 0.05, 1.0])
        reply = yield self.out(req)
        self.check_outside([sql], reply, batch=False)
        if pristine and params is None and sql in self.probes and reply is not None:
            self.check_probe(sql, reply)

    def check_outside(self, statements: list[str], reply: Reply | None, batch: bool) -> None:
        """Outside a lease, what is not of statement scope must not run: a statement the
        server's scanner sees so is refused (kind ``statement``); one whose scope shows
        only past leading empty statements (``;SET ...``, see scope_run) must at least
        not run."""
        if reply is None or not all(type(sql) is str and sql for sql in statements):
            return
        declared = [scope_of(sql) for sql in statements]
        error = reply.get("error") or {}
        kind = error.get("kind")
        refused = [i for i, scope in enumerate(declared) if scope != "statement"]
        if refused:
            if kind == "protocol" and error.get("code") == "bad_request":
                return  # parameters that are not parameters: refused before any scope check
            self.expect(kind == "statement" and error.get("scope") == declared[refused[0]]
                        and (not batch or len(statements) == 1
                             or error.get("index") == refused[0]),
                        f"{declared[refused[0]]} scope refused outside a lease: "
                        f"{statements!r:.300}", reply)
            return
        run = [scope_run(sql) for sql in statements]
        hidden = [i for i, scope in enumerate(run) if scope != "statement"]
        if not hidden:
            self.expect(kind != "statement",
                        f"statements of statement scope are not refused: {statements!r:.200}",
                        reply)
            return
        self.stats.empty_prefixed += 1
        first, index = hidden[0], error.get("index")
        not_run = kind in ("statement", "protocol") or (
            kind == "sql" and (index is None or index <= first))
        self.expect(not_run, f"a {run[first]} statement behind empty statements ran outside "
                             f"a lease: {statements[first]!r} in {statements!r:.300}", reply)

    def check_probe(self, sql: str, reply: Reply) -> None:
        """A probe outside a lease sees a fresh session (see PROBES), when it runs: one
        that found no connection within its timeout (as short as 5 ms) saw nothing."""
        if _shed(reply):
            return
        kind, expected = self.probes[sql]
        rows = reply.get("ok", {}).get("rows") if "ok" in reply else None
        if kind == "error":
            self.expect("error" in reply and reply["error"].get("kind") == "sql",
                        f"probe {sql!r} finds nothing left by a lease", reply)
        elif kind == "rows":
            self.expect(rows == expected, f"probe {sql!r} finds nothing left", reply)
        elif kind == "app":
            self.expect(rows == [[self.names.app]], f"probe {sql!r} sees the pool's name",
                        reply)
        else:
            self.expect(rows == [[self.defaults[expected]]],
                        f"probe {sql!r} sees the default {expected}", reply)

    def check_inside(self, statements: list[str], reply: Reply | None) -> None:
        """Inside a lease only COPY is refused."""
        if reply is None or not all(type(sql) is str and sql for sql in statements):
            return
        copies = [scope_of(sql) == "copy" for sql in statements]
        kind = (reply.get("error") or {}).get("kind")
        if any(copies):
            self.expect(kind in ("statement", "protocol"),
                        f"COPY refused in a lease: {statements!r:.200}", reply)
        else:
            self.expect(kind != "statement", f"statements run in a lease: {statements!r:.200}",
                        reply)

    def sc_lease(self, sock: FuzzSocket) -> Scenario[None]:
        """begin, hostile statements in the lease, then an ending (or none)."""
        rng = self.rng
        session = self.new_session()
        hold = self.hold(session)
        reply = yield self.out(self.request("begin", session=session), hold=hold)
        if reply is None or "ok" not in reply:
            return
        begun = time.monotonic()
        lease = reply["ok"]["lease"]
        self.leases.append((lease, session))
        alive = True
        #: It ran a statement that lets PostgreSQL end the session (an idle-in-transaction
        #: timeout, during a pause): the lease may then end with its connection.
        fragile = False
        for _ in range(rng.randint(0, 6)):
            step = rng.choices(["sql", "stream", "copy", "heartbeat", "foreign", "pause",
                                "double"], [50, 8, 8, 8, 8, 8, 5])[0]
            if step == "sql":
                op = rng.choices(["query", "execute", "batch"], [50, 20, 30])[0]
                if op == "batch":
                    items = [self.statements()[:2] for _ in range(rng.randint(1, 4))]
                    req = self.request("batch", statements=[list(i) for i in items],
                                       lease=lease, session=session)
                    sqls = [sql for sql, _ in items]
                else:
                    sql, params, _ = self.statements()
                    req = self.request(op, sql=sql, params=params, lease=lease,
                                       session=session)
                    sqls = [sql]
                fragile |= any("idle_in_transaction" in str(sql).lower() for sql in sqls)
                reply = yield self.out(req)
                self.check_inside(sqls, reply)
                alive = self.lease_alive(reply)
            elif step == "stream":
                alive = yield from self.stream_flow(session, lease, None)
            elif step == "copy":
                alive = yield from self.copy_flow(session, lease, None)
            elif step == "heartbeat":
                reply = yield self.out(self.request("heartbeat", session=session))
                self.expect(fragile or (reply is not None
                                        and reply.get("ok", {}).get("leases", 0) >= 1),
                            "a heartbeat keeps the session's lease", reply)
            elif step == "foreign":
                reply = yield self.out(self.request(
                    "query", sql="SELECT 1", params=None, lease=lease,
                    session=uuid.uuid4().hex), sessions=())
                self.expect(fragile or (reply is not None and (reply.get("error") or {}).get(
                    "code") == "lease_not_owned"), "another session's lease is not owned",
                    reply)
            elif step == "pause":
                yield Pause(rng.uniform(0, 0.3))
            else:  # two requests in the lease at once
                sql, params, _ = self.statements()
                yield self.out(self.request("query", sql=sql, params=params, lease=lease,
                                            session=session), wait=False)
                fragile |= "idle_in_transaction" in str(sql).lower()
                sql, params, _ = self.statements()
                fragile |= "idle_in_transaction" in str(sql).lower()
                reply = yield self.out(self.request("query", sql=sql, params=params,
                                                    lease=lease, session=session))
                alive = self.lease_alive(reply)
            if not alive:
                return
        ending = rng.choices(["commit", "rollback", "abandon", "expire", "outlive"],
                             [40, 30, 18, 8, 4])[0]
        if ending in ("commit", "rollback"):
            reply = yield self.out(self.request(ending, lease=lease, session=session))
            hold.released = True
            self.expect(fragile or (reply is not None and (reply.get("error") or {}).get(
                "reason") != "lease_expired"), f"{ending} of a live lease", reply)
        elif ending == "expire":  # silence past the heartbeat timeout: it must have ended
            quiet_since = time.monotonic()
            yield Pause(HEARTBEAT_TIMEOUT + 0.5)
            # Unless another scenario's request named the session meanwhile (a mutated
            # heartbeat picks known sessions): that kept the lease alive, rightly.
            silent = hold.touched <= quiet_since
            reply = yield self.out(self.request("query", sql="SELECT 1", params=None,
                                                lease=lease, session=session))
            hold.released = True
            if silent:
                self.expect(reply is not None
                            and (reply.get("error") or {}).get("reason") == "lease_expired",
                            "a silent lease expires", reply)
        elif ending == "outlive":  # heartbeats until past lease_max: it must have ended
            while time.monotonic() - begun < LEASE_MAX + 0.5:
                yield self.out(self.request("heartbeat", session=session))
                yield Pause(0.3)
            reply = yield self.out(self.request("query", sql="SELECT 1", params=None,
                                                lease=lease, session=session))
            hold.released = True
            self.expect(reply is not None
                        and (reply.get("error") or {}).get("reason") == "lease_expired",
                        "a lease ends at lease_max", reply)
        # "abandon": never committed; it expires (its hold counts until then).

    @staticmethod
    def lease_alive(reply: Reply | None) -> bool:
        error = (reply or {}).get("error") or {}
        return error.get("reason") not in ("lease_expired", "error")

    def sc_stream(self, sock: FuzzSocket) -> Scenario[None]:
        session = self.new_session()
        yield from self.stream_flow(session, None, self.hold(session))

    def stream_flow(self, session: str, lease: str | None,
                    hold: Hold | None) -> Scenario[bool]:
        """A stream, its pages, then close or abandon; whether the lease lives on."""
        rng = self.rng
        if rng.random() < 0.7:
            sql = expand(rng.choice(STREAM_SQL), self.names, rng)
        else:
            sql = self.pick_sql()[0]
        fields: dict[str, Any] = {"sql": sql, "params": None, "session": session,
                                  "max_rows": rng.choice([1, 2, 10, 500, 0, -1, "x"])}
        if lease is not None:
            fields["lease"] = lease
        reply = yield self.out(self.request("stream", **fields), hold=hold)
        if reply is None or "ok" not in reply:
            if lease is None and type(sql) is str and sql and scope_of(sql) == "copy":
                self.expect((reply or {}).get("error", {}).get("kind") in ("statement",
                                                                          "protocol"),
                            "COPY refused in a stream", reply)
            return self.lease_alive(reply)
        page = reply["ok"]
        stream = page["stream"]
        self.streams.append((stream, session))
        for _ in range(rng.randint(0, 5)):
            if page.get("done"):
                break
            step = rng.choices(["fetch", "close", "abandon", "foreign"], [60, 20, 10, 10])[0]
            if step == "abandon":
                return True
            if step == "foreign":
                reply = yield self.out(self.request("fetch", stream=stream,
                                                    session=uuid.uuid4().hex), sessions=())
                self.expect((reply or {}).get("error", {}).get("code") == "lease_not_owned",
                            "another session's stream is not owned", reply)
                continue
            reply = yield self.out(self.request(step, stream=stream, session=session))
            if step == "close" or reply is None or "ok" not in reply:
                break
            page = reply["ok"]
        if hold is not None:
            hold.released = True  # done, closed or failed (else it expires)
        return True

    def sc_copy(self, sock: FuzzSocket) -> Scenario[None]:
        session = self.new_session()
        yield from self.copy_flow(session, None, self.hold(session))

    def copy_flow(self, session: str, lease: str | None, hold: Hold | None) -> Scenario[bool]:
        """A copy_out or copy_in, its data, then an end, a close or nothing."""
        rng = self.rng
        direction = rng.choice(["out", "in"])
        fields: dict[str, Any] = {"session": session}
        if lease is not None:
            fields["lease"] = lease
        # The server takes page_bytes up to half its max_message_size, and checks it on
        # copy_in too, where its default (1 MiB) is over this server's limit: mostly valid.
        fields["sql"] = self.copy_sql(COPY_OUT_SQL if direction == "out" else COPY_IN_SQL)
        if rng.random() < 0.85:
            fields["page_bytes"] = rng.choice([1, 7, 1000, 4096, MAX_MESSAGE_SIZE // 2])
        elif rng.random() < 0.5:
            fields["page_bytes"] = rng.choice([MAX_MESSAGE_SIZE // 2 + 1, 0, -1, "x", None])
        reply = yield self.out(self.request(f"copy_{direction}", **fields), hold=hold)
        if reply is None or "ok" not in reply:
            return self.lease_alive(reply)
        copy = reply["ok"]["copy"]
        self.copies.append((copy, session))
        done = bool(reply["ok"].get("done"))
        ended = done
        for _ in range(rng.randint(0, 5)):
            if done:
                break
            if direction == "out":
                step = rng.choices(["read", "close", "abandon", "wrong", "busy", "double"],
                                   [55, 15, 10, 8, 7, 5])[0]
            else:
                step = rng.choices(["write", "end", "close", "abandon", "wrong", "busy"],
                                   [55, 15, 10, 8, 7, 5])[0]
            if step == "abandon":
                return True  # the copy (and its lease) expire
            if step == "wrong":
                op = "copy_write" if direction == "out" else "copy_read"
                reply = yield self.out(self.request(op, copy=copy, session=session, data=b"1\n"))
                self.expect("error" in (reply or {}), f"{op} of a copy_{direction} fails",
                            reply)
                continue
            if step == "busy":  # the lease (or a stranger) while the COPY runs
                if lease is not None:
                    reply = yield self.out(self.request("query", sql="SELECT 1", params=None,
                                                        lease=lease, session=session))
                    # A copy_out may have ended on the server, its last pages unread: the
                    # connection then goes on.  A copy_in runs until copy_end (or fails,
                    # and so does the transaction).
                    if direction == "in":
                        self.expect("error" in (reply or {}),
                                    "a lease busy with a copy_in refuses", reply)
                else:
                    reply = yield self.out(self.request(
                        f"copy_{'read' if direction == 'out' else 'end'}", copy=copy,
                        session=uuid.uuid4().hex), sessions=())
                    # Not owned; or ended already, by a "double" step's unread reply.
                    error = (reply or {}).get("error", {})
                    self.expect(error.get("code") == "lease_not_owned"
                                or error.get("reason") == "lease_expired",
                                "another session's copy is not owned", reply)
                continue
            if step == "double":
                yield self.out(self.request("copy_read", copy=copy, session=session),
                               wait=False)
                reply = yield self.out(self.request("copy_read", copy=copy, session=session))
                if "error" not in (reply or {}):
                    done = bool(reply and reply["ok"].get("done"))
                continue
            if step == "read":
                reply = yield self.out(self.request("copy_read", copy=copy, session=session))
            elif step == "write":
                data = rng.choice([b"1\n2\n3\n", "4\n5\n", b"x\ty\n", b"", b"\x00\xff\n",
                                   b"7\n" * rng.randint(1, 8000), "é\n", 12, None])
                reply = yield self.out(self.request("copy_write", copy=copy, session=session,
                                                    data=data))
                if "error" in (reply or {}) and (reply or {})["error"].get("code") \
                        == "bad_request":
                    continue
            elif step == "end":
                reply = yield self.out(self.request("copy_end", copy=copy, session=session))
            else:
                reply = yield self.out(self.request("close", copy=copy, session=session))
            if reply is None or "ok" not in reply or step in ("end", "close"):
                ended = True
                break
            done = bool(reply["ok"].get("done")) if type(reply["ok"]) is dict else False
            ended = done
        if ended and hold is not None:
            hold.released = True
        return True

    def sc_dies(self, sock: FuzzSocket) -> Scenario[None]:
        """A client that begins, sends a statement into its lease and closes its socket:
        the server rolls the lease back at once."""
        session = self.new_session()
        hold = self.hold(session)
        reply = yield self.out(self.request("begin", session=session), hold=hold)
        if reply is not None and "ok" in reply:
            lease = reply["ok"]["lease"]
            sql = self.rng.choice(["SELECT pg_sleep(0.05)", "SET search_path = fz_dead",
                                   "SELECT 1"])
            req = self.request("query", sql=sql, params=None, lease=lease, session=session)
            yield Out([pack(req)], reply=False, sessions=(session,), op="query")
        yield Close()


# -- the victim ---------------------------------------------------------------------------------


class Victim:
    """The well-behaved client's workload (see the module docstring); one cycle at a time."""

    def __init__(self, client: Client, table: str, defaults: dict[str, str]) -> None:
        self.client = client
        self.table = table
        self.defaults = defaults
        self.errors: list[str] = []
        self.error_count = 0
        self.latency: dict[str, list[float]] = {}
        self.committed: list[int] = []
        self.uncertain: list[int] = []  # rows whose commit failed: there or not
        self.cycles = 0
        self.next_id = 1
        self.value = 0

    def cycle(self) -> None:
        self.cycles += 1
        self.value = self.cycles * 7919 % 100_003
        self.timed("select", self.select)
        self.timed("execute", self.execute)
        self.timed("show statement_timeout", lambda: self.show("statement_timeout"))
        self.timed("show search_path", lambda: self.show("search_path"))
        self.timed("count", self.count)
        self.timed("transaction", self.transaction)
        self.timed("batch", self.batch)

    def timed(self, op: str, call: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            call()
        except Exception as error:
            self.error_count += 1
            if len(self.errors) < 50:
                self.errors.append(f"{op}: {type(error).__name__}: {error}")
        else:
            self.latency.setdefault(op, []).append(time.perf_counter() - start)

    def select(self) -> None:
        rows = self.client.query("SELECT %s::int", [self.value]).rows
        assert rows == [(self.value,)], rows

    def execute(self) -> None:
        rows = self.client.execute("SELECT %s::int + 1", [self.value]).rows
        assert rows == [(self.value + 1,)], rows

    def show(self, setting: str) -> None:
        rows = self.client.query(f"SHOW {setting}").rows
        assert rows == [(self.defaults[setting],)], (setting, rows)

    def count(self) -> None:
        rows = self.client.query(f"SELECT count(*) FROM {self.table}").rows
        if not self.uncertain:
            assert rows == [(len(self.committed),)], (rows, len(self.committed))

    def transaction(self) -> None:
        row_id = self.next_id
        self.next_id += 1
        tx = self.client.transaction()
        try:
            tx.execute(f"INSERT INTO {self.table} (id, src) VALUES (%s, 'tx')", [row_id])
            rows = tx.query("SHOW search_path").rows
            assert rows == [(self.defaults["search_path"],)], rows
        except BaseException:
            if tx.active:
                tx.rollback()
            raise
        try:
            tx.commit()
        except BaseException:
            self.uncertain.append(row_id)
            raise
        self.committed.append(row_id)

    def batch(self) -> None:
        ids = list(range(self.next_id, self.next_id + 3))
        self.next_id += 3
        try:
            results = self.client.batch(
                f"INSERT INTO {self.table} (id, src) VALUES (%s, 'batch')", [[i] for i in ids])
        except BaseException:
            self.uncertain.extend(ids)
            raise
        assert [result.rowcount for result in results] == [1, 1, 1], results
        self.committed.extend(ids)

    def results(self) -> dict[str, Any]:
        return {"errors": self.errors, "error_count": self.error_count,
                "latency": self.latency, "committed": self.committed,
                "uncertain": self.uncertain, "cycles": self.cycles}


def victim_process(endpoint: str, table: str, defaults: dict[str, str], ready: Any,
                   stop: Any, results: Any) -> None:
    """Run :class:`Victim` cycles until ``stop`` is set (a process of its own)."""
    outcome: dict[str, Any] = {"errors": [], "error_count": 0, "latency": {},
                               "committed": [], "uncertain": [], "cycles": 0}
    try:
        with Client(endpoint, timeout=VICTIM_TIMEOUT) as client:
            client.ping()
            victim = Victim(client, table, defaults)
            ready.set()
            try:
                while not stop.is_set():
                    victim.cycle()
            finally:
                outcome = victim.results()
    except BaseException as error:
        outcome["error_count"] += 1
        outcome["errors"].append(f"the victim stopped: {type(error).__name__}: {error}")
    finally:
        ready.set()
        results.put(outcome)


# -- the server's backends ------------------------------------------------------------------------


def server_ports(pid: int, pg_port: int) -> set[int]:
    """The local ports of process ``pid``'s TCP connections to port ``pg_port``."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as lines:
                next(lines)
                for line in lines:
                    parts = line.split()
                    if parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) == pg_port:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def server_backends(direct: psycopg.Connection[Any], app: str, pid: int,
                    pg_port: int) -> list[tuple[Any, ...]]:
    """``(pid, state, application_name, client_port)`` of the server's backends: those
    of its pool's application_name, and those at the client ports of its sockets."""
    ports = sorted(server_ports(pid, pg_port))
    return direct.execute(
        "SELECT pid, state, application_name, client_port FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "AND (application_name = %s OR client_port = ANY(%s)) ORDER BY pid",
        [app, ports]).fetchall()


#: What a fresh session shows, read on each pooled connection inside a transaction.
SESSION_VIEW = (
    "SELECT pg_backend_pid(), current_setting('statement_timeout'), "
    "current_setting('search_path'), current_setting('TimeZone'), "
    "current_setting('application_name'), current_user, "
    "(SELECT count(*) FROM pg_cursors WHERE name <> ''), "
    "(SELECT count(*) FROM pg_prepared_statements WHERE from_sql), "
    "(SELECT count(*) FROM pg_listening_channels()), "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), "
    "(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
)


def _begin_patiently(client: Client) -> Any:
    """A transaction begun on ``client``, asked for again while the server sheds it:
    just after the flood its queue may still be judged slow (CoDel), and a begin that
    waits for the last connection to come free is then dropped."""
    deadline = time.monotonic() + VICTIM_TIMEOUT
    while True:
        try:
            return client.transaction().begin()
        except PoolConnectionError as error:
            if error.reason != "queue_timeout" or time.monotonic() > deadline:
                raise


def every_connection(endpoint: str, pool_size: int) -> list[tuple[Any, ...]]:
    """SESSION_VIEW on each pooled connection: ``pool_size`` transactions held at once,
    so each runs on a connection of its own.  A connection whose view fails (a leaked
    ``statement_timeout`` cancels it...) gives ``(pid, error)``."""
    rows: list[tuple[Any, ...]] = []
    with ExitStack() as stack:
        client = stack.enter_context(Client(endpoint, timeout=VICTIM_TIMEOUT))
        txs = [stack.enter_context(_begin_patiently(client)) for _ in range(pool_size)]
        for tx in txs:
            pid = tx.query("SELECT pg_backend_pid()").rows[0][0]
            try:
                rows.append(tx.query(SESSION_VIEW).rows[0])
            except psycopg.Error as error:
                rows.append((pid, f"{type(error).__name__}: {error}"))
        for tx in txs:
            tx.rollback()
    return rows


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _top(counter: Counter[str], limit: int = 40) -> str:
    return ", ".join(f"{key} {count}" for key, count in counter.most_common(limit))


# -- the campaign ---------------------------------------------------------------------------------


def _defaults(direct: psycopg.Connection[Any]) -> dict[str, str]:
    """What a fresh session shows (every client of the server must see it)."""
    defaults: dict[str, str] = {}
    for setting in ("statement_timeout", "search_path", "TimeZone", "work_mem",
                    "idle_in_transaction_session_timeout"):
        row = direct.execute("SELECT current_setting(%s)", [setting]).fetchone()
        assert row is not None
        defaults[setting] = row[0]
    row = direct.execute("SELECT current_user").fetchone()
    assert row is not None
    defaults["current_user"] = row[0]
    return defaults


def _seed() -> int:
    text = os.environ.get("DBPOOL_FUZZ_SEED")
    return int(text) if text else random.SystemRandom().randrange(2**32)


@dataclass
class Figures:
    seed: int
    fuzz: FuzzStats
    victim: dict[str, Any]
    status: dict[str, Any]
    problems: list[str]
    lines: list[str]


def run_campaign(pg_dsn: str, directory: Path, frames: int, rate: float,
                 seed: int | None = None) -> Figures:
    """Start a server, fuzz it beside the victim, check everything; return the figures
    (``problems`` lists what failed; the caller asserts it is empty)."""
    seed = _seed() if seed is None else seed
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        print(f"fuzz: {line}", flush=True)

    report(f"seed {seed} (rerun with DBPOOL_FUZZ_SEED={seed}); {frames} frames at "
           f"{rate:g}/s")
    names = Names(uuid.uuid4().hex[:10], random.Random(seed).randrange(1, 2**31))
    config = directory / f"{names.app}.toml"
    config.write_text(f'[pool]\nconnect_kwargs = {{ application_name = "{names.app}" }}\n')
    params = conninfo_to_dict(pg_dsn)
    pg_port = int(params.get("port") or 5432)
    # A database of the run's own: mutated SQL may create tables ("SELECT 1 INTO T" is
    # a truncation away), and the PostgreSQL server is shared.  Dropped at the end.
    dsn = make_conninfo(pg_dsn, dbname=names.database)
    problems: list[str] = []
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {names.database}")
        try:
            with psycopg.connect(dsn, autocommit=True) as direct:
                defaults = _defaults(direct)
                row = direct.execute("SELECT current_setting('max_prepared_transactions')"
                                     ).fetchone()
                two_phase_fails = row is not None and row[0] == "0"
                direct.execute(f"CREATE TABLE {names.table} (v int, t text)")
                direct.execute(f"CREATE TABLE {names.victim_table} "
                               "(id int PRIMARY KEY, src text)")
                with ServerProcess(
                    dsn, "--max-message-size", str(MAX_MESSAGE_SIZE),
                    "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
                    "--lease-max", str(LEASE_MAX), "--timeout", str(SERVER_TIMEOUT),
                    "--grace", "2", "--config", str(config), pool_size=POOL_SIZE,
                ) as server:
                    figures = _fuzz_and_check(server, direct, names, defaults,
                                              two_phase_fails, seed, frames, rate,
                                              pg_port, report, problems)
                    code = server.terminate()
                    if code != 0:
                        problems.append(f"the server exited with {code}")
                    output = server.output()
                    if "Traceback" in output:
                        at = output.index("Traceback")
                        problems.append("the server logged a traceback:\n"
                                        + output[max(0, at - 300):at + 3000])
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {names.database} WITH (FORCE)")
    figures.lines = lines
    for problem in problems:
        report(f"PROBLEM: {problem}")
    return figures


def _fuzz_and_check(server: ServerProcess, direct: psycopg.Connection[Any], names: Names,
                    defaults: dict[str, str], two_phase: bool, seed: int, frames: int,
                    rate: float, pg_port: int, report: Callable[[str], None],
                    problems: list[str]) -> Figures:
    with Client(server.endpoint, timeout=VICTIM_TIMEOUT) as probe:
        wait_for(lambda: probe.status()["pool"]["ready_conn_count"] == POOL_SIZE, 20,
                 "the pool to connect")
    rss_before = rss_mb(server.pid)

    mp = multiprocessing.get_context("spawn")
    ready, stop, results = mp.Event(), mp.Event(), mp.Queue()
    victim_proc = mp.Process(
        target=victim_process, name="fuzz-victim", daemon=True,
        args=(server.endpoint, names.victim_table, defaults, ready, stop, results))
    victim_proc.start()
    victim: dict[str, Any] = {}
    fuzzer = Fuzzer(server.endpoint, names, seed, frames, rate, defaults, two_phase)
    client = Client(server.endpoint, timeout=VICTIM_TIMEOUT)
    try:
        if not ready.wait(60):
            raise AssertionError("the victim did not start within 60 s")
        fuzzer.run(time_budget=3 * frames / rate + 30)
        stop.set()
        victim = results.get(timeout=60)
        victim_proc.join(30)
        _barrier(fuzzer, problems)
        # The server still answers; what the fuzzer left open (abandoned leases,
        # streams, copies) expires by heartbeat_timeout or lease_max, its sockets still
        # connected (closing them would end the leases at once).
        client.ping()
        status = client.status()
        assert status["version"] == VERSION, status
        left_open = {key: status["server"][key]
                     for key in ("open_leases", "open_streams", "open_copies")}
        started = time.monotonic()

        def settled() -> dict[str, Any] | None:
            server_map = client.status()["server"]
            quiet = (server_map["open_leases"] == 0 and server_map["open_streams"] == 0
                     and server_map["open_copies"] == 0 and server_map["queued"] == 0)
            return server_map if quiet else None

        try:
            wait_for(settled, LEASE_MAX + HEARTBEAT_TIMEOUT + 10,
                     "no open lease, stream or copy")
        except AssertionError as error:
            problems.append(f"{error}: {client.status()['server']}")
        expired_in = time.monotonic() - started
    finally:
        stop.set()
        fuzzer.ctx.destroy(linger=0)
        if victim_proc.is_alive():
            victim_proc.kill()
            victim_proc.join(10)
    stats = fuzzer.stats

    # -- what the fuzzer saw ------------------------------------------------------------------
    for sock in fuzzer.sockets:
        if sock.outstanding:
            problems.append(f"{sock.name}: {sock.outstanding} of {sock.sent} replies never "
                            f"came; it sent last: {list(sock.recent)}")
    for rid, sent in sorted(fuzzer.pending.items()):
        problems.append(f"no reply to {sent.summary} (id {rid}, on {sent.sock.name}, "
                        f"{time.monotonic() - sent.at:.1f} s ago)")
    problems.extend(f"broke the protocol: {line}" for line in stats.protocol[:30])
    problems.extend(f"expectation failed: {line}" for line in stats.violations[:30])

    # -- the server's connections ---------------------------------------------------------------
    with client:
        def backends_settled() -> list[tuple[Any, ...]] | None:
            pool = client.status()["pool"]
            rows = server_backends(direct, names.app, server.pid, pg_port)
            good = (len(rows) == POOL_SIZE and pool["ready_conn_count"] == POOL_SIZE
                    and all(state == "idle" and app == names.app for _, state, app, _ in rows))
            return rows if good else None

        try:
            backends = wait_for(backends_settled, 20, "the server's backends to be idle")
        except AssertionError as error:
            backends = server_backends(direct, names.app, server.pid, pg_port)
            problems.append(f"{error}: {backends}")
        in_transaction = [row for row in backends if (row[1] or "").startswith("idle in")]
        if in_transaction:
            problems.append(f"backends left idle in transaction: {in_transaction}")
        status = client.status()
    views = every_connection(server.endpoint, POOL_SIZE)
    pids = [row[0] for row in views]
    if len(set(pids)) != POOL_SIZE:
        problems.append(f"{POOL_SIZE} transactions did not reach {POOL_SIZE} connections: "
                        f"{views}")
    if set(pids) != {row[0] for row in backends}:
        problems.append(f"the pooled connections {sorted(pids)} are not the backends found "
                        f"{backends}")
    fresh = (defaults["statement_timeout"], defaults["search_path"], defaults["TimeZone"],
             names.app, defaults["current_user"], 0, 0, 0, 0, 0)
    for row in views:
        if tuple(row[1:]) != fresh:
            problems.append(f"backend {row[0]} is not at a fresh session's state: {row[1:]} "
                            f"!= {fresh}")

    # -- the victim ------------------------------------------------------------------------------
    committed, uncertain = set(victim.get("committed", [])), set(victim.get("uncertain", []))
    stored = {r[0] for r in direct.execute(f"SELECT id FROM {names.victim_table}").fetchall()}
    if not committed <= stored or not stored <= committed | uncertain:
        problems.append(f"the victim's rows: {len(committed - stored)} committed rows "
                        f"missing, {len(stored - committed - uncertain)} unexpected")
    if victim.get("error_count"):
        problems.append(f"the victim saw {victim['error_count']} errors: "
                        f"{victim['errors'][:10]}")
    latencies = [x for values in victim.get("latency", {}).values() for x in values]
    if victim.get("cycles", 0) < 3:
        problems.append(f"the victim ran only {victim.get('cycles')} cycles")

    # -- figures ------------------------------------------------------------------------------
    counters = status["server"]
    report(f"{fuzzer.sent} frames in {stats.duration:.1f} s "
           f"({fuzzer.sent / max(stats.duration, 1e-9):.0f}/s) on {len(fuzzer.sockets)} sockets")
    report(f"frames by kind: {_top(stats.frames)}")
    report(f"requests by op: {_top(stats.ops)}")
    report(f"replies {stats.replies} (ok {stats.ok}, errors {sum(stats.errors.values())}); "
           f"no reply due {stats.no_reply_due} (over 4x the size limit, or sent by a client "
           f"that then died); abandoned with their socket {stats.abandoned}; "
           f"holds {stats.holds}; expectations checked {stats.expectations} "
           f"({stats.empty_prefixed} of them past leading empty statements)")
    report(f"errors by code: {_top(stats.errors)}")
    by_op = "; ".join(
        f"{op} {len(v)} p50 {percentile(v, .5) * 1e3:.1f} p99 {percentile(v, .99) * 1e3:.1f} "
        f"max {max(v) * 1e3:.1f}" for op, v in sorted(victim.get("latency", {}).items()) if v)
    report(f"victim: {len(latencies)} operations in {victim.get('cycles')} cycles, "
           f"{victim.get('error_count')} errors, {len(committed)} rows committed; latency "
           f"p50 {percentile(latencies, .5) * 1e3:.1f} ms, p99 "
           f"{percentile(latencies, .99) * 1e3:.1f} ms, max "
           f"{max(latencies, default=math.nan) * 1e3:.1f} ms")
    report(f"victim by op (ms): {by_op}")
    report(f"server: requests {counters['requests']}, errors {counters['errors']}, leases "
           f"{counters['leases']}, streams {counters['streams']}, copies {counters['copies']}; "
           f"rss {rss_before:.1f} -> {rss_mb(server.pid):.1f} MB")
    report(f"after: left open {left_open}, all expired {expired_in:.1f} s later; "
           f"{len(backends)} backends, none idle in transaction: {not in_transaction}; "
           f"{len(set(pids))} distinct pooled connections checked; victim rows "
           f"{len(stored & committed)}/{len(committed)}")
    return Figures(seed, stats, victim, status, problems, [])


def _barrier(fuzzer: Fuzzer, problems: list[str]) -> None:
    """A last ping on each open socket: anything before its pong is a stray reply."""
    for sock in fuzzer.sockets:
        if sock.closed:
            continue
        rid = fuzzer.rid()
        try:
            sock.sock.send(pack({"v": VERSION, "id": rid, "op": "ping"}))
        except zmq.ZMQError as error:
            problems.append(f"{sock.name}: the last ping could not be sent: {error}")
            continue
        deadline = time.monotonic() + 10
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.sock.poll(int(left * 1000)):
                problems.append(f"{sock.name}: no pong to the last ping")
                break
            frames = sock.sock.recv_multipart()
            reply = wire.unpackb(frames[-1])
            if reply == {"id": rid, "ok": "pong"}:
                break
            problems.append(f"{sock.name}: a stray reply after the campaign: {reply!r:.200}")


def _assert_clean(figures: Figures) -> None:
    assert not figures.problems, (
        f"fuzz seed {figures.seed} (rerun with DBPOOL_FUZZ_SEED={figures.seed}): "
        f"{len(figures.problems)} problems:\n" + "\n".join(figures.problems[:60])
        + "\n\nfigures:\n" + "\n".join(figures.lines))


# -- the tests ------------------------------------------------------------------------------------


def test_fuzz_short(pg_dsn: str, tmp_path: Path) -> None:
    """3,000 frames beside the victim; well under 30 s."""
    _assert_clean(run_campaign(pg_dsn, tmp_path, SHORT_FRAMES, SHORT_RATE))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_full(pg_dsn: str, tmp_path: Path) -> None:
    """The full campaign: 100,000 frames; prints its figures."""
    _assert_clean(run_campaign(pg_dsn, tmp_path, FULL_FRAMES, FULL_RATE))
