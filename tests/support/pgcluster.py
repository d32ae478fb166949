"""Private, throwaway PostgreSQL clusters for tests.

A :class:`PgCluster` is a real postmaster listening on ``127.0.0.1`` on a port of
its own, with its data directory, unix socket and log file in a private temp dir.
Tests can stop it, crash it (:meth:`PgCluster.kill`), restart it on the same port
and inspect its log, without touching any shared server.

``initdb`` is slow (~0.7 s), so it runs once per process into a :class:`PgTemplate`;
every cluster starts from a ``cp -a`` copy of that template (~0.1 s) and is ready
in a fraction of a second.

When the tests run as root the server commands run as the ``postgres`` OS user,
because ``initdb`` and ``postgres`` refuse to run as root.

Clusters trust every login, unless made with ``PgCluster(password=...)``: then a
TCP login needs that password (``scram-sha-256`` in ``pg_hba.conf``), and
:meth:`PgCluster.conninfo` carries it.  The unix socket stays ``trust`` for the
harness's own probes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import glob
import importlib.util
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

log = logging.getLogger(__name__)

#: OS account that owns the server processes when the tests run as root.
PG_OS_USER = "postgres"
#: Database superuser created by initdb (independent of the OS user).
PG_SUPERUSER = "postgres"
#: Environment variable that overrides binary discovery.
BINDIR_ENV = "DBPOOL_PG_BINDIR"
#: Environment variable that overrides where cluster/template dirs are created.
TMPDIR_ENV = "DBPOOL_PG_TMPDIR"
#: The password of the ``pg_password_cluster`` fixture's cluster.  Letters, digits
#: and dashes only, so that it reads the same in a conninfo string, a URI or a
#: log line, and a leak cannot hide behind quoting or escaping.
PG_TEST_PASSWORD = "dbpool-harness-pw-5b7e1c"

StopMode = Literal["smart", "fast", "immediate"]
SettingValue = str | int | float | bool
#: Type of the ``pg_cluster_factory`` fixture: ``make(**settings) -> PgCluster`` (started).
ClusterFactory = Callable[..., "PgCluster"]

_SYSTEM_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_CLUSTER_CONF = "dbpool_cluster.conf"

# Settings shared by every cluster (written once into the template).
_BASE_SETTINGS: dict[str, SettingValue] = {
    "listen_addresses": "127.0.0.1",
    # Durability is irrelevant for throwaway clusters; these make start/stop fast.
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "shared_buffers": "16MB",
    "max_connections": 100,
    "autovacuum": False,
    # Data dirs usually live in tmpfs (RAM): keep WAL from growing towards 1 GB.
    "max_wal_size": "32MB",
    "min_wal_size": "2MB",
    # mmap keeps dynamic shared memory inside the data dir, so a SIGKILLed
    # cluster leaves nothing behind in /dev/shm.
    "dynamic_shared_memory_type": "mmap",
    # pg_ctl -l sends stderr to a file the tests read (see count_connection_attempts).
    "logging_collector": False,
    "log_destination": "stderr",
    "log_connections": True,
    "log_disconnections": True,
    "log_line_prefix": "%m [%p] ",
    "lc_messages": "C",
}

# pg_hba.conf of a password cluster: the unix socket is for the harness (trust),
# TCP is for the code under test (a password, checked with SCRAM).
_PASSWORD_HBA = """\
# dbpool test harness: password cluster
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""

_CONNECTION_RECEIVED = re.compile(r"connection received: host=(\S+)")
_FAILURE_LINE = re.compile(r"\b(FATAL|PANIC):")
_PORT_IN_USE = re.compile(r"could not (bind|create any TCP/IP sockets)|Address already in use")


class PgClusterError(RuntimeError):
    """A throwaway cluster could not be created, started or stopped."""


class PgBinariesNotFound(PgClusterError):
    """No usable PostgreSQL server binaries (initdb, pg_ctl, postgres) were found."""


