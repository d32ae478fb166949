"""The servers the remote benchmarks run against, each started for the run on
free loopback ports: PgBouncer (transaction mode) and ``dbpool serve``."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from dbpool.client import Client

__all__ = ["SERVER_TIMEOUT", "Backend", "CpuTurn", "DbpoolServer", "PgBouncer", "ServerError",
           "client_class", "cpu_seconds", "find_pgbouncer", "one_line", "postgres_cpu_seconds",
           "rss_of", "start_poolers"]

logger = logging.getLogger("dbpool.bench.servers")

#: Seconds to wait for a server (dbpool serve, PgBouncer) to answer.
SERVER_TIMEOUT = 30.0
#: What a starting server is asked, to know it answers.
_PROBE = "SELECT 1"


def find_pgbouncer() -> str | None:
    """The PgBouncer binary: on ``$PATH``, else ``/usr/sbin/pgbouncer``, else None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    fallback = "/usr/sbin/pgbouncer"
    return fallback if os.access(fallback, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class ServerError(RuntimeError):
    """A contender's server did not start."""


@dataclass(frozen=True)
class Backend:
    """Where PostgreSQL is, as libpq resolved the benchmark's DSN."""

    host: str
    port: int
    user: str
    dbname: str
    password: str | None

    @classmethod
    def resolve(cls, dsn: str) -> Backend:
        with psycopg.connect(dsn, autocommit=True) as conn:
            info = conn.info
            return cls(info.host, info.port, info.user, info.dbname, info.password or None)


class PgBouncer:
    """A PgBouncer of our own, in transaction mode, in a temporary directory.

    As root it runs as the ``postgres`` user (PgBouncer refuses root), in a
    directory that user owns.
    """

    def __init__(self, binary: str, backend: Backend, pool_size: int) -> None:
        self.binary = binary
        self.backend = backend
        self.pool_size = pool_size
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dbpool-bench-pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return make_conninfo("", host="127.0.0.1", port=self.port, dbname="bench",
                             user=self.backend.user)

    def _config(self) -> str:
        target: dict[str, Any] = {"host": self.backend.host, "port": self.backend.port,
                                  "user": self.backend.user, "dbname": self.backend.dbname}
        if self.backend.password:
            target["password"] = self.backend.password
        return "\n".join([
            "[databases]",
            f"bench = {make_conninfo('', **target)}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "auth_type = any",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            "max_client_conn = 2000",
            "unix_socket_dir =",
            "ignore_startup_parameters = extra_float_digits",
            f"logfile = {self.dir / 'pgbouncer.log'}",
            f"pidfile = {self.dir / 'pgbouncer.pid'}",
            "",
        ])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> PgBouncer:
        """Start it and wait until it answers; ServerError (and cleaned up) if it does not."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(self._config())
        ini.chmod(0o600)
        user: int | None = None
        group: int | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            user, group = entry.pw_uid, entry.pw_gid
            for path in (self.dir, ini):
                os.chown(path, user, group)
        with open(self.dir / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                [self.binary, str(ini)], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                user=user, group=group, start_new_session=True)
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"pgbouncer exited with status {self.proc.returncode}:\n"
                                  f"{_tail(self.dir / 'stderr.log')}")
            try:
                with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None,
                                     connect_timeout=2) as conn:
                    conn.execute(_PROBE).fetchall()
                break
            except psycopg.Error as exc:
                if time.monotonic() > deadline:
                    raise ServerError(f"pgbouncer did not answer within {SERVER_TIMEOUT:g}s: "
                                      f"{exc}") from None
                time.sleep(0.1)
        logger.info("pgbouncer pid %s on port %s, pool of %s", self.proc.pid, self.port,
                    self.pool_size)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # safe shutdown: no query is running now
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def client_class() -> type[Client]:
    """:class:`dbpool.client.Client`, or ServerError if the client library is broken."""
    try:
        from dbpool.client import Client
    except ImportError as exc:
        raise ServerError(f"dbpool.client.Client is not available: {exc}") from None
    return Client


class DbpoolServer:
    """``python -m dbpool serve`` as a subprocess, on free local ports."""

    def __init__(self, dsn: str, pool_size: int, curve: bool = False) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.endpoint = f"tcp://127.0.0.1:{_free_port()}"
        self.events = f"tcp://127.0.0.1:{_free_port()}"
        self.dir = Path(tempfile.mkdtemp(prefix="dbpool-bench-serve-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False
        #: With CURVE: the server's public key file and a client's secret key file.
        self.keys: tuple[str, str] | None = None
        self._curve_args: list[str] = []
        if curve:
            from dbpool.keys import write_key_pair

            server_public, server_secret = write_key_pair("server", self.dir / "server")
            client_public, client_secret = write_key_pair("bench", self.dir / "authorized")
            self.keys = (str(server_public), str(client_secret))
            self._curve_args = ["--curve-secret-key", str(server_secret),
                                "--authorized-keys", str(client_public.parent)]

    def client(self, timeout: float) -> Client:
        """A client of this server (with its keys, if it uses CURVE)."""
        server_key, client_key = self.keys if self.keys is not None else (None, None)
        return client_class()(self.endpoint, timeout=timeout, server_key=server_key,
                               client_key=client_key)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> DbpoolServer:
        """Start it and wait for a ping; ServerError (and cleaned up) if it does not answer."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def _start(self) -> None:
        argv = [sys.executable, "-m", "dbpool", "serve", "--dsn", self.dsn,
                "--bind", self.endpoint, "--events-bind", self.events,
                "--pool-size", str(self.pool_size), *self._curve_args]
        with open(self.dir / "serve.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        deadline = time.monotonic() + SERVER_TIMEOUT
        client = self.client(1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(f"dbpool serve exited with status "
                                      f"{self.proc.returncode}:\n{_tail(self.dir / 'serve.log')}")
                try:
                    client.ping(timeout=1.0)
                    break
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise ServerError(f"dbpool serve did not answer a ping within "
                                          f"{SERVER_TIMEOUT:g}s: {exc!r}") from None
                    # A timed-out request may leave the client unusable: start afresh.
                    client.close()
                    client = self.client(1.0)
                    time.sleep(0.1)
        finally:
            client.close()
        logger.info("dbpool serve pid %s on %s, pool of %s", self.proc.pid, self.endpoint,
                    self.pool_size)

    def rss_bytes(self) -> int | None:
        return rss_of(self.pid)

    def log_tail(self) -> str:
        return _tail(self.dir / "serve.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                logger.warning("dbpool serve did not stop within 30 s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        if self.started and self.proc is not None and \
                self.proc.returncode not in (0, -signal.SIGTERM):
            logger.warning("dbpool serve exited with status %s:\n%s", self.proc.returncode,
                           self.log_tail())
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def one_line(exc: BaseException) -> str:
    """An error in one line, its class first: for a benchmark's report."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user and system) process ``pid`` has used, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU seconds used by every PostgreSQL process of this machine (backends and
    helpers, whichever cluster): the server side of a quiet machine's queries."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as comm:
                if comm.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        used = cpu_seconds(int(entry))
        total += used or 0.0
    return total


def start_poolers(stack: ExitStack, dsn: str, backend: Backend | None,
                  bouncer_binary: str | None, size: int,
                  unavailable: dict[str, str]) -> tuple[PgBouncer | None, DbpoolServer | None]:
    """A PgBouncer and a ``dbpool serve``, each with a pool of ``size``, stopped when
    ``stack`` closes.  One that cannot start is None, with its reason in
    ``unavailable`` (under ``"pgbouncer"`` or ``"dbpool"``); a dbpool already
    found unavailable is not tried again."""
    bouncer = server = None
    if bouncer_binary is not None and backend is not None:
        try:
            bouncer = PgBouncer(bouncer_binary, backend, size).start()
            stack.callback(bouncer.stop)
        except ServerError as exc:
            unavailable.setdefault("pgbouncer", str(exc))
    if "dbpool" not in unavailable:
        try:
            server = DbpoolServer(dsn, size).start()
            stack.callback(server.stop)
        except ServerError as exc:
            unavailable["dbpool"] = str(exc)
    return bouncer, server


class RoundTurn(Protocol):
    """What :func:`median_ratio` reads of a contender's turn."""

    @property
    def contender(self) -> str: ...

    @property
    def round(self) -> int: ...

    @property
    def errors(self) -> list[str]: ...

    @property
    def per_second(self) -> float: ...


def median_ratio(turns: Iterable[RoundTurn], numerator: str, denominator: str) -> float | None:
    """``numerator``'s rate over ``denominator``'s: the median of the per-round ratios, over
    the rounds where both ran without error (to 3 places), or None if no round did.

    Ratios of turns paired within a round, not of the overall medians: a
    virtual machine's speed swings within seconds, and the pairing cancels most
    of that.
    """
    by_round: dict[int, dict[str, float]] = {}
    for turn in turns:
        if not turn.errors and turn.per_second > 0:
            by_round.setdefault(turn.round, {})[turn.contender] = turn.per_second
    ratios = [rates[numerator] / rates[denominator] for rates in by_round.values()
              if numerator in rates and denominator in rates]
    return round(statistics.median(ratios), 3) if ratios else None


@dataclass
class PairedTurn:
    """One contender's turn in a benchmark whose contenders take turns, round after
    round: what it got ``done`` (queries, transactions) in ``seconds``, its errors,
    and where the CPU went."""

    contender: str
    round: int
    done: int
    seconds: float
    errors: list[str] = field(default_factory=list)
    #: CPU microseconds per unit done: this process, the pooler's, PostgreSQL's.
    client_us: float | None = None
    server_us: float | None = None
    postgres_us: float | None = None

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def charge(self, before: CpuReading, after: CpuReading) -> None:
        """Set the CPU per unit done from readings of :func:`cpu_now` around the turn."""
        if self.done:
            self.client_us, self.server_us, self.postgres_us = (
                None if a is None or b is None else round((b - a) / self.done * 1e6, 1)
                for a, b in zip(before, after, strict=True))


#: CPU seconds used so far: this process, a pooler's process, PostgreSQL's.
CpuReading = tuple[float, float | None, float]


def cpu_now(pid: int) -> CpuReading:
    """The CPU seconds used so far by this process, process ``pid`` and PostgreSQL."""
    return time.process_time(), cpu_seconds(pid), postgres_cpu_seconds()


class CpuTurn(Protocol):
    """What :func:`median_cpu` reads of a turn: whose it was, its errors, and its CPU
    µs per unit done (None where it could not be read)."""

    @property
    def contender(self) -> str: ...

    @property
    def errors(self) -> list[str]: ...

    @property
    def client_us(self) -> float | None: ...

    @property
    def server_us(self) -> float | None: ...

    @property
    def postgres_us(self) -> float | None: ...


def median_cpu(turns: Iterable[CpuTurn], contender: str) -> dict[str, float | None]:
    """``contender``'s median CPU µs per unit done, over its turns without errors, by
    where it went (``client``, ``server``, ``postgres``)."""
    mine = [t for t in turns if t.contender == contender and not t.errors]
    cpu: dict[str, float | None] = {}
    for where in ("client", "server", "postgres"):
        values = [v for t in mine if (v := getattr(t, f"{where}_us")) is not None]
        cpu[where] = round(statistics.median(values), 1) if values else None
    return cpu
