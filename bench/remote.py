"""``dbpool bench --remote``: ``dbpool serve`` against PgBouncer and direct psycopg.

What it measures, all in one run on one machine:

- **Throughput**: ``SELECT 1`` queries per second from 1, 4, 16 and 64 client
  *processes* (not threads: every client has its own interpreter, as the
  clients of a real server do), on pools of 1, 4, 4 and 10 connections, for
  three contenders:

  - ``psycopg``: each process its own psycopg connection to the DSN (no pool
    at all: the pool size does not apply);
  - ``pgbouncer``: psycopg through a PgBouncer that the benchmark starts
    itself, in transaction mode with ``default_pool_size`` = the pool size;
  - ``dbpool``: :class:`dbpool.client.Client` talking to a ``dbpool serve``
    subprocess with ``--pool-size`` = the pool size;
  - ``dbpool_curve``: the same through a second ``dbpool serve`` with CURVE
    authentication and encryption (keys made for the run), to show what
    CURVE costs.

  The worker processes are started once per scenario, connect to every
  contender and warm up; then the contenders take turns, in an order that
  rotates from round to round, each running for ``duration`` seconds from a
  start barrier.  A cell is the median over the rounds, a ratio the median
  of the per-round ratios (a virtual machine's speed swings within seconds;
  turns paired within a round cancel most of that).  Each turn also reports
  where the CPU went, in microseconds per query: in the client processes, in
  the pooler's process and in PostgreSQL's (not for direct psycopg, whose
  backends exit with the turn).
- **Single-client latency**: the median time of one query, timed in the
  worker, at 1 process, for each contender.
- **Batch**: one client sending ``client.batch("SELECT 1", [()] * 100)`` over
  and over, in statements per second, against PgBouncer's single-client
  statements per second (one ``SELECT 1`` per round trip).
- **Many tasks**: one process of 256 asyncio tasks, each running ``SELECT 1``
  in a loop: one ``AsyncClient`` through ``dbpool serve`` against psycopg's
  ``AsyncConnectionPool`` of 256 connections to PgBouncer, a pool of 10
  behind either (:mod:`dbpool.bench.many_tasks`).
- **A real transaction**: pgbench's TPC-B-like transaction from one client,
  through ``client.transaction()`` statement by statement, as one atomic
  ``client.batch()``, and through PgBouncer statement by statement
  (:mod:`dbpool.bench.tpcb`).
- **Overload**: twice what a pool of 2 can serve, offered in an open loop
  through either pooler, with the served requests' p50, p99 and maximum
  latency and the share that failed fast (:mod:`dbpool.bench.overload`).
- **Idle clients**: the resident memory of the ``dbpool serve`` process
  before and after 1,000 ZeroMQ ``DEALER`` sockets (in a few helper
  processes) have connected and each sent one ``ping``, and the growth per
  client.

Targets (:data:`TARGETS`, issue 20's where it sets them): at 4, 16 and 64
processes dbpool's q/s is at least PgBouncer's, and with CURVE at 16 at
least 0.85 x its own without; dbpool's single-client latency is at most
PgBouncer's; a batch of 100 runs at
least 5 x as many statements per second as PgBouncer does one at a time;
many asyncio tasks in one process run at least 2 x PgBouncer's q/s; the
TPC-B-like transaction runs at least as fast as through PgBouncer, and at
least 3 x as fast as one batch; under overload dbpool's served p99 stays
within a few ``queue_target`` s (:func:`dbpool.bench.overload.overload_target`).
A target that could not be measured (PgBouncer not installed, the server not
starting) counts as missed: :func:`run_remote`'s
report has ``"ok": False`` and ``dbpool bench --remote`` exits with status 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

import psycopg

from dbpool.compiled import build_name

from .many_tasks import TASKS, run_many_tasks
from .many_tasks import THRESHOLD as MANY_TASKS_THRESHOLD
from .overload import TARGET as OVERLOAD_TARGET
from .overload import overload_target, print_overload, run_overload
from .servers import (
    Backend,
    DbpoolServer,
    ServerError,
    client_class,
    cpu_seconds,
    find_pgbouncer,
    median_cpu,
    one_line,
    postgres_cpu_seconds,
    start_poolers,
)
from .table import cell, ratio
from .tpcb import BATCH_THRESHOLD as TPCB_BATCH_THRESHOLD
from .tpcb import TRANSACTION_THRESHOLD as TPCB_TRANSACTION_THRESHOLD
from .tpcb import print_tpcb, run_tpcb

__all__ = [
    "DEFAULT_PROCESSES",
    "TARGETS",
    "parse_processes",
    "pool_size_for",
    "run_remote",
]

logger = logging.getLogger("dbpool.bench.remote")

SQL = "SELECT 1"
BATCH_SIZE = 100
DEFAULT_PROCESSES: tuple[int, ...] = (1, 4, 16, 64)
#: Pool size per number of client processes, the same for dbpool and PgBouncer.
POOL_SIZES: dict[int, int] = {1: 1, 4: 4, 16: 4, 64: 10}
CONTENDERS: tuple[str, ...] = ("psycopg", "pgbouncer", "dbpool", "dbpool_curve")
#: dbpool through a server with CURVE authentication and encryption.
CURVE = "dbpool_curve"
#: The batch turn, run at 1 process only.
BATCH = "dbpool_batch"
IDLE_CLIENTS = 1000
IDLE_HELPERS = 4
#: Seconds the idle clients stay connected before the server's RSS is read.
IDLE_HOLD = 3.0
#: Warm-up queries per contender and process before a turn's start barrier.
WARMUP = 20
#: Seconds to wait for the worker processes to start, or for a turn's barrier.
STARTUP_TIMEOUT = 180.0

#: (name, description, threshold).
TARGETS: tuple[tuple[str, str, float], ...] = (
    # Issue 20's targets: ahead of PgBouncer at 4, 16 and 64 processes, and as fast
    # from one.
    ("throughput_4", "4 processes: dbpool q/s >= 1.0 x pgbouncer q/s", 1.0),
    ("throughput_16", "16 processes: dbpool q/s >= 1.0 x pgbouncer q/s", 1.0),
    ("throughput_64", "64 processes: dbpool q/s >= 1.0 x pgbouncer q/s", 1.0),
    ("curve_16", "16 processes: dbpool with CURVE q/s >= 0.85 x dbpool without", 0.85),
    ("latency_1", "1 process: dbpool median latency <= 1.0 x pgbouncer's", 1.0),
    ("batch_100", f"batch of {BATCH_SIZE}: dbpool statements/s >= 5 x pgbouncer "
                  "single-client statements/s", 5.0),
    ("asyncio_tasks", "1 process of many asyncio tasks: dbpool q/s >= "
                      f"{MANY_TASKS_THRESHOLD:g} x pgbouncer (AsyncConnectionPool)",
     MANY_TASKS_THRESHOLD),
    ("tpcb_transaction", "TPC-B-like transaction, statement by statement: dbpool "
                         f"transactions/s >= {TPCB_TRANSACTION_THRESHOLD:g} x pgbouncer",
     TPCB_TRANSACTION_THRESHOLD),
    ("tpcb_batch", "TPC-B-like transaction as one batch: dbpool transactions/s >= "
                   f"{TPCB_BATCH_THRESHOLD:g} x pgbouncer statement by statement",
     TPCB_BATCH_THRESHOLD),
    # Judged as value <= threshold, in ms; the threshold comes with the report.
    ("overload_p99", OVERLOAD_TARGET, 0.0),
)


def pool_size_for(processes: int) -> int:
    """The pool size for ``processes`` clients: 1, 4, 4, 10 for 1, 4, 16, 64."""
    if processes in POOL_SIZES:
        return POOL_SIZES[processes]
    return min(processes, 4) if processes <= 16 else 10


def parse_processes(text: str) -> tuple[int, ...]:
    """``"1,4,16,64"`` -> ``(1, 4, 16, 64)``; ValueError for anything else."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated process counts, got {text!r}") from None
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"expected comma-separated process counts >= 1, got {text!r}")
    return tuple(sorted(set(counts)))