# --------------------------------------------------------------------------- binaries


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin; sort "9.6" < "10" < "15" numerically.
    parts = re.findall(r"\d+", bindir.parent.name)
    return tuple(int(p) for p in parts) or (-1,)


def _pgserver_bindir() -> Path | None:
    # Locate the package without importing it: pgserver's __init__ pulls in its
    # own server-management API, which we deliberately do not use.
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if _has_binaries(candidate):
            return candidate
    return None


def find_pg_bindir() -> Path:
    """Return a directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: ``$DBPOOL_PG_BINDIR``; the newest ``/usr/lib/postgresql/*/bin``; the
    ``pginstall/bin`` directory shipped by the ``pgserver`` package.

    Raises:
        PgBinariesNotFound: if none of them has the required binaries.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        path = Path(override)
        if not _has_binaries(path):
            raise PgBinariesNotFound(
                f"${BINDIR_ENV}={override} does not contain {', '.join(_REQUIRED_BINARIES)}"
            )
        return path
    system = sorted(
        (Path(p) for p in glob.glob(_SYSTEM_BINDIR_GLOB) if _has_binaries(Path(p))),
        key=_version_key,
        reverse=True,
    )
    if system:
        return system[0]
    bundled = _pgserver_bindir()
    if bundled is not None:
        return bundled
    raise PgBinariesNotFound(
        "No PostgreSQL server binaries found: looked in "
        f"${BINDIR_ENV}, {_SYSTEM_BINDIR_GLOB} and the pgserver package "
        "(pip install pgserver, or apt-get install postgresql)."
    )


# ------------------------------------------------------------------- process helpers


@dataclass(frozen=True)
class _Identity:
    """Who runs the server commands: None means "the current user"."""

    uid: int | None = None
    gid: int | None = None


def _server_identity() -> _Identity:
    if os.geteuid() != 0:
        return _Identity()
    try:
        pw = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise PgClusterError(
            f"Running as root, but there is no {PG_OS_USER!r} OS user to run "
            "PostgreSQL as (initdb/postgres refuse to run as root)."
        ) from None
    return _Identity(uid=pw.pw_uid, gid=pw.pw_gid)


def _child_env() -> dict[str, str]:
    # Drop PG* variables (PGDATA, PGPORT, PGHOST, ...) so the caller's
    # environment cannot redirect our initdb/pg_ctl; force C messages so the
    # log lines we parse are in English.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path,
    timeout: float,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a server command as the server identity; raise PgClusterError on failure."""
    ident = _server_identity()
    argv = [os.fspath(c) for c in cmd]
    log.debug("run: %s", " ".join(argv))
    try:
        # As root, drop to the server identity (and root's supplementary groups).
        as_user: dict[str, Any] = (
            {"user": ident.uid, "group": ident.gid, "extra_groups": []}
            if ident.uid is not None
            else {}
        )
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **as_user,
        )
    except subprocess.TimeoutExpired as exc:
        raise PgClusterError(f"{argv[0]} timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise PgClusterError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def default_parent_dir() -> str:
    """Where cluster and template dirs go: ``$DBPOOL_PG_TMPDIR``, else
    ``/dev/shm`` if it is a world-writable tmpfs-style dir, else the temp dir.

    /dev/shm matters for speed: copying the ~30 MB template to a disk-backed
    /tmp costs ~0.1-1 s once dirty-page writeback throttling kicks in, versus
    ~0.03 s in RAM. It must be traversable by the ``postgres`` OS user.
    """
    override = os.environ.get(TMPDIR_ENV)
    if override:
        return override
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if shm.is_dir() and shm.stat().st_mode & 0o1777 == 0o1777 and os.access(shm, os.W_OK):
            return os.fspath(shm)
    return tempfile.gettempdir()


def _make_private_dir(prefix: str, parent: str | None) -> Path:
    """Create a 0700 temp dir owned by the server identity."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent or default_parent_dir()))
    _own(path)
    return path


def _own(path: Path, mode: int = 0o700) -> None:
    ident = _server_identity()
    if ident.uid is not None and ident.gid is not None:
        os.chown(path, ident.uid, ident.gid)
    os.chmod(path, mode)


def _write_owned(path: Path, text: str, *, append: bool = False) -> None:
    with open(path, "a" if append else "w", encoding="utf-8") as fh:
        fh.write(text)
    if not append:
        _own(path, 0o600)


def _format_setting(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _render_settings(settings: Mapping[str, SettingValue]) -> str:
    return "".join(f"{k} = {_format_setting(v)}\n" for k, v in settings.items())


def _proc_state(pid: int) -> str | None:
    """Linux process state letter (R, S, T, Z, ...), or None if gone/unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    # comm may contain spaces/parens: the state follows the *last* ')'.
    return stat[stat.rindex(")") + 2]


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    Zombies matter: pg_ctl daemonises the postmaster, so after SIGKILL it is
    reaped by init, which may be slow or absent in containers.
    """
    if Path("/proc/self/stat").exists():
        state = _proc_state(pid)
        return state is not None and state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children_map() -> dict[int, list[int]]:
    """Map ppid -> [pid] for all processes (via /proc, falling back to ps)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if (proc / "self" / "stat").exists():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited while we were scanning
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        return children
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        pid_s, ppid_s = line.split()
        children.setdefault(int(ppid_s), []).append(int(pid_s))
    return children


def _descendants(pid: int) -> list[int]:
    tree = _children_map()
    found: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(tree.get(child, []))
    return found


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate()`` with a short backoff until true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PgClusterError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _remove_sysv_shm(shmid: int) -> None:
    """Best effort: drop the postmaster's SysV segment after a SIGKILL.

    A normal restart on the same port cleans it up itself, but a cluster that
    is killed and then deleted would otherwise leak one segment per kill.
    """
    if shmid < 0 or not sys.platform.startswith("linux"):
        return
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    ipc_rmid = 0  # Linux value of IPC_RMID
    if libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(ipc_rmid), None) != 0:
        log.debug("shmctl(IPC_RMID, %d) failed: errno %d", shmid, ctypes.get_errno())


