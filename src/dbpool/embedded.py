"""The embedded PostgreSQL: a real server from the ``pgserver`` wheel.

dbpool uses it when no DSN is given, so that a fresh machine with only
Python can run the service.  It is never a fake: if ``pgserver`` is not
installed, :func:`embedded_conninfo` raises and says how to install it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

__all__ = ["default_data_dir", "embedded_conninfo"]

logger = logging.getLogger("dbpool.embedded")

_servers: dict[Path, Any] = {}


def default_data_dir() -> Path:
    """``$DBPOOL_EMBEDDED_DIR``, else ``$XDG_DATA_HOME/dbpool/pgdata`` (``~/.local/share``)."""
    explicit = os.environ.get("DBPOOL_EMBEDDED_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "dbpool" / "pgdata"


def embedded_conninfo(data_dir: Path | None = None) -> str:
    """Start (or reuse) the embedded server in ``data_dir`` and return its conninfo.

    The server keeps its data between runs and stops when this process exits
    if this process started it.
    """
    try:
        import pgserver
    except ImportError as exc:
        raise ConfigurationError(
            "no DSN was given and the embedded PostgreSQL is not installed; "
            "install it with `pip install 'dbpool[embedded]'` or pass a DSN"
        ) from exc
    path = (data_dir or default_data_dir()).resolve()
    server = _servers.get(path)
    if server is None:
        path.mkdir(parents=True, exist_ok=True)
        _forget_dead_users(path)
        logger.info("starting the embedded PostgreSQL in %s", path)
        server = pgserver.get_server(path, cleanup_mode="stop")  # type: ignore[attr-defined]
        _servers[path] = server
    return str(server.get_uri())


def _forget_dead_users(path: Path) -> None:
    """Take the processes that died without stopping the server off its list of users.

    pgserver stops the server when the last process on that list exits; a
    process killed with SIGKILL never leaves the list, so the server would
    outlive everyone.  With the dead taken off, this process adopts a server
    left running (pgserver finds it and reuses it: one postmaster for the
    folder), and stops it when it exits last.
    """
    # pgserver's own lock library (untyped; imported by name so that a type check
    # of dbpool needs no stubs for it).
    fasteners = importlib.import_module("fasteners")
    from pgserver.postgres_server import PostgresServer

    users = path / ".handle_pids.json"
    with fasteners.InterProcessLock(PostgresServer.lock_path):
        try:
            pids = json.loads(users.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list) or not all(isinstance(pid, int) for pid in pids):
            return  # not the format this was written for: leave it alone
        alive = [pid for pid in pids if _alive(pid)]
        if alive != pids:
            logger.info("the embedded PostgreSQL in %s: its users %s are gone; adopting it",
                        path, sorted(set(pids) - set(alive)))
            users.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