# -- worker processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process connects to; a contender it lacks is not run."""

    dsn: str
    pgbouncer_dsn: str | None
    dbpool_endpoint: str | None
    batch: bool
    #: The CURVE server's endpoint, its public key file and a client's secret key file.
    curve: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class TurnResult:
    """One worker's figures for one turn."""

    count: int  # statements run
    seconds: float
    latency_us: float | None = None  # median per call, if timed
    error: str | None = None
    #: CPU seconds the worker process used while it ran them.
    cpu_seconds: float = 0.0


class _Contenders:
    """A worker's connections: a step function per contender."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.errors: dict[str, str] = {}
        self.closers: list[Callable[[], object]] = []
        self.steps: dict[str, Callable[[], object]] = {}
        if spec.pgbouncer_dsn is not None:
            try:
                bouncer = psycopg.connect(spec.pgbouncer_dsn, autocommit=True,
                                          prepare_threshold=None)
                self.closers.append(bouncer.close)
                self.steps["pgbouncer"] = lambda: bouncer.execute(SQL).fetchall()
            except Exception as exc:
                self.errors["pgbouncer"] = one_line(exc)
        if spec.dbpool_endpoint is not None:
            try:
                client = client_class()(spec.dbpool_endpoint)
                self.closers.append(client.close)
                self.steps["dbpool"] = lambda: client.query(SQL)
                if spec.batch:
                    params = [()] * BATCH_SIZE
                    self.steps[BATCH] = lambda: client.batch(SQL, params)
            except Exception as exc:
                self.errors["dbpool"] = self.errors[BATCH] = one_line(exc)
        if spec.curve is not None:
            endpoint, server_key, client_key = spec.curve
            try:
                secured = client_class()(endpoint, server_key=server_key,
                                          client_key=client_key)
                self.closers.append(secured.close)
                self.steps[CURVE] = lambda: secured.query(SQL)
            except Exception as exc:
                self.errors[CURVE] = one_line(exc)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Callable[[], object]]:
        """The step of ``name``, checked and warmed up.

        Direct connections are opened for the turn only, so that 64 of them
        do not sit idle on the server through the other contenders' turns.
        """
        if name == "psycopg":
            with psycopg.connect(self.spec.dsn, autocommit=True) as conn:
                yield self._warm(name, lambda: conn.execute(SQL).fetchall())
            return
        if name in self.errors:
            raise RuntimeError(self.errors[name])
        yield self._warm(name, self.steps[name])

    @staticmethod
    def _warm(name: str, step: Callable[[], object]) -> Callable[[], object]:
        result = step()
        if name == BATCH:
            results: Any = result
            if len(results) != BATCH_SIZE or results[0].rows[0][0] != 1:
                raise RuntimeError(f"wrong batch result: {results!r:.200}")
        else:
            rows: Any = getattr(result, "rows", result)
            if rows[0][0] != 1:
                raise RuntimeError(f"wrong result: {result!r:.200}")
        for _ in range(WARMUP):
            step()
        return step

    def close(self) -> None:
        for close in self.closers:
            try:
                close()
            except Exception:
                pass


def _run_turn(step: Callable[[], object], duration: float, timed: bool,
              per_call: int) -> TurnResult:
    count = 0
    latencies: list[float] = []
    error = None
    clock = time.perf_counter
    cpu_began = time.process_time()
    began = clock()
    end = began + duration
    try:
        if timed:
            append = latencies.append
            while True:
                t0 = clock()
                if t0 >= end:
                    break
                step()
                append(clock() - t0)
                count += 1
        else:
            while clock() < end:
                step()
                count += 1
    except Exception as exc:
        error = one_line(exc)
    seconds = clock() - began
    latency = statistics.median(latencies) * 1e6 if latencies else None
    return TurnResult(count * per_call, seconds, latency, error,
                      time.process_time() - cpu_began)


def _worker(spec: WorkerSpec, conn: Connection, barrier: Barrier) -> None:
    """A client process: connect, report ready, then run the turns it is sent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles ^C
    contenders = _Contenders(spec)
    conn.send(("ready", contenders.errors))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, name, duration, timed = message
            result: TurnResult | None = None
            started = False
            try:
                with contenders.step(name) as step:
                    barrier.wait(STARTUP_TIMEOUT)
                    started = True
                    per_call = BATCH_SIZE if name == BATCH else 1
                    result = _run_turn(step, duration, timed, per_call)
            except threading.BrokenBarrierError:
                return
            except Exception as exc:
                if not started:
                    # Still meet the others at the barrier, then report the failure.
                    try:
                        barrier.wait(STARTUP_TIMEOUT)
                    except threading.BrokenBarrierError:
                        return
                if result is None:
                    result = TurnResult(0, duration, None, one_line(exc))
            conn.send(result)
    except (EOFError, OSError):
        pass  # the coordinator went away
    finally:
        contenders.close()