def _pick_port(host: str) -> int:
    """A currently free TCP port, preferably below the ephemeral range.

    Clusters are restarted on the same port; picking it outside the kernel's
    ephemeral range stops outgoing client sockets from grabbing it while the
    server is down.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low > 12000:
        for _ in range(50):
            candidate = random.randint(10000, low - 1)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, candidate))
                except OSError:
                    continue
                return candidate
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- template


class PgTemplate:
    """An ``initdb``-ed data directory that clusters are copied from.

    Create one per test session (see :func:`shared_template`); ``initdb`` is
    the slow part of setting up a cluster, copying is cheap.
    """

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data_dir = root / "data"

    @classmethod
    def create(cls, bindir: Path | None = None, *, parent_dir: str | None = None) -> PgTemplate:
        """Run ``initdb`` (as the server identity) into a new temp dir."""
        bindir = bindir or find_pg_bindir()
        started = time.monotonic()
        root = _make_private_dir("dbpool-pgtemplate-", parent_dir)
        template = cls(bindir, root)
        try:
            _run(
                [
                    bindir / "initdb",
                    "-D",
                    template.data_dir,
                    "-U",
                    PG_SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",  # throwaway data: skip the fsync pass
                    "--wal-segsize=1",  # 1 MB WAL segments: a much smaller dir to copy
                ],
                cwd=root,
                timeout=120,
            )
            conf = (
                "\n# --- dbpool test harness ---\n"
                + _render_settings(_BASE_SETTINGS)
                # Per-cluster port/socket dir/extra settings; last one wins.
                + f"include_if_exists = '{_CLUSTER_CONF}'\n"
            )
            _write_owned(template.data_dir / "postgresql.conf", conf, append=True)
        except BaseException:
            template.cleanup()
            raise
        log.info(
            "initdb template %s (%s) in %.2fs",
            template.data_dir,
            bindir,
            time.monotonic() - started,
        )
        return template

    def copy_to(self, dest: Path) -> None:
        """Copy the template data dir to ``dest`` (which must not exist), keeping owners."""
        if shutil.which("cp"):
            # cp -a keeps ownership when run as root, and is faster than copytree.
            proc = subprocess.run(
                ["cp", "-a", "--", os.fspath(self.data_dir), os.fspath(dest)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise PgClusterError(f"copying template to {dest} failed: {proc.stderr.strip()}")
            return
        shutil.copytree(self.data_dir, dest, symlinks=True)
        ident = _server_identity()
        if ident.uid is not None and ident.gid is not None:
            for dirpath, dirnames, filenames in os.walk(dest):
                for name in [*dirnames, *filenames]:
                    os.lchown(os.path.join(dirpath, name), ident.uid, ident.gid)
            os.chown(dest, ident.uid, ident.gid)

    def cleanup(self) -> None:
        """Delete the template directory."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __repr__(self) -> str:
        return f"PgTemplate({self.data_dir}, bindir={self.bindir})"