class _Workers:
    """``n`` worker processes, started and connected."""

    def __init__(self, n: int, spec: WorkerSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(n + 1)
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for _ in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(spec, theirs, self.barrier), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)
        self.errors: dict[str, str] = {}
        try:
            for pipe in self.pipes:
                _, errors = self._recv(pipe, STARTUP_TIMEOUT)
                self.errors.update(errors)
        except BaseException:
            self.close()
            raise

    def _recv(self, pipe: Connection, timeout: float) -> Any:
        try:
            if pipe.poll(timeout):
                return pipe.recv()
        except (EOFError, OSError):
            raise RuntimeError("a worker process exited") from None
        raise RuntimeError(f"a worker process sent nothing within {timeout:g}s")

    def turn(self, name: str, duration: float, timed: bool,
             pooler: int | None) -> tuple[list[TurnResult], float | None, float]:
        """Run one turn of contender ``name``: every worker's figures, and the CPU
        seconds the pooler's process (pid ``pooler``; None for no pooler) and
        PostgreSQL used from the start barrier until the last worker reported."""
        for pipe in self.pipes:
            pipe.send(("run", name, duration, timed))
        self.barrier.wait(STARTUP_TIMEOUT)
        pooler_before = cpu_seconds(pooler) if pooler is not None else None
        postgres_before = postgres_cpu_seconds()
        results: list[TurnResult] = [self._recv(p, duration + 60) for p in self.pipes]
        pooler_after = cpu_seconds(pooler) if pooler is not None else None
        pooler_used = (None if pooler_before is None or pooler_after is None
                       else pooler_after - pooler_before)
        return results, pooler_used, postgres_cpu_seconds() - postgres_before

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        deadline = time.monotonic() + 15
        for proc in self.procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


# -- idle clients ---------------------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _idle_helper(endpoint: str, sockets: int, conn: Connection) -> None:
    """Hold ``sockets`` DEALER sockets that have each pinged, until told to close them."""
    import zmq

    from dbpool.wire import packb, unpackb

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_nofile()
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, sockets + 64)
    held: list[zmq.Socket[bytes]] = []
    ok = 0
    error = None
    try:
        poller = zmq.Poller()
        for i in range(sockets):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send(packb({"v": 1, "id": i, "op": "ping"}))
            poller.register(sock, zmq.POLLIN)
            held.append(sock)
        deadline = time.monotonic() + 60
        pending = set(held)
        while pending and time.monotonic() < deadline:
            for sock, _ in poller.poll(1000):
                reply = unpackb(sock.recv())
                if reply.get("ok") == "pong":
                    ok += 1
                pending.discard(sock)
                poller.unregister(sock)
        if pending:
            error = f"{len(pending)} pings unanswered after 60 s"
    except Exception as exc:
        error = one_line(exc)
    conn.send((ok, error))
    with contextlib.suppress(EOFError, OSError):
        conn.recv()  # hold until told
    for sock in held:
        sock.close()
    ctx.term()


def _measure_idle(dsn: str, clients: int = IDLE_CLIENTS, helpers: int = IDLE_HELPERS,
                  hold: float = IDLE_HOLD) -> dict[str, Any]:
    """The server's RSS before and with ``clients`` idle DEALER clients."""
    server = DbpoolServer(dsn, 1).start()
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        # One client first: the server's own lazily built state should not count.
        client = client_class()(server.endpoint)
        try:
            client.ping()
            client.query(SQL)
        finally:
            client.close()
        time.sleep(1.0)
        before = server.rss_bytes()
        share, extra = divmod(clients, helpers)
        for i in range(helpers):
            ours, theirs = ctx.Pipe()
            count = share + (1 if i < extra else 0)
            helper = ctx.Process(target=_idle_helper, args=(server.endpoint, count, theirs),
                                 daemon=True)
            helper.start()
            theirs.close()
            pipes.append(ours)
            procs.append(helper)
        pongs = 0
        errors = []
        for pipe in pipes:
            if not pipe.poll(STARTUP_TIMEOUT):
                raise RuntimeError("an idle-client helper sent nothing")
            ok, error = pipe.recv()
            pongs += ok
            if error:
                errors.append(error)
        time.sleep(hold)
        after = server.rss_bytes()
        for pipe in pipes:
            pipe.send("close")
        for proc in procs:
            proc.join(15)
        time.sleep(1.0)
        released = server.rss_bytes()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        server.stop()
    report: dict[str, Any] = {
        "clients": clients, "pongs": pongs, "errors": errors,
        "rss_before_mb": _mb(before), "rss_with_clients_mb": _mb(after),
        "rss_after_close_mb": _mb(released),
        "growth_per_client_kb": None,
    }
    if before is not None and after is not None:
        report["growth_per_client_kb"] = round((after - before) / clients / 1024, 2)
    return report


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


# -- the benchmark ----------------------------------------------------------------------------