_templates: dict[Path, PgTemplate] = {}
_templates_lock = threading.Lock()
# Strong references: a cluster nobody cleaned up must still be stopped at exit.
_live_clusters: set[PgCluster] = set()


def shared_template(bindir: Path | None = None) -> PgTemplate:
    """The process-wide template for ``bindir``, created on first use.

    It is deleted at interpreter exit (or earlier by :func:`cleanup_shared_templates`).
    """
    bindir = bindir or find_pg_bindir()
    with _templates_lock:
        template = _templates.get(bindir)
        if template is None or not template.data_dir.is_dir():
            template = _templates[bindir] = PgTemplate.create(bindir)
        return template


def cleanup_shared_templates() -> None:
    """Delete every template made by :func:`shared_template`."""
    with _templates_lock:
        for template in _templates.values():
            template.cleanup()
        _templates.clear()


@atexit.register
def _cleanup_at_exit() -> None:
    # Safety net for crashed/interrupted test runs: never leave postmasters behind.
    for cluster in list(_live_clusters):
        with contextlib.suppress(Exception):
            cluster.cleanup()
    cleanup_shared_templates()


# ---------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class _PidFile:
    pid: int
    status: str  # "starting", "ready", "stopping", "standby" or "" if not yet written
    shmid: int


class PgCluster:
    """A private PostgreSQL server on ``127.0.0.1:<port>`` in its own temp dir.

    Construction copies the template data dir and picks a port; call
    :meth:`start` (or use it as a context manager) to run it, and
    :meth:`cleanup` to stop it and delete everything.

    Connect as :attr:`user` with ``psycopg.connect(cluster.conninfo())``.  By
    default the cluster trusts every login; with ``password`` TCP logins must
    authenticate with it (see :meth:`__init__`).
    """

    host: str = "127.0.0.1"
    user: str = PG_SUPERUSER

    def __init__(
        self,
        *,
        template: PgTemplate | None = None,
        bindir: Path | None = None,
        settings: Mapping[str, SettingValue] | None = None,
        parent_dir: str | None = None,
        password: str | None = None,
    ) -> None:
        """Prepare (but do not start) a cluster.

        Args:
            template: data dir to copy; default: :func:`shared_template` for ``bindir``.
            bindir: server binaries; default: the template's, else :func:`find_pg_bindir`.
            settings: extra ``postgresql.conf`` settings (e.g. ``{"max_connections": 20}``).
            parent_dir: where to create the temp dir (default:
                :func:`default_parent_dir`); it must be traversable by the
                ``postgres`` OS user when running as root (pytest's
                ``tmp_path`` is not: it lives under a 0700 root-owned dir).
            password: require password authentication over TCP: ``pg_hba.conf``
                asks for ``scram-sha-256``, and the first :meth:`start` gives
                :attr:`user` this password.  :meth:`conninfo` then includes it
                (``conninfo(password="wrong")`` to try another).  Logins over
                the unix socket stay ``trust``.
        """
        if password == "":
            raise ValueError("password must be None (trust) or a non-empty string")
        if template is None:
            template = shared_template(bindir)
        self.bindir: Path = bindir or template.bindir
        self._settings: dict[str, SettingValue] = dict(settings or {})
        #: The password TCP logins need, or None if the cluster trusts them.
        self.password: str | None = password
        if password is not None:
            self._settings.setdefault("password_encryption", "scram-sha-256")
        self._cleaned = False
        self._ever_started = False
        self.base_dir: Path = _make_private_dir("dbpool-pg-", parent_dir)
        try:
            self.data_dir: Path = self.base_dir / "data"
            self.socket_dir: Path = self.base_dir / "sock"
            self.log_path: Path = self.base_dir / "postgres.log"
            template.copy_to(self.data_dir)
            if password is not None:
                _write_owned(self.data_dir / "pg_hba.conf", _PASSWORD_HBA)
            self.socket_dir.mkdir()
            _own(self.socket_dir)
            self._port = _pick_port(self.host)
            self._write_cluster_conf()
        except BaseException:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            raise
        _live_clusters.add(self)

    # -- properties ----------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port on :attr:`host`; stable across stop/start/kill/restart."""
        return self._port

    @property
    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, or None."""
        info = self._read_pidfile()
        if info is None or not _pid_alive(info.pid):
            return None
        return info.pid

    def conninfo(self, dbname: str = "postgres", **extra: str | int) -> str:
        """libpq ``key=value`` connection string for this cluster over TCP.

        It includes :attr:`password` if the cluster has one.  Extra keyword
        arguments become libpq parameters and win over those
        (e.g. ``connect_timeout=2, application_name="t"``, ``password="wrong"``).
        """
        params: dict[str, str | int] = {
            "host": self.host,
            "port": self._port,
            "user": self.user,
            "dbname": dbname,
        }
        if self.password is not None:
            params["password"] = self.password
        params.update(extra)
        return make_conninfo("", **params)

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections.

        No-op if it is already running. On the very first start a port
        conflict (someone grabbed the port since we picked it) is retried on a
        new port; later starts keep the port so clients can reconnect.
        """
        self._check_not_cleaned()
        if self.is_running():
            return
        attempts = 1 if self._ever_started else 5
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            log_offset = self._log_size()
            # -W: don't let pg_ctl wait; it polls only every 100 ms. We poll faster.
            self._pg_ctl("start", "-W", "-s", "-l", os.fspath(self.log_path))
            try:
                self._wait_ready(timeout, log_offset=log_offset)
            except PgClusterError:
                new_log = self._log_since(log_offset)
                if attempt < attempts and _PORT_IN_USE.search(new_log):
                    log.warning("port %d taken, retrying on another port", self._port)
                    self._port = _pick_port(self.host)
                    self._write_cluster_conf()
                    continue
                raise
            first_start, self._ever_started = not self._ever_started, True
            if first_start and self.password is not None:
                self._set_password(self.password)
            log.debug(
                "cluster %s started on port %d in %.3fs",
                self.base_dir,
                self._port,
                time.monotonic() - started,
            )
            return

    def stop(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Shut the server down with ``pg_ctl stop -m mode`` and wait for the postmaster to exit.

        No-op if it is not running.
        """
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"invalid stop mode {mode!r}")
        pid = self.postmaster_pid
        if pid is None:
            self._remove_stale_lockfiles()
            return
        proc = self._pg_ctl("stop", "-W", "-s", "-m", mode, check=False)
        if proc.returncode != 0 and _pid_alive(pid):
            raise PgClusterError(f"pg_ctl stop failed: {proc.stderr.strip()}")
        _wait_until(lambda: not _pid_alive(pid), timeout, f"postmaster {pid} to exit")
        self._remove_stale_lockfiles()
        log.debug("cluster %s stopped (%s)", self.base_dir, mode)

    def kill(self, timeout: float = 10.0) -> None:
        """Crash the server: SIGKILL the postmaster and all its children.

        Clients see their connections die (EOF/reset) rather than a polite
        shutdown message. Stale lock files are removed afterwards so
        :meth:`start` works again (the next start does crash recovery).
        """
        info = self._read_pidfile()
        if info is None or not _pid_alive(info.pid):
            self._remove_stale_lockfiles()
            return
        pid = info.pid
        # Freeze the postmaster first so it cannot fork new backends while we
        # collect its children (once it dies they are re-parented and lost).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        with contextlib.suppress(PgClusterError):
            _wait_until(lambda: _proc_state(pid) in ("T", "t", "Z", None), 1.0, "SIGSTOP")
        victims = _descendants(pid)
        for victim in [*victims, pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        _wait_until(
            lambda: not any(_pid_alive(p) for p in [pid, *victims]),
            timeout,
            f"postmaster {pid} and {len(victims)} children to die",
        )
        self._remove_stale_lockfiles()
        _remove_sysv_shm(info.shmid)
        log.debug(
            "cluster %s killed (postmaster %d + %d children)", self.base_dir, pid, len(victims)
        )

    def restart(self, mode: StopMode = "fast", timeout: float = 30.0) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop(mode, timeout)
        self.start(timeout)

    def is_running(self) -> bool:
        """True if a live postmaster owns this data directory."""
        return self.postmaster_pid is not None

    def is_ready(self) -> bool:
        """True if the server is running and answers ``SELECT 1``."""
        info = self._read_pidfile()
        if info is None or info.status != "ready" or not _pid_alive(info.pid):
            return False
        return self._probe()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll until the server accepts connections, or raise PgClusterError after ``timeout``."""
        self._wait_ready(timeout, log_offset=None)

    def cleanup(self) -> None:
        """Stop the server (immediately, or by SIGKILL) and delete the temp dir. Idempotent."""
        if self._cleaned:
            return
        try:
            if self.is_running():
                try:
                    # Immediate: no checkpoint, the data is about to be deleted anyway.
                    self.stop("immediate", timeout=10)
                except PgClusterError:
                    log.warning("immediate stop failed for %s, killing", self.base_dir)
                    self.kill()
        finally:
            self._cleaned = True
            shutil.rmtree(self.base_dir, ignore_errors=True)
            _live_clusters.discard(self)

    # -- logs ----------------------------------------------------------------

    def log_text(self) -> str:
        """The whole server log so far (all starts of this cluster)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def count_connection_attempts(self, *, include_local: bool = False) -> int:
        """Number of ``connection received`` lines in the log.

        Every TCP connection that reached the postmaster counts, whether or not
        it then authenticated. Unix-socket connections (``host=[local]``) are
        excluded by default: the harness's own readiness probes use the socket
        precisely so they don't show up here.
        """
        count = 0
        for match in _CONNECTION_RECEIVED.finditer(self.log_text()):
            if include_local or match.group(1) != "[local]":
                count += 1
        return count

    # -- context manager ------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "cleaned" if self._cleaned else ("running" if self.is_running() else "stopped")
        return f"PgCluster({self.host}:{self._port}, {self.base_dir}, {state})"

    # -- internals -------------------------------------------------------------

    def _check_not_cleaned(self) -> None:
        if self._cleaned:
            raise PgClusterError(f"cluster {self.base_dir} has been cleaned up")

    def standby(self, **settings: SettingValue) -> PgCluster:
        """A new cluster (not started) that streams from this running one: a
        ``pg_basebackup -R`` of it on a port of its own, with ``settings``."""
        standby = PgCluster(bindir=self.bindir, settings=settings)
        try:
            shutil.rmtree(standby.data_dir)
            _run([self.bindir / "pg_basebackup", "-h", self.host, "-p", str(self.port),
                  "-U", self.user, "-D", standby.data_dir, "-R", "-X", "stream",
                  "--checkpoint=fast"], cwd=standby.base_dir, timeout=120)
            standby._write_cluster_conf()  # its own port and socket, not the copied ones
        except BaseException:
            standby.cleanup()
            raise
        return standby

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(
            [self.bindir / "pg_ctl", args[0], "-D", self.data_dir, *args[1:]],
            cwd=self.base_dir,
            timeout=60,
            check=check,
        )

    def _write_cluster_conf(self) -> None:
        settings: dict[str, SettingValue] = {
            "port": self._port,
            # Socket inside our private dir: no clash with the system server's
            # /var/run/postgresql, and short enough for the 107-byte limit.
            "unix_socket_directories": os.fspath(self.socket_dir),
            **self._settings,
        }
        _write_owned(self.data_dir / _CLUSTER_CONF, _render_settings(settings))

    def _read_pidfile(self) -> _PidFile | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        # The postmaster writes this file in stages; parse whatever is there.
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None
        shmid = -1
        if len(lines) > 6:
            with contextlib.suppress(ValueError, IndexError):
                shmid = int(lines[6].split()[1])
        status = lines[7].strip() if len(lines) > 7 else ""
        return _PidFile(pid=pid, status=status, shmid=shmid)

    def _remove_stale_lockfiles(self) -> None:
        # Only safe when no postmaster is alive; callers guarantee that. A stale
        # postmaster.pid whose PID is now a zombie (or reused) would block start.
        for path in (
            self.data_dir / "postmaster.pid",
            self.socket_dir / f".s.PGSQL.{self._port}.lock",
            self.socket_dir / f".s.PGSQL.{self._port}",
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _socket_connect(self, application_name: str) -> psycopg.Connection[Any]:
        """A trusted superuser connection over the unix socket (never a TCP login)."""
        return psycopg.connect(
            host=os.fspath(self.socket_dir),
            port=self._port,
            user=self.user,
            dbname="postgres",
            connect_timeout=2,
            application_name=application_name,
            autocommit=True,
        )

    def _set_password(self, password: str) -> None:
        try:
            with self._socket_connect("dbpool-harness-setup") as conn:
                # Flushed at commit: the role keeps its password through an immediate kill().
                conn.execute("SET synchronous_commit = on")
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(self.user), sql.Literal(password)
                    )
                )
        except psycopg.Error as exc:
            raise PgClusterError(f"could not set the password of {self.user!r}: {exc}") from None

    def _probe(self) -> bool:
        # Probe over the unix socket: logged as host=[local], so it does not
        # disturb count_connection_attempts(); TCP readiness is implied (the
        # postmaster opens its TCP listener before it reports "ready").
        try:
            with self._socket_connect("dbpool-harness-probe") as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _wait_ready(self, timeout: float, *, log_offset: int | None) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            info = self._read_pidfile()
            alive = info is not None and _pid_alive(info.pid)
            if info is not None and alive and info.status == "ready" and self._probe():
                return
            if log_offset is not None and not alive:
                # No live postmaster, yet the log of this start shows a fatal error:
                # it has already given up (port in use, bad config, ...).
                new_log = self._log_since(log_offset)
                if _FAILURE_LINE.search(new_log):
                    raise PgClusterError(
                        f"postmaster for {self.data_dir} failed to start:\n{new_log[-2000:]}"
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PgClusterError(
                    f"cluster {self.base_dir} not ready after {timeout}s; log tail:\n"
                    f"{self.log_text()[-2000:]}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