@dataclass
class Turn:
    """One contender's figures in one round of one scenario."""

    contender: str
    processes: int
    pool_size: int
    round: int
    statements: int  # all processes together
    seconds: float  # the processes' mean
    per_second: float  # the sum of the processes' own rates
    latency_us: float | None = None
    errors: list[str] = field(default_factory=list)
    #: CPU µs per statement: the client processes', the pooler's, PostgreSQL's.
    client_us: float | None = None
    server_us: float | None = None
    postgres_us: float | None = None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _paired_ratios(turns: list[Turn], ours: str, theirs: str,
                   key: Callable[[Turn], float | None]) -> list[float]:
    """``key(ours) / key(theirs)`` in each round where both ran, in round order."""
    by_round: dict[int, dict[str, float]] = {}
    for t in turns:
        value = key(t)
        if value is not None and not t.errors and value > 0:
            by_round.setdefault(t.round, {})[t.contender] = value
    return [r[ours] / r[theirs] for _, r in sorted(by_round.items())
            if ours in r and theirs in r]


def _paired_ratio(turns: list[Turn], ours: str, theirs: str,
                  key: Callable[[Turn], float | None]) -> float | None:
    """The median over rounds of ``key(ours) / key(theirs)``, rounds where both ran."""
    return _median(_paired_ratios(turns, ours, theirs, key))


def _progress(as_json: bool, text: str) -> None:
    if not as_json:
        print(text, file=sys.stderr, flush=True)


def _scenario(dsn: str, backend: Backend | None, bouncer_binary: str | None,
              processes: int, duration: float, rounds: int, unavailable: dict[str, str],
              as_json: bool) -> list[Turn]:
    """Run every contender at ``processes`` clients; return the turns."""
    size = pool_size_for(processes)
    turns: list[Turn] = []
    with contextlib.ExitStack() as stack:
        bouncer, server = start_poolers(stack, dsn, backend, bouncer_binary, size, unavailable)
        bouncer_dsn = bouncer.dsn if bouncer is not None else None
        endpoint = server.endpoint if server is not None else None
        # Each contender's pooler process, whose CPU its turns report (psycopg has none).
        poolers: dict[str, int] = {}
        if bouncer is not None:
            poolers["pgbouncer"] = bouncer.pid
        if server is not None:
            poolers["dbpool"] = poolers[BATCH] = server.pid
        curve = None
        if CURVE not in unavailable:
            try:
                secured = DbpoolServer(dsn, size, curve=True).start()
                stack.callback(secured.stop)
                assert secured.keys is not None
                curve = (secured.endpoint, *secured.keys)
                poolers[CURVE] = secured.pid
            except ServerError as exc:
                unavailable[CURVE] = str(exc)
        spec = WorkerSpec(dsn, bouncer_dsn, endpoint, batch=processes == 1, curve=curve)
        names = ["psycopg"]
        names += ["pgbouncer"] if bouncer_dsn else []
        names += (["dbpool"] + ([BATCH] if spec.batch else [])) if endpoint else []
        names += [CURVE] if curve else []
        _progress(as_json, f"  {processes} processes (pool of {size}): starting workers...")
        try:
            workers = _Workers(processes, spec)
            stack.callback(workers.close)
            for name, error in workers.errors.items():
                logger.warning("%s: a worker could not connect: %s", name, error)
            for round_ in range(rounds):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    turns.append(_turn(workers, name, processes, size, round_, duration,
                                       poolers.get(name)))
        except (threading.BrokenBarrierError, RuntimeError) as exc:
            # A worker died or hung: the rest of this scenario cannot be measured.
            logger.error("%s processes: the workers failed (%s); scenario abandoned",
                         processes, one_line(exc))
        for name in names:
            rates = [t.per_second for t in turns if t.contender == name and not t.errors]
            median = _median(rates)
            shown = f"{median:9.0f}" if median is not None else "   failed"
            unit = "statements/s" if name == BATCH else "q/s"
            _progress(as_json, f"  {name:>12} {processes:>3} processes: {shown} {unit} (median)")
    return turns


def _turn(workers: _Workers, name: str, processes: int, size: int, round_: int,
          duration: float, pooler: int | None) -> Turn:
    results, pooler_cpu, postgres_cpu = workers.turn(name, duration, processes == 1, pooler)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        logger.warning("%s at %s processes, round %s: %s", name, processes, round_ + 1,
                       "; ".join(errors))
    statements = sum(r.count for r in results)

    def per_statement(seconds: float | None) -> float | None:
        return None if seconds is None or not statements else round(seconds / statements * 1e6, 1)

    return Turn(name, processes, size, round_,
                statements=statements,
                seconds=statistics.mean(r.seconds for r in results),
                # Each process ran for its own measured time: add up the rates.
                per_second=sum(r.count / r.seconds for r in results if r.seconds > 0),
                latency_us=_median([r.latency_us for r in results if r.latency_us is not None]),
                errors=errors,
                client_us=per_statement(sum(r.cpu_seconds for r in results)),
                server_us=per_statement(pooler_cpu),
                # Read off PostgreSQL's processes before and after: a direct connection's
                # backend exits with its turn, and its CPU leaves the count with it.
                postgres_us=per_statement(postgres_cpu) if pooler is not None else None)


#: Rounds per scenario by default.  Why 7, not 3: on a 2-core VM one round's ratio
#: ranges over tens of percent from the next (the table prints them), so the median
#: of 3 could land either side of a target that the median of 7 judges steadily.
ROUNDS = 7


def run_remote(
    dsn: str,
    processes: Sequence[int] = DEFAULT_PROCESSES,
    duration: float = 1.0,
    rounds: int = ROUNDS,
    as_json: bool = False,
    idle_clients: int = IDLE_CLIENTS,
    tasks: int = TASKS,
    tpcb: bool = True,
    overload_seconds: float = 20.0,
) -> dict[str, Any]:
    """Run the remote benchmark, print a table (or JSON) and return the report.

    ``duration`` is seconds per contender per round (at least 1.0 is wise:
    the first instants of a turn are the noisiest).  ``tasks`` is the number of
    asyncio tasks of the many-tasks row (:mod:`dbpool.bench.many_tasks`; 0
    leaves it out); ``tpcb=False`` leaves out the TPC-B-like row
    (:mod:`dbpool.bench.tpcb`); ``overload_seconds`` is the length of the
    overload row's run through each pooler (0 leaves it out).  The report's
    ``ok`` is False if any target was missed or
    could not be measured.
    """
    began = time.monotonic()
    bouncer_binary = find_pgbouncer()
    unavailable: dict[str, str] = {}
    if bouncer_binary is None:
        unavailable["pgbouncer"] = "not installed"
    backend = Backend.resolve(dsn)
    turns: list[Turn] = []
    for n in processes:
        turns.extend(_scenario(dsn, backend, bouncer_binary, n, duration, rounds,
                               unavailable, as_json))
    many: dict[str, Any] | None = None
    if tasks > 0:
        _progress(as_json, f"  1 process, {tasks} asyncio tasks...")
        many = run_many_tasks(dsn, backend, bouncer_binary, duration, rounds, tasks,
                              unavailable)
        for name, rate in many["qps"].items():
            shown = f"{rate:9.0f}" if rate is not None else "   failed"
            _progress(as_json, f"  {name:>12} {tasks:>3} tasks: {shown} q/s (median)")
    transactions: dict[str, Any] | None = None
    if tpcb:
        _progress(as_json, "  pgbench's TPC-B-like transaction, 1 client...")
        transactions = run_tpcb(dsn, backend, bouncer_binary, duration, rounds, unavailable)
    overload: dict[str, Any] | None = None
    if overload_seconds > 0:
        _progress(as_json, f"  overload, {overload_seconds:g} s through each pooler...")
        overload = run_overload(dsn, backend, bouncer_binary, overload_seconds, unavailable)
    idle: dict[str, Any] | None = None
    if "dbpool" not in unavailable and idle_clients > 0:
        _progress(as_json, f"  dbpool serve RSS with {idle_clients} idle clients...")
        try:
            idle = _measure_idle(dsn, idle_clients)
        except Exception as exc:
            logger.warning("the idle-client measurement failed: %s", one_line(exc))
            idle = {"error": one_line(exc)}
    report = _report(turns, processes, duration, rounds, bouncer_binary, unavailable, idle,
                     many, transactions, overload)
    report["elapsed_seconds"] = round(time.monotonic() - began, 1)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return report


def _pgbouncer_version(binary: str | None) -> str | None:
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.stdout else None


def _report(turns: list[Turn], processes: Sequence[int], duration: float, rounds: int,
            bouncer_binary: str | None, unavailable: dict[str, str],
            idle: dict[str, Any] | None, many: dict[str, Any] | None,
            transactions: dict[str, Any] | None,
            overload: dict[str, Any] | None) -> dict[str, Any]:
    scenarios: list[dict[str, Any]] = []
    for n in processes:
        here = [t for t in turns if t.processes == n and t.contender in CONTENDERS]
        qps: dict[str, int | None] = {}
        for name in CONTENDERS:
            median = _median([t.per_second for t in here if t.contender == name and not t.errors])
            qps[name] = None if median is None else round(median)
        ratios = _paired_ratios(here, "dbpool", "pgbouncer", lambda t: t.per_second)
        curve_ratios = _paired_ratios(here, CURVE, "dbpool", lambda t: t.per_second)
        ratio, curve_ratio = _median(ratios), _median(curve_ratios)
        scenarios.append({"processes": n, "pool_size": pool_size_for(n), "qps": qps,
                          "dbpool/pgbouncer": None if ratio is None else round(ratio, 3),
                          "curve/plain": None if curve_ratio is None else round(curve_ratio, 3),
                          # Each round's own ratio: how far apart the rounds were.
                          "rounds": {"dbpool/pgbouncer": [round(r, 3) for r in ratios],
                                     "curve/plain": [round(r, 3) for r in curve_ratios]},
                          "cpu_us_per_query": {name: median_cpu(here, name)
                                               for name in CONTENDERS}})

    single = [t for t in turns if t.processes == 1]
    latency: dict[str, Any] = {}
    for name in CONTENDERS:
        median = _median([t.latency_us for t in single
                          if t.contender == name and t.latency_us is not None and not t.errors])
        latency[name] = None if median is None else round(median, 1)
    latency_ratio = _paired_ratio(single, "dbpool", "pgbouncer", lambda t: t.latency_us)
    latency["dbpool/pgbouncer"] = None if latency_ratio is None else round(latency_ratio, 3)

    batch_rate = _median([t.per_second for t in single if t.contender == BATCH and not t.errors])
    bouncer_rate = _median([t.per_second for t in single
                            if t.contender == "pgbouncer" and not t.errors])
    batch_ratio = _paired_ratio(single, BATCH, "pgbouncer", lambda t: t.per_second)
    batch = {
        "batch_size": BATCH_SIZE,
        "dbpool_statements_per_second": None if batch_rate is None else round(batch_rate),
        "pgbouncer_statements_per_second": None if bouncer_rate is None else round(bouncer_rate),
        "ratio": None if batch_ratio is None else round(batch_ratio, 3),
    }

    by_n = {s["processes"]: s for s in scenarios}
    by_16 = by_n.get(16)
    values: dict[str, tuple[float | None, bool]] = {
        # (value, whether the scenario it needs was run at all)
        **{f"throughput_{n}": (by_n[n]["dbpool/pgbouncer"] if n in by_n else None, n in by_n)
           for n in (4, 16, 64)},
        "curve_16": (by_16["curve/plain"] if by_16 else None, by_16 is not None),
        "latency_1": (latency["dbpool/pgbouncer"], 1 in processes),
        "batch_100": (batch["ratio"], 1 in processes),
        "asyncio_tasks": (many["dbpool/pgbouncer"] if many else None, many is not None),
        "tpcb_transaction": (transactions["transaction/pgbouncer"] if transactions else None,
                             transactions is not None),
        "tpcb_batch": (transactions["batch/pgbouncer"] if transactions else None,
                       transactions is not None),
        "overload_p99": (overload_target(overload)[0] if overload else None,
                         overload is not None),
    }
    targets = []
    for name, text, threshold in TARGETS:
        value, requested = values[name]
        if name == "overload_p99" and overload is not None:
            threshold = overload_target(overload)[1]
        if not requested:
            status = "SKIPPED"
        elif value is None:
            status = "NOT MEASURED"
        elif name in ("latency_1", "overload_p99"):
            status = "PASS" if value <= threshold else "FAIL"
        else:
            status = "PASS" if value >= threshold else "FAIL"
        targets.append({"name": name, "target": text, "threshold": threshold,
                        "value": value, "status": status})

    return {
        "workload": SQL,
        "cpus": os.cpu_count(),
        "dbpool_build": build_name(),
        "rounds": rounds,
        "duration": duration,
        "processes": list(processes),
        "pgbouncer": {"binary": bouncer_binary, "version": _pgbouncer_version(bouncer_binary)},
        "unavailable": unavailable,
        "scenarios": scenarios,
        "latency_us": latency,
        "batch": batch,
        "many_tasks": many,
        "tpcb": transactions,
        "overload": overload,
        "idle_clients": idle,
        "targets": targets,
        "ok": all(t["status"] in ("PASS", "SKIPPED") for t in targets),
        "turns": [asdict(t) | {"per_second": round(t.per_second)} for t in turns],
    }


def _print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['workload']!r} over the network, queries per second from client "
          f"processes ({report['cpus']} CPUs; median of {report['rounds']} rounds of "
          f"{report['duration']:g}s; ratio: median of per-round ratios)")
    print(f"dbpool serve: {report['dbpool_build']}\n")
    for name, why in report["unavailable"].items():
        first = why.splitlines()[0] if why else ""
        print(f"  {name}: {first}")
        if why.count("\n"):
            print("    " + "\n    ".join(why.splitlines()[1:]))
    if report["unavailable"]:
        print()
    print(f"{'processes':>9} {'pool':>4} " + " ".join(f"{n:>12}" for n in CONTENDERS)
          + f" {'dbpool/pgbouncer':>17} {'curve/plain':>12}")
    for row in report["scenarios"]:
        print(f"{row['processes']:>9} {row['pool_size']:>4} "
              + " ".join(cell(row["qps"][n], 12) for n in CONTENDERS)
              + " " + ratio(row["dbpool/pgbouncer"], 17) + " " + ratio(row["curve/plain"], 12))
    print("\neach round's own ratio, lowest to highest (a median is only as sure as their "
          "spread):")
    for row in report["scenarios"]:
        for what, ratios in row["rounds"].items():
            if ratios:
                print(f"{row['processes']:>9} {what:>17}: "
                      + " ".join(f"{r:.2f}" for r in sorted(ratios)))
    print("\nwhere a query's CPU went, µs per query (median over rounds):")
    print(f"{'processes':>9} {'contender':>12} {'client':>8} {'pooler':>8} {'postgres':>8}")
    for row in report["scenarios"]:
        for name in CONTENDERS:
            cpu = row["cpu_us_per_query"][name]
            if cpu["client"] is not None:
                print(f"{row['processes']:>9} {name:>12} " + " ".join(
                    cell(cpu[where], 8, ".1f") for where in ("client", "server", "postgres")))
    latency = report["latency_us"]
    print("\nsingle-client latency, µs per query (1 process, median):")
    for name in CONTENDERS:
        print(f"  {name:>10}: {cell(latency[name], 8, '.1f')}")
    print(f"  dbpool/pgbouncer: {ratio(latency['dbpool/pgbouncer'])}")
    batch = report["batch"]
    print(f"\nbatch of {batch['batch_size']} x {report['workload']!r}, 1 client, statements/s:")
    print(f"  dbpool client.batch: {cell(batch['dbpool_statements_per_second'], 9)}")
    print(f"  pgbouncer, 1 per round trip: {cell(batch['pgbouncer_statements_per_second'], 9)}")
    print(f"  ratio: {ratio(batch['ratio'])}")
    many = report["many_tasks"]
    if many is not None:
        print(f"\n1 process, {many['tasks']} asyncio tasks, {report['workload']!r} in a loop, "
              f"q/s (pool of {many['pool_size']} behind either):")
        print(f"  dbpool AsyncClient: {cell(many['qps']['dbpool'], 9)}")
        print(f"  pgbouncer, AsyncConnectionPool of {many['tasks']}: "
              f"{cell(many['qps']['pgbouncer'], 9)}")
        print(f"  ratio: {ratio(many['dbpool/pgbouncer'])}")
        print("  CPU µs per query (median):    client   pooler  postgres")
        for name, cpu in many["cpu_us_per_query"].items():
            print(f"    {name:>24}: " + " ".join(
                cell(cpu[where], 8, ".1f") for where in ("client", "server", "postgres")))
    if report["tpcb"] is not None:
        print_tpcb(report["tpcb"])
    if report["overload"] is not None:
        print_overload(report["overload"])
    idle = report["idle_clients"]
    if idle is not None:
        print(f"\ndbpool serve RSS with {IDLE_CLIENTS} idle DEALER clients (one ping each):")
        if "error" in idle:
            print(f"  failed: {idle['error']}")
        else:
            print(f"  before: {cell(idle['rss_before_mb'], 7, '.1f')} MB")
            print(f"  with {idle['clients']} clients ({idle['pongs']} pongs): "
                  f"{cell(idle['rss_with_clients_mb'], 7, '.1f')} MB")
            print(f"  after they closed: {cell(idle['rss_after_close_mb'], 7, '.1f')} MB")
            print(f"  growth per client: {cell(idle['growth_per_client_kb'], 7, '.2f')} KB")
            for error in idle["errors"]:
                print(f"  error: {error}")
    print("\ntargets:")
    for target in report["targets"]:
        value = target["value"]
        shown = (cell(value, 0) + " ms" if target["name"] == "overload_p99"
                 else ratio(value, 0))
        print(f"  {target['status']:<12} {target['target']}: {shown}")
    print(f"\n{'all targets met' if report['ok'] else 'some targets missed'} "
          f"({report['elapsed_seconds']:.0f} s)")
